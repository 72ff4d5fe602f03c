"""KgCoOp: CoOp kept close to the hand-crafted prompt (htyao89/KgCoOp; recipe: docs/recipes.md).

``L = CE(100 z W_s^T, y) + w * (1 - mean_c cos(w_c^s, w_c^h))`` with ``w = 8``; ``w^h`` are the frozen
hand-crafted features of the dataset's template, encoded once per run. The helpers here (options shared
with dual-view MI, building the learner) serve every method that pairs soft prompts with a hand-crafted view.

KgCoOp encodes ``w^h`` with a second, half-precision copy of CLIP, even in its fp32 runs (its target is fp16).
vlprompt encodes it with the run's frozen backbone (``handcrafted_precision=backbone``, recorded as a deviation
in every run); ``fp16`` follows KgCoOp with a float16 copy of the text tower, and ``fp32`` / ``bf16`` use a copy
in that precision; the features are kept at that precision, as KgCoOp keeps its fp16 target. On a CPU, fp16 is
real float16 arithmetic, with a warning: float16 matrix products run about 100x slower than float32 on CPUs
without fast float16 kernels (the text tower took 2x its fp32 time on the project's CPU with PyTorch 2.13), and
emulating float16 by rounding in float32 came no closer to real float16 than fp32 did (random-weight towers).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import VlpromptError
from ..prompts import zeroshot
from ..prompts.guided import GuidedCoOp
from ..prompts.templates import ensemble_templates
from ..recipes.records import Deviation
from .base import MethodBase, Objective, option

HAND_CHOICES = ("dataset", "ensemble")
KGCOOP_DTD_TEMPLATE = "a photo of a {}, a type of texture."  # KgCoOp's DTD template (CoOp's: "{} texture.")
HAND_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HAND_PRECISIONS = ("backbone", *HAND_DTYPES)
log = logging.getLogger(__name__)


@dataclass
class HandViewOptions:
    """Settings of the hand-crafted view, shared by KgCoOp and dual-view MI."""

    hand_templates: str = option("dataset", "dataset: the dataset's template (or --template) | "
                                            "ensemble: CoOp's 7 ensemble templates (+ the dataset's)")
    ensemble_hand: float = option(0.0, "inference blend beta: normalize((1-beta) w^s + beta w^h); "
                                       "0 = soft prompts only")

    def check_hand(self) -> None:
        if self.hand_templates not in HAND_CHOICES:
            raise VlpromptError(f"option hand_templates: '{self.hand_templates}' is not one of {list(HAND_CHOICES)}")
        if not 0.0 <= self.ensemble_hand <= 1.0:
            raise VlpromptError(f"option ensemble_hand: must be in [0, 1], got {self.ensemble_hand}")


def hand_templates(view: str, template: str, dataset: str) -> list[str]:
    """The hand-crafted view's templates on ``dataset`` (its name): ``template``, or the ensemble around it."""
    return ensemble_templates(template, dataset) if view == "ensemble" else [template]


def build_guided(backbone, classnames: Sequence[str], config) -> GuidedCoOp:
    options = config.options
    templates = hand_templates(options.hand_templates, config.template, config.dataset)
    return GuidedCoOp(backbone, classnames, templates, method=config.method, ensemble_hand=options.ensemble_hand,
                      hand_view=options.hand_templates, **config.layout.kwargs())


def kg_term(soft: torch.Tensor, hand: torch.Tensor) -> torch.Tensor:
    """1 - mean over classes of cos(w_c^s, w_c^h); both inputs are (C, d)."""
    return 1.0 - F.cosine_similarity(soft, hand, dim=-1).mean()


@dataclass
class KgCoOpOptions(HandViewOptions):
    weight: float = option(8.0, "w, the weight of the knowledge-guided term (KgCoOp: 8.0)")
    handcrafted_precision: str = option("backbone", "the hand-crafted features' encoder: backbone (the run's "
                                                    "frozen encoder) | fp16 (KgCoOp's: a float16 copy) | fp32 | "
                                                    "bf16", official="fp16")

    def __post_init__(self):
        self.check_hand()
        if self.weight < 0:
            raise VlpromptError(f"option weight: must be >= 0, got {self.weight}")
        if self.handcrafted_precision not in HAND_PRECISIONS:
            raise VlpromptError(f"option handcrafted_precision: '{self.handcrafted_precision}' is not one of "
                                f"{list(HAND_PRECISIONS)}")


def resolve_hand_precision(option_value: str, bb) -> str:
    """The precision the hand-crafted features are encoded in, for ``bb``."""
    return bb.precision if option_value == "backbone" else option_value


class TextTowerAt:
    """A copy of ``bb``'s model without its image tower, cast to ``precision``, offering the ``encode_texts``
    that `zeroshot.handcrafted_text_features` calls."""

    def __init__(self, bb, precision: str):
        self.bb, self.dtype = bb, HAND_DTYPES[precision]
        visual = getattr(bb.model, "visual", None)
        memo = {} if visual is None else {id(visual): torch.nn.Identity()}  # the image tower is not copied
        self.model = copy.deepcopy(bb.model, memo).to(self.dtype)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = [self.model.encode_text(self.bb.tokenize(texts[i:i + batch_size]))
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out).float()


def encode_hand(bb, classnames: Sequence[str], templates: Sequence[str], precision: str) -> torch.Tensor:
    """(C, d) hand-crafted features encoded by a ``precision`` copy of the text tower and kept at that
    precision (KgCoOp's target is float16)."""
    if precision == "fp16" and bb.device.type == "cpu":
        log.warning("kgcoop: hand-crafted features encoded in float16 on the CPU, as KgCoOp does on GPU; this can "
                    "be slow on CPUs without fast float16 kernels (handcrafted_precision=fp32 is faster)")
    tower = TextTowerAt(bb, precision)
    return zeroshot.handcrafted_text_features(tower, classnames, templates).to(tower.dtype).float()


class KgCoOpObjective(Objective):
    def __init__(self, options: KgCoOpOptions, dataset_name: str = "", template: str = "",
                 hand_precision: Optional[str] = None):
        super().__init__(options)
        self.dataset_name, self.template = dataset_name, template
        self.hand_precision = hand_precision  # the precision the hand-crafted features were encoded in

    def loss(self, learner: GuidedCoOp, batch):
        soft = learner.soft_features()
        logits = learner.logits(batch.views["weak"], soft)
        ce = F.cross_entropy(logits, batch.labels)
        kg = kg_term(soft, learner.hand)
        loss = ce + self.options.weight * kg
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "kg": kg.detach(), "logits": logits.detach()}

    @property
    def deviations(self) -> list[Deviation]:
        out = []
        if self.hand_precision not in (None, "fp16"):
            out.append(Deviation("kgcoop.hand_precision", self.hand_precision, "fp16", "official code",
                                 "the hand-crafted text features' precision: KgCoOp encodes them with an fp16 copy of "
                                 "CLIP, even in fp32 runs (option handcrafted_precision=fp16 follows it)"))
        if self.options.hand_templates != "dataset":
            out.append(Deviation("kgcoop.hand_templates", self.options.hand_templates, "dataset", "official code",
                                 "the hand-crafted view comes from the template ensemble"))
        if self.dataset_name == "dtd" and self.template != KGCOOP_DTD_TEMPLATE:
            out.append(Deviation("template", self.template, KGCOOP_DTD_TEMPLATE, "official code",
                                 "KgCoOp's DTD template differs from CoOp's; set --template to match"))
        if self.options.ensemble_hand:
            out.append(Deviation("kgcoop.ensemble_hand", self.options.ensemble_hand, 0.0, "official code",
                                 "inference blends in the hand-crafted view (KgCoOp: soft prompts only)"))
        return out


class GuidedMethod(MethodBase):
    """Building for the methods whose learner carries a frozen hand-crafted view (kgcoop, dualview_mi); a subclass
    sets ``name`` and ``Options`` and builds its objective. On another dataset (cross-dataset transfer) the view
    follows that dataset's template, as it did the training dataset's (`MethodConfig` of the target)."""

    name: str
    Options: type

    def build(self, backbone, classnames: Sequence[str], config) -> GuidedCoOp:
        return build_guided(backbone, classnames, config)


class KgCoOpMethod(GuidedMethod):
    name = "kgcoop"
    Options = KgCoOpOptions

    def build(self, backbone, classnames: Sequence[str], config) -> GuidedCoOp:
        learner = super().build(backbone, classnames, config)
        precision = resolve_hand_precision(config.options.handcrafted_precision, backbone)
        if precision != backbone.precision:  # else the learner's own encoding is already this one
            learner.hand = encode_hand(backbone, learner.classnames, learner.templates, precision)
        return learner

    def objective(self, learner: GuidedCoOp, config) -> KgCoOpObjective:
        precision = resolve_hand_precision(config.options.handcrafted_precision, learner.backbone)
        return KgCoOpObjective(config.options, config.dataset, config.template, hand_precision=precision)
