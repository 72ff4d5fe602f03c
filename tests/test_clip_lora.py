"""CLIP-LoRA: low-rank updates on open_clip's fused q/k/v projection against a split q/k/v computation (separate
projections, one dropout module per branch, explicit softmax attention), with and without dropout; the text fast
paths with the updates against a 77-token reference; the per-iteration schedule against PyTorch's own scheduler;
the artefact (only the low-rank factors), transfer, option errors and the run's records."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from support import TINY_VIT, SplitLoRA, split_attention

import vlprompt as vp
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.run import run
from vlprompt.engine.schedule import IterationCosine
from vlprompt.methods import METHODS
from vlprompt.methods.base import MethodConfig, PromptLayout, parse_options
from vlprompt.prompts.artifact import WEIGHTS_NAME

CLASSES = ["abyssinian", "great pyrenees", "cat", "english cocker spaniel"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=4, n_test_per_class=3,
                                  seed=0)


def build(bb, classes=CLASSES, **options):
    method = METHODS["clip_lora"]
    config = MethodConfig("clip_lora", parse_options("clip_lora", method.Options, options), PromptLayout(),
                          "a photo of a {}.", "")
    torch.manual_seed(0)
    learner = method.create(bb, classes, config)
    with torch.no_grad():  # trained-looking factors: B is zero at initialisation
        for p in learner.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return learner


def reference_image(bb, lora, images, train: bool, dropout: float):
    """Batch-first image tower, blocks written out with the split projections."""
    visual = bb.model.visual
    split = SplitLoRA(lora, visual.class_embedding.shape[-1], dropout)
    x = visual.conv1(images)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    for i, block in enumerate(visual.transformer.resblocks):
        h = block.ln_1(x)
        x = x + split_attention(block, *split.project(i, block, h, train))
        x = x + block.mlp(block.ln_2(x))
    return visual.ln_post(x[:, 0]) @ visual.proj


def reference_text(bb, lora, texts, train: bool):
    """Sequence-first, every prompt padded to 77 tokens, split projections, no dropout."""
    tokens = bb.tokenize(texts)
    x = (bb.text.token_embedding(tokens) + bb.text.positional_embedding).transpose(0, 1)  # (77, C, D)
    split = SplitLoRA(lora, x.shape[-1], 0.0)
    mask = bb.text.attn_mask
    for i, block in enumerate(bb.text.blocks):
        h = block.ln_1(x).transpose(0, 1)
        x = x + split_attention(block, *split.project(i, block, h, train), mask).transpose(0, 1)
        x = x + block.mlp(block.ln_2(x))
    x = bb.text.ln_final(x.transpose(0, 1))
    return bb.text.project(x[torch.arange(len(texts)), tokens.argmax(-1)])


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fused_image_update_equals_split_projections(bb, dropout):
    learner = build(bb, dropout=dropout)
    images = torch.randn(3, 3, bb.image_size, bb.image_size)
    learner.train()
    target = torch.randn(3, bb.embed_dim)
    torch.manual_seed(7)  # the same dropout masks: drawn in the order q, k, v, block after block, on (B, N, D)
    got = learner.image_features(images)
    (got * target).sum().backward()
    grads = {k: p.grad.clone() for k, p in learner.named_parameters() if p.grad is not None}
    learner.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    ref = reference_image(bb, learner.vision_lora, images, True, dropout)
    (ref * target).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert set(grads) == {"vision_lora.a", "vision_lora.b"}
    for name, p in learner.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)
    if dropout:  # the masks matter: another draw gives other features
        torch.manual_seed(8)
        assert not torch.allclose(learner.image_features(images), got)


def test_evaluation_merges_the_update_into_the_weight(bb):
    learner = build(bb).eval()
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    with torch.no_grad():
        merged = learner.image_features(images)
        ref = reference_image(bb, learner.vision_lora, images, False, 0.25)
        torch.testing.assert_close(merged, ref, rtol=1e-5, atol=1e-5)
        texts = [f"a photo of a {c}." for c in CLASSES]
        torch.testing.assert_close(learner.text_features(),
                                   F.normalize(reference_text(bb, learner.text_lora, texts, False), dim=-1),
                                   rtol=1e-5, atol=1e-6)
    assert learner.n_prefix == 5  # SOS + "a photo of a": shared by every class in evaluation


@pytest.mark.parametrize("template", ["a photo of a {}.", "{}, a type of pet."])
def test_text_fast_paths_with_updates_equal_the_77_token_reference(bb, template):
    learner = build(bb, dropout=0.0, text_template=template)
    learner.train()  # updates as branches; no dropout, so the shared prefix is exact as well
    texts = [template.format(c) for c in CLASSES]
    target = torch.randn(len(CLASSES), bb.embed_dim)
    ref = F.normalize(reference_text(bb, learner.text_lora, texts, True), dim=-1)
    (ref * target).sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in learner.named_parameters() if p.grad is not None}
    learner.zero_grad(set_to_none=True)
    got = learner.text_features()
    (got * target).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert set(ref_grads) == {"text_lora.a", "text_lora.b"}
    for name in ref_grads:
        torch.testing.assert_close(dict(learner.named_parameters())[name].grad, ref_grads[name], rtol=1e-4,
                                   atol=1e-6)
    assert learner.n_prefix == (5 if template.startswith("a photo") else 1)


def test_training_text_with_dropout_draws_masks_per_class(bb):
    """With dropout every class runs its own sequence (one mask per class and token, no shared prefix): training
    features are random, evaluation features are not, and a shared prefix with dropout is refused."""
    learner = build(bb)
    learner.train()
    torch.manual_seed(0)
    a = learner.text_features()
    torch.manual_seed(1)
    b = learner.text_features()
    assert not torch.allclose(a, b)  # dropout is active
    learner.eval()
    with torch.no_grad():
        c, d = learner.text_features(), learner.text_features()
    assert torch.equal(c, d)
    with pytest.raises(vp.VlpromptError, match="shared prefix cannot take low-rank updates with dropout"):
        from vlprompt.text.fast import encode_shared_prefix

        learner.train()
        encode_shared_prefix(bb, learner.embedded[0, :5], learner.embedded[:, 5:], learner.eot_idx - 4,
                             adapter=learner.text_lora)


def test_untrained_updates_are_the_frozen_model(bb):
    method = METHODS["clip_lora"]
    config = MethodConfig("clip_lora", method.Options(), PromptLayout(), "a photo of a {}.", "")
    learner = method.create(bb, CLASSES, config)
    with torch.no_grad():
        assert float(learner.text_lora.b.abs().max()) == 0 and float(learner.vision_lora.a.abs().max()) > 0
        assert float(learner.text_lora.a.abs().max()) <= 1 / math.sqrt(bb.ctx_dim)
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    learner.eval()
    with torch.no_grad():
        torch.testing.assert_close(learner.image_features(images), bb.encode_images(images), rtol=1e-5, atol=1e-5)
        frozen = F.normalize(bb.encode_texts([f"a photo of a {c}." for c in CLASSES]), dim=-1)
        torch.testing.assert_close(learner.text_features(), frozen, rtol=1e-5, atol=1e-6)


def test_positions_and_projections(bb):
    learner = build(bb, encoder="text", params="q,v")
    assert learner.vision_lora is None and learner.text_lora.slots == [0, 2]
    assert set(learner.state_dict()) == {"text_lora.a", "text_lora.b"}
    assert tuple(learner.text_lora.a.shape) == (2, 2, 2, bb.ctx_dim)  # blocks, projections, rank, width
    with pytest.raises(vp.VlpromptError, match="position 'up' needs blocks 8-11, but the text tower has 2"):
        build(bb, position="up")
    with pytest.raises(vp.VlpromptError, match="option params must be a comma list of q, k, v"):
        build(bb, params="q,o")
    with pytest.raises(vp.VlpromptError, match="option encoder must be one of"):
        build(bb, encoder="audio")


def test_iteration_schedule_equals_pytorchs_cosine_stepped_per_iteration():
    steps, base, eta = 23, 2e-4, 1e-6
    sched = IterationCosine(n_items=10, batch_size=4, steps=steps, base_lr=base, eta_min=eta, reference_steps=steps)
    assert (sched.per_epoch, sched.epochs, sched.drop_last) == (3, 8, False)  # 10 images: batches 4, 4, 2
    assert [sched.steps_in_epoch(e) for e in range(8)] == [3] * 7 + [2]  # the last epoch stops mid-way
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=eta)
    expected = []
    for _ in range(steps):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        torch_sched.step()
    got = [sched.lr(t // 3, t % 3) for t in range(steps)]
    assert all(math.isclose(g, e, rel_tol=1e-12) for g, e in zip(got, expected))


def train_cfg(shapes, out, **kw):
    values = dict(dataset=shapes, method="clip_lora", backbone=TINY_VIT, pretrained="random", shots=2,
                  batch_size=3, output=str(out), progress=False)
    values.update(kw)
    return vp.RunConfig.from_sources(**values)


def test_a_run_trains_iterations_per_shot_with_adamw(shapes, bb, tmp_path, monkeypatch):
    from vlprompt.methods import clip_lora

    seen = []

    class Recording(clip_lora.CLIPLoRAObjective):
        def optimizer(self, params, settings):
            self.opt = super().optimizer(params, settings)
            return self.opt

        def loss(self, learner, batch):
            g = self.opt.param_groups[0]
            seen.append((g["lr"], g["weight_decay"], type(self.opt).__name__, len(batch.labels)))
            return super().loss(learner, batch)

    monkeypatch.setattr(clip_lora, "CLIPLoRAObjective", Recording)
    m = run(train_cfg(shapes, tmp_path / "run", method_options={"iters_per_shot": 4}), backbone=bb)
    n_train = m["data"]["n_train"]
    per_epoch = -(-n_train // 3)
    assert m["train"]["steps"] == 8 == len(seen)  # 4 x 2 shots
    assert m["recipe"]["iterations"] == m["recipe"]["paper_iterations"] == 8
    assert m["train"]["schedule"] == {"unit": "iterations", "epochs": -(-8 // per_epoch), "batches_per_epoch": per_epoch,
                                      "drop_last": False, "reference_steps": 8}
    lrs = [s[0] for s in seen]
    assert lrs == [1e-6 + (2e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]
    assert {s[1:3] for s in seen} == {(0.01, "AdamW")}
    assert [s[3] for s in seen[:per_epoch]] == [3] * (n_train // 3) + ([n_train % 3] if n_train % 3 else [])
    keys = {d["key"] for d in m["deviations"]}
    assert "clip_lora.fewshot_sampling" in keys and "iterations" not in keys and "epochs" not in keys
    # --epochs N: N passes over the data instead, recorded against the recipe's length
    m = run(train_cfg(shapes, tmp_path / "ep", epochs=1, overwrite=True), backbone=bb)
    dev = {d["key"]: d for d in m["deviations"]}["iterations"]
    assert m["train"]["steps"] == per_epoch and (dev["value"], dev["reference"]) == (per_epoch, 1000)


def test_all_shots_needs_an_explicit_length(shapes, bb, tmp_path):
    with pytest.raises(vp.VlpromptError, match="shots -1.*--option iterations=N"):
        run(train_cfg(shapes, tmp_path / "all", shots=-1), backbone=bb)


def test_artefact_holds_only_the_low_rank_factors_and_transfers(shapes, bb, tmp_path):
    run(train_cfg(shapes, tmp_path / "run", method_options={"iterations": 3}), backbone=bb)
    tensors = load_file(str(tmp_path / "run" / "prompt" / WEIGHTS_NAME))
    assert set(tensors) == {"text_lora.a", "text_lora.b", "vision_lora.a", "vision_lora.b"}
    assert float(tensors["text_lora.b"].abs().max()) > 0  # trained
    saved = json.loads((tmp_path / "run" / "prompt" / "prompt_config.json").read_text())
    assert saved["config"]["options"]["rank"] == 2
    other = ["zebra", "hot air balloon"]
    learner = vp.load_prompt(tmp_path / "run", bb, other)
    assert learner.classnames == other and torch.equal(learner.text_lora.b, tensors["text_lora.b"])
    learner.eval()
    with torch.no_grad():
        feats = learner.text_features()
        ref = F.normalize(reference_text(bb, learner.text_lora, [f"a photo of a {c}." for c in other], False), dim=-1)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)


def test_training_learns(shapes, bb, tmp_path):
    m = run(train_cfg(shapes, tmp_path / "run", shots=4, lr=0.005, batch_size=8, method_options={"iterations": 60}),
            backbone=bb)
    epochs = m["train"]["epochs"]
    assert epochs[0]["loss"] > 3.0 > 2.0 > epochs[-1]["loss"]
    assert epochs[-1]["train_accuracy"] > 2 * epochs[0]["train_accuracy"]
    assert m["test"]["accuracy"] > 2 * 100 / len(vp.load_dataset(shapes).classnames)  # twice chance


def test_fewshot_study_with_linear_probe_and_clip_lora_on_real_images(caltech_root, tmp_path, capsys):
    from vlprompt.cli import main
    from vlprompt.protocols.report import aggregate
    from vlprompt.protocols.store import collect

    out = tmp_path / "fs"
    assert main(["study", "fewshot", "--datasets", "caltech101", "--root", str(caltech_root), "--methods",
                 "linear_probe,clip_lora", "--seeds", "1", "--shots", "1", "--backbone", TINY_VIT, "--pretrained",
                 "random", "--option", "iterations=8", "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = aggregate(collect(out))
    assert {r["method"] for r in rows} == {"linear_probe", "clip_lora"}
    assert "| caltech101 | clip_lora |" in printed and "| caltech101 | linear_probe |" in printed
    m = json.loads((out / "runs" / "caltech101" / "clip_lora" / "1shots_seed1" / "metrics.json").read_text())
    assert m["train"]["steps"] == m["recipe"]["iterations"] == 8 and m["recipe"]["cell_id"] == "clip_lora/fewshot/any"
    assert m["test"]["n"] == m["data"]["n_test"] > 1000  # the whole CoOp test split, through the adapted tower


@pytest.mark.parametrize("kill_at", ["mid", "last_epoch"])
def test_killed_mid_schedule_resumes_bit_identically(kill_at, shapes, bb, tmp_path):
    """Iterations that end inside an epoch, a checkpoint every step, a SIGKILL mid-epoch or inside the cut last
    epoch: the resumed run ends with the uninterrupted run's factors and metrics."""
    import os
    import signal
    import subprocess
    import sys

    n_train = len(vp.load_dataset(shapes, shots=2).train)
    per_epoch = -(-n_train // 3)
    iterations = 2 * per_epoch + 1  # the third epoch stops after one batch
    values = dict(method_options={"iterations": iterations}, checkpoint_every=1)
    reference = run(train_cfg(shapes, tmp_path / "reference", **values), backbone=bb)
    step = per_epoch // 2 + 1 if kill_at == "mid" else iterations  # the last epoch's only step
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "vlprompt.cli", "train", "--dataset", shapes, "--method", "clip_lora", "--backbone",
            TINY_VIT, "--pretrained", "random", "--shots", "2", "--batch-size", "3", "--option",
            f"iterations={iterations}", "--checkpoint-every", "1", "--output", str(out), "--quiet"]
    env = {**os.environ, "VLPROMPT_FAULTS": f"kill@step={step}"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # after that step, before its checkpoint or the result
    assert not out.exists()
    resumed = run(train_cfg(shapes, out, **values), backbone=bb)
    assert resumed["test"] == reference["test"] and resumed["train"]["steps"] == iterations
    for name, t in load_file(str(tmp_path / "reference" / "prompt" / WEIGHTS_NAME)).items():
        assert torch.equal(t, load_file(str(out / "prompt" / WEIGHTS_NAME))[name]), name
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in reference["train"]["epochs"]]
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in resumed["train"]["epochs"]] == strip
    assert len(strip) == 3


def test_base_to_new_and_cross_dataset_studies_transfer_the_updates(shapes, tmp_path, capsys):
    """The adapted towers are rebuilt for the new classes and for another dataset's names."""
    from pathlib import Path

    from vlprompt.cli import main

    tiny = ["--backbone", TINY_VIT, "--pretrained", "random", "--option", "iterations=4", "--seeds", "1", "--quiet"]
    out = tmp_path / "b2n"
    assert main(["study", "base2new", "--datasets", shapes, "--methods", "clip_lora", "--shots", "2", *tiny,
                 "--output", str(out)]) == 0
    runs = out / "runs" / Path(shapes).name / "clip_lora" / "2shots_seed1"
    base, new = (json.loads((runs / part / "metrics.json").read_text()) for part in ("base", "new"))
    assert base["kind"] == "train" and new["kind"] == "eval"
    assert set(base["data"]["classnames"]).isdisjoint(new["data"]["classnames"])
    assert base["recipe"]["cell_id"] == "clip_lora/base2new/any" and base["recipe"]["reconstructed"]
    other = make_synthetic_dataset(str(tmp_path / "other"), n_train_per_class=2, n_test_per_class=2, seed=3)
    out = tmp_path / "xd"
    assert main(["study", "xd", "--source", shapes, "--targets", other, "--methods", "clip_lora", "--shots", "2",
                 *tiny, "--output", str(out)]) == 0
    capsys.readouterr()
    target = json.loads((out / "runs" / "clip_lora" / "2shots_seed1" / Path(other).name / "metrics.json").read_text())
    assert target["kind"] == "eval" and target["test"]["n"] == len(vp.load_dataset(other).test)


def test_shared_prefix_masks_are_an_option_recorded_as_a_deviation(shapes, bb, tmp_path):
    exact, shared = build(bb, dropout=0.0), build(bb, dropout=0.0, prefix_masks="shared")
    exact.train(), shared.train()
    torch.testing.assert_close(shared.text_features(), exact.text_features(), rtol=1e-5, atol=1e-6)  # no masks
    learner = build(bb, prefix_masks="shared").train()
    torch.manual_seed(0)
    feats = learner.text_features()
    feats.sum().backward()  # the shared prefix with dropout: gradients reach the text factors
    assert float(learner.text_lora.b.grad.abs().max()) > 0
    with pytest.raises(vp.VlpromptError, match="option prefix_masks must be one of"):
        build(bb, prefix_masks="none")
    m = run(train_cfg(shapes, tmp_path / "run", method_options={"iterations": 2, "prefix_masks": "shared"}),
            backbone=bb)
    dev = {d["key"]: d for d in m["deviations"]}["method_options.prefix_masks"]
    assert (dev["value"], dev["reference"]) == ("shared", "per_class")
