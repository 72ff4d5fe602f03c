"""CoOp with a frozen hand-crafted view of every class (KgCoOp, dual-view MI; docs/reconstructions.md).

Besides the learned context, the learner holds the normalised hand-crafted text features ``w^h`` of its
classes, encoded once by the frozen model at construction (and again only when the prompt is rebuilt for
another label space, e.g. the new classes of base-to-new). Training objectives read ``soft_features()``
and ``hand``; inference uses ``text_features()``: the soft prompts, or with ``ensemble_hand = beta > 0``
the blend ``normalize((1 - beta) w^s + beta w^h)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..backbones.backbone import Backbone
from ..errors import VlpromptError
from . import zeroshot
from .coop import CoOp


class GuidedCoOp(CoOp):
    """CoOp plus frozen hand-crafted features from ``templates`` (averaged when there are several)."""

    def __init__(self, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                 method: str = "kgcoop", ensemble_hand: float = 0.0, n_ctx: int = 4,
                 ctx_init: Optional[str] = "a photo of a", csc: bool = False, class_token_position: str = "end",
                 hand_view: Optional[str] = None, ctx_init_rule: str = "words"):
        super().__init__(backbone, classnames, n_ctx=n_ctx, ctx_init=ctx_init, csc=csc,
                         class_token_position=class_token_position, ctx_init_rule=ctx_init_rule)
        if not 0.0 <= float(ensemble_hand) <= 1.0:
            raise VlpromptError(f"ensemble_hand: must be in [0, 1], got {ensemble_hand}")
        self.method = method
        self.ensemble_hand = float(ensemble_hand)
        self.hand_view = hand_view  # "dataset" or "ensemble": how the templates follow a target dataset
        self.use_templates(templates)

    def use_templates(self, templates: Sequence[str]) -> None:
        """Encode the hand-crafted view of the classes with ``templates`` (once)."""
        if not templates or any("{}" not in t for t in templates):
            raise VlpromptError(f"hand-crafted templates must each contain '{{}}', got {list(templates)!r}")
        self.templates = list(templates)
        # Looked up through the module so tests can count the calls; .clone() leaves inference mode.
        hand = zeroshot.handcrafted_text_features(self.backbone, self.classnames, self.templates).clone()
        self.register_buffer("hand", hand.float(), persistent=False)

    def soft_features(self) -> torch.Tensor:
        """(C, d) normalised soft-prompt features, differentiable with respect to the context."""
        return super().text_features()

    def text_features(self) -> torch.Tensor:
        """The inference rule: soft prompts, or their blend with the hand-crafted view."""
        soft = self.soft_features()
        if self.ensemble_hand == 0.0:
            return soft
        return F.normalize((1.0 - self.ensemble_hand) * soft + self.ensemble_hand * self.hand, dim=-1)
