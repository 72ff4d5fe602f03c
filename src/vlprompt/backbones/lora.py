"""Low-rank updates of the query, key and value projections of a tower's attention blocks (LoRA, as CLIP-LoRA
adds them), passed to the exact fast paths as an argument: the backbone's own weights are never touched, so one
backbone serves a frozen teacher and any number of adapted learners.

open_clip packs the three projections in one ``in_proj_weight`` (3 D, D) whose rows are [W_q; W_k; W_v]. The update
of projection p in {q, k, v} of block i is ``scale * (dropout_p(h) A_p^T) B_p^T`` added to that third of the
packed projection of the block's normalised input h, with ``scale = alpha / sqrt(rank)``. In training, each of
q, k and v draws its own dropout mask (in that order) on the same h, as the official code's three separate
dropout modules do: no single weight update reproduces that, so training adds the three branches to the packed
product. Without dropout (evaluation) the update is a weight update: merged into the packed weight once per
forward in float32 (exact), kept as branches in lower precisions (a bf16 weight would round a small update away).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VlpromptError

# The official code's block presets for 12-block towers (``--position``); "all" is every block of the tower.
POSITIONS = {"all": None, "bottom": range(0, 4), "mid": range(4, 8), "up": range(8, 12), "half-up": range(6, 12),
             "half-bottom": range(0, 6), "top3": range(9, 12)}
PROJECTIONS = "qkv"


def position_blocks(position: str, n_blocks: int, tower: str) -> list[int]:
    """The block indices of a position preset in a tower of ``n_blocks`` blocks (one error line when it does
    not fit)."""
    if position not in POSITIONS:
        raise VlpromptError(f"position '{position}' is not one of {list(POSITIONS)}")
    blocks = list(range(n_blocks)) if POSITIONS[position] is None else list(POSITIONS[position])
    if blocks[-1] >= n_blocks:
        raise VlpromptError(f"position '{position}' needs blocks {blocks[0]}-{blocks[-1]}, but the {tower} tower "
                            f"has {n_blocks}")
    return blocks


class LowRankQKV(nn.Module):
    """The low-rank factors of one tower: ``a`` (blocks, projections, rank, D), uniform in +-1/sqrt(D) as
    ``kaiming_uniform_(a=sqrt(5))`` draws them, and ``b`` (blocks, projections, D, rank), zero, so that an
    untrained update changes nothing. ``projections`` is a subset of "qkv" in that order."""

    def __init__(self, blocks: Sequence[int], width: int, rank: int, alpha: float, dropout: float,
                 projections: str, device=None):
        super().__init__()
        self.blocks = list(blocks)
        self._row = {block: j for j, block in enumerate(self.blocks)}
        self.slots = [PROJECTIONS.index(p) for p in projections]
        self.scale = alpha / math.sqrt(rank)
        self.dropout = dropout
        shape = (len(self.blocks), len(self.slots))
        bound = 1.0 / math.sqrt(width)
        self.a = nn.Parameter(torch.empty(*shape, rank, width, device=device).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(*shape, width, rank, device=device))

    def branches(self) -> bool:
        """True when the update is added as branches (training), False when merged into the weight."""
        return self.training

    def in_proj(self, block: int, weight: torch.Tensor) -> torch.Tensor:
        """The packed projection weight block ``block`` computes with: merged with the update in evaluation when
        the tower runs in float32, else unchanged (the update then comes as `deltas`)."""
        j = self._row.get(block)
        if j is None or self.training or weight.dtype != torch.float32:
            return weight
        update = torch.zeros_like(weight)
        width = weight.shape[1]
        for s, slot in enumerate(self.slots):
            update[slot * width:(slot + 1) * width] = self.b[j, s] @ self.a[j, s]
        return weight + self.scale * update

    def deltas(self, block: int, h: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """[dq, dk, dv] for the normalised input ``h`` (..., D) of ``block``: each (..., D) or None. The dropout
        masks are drawn in the order q, k, v, each on the whole of ``h``."""
        out: list[Optional[torch.Tensor]] = [None, None, None]
        j = self._row.get(block)
        if j is None or (not self.training and h.dtype == torch.float32):
            return out  # merged into the weight (`in_proj`)
        for s, slot in enumerate(self.slots):
            x = F.dropout(h, self.dropout, self.training) if self.dropout > 0 else h
            out[slot] = (x @ self.a[j, s].to(h.dtype).T) @ (self.scale * self.b[j, s]).to(h.dtype).T
        return out


def adapted_qkv(adapter: Optional[LowRankQKV], block: int, h: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor], query: Optional[Callable] = None):
    """(q, k, v) of block ``block`` for normalised input ``h`` (..., D), with ``adapter``'s update. ``query``
    picks the rows that need a query (None: every row): keys and values come from every row, the query only
    from those (its update is drawn on the whole of ``h`` and then picked, so the random masks do not depend on
    which rows are read)."""
    width = h.shape[-1]
    if adapter is not None:
        weight = adapter.in_proj(block, weight)
    if query is None:
        q, k, v = F.linear(h, weight, bias).chunk(3, dim=-1)
    else:
        k, v = F.linear(h, weight[width:], None if bias is None else bias[width:]).chunk(2, dim=-1)
        q = F.linear(query(h), weight[:width], None if bias is None else bias[:width])
    if adapter is None:
        return q, k, v
    dq, dk, dv = adapter.deltas(block, h)
    if dq is not None:
        q = q + (dq if query is None else query(dq))
    if dk is not None:
        k = k + dk
    if dv is not None:
        v = v + dv
    return q, k, v
