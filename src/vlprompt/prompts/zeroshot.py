"""Zero-shot CLIP with one hand-crafted template or a template ensemble."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..backbones.backbone import Backbone
from .base import TextClassifier
from .templates import DEFAULT_TEMPLATE, format_prompts


def handcrafted_text_features(bb: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, d) normalised features: each template's normalised features averaged, then re-normalised."""
    total = 0
    for template in templates:
        total = total + F.normalize(bb.encode_texts(format_prompts(template, classnames)), dim=-1)
    return F.normalize(total / len(templates), dim=-1)


class ZeroShotCLIP(TextClassifier):
    """Zero-shot classifier; its text features are computed once at construction."""

    def __init__(self, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str] = (DEFAULT_TEMPLATE,)):
        super().__init__()
        self.__dict__["backbone"] = backbone  # not a submodule: the frozen model is never part of our state
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.register_buffer("weights", handcrafted_text_features(backbone, self.classnames, self.templates))

    def text_features(self) -> torch.Tensor:
        return self.weights

