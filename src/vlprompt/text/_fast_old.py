"""Exact shortcuts through a frozen, causal CLIP text tower (DESIGN.md, Performance 1-2).

- `encode_truncated`: prompts (C, L, D) each cut at its own EOT + 1; nothing after an EOT can change a
  causal tower's pooled output. Any layout.
- `encode_shared_prefix`: one context shared by every class with the class name at the end, so positions
  0..M (SOS + context) are identical for every class in every layer. They are computed once; each class
  then runs only its own tokens (name, '.', EOT) against the shared keys/values plus its own causal
  keys/values. Gradients reach the context through the shared keys, values and activations.

Both run the tower's own weights on packed tokens: the shared prefix and every class's own tokens, each
class cut at its EOT, sit in one (T, D) matrix, so each layer's projections and MLP are a few large
matrix products with no padding.

Attention never pads a class. The packed own tokens are cut into chunks of R consecutive rows; a chunk's
queries see one key matrix: the prefix keys followed by a window of R + S - 1 own keys (their chunk and
the S - 1 rows before it, S = the longest class), which holds every key any of them may attend to. A
precomputed mask keeps each query to its own class and causal order. So a layer's attention is one
batched product for the scores and one for the values whatever the class lengths: per-class products of
a few tokens each are dominated by per-matrix overhead on CPU, and padding every class to the longest
costs copies (measured in one process against the padded layout: about 10% off a bf16 step at 100
classes, 30% at 1000). Attention is a plain matmul + softmax in float32 (PyTorch's fused CPU attention
backward is slow for many short sequences, especially in bf16). In the last layer only the EOT rows are
queries (keys and values are still needed for every token), each seeing the S rows that end at it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..backbones.backbone import Backbone

CHUNK_ROWS = 16  # queries per attention chunk; 16-32 measured within 2% of each other at 100 and 1000 classes


class _Plan:
    """Where every class's tokens sit in the packed matrix and which keys each query may see.

    Own rows (after the ``p`` prefix rows) are the classes' tokens back to back. ``chunk_mask``
    (n, R, p + W) is True where a chunk query must not see a key; every row keeps at least one finite score
    (a real query sees itself, a padding query sees every key), so the softmax never produces NaN."""

    def __init__(self, lengths: torch.Tensor, p: int, rows: int = CHUNK_ROWS):
        dev = lengths.device
        self.p, self.n_cls = p, lengths.shape[0]
        self.s = s = int(lengths.max())
        self.rows = rows = max(rows, s - 1)  # a window reaches back at most one chunk
        self.t = t = int(lengths.sum())
        self.n = n = -(-t // rows)
        self.w = w = rows + s - 1
        j = torch.arange(s, device=dev)
        self.valid = (j.unsqueeze(0) < lengths.unsqueeze(1)).flatten().nonzero().squeeze(1)  # (C, S) slots -> rows
        cls = torch.repeat_interleave(torch.arange(self.n_cls, device=dev), lengths)
        pad = torch.full((s - 1 + n * rows,), -1, device=dev)
        cls_q = pad[s - 1:].clone().index_copy_(0, torch.arange(t, device=dev), cls)  # -1: padding queries
        cls_k = pad.clone().index_copy_(0, torch.arange(s - 1, s - 1 + t, device=dev), cls)
        cls_k[cls_k < 0] = -2  # padding keys match no query
        q_row = torch.arange(n * rows, device=dev).view(n, rows, 1)
        k_row = (torch.arange(n, device=dev) * rows).view(n, 1, 1) + torch.arange(w, device=dev) - (s - 1)
        seen = (cls_q.view(n, rows, 1) == cls_k[k_row + s - 1]) & (k_row <= q_row)
        seen |= (cls_q < 0).view(n, rows, 1)  # padding queries (outputs dropped) see everything: no all-masked row
        self.chunk_mask = torch.cat([torch.zeros(n, rows, p, dtype=torch.bool, device=dev), ~seen], dim=-1)
        starts = torch.cumsum(lengths, 0) - lengths
        self.eot = starts + lengths - 1  # each class's EOT among the own rows
        self.eot_window = (self.eot.unsqueeze(1) + j).flatten()  # its S rows, in the own rows padded by S-1
        self.prefix_mask = torch.ones(p, p, dtype=torch.bool, device=dev).triu(1)  # causal among the prefix
        self.eot_mask = torch.cat([torch.zeros(self.n_cls, p, dtype=torch.bool, device=dev),
                                   j.unsqueeze(0) < (s - lengths).unsqueeze(1)], dim=-1).unsqueeze(1)

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


def _prefix_attention(q, k, v, plan: _Plan) -> torch.Tensor:
    """Causal self-attention of the shared prefix: (H, P, hd) each -> (P, D)."""
    probs = _softmax_attend((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), plan.prefix_mask, q.dtype)
    return (probs @ v).transpose(0, 1).flatten(1)


def _chunk_windows(x: torch.Tensor, plan: _Plan, heads: int) -> torch.Tensor:
    """(T, D) own rows -> (n, H, W, hd): chunk g holds rows [g R - (S - 1), (g + 1) R), zeros outside."""
    r, lead = plan.rows, plan.s - 1
    xp = F.pad(x, (0, 0, r, plan.n * r - plan.t)).view(plan.n + 1, r, -1)  # chunk 0 is all zeros
    windows = torch.cat([xp[:-1, r - lead:], xp[1:]], dim=1) if lead else xp[1:]
    return windows.unflatten(-1, (heads, -1)).transpose(1, 2)


def _own_attention(q, k, v, k_pre: Optional[torch.Tensor], v_pre: Optional[torch.Tensor], plan: _Plan,
                   heads: int) -> torch.Tensor:
    """Every own row as a query: (T, D) q, k, v and optional prefix keys/values (H, P, hd) -> (T, D)."""
    n, r = plan.n, plan.rows
    hd = q.shape[-1] // heads
    qc = F.pad(q * hd ** -0.5, (0, 0, 0, n * r - plan.t)).view(n, r, heads, hd).transpose(1, 2)  # (n, H, R, hd)
    kc, vc = _chunk_windows(k, plan, heads), _chunk_windows(v, plan, heads)  # (n, H, W, hd)
    if plan.p:  # every chunk also sees the prefix: one key matrix per chunk, one product
        kc = torch.cat([k_pre.expand(n, -1, -1, -1), kc], dim=2)
        vc = torch.cat([v_pre.expand(n, -1, -1, -1), vc], dim=2)
    probs = _softmax_attend(qc @ kc.transpose(-1, -2), plan.chunk_mask.unsqueeze(1), q.dtype)  # (n, H, R, P+W)
    return (probs @ vc).transpose(1, 2).reshape(n * r, -1)[:plan.t]


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


def _run(bb: Backbone, prefix: Optional[torch.Tensor], seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(C, d) float32 pooled outputs of sequences ``[prefix, seqs[c, :lengths[c]]]`` read at their last token.
    ``prefix`` (P, D) and ``seqs`` (C, >=max length, D) already carry their positional embeddings."""
    blocks = bb.text.blocks
    width = seqs.shape[-1]
    p = prefix.shape[0] if prefix is not None else 0
    plan = _Plan(lengths, p)
    x = plan.pack(seqs)
    if p:
        x = torch.cat([prefix, x])
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        attn = block.attn
        heads = attn.num_heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        h = block.ln_1(x)
        if last:  # keys and values for every token, queries only where the output is read
            k, v = F.linear(h, w[width:], None if b is None else b[width:]).chunk(2, dim=-1)
            q = F.linear(h[p:].index_select(0, plan.eot), w[:width], None if b is None else b[:width])
        else:
            q, k, v = F.linear(h, w, b).chunk(3, dim=-1)
        k_pre = v_pre = None
        if p:
            k_pre, v_pre = _heads(k[:p], heads), _heads(v[:p], heads)  # (H, P, hd)
        if last:
            out = _eot_attention(q, k[p:], v[p:], k_pre, v_pre, plan, heads)
            x = x[p:].index_select(0, plan.eot)
        else:
            out = _own_attention(q[p:], k[p:], v[p:], k_pre, v_pre, plan, heads)
            if p:
                out = torch.cat([_prefix_attention(_heads(q[:p], heads), k_pre, v_pre, plan), out])
        x = x + block.ls_1(attn.out_proj(out))
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
