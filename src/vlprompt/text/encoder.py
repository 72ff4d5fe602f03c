"""Run prompt embeddings through a frozen CLIP text tower.

`encode_prompt_embeddings` is the path every learner uses. It applies causal truncation: the tower is
causal and pools at the EOT token, so tokens after the longest EOT cannot change any output; the batch
is cut at max(EOT)+1 with the positional embedding and mask sliced to match (exact).
`reference_encode` is the straightforward full-context computation, kept for tests and benchmarks.
"""

from __future__ import annotations

import torch

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


def encode_prompt_embeddings(bb: Backbone, prompts: torch.Tensor, eot_idx: torch.Tensor) -> torch.Tensor:
    """Text features (C, d) in float32 for prompt embeddings (C, L, D) pooled at ``eot_idx`` (C,).

    Differentiable with respect to ``prompts``; the tower's own weights are frozen.
    """
    length = int(eot_idx.max().item()) + 1
    pos = bb.text.positional_embedding[:length]
    x = prompts[:, :length].to(bb.dtype) + pos.to(bb.dtype)
    x = _run_blocks(bb, x, length)
    rows = x[torch.arange(x.shape[0], device=x.device), eot_idx]
    # LayerNorm acts per token, so normalising only the pooled rows is exact.
    return bb.text.project(bb.text.ln_final(rows)).float()


def reference_encode(bb: Backbone, prompts: torch.Tensor, eot_idx: torch.Tensor) -> torch.Tensor:
    """The official CoOp computation: all ``context_length`` tokens through every layer, then pool."""
    length = bb.context_length
    x = prompts.to(bb.dtype) + bb.text.positional_embedding.to(bb.dtype)
    x = _run_blocks(bb, x, length)
    x = bb.text.ln_final(x)
    rows = x[torch.arange(x.shape[0], device=x.device), eot_idx]
    return bb.text.project(rows).float()
