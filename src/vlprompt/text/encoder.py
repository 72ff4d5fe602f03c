"""The straightforward text-encoder computation: every prompt at the full context length (77 tokens for CLIP),
open_clip's own blocks with the tower's mask (the causal one, or none for a bidirectional tower), then pooling.

It is what the official CoOp code does, kept as the reference for tests and benchmarks. Learners use `text.fast`
(causal towers) or `text.dense` (bidirectional towers, which compute every position of every prompt as this does,
from the blocks' parts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

if TYPE_CHECKING:
    from ..backbones.backbone import Backbone


def _run_blocks(bb: Backbone, x: torch.Tensor, length: int, deep: Sequence[Optional[torch.Tensor]] = ()) -> torch.Tensor:
    tower = bb.text
    mask = tower.attn_mask[:length, :length].to(x.dtype) if tower.causal else None
    if not tower.batch_first:
        x = x.transpose(0, 1)
    seq = 1 if tower.batch_first else 0
    s = bb.n_start
    for i, block in enumerate(tower.blocks):
        if 0 < i < len(deep) and deep[i] is not None:  # rows after the start tokens replaced at the block's input
            n = deep[i].shape[0]
            rows = deep[i].to(x.dtype).unsqueeze(1 - seq).expand(*((-1, x.shape[1]) if seq == 0 else (x.shape[0], -1)), -1)
            x = torch.cat([x.narrow(seq, 0, s), rows, x.narrow(seq, s + n, x.shape[seq] - s - n)], dim=seq)
        x = block(x, attn_mask=mask)
    if not tower.batch_first:
        x = x.transpose(0, 1)
    return x


def reference_encode(bb: Backbone, prompts: torch.Tensor, eot_idx: torch.Tensor,
                     deep: Sequence[Optional[torch.Tensor]] = ()) -> torch.Tensor:
    """The official CoOp computation: all ``context_length`` tokens through every layer, then pool. ``deep[i]``
    (N, D) for i >= 1 replaces the N rows after the start tokens (SOS) at the input of block i, as the deep-prompt
    code does."""
    length = bb.context_length
    x = prompts.to(bb.dtype) + bb.text.positional_embedding.to(bb.dtype)
    x = _run_blocks(bb, x, length, deep)
    x = bb.text.ln_final(x)
    rows = x[torch.arange(x.shape[0], device=x.device), eot_idx]
    return bb.text.project(rows).float()

