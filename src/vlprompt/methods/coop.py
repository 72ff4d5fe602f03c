"""CoOp: cross-entropy on image-text cosine logits, nothing else (KaiyangZhou/CoOp, trainers/coop.py)."""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F

from ..prompts.coop import CoOp
from .base import MethodBase, MethodConfig, Needs, Objective


class CoOpObjective(Objective):
    def loss(self, learner: CoOp, batch):
        logits = learner(batch.views["weak"])
        loss = F.cross_entropy(logits, batch.labels)
        return loss, {"loss": loss.detach(), "logits": logits.detach()}


class CoOpMethod(MethodBase):
    name = "coop"
    needs = Needs()  # a class-specific context (csc) is the exception: it cannot move to other class names

    def build(self, backbone, classnames: Sequence[str], config: MethodConfig) -> CoOp:
        return CoOp(backbone, classnames, **config.layout.kwargs())

    def objective(self, learner: CoOp, config: MethodConfig) -> CoOpObjective:
        return CoOpObjective(config.options)
