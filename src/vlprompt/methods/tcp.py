"""TCP (textual-based class-aware prompt tuning): KgCoOp's loss, plus class-aware tokens made from the frozen
hand-crafted text features by a small meta-net (Linear -> QuickGELU -> Linear to n_ctx rows), which replace the
context rows at the input of text block ``class_layer`` (8 of 12 in the official code): blocks below it see the
shared context, blocks from it on see each class's own tokens. The image tower is frozen (features cacheable).

Prompt text and hand-crafted view follow the official per-dataset templates (``TCP_PROMPTS``, ``TCP_HAND``);
other datasets use "{}." and their own template. Adam with eps 1e-3 (the official README's fix for its fp16
parameters) and coupled weight decay 5e-4. The text tower runs the exact shared-prefix path: SOS and the context
are computed once for every class below ``class_layer``; from it on each class runs its own copy of them with its
class-aware rows in place of the context, cut at its EOT. A bidirectional tower (SigLIP) computes every class whole
(`text.dense`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VlpromptError
from ..prompts.base import TextClassifier
from ..prompts.templates import prompt_text
from ..prompts.zeroshot import handcrafted_text_features
from ..text.dense import encode_dense
from ..text.fast import encode_shared_prefix
from .base import MethodBase, MethodConfig, Needs, Objective, option

# The text after the n_ctx learned rows, per dataset (UCF101 and ImageNet: "a photo of a" sits where the rows go).
TCP_PROMPTS = {"oxford_pets": "{}, a type of pet.", "oxford_flowers": "{}, a type of flower.",
               "fgvc_aircraft": "{}, a type of aircraft.", "dtd": "{} texture.", "eurosat": "{}.",
               "stanford_cars": "{}, a type of car", "food101": "{}, a type of food.", "sun397": "{}.",
               "caltech101": "{}.", "ucf101": "person doing {}."}
# The hand-crafted view (the official `CUSTOM_TEMPLATES_ori`; three differ from CoOp's).
TCP_HAND = {"oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
            "fgvc_aircraft": "a photo of an aircraft {}.", "dtd": "a photo of a {}, a type of texture.",
            "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.",
            "food101": "a photo of a {}, a type of food.", "sun397": "a photo of a {}.",
            "caltech101": "a photo of a {}.", "ucf101": "a photo of a person doing {}."}


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


@dataclass(frozen=True)
class TCPOptions:
    n_ctx: int = option(4, "learned context rows (and class-aware rows the meta-net makes per class)")
    class_layer: int = option(8, "text block at whose input the class-aware rows replace the context rows")
    weight: float = option(8.0, "weight of the knowledge-guided term (a literal 8.0 in the official code)")
    adam_eps: float = option(1e-3, "Adam's epsilon (the official README sets 1e-3)")

    def __post_init__(self):
        if self.n_ctx < 1 or self.class_layer < 0 or self.weight < 0 or self.adam_eps <= 0:
            raise VlpromptError("method tcp: n_ctx >= 1, class_layer >= 0, weight >= 0 and adam_eps > 0 are needed")


class TCPPrompts(TextClassifier):
    def __init__(self, backbone, classnames: Sequence[str], options: TCPOptions, dataset: str = "",
                 template: str = "a photo of a {}."):
        super().__init__()
        if not classnames:
            raise VlpromptError("tcp needs at least one class name")
        if options.class_layer >= len(backbone.text.blocks):
            raise VlpromptError(f"tcp: class_layer={options.class_layer}, but the text tower of "
                                f"{backbone.source.name} has {len(backbone.text.blocks)} blocks")
        self.__dict__["backbone"] = backbone
        self.options, self.classnames = options, list(classnames)
        key = dataset.lower()
        self.prompt_template = TCP_PROMPTS.get(key, "{}.")
        self.hand_template = TCP_HAND.get(key, template)
        n, dim, dev = options.n_ctx, backbone.ctx_dim, backbone.device
        ctx = torch.empty(n, dim, device=dev)
        nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx)
        hidden = max(1, backbone.embed_dim // 4)
        self.meta_net = nn.Sequential(nn.Linear(backbone.embed_dim, hidden), QuickGELU(),
                                      nn.Linear(hidden, n * dim)).to(dev)
        names = [prompt_text(c) for c in self.classnames]
        hand = handcrafted_text_features(backbone, self.classnames, [self.hand_template]).clone().float()
        self.register_buffer("hand", hand, persistent=False)
        texts = [backbone.placeholder(n) + " " + self.prompt_template.format(c) for c in names]
        backbone.check_prompts_fit(texts, self.classnames)
        tokens = backbone.tokenize(texts)
        with torch.no_grad():
            embedded = backbone.text.token_embedding(tokens).float()
        s = backbone.n_start
        self.register_buffer("token_prefix", embedded[:, :s].clone(), persistent=False)
        self.register_buffer("token_suffix", embedded[:, s + n:].clone(), persistent=False)
        self.register_buffer("eot_idx", backbone.eot_index(tokens), persistent=False)

    def class_tokens(self) -> torch.Tensor:
        """(C, n_ctx, D) class-aware rows from the frozen hand-crafted features."""
        return self.meta_net(self.hand).view(len(self.classnames), self.options.n_ctx, -1)

    def text_features(self) -> torch.Tensor:
        rows = (self.options.class_layer, self.class_tokens())
        if not self.backbone.text.causal:  # bidirectional (SigLIP): every class whole, at full length
            c = len(self.classnames)
            prompts = torch.cat([self.token_prefix, self.ctx.expand(c, -1, -1), self.token_suffix], dim=1)
            return F.normalize(encode_dense(self.backbone, prompts, self.eot_idx, class_rows=rows), dim=-1)
        prefix = torch.cat([self.token_prefix[0], self.ctx])  # SOS + context: the same for every class
        own = self.eot_idx + 1 - prefix.shape[0]  # each class's tokens after the context, up to its EOT
        return F.normalize(encode_shared_prefix(self.backbone, prefix, self.token_suffix, own, class_rows=rows), dim=-1)


class TCPObjective(Objective):
    def loss(self, learner: TCPPrompts, batch):
        text = learner.text_features()
        logits = learner.logits(batch.views["weak"], text)
        ce = F.cross_entropy(logits, batch.labels)
        kg = 1.0 - F.cosine_similarity(text, learner.hand, dim=1, eps=1e-7).mean()
        loss = ce + self.options.weight * kg
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "kg": kg.detach(), "logits": logits.detach()}

    def optimizer(self, params, settings) -> torch.optim.Optimizer:
        """Dassl's Adam (L2 weight decay coupled, betas 0.9 / 0.999) with the official README's eps."""
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay, eps=self.options.adam_eps)


class TCPMethod(MethodBase):
    name = "tcp"
    needs = Needs()  # the image tower is untouched: frozen features are cached; the rows are rebuilt per label space
    Options = TCPOptions

    def build(self, backbone, classnames: Sequence[str], config: MethodConfig) -> TCPPrompts:
        return TCPPrompts(backbone, classnames, config.options, config.dataset, config.template)

    def objective(self, learner: TCPPrompts, config: MethodConfig) -> TCPObjective:
        return TCPObjective(config.options)
