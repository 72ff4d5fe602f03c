"""PromptSRC (self-regulating prompts): IVLP prompts in both towers, regulated by the frozen model.

Loss on each batch: CE(l_p, y) + text_loss_weight * mean|g_p - g_zs| + image_loss_weight * mean|f_p - f_zs|
+ sum(p_zs (log p_zs - log p_p)) / (B C), where f_p, g_p are the prompted (normalised) image and text features,
l_p their logits, f_zs the frozen tower's normalised features of the same augmented batch (the same backbone,
prompts off: `TrainBatch.encode`), g_zs each class's mean of the 60 hand-crafted templates' unnormalised frozen
text features, normalised (computed once per run), and p_zs the softmax of logit_scale * f_zs g_zs^T. The KL term
is divided by B * C, as the official code does.

Gaussian-weighted prompt aggregation: at the end of epoch e (1-based) every prompt tensor, weighted by
N(e; gpa_mean, gpa_std), is added to a running sum that is part of the objective's checkpointed state; after the
last epoch the prompts become sum / total weight (the official weights normalised over all epochs: the same
result). Only the prompt parameters are aggregated (the official code sums the whole model state, frozen weights
included, in their own dtypes: a recorded deviation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import VlpromptError
from ..prompts.deep import DeepPrompts
from ..prompts.templates import PROMPTSRC_TEMPLATES, prompt_text
from ..recipes.records import Deviation
from .base import MethodConfig, Objective, option
from .deep_prompts import (_DEPTH_HELP, _N_TEXT_HELP, _N_VISION_HELP, _PHRASE_HELP, _ROUNDING_HELP, DeepPromptMethod,
                           _check)


@dataclass(frozen=True)
class PromptSRCOptions:
    n_ctx_text: int = option(4, _N_TEXT_HELP)
    n_ctx_vision: int = option(4, _N_VISION_HELP)
    depth_text: int = option(9, _DEPTH_HELP.format("text"))
    depth_vision: int = option(9, _DEPTH_HELP.format("image"))
    ctx_init: Optional[str] = option("a photo of a", _PHRASE_HELP)
    prompt_rounding: str = option("fp16", _ROUNDING_HELP)
    text_loss_weight: float = option(25.0, "weight of the L1 distance between prompted and template text features")
    image_loss_weight: float = option(10.0, "weight of the L1 distance between prompted and frozen image features")
    gpa_mean: float = option(15.0, "mean (in epochs, 1-based) of the Gaussian that weights each epoch's prompts")
    gpa_std: float = option(1.0, "spread (in epochs) of that Gaussian")

    def __post_init__(self):
        _check("promptsrc", self, {"n_ctx_text": 1, "n_ctx_vision": 1, "depth_text": 1, "depth_vision": 1})
        if self.gpa_std <= 0 or self.text_loss_weight < 0 or self.image_loss_weight < 0:
            raise VlpromptError("method promptsrc: gpa_std must be > 0 and the loss weights >= 0")


def gpa_weight(epoch: int, mean: float, std: float) -> float:
    """N(epoch; mean, std), the unnormalised weight of 1-based ``epoch``."""
    return math.exp(-0.5 * ((epoch - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


@torch.no_grad()
def template_teacher(bb, classnames: Sequence[str], templates: Sequence[str] = PROMPTSRC_TEMPLATES) -> torch.Tensor:
    """(C, d): per class, the mean of the templates' unnormalised frozen text features, normalised."""
    names = [prompt_text(c) for c in classnames]
    total = sum(bb.encode_texts([t.format(n) for n in names]) for t in templates)
    return F.normalize(total / len(templates), dim=-1).clone()


class PromptSRCObjective(Objective):
    def __init__(self, options: PromptSRCOptions, learner: DeepPrompts):
        super().__init__(options)
        self.text_teacher = template_teacher(learner.backbone, learner.classnames)
        self.sum: Optional[dict] = None  # name -> running weighted sum of the prompt tensors
        self.total = 0.0

    def loss(self, learner: DeepPrompts, batch):
        o = self.options
        images = batch.pixels["weak"]
        img = F.normalize(learner.image_features(images), dim=-1)
        txt = learner.text_features()
        logits = learner.backbone.logit_scale * img @ txt.T
        with torch.no_grad():
            frozen = F.normalize(batch.encode(images), dim=-1)
            zs_logits = learner.backbone.logit_scale * frozen @ self.text_teacher.T
        ce = F.cross_entropy(logits, batch.labels)
        text_l1 = (txt - self.text_teacher).abs().mean()
        image_l1 = (img - frozen).abs().mean()
        log_zs = F.log_softmax(zs_logits, dim=-1)
        kl = F.kl_div(F.log_softmax(logits, dim=-1), log_zs, reduction="sum", log_target=True) / logits.numel()
        loss = ce + o.text_loss_weight * text_l1 + o.image_loss_weight * image_l1 + kl
        terms = {"loss": loss.detach(), "ce": ce.detach(), "text_l1": text_l1.detach(),
                 "image_l1": image_l1.detach(), "kl": kl.detach(), "logits": logits.detach()}
        return loss, terms

    def on_epoch_end(self, epoch: int, learner) -> None:
        w = gpa_weight(epoch + 1, self.options.gpa_mean, self.options.gpa_std)
        params = {k: p.detach() for k, p in learner.named_parameters() if p.requires_grad}
        if self.sum is None:  # float64: the weights of epochs far from the mean are tiny (e^-98 at 14 spreads)
            self.sum = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
        for k, p in params.items():
            self.sum[k] = self.sum[k].to(p.device)  # restored from a checkpoint on the CPU
            self.sum[k].add_(p.double(), alpha=w)
        self.total += w

    def on_train_end(self, learner) -> None:
        if self.sum is None or self.total <= 0:
            return
        with torch.no_grad():
            for k, p in learner.named_parameters():
                if k in self.sum:
                    p.copy_((self.sum[k] / self.total).to(p.dtype))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "gpa_sum": self.sum, "gpa_total": self.total}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = state.get("gpa_sum")
        self.sum = None if saved is None else {k: v.clone() for k, v in saved.items()}
        self.total = float(state.get("gpa_total", 0.0))

    @property
    def deviations(self) -> list:
        return [Deviation("promptsrc.gpa_scope", "prompt parameters", "the whole model state", "official code",
                          "Gaussian prompt aggregation sums only the learned prompts (the official code also sums "
                          "the frozen weights, in their own precision)"),
                Deviation("promptsrc.teacher_precision", "the backbone's precision", "fp32 text, fp16 image",
                          "official code", "the frozen teacher is the run's own backbone with its prompts off")]


class PromptSRCMethod(DeepPromptMethod):
    def __init__(self):
        super().__init__("promptsrc", PromptSRCOptions, prompts_image=True)

    def objective(self, learner: DeepPrompts, config: MethodConfig) -> PromptSRCObjective:
        return PromptSRCObjective(config.options, learner)
