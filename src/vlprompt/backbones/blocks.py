"""Recognising the transformer blocks of open_clip towers by their parts (text and image towers alike).

The exact fast paths (`vlprompt.text.fast`, `vlprompt.backbones.vit`) compute a block from its parts instead
of calling it; a block is accepted only when those parts are everything it computes.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import chain
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..errors import VlpromptError

BLOCK_PARTS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")
ATTENTION_TENSORS = ("in_proj_weight", "in_proj_bias")  # the attention's own tensors; out_proj is called
NEEDS = "ln_1, attn (in_proj_weight, in_proj_bias, num_heads, out_proj), ls_1, ln_2, mlp, ls_2 and nothing else"
_INERT = (nn.Identity, nn.Dropout)  # parts that change nothing in eval mode (a frozen backbone never trains)


class BlockParts(NamedTuple):
    """The modules and tensors of one pre-norm residual attention block that the fast paths compute with
    (references into the block: read them again after the model is cast or moved)."""

    ln_1: nn.Module
    in_proj_weight: torch.Tensor  # (3 D, D): query, key and value projections stacked
    in_proj_bias: Optional[torch.Tensor]  # (3 D,) or None
    heads: int
    out_proj: nn.Module
    ls_1: nn.Module
    ln_2: nn.Module
    mlp: nn.Module
    ls_2: nn.Module


@lru_cache(maxsize=1)
def open_clip_version() -> str:
    try:
        from importlib.metadata import version

        return version("open_clip_torch")
    except Exception:  # not installed as a distribution (a source checkout)
        try:
            import open_clip

            return str(getattr(open_clip, "__version__", "unknown"))
        except Exception:
            return "unknown"


def block_unsupported(block: nn.Module) -> Optional[str]:
    """None when the fast paths compute exactly what ``block`` does, else what it lacks or adds, in words.

    Attention is recognised by its parts, not its class: open_clip's ``nn.MultiheadAttention`` and its own
    ``Attention`` (``block_type: custom``) both qualify when they hold nothing but a packed in-projection,
    a head count and an output projection (plus parts that are identities in eval mode). Anything else that
    would change the result (q/k norms, cosine attention, head scales, separate key/value projections,
    cross-attention, extra block parts) is named."""
    missing = [n for n in BLOCK_PARTS if not isinstance(getattr(block, n, None), nn.Module)]
    if missing:
        return f"it has no {', '.join(missing)}"
    if hasattr(block, "ln_1_kv"):
        return "it is a cross-attention block (ln_1_kv)"
    extra = [n for n, m in block.named_children() if n not in BLOCK_PARTS and not isinstance(m, _INERT)]
    if extra:
        return f"it has parts the fast paths would skip: {', '.join(extra)}"
    attn = block.attn
    kind = f"its attention ({type(attn).__name__})"
    w = getattr(attn, "in_proj_weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.shape[0] != 3 * w.shape[1]:
        return f"{kind} has no packed (3 D, D) in_proj_weight"
    width = w.shape[1]
    if not hasattr(attn, "in_proj_bias"):
        return f"{kind} has no in_proj_bias (a tensor or None)"
    b = attn.in_proj_bias
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (3 * width,)):
        return f"{kind} has an in_proj_bias that is not a ({3 * width},) tensor"
    heads = getattr(attn, "num_heads", None)
    if not isinstance(heads, int) or heads <= 0 or width % heads:
        return f"{kind} has no num_heads dividing its width {width}"
    if not isinstance(getattr(attn, "out_proj", None), nn.Module):
        return f"{kind} has no out_proj module"
    scale = getattr(attn, "scale", None)
    if isinstance(scale, (int, float)) and not math.isclose(scale, (width // heads) ** -0.5, rel_tol=1e-6):
        return f"{kind} scales its scores by {scale}, not 1/sqrt(head dim)"
    if getattr(attn, "add_zero_attn", False):
        return f"{kind} adds a zero key (add_zero_attn)"
    unknown = [n.split(".")[0] for n, t in chain(attn.named_parameters(), attn.named_buffers())
               if t is not None and n not in ATTENTION_TENSORS and not n.startswith("out_proj.")]
    # Parameter-free parts that are not identities could change the result too (those with parameters
    # are named above).
    unknown += [n for n, m in attn.named_children()
                if n != "out_proj" and not isinstance(m, _INERT) and not any(True for _ in m.parameters())]
    if unknown:
        return f"{kind} has {', '.join(dict.fromkeys(unknown))}, which the fast paths do not compute"
    return None


def attention_parts(block: nn.Module) -> BlockParts:
    """The parts of ``block`` the fast paths compute with; a `VlpromptError` naming the open_clip version
    and what is missing when the block is not one they can run exactly (see `block_unsupported`)."""
    why = block_unsupported(block)
    if why is not None:
        raise VlpromptError(f"open_clip {open_clip_version()}, block {type(block).__name__}: {why} (vlprompt's "
                            f"exact fast paths need blocks of {NEEDS})")
    return read_parts(block)


def read_parts(block: nn.Module) -> BlockParts:
    """`attention_parts` without the check, for blocks already accepted (the fast paths' inner loops)."""
    attn = block.attn
    return BlockParts(block.ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.num_heads, attn.out_proj,
                      block.ls_1, block.ln_2, block.mlp, block.ls_2)
