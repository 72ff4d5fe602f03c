"""What every classifier built from class text features shares: cosine logits at CLIP's scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TextClassifier(nn.Module):
    """Subclasses provide ``text_features()`` -> (C, d) normalised, and set ``self.backbone``. A learner whose
    image features depend on its parameters sets ``from_pixels`` and provides ``image_features(images)``: it
    is trained from pixels and evaluated from images (`engine.evaluate.image_logits`)."""

    from_pixels = False

    def text_features(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """logit_scale * normalise(image_features) @ text_features.T."""
        return self.backbone.logit_scale * F.normalize(image_features.float(), dim=-1) @ text_features.T

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits(image_features, self.text_features())
