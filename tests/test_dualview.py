"""Dual-view MI prompt tuning (our reconstruction of Zhang 2024): each term against its definition,
both training modes for every augmentation, its recipe cell and options, base-to-new, and a short real-data run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlprompt as vp
from vlprompt.cli import main
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.run import evaluate_prompt, run
from vlprompt.engine.trainer import TrainBatch
from vlprompt.methods import dualview as dv
from vlprompt.prompts import zeroshot

TINY = dict(backbone="vlprompt-tiny-ViT", pretrained="random", progress=False)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=8,
                                  n_test_per_class=4, seed=0)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def learner(bb, names=("cat", "dog", "car", "tree", "boat"), **kw):
    torch.manual_seed(0)
    return vp.GuidedCoOp(bb, list(names), ["a photo of a {}."], method="dualview_mi", **kw)


def objective(**options):
    return dv.DualViewObjective(dv.DualViewOptions(**options), seed=0)


def bank_batch(bb, labels, seed=1):
    """A feature-bank style batch: raw features, no pixels."""
    y = torch.tensor(labels)
    return TrainBatch({"weak": 3.0 * unit(len(labels), bb.embed_dim, seed=seed)}, y, torch.arange(len(y)))


# -- the MI term ---------------------------------------------------------------------------------------------

def loop_info_nce(a, b, tau):
    total = 0.0
    for c in range(a.shape[0]):
        scores = [float(a[c] @ b[d]) / tau for d in range(b.shape[0])]
        total += -(scores[c] - math.log(sum(math.exp(s) for s in scores)))
    return total / a.shape[0]


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_info_nce_equals_a_loop_and_bound_is_log_c_minus_loss(tau):
    soft, hand = unit(6, 8, seed=1).double(), unit(6, 8, seed=2).double()
    one_way = loop_info_nce(soft, hand, tau)
    other_way = loop_info_nce(hand, soft, tau)
    assert float(dv.info_nce(soft, hand, tau)) == pytest.approx(one_way, rel=1e-9)
    assert float(dv.symmetric_info_nce(soft, hand, tau)) == pytest.approx(0.5 * (one_way + other_way), rel=1e-9)
    assert float(dv.mi_lower_bound(soft, hand, tau)) == pytest.approx(math.log(6) - one_way, rel=1e-9)


def test_loss_terms_are_logged_and_add_up(bb):
    lrn = learner(bb)
    obj = objective(lambda_mi=0.5, lambda_aug=2.0, tau=0.1)
    loss, terms = obj.loss(lrn, bank_batch(bb, [0, 1, 2, 3, 4, 0, 1, 2]))
    assert {"loss", "ce", "mi", "mi_bound", "aug", "logits"} <= set(terms)
    assert float(loss.detach()) == pytest.approx(float(terms["ce"] + 0.5 * terms["mi"] + 2.0 * terms["aug"]), rel=1e-6)
    soft = lrn.soft_features().detach()
    assert float(terms["mi"]) == pytest.approx(float(dv.symmetric_info_nce(soft, lrn.hand, 0.1)), rel=1e-5)
    assert float(terms["mi_bound"]) == pytest.approx(math.log(5) - float(dv.info_nce(soft, lrn.hand, 0.1)), rel=1e-5)


# -- the augmentations ---------------------------------------------------------------------------------------

def test_partners_are_of_a_different_class_and_targets_sum_to_one():
    y = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1])
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        partners, ok = dv.different_class_partners(y, gen)
        assert ok.all() and (y[partners] != y).all()
        seen.update(partners[:1].tolist())
        lam = dv.mix_weights(len(y), 1.0, np.random.default_rng(0), "cpu")
        targets = dv.soft_targets(y, partners, lam, 4)
        assert torch.allclose(targets.sum(1), torch.ones(len(y)))
        assert torch.allclose(targets[torch.arange(len(y)), y], lam + (1 - lam) * (y[partners] == y).float())
    assert seen == {2, 3, 4, 5, 6, 7}  # sample 0 is paired with every other-class sample over time
    _, ok = dv.different_class_partners(torch.tensor([3, 3, 3]), gen)
    assert not ok.any()  # a batch of one class has nobody to mix with


def test_beta_one_is_uniform():
    lam = dv.mix_weights(20000, 1.0, np.random.default_rng(0), "cpu")
    assert 0 <= float(lam.min()) and float(lam.max()) <= 1
    assert float(lam.mean()) == pytest.approx(0.5, abs=0.01) and float(lam.var()) == pytest.approx(1 / 12, abs=0.005)


def fixed_mixing(monkeypatch, partners, lam):
    monkeypatch.setattr(dv, "different_class_partners", lambda y, g: (partners, torch.ones(len(y), dtype=torch.bool)))
    monkeypatch.setattr(dv, "mix_weights", lambda n, a, rng, dev: lam)


def test_mix_softlabel_in_feature_space_is_lambda_weighted_ce(bb, monkeypatch):
    lrn = learner(bb)
    batch = bank_batch(bb, [0, 1, 2, 3])
    partners, lam = torch.tensor([1, 2, 3, 0]), torch.tensor([0.9, 0.5, 0.2, 0.7])
    fixed_mixing(monkeypatch, partners, lam)
    soft = lrn.soft_features()
    aug = objective().augmentation_loss(lrn, batch, soft)
    z = F.normalize(batch.views["weak"], dim=-1)
    mixed = lam[:, None] * z + (1 - lam[:, None]) * z[partners]
    logp = F.log_softmax(lrn.logits(mixed, soft), dim=-1)
    y = batch.labels
    direct = -(lam * logp[range(4), y] + (1 - lam) * logp[range(4), y[partners]]).mean()
    assert float(aug.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)


def test_mix_virtual_class_appends_the_mixed_text_features(bb, monkeypatch):
    lrn = learner(bb)
    batch = bank_batch(bb, [0, 1, 4, 3])
    partners, lam = torch.tensor([1, 0, 3, 2]), torch.tensor([0.6, 0.3, 0.8, 0.5])
    fixed_mixing(monkeypatch, partners, lam)
    seen = {}
    real = lrn.logits
    lrn.logits = lambda z, w: seen.setdefault("w", w) is not None and real(z, w)
    soft = lrn.soft_features()
    aug = objective(augmentation="mix_virtual_class").augmentation_loss(lrn, batch, soft)
    w = seen["w"].detach()
    y = batch.labels
    assert w.shape == (5 + 4, bb.embed_dim) and torch.equal(w[:5], soft.detach())
    expected = F.normalize(lam[:, None] * soft[y] + (1 - lam[:, None]) * soft[y[partners]], dim=-1).detach()
    assert torch.allclose(w[5:], expected, atol=1e-6) and torch.allclose(w[5:].norm(dim=-1), torch.ones(4))
    # Each mixed sample has a hard target on its own virtual class.
    z = F.normalize(batch.views["weak"], dim=-1)
    mixed = lam[:, None] * z + (1 - lam[:, None]) * z[partners]
    direct = F.cross_entropy(real(mixed, w), torch.arange(5, 9))
    assert float(aug.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)


def clustered_features(n_per_class=400, d=8, spread=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(3, d, generator=g), dim=-1)
    mix = torch.randn(d, d, generator=g) * spread
    labels = torch.arange(3).repeat_interleave(n_per_class)
    feats = centres[labels] + torch.randn(len(labels), d, generator=g) @ mix
    return 5.0 * feats, labels  # raw features: ClassStats normalises them first


def test_gaussian_statistics_and_samples_follow_the_class_estimates():
    feats, labels = clustered_features()
    stats = dv.ClassStats(feats, labels, 3, "shared")
    z = F.normalize(feats, dim=-1)
    for c in range(3):
        assert torch.allclose(stats.mean[c], z[labels == c].mean(0), atol=1e-6)
    centred = z - stats.mean[labels]
    assert torch.allclose(stats.cov, centred.T @ centred / (len(z) - 3), atol=1e-7)
    assert torch.allclose(stats.scale @ stats.scale.T, stats.cov, atol=1e-7)
    ones = torch.full((20000,), 1)
    draws = stats.draw(ones, torch.Generator().manual_seed(0))
    assert torch.allclose(draws.mean(0), stats.mean[1], atol=2e-3)
    cov = torch.cov(draws.T)
    assert (cov - stats.cov).abs().max() < 0.05 * stats.cov.abs().max()
    samples = stats.sample(ones, torch.Generator().manual_seed(0))
    assert torch.allclose(samples, F.normalize(draws, dim=-1))  # the same draws, re-normalised
    assert torch.allclose(samples.norm(dim=-1), torch.ones(20000), atol=1e-5)
    diag = dv.ClassStats(feats, labels, 3, "diagonal")
    assert torch.equal(diag.cov, torch.diag(torch.diagonal(stats.cov)))


def test_feat_gauss_loss_is_ce_on_class_samples(bb):
    lrn = learner(bb, names=("a", "b", "c"))
    feats = torch.randn(30, bb.embed_dim)
    labels = torch.arange(3).repeat(10)
    obj = objective(augmentation="feat_gauss")
    obj.stats = dv.ClassStats(feats, labels, 3)
    batch = bank_batch(bb, [0, 1, 2, 2])
    soft = lrn.soft_features()
    aug = obj.augmentation_loss(lrn, batch, soft)
    gen = torch.Generator().manual_seed(0)
    direct = F.cross_entropy(lrn.logits(obj.stats.sample(batch.labels, gen), soft), batch.labels)
    assert float(aug.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)


def test_proto_mix_stays_on_the_sphere_and_interpolates(bb):
    soft, protos = unit(5, 16, seed=3), unit(5, 16, seed=4)
    classes = torch.tensor([0, 2, 4])
    a = torch.tensor([1.0, 0.75, 0.5])
    out = dv.proto_mix_features(soft, protos, classes, a)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(out[0], soft[0], atol=1e-6)  # a = 1: the soft view itself
    assert torch.allclose(out[2], F.normalize(soft[4] + protos[4], dim=0), atol=1e-6)
    # The augmented view is a positive of its class in the MI term (both directions).
    lrn = learner(bb)
    obj = objective(augmentation="proto_mix")
    obj.stats = dv.ClassStats(torch.randn(20, bb.embed_dim), torch.arange(5).repeat(4), 5)
    aug = obj.augmentation_loss(lrn, bank_batch(bb, [0, 2, 2, 4]), lrn.soft_features())
    assert torch.isfinite(aug) and float(aug.detach()) > 0


# -- gradients, hand-crafted features once ------------------------------------------------------------------

@pytest.mark.parametrize("augmentation", dv.AUGMENTATIONS)
def test_gradients_reach_only_the_prompt(bb, augmentation):
    lrn = learner(bb)
    assert [n for n, p in lrn.named_parameters() if p.requires_grad] == ["ctx"]
    obj = objective(augmentation=augmentation)
    obj.stats = dv.ClassStats(torch.randn(20, bb.embed_dim), torch.arange(5).repeat(4), 5)
    images = torch.randn(4, 3, bb.image_size, bb.image_size)
    batch = TrainBatch({"weak": bb.encode_images(images).clone()}, torch.tensor([0, 1, 2, 3]), torch.arange(4),
                       pixels={"weak": images}, encode=lambda x: bb.encode_images(x).clone())
    loss, _ = obj.loss(lrn, batch)
    loss.backward()
    assert lrn.ctx.grad is not None and float(lrn.ctx.grad.abs().sum()) > 0
    assert all(p.grad is None for p in bb.model.parameters())
    assert not lrn.hand.requires_grad


def test_hand_crafted_features_are_encoded_once_per_run(shapes, bb, tmp_path, monkeypatch):
    calls = []
    real = zeroshot.handcrafted_text_features
    monkeypatch.setattr(zeroshot, "handcrafted_text_features", lambda *a: calls.append(a[2]) or real(*a))
    m = run(vp.RunConfig(dataset=shapes, method="dualview_mi", shots=8, epochs=2, batch_size=16,
                         train_mode="feature_bank", bank_views=2, output=str(tmp_path / "r"), **TINY), backbone=bb)
    assert m["train"]["steps"] == 2 * 4 and calls == [["a photo of a {}."]]


# -- both training modes for every augmentation --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["exact", "feature_bank"])
@pytest.mark.parametrize("augmentation", dv.AUGMENTATIONS)
def test_every_augmentation_trains_in_both_modes(shapes, bb, tmp_path, monkeypatch, mode, augmentation):
    pixel_batches = []
    real = dv.DualViewObjective.mixed_features
    monkeypatch.setattr(dv.DualViewObjective, "mixed_features",
                        lambda self, batch, *a: pixel_batches.append(batch.pixels is not None) or real(self, batch, *a))
    cfg = vp.RunConfig.from_sources(dataset=shapes, method="dualview_mi", shots=4, epochs=1, batch_size=16,
                                    method_options={"augmentation": augmentation}, train_mode=mode, bank_views=2,
                                    output=str(tmp_path / "r"), **TINY)
    m = run(cfg, backbone=bb)
    epoch = m["train"]["epochs"][0]
    assert {"loss", "ce", "mi", "mi_bound", "aug"} <= set(epoch) and all(math.isfinite(v) for v in epoch.values())
    assert m["method_options"]["augmentation"] == augmentation
    devs = {d["key"]: d for d in m["deviations"]}
    rec = devs["dualview_mi.reconstruction"]
    assert rec["source"] == "our reconstruction" and rec["value"]["augmentation"] == augmentation
    mixing = augmentation.startswith("mix_")
    if mixing:  # exact mode mixes pixels; the bank mixes stored features and says so
        assert pixel_batches == [mode == "exact"] * 2
    assert ("dualview_mi.mix" in devs) == (mixing and mode == "feature_bank")
    if mixing and mode == "feature_bank":
        assert (devs["dualview_mi.mix"]["value"], devs["dualview_mi.mix"]["reference"]) == ("features", "pixels")
    if not mixing:
        source = "feature-bank draws" if mode == "feature_bank" else "test transform"
        stats = devs.get("dualview_mi.class_statistics")
        assert (stats is not None) == (augmentation in ("feat_gauss", "proto_mix"))
        assert stats is None or source in stats["value"]


# -- options and presets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"lamda_mi": 1}, "method dualview_mi: unknown option 'lamda_mi'"),
    ({"augmentation": "cutmix"}, "option augmentation: 'cutmix' is not one of"),
    ({"tau": "0"}, "option tau: must be > 0"),
    ({"tau": "warm"}, "dualview_mi option tau: invalid value 'warm'"),
    ({"ensemble_hand": 1.5}, "option ensemble_hand: must be in [0, 1]"),
    ({"gauss_cov": "full"}, "option gauss_cov: 'full' is not one of"),
])
def test_bad_options_give_one_clear_line(shapes, tmp_path, capsys, options, message):
    argv = ["train", "--dataset", shapes, "--backbone", "vlprompt-tiny-ViT", "--pretrained", "random",
            "--method", "dualview_mi", "--output", str(tmp_path / "r"), "--quiet"]
    for k, v in options.items():
        argv += ["-o", f"{k}={v}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlprompt: error:") and message in err and len(err.splitlines()) == 1, err


def test_preset_defaults_apply_and_explicit_values_win(tmp_path):
    cfg = vp.RunConfig.from_sources(method="dualview_mi")
    assert cfg.preset == "dualview_mi"
    assert (cfg.backbone, cfg.n_ctx, cfg.ctx_init, cfg.batch_size, cfg.epochs) == ("ViT-B-16", 4, "a photo of a", 128, 100)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.warmup_epochs) == (0.002, 0.9, 5e-4, 1)
    opts = dv.DualViewOptions()
    assert (opts.lambda_mi, opts.tau, opts.lambda_aug, opts.mix_alpha, opts.augmentation) == (1.0, 0.07, 1.0, 1.0,
                                                                                              "mix_softlabel")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("method: dualview_mi\nbatch_size: 64\nepochs: 30\n")
    cfg = vp.RunConfig.from_sources(str(yaml_file), epochs=5)
    assert (cfg.batch_size, cfg.epochs, cfg.n_ctx) == (64, 5, 4)  # file over preset, command line over file
    assert vp.RunConfig.from_sources(method="dualview_mi", preset="none").batch_size == 32
    coop = vp.RunConfig.from_sources(method="coop")
    assert coop.preset is None and (coop.batch_size, coop.epochs, coop.n_ctx) == (32, None, 16)
    with pytest.raises(vp.VlpromptError, match="preset: unknown preset 'kgcop'"):
        vp.RunConfig.from_sources(method="dualview_mi", preset="kgcop")


def test_deviations_compare_against_the_reconstructed_recipe(shapes, bb, tmp_path):
    cfg = vp.RunConfig.from_sources(dataset=shapes, method="dualview_mi", shots=4, epochs=1, batch_size=16,
                                    method_options={"lambda_mi": "2"}, train_mode="feature_bank", bank_views=1,
                                    output=str(tmp_path / "r"), **TINY)
    m = run(cfg, backbone=bb)
    devs = {d["key"]: d for d in m["deviations"]}
    assert m["recipe"]["reconstructed"] and m["recipe"]["source"].startswith("our reconstruction")
    assert devs["recipe"]["value"] == "dualview_mi" and devs["recipe"]["source"] == "our reconstruction"
    for key, value, reference in (("batch_size", 16, 128), ("epochs", 1, 100),
                                  ("method_options.lambda_mi", 2.0, 1.0)):
        assert (devs[key]["value"], devs[key]["reference"], devs[key]["source"]) == (value, reference,
                                                                                     "dualview_mi recipe")
    assert m["recipe"]["preset"] == "dualview_mi" and m["recipe"]["paper_epochs"] == 100
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["method_options"]["lambda_mi"] == 2.0 and saved["deviations"] == m["deviations"]


# -- base-to-new ---------------------------------------------------------------------------------------------

def test_base_to_new_rebuilds_prompts_and_hand_features_for_new_classes(shapes, bb, tmp_path):
    out = tmp_path / "base"
    cfg = vp.RunConfig.from_sources(dataset=shapes, method="dualview_mi", subsample="base", shots=8, epochs=3,
                                    batch_size=16, method_options={"ensemble_hand": 0.5, "hand_templates": "ensemble"},
                                    train_mode="feature_bank", bank_views=2, output=str(out), **TINY)
    m = run(cfg, backbone=bb)
    saved = json.loads((out / "prompt" / "prompt_config.json").read_text())
    options = saved["config"]["options"]
    assert saved["method"] == "dualview_mi" and options["ensemble_hand"] == 0.5 and options["hand_templates"] == "ensemble"
    again = evaluate_prompt(str(out), {}, backbone=bb)
    assert again["test"]["accuracy"] == m["test"]["accuracy"]
    new = evaluate_prompt(str(out), {"subsample": "new"}, output=str(tmp_path / "ev"), backbone=bb)
    all_names = vp.load_dataset(shapes).classnames
    assert m["data"]["classnames"] == all_names[:4] and new["data"]["classnames"] == all_names[4:]
    # The rebuilt learner: the trained context, the new names, hand-crafted features of the new names, the blend.
    lrn = vp.get_method("dualview_mi").load(str(out / "prompt"), bb, all_names[4:])
    trained = vp.GuidedCoOp.from_pretrained(out / "prompt", bb)
    assert torch.equal(lrn.ctx, trained.ctx) and lrn.classnames == all_names[4:]
    assert len(trained.templates) == 8
    hand = zeroshot.handcrafted_text_features(bb, all_names[4:], trained.templates)
    assert torch.allclose(lrn.hand, hand, atol=1e-6)
    with torch.no_grad():
        blend = F.normalize(0.5 * lrn.soft_features() + 0.5 * hand, dim=-1)
        assert torch.allclose(lrn.text_features(), blend, atol=1e-6)
        ds = vp.load_dataset(shapes, subsample="new")
        from vlprompt.engine.features import encode_items
        from vlprompt.data.transforms import test_transform

        feats, labels = encode_items(bb, ds.test, test_transform(bb.image_size, bb.image_mean, bb.image_std),
                                     progress=False)
        acc = 100.0 * float((lrn.logits(feats, blend).argmax(-1) == labels).float().mean())
    assert new["test"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert (tmp_path / "ev" / "metrics.json").is_file()


def test_base_to_new_from_the_command_line(shapes, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--dataset", shapes, "--backbone", "vlprompt-tiny-ViT", "--pretrained", "random",
                 "--method", "dualview_mi", "--subsample", "base", "--shots", "4", "--epochs", "1",
                 "--batch-size", "8", "-o", "augmentation=mix_virtual_class", "--train-mode", "feature_bank",
                 "--bank-views", "1", "--output", str(out), "--quiet"]) == 0
    resolved = json.loads((out / "metrics.json").read_text())
    assert resolved["recipe"]["preset"] == "dualview_mi" and resolved["method_options"]["augmentation"] == \
        "mix_virtual_class"
    assert main(["eval", str(out), "--subsample", "new", "--output", str(tmp_path / "ev"), "--quiet"]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["method"] == "dualview_mi" and ev["data"]["subsample"] == "new"
    assert ev["data"]["num_classes"] == 4


# -- real images ---------------------------------------------------------------------------------------------

def test_caltech101_base_classes_every_term_improves(caltech_root, bb, tmp_path):
    # A random tiny CLIP: "a photo of a" init makes soft == hand at the start (the MI term can only rise),
    # so a random class-specific context is used, as the CoOp real-data tests do.
    cfg = vp.RunConfig.from_sources(dataset="caltech101", root=str(caltech_root), method="dualview_mi",
                                    subsample="base", shots=4, seed=1, epochs=8, batch_size=32, ctx_init="", csc=True,
                                    train_mode="feature_bank", bank_views=2, output=str(tmp_path / "c"), **TINY)
    m = run(cfg, backbone=bb)
    assert m["data"]["num_classes"] == 50 and m["data"]["n_train"] == 200
    first, last = m["train"]["epochs"][0], m["train"]["epochs"][-1]
    for term in ("loss", "ce", "mi", "aug"):
        assert last[term] < first[term], (term, first[term], last[term])
    assert last["mi_bound"] > first["mi_bound"]
    assert last["train_accuracy"] > first["train_accuracy"]
    assert m["test"]["accuracy"] > 2 * 100 / 50, m["test"]["accuracy"]  # measured: 7.3% (chance 2%)
