"""The straightforward text-encoder computation: every prompt at the full context length (77 tokens for CLIP),
open_clip's own blocks with the tower's mask (the causal one, or none for a bidirectional tower), then pooling.

For a causal tower it is what the official CoOp code does, kept as the reference for tests and benchmarks (learners
use `text.fast`). For a bidirectional tower (SigLIP) it is the only exact path (`encode_dense`): every position sees
every other, padding included, so no prompt may be cut or share a prefix.
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
    for i, block in enumerate(tower.blocks):
        if 0 < i < len(deep) and deep[i] is not None:  # rows 1..N (after SOS) replaced at the block's input
            n = deep[i].shape[0]
            rows = deep[i].to(x.dtype).unsqueeze(1 - seq).expand(*((-1, x.shape[1]) if seq == 0 else (x.shape[0], -1)), -1)
            x = torch.cat([x.narrow(seq, 0, 1), rows, x.narrow(seq, 1 + n, x.shape[seq] - 1 - n)], dim=seq)
        x = block(x, attn_mask=mask)
    if not tower.batch_first:
        x = x.transpose(0, 1)
    return x


def reference_encode(bb: Backbone, prompts: torch.Tensor, eot_idx: torch.Tensor,
                     deep: Sequence[Optional[torch.Tensor]] = ()) -> torch.Tensor:
    """The official CoOp computation: all ``context_length`` tokens through every layer, then pool. ``deep[i]``
    (N, D) for i >= 1 replaces rows 1..N at the input of block i, as the deep-prompt code does."""
    length = bb.context_length
    x = prompts.to(bb.dtype) + bb.text.positional_embedding.to(bb.dtype)
    x = _run_blocks(bb, x, length, deep)
    x = bb.text.ln_final(x)
    rows = x[torch.arange(x.shape[0], device=x.device), eot_idx]
    return bb.text.project(rows).float()


def encode_dense(bb: Backbone, prompts: torch.Tensor, pooled_idx: torch.Tensor) -> torch.Tensor:
    """(C, d) raw features of prompts (C, context_length, D), every class at the tower's full length with the prompt
    rows in place, pooled at ``pooled_idx`` (the last position for SigLIP): the exact path for bidirectional towers."""
    return reference_encode(bb, prompts, pooled_idx)
