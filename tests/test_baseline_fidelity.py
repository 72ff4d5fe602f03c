"""The fitted baselines against their official code (issue 17): Tip-Adapter's alpha/beta search rule, the C
values (and their type) lpclip hands to scikit-learn, KgCoOp's half-precision hand-crafted features; progress
lines with an ETA for the searches; scikit-learn's few-shot warnings kept quiet; the search record
``train.fit.search`` that reports read."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlprompt as vp
from vlprompt.backbones.backbone import Backbone
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.run import run
from vlprompt.methods.base import method_config
from vlprompt.methods.kgcoop import encode_hand
from vlprompt.methods.linear_probe import FitWarnings, fit_logistic, search_c
from vlprompt.methods.tip_adapter import search_alpha_beta
from vlprompt.prompts import zeroshot
from vlprompt.utils import progress as progress_mod

TINY = dict(backbone="vlprompt-tiny-ViT", pretrained="random")
NAMES = ["cat", "dog", "sports car", "oak tree"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Train and test folders only: no validation split."""
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=10,
                                  n_test_per_class=2, seed=0)


@pytest.fixture(scope="module")
def shapes_val(shapes):
    """Class folders only: the automatic split gives each class 5 train, 2 val and 3 test images."""
    return str(Path(shapes) / "train")


def run_method(dataset, method, out, bb, options=None, shots=2, progress=False):
    cfg = vp.RunConfig(dataset=dataset, method=method, shots=shots, seed=1, output=str(out), progress=progress,
                       method_options=options or {}, **TINY)
    return run(cfg, backbone=bb)


# -- Tip-Adapter: the official search rule ------------------------------------------------------------------------

def official_tip_search(f, labels, text, keys, values, s_beta, s_alpha):
    """Tip's search_hp as its code runs it: every (beta, alpha) pair scored from scratch, beta-major; the
    best starts at accuracy 0 with beta = alpha = 0 and is replaced only by a strictly better pair."""
    fn = f / f.norm(dim=-1, keepdim=True)
    betas = [i * (s_beta - 0.1) / 200 + 0.1 for i in range(200)]
    alphas = [i * (s_alpha - 0.1) / 20 + 0.1 for i in range(20)]
    best_acc, best_beta, best_alpha = 0.0, 0.0, 0.0
    for beta in betas:
        for alpha in alphas:
            affinity = fn @ keys.T
            logits = 100.0 * fn @ text.T + (torch.exp(-1 * (beta - beta * affinity)) @ values) * alpha
            acc = 100.0 * int((logits.argmax(dim=-1) == labels).sum()) / len(labels)
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_alpha, best_beta, best_acc


def two_class_case():
    """Val images zero-shot CLIP gets wrong (class 1, nearer class 0's text) that only an alpha beyond the grid
    (S_alpha = 1) corrects, and images it gets right: every grid pair ties at 50 %, the initial pair (alpha 10,
    beta 5) scores 100 %."""
    e = torch.eye(4)
    text = e[:2]
    hard = F.normalize(torch.stack([0.60 * e[0] + 0.55 * e[1] + 0.57 * e[2] + 0.01 * k * e[3] for k in range(3)]),
                       dim=-1)
    easy = F.normalize(torch.stack([e[0] + 0.01 * k * e[3] for k in range(3)]), dim=-1)
    f = torch.cat([hard, easy])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    keys = hard.clone()  # the cache holds the hard images, labelled 1
    values = F.one_hot(torch.ones(3, dtype=torch.long), 2).float()
    return f, labels, text, keys, values


def test_official_rule_equals_tips_loop_where_the_initial_pair_wins():
    f, labels, text, keys, values = two_class_case()
    official = search_alpha_beta(f, labels, text, keys, values, 2.0, 1.0, 10.0, 5.0)
    kept = search_alpha_beta(f, labels, text, keys, values, 2.0, 1.0, 10.0, 5.0, rule="keep_initial")
    assert official == official_tip_search(f, labels, text, keys, values, 2.0, 1.0)
    assert official == (0.1, 0.1, 50.0)  # every grid pair ties: the first one (beta-major) is Tip's choice
    assert kept == (10.0, 5.0, 100.0)  # the old reading keeps the better initial pair


def test_official_rule_equals_tips_loop_where_the_initial_pair_ties():
    torch.manual_seed(0)
    n_cls, d = 5, 32
    text = F.normalize(torch.randn(n_cls, d), dim=-1)
    labels = torch.arange(n_cls).repeat(3)
    f = text[labels] + 0.05 * torch.randn(len(labels), d)  # zero-shot margins far above any cache term
    keys = F.normalize(torch.randn(10, d), dim=-1)
    values = F.one_hot(torch.arange(10) % n_cls, n_cls).float()
    official = search_alpha_beta(f, labels, text, keys, values, 7.0, 3.0, 1.17, 1.0)
    kept = search_alpha_beta(f, labels, text, keys, values, 7.0, 3.0, 1.17, 1.0, rule="keep_initial")
    assert official == official_tip_search(f, labels, text, keys, values, 7.0, 3.0) == (0.1, 0.1, 100.0)
    assert kept == (1.17, 1.0, 100.0)


def test_official_rule_equals_tips_loop_on_random_features():
    torch.manual_seed(3)
    n_cls, d = 6, 16
    text = F.normalize(torch.randn(n_cls, d), dim=-1)
    keys = F.normalize(torch.randn(24, d), dim=-1)
    values = F.one_hot(torch.arange(24) % n_cls, n_cls).float()
    f, labels = torch.randn(40, d), torch.randint(0, n_cls, (40,))
    got = search_alpha_beta(f, labels, text, keys, values, 12.0, 5.0, 3.0, 1.0)
    assert got == official_tip_search(f, labels, text, keys, values, 12.0, 5.0)


def test_official_rule_returns_zeros_when_no_pair_scores():
    """Tip's code returns beta = alpha = 0 when every pair scores 0 %; so does the official rule."""
    f, labels, text, keys, values = two_class_case()
    hard_only = (f[:3], labels[:3])  # the images no grid pair gets right
    assert search_alpha_beta(*hard_only, text, keys, values, 2.0, 1.0, 10.0, 5.0) == (0.0, 0.0, 0.0)
    assert official_tip_search(*hard_only, text, keys, values, 2.0, 1.0) == (0.0, 0.0, 0.0)
    assert search_alpha_beta(*hard_only, text, keys, values, 2.0, 1.0, 10.0, 5.0, rule="keep_initial") == \
        (10.0, 5.0, 100.0)
    with pytest.raises(vp.VlpromptError, match="search rule 'best' is not one of"):
        search_alpha_beta(f, labels, text, keys, values, 2.0, 1.0, 10.0, 5.0, rule="best")


def test_tip_run_records_its_rule_and_keep_initial_is_a_deviation(shapes_val, bb, tmp_path):
    official = run_method(shapes_val, "tip_adapter", tmp_path / "a", bb, {"augment_passes": 1})
    kept = run_method(shapes_val, "tip_adapter_f", tmp_path / "b", bb,
                      {"augment_passes": 1, "train_epochs": 1, "search_rule": "keep_initial"})
    search = official["train"]["fit"]["search"]
    assert search["validated"] is True and search["rule"] == "official" and search["n_images"] == 16
    assert not any(d["key"] == "method_options.search_rule" for d in official["deviations"])
    assert kept["train"]["fit"]["search"]["rule"] == "keep_initial"
    assert kept["method_options"]["search_rule"] == "keep_initial"
    rule = next(d for d in kept["deviations"] if d["key"] == "method_options.search_rule")
    assert (rule["value"], rule["reference"]) == ("keep_initial", "official")
    with pytest.raises(vp.VlpromptError, match="option search_rule: 'first' is not one of"):
        method_config(vp.get_method("tip_adapter"), vp.RunConfig(method="tip_adapter",
                                                                  method_options={"search_rule": "first"}))


def test_searches_without_a_validation_split_say_so(shapes, bb, tmp_path):
    tip = run_method(shapes, "tip_adapter", tmp_path / "tip", bb, {"augment_passes": 1})
    lp = run_method(shapes, "linear_probe", tmp_path / "lp", bb, {"max_iter": 20})
    off = run_method(shapes, "tip_adapter", tmp_path / "off", bb, {"augment_passes": 1, "search": False})
    assert tip["train"]["fit"]["search"] == {"validated": False, "reason": "no validation split"}
    assert lp["train"]["fit"]["search"] == {"validated": False, "reason": "no validation split"}
    assert off["train"]["fit"]["search"] == {"validated": False,
                                             "reason": "search turned off (option search=false)"}
    assert tip["train"]["fit"]["selected"]["alpha"] == 1.17 and lp["train"]["fit"]["selected"]["c"] == 1.0


# -- linear probe: lpclip's C values and their type ---------------------------------------------------------------

def lpclip_replay(accuracy, num_step):
    """The C values lpclip's linear_probe.py passes to scikit-learn, in order, and the last choice, written
    out from its arithmetic: the grid (lpclip writes its 1 as an int, which scikit-learn uses as 1.0), the
    first arg-max, 0.1 and 10 times it, then each step's end points as 10 ** log10 (NumPy)."""
    calls = []

    def scored(c):
        calls.append(c)
        return accuracy(c)

    grid = [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]
    accs = [scored(c) for c in grid]
    peak = grid[accs.index(max(accs))]
    ends = (1e-1 * peak, 1e1 * peak)
    final = None
    for _ in range(num_step):
        lo, hi = ends
        right_wins = scored(lo) < scored(hi)
        final = hi if right_wins else lo
        logs = (0.5 * (np.log10(hi) + np.log10(lo)), np.log10(hi)) if right_wins else \
            (np.log10(lo), 0.5 * (np.log10(hi) + np.log10(lo)))
        ends = (np.power(10, logs[0]), np.power(10, logs[1]))
    return calls, final


ACCURACIES = {
    "peak at 10^2.3": lambda c: -abs(math.log10(c) - 2.3),
    "peak at 10^-2.7": lambda c: -abs(math.log10(c) + 2.7),
    "flat": lambda c: 0.5,
    "steps": lambda c: (round(math.log10(c) * 7) % 5) / 5,
}


@pytest.mark.parametrize("name", sorted(ACCURACIES))
def test_c_values_and_types_are_lpclips(name):
    calls = []

    def accuracy(c):
        calls.append(c)
        return ACCURACIES[name](c)

    chosen, _ = search_c(accuracy, steps=8)
    want, final = lpclip_replay(ACCURACIES[name], 8)
    assert calls == want and chosen == final  # exact values: 0.1 * 1e-2 is 0.0010000000000000002, not 1e-3
    assert [type(c) for c in calls] == [type(c) for c in want] and type(chosen) is type(final)
    assert all(type(c) is float for c in calls[:9]) and all(type(c) is np.float64 for c in calls[9:])


def test_lpclip_arithmetic_differs_from_powers_of_ten():
    """Why the replay matters: lpclip's values are not the exact powers of ten a log-space bisection gives."""
    calls, _ = lpclip_replay(ACCURACIES["peak at 10^2.3"], 3)
    assert calls[7:] == [1e1, 1e3, 1e2, 1e3, 1e2, 316.2277660168379]
    assert calls[-1] != 10 ** 2.5  # lpclip's 10^2.5 (NumPy's power) is one step below Python's
    calls, _ = lpclip_replay(lambda c: -abs(math.log10(c) + 6.3), 1)
    assert calls[8] == 1e1 * 1e-6 == 9.999999999999999e-06  # lpclip's 10 C for the grid's 1e-6


class RecordingLR:
    """Wraps scikit-learn's LogisticRegression to record what each fit received."""

    def __init__(self, real, seen):
        self.real, self.seen = real, seen

    def __call__(self, **kwargs):
        model = self.real(**kwargs)
        fit = model.fit

        def recording_fit(x, y):
            self.seen.append((type(model.C), x.dtype))
            return fit(x, y)

        model.fit = recording_fit
        return model


def test_the_c_type_and_feature_dtype_reach_scikit_learn(shapes_val, bb, tmp_path, monkeypatch):
    import sklearn.linear_model

    seen = []
    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression",
                        RecordingLR(sklearn.linear_model.LogisticRegression, seen))
    m = run_method(shapes_val, "linear_probe", tmp_path / "lp", bb, {"search_steps": 3, "max_iter": 50})
    # 7 grid fits and step 1 with Python floats, steps 2-3 with numpy.float64, then the final fit of step 3's C.
    assert [t for t, _ in seen] == [float] * 9 + [np.float64] * 5
    assert {d for _, d in seen} == {np.dtype(np.float64)}  # lpclip's features are float64
    assert m["train"]["fit"]["options"]["fit_dtype"] == "float64"
    assert not any(d["key"] == "method_options.fit_dtype" for d in m["deviations"])
    seen.clear()
    m = run_method(shapes_val, "linear_probe", tmp_path / "lp32", bb,
                   {"search_steps": 1, "max_iter": 50, "fit_dtype": "float32"})
    assert {d for _, d in seen} == {np.dtype(np.float32)}
    dtype = next(d for d in m["deviations"] if d["key"] == "method_options.fit_dtype")
    assert (dtype["value"], dtype["reference"], dtype["source"]) == ("float32", "float64", "official code")


def test_c_type_changes_float32_fits_and_not_float64_fits():
    """The reason for following lpclip: on float32 features a numpy.float64 C gives other weights than the
    same Python float, and a prediction that flips; on float64 features (lpclip's) it gives the same."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    y = np.repeat(np.arange(10), 4)
    a = fit_logistic(x, y, 100.0, 1000)
    b = fit_logistic(x, y, np.float64(100.0), 1000)
    assert not np.array_equal(a.coef_, b.coef_)
    # Points along the segment between two training images of different classes, near their boundary.
    t = np.linspace(0.0, 1.0, 200001)[:, None]
    points = (x[0].astype(np.float64) + t * (x[4] - x[0]).astype(np.float64)).astype(np.float32)
    assert (a.predict(points) != b.predict(points)).any()
    x64 = x.astype(np.float64)
    assert np.array_equal(fit_logistic(x64, y, 100.0, 1000).coef_, fit_logistic(x64, y, np.float64(100.0), 1000).coef_)


# -- scikit-learn's warnings ---------------------------------------------------------------------------------------

def test_few_shot_warnings_are_counted_not_shown(recwarn):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 8)), np.arange(30) % 20  # 20 classes in 30 samples: one image or two each
    with warnings.catch_warnings(record=True) as direct:  # what scikit-learn says on its own
        warnings.simplefilter("always")
        LogisticRegression(max_iter=1).fit(x, y)
    assert any("greater than 50%" in str(w.message) for w in direct)
    assert any(issubclass(w.category, ConvergenceWarning) for w in direct)
    recwarn.clear()
    tally = FitWarnings()
    fit_logistic(x, y, 1.0, 1, tally)
    fit_logistic(x, y, 2.0, 1, tally)
    assert len(recwarn) == 0
    assert tally.record() == {"silenced": {"more classes than half the samples": 2}, "not_converged_fits": 2,
                              "fits": 2}
    other = warnings.WarningMessage(RuntimeWarning("something else"), RuntimeWarning, "x.py", 1)
    tally.sort([other], 1.0)  # anything not known to be useless is passed on
    assert [str(w.message) for w in recwarn] == ["something else"]


def test_a_run_shows_one_convergence_warning_and_no_sklearn_warning(shapes_val, bb, tmp_path, caplog, recwarn):
    caplog.set_level(logging.INFO, logger="vlprompt")
    m = run_method(shapes_val, "linear_probe", tmp_path / "lp", bb, {"search_steps": 2, "max_iter": 1},
                   progress=True)
    assert not [w for w in recwarn if "sklearn" in w.filename]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "did not converge" in r.getMessage()]
    n = m["train"]["fit"]["warnings"]["not_converged_fits"]
    assert len(warned) == 1 and n >= 1 and f"in {n} of 12 fits" in warned[0].getMessage()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("searching C: ")]
    assert lines and lines[-1].startswith("searching C: 11/11 (100%)")


# -- progress ------------------------------------------------------------------------------------------------------

def test_progress_lines_carry_an_eta_from_the_rate_so_far(monkeypatch, caplog):
    clock = iter([0.0, 10.0, 11.0, 30.0, 40.0])
    monkeypatch.setattr(progress_mod, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    caplog.set_level(logging.INFO, logger="vlprompt")
    bar = progress_mod.Progress("work", 5, every_s=5.0)
    for n in (1, 1, 1, 2):  # at 10 s, 11 s (throttled), 30 s and 40 s
        bar.update(n)
    assert [r.getMessage() for r in caplog.records] == [
        "work: 1/5 (20%) 10.0s ETA 40 s", "work: 3/5 (60%) 30.0s ETA 20 s", "work: 5/5 (100%) 40.0s"]
    eta = progress_mod.Progress.eta_text
    assert (eta(12.4), eta(420), eta(5400), eta(9000)) == ("12 s", "7 min", "90 min", "2.5 h")


def test_tip_search_reports_progress(caplog):
    caplog.set_level(logging.INFO, logger="vlprompt")
    f, labels, text, keys, values = two_class_case()
    search_alpha_beta(f, labels, text, keys, values, 2.0, 1.0, 10.0, 5.0, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("searching alpha and beta")]
    assert lines and lines[-1].startswith("searching alpha and beta: 200/200 (100%)")
    assert lines[-1].endswith("best 50.0% (alpha 0.10, beta 0.10)")
    caplog.clear()
    search_alpha_beta(f, labels, text, keys, values, 2.0, 1.0, 10.0, 5.0, progress=False)
    assert not caplog.records


# -- KgCoOp: the hand-crafted features' precision ------------------------------------------------------------------

def test_fp16_hand_features_come_from_a_half_precision_copy(bb, caplog):
    caplog.set_level(logging.WARNING, logger="vlprompt")
    got = encode_hand(bb, NAMES, ["a photo of a {}."], "fp16")
    half = copy.deepcopy(bb.model).half()
    with torch.no_grad():
        raw = half.encode_text(bb.tokenize([f"a photo of a {n}." for n in NAMES]))
    want = (raw / raw.norm(dim=-1, keepdim=True)).float()  # KgCoOp normalises its fp16 target in fp16
    assert torch.allclose(got, want, atol=1e-3, rtol=0)  # one float16 step at these magnitudes
    assert torch.equal(got, got.half().float())  # kept at half precision
    fp32 = zeroshot.handcrafted_text_features(bb, NAMES, ["a photo of a {}."])
    assert not torch.equal(got, fp32) and torch.allclose(got, fp32, atol=2e-3, rtol=0)
    assert any("float16 on the CPU" in r.getMessage() for r in caplog.records)  # the CPU is warned about


def test_bf16_hand_features_equal_a_bf16_backbones(bb):
    got = encode_hand(bb, NAMES, ["a photo of a {}."], "bf16")
    bf16 = Backbone(copy.deepcopy(bb.model), bb.tokenizer, bb.source, precision="bf16")
    want = zeroshot.handcrafted_text_features(bf16, NAMES, ["a photo of a {}."]).to(torch.bfloat16).float()
    assert torch.equal(got, want)


def test_kgcoop_run_with_fp16_hand_features(shapes, bb, tmp_path):
    m = run(vp.RunConfig.from_sources(dataset=shapes, method="kgcoop", shots=2, epochs=1, batch_size=8,
                                      method_options={"handcrafted_precision": "fp16"}, output=str(tmp_path / "kg"),
                                      progress=False, **TINY), backbone=bb)
    assert m["method_options"]["handcrafted_precision"] == "fp16"
    assert not any(d["key"] == "kgcoop.hand_precision" for d in m["deviations"])
    mcfg = method_config(vp.get_method("kgcoop"), vp.RunConfig(method="kgcoop", dataset=shapes, **TINY),
                         vp.load_dataset(shapes))
    learner = vp.get_method("kgcoop").build(bb, NAMES, mcfg)  # the default: the run's own backbone
    assert torch.equal(learner.hand, zeroshot.handcrafted_text_features(bb, NAMES, [mcfg.template]))
    with pytest.raises(vp.VlpromptError, match="option handcrafted_precision: 'fp8' is not one of"):
        method_config(vp.get_method("kgcoop"), vp.RunConfig(method="kgcoop",
                                                            method_options={"handcrafted_precision": "fp8"}))
