"""Linear-probe CLIP (CoOp's lpclip, SPEC-baselines 1): L-BFGS logistic regression on frozen image features.

Features: the raw (unnormalised) image-tower output under the test transform, for the train, val and test
splits alike. C is chosen on the validation split: the grid 1e6 .. 1e-6 (first arg-max, so ties favour the
larger C), then ``search_steps`` bisection steps in log10 C between C/10 and 10 C (ties favour the smaller
C); the classifier of the last step's choice is the result. Where lpclip differs and we do not follow it
(recorded in each run): vlprompt uses CoOp's few-shot subsets (train K per class, val min(K, 4)) so the probe
is comparable with the prompt methods, where lpclip draws its own with NumPy; any backbone, where lpclip
hard-codes RN50; and on ImageNet, whose val split is its test split, C is never selected on it (lpclip
selects on 4 test images per class): there, and wherever a dataset has no validation images, C is
``default_c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import VlpromptError
from ..prompts.artifact import BASE_KEYS, base_config, read_for, write_artifact
from ..prompts.base import TextClassifier
from .base import MethodBase, Needs, option, parse_options

C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


@dataclass
class LinearProbeOptions:
    search_steps: int = option(8, "bisection steps after the grid (lpclip: 8)")
    max_iter: int = option(1000, "L-BFGS iterations (lpclip: 1000)")
    default_c: float = option(1.0, "C when there is no validation split to select it on (sklearn's default)")

    def __post_init__(self):
        if self.search_steps < 0 or self.max_iter < 1 or not self.default_c > 0:
            raise VlpromptError("linear_probe options: search_steps >= 0, max_iter >= 1 and default_c > 0")


def search_c(accuracy: Callable[[float], float], steps: int) -> tuple[float, list[dict]]:
    """lpclip's search, with ``accuracy(C)`` the validation accuracy of a classifier fitted with C.

    Returns (the chosen C, the log of every step). Grid: the first arg-max. Bisection: from [C/10, 10 C],
    each step scores both ends, keeps the right one if strictly better (else the left) and moves the other
    end to the log-midpoint."""
    grid = [(c, accuracy(c)) for c in C_GRID]
    best_c = grid[0][0]
    best = grid[0][1]
    for c, acc in grid[1:]:
        if acc > best:
            best_c, best = c, acc
    log = [{"stage": "grid", "c": c, "val_accuracy": acc} for c, acc in grid]
    left, right = math.log10(best_c) - 1, math.log10(best_c) + 1
    chosen = best_c
    for step in range(steps):
        acc_l, acc_r = accuracy(10 ** left), accuracy(10 ** right)
        mid = (left + right) / 2
        if acc_l < acc_r:
            chosen, left = 10 ** right, mid
        else:
            chosen, right = 10 ** left, mid
        log.append({"stage": f"step {step + 1}", "c": chosen, "val_accuracy": max(acc_l, acc_r)})
    return chosen, log


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    """lpclip's classifier (L-BFGS, L2 penalty, the default of scikit-learn). Not converging within
    ``max_iter`` is what lpclip accepts too; the run records it (``converged``) instead of warning per fit."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(solver="lbfgs", max_iter=max_iter, C=c).fit(x, y)


class LinearProbe(TextClassifier):
    """A linear head over raw image features: logits = f W^T + b (lpclip feeds unnormalised features)."""

    method = "linear_probe"
    CONFIG_KEYS = BASE_KEYS | {"c", "embed_dim"}

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

    def config(self) -> dict:
        return {**base_config(self, self.method), "c": self.c, "embed_dim": self.backbone.embed_dim}

    def save_pretrained(self, out_dir):
        return write_artifact(out_dir, self.config(), {"weight": self.weight, "bias": self.bias})

    @classmethod
    def from_pretrained(cls, path, backbone, classnames=None) -> "LinearProbe":
        cfg, tensors = read_for(cls, path, backbone, classnames, tied_to_classes="a linear probe is a head")
        if tensors.get("weight") is None or tuple(tensors["weight"].shape) != (len(cfg["classnames"]),
                                                                             backbone.embed_dim):
            raise VlpromptError(f"prompt {path}: its weights do not fit backbone {backbone.source.name} "
                                f"(embedding width {backbone.embed_dim})")
        learner = cls(backbone, cfg["classnames"], tensors["weight"].to(backbone.device),
                      tensors["bias"].to(backbone.device), cfg.get("c"))
        return learner


class LinearProbeMethod(MethodBase):
    name = "linear_probe"
    needs = Needs(fitted=True, classifier="head", transfers=False)
    Options = LinearProbeOptions

    def build(self, backbone, classnames, config) -> LinearProbe:
        return LinearProbe(backbone, classnames)

    def load(self, path, backbone, classnames=None, dataset=None, template=None) -> LinearProbe:
        return LinearProbe.from_pretrained(path, backbone, classnames)

    def fit(self, learner: LinearProbe, bb, ds, cfg, store) -> dict:
        """Fit on the training features, C selected on the validation features (module docstring)."""
        options = parse_options(self.name, self.Options, cfg.method_options)
        x, y = (t.cpu().numpy() for t in store.get(bb, ds.train, cfg, desc="encoding training images",
                                                    dataset=ds.name))
        deviations = ["linear_probe: CoOp's few-shot subsets (lpclip draws its own with NumPy), features of "
                      f"{bb.source.name} (lpclip: RN50)"]
        if ds.val and ds.name != "imagenet":
            vx, vy = (t.cpu().numpy() for t in store.get(bb, ds.val, cfg, desc="encoding validation images",
                                                          dataset=ds.name))

            def accuracy(c: float) -> float:
                return float((fit_logistic(x, y, c, options.max_iter).predict(vx) == vy).mean())

            c, log = search_c(accuracy, options.search_steps)
        else:
            c, log = options.default_c, []
            deviations.append(f"linear_probe: no validation split to select C on ({ds.name}); C = {c}"
                              + (" (ImageNet's val is its test split; lpclip selects C on it)"
                                 if ds.name == "imagenet" else ""))
        model = fit_logistic(x, y, c, options.max_iter)
        learner.set_from_sklearn(model, c)
        converged = bool(np.max(model.n_iter_) < options.max_iter)
        return {"selected": {"c": c, "converged": converged}, "search": log, "deviations": deviations,
                "options": {"search_steps": options.search_steps, "max_iter": options.max_iter}}
