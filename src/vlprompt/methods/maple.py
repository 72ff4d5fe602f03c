"""MaPLe (multi-modal prompt learning): deep text prompts coupled to deep image prompts. The text tower gets
IVLP's rows (the context T_0 after the start token, from the first ``n_ctx`` tokens of ``ctx_init``; fresh rows
T_i at the input of blocks 1 <= i < ``depth``); the image tower gets no parameters of its own: its layer-0 tokens
are V_0 = proj(T_0) and its block-i tokens V_i = F_i(T_i), through a shared first projection and one coupling per
deeper block (all F_i start as copies of one freshly initialised layer, as in the official code). Cross-entropy
on the cosine logits. Vision prompts depend on the parameters: trained from pixels, evaluated from images.

The official code keeps T_0 and proj in fp16 (its fp16 setting is the only one that runs); vlprompt keeps float32
master weights (a recorded deviation) and, with ``prompt_rounding=fp16``, uses fp16-rounded values where the
official code's fp16 tensors enter the towers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import nn

from ..prompts.deep import DeepPrompts
from .base import MethodConfig, option
from .deep_prompts import _PHRASE_HELP, _ROUNDING_HELP, DeepPromptMethod, _check


@dataclass(frozen=True)
class MaPLeOptions:
    n_ctx: int = option(2, "learned text rows per block; each block's image tokens are projected from them")
    depth: int = option(9, "blocks of each tower that get fresh prompts at their input (1: the first only)")
    ctx_init: Optional[str] = option("a photo of a", _PHRASE_HELP.replace("n_ctx_text", "n_ctx"))
    prompt_rounding: str = option("fp16", _ROUNDING_HELP)

    def __post_init__(self):
        _check("maple", self, {"n_ctx": 1, "depth": 1})

    # The text half is IVLP's text prompts under these names (read by `DeepPrompts`).
    @property
    def n_ctx_text(self) -> int:
        return self.n_ctx

    @property
    def depth_text(self) -> int:
        return self.depth


class MaPLePrompts(DeepPrompts):
    """`DeepPrompts` text prompts plus the couplings that make the image prompts from them."""

    def __init__(self, backbone, classnames: Sequence[str], options: MaPLeOptions, method: str = "maple"):
        super().__init__(backbone, classnames, options, method)
        width = self._image_width("depth", self.depth_text)
        self.n_vision, self.depth_vision, self.from_pixels = self.n_text, self.depth_text, True
        self.proj = nn.Linear(backbone.ctx_dim, width).to(backbone.device)
        first = nn.Linear(backbone.ctx_dim, width).to(backbone.device)
        self.couplings = nn.ModuleList([copy.deepcopy(first) for _ in range(self.depth_text - 1)])

    def vision_prompts(self) -> list:
        """V_0 = proj(T_0) (fp16 tensors in the official code: inputs, weights and result rounded) and
        V_i = F_i(T_i) (computed in float32 there, rounded where it enters the tower)."""
        r = self._round
        first = r(F.linear(r(self.ctx), r(self.proj.weight), r(self.proj.bias)))
        return [first] + [r(f(t)) for f, t in zip(self.couplings, self.text_deep)]


class MaPLeMethod(DeepPromptMethod):
    def __init__(self):
        super().__init__("maple", MaPLeOptions, prompts_image=True)

    def build(self, backbone, classnames: Sequence[str], config: MethodConfig) -> MaPLePrompts:
        return MaPLePrompts(backbone, classnames, config.options, self.name)
