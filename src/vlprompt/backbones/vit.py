"""Exact shortcut through a frozen open_clip ViT image tower.

A ViT with class-token pooling reads only the class token of the last layer. In that layer every token
still supplies keys and values, but the query, the attention output, the output projection and the MLP
are needed for the class token alone: about 7% of a ViT-B/16 forward pass that open_clip computes and
throws away. Attention runs through `scaled_dot_product_attention` (one fused kernel) instead of
`nn.MultiheadAttention`'s separate score, softmax and weighted-sum steps, except in bf16 on CPU, where a
plain per-image product with a float32 softmax is faster; GELU and QuickGELU run in place. The result
equals ``model.encode_image`` up to floating-point rounding. Inference only (frozen tower).

Towers this does not cover (ResNets, average or attentional pooling, blocks with parts it does not compute
(`vlprompt.backbones.blocks.block_unsupported`: blocks are recognised by their parts, not their class), timm
towers, an open_clip without the private ``VisionTransformer._embeds`` it reuses) use open_clip's own
forward: `fast_image_unsupported` names the reason.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VlpromptError
from .blocks import block_unsupported, open_clip_version, read_parts
from .lora import LowRankQKV, adapted_qkv

# Recorded in the feature-cache key: features from another implementation are never mixed in.
FAST_IMAGE_ID = "vit-cls-last-layer+sdpa/v2"


@lru_cache(maxsize=1)
def _open_clip_classes() -> tuple:
    """(VisionTransformer, QuickGELU) from open_clip.transformer, None for a name this open_clip lacks;
    looked up once."""
    try:
        from open_clip import transformer
    except Exception:
        return None, None
    return getattr(transformer, "VisionTransformer", None), getattr(transformer, "QuickGELU", None)


def fast_image_unsupported(visual: nn.Module) -> Optional[str]:
    """None when `encode_vit_cls` can run this image tower, else why not (the tower then runs open_clip's
    own forward)."""
    vision_transformer, _ = _open_clip_classes()
    if vision_transformer is None:
        return f"open_clip {open_clip_version()} has no open_clip.transformer.VisionTransformer"
    if type(visual) is not vision_transformer:
        return f"image tower {type(visual).__name__} is not open_clip's VisionTransformer"
    if getattr(visual, "attn_pool", None) is not None:
        return "attentional pooling"
    if getattr(visual, "pool_type", "tok") != "tok":
        return f"pooling '{visual.pool_type}' (needs class-token pooling)"
    if getattr(visual, "output_tokens", False):
        return "the tower returns its tokens"
    # Besides its blocks the shortcut uses open_clip's own (private) patch embedding, so that patches, class
    # token, positions, patch dropout and ln_pre stay open_clip's, then the final norm and the projection.
    missing = [] if callable(getattr(visual, "_embeds", None)) else ["_embeds"]
    missing += [n for n in ("ln_post", "proj") if not hasattr(visual, n)]
    if not isinstance(getattr(getattr(visual, "transformer", None), "resblocks", None), nn.ModuleList):
        missing.append("transformer.resblocks")
    if missing:
        return f"open_clip {open_clip_version()}: VisionTransformer has no {', '.join(missing)}"
    for i, block in enumerate(visual.transformer.resblocks):
        why = block_unsupported(block)
        if why is not None:
            return f"open_clip {open_clip_version()}: image block {i} ({type(block).__name__}): {why}"
    return None


def _attend(block: nn.Module, x: torch.Tensor, query_rows: Optional[int], per_image: bool = True,
            adapter: Optional[LowRankQKV] = None, index: int = 0) -> torch.Tensor:
    """Self-attention of one block on (B, N, D) with queries for every token, or the first ``query_rows``;
    ``per_image``: bf16 on CPU one image at a time (`_attend_per_image`, inference only); ``adapter``: low-rank
    updates of the projections (`lora`), ``index`` the block's position in the tower."""
    parts = read_parts(block)  # checked by fast_image_unsupported
    h = parts.ln_1(x)
    first_rows = None if query_rows is None else (lambda t: t[:, :query_rows])
    q, k, v = adapted_qkv(adapter, index, h, parts.in_proj_weight, parts.in_proj_bias, first_rows)
    q, k, v = (t.unflatten(-1, (parts.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, N, hd)
    if per_image and query_rows is None and x.device.type == "cpu" and x.dtype == torch.bfloat16:
        out = _attend_per_image(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    return parts.out_proj(out)


def _attend_per_image(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """bf16 attention on CPU one image at a time: (B, H, N, hd) each -> (B, N, D). Scores and
    probabilities of one image stay in cache, the softmax runs in float32; measured about 5% of a ViT-B/16
    batch faster than the fused CPU kernel in bf16, with the same error against fp32 (in fp32 the fused
    kernel is faster, so it keeps it)."""
    b, h, n, hd = q.shape
    out = torch.empty(b, n, h * hd, dtype=q.dtype, device=q.device)
    for i in range(b):
        scores = (q[i] @ k[i].transpose(-1, -2)).mul_(hd ** -0.5)
        out[i] = (scores.float().softmax(dim=-1).to(q.dtype) @ v[i]).transpose(0, 1).flatten(1)
    return out


MLP_PARTS = ["c_fc", "gelu", "c_proj"]  # open_clip's ResidualAttentionBlock MLP, the only one computed by hand


def _mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP. QuickGELU (the OpenAI models' activation) is computed in place: bit-identical to
    open_clip's ``x * sigmoid(1.702 x)`` at half the memory traffic (inference only: nothing is saved for a
    backward pass)."""
    _, quick_gelu = _open_clip_classes()
    mlp = block.mlp
    if not (isinstance(mlp, nn.Sequential) and [n for n, _ in mlp.named_children()] == MLP_PARTS):
        return mlp(x)  # another layout (e.g. a norm inside, as open_clip's custom blocks may have)
    act = mlp.gelu
    if quick_gelu is not None and type(act) is quick_gelu:
        h = mlp.c_fc(x)
        return mlp.c_proj(torch.mul(h, 1.702).sigmoid_().mul_(h))
    if type(act) is nn.GELU:  # in place: bit-identical, and a fresh (B, N, 4D) buffer costs more than GELU
        return mlp.c_proj(torch.ops.aten.gelu_(mlp.c_fc(x), approximate=act.approximate))
    return mlp(x)


@torch.inference_mode()
def encode_vit_cls(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, d) pooled, projected features of a class-token ViT; equals ``visual(images)``.

    The caller has checked `fast_image_unsupported(visual)` and passes images in the tower's dtype."""
    x = visual._embeds(images)  # patches + class token + positions (+ ln_pre), open_clip's own
    if not (isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[0] == images.shape[0]):
        raise VlpromptError(f"open_clip {open_clip_version()}: VisionTransformer._embeds no longer returns "
                            "(batch, tokens, width) embeddings; vlprompt's image shortcut cannot use it")
    blocks = visual.transformer.resblocks
    for i, block in enumerate(blocks):
        if i < len(blocks) - 1:
            x = x + block.ls_1(_attend(block, x, None))
        else:  # only the class token's row is read after the last layer
            x = x[:, :1] + block.ls_1(_attend(block, x, 1))
        x = x + block.ls_2(_mlp(block, block.ln_2(x)))
    pooled = visual.ln_post(x[:, 0])  # per-token norm: the same before or after pooling
    return pooled if visual.proj is None else pooled @ visual.proj


# ----------------------------------------------------------------------------------------------
# The prompted image tower: deep visual prompts as arguments of a differentiable forward
# ----------------------------------------------------------------------------------------------

def prompted_image_unsupported(visual: nn.Module) -> Optional[str]:
    """None when `encode_vit_prompted` can run this image tower, else why not. Prompt tokens need a ViT
    (a ResNet has no tokens); any block open_clip builds is run, through its own forward where the shortcut
    does not recognise it."""
    vision_transformer, _ = _open_clip_classes()
    if vision_transformer is None or type(visual) is not vision_transformer:
        if type(visual).__name__ == "TimmModel":
            return ("its image tower is timm's (open_clip's TimmModel), whose blocks vlprompt does not enter; prompts "
                    "and updates of the image tower need open_clip's own ViT")
        return f"image tower {type(visual).__name__} is not a ViT (deep visual prompts are tokens of a ViT)"
    missing = [n for n in ("conv1", "class_embedding", "positional_embedding", "patch_dropout", "ln_pre", "ln_post",
                           "proj", "transformer") if not hasattr(visual, n)]
    if missing:
        return f"open_clip {open_clip_version()}: VisionTransformer has no {', '.join(missing)}"
    if getattr(visual, "output_tokens", False):
        return "the tower returns its tokens"
    return None


def _prompt_rows(prompt: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, D) prompt -> (B, N, D) rows in the tower's dtype (differentiable)."""
    return prompt.to(dtype).unsqueeze(0).expand(batch, -1, -1)


def encode_vit_prompted(visual: nn.Module, images: torch.Tensor, prompts: list,
                        adapter: Optional[LowRankQKV] = None) -> torch.Tensor:
    """(B, d) pooled, projected features of a ViT with deep visual prompts; differentiable with respect to the
    prompts (the tower's own weights stay frozen). ``prompts[0]`` (N, D) is appended after the patch tokens,
    with no positional embedding, and normalised by ``ln_pre`` together with them; ``prompts[i]`` for i >= 1
    (None: keep) replaces the last N rows at the input of block i, before its ``ln_1``. The prompt rows are
    never pooled. With an empty list this is the frozen tower's forward. ``adapter``: low-rank updates of the blocks'
    query, key and value projections (`lora`; the blocks must be ones the fast paths compute from their parts).

    The caller has checked `prompted_image_unsupported(visual)` and passes images in the tower's dtype."""
    b = images.shape[0]
    x = visual.conv1(images)
    x = x.reshape(b, x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(b, 1, -1), x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)  # identity in eval mode; before the prompts, so they are never dropped
    n = 0
    if prompts and prompts[0] is not None:
        n = prompts[0].shape[0]
        x = torch.cat([x, _prompt_rows(prompts[0], b, x.dtype)], dim=1)
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    by_class_token = fast_image_unsupported(visual) is None  # class-token pooling and recognised blocks
    if adapter is not None and not by_class_token:
        why = next((f"block {i}: {w}" for i, w in enumerate(map(block_unsupported, blocks)) if w), None)
        if why is not None:
            raise VlpromptError(f"open_clip {open_clip_version()}: low-rank updates need image blocks computed from "
                                f"their parts; {why}")
    by_parts = by_class_token or adapter is not None
    for i, block in enumerate(blocks):
        if 0 < i < len(prompts) and prompts[i] is not None:
            if prompts[i].shape[0] != n:
                raise VlpromptError(f"deep visual prompt of block {i} has {prompts[i].shape[0]} rows, layer 0 has {n}")
            x = torch.cat([x[:, :x.shape[1] - n], _prompt_rows(prompts[i], b, x.dtype)], dim=1)
        if not by_parts:
            x = block(x)
        elif i < len(blocks) - 1 or not by_class_token:
            x = x + block.ls_1(_attend(block, x, None, per_image=False, adapter=adapter, index=i))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        else:  # only the class token's row is read after the last layer
            x = x[:, :1] + block.ls_1(_attend(block, x, 1, adapter=adapter, index=i))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
    if by_class_token:
        pooled = visual.ln_post(x[:, 0])
    else:
        pooled, _ = visual._pool(x[:, :x.shape[1] - n])  # prompt rows are never pooled (average, attention)
    return pooled if visual.proj is None else pooled @ visual.proj
