"""CLIP-Adapter (gaopengcuhk/CLIP-Adapter, which ships no recipe: docs/recipes.md): a residual bottleneck MLP
on the image features, classified against the frozen hand-crafted text features of the dataset's template.

    A(f) = ReLU(W2 ReLU(W1 f)),  W1: d -> d / reduction, W2: d / reduction -> d, no biases
    f' = ratio A(f) + (1 - ratio) f,  logits = logit_scale * cos(f', w_c)

Defaults follow the official file: reduction 4, ratio 0.2. The official code hard-codes d = 1024 (RN50);
here d is the backbone's embedding width. The repository ships no recipe: CoOp's (SGD 0.002, batch 32,
epochs by shots, cosine with one warm-up epoch) is used, as its README implies, and recorded as such.
The adapter acts on image features only, so a trained adapter transfers to other class names (their
text features are rebuilt with the target dataset's template).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VlpromptError
from ..prompts.base import TextClassifier
from ..prompts.zeroshot import handcrafted_text_features
from .base import MethodBase, Needs, Objective, option


@dataclass
class ClipAdapterOptions:
    reduction: int = option(4, "bottleneck width d / reduction (official: 4)")
    ratio: float = option(0.2, "residual ratio of the adapter's output (official: 0.2)")

    def __post_init__(self):
        if self.reduction < 1:
            raise VlpromptError(f"option reduction: must be >= 1, got {self.reduction}")
        if not 0.0 <= self.ratio <= 1.0:
            raise VlpromptError(f"option ratio: must be in [0, 1], got {self.ratio}")


class ClipAdapter(TextClassifier):
    method = "clip_adapter"

    def __init__(self, backbone, classnames: Sequence[str], templates: Sequence[str], reduction: int = 4,
                 ratio: float = 0.2):
        super().__init__()
        self.__dict__["backbone"] = backbone
        self.classnames, self.reduction, self.ratio = list(classnames), int(reduction), float(ratio)
        d = backbone.embed_dim
        hidden = max(1, d // self.reduction)
        self.down = nn.Linear(d, hidden, bias=False).to(backbone.device)
        self.up = nn.Linear(hidden, d, bias=False).to(backbone.device)
        self.use_templates(templates)

    def use_templates(self, templates: Sequence[str]) -> None:
        self.templates = list(templates)
        text = handcrafted_text_features(self.backbone, self.classnames, self.templates).clone().float()
        self.register_buffer("text", text, persistent=False)

    def adapt(self, image_features: torch.Tensor) -> torch.Tensor:
        f = image_features.float()
        return self.ratio * F.relu(self.up(F.relu(self.down(f)))) + (1.0 - self.ratio) * f

    def text_features(self) -> torch.Tensor:
        return self.text

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return super().logits(self.adapt(image_features), text_features)


class ClipAdapterObjective(Objective):
    def loss(self, learner: ClipAdapter, batch):
        logits = learner(batch.views["weak"])
        loss = F.cross_entropy(logits, batch.labels)
        return loss, {"loss": loss.detach(), "logits": logits.detach()}


class ClipAdapterMethod(MethodBase):
    name = "clip_adapter"
    needs = Needs(classifier="head")  # a head over image features; the classes stay text, so it transfers
    Options = ClipAdapterOptions

    def build(self, backbone, classnames, config) -> ClipAdapter:
        return ClipAdapter(backbone, classnames, [config.template], config.options.reduction, config.options.ratio)

    def objective(self, learner, config) -> ClipAdapterObjective:
        return ClipAdapterObjective(config.options)
