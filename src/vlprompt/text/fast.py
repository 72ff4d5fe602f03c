"""Exact shortcuts through a frozen, causal CLIP text tower (DESIGN.md, Performance 1-2).

Both paths run the tower's own weights block by block with a plain matmul + softmax attention (PyTorch's
fused CPU attention backward is slow for many short sequences, especially in bf16):

- `encode_truncated`: prompts (C, L, D) cut at the longest EOT + 1; nothing after an EOT can change a
  causal tower's pooled output. Any layout.
- `encode_shared_prefix`: one context shared by every class with the class name at the end, so positions
  0..M (SOS + context) are identical for every class in every layer. They are computed once (batch 1);
  each class then runs only its own tokens (name, '.', EOT) against the shared keys/values plus its own
  causal keys/values. Classes are grouped by suffix length, so no padding is computed. Gradients reach
  the context through the shared keys, values and activations.

In the last layer only the EOT row is needed, so only that query is computed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..backbones.backbone import Backbone


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, H, L, D/H)."""
    b, length, d = x.shape
    return x.view(b, length, n_heads, d // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, hd) -> (B, L, H*hd)."""
    b, h, length, hd = x.shape
    return x.transpose(1, 2).reshape(b, length, h * hd)


def _qkv(block, x_norm: torch.Tensor):
    attn = block.attn
    q, k, v = F.linear(x_norm, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    h = attn.num_heads
    return _heads(q, h), _heads(k, h), _heads(v, h)


def _attend(q, k, v, causal_offset: int, k_prefix=None, v_prefix=None) -> torch.Tensor:
    """Softmax attention of queries ``q`` (B, H, Lq, hd) over optional shared prefix keys (1, H, P, hd)
    plus own keys ``k`` (B, H, Lk, hd) with a causal rule: query i (at own position i + causal_offset)
    sees own keys j <= i + causal_offset. Softmax in float32 for stability in bf16."""
    scale = q.shape[-1] ** -0.5
    scores = (q * scale) @ k.transpose(-1, -2)
    lq, lk = q.shape[-2], k.shape[-2]
    qi = torch.arange(lq, device=q.device).unsqueeze(1) + causal_offset
    mask = torch.arange(lk, device=q.device).unsqueeze(0) > qi
    scores = scores.float().masked_fill(mask, float("-inf"))
    if k_prefix is not None:
        pre = ((q * scale) @ k_prefix.transpose(-1, -2)).float()
        probs = torch.cat([pre, scores], dim=-1).softmax(dim=-1).to(q.dtype)
        p = k_prefix.shape[-2]
        return probs[..., :p] @ v_prefix + probs[..., p:] @ v
    return scores.softmax(dim=-1).to(q.dtype) @ v


def _block(block, x: torch.Tensor, last: bool, prefix_kv: Optional[tuple] = None, offset: int = 0):
    """One pre-LN residual block. Returns (output, (k, v) of this input) ; with ``last`` only the final
    row of each sequence is computed."""
    h = block.ln_1(x)
    q, k, v = _qkv(block, h)
    if last:
        q = q[:, :, -1:]
        x = x[:, -1:]
        offset = offset + k.shape[-2] - 1
    kp, vp = prefix_kv if prefix_kv is not None else (None, None)
    a = _merge(_attend(q, k, v, offset, kp, vp))
    x = x + block.ls_1(block.attn.out_proj(a))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, (k, v)


def _pool(bb: Backbone, rows: torch.Tensor) -> torch.Tensor:
    return bb.text.project(bb.text.ln_final(rows)).float()


def encode_truncated(bb: Backbone, prompts: torch.Tensor, eot_idx: torch.Tensor) -> torch.Tensor:
    """(C, d) float32 features of prompt embeddings (C, L, D) pooled at ``eot_idx``; exact, any layout.

    Classes are grouped by EOT position so every sequence is cut at its own EOT (no padding)."""
    out = torch.empty(prompts.shape[0], bb.embed_dim, device=prompts.device)
    pos = bb.text.positional_embedding.to(bb.dtype)
    blocks = bb.text.blocks
    for e in torch.unique(eot_idx).tolist():
        rows = (eot_idx == e).nonzero().squeeze(1)
        x = prompts[rows, :e + 1].to(bb.dtype) + pos[:e + 1]
        for i, block in enumerate(blocks):
            x, _ = _block(block, x, last=i == len(blocks) - 1)
        out = out.index_put((rows,), _pool(bb, x[:, -1]))
    return out


def encode_shared_prefix(bb: Backbone, prefix: torch.Tensor, suffix: torch.Tensor,
                         suffix_len: torch.Tensor) -> torch.Tensor:
    """(C, d) float32 features for prompts ``[prefix, suffix_c[:suffix_len_c]]`` pooled at their last token.

    ``prefix``: (P, D) embeddings shared by every class (SOS + context); ``suffix``: (C, S, D) each class's
    own embeddings (name, '.', EOT, padding); ``suffix_len``: (C,) tokens up to and including EOT.
    """
    blocks = bb.text.blocks
    pos = bb.text.positional_embedding.to(bb.dtype)
    p = prefix.shape[0]
    # The shared prefix once, keeping each layer's keys and values for the classes' own tokens.
    x = (prefix.to(bb.dtype) + pos[:p]).unsqueeze(0)
    kv = []
    for block in blocks:
        x, pair = _block(block, x, last=False)
        kv.append(pair)
    out = torch.empty(suffix.shape[0], bb.embed_dim, device=suffix.device)
    for s in torch.unique(suffix_len).tolist():
        rows = (suffix_len == s).nonzero().squeeze(1)
        y = suffix[rows, :s].to(bb.dtype) + pos[p:p + s]
        for i, block in enumerate(blocks):
            y, _ = _block(block, y, last=i == len(blocks) - 1, prefix_kv=kv[i])
        out = out.index_put((rows,), _pool(bb, y[:, -1]))
    return out
