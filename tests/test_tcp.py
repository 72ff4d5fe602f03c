"""TCP: class-aware rows from the hand-crafted features replace the context rows at the official text layer; text
features and every gradient against a 77-token, sequence-first reference; its loss, optimiser and recipes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from support import TINY_OPTIONS, TINY_VIT, tiny_backbone

import vlprompt as vp
from vlprompt.backbones import builtin_config_dir
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.run import run
from vlprompt.engine.trainer import TrainBatch
from vlprompt.errors import VlpromptError
from vlprompt.methods import METHODS
from vlprompt.methods.base import MethodConfig, PromptLayout, parse_options
from vlprompt.text.fast import encode_shared_prefix, encode_truncated

CLASSES = ["abyssinian", "great pyrenees", "cat"]
# Names of 1 to 16 tokens, enough rows to span several attention chunks in both layouts.
NAMES = ["cat", "great pyrenees", "american pit bull terrier", "F/A-18", "dog", "2012 Tesla Model S Sedan",
         "a very long class name made of many words that tokenize to many tokens indeed", "tree"]


@pytest.fixture(scope="module")
def bb4(tmp_path_factory):
    cfg = json.loads((builtin_config_dir() / "vlprompt-tiny-ViT.json").read_text())
    cfg["text_cfg"]["layers"] = 4
    path = tmp_path_factory.mktemp("arch") / "tiny-text4.json"
    path.write_text(json.dumps(cfg))
    return tiny_backbone(str(path))


def build(bb, dataset="oxford_pets", **options):
    method = METHODS["tcp"]
    config = MethodConfig("tcp", parse_options("tcp", method.Options, options), PromptLayout(), "a photo of a {}.",
                          dataset)
    torch.manual_seed(0)
    return method.create(bb, CLASSES, config)


def reference_text(bb, learner, template, layer):
    """77 tokens per class; rows 1..4 = the context before the positions; at block ``layer``'s input rows 1..4 =
    meta_net(hand-crafted features) of the class; blocks one by one in (L, C, D)."""
    tokens = bb.tokenize(["X X X X " + template.format(c) for c in CLASSES])
    emb = bb.text.token_embedding(tokens).float()
    c = len(CLASSES)
    emb = torch.cat([emb[:, :1], learner.ctx.expand(c, -1, -1), emb[:, 5:]], dim=1)
    x = (emb + bb.text.positional_embedding).permute(1, 0, 2)
    hand = F.normalize(bb.model.encode_text(bb.tokenize([learner.hand_template.format(n) for n in CLASSES])).float(),
                       dim=-1)
    rows = learner.meta_net(hand).view(c, 4, -1).permute(1, 0, 2)
    for i, block in enumerate(bb.text.blocks):
        if i == layer:
            x = torch.cat([x[:1], rows, x[5:]], dim=0)
        x = block(x.permute(1, 0, 2), attn_mask=bb.text.attn_mask).permute(1, 0, 2)
    x = bb.text.ln_final(x.permute(1, 0, 2))
    return F.normalize(bb.text.project(x[torch.arange(c), tokens.argmax(-1)]).float(), dim=-1)


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_class_aware_rows_match_the_reference(bb4, layer):
    learner = build(bb4, class_layer=layer)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert learner.prompt_template == "{}, a type of pet." and learner.hand_template == "a photo of a {}, a type of pet."
    target = torch.randn(len(CLASSES), bb4.embed_dim)
    ref = reference_text(bb4, learner, learner.prompt_template, layer)
    (ref * target).sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in learner.named_parameters()}
    learner.zero_grad(set_to_none=True)
    got = learner.text_features()
    (got * target).sum().backward()
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=2e-5, atol=2e-6)
    for name, p in learner.named_parameters():
        # at block 0 the class rows replace the context before any block sees it
        assert (float(p.grad.abs().max()) > 0) == (layer > 0 or name != "ctx"), name
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=2e-4, atol=1e-6)


def shared_and_whole(bb, prefix_rows: int, n: int = 4):
    """A random prefix of ``prefix_rows`` rows (SOS + context), NAMES' own tokens, random class rows (C, n, D)."""
    torch.manual_seed(1)
    tokens = bb.tokenize(["X " * (prefix_rows - 1) + name + "." for name in NAMES])
    emb = bb.text.token_embedding(tokens).float()
    prefix = torch.cat([emb[0, :1], 0.1 * torch.randn(prefix_rows - 1, bb.ctx_dim)]).requires_grad_()
    suffix = emb[:, prefix_rows:].clone().requires_grad_()
    rows = (0.1 * torch.randn(len(NAMES), n, bb.ctx_dim)).requires_grad_()
    return prefix, suffix, rows, bb.eot_index(tokens)


@pytest.mark.parametrize("prefix_rows", [5, 7])
def test_shared_prefix_with_class_rows_equals_the_truncated_path(bb4, prefix_rows):
    """Below the layer the prefix is computed once, from it on per class: the same features and gradients (to the
    context, the class rows and the class tokens) as every class computed in full, at every layer."""
    prefix, suffix, rows, eot = shared_and_whole(bb4, prefix_rows)
    target = torch.randn(len(NAMES), bb4.embed_dim)
    assert len(set(eot.tolist())) > 4
    for layer in range(len(bb4.text.blocks)):
        whole = torch.cat([prefix.expand(len(NAMES), -1, -1), suffix], dim=1)
        ref = encode_truncated(bb4, whole, eot, class_rows=(layer, rows))
        ref_grads = torch.autograd.grad((ref * target).sum(), (prefix, suffix, rows))
        got = encode_shared_prefix(bb4, prefix, suffix, eot + 1 - prefix_rows, class_rows=(layer, rows))
        grads = torch.autograd.grad((got * target).sum(), (prefix, suffix, rows))
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-6)
        for name, g, r in zip(("prefix", "suffix", "rows"), grads, ref_grads):
            # float32 rounding only (the prefix copies are summed in another order): tolerance scaled to the tensor
            torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-6 * float(r.abs().max()),
                                       msg=lambda m: f"layer {layer}, {name}: {m}")
        # the context rows replaced at block 0 never reach the output; SOS and any rows after them always do
        assert (float(grads[0][1:5].abs().max()) > 0) == (layer > 0)
        assert float(grads[0][0].abs().max()) > 0 and float(grads[2].abs().max()) > 0


def test_bad_class_rows_are_refused(bb4):
    prefix, suffix, rows, eot = shared_and_whole(bb4, 5)
    own = eot + 1 - 5
    with pytest.raises(VlpromptError, match=r"class rows 1..5 do not fit in the shared prefix: 5 rows"):
        encode_shared_prefix(bb4, prefix, suffix, own, class_rows=(2, torch.zeros(len(NAMES), 5, bb4.ctx_dim)))
    for layer in (4, -1):
        with pytest.raises(VlpromptError, match=f"class rows at block {layer} of a text tower of 4 blocks"):
            encode_shared_prefix(bb4, prefix, suffix, own, class_rows=(layer, rows))
    with pytest.raises(VlpromptError, match=r"class rows of shape \(3, 4, \d+\); \(classes=8, N, width\)"):
        encode_shared_prefix(bb4, prefix, suffix, own, class_rows=(1, rows[:3]))
    with pytest.raises(VlpromptError, match="deep text prompts and class rows cannot be combined"):
        encode_shared_prefix(bb4, prefix, suffix, own, [None, torch.zeros(2, bb4.ctx_dim)], class_rows=(1, rows))
    whole = torch.cat([prefix.expand(len(NAMES), -1, -1), suffix], dim=1)
    too_long = torch.zeros(len(NAMES), int(eot.min()), bb4.ctx_dim)
    with pytest.raises(VlpromptError, match="do not fit in the rows before the earliest EOT"):
        encode_truncated(bb4, whole, eot, class_rows=(1, too_long))


def test_rows_differ_per_class_and_follow_the_dataset(bb4):
    learner = build(bb4, class_layer=2)
    tokens = learner.class_tokens()
    assert tokens.shape == (3, 4, bb4.ctx_dim) and not torch.equal(tokens[0], tokens[1])
    other = build(bb4, dataset="my_folder", class_layer=2)
    assert other.prompt_template == "{}." and other.hand_template == "a photo of a {}."
    with pytest.raises(VlpromptError, match="class_layer=4, but the text tower"):
        build(bb4, class_layer=4)


def test_loss_and_optimiser_follow_the_official_code(bb4):
    learner = build(bb4, class_layer=2)
    objective = METHODS["tcp"].objective(learner, learner.method_config)
    feats = torch.randn(4, bb4.embed_dim)
    labels = torch.tensor([0, 1, 2, 0])
    loss, terms = objective.loss(learner, TrainBatch({"weak": feats}, labels, torch.arange(4)))
    with torch.no_grad():
        g = learner.text_features()
        logits = bb4.logit_scale * F.normalize(feats, dim=-1) @ g.T
        cos = (g * learner.hand).sum(-1) / (g.norm(dim=-1) * learner.hand.norm(dim=-1))
        expected = F.cross_entropy(logits, labels) + 8.0 * (1 - cos.mean())
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)

    class Settings:
        lr, weight_decay = 0.002, 5e-4
    opt = objective.optimizer([learner.ctx], Settings)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["eps"] == 1e-3 and opt.defaults["weight_decay"] == 5e-4


def test_trains_transfers_and_its_recipes(tmp_path):
    bb = tiny_backbone()
    shapes = make_synthetic_dataset(str(tmp_path / "shapes"), n_train_per_class=2, n_test_per_class=1, seed=0)
    cfg = vp.RunConfig.from_sources(dataset=shapes, method="tcp", backbone=TINY_VIT, pretrained="random", shots=2,
                                    epochs=2, batch_size=4, output=str(tmp_path / "run"), progress=False,
                                    method_options=TINY_OPTIONS["tcp"])
    m = run(cfg, backbone=bb)
    assert {"ce", "kg"} <= set(m["train"]["epochs"][0])
    moved = vp.load_prompt(tmp_path / "run", bb, classnames=["teapot", "violin"])
    assert moved.class_tokens().shape[0] == 2

    def values(**kw):
        return vp.RunConfig.from_sources(method="tcp", **kw)
    base = values(subsample="base", dataset="caltech101")
    assert (base.batch_size, base.lr, base.epochs) == (32, 0.002, 50)
    assert values(subsample="base", dataset="sun397").epochs == 25 and values(subsample="base", dataset="imagenet").epochs == 25
