"""IVLP (independent deep prompts in both towers), VPT-deep (image tower only, fixed text) and deep language
prompting (text tower only): cross-entropy on the cosine logits of the prompted towers. One learner
(`prompts.deep.DeepPrompts`); each method is its Options: the whole configuration of the learner, which is
also what its saved prompt records. Recipes (context lengths, depths, lr, epochs, batch 4) come from the recipe
table; the defaults here are the base-to-new recipes of the MaPLe paper's baselines."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch.nn.functional as F

from ..errors import VlpromptError
from ..prompts.deep import ROUNDINGS, DeepPrompts
from .base import MethodBase, MethodConfig, Needs, Objective, option

# Help texts shared by the three Options classes (each declares its own defaults).
_ROUNDING_HELP = ("fp16: round every prompt to fp16 where it enters a tower, as the official code's casts do | "
                  "none: use the float32 values")
_N_TEXT_HELP = "learned text rows per block (the first of them start from ctx_init)"
_N_VISION_HELP = "learned image tokens per block"
_DEPTH_HELP = "{} blocks that get fresh prompts at their input (1: the first only)"
_PHRASE_HELP = ("phrase whose first n_ctx_text tokens start the text context (the rest stays fixed; ignored when "
                "n_ctx_text > 4, as in the official code)")


def _check(method: str, options, fields: dict) -> None:
    for key, least in fields.items():
        value = getattr(options, key)
        if not isinstance(value, int) or value < least:
            raise VlpromptError(f"method {method}: option {key} must be an integer >= {least}, got {value!r}")
    if options.prompt_rounding not in ROUNDINGS:
        raise VlpromptError(f"method {method}: option prompt_rounding must be one of {list(ROUNDINGS)}, "
                            f"got {options.prompt_rounding!r}")


@dataclass(frozen=True)
class IVLPOptions:
    n_ctx_text: int = option(2, _N_TEXT_HELP)
    n_ctx_vision: int = option(2, _N_VISION_HELP)
    depth_text: int = option(12, _DEPTH_HELP.format("text"))
    depth_vision: int = option(12, _DEPTH_HELP.format("image"))
    ctx_init: Optional[str] = option("a photo of a", _PHRASE_HELP)
    prompt_rounding: str = option("fp16", _ROUNDING_HELP)

    def __post_init__(self):
        _check("ivlp", self, {"n_ctx_text": 1, "n_ctx_vision": 1, "depth_text": 1, "depth_vision": 1})


@dataclass(frozen=True)
class DeepLanguageOptions:
    n_ctx_text: int = option(4, _N_TEXT_HELP)
    depth_text: int = option(12, _DEPTH_HELP.format("text"))
    ctx_init: Optional[str] = option("a photo of a", _PHRASE_HELP)
    prompt_rounding: str = option("fp16", _ROUNDING_HELP)

    def __post_init__(self):
        _check("deep_language", self, {"n_ctx_text": 1, "depth_text": 1})


@dataclass(frozen=True)
class VPTDeepOptions:
    n_ctx_vision: int = option(8, _N_VISION_HELP)
    depth_vision: int = option(12, _DEPTH_HELP.format("image"))
    text_template: str = option("a photo of a {}.", "the fixed hand-crafted prompt of every class (the official "
                                "code uses this one for every dataset)")
    prompt_rounding: str = option("fp16", _ROUNDING_HELP)

    def __post_init__(self):
        _check("vpt_deep", self, {"n_ctx_vision": 1, "depth_vision": 1})
        from ..config import check_template

        check_template(self.text_template)


class DeepPromptObjective(Objective):
    """Cross-entropy on the prompted logits; images through the prompted tower where there are visual prompts."""

    def loss(self, learner: DeepPrompts, batch):
        x = batch.pixels["weak"] if learner.from_pixels else batch.views["weak"]
        logits = learner(x)
        loss = F.cross_entropy(logits, batch.labels)
        return loss, {"loss": loss.detach(), "logits": logits.detach()}


class DeepPromptMethod(MethodBase):
    """The three deep-prompt methods differ only in their Options (and so in which towers they prompt)."""

    def __init__(self, name: str, options: type, prompts_image: bool):
        self.name, self.Options = name, options
        # Prompted image features depend on the parameters: trained from pixels, evaluated from images.
        self.needs = Needs(pixels=prompts_image, cacheable_features=not prompts_image)

    def build(self, backbone, classnames: Sequence[str], config: MethodConfig) -> DeepPrompts:
        return DeepPrompts(backbone, classnames, config.options, self.name)

    def objective(self, learner: DeepPrompts, config: MethodConfig) -> DeepPromptObjective:
        return DeepPromptObjective(config.options)


def trainable_count(learner: DeepPrompts) -> int:
    return sum(math.prod(p.shape) for p in learner.parameters() if p.requires_grad)
