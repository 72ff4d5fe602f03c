"""The exact text path for bidirectional towers (SigLIP, SigLIP 2, the small MobileCLIP towers): every prompt at the
tower's full length with the prompt rows in place, every position attending to every other (padding included), read
at the tower's pooled position. A token there depends on every other token of its prompt in every layer, so neither
causal shortcut holds (`text.fast`: no cut at the end token, no prefix shared between classes).

What the learners add enters as arguments, as in `text.fast`: deep rows shared by every class (IVLP, MaPLe,
PromptSRC), class-aware rows (TCP), low-rank updates of the attention projections (CLIP-LoRA). They replace the rows
right after the tower's start tokens (``n_start``: none for SigLIP, one for MobileCLIP's CLIP tokenizer). The blocks
are computed from their parts (`backbones.blocks.read_parts`) with the fused attention kernel; the last block takes
queries only at the pooled rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F

from ..backbones.blocks import read_parts
from ..backbones.lora import LowRankQKV, adapted_qkv
from ..errors import VlpromptError

if TYPE_CHECKING:
    from ..backbones.backbone import Backbone


def _replace(x: torch.Tensor, start: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows start..start+N of every sequence of x (C, L, D) replaced by ``rows`` (C, N, D), out of place (gradients
    reach both)."""
    n = rows.shape[1]
    return torch.cat([x[:, :start], rows.to(x.dtype), x[:, start + n:]], dim=1)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(C, L, D) -> (C, H, L, D/H)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def encode_dense(bb: Backbone, prompts: torch.Tensor, pooled_idx: torch.Tensor,
                 deep: Sequence[Optional[torch.Tensor]] = (), class_rows: Optional[tuple] = None,
                 adapter: Optional[LowRankQKV] = None) -> torch.Tensor:
    """(C, d) float32 raw features of prompt embeddings (C, context_length, D) read at ``pooled_idx`` (C,).

    ``deep[i]`` (N, D) for i >= 1 (None: keep) replaces rows n_start..n_start+N of every prompt at the input of block
    i. ``class_rows`` = (block L, rows (C, N, D)) replaces the same rows of each prompt by its own at the input of
    block L. ``adapter``: low-rank updates of the blocks' query, key and value projections (`backbones.lora`; its
    dropout masks are drawn on every row, padding included, as the full computation draws them)."""
    tower = bb.text
    if tower.causal:
        raise VlpromptError(f"backbone {bb.source.name}: the dense path is for bidirectional text towers; a causal "
                            "tower takes the exact shortcuts of text.fast")
    c, length = prompts.shape[:2]
    start, blocks = bb.n_start, tower.blocks
    if len(deep) > len(blocks):
        raise VlpromptError(f"{len(deep)} deep text prompts for a text tower of {len(blocks)} blocks")
    extra = [r.shape[-2] for r in deep[1:] if r is not None] + ([class_rows[1].shape[1]] if class_rows else [])
    if extra and start + max(extra) > length:
        raise VlpromptError(f"prompt rows {start}..{start + max(extra) - 1} do not fit in {length} positions")
    if class_rows is not None and not (0 <= class_rows[0] < len(blocks) and class_rows[1].shape[0] == c):
        raise VlpromptError(f"class rows at block {class_rows[0]} for {class_rows[1].shape[0]} classes; the tower "
                            f"has {len(blocks)} blocks and the prompts {c} classes")
    x = prompts.to(bb.dtype) + tower.positional_embedding[:length].to(bb.dtype)
    every = torch.arange(c, device=x.device)
    pooled = lambda t: t[every, pooled_idx].unsqueeze(1)  # noqa: E731 - (C, L, D) -> (C, 1, D)
    for i, block in enumerate(blocks):
        if 0 < i < len(deep) and deep[i] is not None:
            x = _replace(x, start, deep[i].unsqueeze(0).expand(c, -1, -1))
        if class_rows is not None and i == class_rows[0]:
            x = _replace(x, start, class_rows[1])
        last = i == len(blocks) - 1
        parts = read_parts(block)  # checked when the backbone was built (TextTower)
        h = parts.ln_1(x)
        q, k, v = adapted_qkv(adapter, i, h, parts.in_proj_weight, parts.in_proj_bias, pooled if last else None)
        out = F.scaled_dot_product_attention(*(_heads(t, parts.heads) for t in (q, k, v)))
        out = out.transpose(1, 2).flatten(2)
        if last:
            x = pooled(x)
        x = x + parts.ls_1(parts.out_proj(out))
        x = x + parts.ls_2(parts.mlp(parts.ln_2(x)))
    return tower.project(tower.ln_final(x[:, 0])).float()
