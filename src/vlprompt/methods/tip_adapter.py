"""Tip-Adapter (gaopengcuhk/Tip-Adapter): zero-shot CLIP plus a key-value cache of the few-shot training features.

    logits = 100 f W^T + alpha * exp(-beta * (1 - f K^T)) L

``f`` the normalised test feature, ``W`` the hand-crafted text features (the dataset's template), ``K`` the
keys: each training image's raw features averaged over ``augment_passes`` augmented views (RandomResizedCrop
scale (0.5, 1), flip) and then normalised; ``L`` their one-hot labels. alpha and beta are searched on the
validation split: beta over 200 values i (S_beta - 0.1) / 200 + 0.1, alpha over 20 values i (S_alpha - 0.1) /
20 + 0.1, beta in the outer loop. Tip's rule (``search_rule=official``, the default) takes the best grid pair,
the first found on ties, and never scores the initial pair (if no pair scores above 0 %, Tip's code returns
alpha = beta = 0, and so does this one); ``keep_initial`` keeps the initial pair unless a grid pair is strictly
better (vlprompt's reading before; recorded as a deviation). The run records the search in ``train.fit.search``
(``{"validated": false, "reason": ...}`` where nothing was searched). Deviations (recorded in each run): the
search uses CoOp's few-shot validation subset (Tip's main.py uses the full val split; on ImageNet Tip searches on
the test set, which vlprompt never does: the initial values are kept), and the few-shot training set is CoOp's
(Tip samples its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.transforms import train_transform
from ..engine.features import encode_items
from ..errors import VlpromptError
from ..prompts.base import TextClassifier
from ..prompts.zeroshot import handcrafted_text_features
from ..recipes.records import Deviation
from ..utils.progress import Progress
from .base import MethodBase, Needs, option, parse_options

# Tip's configs/*.yaml: [S_beta, S_alpha] and init_alpha per dataset (init_beta is 1 everywhere).
SEARCH = {"imagenet": (7, 3, 1.17), "caltech101": (12, 5, 3.0), "dtd": (13, 13, 2.0), "eurosat": (12, 10, 2.0),
          "fgvc_aircraft": (30, 30, 5.0), "food101": (10, 10, 1.17), "oxford_flowers": (50, 50, 10.0),
          "oxford_pets": (7, 3, 1.17), "stanford_cars": (20, 10, 3.0), "sun397": (12, 10, 1.17),
          "ucf101": (7, 3, 3.0)}
DEFAULT_SEARCH = (7, 3, 1.17)  # datasets Tip has no config for: ImageNet's (its smallest ranges)
TIP_SCALE = 100.0  # Tip's formula uses CLIP's 100, whatever the backbone's own logit scale
BETA_STEPS, ALPHA_STEPS = 200, 20  # Tip's search_step, the same in every config
SEARCH_RULES = ("official", "keep_initial")


@dataclass
class TipAdapterOptions:
    augment_passes: int = option(10, "augmented views averaged per training image (Tip: augment_epoch = 10)")
    search_scale_beta: Optional[float] = option(None, "S_beta; default: Tip's value for the dataset (SEARCH)")
    search_scale_alpha: Optional[float] = option(None, "S_alpha; default: Tip's value for the dataset")
    init_alpha: Optional[float] = option(None, "default: Tip's value for the dataset")
    init_beta: float = option(1.0, "the starting beta (Tip: 1 everywhere)")
    search: bool = option(True, "False: keep the initial alpha and beta")
    search_rule: str = option("official", "official: the best grid pair, the first on ties (Tip never scores the "
                                          "initial pair) | keep_initial: the initial pair unless a grid pair is "
                                          "strictly better")

    def __post_init__(self):
        if self.search_rule not in SEARCH_RULES:
            raise VlpromptError(f"option search_rule: '{self.search_rule}' is not one of {list(SEARCH_RULES)}")
        if self.augment_passes < 1:
            raise VlpromptError(f"option augment_passes: must be >= 1, got {self.augment_passes}")
        for key in ("search_scale_beta", "search_scale_alpha", "init_alpha"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise VlpromptError(f"option {key}: must be > 0, got {value}")

    def resolved(self, dataset: str) -> tuple[float, float, float, float]:
        s_beta, s_alpha, alpha = SEARCH.get(dataset, DEFAULT_SEARCH)
        return (self.search_scale_beta or s_beta, self.search_scale_alpha or s_alpha,
                self.init_alpha or alpha, self.init_beta)


def tip_logits(f: torch.Tensor, text: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alpha: float,
               beta: float) -> torch.Tensor:
    """Tip-Adapter's logits for raw image features ``f`` (normalised here)."""
    f = F.normalize(f.float(), dim=-1)
    return TIP_SCALE * f @ text.T + cache_logits(f @ keys.T, values, beta) * alpha


def cache_logits(affinity: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-beta (1 - affinity)) L, with Tip's order of operations (exp(-(beta - beta affinity)))."""
    return torch.exp(-(beta - beta * affinity)) @ values


def tip_grid(scale: float, steps: int) -> list[float]:
    """Tip's search values i (S - 0.1) / steps + 0.1 for i < steps: the upper end S is never reached."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def search_alpha_beta(f: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, scale_beta: float, scale_alpha: float, init_alpha: float,
                      init_beta: float, rule: str = "official", progress: bool = False) -> tuple[float, float, float]:
    """Tip's exhaustive search, beta in the outer loop: (alpha, beta, accuracy in %) of the first pair with the
    most correct predictions. ``rule`` (module docstring) says whether the initial pair competes."""
    if rule not in SEARCH_RULES:
        raise VlpromptError(f"search rule '{rule}' is not one of {list(SEARCH_RULES)}")
    f = F.normalize(f.float(), dim=-1)
    clip_part = TIP_SCALE * f @ text.T
    affinity = f @ keys.T

    def correct(alpha: float, cache: torch.Tensor) -> int:
        return int(((clip_part + cache * alpha).argmax(dim=-1) == labels).sum())

    if rule == "official":
        best, best_alpha, best_beta = 0, 0.0, 0.0  # Tip's starting point: only a pair scoring above 0 % replaces it
    else:
        best = correct(init_alpha, cache_logits(affinity, values, init_beta))
        best_alpha, best_beta = init_alpha, init_beta
    n = max(len(labels), 1)
    bar = Progress("searching alpha and beta", BETA_STEPS, enabled=progress, every_s=3.0)
    for beta in tip_grid(scale_beta, BETA_STEPS):
        cache = cache_logits(affinity, values, beta)
        for alpha in tip_grid(scale_alpha, ALPHA_STEPS):
            hits = correct(alpha, cache)
            if hits > best:
                best, best_alpha, best_beta = hits, alpha, beta
        bar.update(1, extra=f"best {100.0 * best / n:.1f}% (alpha {best_alpha:.2f}, beta {best_beta:.2f})")
    return best_alpha, best_beta, 100.0 * best / n


class TipAdapter(TextClassifier):
    method = "tip_adapter"
    data_sized = ("keys", "values")  # one row per training image
    scalars = ("alpha", "beta")

    def __init__(self, backbone, classnames: Sequence[str], templates: Sequence[str], keys=None, values=None,
                 alpha: float = 1.0, beta: float = 1.0):
        super().__init__()
        self.__dict__["backbone"] = backbone
        self.classnames = list(classnames)
        self.alpha, self.beta = float(alpha), float(beta)
        self.use_templates(templates)
        d, n = backbone.embed_dim, len(self.classnames)
        self.register_buffer("keys", torch.zeros(0, d) if keys is None else keys.float())
        self.register_buffer("values", torch.zeros(0, n) if values is None else values.float())

    def use_templates(self, templates: Sequence[str]) -> None:
        self.templates = list(templates)
        text = handcrafted_text_features(self.backbone, self.classnames, self.templates).clone().float()
        self.register_buffer("text", text, persistent=False)

    def set_cache(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        self.keys = F.normalize(keys.float(), dim=-1)
        self.values = F.one_hot(labels.long(), len(self.classnames)).float()

    def text_features(self) -> torch.Tensor:
        return self.text

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return tip_logits(image_features, text_features, self.keys, self.values, self.alpha, self.beta)

    def logits_with(self, image_features: torch.Tensor, keys: torch.Tensor, alpha: float, beta: float):
        """The logits with other keys, alpha and beta (Tip-Adapter-F trains the keys)."""
        return tip_logits(image_features, self.text, keys, self.values, alpha, beta)


class TipAdapterMethod(MethodBase):
    name = "tip_adapter"
    needs = Needs(fitted=True, classifier="head", transfers=False)
    Options = TipAdapterOptions
    tied_to_classes = "a Tip-Adapter cache holds labels"

    def build(self, backbone, classnames, config) -> TipAdapter:
        return TipAdapter(backbone, classnames, [config.template])

    def fit(self, learner: TipAdapter, bb, ds, cfg, store) -> dict:
        options = parse_options(self.name, self.Options, cfg.method_options)
        s_beta, s_alpha, init_alpha, init_beta = options.resolved(ds.name)
        views = augmented_passes(bb, ds.train, options.augment_passes, cfg)
        learner.set_cache(views.mean(dim=1), torch.tensor([d.label for d in ds.train], device=bb.device))
        learner.alpha, learner.beta = init_alpha, init_beta
        selected, search, deviations = search_on_val(learner, bb, ds, cfg, store, options, s_beta, s_alpha,
                                                     init_alpha, init_beta, self.name)
        return {"selected": selected, "search": search, "deviations": deviations,
                "options": {"search_scale": [s_beta, s_alpha], "init_alpha": init_alpha, "init_beta": init_beta,
                            "augment_passes": options.augment_passes, "search_rule": options.search_rule}}


def augmented_passes(bb, items, passes: int, cfg) -> torch.Tensor:
    """(N, passes, d) raw features of ``items`` under Tip's augmentation (RandomResizedCrop scale (0.5, 1),
    flip), one pass after the other in list order; the draws follow the run's seed."""
    tf = train_transform(**bb.preprocess.train_args(), scale=(0.5, 1.0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        out = [encode_items(bb, items, tf, cfg.test_batch_size, 0, desc=f"cache pass {i + 1}/{passes}",
                            progress=cfg.progress)[0] for i in range(passes)]
    return torch.stack(out, dim=1)


def search_on_val(learner: TipAdapter, bb, ds, cfg, store, options, s_beta, s_alpha, init_alpha, init_beta,
                  name: str) -> tuple[dict, dict, list[Deviation]]:
    """Tip's alpha/beta search on the few-shot val split (never on test); sets them on ``learner``.

    Returns (selected values, the search record ``{"validated": bool, ...}``, deviations)."""
    deviations = [Deviation(f"{name}.subsets", "CoOp's few-shot training subset", "its own sampling", "official code")]
    selected = {"alpha": init_alpha, "beta": init_beta, "val_accuracy": None}
    reason = unvalidated_reason(options, ds)
    if reason is not None:
        deviations.append(Deviation(f"{name}.search", "not run", "alpha/beta searched", "official code",
                                    f"alpha/beta not searched on {ds.name}, {reason}; the initial alpha={init_alpha}, "
                                    f"beta={init_beta} are kept"))
        return selected, {"validated": False, "reason": reason}, deviations
    vf, vy = store.get(bb, ds.val, cfg, desc="encoding validation images", dataset=ds.name)
    alpha, beta, acc = search_alpha_beta(vf, vy.to(vf.device), learner.text, learner.keys, learner.values,
                                         s_beta, s_alpha, init_alpha, init_beta, options.search_rule, cfg.progress)
    learner.alpha, learner.beta = alpha, beta
    selected = {"alpha": alpha, "beta": beta, "val_accuracy": acc}
    deviations.append(Deviation(f"{name}.search_split", "CoOp's few-shot val subset", "the full val split",
                                "official code (main.py)", "the split alpha/beta are searched on"))
    if options.search_rule != "official":
        deviations.append(Deviation("method_options.search_rule", options.search_rule, "official", "official code",
                                    "the initial alpha/beta kept unless a grid pair is strictly better (Tip: the "
                                    "best grid pair; the initial pair is never scored)"))
    return selected, {"validated": True, "split": "val", "n_images": len(ds.val), "rule": options.search_rule,
                      "val_accuracy": acc}, deviations


def unvalidated_reason(options, ds) -> Optional[str]:
    """Why alpha and beta are not searched on this dataset, or None when they are."""
    if not options.search:
        return "search turned off (option search=false)"
    if ds.name == "imagenet":
        return "no validation split (ImageNet's val split is its test split; Tip searches on it)"
    if not ds.val:
        return "no validation split"
    return None
