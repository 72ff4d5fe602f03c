"""KgCoOp: CoOp kept close to the hand-crafted prompt (SPEC 2.7, htyao89/KgCoOp).

``L = CE(100 z W_s^T, y) + w * (1 - mean_c cos(w_c^s, w_c^h))`` with ``w = 8``; ``w^h`` are the frozen
hand-crafted features of the dataset's template, encoded once per run. The helpers here (options shared
with dual-view MI, building the learner) serve every method that pairs soft prompts with a hand-crafted view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import VlpromptError
from ..prompts.guided import GuidedCoOp
from ..prompts.templates import ensemble_templates
from .base import MethodBase, Objective, option

HAND_CHOICES = ("dataset", "ensemble")
KGCOOP_DTD_TEMPLATE = "a photo of a {}, a type of texture."  # KgCoOp's DTD template (SPEC 5.4)


@dataclass
class HandViewOptions:
    """Settings of the hand-crafted view, shared by KgCoOp and dual-view MI."""

    hand_templates: str = option("dataset", "dataset: the dataset's template (or --template) | "
                                            "ensemble: SPEC 2.7's 7 (+1)")
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

    def __post_init__(self):
        self.check_hand()
        if self.weight < 0:
            raise VlpromptError(f"option weight: must be >= 0, got {self.weight}")


class KgCoOpObjective(Objective):
    def __init__(self, options: KgCoOpOptions, dataset_name: str = "", template: str = ""):
        super().__init__(options)
        self.dataset_name, self.template = dataset_name, template

    def loss(self, learner: GuidedCoOp, batch):
        soft = learner.soft_features()
        logits = learner.logits(batch.views["weak"], soft)
        ce = F.cross_entropy(logits, batch.labels)
        kg = kg_term(soft, learner.hand)
        loss = ce + self.options.weight * kg
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "kg": kg.detach(), "logits": logits.detach()}

    @property
    def deviations(self) -> list[str]:
        out = []
        if self.options.hand_templates != "dataset":
            out.append("kgcoop: hand-crafted view from the template ensemble (KgCoOp: the dataset's template)")
        if self.dataset_name == "dtd" and self.template != KGCOOP_DTD_TEMPLATE:
            out.append(f"kgcoop on DTD: template '{self.template}' (KgCoOp used '{KGCOOP_DTD_TEMPLATE}'; "
                       "set --template to match)")
        if self.options.ensemble_hand:
            out.append(f"kgcoop: inference blends in the hand-crafted view, beta={self.options.ensemble_hand} "
                       "(KgCoOp: soft prompts only)")
        return out


class GuidedMethod(MethodBase):
    """Building and loading for the methods whose learner carries a frozen hand-crafted view (kgcoop,
    dualview_mi); a subclass sets ``name`` and ``Options`` and builds its objective."""

    name: str
    Options: type

    def build(self, backbone, classnames: Sequence[str], config) -> GuidedCoOp:
        return build_guided(backbone, classnames, config)

    def load(self, path, backbone, classnames=None, dataset=None, template: Optional[str] = None) -> GuidedCoOp:
        """The saved prompt for ``classnames``; given the evaluation ``dataset`` (cross-dataset transfer), its
        hand-crafted view follows that dataset's template as it did the training dataset's."""
        learner = GuidedCoOp.from_pretrained(path, backbone, classnames=classnames)
        if dataset is not None and learner.hand_view in HAND_CHOICES:
            templates = hand_templates(learner.hand_view, template or dataset.template, dataset.name)
            if templates != learner.templates:
                learner.use_templates(templates)
        return learner


class KgCoOpMethod(GuidedMethod):
    name = "kgcoop"
    Options = KgCoOpOptions

    def objective(self, learner: GuidedCoOp, config) -> KgCoOpObjective:
        return KgCoOpObjective(config.options, config.dataset, config.template)
