"""Exact shortcuts through a frozen, causal CLIP text tower (DESIGN.md, Performance 1-2).

- `encode_truncated`: prompts (C, L, D) each cut at its own EOT + 1; nothing after an EOT can change a
  causal tower's pooled output. Any layout.
- `encode_shared_prefix`: one context shared by every class with the class name at the end, so positions
  0..M (SOS + context) are identical for every class in every layer. They are computed once; each class
  then runs only its own tokens (name, '.', EOT) against the shared keys/values plus its own causal
  keys/values. Gradients reach the context through the shared keys, values and activations.

Both run the tower's own weights in one packed pass: classes are grouped by sequence length, and every
token of every group (plus the shared prefix) sits in one (T, D) matrix, so each layer's projections and
MLP are a few large matrix products with no padding; only attention works group by group. Attention is a
plain matmul + softmax (PyTorch's fused CPU attention backward is slow for many short sequences,
especially in bf16), with the softmax in float32. In the last layer only the EOT rows are computed
(keys and values are still needed for every token).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..backbones.backbone import Backbone


def _attend(q, k, v, k_prefix=None, v_prefix=None) -> torch.Tensor:
    """Causal softmax attention of queries (B, H, Lq, hd) over own keys (B, H, Lk, hd), the queries being
    the last Lq of the Lk positions, plus (optionally) shared prefix keys (1, H, P, hd) seen by all."""
    scale = q.shape[-1] ** -0.5
    q = q * scale
    lq, lk = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-1, -2)).float()
    qi = torch.arange(lk - lq, lk, device=q.device).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(lk, device=q.device).unsqueeze(0) > qi, float("-inf"))
    if k_prefix is None:
        return scores.softmax(dim=-1).to(q.dtype) @ v
    pre = (q @ k_prefix.transpose(-1, -2)).float()
    probs = torch.cat([pre, scores], dim=-1).softmax(dim=-1).to(q.dtype)
    p = k_prefix.shape[-2]
    return probs[..., :p] @ v_prefix + probs[..., p:] @ v


def _split_heads(x: torch.Tensor, n: int, length: int, heads: int) -> torch.Tensor:
    """(n * length, D) packed rows -> (n, H, length, D/H)."""
    return x.reshape(n, length, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(n, H, length, hd) -> (n * length, H * hd)."""
    n, h, length, hd = x.shape
    return x.transpose(1, 2).reshape(n * length, h * hd)


def _run_packed(bb: Backbone, prefix: Optional[torch.Tensor], groups: list[torch.Tensor]) -> torch.Tensor:
    """Pooled (last-token) outputs, (sum of n, d) float32 in group order, for sequences
    ``[prefix, group_g[j]]`` where ``prefix`` (P, D) is shared and each group is (n, s, D), all with
    positional embeddings already added."""
    blocks = bb.text.blocks
    width = groups[0].shape[-1]
    p = prefix.shape[0] if prefix is not None else 0
    shapes = [(g.shape[0], g.shape[1]) for g in groups]
    x = torch.cat(([prefix] if p else []) + [g.reshape(-1, width) for g in groups])
    # Packed row of each sequence's last token, where the pooled (EOT) output is read.
    ends, start = [], p
    for n, s in shapes:
        ends.append(start + s - 1 + s * torch.arange(n, device=x.device))
        start += n * s
    last_rows = torch.cat(ends)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        attn = block.attn
        heads = attn.num_heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        h = block.ln_1(x)
        if last:  # keys and values for every token, queries only where the output is read
            k, v = F.linear(h, w[width:], None if b is None else b[width:]).chunk(2, dim=-1)
            q = F.linear(h[last_rows], w[:width], None if b is None else b[:width])
        else:
            q, k, v = F.linear(h, w, b).chunk(3, dim=-1)
        kp = vp = None
        outs = []
        if p:
            kp, vp = _split_heads(k[:p], 1, p, heads), _split_heads(v[:p], 1, p, heads)
            if not last:
                outs.append(_merge_heads(_attend(_split_heads(q[:p], 1, p, heads), kp, vp)))
        start, q_start = p, 0
        for n, s in shapes:
            kg = _split_heads(k[start:start + n * s], n, s, heads)
            vg = _split_heads(v[start:start + n * s], n, s, heads)
            if last:
                qg = _split_heads(q[q_start:q_start + n], n, 1, heads)
            else:
                qg = _split_heads(q[start:start + n * s], n, s, heads)
            outs.append(_merge_heads(_attend(qg, kg, vg, kp, vp)))
            start, q_start = start + n * s, q_start + n
        if last:
            x = x[last_rows]
        x = x + block.ls_1(attn.out_proj(torch.cat(outs)))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return bb.text.project(bb.text.ln_final(x)).float()


def _by_length(lengths: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(length, class indices) for each distinct length."""
    return [(s, (lengths == s).nonzero().squeeze(1)) for s in torch.unique(lengths).tolist()]


def _unsort(feats: torch.Tensor, groups: list[tuple[int, torch.Tensor]], n_cls: int) -> torch.Tensor:
    order = torch.cat([rows for _, rows in groups])
    return feats.new_empty(n_cls, feats.shape[1]).index_put((order,), feats)


def encode_truncated(bb: Backbone, prompts: torch.Tensor, eot_idx: torch.Tensor) -> torch.Tensor:
    """(C, d) float32 features of prompt embeddings (C, L, D) pooled at ``eot_idx``; exact, any layout.

    Every sequence is cut at its own EOT (classes grouped by EOT position, so no padding)."""
    pos = bb.text.positional_embedding.to(bb.dtype)
    groups = _by_length(eot_idx + 1)
    seqs = [prompts[rows, :s].to(bb.dtype) + pos[:s] for s, rows in groups]
    return _unsort(_run_packed(bb, None, seqs), groups, prompts.shape[0])


def encode_shared_prefix(bb: Backbone, prefix: torch.Tensor, suffix: torch.Tensor,
                         suffix_len: torch.Tensor) -> torch.Tensor:
    """(C, d) float32 features for prompts ``[prefix, suffix_c[:suffix_len_c]]`` pooled at their last token.

    ``prefix``: (P, D) embeddings shared by every class (SOS + context); ``suffix``: (C, S, D) each class's
    own embeddings (name, '.', EOT, padding); ``suffix_len``: (C,) tokens up to and including EOT.
    """
    pos = bb.text.positional_embedding.to(bb.dtype)
    p = prefix.shape[0]
    groups = _by_length(suffix_len)
    seqs = [suffix[rows, :s].to(bb.dtype) + pos[p:p + s] for s, rows in groups]
    feats = _run_packed(bb, prefix.to(bb.dtype) + pos[:p], seqs)
    return _unsort(feats, groups, suffix.shape[0])
