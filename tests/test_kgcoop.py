"""KgCoOp: its knowledge-guided term, its recipe cell and deviation records, base-to-new."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import vlprompt as vp
from vlprompt.cli import main
from vlprompt.data import make_synthetic_dataset
from vlprompt.methods.base import method_config
from vlprompt.engine.run import run
from vlprompt.engine.trainer import TrainBatch
from vlprompt.methods.kgcoop import KgCoOpObjective, KgCoOpOptions, kg_term
from vlprompt.prompts import zeroshot

TINY = dict(backbone="vlprompt-tiny-ViT", pretrained="random", progress=False)
NAMES = ["cat", "dog", "sports car", "oak tree"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=8,
                                  n_test_per_class=4, seed=0)


def test_kg_term_is_zero_for_equal_features_and_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    soft, hand = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    assert float(kg_term(soft, soft)) == pytest.approx(0.0, abs=1e-6)
    direct = 1 - sum(float(soft[c] @ hand[c] / (soft[c].norm() * hand[c].norm())) for c in range(5)) / 5
    assert float(kg_term(soft, hand)) == pytest.approx(direct, rel=1e-6) and direct > 0


def test_a_photo_of_a_context_starts_on_the_hand_crafted_prompt(bb):
    # "a photo of a" + name + "." is the template's own token sequence: the two views coincide at init.
    lrn = vp.GuidedCoOp(bb, NAMES, ["a photo of a {}."], ctx_init="a photo of a")
    with torch.no_grad():
        assert float(kg_term(lrn.soft_features(), lrn.hand)) == pytest.approx(0.0, abs=1e-5)
        lrn.ctx.add_(0.5 * torch.randn_like(lrn.ctx))
        assert float(kg_term(lrn.soft_features(), lrn.hand)) > 1e-3


def test_loss_is_ce_plus_weighted_kg_and_gradients_reach_only_the_context(bb):
    torch.manual_seed(0)
    lrn = vp.GuidedCoOp(bb, NAMES, ["a photo of a {}."], n_ctx=4, ctx_init=None)
    batch = TrainBatch({"weak": torch.randn(6, bb.embed_dim)}, torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(6))
    obj = KgCoOpObjective(KgCoOpOptions(weight=8.0))
    loss, terms = obj.loss(lrn, batch)
    soft = lrn.soft_features().detach()
    ce = F.cross_entropy(lrn.logits(batch.views["weak"], soft), batch.labels)
    assert {"loss", "ce", "kg", "logits"} <= set(terms)
    assert float(terms["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(terms["kg"]) == pytest.approx(float(kg_term(soft, lrn.hand)), rel=1e-5) and float(terms["kg"]) > 0
    assert float(loss.detach()) == pytest.approx(float(ce) + 8.0 * float(terms["kg"]), rel=1e-5)
    loss.backward()
    assert [n for n, p in lrn.named_parameters() if p.requires_grad] == ["ctx"]
    assert float(lrn.ctx.grad.abs().sum()) > 0 and all(p.grad is None for p in bb.model.parameters())


def test_preset_is_kgcoops_recipe_and_values_override_it():
    cfg = vp.RunConfig.from_sources(method="kgcoop")
    assert cfg.preset == "kgcoop"
    assert (cfg.backbone, cfg.n_ctx, cfg.ctx_init, cfg.batch_size, cfg.epochs, cfg.lr) == \
        ("ViT-B-16", 4, "a photo of a", 128, 100, 0.002)
    assert KgCoOpOptions().weight == 8.0
    cfg = vp.RunConfig.from_sources(method="kgcoop", batch_size=32, ctx_init="a picture of")
    assert (cfg.batch_size, cfg.ctx_init, cfg.epochs) == (32, "a picture of", 100)
    with pytest.raises(vp.VlpromptError, match="option weight: must be >= 0"):
        method_config(vp.get_method("kgcoop"), vp.RunConfig(method="kgcoop", method_options={"weight": -1}))


def test_run_is_checked_against_kgcoops_recipe_and_coop_is_unchanged(shapes, bb, tmp_path):
    m = run(vp.RunConfig.from_sources(dataset=shapes, method="kgcoop", shots=4, epochs=2, batch_size=16,
                                      method_options={"weight": "4"}, output=str(tmp_path / "kg"), **TINY), backbone=bb)
    devs = {d["key"]: d for d in m["deviations"]}
    assert m["recipe"]["cell"] == {"method": "kgcoop", "protocol": "any", "dataset": "any", "name": "kgcoop"}
    assert "KgCoOp's published recipe" in m["recipe"]["source"] and not m["recipe"]["reconstructed"]
    for key, value, reference in (("batch_size", 16, 128), ("epochs", 2, 100), ("backbone", "vlprompt-tiny-ViT",
                                                                                "ViT-B-16"),
                                  ("method_options.weight", 4.0, 8.0)):
        assert (devs[key]["value"], devs[key]["reference"], devs[key]["source"]) == (value, reference,
                                                                                     "kgcoop recipe")
    assert devs["epochs"]["words"] == "epochs=2 (kgcoop recipe: 100)"  # the one rendering of a record
    assert "n_ctx" not in devs and "ctx_init" not in devs and "recipe" not in devs  # the cell's "a photo of a"
    epochs = m["train"]["epochs"]
    assert {"loss", "ce", "kg"} <= set(epochs[0]) and m["method_options"] == {
        "hand_templates": "dataset", "ensemble_hand": 0.0, "weight": 4.0, "handcrafted_precision": "backbone"}
    assert (devs["kgcoop.hand_precision"]["value"], devs["kgcoop.hand_precision"]["reference"]) == ("fp32", "fp16")
    assert epochs[0]["kg"] == pytest.approx(0.0, abs=1e-4)  # warm-up epoch: still at the hand-crafted prompt
    coop = run(vp.RunConfig.from_sources(dataset=shapes, method="coop", shots=4, epochs=1, n_ctx=4,
                                         output=str(tmp_path / "coop"), **TINY), backbone=bb)
    assert coop["recipe"]["preset"] is None and coop["recipe"]["cell_id"] == "coop/fewshot/any"
    assert coop["recipe"]["reference"].startswith("CoOp's few-shot recipe")
    epochs = next(d for d in coop["deviations"] if d["key"] == "epochs")
    assert (epochs["value"], epochs["reference"], epochs["source"]) == (1, 100, "coop fewshot recipe")
    assert not any("kgcoop" in d["source"] for d in coop["deviations"])


def test_base_to_new_on_the_command_line(shapes, tmp_path):
    out = tmp_path / "base"
    assert main(["train", "--dataset", shapes, "--backbone", "vlprompt-tiny-ViT", "--pretrained", "random",
                 "--method", "kgcoop", "--subsample", "base", "--shots", "4", "--epochs", "2", "--batch-size", "8",
                 "--output", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "prompt" / "prompt_config.json").read_text())
    assert cfg["method"] == "kgcoop" and cfg["config"]["template"] == "a photo of a {}."
    assert cfg["config"]["layout"]["n_ctx"] == 4 and cfg["config"]["options"]["hand_templates"] == "dataset"
    assert main(["eval", str(out), "--subsample", "new", "--output", str(tmp_path / "ev"), "--quiet"]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    all_names = vp.load_dataset(shapes).classnames
    assert ev["method"] == "kgcoop" and ev["data"]["classnames"] == all_names[4:]


def test_cross_dataset_hand_view_follows_the_target_template(shapes, bb, tmp_path):
    """A prompt trained with the dataset's template uses the *target* dataset's template elsewhere (as
    zero-shot CLIP would), and the ensemble view is rebuilt around the target's template."""
    from types import SimpleNamespace

    out = tmp_path / "kg"
    cfg = vp.RunConfig.from_sources(dataset=shapes, method="kgcoop", shots=2, epochs=1, batch_size=8,
                                    method_options={"ensemble_hand": 0.5}, output=str(out), **TINY)
    run(cfg, backbone=bb)
    method = vp.get_method("kgcoop")
    target = SimpleNamespace(name="other", template="a drawing of a {}.")
    same = method.load(str(out / "prompt"), bb, NAMES)
    moved = method.load(str(out / "prompt"), bb, NAMES, dataset=target)
    assert moved.templates == ["a drawing of a {}."] and same.templates != moved.templates
    expected = zeroshot.handcrafted_text_features(bb, NAMES, ["a drawing of a {}."])
    assert torch.allclose(moved.hand, expected, atol=1e-6)
    assert torch.equal(moved.ctx, same.ctx)
    override = method.load(str(out / "prompt"), bb, NAMES, dataset=target, template="art of a {}.")
    assert override.templates == ["art of a {}."]
