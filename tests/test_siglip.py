"""Bidirectional text towers. SigLIP's (open_clip's ViT-B-16-SigLIP text configuration, shrunk; a small sentencepiece-
kind Unigram tokenizer built here, since SigLIP's own needs a hub): no start token, pooled at the last of its 64
positions, every position seeing every other. CoOp's prompts go through the dense full-length path, exact against
open_clip's own encode_text for every class position; logits carry the model's logit bias; the CoOp family trains,
saves, loads and evaluates; methods whose text shortcuts need a causal tower are one line. MobileCLIP-S2's tower:
bidirectional with CLIP's tokenizer, pooled at its end-of-text token, exact the same way."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from support import SplitLoRA, siglip_arch, split_attention

import vlprompt as vp
from vlprompt.cli import main
from vlprompt.data import make_synthetic_dataset
from vlprompt.text.dense import encode_dense

if not os.environ.get("CI"):
    pytest.importorskip("transformers")  # scripts/setup.sh installs it; CI must not skip these tests

NAMES = ["face", "water lily", "stop sign", "motorbike"]


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    return siglip_arch(tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="module")
def bb(arch):
    with pytest.warns(UserWarning, match="RANDOMLY"):
        return vp.load_backbone(arch, pretrained="random")


def test_the_tower_is_read_as_it_is(bb):
    assert not bb.text.causal and bb.text.pool_type == "last" and bb.n_start == 0 and bb.context_length == 64
    assert bb.logit_bias == pytest.approx(-10.0)  # SigLIP's initial logit bias
    assert bb.tokens.pad_id == 0 and bb.bpe_length("water lily") == 2


def test_coop_through_the_dense_path_equals_open_clips_encode_text(bb):
    torch.manual_seed(0)
    learner = vp.CoOp(bb, NAMES, n_ctx=4, ctx_init="a photo of a")  # the context is the phrase's own embeddings
    with torch.no_grad():
        ours = learner.text_features()
        theirs = F.normalize(bb.model.encode_text(bb.tokenize([f"a photo of a {n}." for n in NAMES])), dim=-1)
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5


@pytest.mark.parametrize("position", ["middle", "front"])
def test_every_class_position_is_the_prompt_open_clip_would_encode(bb, position):
    """A context of random vectors at each position: the dense path equals open_clip's own text transformer run on
    the assembled token embeddings (its forward after the embedding lookup)."""
    torch.manual_seed(0)
    learner = vp.CoOp(bb, NAMES, n_ctx=2, class_token_position=position)
    text = bb.model.text
    with torch.no_grad():
        prompts = learner.prompt_embeddings()
        x = prompts + text.positional_embedding
        x = text.ln_final(text.transformer(x, attn_mask=None))
        want = F.normalize(text.text_projection(x[:, -1]), dim=-1)
        got = learner.text_features()
        assert torch.allclose(F.normalize(encode_dense(bb, prompts, learner.eot_idx), dim=-1), want, atol=1e-6)
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_logits_carry_the_logit_bias(bb):
    learner = vp.CoOp(bb, NAMES, n_ctx=2)
    feats = torch.randn(3, bb.embed_dim)
    with torch.no_grad():
        text = learner.text_features()
        cosine = F.normalize(feats, dim=-1) @ text.T
        assert torch.allclose(learner.logits(feats, text), bb.logit_scale * cosine + bb.logit_bias, atol=1e-5)


def test_the_coop_family_and_the_baselines_train_save_load_and_evaluate(arch, tmp_path, capsys):
    data = make_synthetic_dataset(str(tmp_path / "shapes"), n_train_per_class=2, n_test_per_class=2, seed=0)
    common = ["--dataset", data, "--backbone", arch, "--pretrained", "random", "--quiet"]
    for method in ("coop", "kgcoop", "cpt", "prograd", "dualview_mi", "linear_probe", "tip_adapter", "tip_adapter_f",
                   "clip_adapter"):
        out = tmp_path / method
        assert main(["train", *common, "--method", method, "--shots", "1", "--epochs", "1", "--n-ctx", "2",
                     "--output", str(out)]) == 0, (method, capsys.readouterr().err)
        trained = json.loads((out / "metrics.json").read_text())
        assert main(["eval", str(out), "--output", str(tmp_path / f"{method}-eval"), "--quiet"]) == 0, method
        again = json.loads((tmp_path / f"{method}-eval" / "metrics.json").read_text())
        assert again["test"]["accuracy"] == trained["test"]["accuracy"], method
    assert main(["zeroshot", *common, "--output", str(tmp_path / "zs")]) == 0, capsys.readouterr().err


def full_computation(bb, prompts, pooled, deep=(), class_rows=None, lora=None, train=False, dropout=0.0):
    """Batch-first, every prompt at the tower's full length, no mask; each block written out with split q/k/v
    projections (support.SplitLoRA, one dropout module per branch) and explicit softmax attention; deep rows and class
    rows written into the rows after the start tokens."""
    s = bb.n_start
    split = SplitLoRA(lora, bb.ctx_dim, dropout)
    x = prompts + bb.text.positional_embedding
    for i, block in enumerate(bb.text.blocks):
        rows = deep[i].expand(x.shape[0], -1, -1) if 0 < i < len(deep) and deep[i] is not None else None
        if class_rows is not None and i == class_rows[0]:
            rows = class_rows[1]
        if rows is not None:
            x = x.clone()
            x[:, s:s + rows.shape[1]] = rows
        h = block.ln_1(x)
        x = x + split_attention(block, *split.project(i, block, h, train))
        x = x + block.mlp(block.ln_2(x))
    x = bb.text.ln_final(x)
    return bb.text.project(x[torch.arange(x.shape[0]), pooled])


def embedded(bb, texts):
    tokens = bb.tokenize(texts)
    return bb.text.token_embedding(tokens).detach(), bb.eot_index(tokens)


def close(a, b, tol=1e-5):
    return float((a - b).detach().norm() / b.detach().norm()) < tol


@pytest.fixture(scope="module")
def s2(tmp_path_factory):
    """MobileCLIP-S2's text configuration, shrunk: bidirectional with CLIP's tokenizer (a start token)."""
    import open_clip

    cfg = copy.deepcopy(open_clip.get_model_config("MobileCLIP-S2"))
    cfg["text_cfg"].update(layers=2, width=64, heads=2)
    cfg["vision_cfg"] = {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32}
    cfg["embed_dim"] = 32
    path = tmp_path_factory.mktemp("s2") / "mobileclip-s2-small.json"
    path.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="RANDOMLY"):
        return vp.load_backbone(str(path), pretrained="random")


@pytest.fixture(params=["siglip", "mobileclip_s2"])
def tower(request, bb, s2):
    return bb if request.param == "siglip" else s2


def grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True)


def test_deep_text_prompts_through_the_dense_path_equal_the_full_computation(tower):
    """IVLP's text side (context after the start tokens, its own rows at block 1): features and every gradient."""
    from vlprompt.methods.deep_prompts import IVLPOptions
    from vlprompt.prompts.deep import DeepPrompts

    torch.manual_seed(0)
    learner = DeepPrompts(tower, NAMES, IVLPOptions(depth_text=2, depth_vision=2, prompt_rounding="none"), "ivlp")
    with torch.no_grad():
        learner.ctx.add_(0.5 * torch.randn_like(learner.ctx))
    got = learner.text_features()
    x, pooled = embedded(tower, [f"a photo of a {n}." for n in NAMES])
    x = x.clone()
    s = tower.n_start
    x[:, s:s + 2] = learner.ctx
    want = F.normalize(full_computation(tower, x, pooled, deep=[None, learner.text_deep[0]]), dim=-1)
    assert close(got, want)
    w = torch.randn_like(want)
    params = [learner.ctx, learner.text_deep[0]]
    for g, r in zip(grads((got * w).sum(), params), grads((want * w).sum(), params)):
        assert close(g, r, 1e-4)


@pytest.mark.parametrize("class_layer", [0, 1])
def test_tcp_class_rows_through_the_dense_path_equal_the_full_computation(tower, class_layer):
    from vlprompt.methods.tcp import TCPOptions, TCPPrompts

    torch.manual_seed(0)
    learner = TCPPrompts(tower, NAMES, TCPOptions(n_ctx=4, class_layer=class_layer), "caltech101")
    got = learner.text_features()
    x, pooled = embedded(tower, [f"X X X X {n}." for n in NAMES])  # TCP's Caltech prompt: "{}." after the rows
    x = x.clone()
    s = tower.n_start
    x[:, s:s + 4] = learner.ctx
    want = F.normalize(full_computation(tower, x, pooled, class_rows=(class_layer, learner.class_tokens())), dim=-1)
    assert close(got, want)
    w = torch.randn_like(want)
    params = [learner.meta_net[0].weight, learner.meta_net[2].weight] + ([learner.ctx] if class_layer else [])
    for g, r in zip(grads((got * w).sum(), params), grads((want * w).sum(), params)):
        assert close(g, r, 1e-4)


def test_cocoop_per_image_prompts_through_the_dense_path_equal_the_full_computation(tower):
    from vlprompt.methods.cocoop import CoCoOp

    torch.manual_seed(0)
    learner = CoCoOp(tower, NAMES, n_ctx=4, ctx_init="a photo of a")
    feats = torch.randn(3, tower.embed_dim)
    got = learner.image_text_features(feats)
    x, pooled = embedded(tower, [f"a photo of a {n}." for n in NAMES])
    s, bias = tower.n_start, learner.bias(feats)
    want = []
    for b in range(feats.shape[0]):
        prompts = x.clone()
        prompts[:, s:s + 4] = learner.ctx + bias[b]
        want.append(F.normalize(full_computation(tower, prompts, pooled), dim=-1))
    want = torch.stack(want)
    assert got.shape == (3, len(NAMES), tower.embed_dim) and close(got, want)
    w = torch.randn_like(want)
    params = [learner.ctx, learner.meta_net[0].weight]
    for g, r in zip(grads((got * w).sum(), params), grads((want * w).sum(), params)):
        assert close(g, r, 1e-4)


@pytest.mark.parametrize("train, dropout", [(True, 0.0), (True, 0.25), (False, 0.25)])
def test_clip_lora_text_updates_through_the_dense_path_equal_split_projections(tower, train, dropout):
    """The fused update (branches in training with a mask per projection drawn on every row, merged into the weight
    in evaluation) against split q/k/v projections with one dropout module each, drawn from the same seed."""
    from vlprompt.methods import METHODS
    from vlprompt.methods.base import MethodConfig, PromptLayout, parse_options

    method = METHODS["clip_lora"]
    options = parse_options("clip_lora", method.Options, {"dropout": dropout, "encoder": "text"})
    torch.manual_seed(0)
    learner = method.create(tower, NAMES, MethodConfig("clip_lora", options, PromptLayout(), "a photo of a {}.", ""))
    with torch.no_grad():  # trained-looking factors (B starts at zero)
        for p in learner.parameters():
            p.add_(0.3 * torch.randn_like(p))
    learner.train(train)
    torch.manual_seed(7)
    got = learner.text_features()
    x, pooled = embedded(tower, [f"a photo of a {n}." for n in NAMES])
    torch.manual_seed(7)
    want = F.normalize(full_computation(tower, x, pooled, lora=learner.text_lora, train=train, dropout=dropout), dim=-1)
    assert close(got, want)
    if train:
        w = torch.randn_like(want)
        params = [learner.text_lora.a, learner.text_lora.b]
        for g, r in zip(grads((got * w).sum(), params), grads((want * w).sum(), params)):
            assert close(g, r, 1e-4)


def test_siglip_2s_tower_the_same_way(tmp_path):
    """ViT-B-16-SigLIP2's text configuration (tanh GELU), shrunk: CoOp's and the deep prompts' dense path against
    open_clip's encode_text and the full computation; the logit bias in the logits."""
    from vlprompt.methods.deep_prompts import DeepLanguageOptions
    from vlprompt.prompts.deep import DeepPrompts

    with pytest.warns(UserWarning, match="RANDOMLY"):
        two = vp.load_backbone(siglip_arch(tmp_path, "ViT-B-16-SigLIP2"), pretrained="random")
    assert not two.text.causal and two.text.pool_type == "last" and two.n_start == 0 and two.activation == "gelu"
    assert two.model.text.transformer.resblocks[0].mlp.gelu.approximate == "tanh"
    texts = [f"a photo of a {n}." for n in NAMES]
    with torch.no_grad():
        ours = vp.CoOp(two, NAMES, n_ctx=4, ctx_init="a photo of a").text_features()
        assert close(ours, F.normalize(two.model.encode_text(two.tokenize(texts)), dim=-1))
    torch.manual_seed(0)
    learner = DeepPrompts(two, NAMES, DeepLanguageOptions(n_ctx_text=2, depth_text=2, prompt_rounding="none"),
                          "deep_language")
    x, pooled = embedded(two, texts)
    with torch.no_grad():
        want = F.normalize(full_computation(two, x, pooled, deep=[None, learner.text_deep[0]]), dim=-1)
        assert close(learner.text_features(), want)
        feats = torch.randn(2, two.embed_dim)
        assert torch.allclose(learner(feats), two.logit_scale * F.normalize(feats, dim=-1) @ want.T + two.logit_bias,
                              atol=1e-4)


def test_the_tokenizer_beside_the_weights_file(arch, bb, tmp_path):
    """An open_clip SigLIP as a hub snapshot keeps it: weights and tokenizer files in one folder. The architecture's
    tokenizer (here a hub id this machine cannot reach) is then read from that folder; without the files there it is
    one line, before the weights are read."""
    import shutil

    from safetensors.torch import save_file

    cfg = json.loads(open(arch).read())
    tokenizer_dir = cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"]
    cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "timm/not-on-this-machine"
    arch_file = tmp_path / "siglip-hub.json"
    arch_file.write_text(json.dumps(cfg))
    folder = tmp_path / "snapshot"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    with pytest.raises(vp.VlpromptError, match="cannot load its tokenizer 'timm/not-on-this-machine'.*beside the "
                                               "weights file"):
        vp.load_backbone(str(arch_file), weights=str(folder / "open_clip_model.safetensors"))
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), folder / f)
    loaded = vp.load_backbone(str(arch_file), weights=str(folder / "open_clip_model.safetensors"))
    texts = [f"a photo of a {n}." for n in NAMES]
    assert torch.equal(loaded.tokenize(texts), bb.tokenize(texts))
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_text(loaded.tokenize(texts)), bb.model.encode_text(bb.tokenize(texts)))


def test_shared_prefix_masks_are_refused_on_a_bidirectional_tower(arch, tmp_path, capsys):
    data = make_synthetic_dataset(str(tmp_path / "shapes"), n_train_per_class=1, n_test_per_class=1, seed=0)
    assert main(["train", "--dataset", data, "--backbone", arch, "--pretrained", "random", "--quiet", "--method",
                 "clip_lora", "--option", "prefix_masks=shared", "--option", "iterations=2", "--shots", "1",
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prefix_masks=shared is a shortcut of causal text towers" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method, options", [("cocoop", []), ("tcp", ["--option", "class_layer=1"]),
                                             ("ivlp", ["--option", "depth_text=2", "--option", "depth_vision=2"]),
                                             ("maple", ["--option", "depth=2"]),
                                             ("promptsrc", ["--option", "depth_text=2", "--option", "depth_vision=2"]),
                                             ("clip_lora", ["--option", "iterations=2"])])
def test_every_method_with_tower_prompts_trains_saves_loads_and_evaluates(arch, tmp_path, capsys, method, options):
    data = make_synthetic_dataset(str(tmp_path / "shapes"), n_train_per_class=1, n_test_per_class=2, seed=0)
    out = tmp_path / "run"
    assert main(["train", "--dataset", data, "--backbone", arch, "--pretrained", "random", "--quiet", "--method",
                 method, *options, "--shots", "1", "--epochs", "1", "--output", str(out)]) == 0, capsys.readouterr().err
    trained = json.loads((out / "metrics.json").read_text())
    assert main(["eval", str(out), "--output", str(tmp_path / "eval"), "--quiet"]) == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["test"]["accuracy"] == trained["test"]["accuracy"]


def test_a_bidirectional_tower_with_clips_tokenizer_mobileclip_s2(s2):
    """MobileCLIP-S2's text tower: CLIP's BPE (a start token), no causal mask, pooled at the end-of-text token."""
    bb = s2
    assert not bb.text.causal and bb.text.pool_type == "argmax" and bb.n_start == 1
    torch.manual_seed(0)
    learner = vp.CoOp(bb, NAMES, n_ctx=4, ctx_init="a photo of a")
    with torch.no_grad():
        ours = learner.text_features()
        theirs = F.normalize(bb.model.encode_text(bb.tokenize([f"a photo of a {n}." for n in NAMES])), dim=-1)
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5


def test_export_and_predict_carry_the_logit_bias(arch, tmp_path, capsys):
    """The exported head's bias is the model's logit bias (its logits equal the learner's), and predict gives each
    class's sigmoid probability, as SigLIP scores classes."""
    import math

    from safetensors.torch import load_file

    data = make_synthetic_dataset(str(tmp_path / "shapes"), n_train_per_class=2, n_test_per_class=1, seed=0)
    out = tmp_path / "run"
    assert main(["train", "--dataset", data, "--backbone", arch, "--pretrained", "random", "--quiet", "--shots", "1",
                 "--epochs", "1", "--n-ctx", "2", "--output", str(out)]) == 0, capsys.readouterr().err
    assert main(["export", str(out), "--output", str(tmp_path / "head")]) == 0, capsys.readouterr().err
    capsys.readouterr()
    head = load_file(str(tmp_path / "head" / "head.safetensors"))
    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    assert meta["has_bias"] and torch.allclose(head["bias"], torch.full_like(head["bias"], -10.0))
    image = next((tmp_path / "shapes").rglob("*.png"))
    assert main(["predict", str(out), str(image), "--format", "json", "--quiet"]) == 0
    predictions = json.loads(capsys.readouterr().out)["images"][0]["predictions"]
    for p in predictions:
        assert p["probability"] == pytest.approx(1 / (1 + math.exp(-p["logit"])), rel=1e-6)


@pytest.mark.realdata
def test_zero_shot_runs_on_caltech_images(bb, caltech_root):
    from vlprompt.data.transforms import test_transform
    from vlprompt.engine.features import encode_items

    cal = vp.load_dataset("caltech101", str(caltech_root))
    items = cal.test[::250]
    feats, _ = encode_items(bb, items, test_transform(**bb.preprocess.test_args()), batch_size=8, progress=False)
    with torch.no_grad():
        logits = vp.ZeroShotCLIP(bb, cal.classnames)(feats)
    assert logits.shape == (len(items), len(cal.classnames)) and torch.isfinite(logits).all()
    assert bb.preprocess.resize_mode == "squash" and bb.preprocess.mean == (0.5, 0.5, 0.5)  # SigLIP's own
