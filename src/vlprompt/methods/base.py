"""What a method is: how it builds its learner from a backbone and a label space, and its loss."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..backbones.backbone import Backbone


class Method(Protocol):
    name: str
    trains: bool  # False for zero-shot baselines

    def build(self, backbone: Backbone, classnames: Sequence[str], cfg, dataset) -> torch.nn.Module:
        """The learner for ``classnames`` (``cfg`` is a RunConfig, ``dataset`` the DatasetSplits)."""

    def loss(self, learner: torch.nn.Module, image_features: torch.Tensor, labels: torch.Tensor
             ) -> tuple[torch.Tensor, dict]:
        """(scalar loss, logged terms); the terms may include the batch ``logits``."""

    def load(self, path: str, backbone: Backbone, classnames: Sequence[str]) -> torch.nn.Module:
        """A saved learner, rebuilt for ``classnames``."""
