"""PromptSRC: its losses against a direct computation, the Gaussian aggregation weights against the official
configurations' values, the aggregated prompt is what is saved, and its recipe cells."""

from __future__ import annotations

import math

import pytest
import torch
from support import TINY_OPTIONS, TINY_VIT

import vlprompt as vp
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.run import run
from vlprompt.engine.trainer import TrainBatch
from vlprompt.methods import METHODS
from vlprompt.methods.base import MethodConfig, PromptLayout, parse_options
from vlprompt.methods.promptsrc import gpa_weight
from vlprompt.prompts.templates import PROMPTSRC_TEMPLATES


def build(bb, classes, **options):
    method = METHODS["promptsrc"]
    opts = parse_options("promptsrc", method.Options, {**TINY_OPTIONS["promptsrc"], **options})
    config = MethodConfig("promptsrc", opts, PromptLayout(), "a photo of a {}.", "")
    torch.manual_seed(0)
    learner = method.create(bb, classes, config)
    return learner, method.objective(learner, config)


def test_losses_equal_a_direct_computation(bb):
    classes = ["cat", "dog", "traffic light"]
    learner, objective = build(bb, classes)
    images = torch.randn(4, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 1])
    batch = TrainBatch({}, labels, torch.arange(4), {"weak": images}, lambda x: bb.encode_images(x).clone())
    loss, terms = objective.loss(learner, batch)

    # The teacher's text: per class, the mean of 60 templates' raw features, then normalised.
    raw = torch.stack([bb.model.encode_text(bb.tokenize([t.format(c) for c in classes])).float()
                       for t in PROMPTSRC_TEMPLATES])
    g_zs = raw.mean(0) / raw.mean(0).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(objective.text_teacher, g_zs, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        f_p = learner.image_features(images)
        f_p = f_p / f_p.norm(dim=-1, keepdim=True)
        g_p = learner.text_features()
        f_zs = bb.model.encode_image(images).float()
        f_zs = f_zs / f_zs.norm(dim=-1, keepdim=True)
        l_p, l_zs = bb.logit_scale * f_p @ g_p.T, bb.logit_scale * f_zs @ g_zs.T
        p_zs, log_p = l_zs.softmax(-1), l_p.log_softmax(-1)
        kl = (p_zs * (p_zs.log() - log_p)).sum() / (4 * 3)
        ce = -log_p[torch.arange(4), labels].mean()
        expected = ce + 25 * (g_p - g_zs).abs().mean() + 10 * (f_p - f_zs).abs().mean() + kl
    for name, value in (("ce", ce), ("kl", kl)):
        torch.testing.assert_close(terms[name], value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in learner.parameters() if p.requires_grad)


@pytest.mark.parametrize("epochs, mean, std, expected", [
    (20, 15, 1, {12: .004, 13: .054, 14: .242, 15: .399, 16: .242, 17: .054, 18: .004}),  # base-to-new
    (20, 6, 10, {1: .055, 6: .063, 20: .024}),  # cross-dataset / DG: nearly flat
    (50, 45, 5, {45: .092}),  # few-shot on the fine-grained datasets
])
def test_gaussian_weights_are_the_official_ones(epochs, mean, std, expected):
    w = [gpa_weight(e, mean, std) for e in range(1, epochs + 1)]
    total = sum(w)
    for epoch, value in expected.items():
        assert w[epoch - 1] / total == pytest.approx(value, abs=6e-4)


def test_the_aggregated_prompt_is_saved_and_is_the_weighted_mean(bb, tmp_path, monkeypatch):
    shapes = make_synthetic_dataset(str(tmp_path / "shapes"), n_train_per_class=2, n_test_per_class=1, seed=0)
    snapshots = []
    original = METHODS["promptsrc"].objective

    def recording(learner, config):  # record each epoch's prompts as the objective sees them
        objective = original(learner, config)
        end = objective.on_epoch_end

        def on_epoch_end(epoch, learner):
            snapshots.append({k: p.detach().clone() for k, p in learner.named_parameters()})
            end(epoch, learner)
        objective.on_epoch_end = on_epoch_end
        return objective

    monkeypatch.setattr(METHODS["promptsrc"], "objective", recording)
    options = {**TINY_OPTIONS["promptsrc"], "gpa_mean": 2.0, "gpa_std": 1.0}
    cfg = vp.RunConfig.from_sources(dataset=shapes, method="promptsrc", backbone=TINY_VIT, pretrained="random",
                                    shots=2, epochs=3, batch_size=4, output=str(tmp_path / "run"), progress=False,
                                    method_options=options)
    m = run(cfg, backbone=bb)
    assert len(snapshots) == 3 and {"ce", "kl", "text_l1", "image_l1"} <= set(m["train"]["epochs"][0])
    w = [math.exp(-0.5 * (e - 2.0) ** 2) for e in (1, 2, 3)]
    saved = vp.load_prompt(tmp_path / "run", bb)
    for name, p in saved.named_parameters():
        mean = sum(wi * s[name].double() for wi, s in zip(w, snapshots)) / sum(w)
        torch.testing.assert_close(p.detach(), mean.float(), rtol=0, atol=1e-7)
        assert not torch.equal(p.detach(), snapshots[-1][name])
    keys = {d["key"] for d in m["deviations"]}
    assert {"promptsrc.gpa_scope", "promptsrc.teacher_precision"} <= keys


def test_recipe_cells_by_protocol_and_dataset():
    from vlprompt.config import RunConfig

    def options(**kw):
        return RunConfig.from_sources(method="promptsrc", **kw).method_options
    assert options(subsample="base")["gpa_mean"] == 15 and options(subsample="base")["depth_text"] == 9
    assert options(protocol="xd")["depth_vision"] == 3 and options(protocol="xd")["gpa_std"] == 10
    assert options(protocol="fewshot", dataset="caltech101")["gpa_mean"] == 30
    assert options(protocol="fewshot", dataset="dtd")["gpa_mean"] == 45
