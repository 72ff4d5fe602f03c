"""Exact shortcuts through a frozen, causal CLIP text tower.

- `encode_truncated`: prompts (C, L, D) each cut at its own EOT + 1; nothing after an EOT can change a
  causal tower's pooled output. Any layout.
- `encode_shared_prefix`: one context shared by every class with the class name at the end, so positions
  0..M (SOS + context) are identical for every class in every layer. They are computed once; each class
  then runs only its own tokens (name, '.', EOT) against the shared keys/values plus its own causal
  keys/values. Gradients reach the context through the shared keys, values and activations. With
  ``class_rows`` (class-aware rows that replace rows 1..N of each class from one block on, as TCP does) the
  prefix is shared only below that block; from it on each class carries its own copy of the prefix rows.

Both run the tower's own weights on packed tokens: the shared prefix and every class's own tokens, each
class cut at its EOT, sit in one (T, D) matrix, so each layer's projections and MLP are a few large
matrix products with no padding.

Attention never pads a class. All rows (prefix, then own) are cut into chunks of R consecutive query
rows; a chunk's queries see one key matrix: the prefix keys followed by a window of R + S - 1 own keys
(their chunk and the S - 1 rows before it, S = the longest class), which holds every key any of them may
attend to, gathered with one index_select. A precomputed additive mask keeps each query to its own class
(or the prefix) and causal order. So a layer's attention is one batched product for the scores (with the
mask and scale folded in) and one for the values, whatever the class lengths: per-class products of a few
tokens each are dominated by per-matrix overhead on CPU, and padding every class to the longest costs
copies (measured in one process against the padded layout: about 10% off a bf16 step at 100 classes, 30%
at 1000; gathering the prefix keys into each chunk instead of concatenating expanded copies, and the
prefix queries in the same product, about 5% more). The softmax is in float32 (PyTorch's fused CPU
attention backward is slow for many short sequences, especially in bf16). In the last layer only the EOT
rows are queries (keys and values are still needed for every token), each seeing the S rows that end at
it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F

from ..backbones.blocks import read_parts
from ..backbones.lora import LowRankQKV, adapted_qkv
from ..errors import VlpromptError

if TYPE_CHECKING:
    from ..backbones.backbone import Backbone

CHUNK_ROWS = 16  # queries per attention chunk; 16-32 measured within 2% of each other at 100 and 1000 classes


class _Plan:
    """Where every token sits in the packed matrix and which keys each query may see.

    Rows are the ``p`` prefix rows, then the classes' own tokens back to back (``t`` rows). Query chunk g
    holds rows [g R, (g + 1) R); its keys are the prefix rows followed by the window of own rows
    [g R - (S - 1), (g + 1) R), gathered by ``key_index`` (n, p + W). ``chunk_mask`` (n, R, p + W) is True
    where a query must not see a key: a prefix query sees the prefix causally, an own query sees the whole
    prefix and the earlier-or-same rows of its own class. Window columns that fall outside the own rows
    point at row 0 and are always hidden. Every row keeps at least one finite score (a real query sees
    itself, a padding query sees every key), so the softmax never produces NaN."""

    def __init__(self, lengths: torch.Tensor, p: int, rows: int = CHUNK_ROWS):
        dev = lengths.device
        self.p, self.n_cls, self.lengths = p, lengths.shape[0], lengths
        self.s = s = int(lengths.max())
        self.rows = rows = max(rows, s - 1)  # a window reaches back at most one chunk
        self.t = t = int(lengths.sum())
        self.n = n = -(-(p + t) // rows)
        self.w = w = rows + s - 1
        j = torch.arange(s, device=dev)
        self.valid = (j.unsqueeze(0) < lengths.unsqueeze(1)).flatten().nonzero().squeeze(1)  # (C, S) slots -> rows
        # Owner of every row: -1 for the prefix, the class for own rows, -2 past the end (padding queries).
        owner = torch.cat([torch.full((p,), -1, device=dev),
                           torch.repeat_interleave(torch.arange(self.n_cls, device=dev), lengths),
                           torch.full((n * rows - p - t,), -2, device=dev)])
        q_row = torch.arange(n * rows, device=dev).view(n, rows, 1)
        q_own = owner.view(n, rows, 1)
        k_row = (torch.arange(n, device=dev) * rows).view(n, 1) + torch.arange(w, device=dev) - (s - 1)  # (n, W)
        k_ok = (k_row >= p) & (k_row < p + t)
        k_own = torch.where(k_ok, owner[k_row.clamp(0, p + t - 1)], -3).unsqueeze(1)
        pre = torch.arange(p, device=dev)
        seen_pre = (q_own >= 0) | ((q_own == -1) & (pre <= q_row))  # (n, R, p)
        seen_own = (q_own >= 0) & (k_own == q_own) & (k_row.unsqueeze(1) <= q_row)  # (n, R, W)
        seen = torch.cat([seen_pre.expand(n, rows, p), seen_own], dim=-1) | (q_own == -2)
        self.chunk_mask = ~seen
        self.key_index = torch.cat([pre.expand(n, p), torch.where(k_ok, k_row, 0)], dim=1).flatten()
        starts = torch.cumsum(lengths, 0) - lengths
        self.eot = starts + lengths - 1  # each class's EOT among the own rows
        self.eot_window = (self.eot.unsqueeze(1) + j).flatten()  # its S rows, in the own rows padded by S-1
        self.eot_mask = torch.cat([torch.zeros(self.n_cls, p, dtype=torch.bool, device=dev),
                                   j.unsqueeze(0) < (s - lengths).unsqueeze(1)], dim=-1).unsqueeze(1)
        self._bias: dict = {}

    def bias(self, heads: int, dtype: torch.dtype) -> torch.Tensor:
        """``chunk_mask`` as an additive (H n, R, p + W) score bias (0 or -inf), built once per plan and
        dtype, shared by every layer."""
        if (heads, dtype) not in self._bias:
            m = self.chunk_mask.expand(heads, self.n, self.rows, -1).reshape(heads * self.n, self.rows, -1)
            self._bias[heads, dtype] = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, -math.inf)
        return self._bias[heads, dtype]

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(C, >=S, D) per-class rows -> (sum of lengths, D) packed rows (index_select: its backward is a
        plain scatter, not the slow accumulating index_put of advanced indexing)."""
        return padded[:, :self.s].reshape(self.n_cls * self.s, -1).index_select(0, self.valid)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(L, D) -> (H, L, D/H)."""
    return x.unflatten(-1, (heads, -1)).transpose(0, 1)


def _softmax_attend(scores: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Softmax in float32 over the last dim with ``mask`` (True = hidden), back in the encoder's dtype."""
    return scores.float().masked_fill(mask, float("-inf")).softmax(dim=-1).to(dtype)


def _chunk_attention(q, k, v, plan: _Plan, heads: int) -> torch.Tensor:
    """Every row as a query: (p + t, D) q, k, v -> (p + t, D). One gather per key/value matrix (its
    backward accumulates the prefix rows' gradients over the chunks), one product for the scores and one
    for the values."""
    n, r, rows = plan.n, plan.rows, q.shape[0]
    hd = q.shape[-1] // heads
    qc = _heads(F.pad(q, (0, 0, 0, n * r - rows)), heads).reshape(heads * n, r, hd)  # batch order (H, n)
    kc, vc = (_heads(x, heads).index_select(1, plan.key_index).view(heads * n, -1, hd) for x in (k, v))
    bias = plan.bias(heads, q.dtype)
    probs = torch.baddbmm(bias, qc, kc.transpose(-1, -2), alpha=hd ** -0.5).float().softmax(dim=-1).to(q.dtype)
    return torch.bmm(probs, vc).view(heads, n * r, hd).transpose(0, 1).reshape(n * r, -1)[:rows]


def _eot_attention(q_eot, k, v, k_pre: Optional[torch.Tensor], v_pre: Optional[torch.Tensor], plan: _Plan,
                   heads: int) -> torch.Tensor:
    """Each class's EOT row as the only query: q_eot (C, D), own k, v (T, D) -> (C, D)."""
    c, s, p = plan.n_cls, plan.s, plan.p
    hd = q_eot.shape[-1] // heads
    q = (q_eot * hd ** -0.5).view(c, heads, 1, hd)
    kw, vw = (F.pad(x, (0, 0, s - 1, 0)).index_select(0, plan.eot_window).view(c, s, heads, hd).transpose(1, 2)
              for x in (k, v))  # (C, H, S, hd): the S rows ending at each EOT
    scores = q @ kw.transpose(-1, -2)  # (C, H, 1, S)
    if p:
        pre = _heads(q.reshape(c, -1), heads) @ k_pre.transpose(-1, -2)  # (H, C, P)
        scores = torch.cat([pre.transpose(0, 1).unsqueeze(2), scores], dim=-1)
    probs = _softmax_attend(scores, plan.eot_mask.unsqueeze(1), q.dtype)
    out = (probs[..., p:] @ vw).squeeze(2)  # (C, H, hd)
    if p:
        out = out + (probs[..., :p].squeeze(2).transpose(0, 1) @ v_pre).transpose(0, 1)
    return out.reshape(c, -1)


def _run(bb: Backbone, prefix: Optional[torch.Tensor], seqs: torch.Tensor, lengths: torch.Tensor,
         deep: Sequence[Optional[torch.Tensor]] = (), class_rows: Optional[tuple] = None,
         adapter: Optional[LowRankQKV] = None) -> torch.Tensor:
    """(C, d) float32 pooled outputs of sequences ``[prefix, seqs[c, :lengths[c]]]`` read at their last token.
    ``prefix`` (P, D) and ``seqs`` (C, >=max length, D) already carry their positional embeddings. ``deep[i]``
    (N, D) for i >= 1 (None: keep) replaces prefix rows 1..N at the input of block i (`check_deep`).
    ``class_rows`` = (block L, rows (C, N, D)): each class's rows 1..N replaced at the input of block L; with a
    prefix, blocks from L on run one sequence per class (`_split_prefix`). ``adapter``: low-rank updates of the
    blocks' query, key and value projections (`backbones.lora`)."""
    blocks = bb.text.blocks
    p = prefix.shape[0] if prefix is not None else 0
    plan = _Plan(lengths, p)
    x = plan.pack(seqs)
    if p:
        x = torch.cat([prefix, x])
    for i, block in enumerate(blocks):
        if 0 < i < len(deep) and deep[i] is not None:  # deep rows shared by every class sit in the prefix
            x = torch.cat([x[:1], deep[i].to(x.dtype), x[1 + deep[i].shape[0]:]])
        if class_rows is not None and i == class_rows[0]:
            x, plan = _split_prefix(x, plan, class_rows[1])
            p = 0
        last = i == len(blocks) - 1
        parts = read_parts(block)  # checked once, when the backbone was built (TextTower)
        heads = parts.heads
        h = parts.ln_1(x)
        # In the last layer keys and values for every token, queries only where the output is read.
        eot_rows = (lambda t: t[p:].index_select(0, plan.eot)) if last else None
        q, k, v = adapted_qkv(adapter, i, h, parts.in_proj_weight, parts.in_proj_bias, eot_rows)
        if last:
            k_pre, v_pre = (_heads(k[:p], heads), _heads(v[:p], heads)) if p else (None, None)  # (H, P, hd)
            out = _eot_attention(q, k[p:], v[p:], k_pre, v_pre, plan, heads)
            x = x[p:].index_select(0, plan.eot)
        else:
            out = _chunk_attention(q, k, v, plan, heads)
        x = x + parts.ls_1(parts.out_proj(out))
        x = x + parts.ls_2(parts.mlp(parts.ln_2(x)))
    return bb.text.project(bb.text.ln_final(x)).float()


def _split_prefix(x: torch.Tensor, plan: _Plan, rows: torch.Tensor) -> tuple[torch.Tensor, _Plan]:
    """Rows 1..N of every class replaced by ``rows`` (C, N, D); returns the packed rows and their plan, which has
    no prefix. With a prefix, the classes stop sharing it here: each class's sequence becomes its copy of the
    prefix rows as they are now (rows 1..N its own) followed by its own rows. One gather from [x, rows]: its
    backward sums every copy's gradient into the shared prefix rows, so they reach the blocks below."""
    p, t, c, n = plan.p, plan.t, plan.n_cls, rows.shape[1]
    dev = x.device
    starts = torch.cumsum(plan.lengths, 0) - plan.lengths
    slot = torch.arange(n, device=dev)
    if not p:  # already one sequence per class: rows 1..N in place (out of place: gradients reach both)
        index = (starts.unsqueeze(1) + 1 + slot).flatten()
        return x.index_put((index,), rows.reshape(-1, x.shape[-1]).to(x.dtype)), plan
    split = _Plan(p + plan.lengths, 0)
    head = torch.arange(p, device=dev).expand(c, p).clone()  # (C, p): the shared rows
    head[:, 1:1 + n] = p + t + torch.arange(c, device=dev).unsqueeze(1) * n + slot  # the class's rows after x
    own = p + starts.unsqueeze(1) + torch.arange(plan.s, device=dev)  # (C, S): its own rows (past its end: unused)
    index = torch.cat([head, own], dim=1).flatten().index_select(0, split.valid)
    return torch.cat([x, rows.reshape(-1, x.shape[-1]).to(x.dtype)]).index_select(0, index), split


def _causal_only(bb: Backbone) -> None:
    """The shortcuts hold for a causal tower whose prompts start with one start token (SOS): the rows they replace
    and share are counted from it."""
    if not bb.text.causal:
        raise VlpromptError(f"backbone {bb.source.name}: its text tower is bidirectional (every token sees every "
                            "other), so the causal text shortcuts do not hold for it; use text.dense.encode_dense")
    if bb.n_start != 1:
        raise VlpromptError(f"backbone {bb.source.name}: its tokenizer puts {bb.n_start} start tokens before the "
                            "text; the causal text shortcuts count rows from one start token")


def encode_truncated(bb: Backbone, prompts: torch.Tensor, eot_idx: torch.Tensor,
                     class_rows: Optional[tuple] = None, adapter: Optional[LowRankQKV] = None) -> torch.Tensor:
    """(C, d) float32 features of prompt embeddings (C, L, D) pooled at ``eot_idx``; exact, any layout.

    Every sequence is cut at its own EOT: nothing after it is computed. ``class_rows`` = (block L, rows (C, N, D))
    replaces rows 1..N of each class at the input of block L (class-aware tokens; N + 1 <= every EOT index).
    ``adapter``: low-rank updates of the query, key and value projections (`backbones.lora`)."""
    _causal_only(bb)
    length = int(eot_idx.max()) + 1
    pos = bb.text.positional_embedding.to(bb.dtype)
    if class_rows is not None:
        check_class_rows(class_rows, prompts.shape[0], int(eot_idx.min()), len(bb.text.blocks),
                         "the rows before the earliest EOT")
    return _run(bb, None, prompts[:, :length].to(bb.dtype) + pos[:length], eot_idx + 1, class_rows=class_rows,
                adapter=adapter)


def check_deep(deep: Sequence[Optional[torch.Tensor]], prefix_rows: int, blocks: int) -> None:
    """Deep text prompts replace rows 1..N (after SOS), which must lie in the shared prefix, in existing blocks."""
    if len(deep) > blocks:
        raise VlpromptError(f"{len(deep)} deep text prompts for a text tower of {blocks} blocks")
    for i, rows in enumerate(deep):
        if i and rows is not None and 1 + rows.shape[0] > prefix_rows:
            raise VlpromptError(f"deep text prompt of block {i} has {rows.shape[0]} rows; the shared prefix holds "
                                f"{prefix_rows - 1} after SOS")


def check_class_rows(class_rows: tuple, n_cls: int, room: int, blocks: int, where: str) -> None:
    """Class rows replace rows 1..N (after SOS) of each of the C classes at the input of an existing block; they
    must fit in the first ``room`` rows (``where``: what bounds them)."""
    layer, rows = class_rows
    if rows.dim() != 3 or rows.shape[0] != n_cls:
        raise VlpromptError(f"class rows of shape {tuple(rows.shape)}; (classes={n_cls}, N, width) is needed")
    if not 0 <= layer < blocks:
        raise VlpromptError(f"class rows at block {layer} of a text tower of {blocks} blocks")
    if 1 + rows.shape[1] > room:
        raise VlpromptError(f"class rows 1..{rows.shape[1]} do not fit in {where}: {room} rows, SOS included")


def encode_shared_prefix(bb: Backbone, prefix: torch.Tensor, suffix: torch.Tensor,
                         suffix_len: torch.Tensor, deep: Sequence[Optional[torch.Tensor]] = (),
                         class_rows: Optional[tuple] = None, adapter: Optional[LowRankQKV] = None,
                         shared_masks: bool = False) -> torch.Tensor:
    """(C, d) float32 features for prompts ``[prefix, suffix_c[:suffix_len_c]]`` pooled at their last token.

    ``prefix``: (P, D) embeddings shared by every class (SOS + context); ``suffix``: (C, S, D) each class's
    own embeddings (name, '.', EOT, padding); ``suffix_len``: (C,) tokens up to and including EOT. ``deep``:
    deep prompt rows per block (index 0 unused: layer 0's context is in ``prefix``), shared by every class,
    so they stay in the prefix and the shared-prefix saving holds. ``class_rows`` = (block L, rows (C, N, D)):
    each class's prefix rows 1..N replaced at the input of block L (TCP); the prefix is computed once below L,
    per class from L on (at L = 0 nothing is shared: the truncated computation). ``adapter``: low-rank updates of
    the query, key and value projections (`backbones.lora`) without dropout (evaluation): a random mask per class
    would make the prefix differ between classes (training with dropout uses `encode_truncated`, unless
    ``shared_masks``: the prefix rows then draw one mask for every class, an approximation the caller records).
    """
    _causal_only(bb)
    pos = bb.text.positional_embedding.to(bb.dtype)
    p = prefix.shape[0]
    s = int(suffix_len.max())
    check_deep(deep, p, len(bb.text.blocks))
    if class_rows is not None:
        if any(d is not None for d in deep[1:]):
            raise VlpromptError("deep text prompts and class rows cannot be combined: both replace the prefix rows")
        check_class_rows(class_rows, suffix.shape[0], p, len(bb.text.blocks), "the shared prefix")
    if adapter is not None and adapter.training and adapter.dropout > 0 and not shared_masks:
        raise VlpromptError("a shared prefix cannot take low-rank updates with dropout: each class draws its own "
                            "masks (use encode_truncated)")
    return _run(bb, prefix.to(bb.dtype) + pos[:p], suffix[:, :s].to(bb.dtype) + pos[p:p + s], suffix_len, deep,
                class_rows, adapter)


def encode_per_image_prefix(bb: Backbone, prefixes: torch.Tensor, suffix: torch.Tensor,
                            suffix_len: torch.Tensor) -> torch.Tensor:
    """(B, C, d) float32 features when each of B images has its own shared prefix (CoCoOp: SOS + context +
    the image's bias): for image b, prompts ``[prefixes[b], suffix_c[:suffix_len_c]]``. Exact: each image is
    `encode_shared_prefix` (its classes' own tokens attend to its prefix), one image after the other."""
    _causal_only(bb)
    return torch.stack([encode_shared_prefix(bb, prefix, suffix, suffix_len) for prefix in prefixes])
