"""The straightforward text-encoder computation, kept as the reference for tests and benchmarks.

It is what the official CoOp code does: every prompt padded to the full context (77 tokens), open_clip's
own blocks with the full causal mask, then pooling at the EOT token. Learners use `text.fast`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..backbones.backbone import Backbone


def _run_blocks(bb: Backbone, x: torch.Tensor, length: int) -> torch.Tensor:
    tower = bb.text
    mask = tower.attn_mask[:length, :length].to(x.dtype)
    if not tower.batch_first:
        x = x.transpose(0, 1)
    for block in tower.blocks:
        x = block(x, attn_mask=mask)
    if not tower.batch_first:
        x = x.transpose(0, 1)
    return x


def reference_encode(bb: Backbone, prompts: torch.Tensor, eot_idx: torch.Tensor) -> torch.Tensor:
    """The official CoOp computation: all ``context_length`` tokens through every layer, then pool."""
    length = bb.context_length
    x = prompts.to(bb.dtype) + bb.text.positional_embedding.to(bb.dtype)
    x = _run_blocks(bb, x, length)
    x = bb.text.ln_final(x)
    rows = x[torch.arange(x.shape[0], device=x.device), eot_idx]
    return bb.text.project(rows).float()
