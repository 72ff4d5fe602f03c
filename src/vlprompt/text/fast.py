"""Exact shortcuts through a frozen, causal CLIP text tower (DESIGN.md, Performance 1-2).

- `encode_truncated`: prompts (C, L, D) each cut at its own EOT + 1; nothing after an EOT can change a
  causal tower's pooled output. Any layout.
- `encode_shared_prefix`: one context shared by every class with the class name at the end, so positions
  0..M (SOS + context) are identical for every class in every layer. They are computed once; each class
  then runs only its own tokens (name, '.', EOT) against the shared keys/values plus its own causal
  keys/values. Gradients reach the context through the shared keys, values and activations.

Both run the tower's own weights on packed tokens: the shared prefix and every class's own tokens, each
class cut at its EOT, sit in one (T, D) matrix, so each layer's projections and MLP are a few large
matrix products with no padding. Only attention, a small part of the work, sees the classes padded to
the longest one; padded slots hold zeros, are never attended to (causality hides them from real
queries) and their outputs are dropped. Attention is a plain matmul + softmax (PyTorch's fused CPU attention backward is
slow for many short sequences, especially in bf16), the softmax in float32. In the last layer only the
EOT rows are computed (keys and values are still needed for every token).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..backbones.backbone import Backbone


class _Layout:
    """Where each class's tokens sit in the packed matrix (after ``p`` shared prefix rows) and in the padded
    (C, S) attention layout, S = the longest class."""

    def __init__(self, lengths: torch.Tensor, p: int):
        dev = lengths.device
        self.p, self.n, self.s = p, lengths.shape[0], int(lengths.max())
        self.lengths = lengths
        j = torch.arange(self.s, device=dev).unsqueeze(0)
        starts = torch.cumsum(lengths, 0) - lengths
        self.valid = (j < lengths.unsqueeze(1)).flatten().nonzero().squeeze(1)  # padded slots holding tokens
        self.last_rows = p + starts + lengths - 1  # each class's EOT row in the packed matrix

    # index_select / index_copy rather than advanced indexing: their backward passes are a plain gather or
    # scatter, not the slow accumulating index_put.
    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(C, >=S, D) padded per-class rows -> (sum of lengths, D) packed rows."""
        return padded[:, :self.s].reshape(self.n * self.s, -1).index_select(0, self.valid)

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """(sum of lengths, D) packed rows -> (C, S, D), zeros in the padding slots (never attended to)."""
        out = packed.new_zeros(self.n * self.s, packed.shape[-1]).index_copy(0, self.valid, packed)
        return out.view(self.n, self.s, -1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, D) -> (H, ..., L, D/H)."""
    return x.unflatten(-1, (heads, -1)).movedim(-2, 0)


def _attention(q, k, v, mask, k_pre=None, v_pre=None) -> torch.Tensor:
    """Softmax attention per class. q (H, C, Lq, hd); own keys/values k, v (H, C, S, hd); ``mask`` True where
    a query must not see an own key (broadcast to (C, Lq, S)); optional shared prefix keys/values
    (H, P, hd), seen by every query. Returns (H, C, Lq, hd)."""
    h, c, lq, hd = q.shape
    q = q * hd ** -0.5
    own = (q @ k.transpose(-1, -2)).float().masked_fill(mask, float("-inf"))
    if k_pre is None:
        return own.softmax(dim=-1).to(q.dtype) @ v
    # Prefix scores for all classes in one matmul per head, without copying the prefix per class.
    pre = (q.reshape(h, c * lq, hd) @ k_pre.transpose(-1, -2)).float().view(h, c, lq, -1)
    probs = torch.cat([pre, own], dim=-1).softmax(dim=-1).to(q.dtype)
    p = k_pre.shape[-2]
    from_pre = (probs[..., :p].reshape(h, c * lq, p) @ v_pre).view(h, c, lq, hd)
    return from_pre + probs[..., p:] @ v


def _causal(lq: int, lk: int, device) -> torch.Tensor:
    """(lq, lk) True above the diagonal, the queries being the last lq of lk positions."""
    return torch.arange(lk, device=device).unsqueeze(0) > torch.arange(lk - lq, lk, device=device).unsqueeze(1)


def _run(bb: Backbone, prefix: Optional[torch.Tensor], seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(C, d) float32 pooled outputs of sequences ``[prefix, seqs[c, :lengths[c]]]`` read at their last token.
    ``prefix`` (P, D) and ``seqs`` (C, >=max length, D) already carry their positional embeddings."""
    blocks = bb.text.blocks
    width = seqs.shape[-1]
    p = prefix.shape[0] if prefix is not None else 0
    lay = _Layout(lengths, p)
    x = lay.pack(seqs)
    if p:
        x = torch.cat([prefix, x])
    own_mask = _causal(lay.s, lay.s, x.device)
    # In the last layer each class's query is its EOT: it sees its own keys up to its length.
    eot_mask = (torch.arange(lay.s, device=x.device) >= lengths.unsqueeze(1)).unsqueeze(1)  # (C, 1, S)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        attn = block.attn
        heads = attn.num_heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        h = block.ln_1(x)
        if last:  # keys and values for every token, queries only where the output is read
            kv = F.linear(h, w[width:], None if b is None else b[width:])
            q = _heads(F.linear(h.index_select(0, lay.last_rows), w[:width], None if b is None else b[:width]), heads)
            q = q.unsqueeze(2)  # (H, C, 1, hd)
            k, v = kv.chunk(2, dim=-1)
        else:
            q, k, v = F.linear(h, w, b).chunk(3, dim=-1)
        k_pre = v_pre = None
        outs = []
        if p:
            k_pre, v_pre = _heads(k[:p], heads), _heads(v[:p], heads)  # (H, P, hd)
            if not last:
                q_pre = _heads(q[:p], heads).unsqueeze(1)
                pre_out = _attention(q_pre, k_pre.unsqueeze(1), v_pre.unsqueeze(1), _causal(p, p, x.device))
                outs.append(pre_out.squeeze(1).movedim(0, -2).flatten(-2))
        k_own, v_own = _heads(lay.pad(k[p:]), heads), _heads(lay.pad(v[p:]), heads)  # (H, C, S, hd)
        if last:
            out = _attention(q, k_own, v_own, eot_mask, k_pre, v_pre)  # (H, C, 1, hd)
            outs = [out.squeeze(2).movedim(0, -2).flatten(-2)]  # (C, D)
            x = x.index_select(0, lay.last_rows)
        else:
            out = _attention(_heads(lay.pad(q[p:]), heads), k_own, v_own, own_mask, k_pre, v_pre)  # (H, C, S, hd)
            outs.append(lay.pack(out.movedim(0, -2).flatten(-2)))
        x = x + block.ls_1(attn.out_proj(torch.cat(outs) if len(outs) > 1 else outs[0]))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return bb.text.project(bb.text.ln_final(x)).float()


def encode_truncated(bb: Backbone, prompts: torch.Tensor, eot_idx: torch.Tensor) -> torch.Tensor:
    """(C, d) float32 features of prompt embeddings (C, L, D) pooled at ``eot_idx``; exact, any layout.

    Every sequence is cut at its own EOT: nothing after it is computed."""
    length = int(eot_idx.max()) + 1
    pos = bb.text.positional_embedding.to(bb.dtype)
    return _run(bb, None, prompts[:, :length].to(bb.dtype) + pos[:length], eot_idx + 1)


def encode_shared_prefix(bb: Backbone, prefix: torch.Tensor, suffix: torch.Tensor,
                         suffix_len: torch.Tensor) -> torch.Tensor:
    """(C, d) float32 features for prompts ``[prefix, suffix_c[:suffix_len_c]]`` pooled at their last token.

    ``prefix``: (P, D) embeddings shared by every class (SOS + context); ``suffix``: (C, S, D) each class's
    own embeddings (name, '.', EOT, padding); ``suffix_len``: (C,) tokens up to and including EOT.
    """
    pos = bb.text.positional_embedding.to(bb.dtype)
    p = prefix.shape[0]
    s = int(suffix_len.max())
    return _run(bb, prefix.to(bb.dtype) + pos[:p], suffix[:, :s].to(bb.dtype) + pos[p:p + s], suffix_len)
