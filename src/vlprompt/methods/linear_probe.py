"""Linear-probe CLIP (CoOp's lpclip, KaiyangZhou/CoOp lpclip/): L-BFGS logistic regression on frozen image features.

Features: the raw (unnormalised) image-tower output under the test transform, for the train, val and test
splits alike. C is chosen on the validation split: the grid 1e6 .. 1e-6 (first arg-max, so ties favour the
larger C), then ``search_steps`` bisection steps in log10 C between C/10 and 10 C (ties favour the smaller
C); the classifier of the last step's choice is the result. The C values are computed as lpclip computes them,
down to their type: 0.1 C and 10 C as Python floats, then ``np.power(10, ...)`` of log10 end points, so from the
second step on scikit-learn receives a ``numpy.float64``. The features are fitted as float64 (``fit_dtype``), as
lpclip's are: its extractor writes them through Python lists, so its .npz arrays are float64. Both matter on
float32 features: with NumPy 2 and a scikit-learn that keeps float32 features in float32 (1.9 does), a
``numpy.float64`` C promotes part of the L-BFGS arithmetic to float64 where a Python float does not, and
near-tied predictions flip; on float64 features C's type makes no difference.

Where lpclip differs and we do not follow it (recorded in each run): vlprompt uses CoOp's few-shot subsets (train
K per class, val min(K, 4)) so the probe is comparable with the prompt methods, where lpclip draws its own with
NumPy; any backbone, where lpclip hard-codes RN50; and on ImageNet, whose val split is its test split, C is never
selected on it (lpclip selects on 4 test images per class): there, and wherever a dataset has no validation
images, C is ``default_c`` (recorded as ``train.fit.search = {"validated": false, "reason": ...}``).

Warnings: scikit-learn's warnings that every few-shot fit raises and that cannot help (`SILENCED`) are counted in
``train.fit.warnings`` and not shown; fits that stop before converging are counted there and reported in one
warning per run.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import VlpromptError
from ..prompts.base import TextClassifier
from ..recipes.records import Deviation
from ..utils.progress import Progress
from .base import MethodBase, Needs, option, parse_options

C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
FIT_DTYPES = ("float64", "float32")
C_VALUES = "lpclip's arithmetic: 0.1 C and 10 C, then numpy.float64 powers of 10 from the second step"
# scikit-learn warnings that every few-shot fit triggers and that cannot help (category, message start).
SILENCED = {"more classes than half the samples": (UserWarning, "The number of unique classes is greater than 50%"),
            "fewer members in a class than n_splits": (UserWarning, "The least populated class in y has only")}
log = logging.getLogger(__name__)


@dataclass
class LinearProbeOptions:
    search_steps: int = option(8, "bisection steps after the grid (lpclip: 8)")
    max_iter: int = option(1000, "L-BFGS iterations (lpclip: 1000)")
    default_c: float = option(1.0, "C when there is no validation split to select it on (sklearn's default)")
    fit_dtype: str = option("float64", "float64: lpclip's features | float32: half the memory and time of each "
                                       "fit on large feature sets, results may differ at near ties")

    def __post_init__(self):
        if self.search_steps < 0 or self.max_iter < 1 or not self.default_c > 0:
            raise VlpromptError("linear_probe options: search_steps >= 0, max_iter >= 1 and default_c > 0")
        if self.fit_dtype not in FIT_DTYPES:
            raise VlpromptError(f"option fit_dtype: '{self.fit_dtype}' is not one of {list(FIT_DTYPES)}")


def search_c(accuracy: Callable[[float], float], steps: int) -> tuple[float, list[dict]]:
    """lpclip's search, with ``accuracy(C)`` the validation accuracy of a classifier fitted with C.

    Returns (the chosen C, the log of every step). Grid: the first arg-max. Bisection: from [C/10, 10 C],
    each step scores both ends, keeps the right one if strictly better (else the left) and moves the other
    end to the log-midpoint. Every C is computed as lpclip computes it (module docstring)."""
    grid = [(c, accuracy(c)) for c in C_GRID]
    best_c, best = grid[0]
    for c, acc in grid[1:]:
        if acc > best:
            best_c, best = c, acc
    steps_log = [{"stage": "grid", "c": float(c), "val_accuracy": acc} for c, acc in grid]
    left, right = 1e-1 * best_c, 1e1 * best_c
    chosen = best_c
    for step in range(steps):
        acc_l, acc_r = accuracy(left), accuracy(right)
        log_left, log_right = np.log10(left), np.log10(right)
        mid = 0.5 * (log_right + log_left)
        if acc_l < acc_r:
            chosen, log_left = right, mid
        else:
            chosen, log_right = left, mid
        steps_log.append({"stage": f"step {step + 1}", "c": float(chosen), "val_accuracy": max(acc_l, acc_r)})
        left, right = np.power(10, log_left), np.power(10, log_right)
    return chosen, steps_log


@dataclass
class FitWarnings:
    """What scikit-learn warned about over one run's fits: the warnings in `SILENCED` are counted and dropped,
    convergence failures counted (the run reports them once), any other warning passed on as it was."""

    silenced: dict = field(default_factory=dict)
    not_converged: list = field(default_factory=list)  # C of every fit that stopped before converging
    fits: int = 0

    def sort(self, caught: list, c: float) -> None:
        from sklearn.exceptions import ConvergenceWarning

        self.fits += 1
        for w in caught:
            key = silenced_key(w)
            if key is not None:
                self.silenced[key] = self.silenced.get(key, 0) + 1
            elif issubclass(w.category, ConvergenceWarning):
                self.not_converged.append(float(c))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def record(self) -> dict:
        return {"silenced": dict(self.silenced), "not_converged_fits": len(self.not_converged), "fits": self.fits}


def silenced_key(w: warnings.WarningMessage) -> Optional[str]:
    for key, (category, start) in SILENCED.items():
        if issubclass(w.category, category) and str(w.message).startswith(start):
            return key
    return None


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, tally: Optional[FitWarnings] = None):
    """lpclip's classifier (L-BFGS, L2 penalty, the default of scikit-learn), C passed on as it is (its type
    matters). The fit's warnings go to ``tally`` (`FitWarnings`)."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # each one recorded here and sorted by the tally
        model = LogisticRegression(solver="lbfgs", max_iter=max_iter, C=c).fit(x, y)
    (tally if tally is not None else FitWarnings()).sort(caught, c)
    return model


def warn_not_converged(tally: FitWarnings, max_iter: int) -> None:
    """One warning per run (not one per fit) when L-BFGS stopped early: more iterations may change C."""
    if tally.not_converged:
        cs = ", ".join(f"{c:.3g}" for c in sorted(set(tally.not_converged)))
        log.warning(f"linear_probe: L-BFGS did not converge within max_iter={max_iter} in {len(tally.not_converged)} "
                    f"of {tally.fits} fits (C = {cs}); lpclip accepts this too; --option max_iter=N allows more")


class LinearProbe(TextClassifier):
    """A linear head over raw image features: logits = f W^T + b (lpclip feeds unnormalised features)."""

    method = "linear_probe"
    scalars = ("c",)  # the chosen C (None until fitted): a record, not used by the logits

    def __init__(self, backbone, classnames: Sequence[str], weight: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, c: Optional[float] = None):
        super().__init__()
        self.__dict__["backbone"] = backbone
        self.classnames = list(classnames)
        d, n = backbone.embed_dim, len(self.classnames)
        self.register_buffer("weight", weight.float() if weight is not None else torch.zeros(n, d))
        self.register_buffer("bias", bias.float() if bias is not None else torch.zeros(n))
        self.c = c

    def set_from_sklearn(self, model, c: float) -> None:
        """The fitted classifier as (C, d) weights over all classes (a binary problem's one row becomes
        [-w/2, w/2], which ranks classes as the sigmoid does)."""
        w, b = torch.from_numpy(model.coef_).float(), torch.from_numpy(model.intercept_).float()
        if w.shape[0] == 1:
            w, b = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
        full_w, full_b = torch.zeros_like(self.weight), torch.full_like(self.bias, -float("inf"))
        idx = torch.as_tensor(model.classes_, dtype=torch.long)
        full_w[idx], full_b[idx] = w.to(full_w.device), b.to(full_b.device)  # classes absent from training: never
        self.weight.copy_(full_w)
        self.bias.copy_(full_b)
        self.c = float(c)

    def text_features(self) -> torch.Tensor:
        return self.weight

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return image_features.float() @ text_features.T + self.bias


class LinearProbeMethod(MethodBase):
    name = "linear_probe"
    needs = Needs(fitted=True, classifier="head", transfers=False)
    Options = LinearProbeOptions
    tied_to_classes = "a linear probe is a head"

    def build(self, backbone, classnames, config) -> LinearProbe:
        return LinearProbe(backbone, classnames)

    def fit(self, learner: LinearProbe, bb, ds, cfg, store) -> dict:
        """Fit on the training features, C selected on the validation features (module docstring)."""
        options = parse_options(self.name, self.Options, cfg.method_options)
        x, y = (t.cpu().numpy() for t in store.get(bb, ds.train, cfg, desc="encoding training images",
                                                    dataset=ds.name))
        x = x.astype(options.fit_dtype)
        deviations = [Deviation("linear_probe.subsets", "CoOp's few-shot subsets", "its own, drawn with NumPy",
                                "official code")]
        if bb.source.name.replace("/", "-") != "RN50":
            deviations.append(Deviation("linear_probe.features", bb.source.name, "RN50", "official code",
                                        "lpclip extracts its features with RN50 only"))
        if options.fit_dtype != "float64":
            deviations.append(Deviation("method_options.fit_dtype", options.fit_dtype, "float64", "official code",
                                        "the precision the features are fitted in"))
        tally = FitWarnings()
        reason = unvalidated_reason(ds)
        if reason is None:
            vx, vy = (t.cpu().numpy() for t in store.get(bb, ds.val, cfg, desc="encoding validation images",
                                                          dataset=ds.name))
            vx = vx.astype(options.fit_dtype)
            bar = Progress("searching C", len(C_GRID) + 2 * options.search_steps, enabled=cfg.progress,
                           every_s=3.0)

            def accuracy(c: float) -> float:
                acc = float((fit_logistic(x, y, c, options.max_iter, tally).predict(vx) == vy).mean())
                bar.update(1, extra=f"C={c:.3g} val {100.0 * acc:.1f}%")
                return acc

            c, steps = search_c(accuracy, options.search_steps)
            search = {"validated": True, "split": "val", "n_images": len(ds.val), "c_values": C_VALUES,
                      "steps": steps}
        else:
            c = options.default_c
            search = {"validated": False, "reason": reason}
            deviations.append(Deviation("linear_probe.c_search", "not run", "searched on the val split",
                                        "official code", f"C not selected on {ds.name}, {reason}; C = {c}"))
        model = fit_logistic(x, y, c, options.max_iter, tally)
        warn_not_converged(tally, options.max_iter)
        learner.set_from_sklearn(model, c)
        converged = bool(np.max(model.n_iter_) < options.max_iter)
        return {"selected": {"c": float(c), "converged": converged}, "search": search,
                "warnings": tally.record(), "deviations": deviations,
                "options": {"search_steps": options.search_steps, "max_iter": options.max_iter,
                            "fit_dtype": options.fit_dtype}}


def unvalidated_reason(ds) -> Optional[str]:
    """Why C is not selected on this dataset's validation split, or None when it is."""
    if ds.name == "imagenet":
        return "no validation split (ImageNet's val split is its test split; lpclip selects C on it)"
    if not ds.val:
        return "no validation split"
    return None
