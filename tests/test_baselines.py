"""The baselines against their definitions: lpclip's C search and its classifier against scikit-learn fitted
directly, Tip-Adapter's logits and alpha/beta search against their formulas, CLIP-Adapter's residual."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from support import tiny_backbone

import vlprompt as vp
from vlprompt.data.transforms import test_transform
from vlprompt.engine.evaluate import classify
from vlprompt.engine.features import encode_items
from vlprompt.engine.run import run
from vlprompt.methods.linear_probe import C_GRID, search_c
from vlprompt.methods.tip_adapter import TipAdapter, search_alpha_beta, tip_logits


# -- linear probe ------------------------------------------------------------------------------------------------

def test_c_search_follows_its_definition_on_a_constructed_case():
    calls = []

    def peaked(c):  # best near C = 10^2.3
        calls.append(c)
        return -abs(math.log10(c) - 2.3)

    chosen, log = search_c(peaked, steps=3)
    assert calls[:7] == list(C_GRID)  # the grid in lpclip's order
    # Grid peak 1e2. Step 1 on [10, 1000]: right better -> 1000, left -> 10^2. Step 2 on [10^2, 10^3]: left
    # better -> 100, right -> 10^2.5. Step 3 on [10^2, 10^2.5]: right (distance .2) better than left (.3).
    assert [e["c"] for e in log[7:]] == pytest.approx([1e3, 1e2, 10 ** 2.5])
    assert chosen == pytest.approx(10 ** 2.5)
    # Ties: the grid keeps the first (largest) C, bisection keeps the left (smaller) end.
    chosen, log = search_c(lambda c: 0.5, steps=4)
    assert log[0]["c"] == 1e6 and chosen == pytest.approx(1e5)
    assert search_c(lambda c: 0.5, steps=0)[0] == 1e6


@pytest.mark.filterwarnings("ignore:The number of unique classes is greater than 50%")  # the direct fit below
def test_linear_probe_equals_sklearn_fitted_directly_with_the_selected_c(caltech_root, bb, tmp_path):
    from sklearn.linear_model import LogisticRegression

    cfg = vp.RunConfig(dataset="caltech101", root=str(caltech_root), method="linear_probe", shots=1, seed=1,
                       backbone="vlprompt-tiny-ViT", pretrained="random", output=str(tmp_path / "lp"),
                       method_options={"max_iter": 100}, progress=False)  # fewer L-BFGS steps: a faster test
    m = run(cfg, backbone=bb)
    fit = m["train"]["fit"]
    c = fit["selected"]["c"]
    steps = fit["search"]["steps"]
    assert fit["search"]["validated"] is True and fit["search"]["split"] == "val"
    # 100 classes in 100 images: scikit-learn's "more classes than half the samples" on each of the 24 fits,
    # counted instead of shown.
    assert fit["warnings"]["silenced"] == {"more classes than half the samples": 7 + 2 * 8 + 1}
    assert [e["c"] for e in steps[:7]] == list(C_GRID) and len(steps) == 7 + 8
    ds = vp.load_dataset("caltech101", str(caltech_root), shots=1, seed=1)
    assert len(ds.val) == 100  # min(1, 4) per class: the split C was selected on
    tf = test_transform(bb.image_size, bb.image_mean, bb.image_std)
    threads = torch.get_num_threads()
    torch.set_num_threads(m["execution"]["threads"]["threads"])  # the run's: it decides the features' last bits
    try:
        x, y = encode_items(bb, ds.train, tf, progress=False)
        xt, yt = encode_items(bb, ds.test, tf, progress=False)
    finally:
        torch.set_num_threads(threads)
    # lpclip's features are float64 (its extractor writes them through Python lists), and so are the probe's.
    direct = LogisticRegression(solver="lbfgs", max_iter=100, C=c).fit(x.double().numpy(), y.numpy())
    expected = 100.0 * float((direct.predict(xt.numpy()) == yt.numpy()).mean())
    assert m["test"]["accuracy"] == pytest.approx(expected, rel=1e-6)  # float32 vs float64 mean of one count
    probe = vp.load_prompt(tmp_path / "lp", bb)
    assert torch.allclose(probe.weight, torch.from_numpy(direct.coef_).float())
    assert torch.equal(classify(probe, xt)[:, 0], torch.from_numpy(direct.predict(xt.numpy())))
    assert any(d["key"] == "linear_probe.subsets" for d in m["deviations"])


# -- Tip-Adapter -------------------------------------------------------------------------------------------------

def reference_tip(f, text, keys, labels, n_classes, alpha, beta):
    """Tip's formula written out per image and per cache entry."""
    out = []
    for row in f:
        row = row / row.norm()
        zs = [100.0 * float(row @ t) for t in text]
        cache = [0.0] * n_classes
        for k, y in zip(keys, labels):
            cache[int(y)] += math.exp(-beta * (1.0 - float(row @ k)))
        out.append([z + alpha * v for z, v in zip(zs, cache)])
    return torch.tensor(out)


def test_tip_adapter_logits_equal_the_formula(bb):
    torch.manual_seed(0)
    names = ["cat", "dog", "owl"]
    tip = TipAdapter(bb, names, ["a photo of a {}."])
    raw_keys, labels = torch.randn(7, bb.embed_dim), torch.tensor([0, 0, 1, 2, 2, 2, 1])
    tip.set_cache(raw_keys, labels)
    tip.alpha, tip.beta = 1.7, 5.5
    f = torch.randn(5, bb.embed_dim)
    keys = raw_keys / raw_keys.norm(dim=-1, keepdim=True)
    want = reference_tip(f, tip.text, keys, labels, 3, 1.7, 5.5)
    assert torch.allclose(tip(f), want, rtol=1e-5, atol=1e-4)
    assert torch.allclose(tip_logits(f, tip.text, tip.keys, tip.values, 0.0, 1.0), 100.0 * F.normalize(f) @ tip.text.T)


def test_tip_search_keep_initial_finds_the_first_strictly_best_pair():
    torch.manual_seed(1)
    d, n_cls = 16, 4
    text = F.normalize(torch.randn(n_cls, d), dim=-1)
    keys = F.normalize(torch.randn(12, d), dim=-1)
    values = F.one_hot(torch.arange(12) % n_cls, n_cls).float()
    f, y = torch.randn(30, d), torch.randint(0, n_cls, (30,))
    alpha, beta, acc = search_alpha_beta(f, y, text, keys, values, 3.0, 2.0, 1.0, 1.0, rule="keep_initial")
    fn = F.normalize(f, dim=-1)

    def accuracy(a, b):
        logits = 100 * fn @ text.T + a * torch.exp(-b * (1 - fn @ keys.T)) @ values
        return 100.0 * float((logits.argmax(-1) == y).float().mean())

    betas = [0.1 + i * (3.0 - 0.1) / 200 for i in range(200)]
    alphas = [0.1 + j * (2.0 - 0.1) / 20 for j in range(20)]
    best = (accuracy(1.0, 1.0), 1.0, 1.0)
    for b, a in itertools.product(betas, alphas):  # beta-major, strictly better only
        if accuracy(a, b) > best[0]:
            best = (accuracy(a, b), a, b)
    assert (acc, alpha, beta) == pytest.approx(best)
    assert max(betas) < 3.0 and max(alphas) < 2.0  # the upper ends are never reached


def test_tip_adapter_run_records_its_search(caltech_root, bb, tmp_path):
    cfg = vp.RunConfig(dataset="caltech101", root=str(caltech_root), method="tip_adapter", shots=2, seed=1,
                       backbone="vlprompt-tiny-ViT", pretrained="random", output=str(tmp_path / "tip"),
                       method_options={"augment_passes": 2}, progress=False)
    m = run(cfg, backbone=bb)
    sel = m["train"]["fit"]["selected"]
    assert m["train"]["fit"]["options"]["search_scale"] == [12, 5]  # Tip's caltech101 config
    assert m["train"]["fit"]["options"]["search_rule"] == "official"
    assert m["train"]["fit"]["search"] == {"validated": True, "split": "val", "n_images": 200, "rule": "official",
                                           "val_accuracy": sel["val_accuracy"]}
    split = next(d for d in m["deviations"] if d["key"] == "tip_adapter.search_split")
    assert sel["val_accuracy"] is not None and split["value"] == "CoOp's few-shot val subset"
    assert not any(d["key"] == "method_options.search_rule" for d in m["deviations"])
    tip = vp.load_prompt(tmp_path / "tip", bb)
    assert (tip.alpha, tip.beta) == (sel["alpha"], sel["beta"])
    assert tip.keys.shape == (200, bb.embed_dim) and torch.allclose(tip.keys.norm(dim=-1), torch.ones(200))
    saved = json.loads((tmp_path / "tip" / "metrics.json").read_text())
    assert saved["train_mode"] is None and saved["recipe"]["epochs"] == 0


# -- CLIP-Adapter ------------------------------------------------------------------------------------------------

def test_clip_adapter_residual_any_width_and_transfer(tmp_path):
    from vlprompt.methods.clip_adapter import ClipAdapter

    for arch in ("vlprompt-tiny-ViT", "vlprompt-tiny-RN"):
        bb = tiny_backbone(arch)
        ad = ClipAdapter(bb, ["cat", "dog"], ["a photo of a {}."], reduction=4, ratio=0.2)
        assert ad.down.weight.shape == (bb.embed_dim // 4, bb.embed_dim)
        f = torch.randn(3, bb.embed_dim)
        hidden = torch.clamp(f @ ad.down.weight.T, min=0)
        adapted = 0.2 * torch.clamp(hidden @ ad.up.weight.T, min=0) + 0.8 * f
        want = bb.logit_scale * F.normalize(adapted, dim=-1) @ ad.text.T
        assert torch.allclose(ad(f), want, atol=1e-5)
        ad.save_pretrained(tmp_path / arch)
        moved = vp.load_prompt(tmp_path / arch, bb, classnames=["owl", "bee", "ant"])
        assert moved.text.shape == (3, bb.embed_dim) and torch.equal(moved.up.weight, ad.up.weight)


# -- ProGrad -----------------------------------------------------------------------------------------------------

def test_prograd_projection_rule_with_and_without_conflict():
    from vlprompt.methods.prograd import project

    g_ce, conflicting, agreeing = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([1.0, 1.0])
    assert torch.allclose(project(g_ce, conflicting, 1.0), torch.tensor([0.5, 0.5]))  # orthogonal to G_kd
    assert float(project(g_ce, conflicting, 1.0) @ conflicting) == pytest.approx(0.0)
    assert torch.allclose(project(g_ce, conflicting, 0.5), torch.tensor([0.75, 0.25]))
    assert torch.equal(project(g_ce, agreeing, 1.0), g_ce)  # no conflict: CE's gradient as it is


def test_prograd_step_sets_the_projected_gradient(bb):
    from vlprompt.engine.trainer import TrainBatch
    from vlprompt.methods.prograd import ProGradObjective, ProGradOptions
    from vlprompt.prompts.zeroshot import handcrafted_text_features

    torch.manual_seed(3)
    names = ["cat", "dog", "owl", "bee"]
    teacher = handcrafted_text_features(bb, names, ["a photo of a {}."]).clone()
    objective = ProGradObjective(ProGradOptions(lam=1.0, temperature=2.0), teacher, "a photo of a {}.")
    f = torch.randn(6, bb.embed_dim)
    zero_shot = vp.CoOp(bb, names, n_ctx=2).logits(f, teacher)
    signs = []
    # Labels the teacher agrees with, then labels it ranks last: the second case makes the gradients conflict.
    for y in (zero_shot.argmax(-1), zero_shot.argmin(-1)):
        torch.manual_seed(4)
        learner = vp.CoOp(bb, names, n_ctx=2)
        loss, terms = objective.loss(learner, TrainBatch({"weak": f}, y, torch.arange(6)))
        objective.backward([learner.ctx], loss, terms)
        got = learner.ctx.grad.clone()
        # Reference: each gradient from its own forward pass, the rule written with cosines.
        learner.ctx.grad = None
        F.cross_entropy(learner(f), y).backward()
        g_ce = learner.ctx.grad.clone()
        learner.ctx.grad = None
        p = F.softmax(learner.logits(f, teacher).detach() / 2.0, dim=-1)
        (4.0 * -(p * F.log_softmax(learner(f) / 2.0, dim=-1)).sum(-1).mean()).backward()
        g_kd = learner.ctx.grad.clone()
        cos = float(F.cosine_similarity(g_ce.flatten(), g_kd.flatten(), dim=0))
        unit = g_kd / g_kd.norm()
        want = g_ce - (g_ce * unit).sum() * unit if cos < 0 else g_ce
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
        signs.append(cos > 0)
    assert signs == [True, False], "one case without and one with conflicting gradients"


def test_tip_adapter_f_fine_tunes_the_keys(caltech_root, bb, tmp_path):
    from vlprompt.methods.tip_adapter import augmented_passes

    cfg = vp.RunConfig(dataset="caltech101", root=str(caltech_root), method="tip_adapter_f", shots=2, seed=1,
                       backbone="vlprompt-tiny-ViT", pretrained="random", output=str(tmp_path / "tipf"),
                       method_options={"augment_passes": 2, "train_epochs": 8, "train_batch_size": 64},
                       progress=False)
    m = run(cfg, backbone=bb)
    epochs = m["train"]["fit"]["epochs"]
    assert len(epochs) == 8 and epochs[-1]["loss"] < epochs[0]["loss"]
    tuned = vp.load_prompt(tmp_path / "tipf", bb)
    assert tuned.method == "tip_adapter_f" and type(tuned).__name__ == "TipAdapter"
    ds = vp.load_dataset("caltech101", str(caltech_root), shots=2, seed=1)
    initial = F.normalize(augmented_passes(bb, ds.train, 2, cfg).mean(dim=1), dim=-1)
    assert tuned.keys.shape == initial.shape and not torch.allclose(tuned.keys, initial, atol=1e-4)
    selection = next(d for d in m["deviations"] if d["key"] == "tip_adapter_f.selection")
    assert selection["reference"] == "the epoch best on the TEST set"
