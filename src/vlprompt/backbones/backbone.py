"""The frozen CLIP-like model behind every prompt learner.

`Backbone` wraps an open_clip model and exposes exactly what prompt tuning needs: the image encoder,
the tokenizer, and the parts of the text tower (token embedding, positional embedding, blocks, final
norm, projection, pooling rule, causal mask, logit scale). Everything is frozen and kept in eval mode:
CoOp's official trainer never switches the encoders to train mode, so BatchNorm statistics of the
ResNet image towers stay fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import VlpromptError
from .blocks import attention_parts
from .preprocess import Preprocess, from_open_clip
from .tokenizer import Tokens
from .vit import FAST_IMAGE_ID, encode_vit_cls, encode_vit_prompted, fast_image_unsupported, prompted_image_unsupported

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BackboneSource:
    """Where the weights came from; recorded in every run and prompt so `eval` can rebuild it."""

    name: str  # open_clip architecture name, or the path of an architecture JSON
    pretrained: Optional[str] = None  # a pretrained tag ("openai", ...) when loaded from a hub
    weights: Optional[str] = None  # a local weights file
    random_init_seed: Optional[int] = None  # set when the weights are random
    quick_gelu: bool = False  # asked for when the model was built
    # The activation the built model computes, read from its modules (`model_activation`): a plain state
    # dict does not say whether it was trained with QuickGELU (the OpenAI models) or GELU. Set by `Backbone`.
    activation: Optional[str] = None

    @property
    def is_random(self) -> bool:
        return self.pretrained is None and self.weights is None

    def describe(self) -> str:
        act = f" activation={self.activation}" if self.activation else ""
        if self.weights:
            return f"{self.name} weights={self.weights}{act}"
        if self.pretrained:
            return f"{self.name} pretrained={self.pretrained}{act}"
        return f"{self.name} RANDOM (seed {self.random_init_seed}){act}"


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's weights (the first 64 values of every tensor, rounded to bfloat16 so that
    every precision gives the same hash): which backbone a prompt was trained on, beyond its name and width."""
    import hashlib

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                sample = tensor.detach().reshape(-1)[:64].to(torch.bfloat16).float().cpu()
                digest.update(name.encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_activation(model: nn.Module) -> str:
    """The MLP activation ``model`` computes, from its modules: "quickgelu" (open_clip's QuickGELU, the
    OpenAI models'), "gelu" (``nn.GELU``), "mixed" when both occur, "none" when neither does."""
    kinds = set()
    for module in model.modules():
        if type(module).__name__ == "QuickGELU":
            kinds.add("quickgelu")
        elif isinstance(module, nn.GELU):
            kinds.add("gelu")
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")


class TextTower:
    """References to the parts of an open_clip text transformer (no copies): causal CLIP towers pooled at the
    end-of-text token, and bidirectional ones (SigLIP, SigLIP 2: no mask, pooled at the last position), which only
    the dense full-length path (`text.dense.encode_dense`) computes exactly."""

    def __init__(self, owner: nn.Module, arch: str):
        transformer = owner.transformer
        self.causal: bool = getattr(owner, "attn_mask", None) is not None
        if getattr(owner, "cls_emb", None) is not None:
            raise VlpromptError(f"backbone {arch}: text towers with an appended CLS token are not supported")
        if getattr(owner, "use_pad_mask", False):
            raise VlpromptError(f"backbone {arch}: text towers that mask their padding are not supported")
        pool = getattr(owner, "text_pool_type", None) or getattr(owner, "pool_type", "argmax")
        if pool not in ("argmax", "eos", "last"):
            raise VlpromptError(
                f"backbone {arch}: text pooling '{pool}' is not supported (need 'argmax', 'eos' or 'last' pooling)"
            )
        self.pool_type = pool
        self.eos_id = getattr(owner, "text_eos_id", None) or getattr(owner, "eos_id", None)
        self.token_embedding: nn.Embedding = owner.token_embedding
        self.positional_embedding: torch.Tensor = owner.positional_embedding
        self.blocks = list(transformer.resblocks)
        for i, block in enumerate(self.blocks):  # recognised by the parts the exact text path computes with
            try:
                attention_parts(block)
            except VlpromptError as exc:
                raise VlpromptError(f"backbone {arch}: text block {i} is not supported: {exc}") from None
        self.batch_first: bool = getattr(transformer, "batch_first", True)
        self.ln_final: nn.Module = owner.ln_final
        self.text_projection = owner.text_projection
        self.attn_mask: Optional[torch.Tensor] = owner.attn_mask if self.causal else None
        self.width: int = owner.token_embedding.weight.shape[1]
        self.context_length: int = owner.positional_embedding.shape[0]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


class Backbone(nn.Module):
    """A frozen open_clip model plus its tokenizer and preprocessing constants."""

    def __init__(self, model: nn.Module, tokenizer, source: BackboneSource, precision: str = "fp32",
                 device: str = "cpu", preprocess: Optional[Preprocess] = None):
        super().__init__()
        if precision not in PRECISIONS:
            raise VlpromptError(f"precision '{precision}' is not one of {sorted(PRECISIONS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.tokens = Tokens(tokenizer)
        self.activation: str = model_activation(model)
        self.source = replace(source, activation=self.activation)  # recorded in metrics via describe()
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.device = torch.device(device)
        owner = model.text if hasattr(model, "text") else model
        arch = source.name
        self.text = TextTower(owner, arch)
        if self.text.pool_type == "eos" and self.text.eos_id is None:
            raise VlpromptError(f"backbone {arch}: 'eos' pooling without an eos token id")
        # The pretrained tag's normalisation, interpolation and test resize (`preprocess`), given by the loader.
        self.preprocess: Preprocess = preprocess or from_open_clip(model)
        self.image_size: int = self.preprocess.size
        self.image_mean, self.image_std = self.preprocess.mean, self.preprocess.std
        with torch.no_grad():
            self.logit_scale: float = float(model.logit_scale.exp().item())
            bias = getattr(model, "logit_bias", None)  # SigLIP's: part of every logit
            self.logit_bias: Optional[float] = float(bias.item()) if bias is not None else None
        self.embed_dim: int = int(self._probe_embed_dim())
        # The exact class-token shortcut where the tower allows it, open_clip's own forward otherwise.
        self.fast_image_unsupported: Optional[str] = fast_image_unsupported(model.visual)
        self.image_encoder_id = "open_clip" if self.fast_image_unsupported else FAST_IMAGE_ID
        self.prompted_image_unsupported: Optional[str] = prompted_image_unsupported(model.visual)
        # Frozen: no gradients for any backbone weight, eval mode forever, weights cast once
        # (bf16 autocast is slow on CPU for open_clip's attention; a one-off cast is not).
        self.fingerprint: str = weights_fingerprint(model)
        for p in model.parameters():
            p.requires_grad_(False)
        model.to(device=self.device, dtype=self.dtype)
        model.eval()

    def _probe_embed_dim(self) -> int:
        proj = self.text.text_projection
        if proj is None:
            return self.text.width
        if isinstance(proj, nn.Linear):
            return proj.out_features
        return proj.shape[1]

    # Freezing: train() must never switch the encoders out of eval mode.
    def train(self, mode: bool = True):  # noqa: D102 - documented in the class docstring
        return super().train(False)

    @property
    def ctx_dim(self) -> int:
        return self.text.width

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def bpe_length(self, text: str) -> int:
        """Number of tokens of a piece of text (without start / end tokens)."""
        return len(self.tokens.encode(text))

    def placeholder(self, n: int) -> str:
        """``n`` "X" words, the text that stands where ``n`` learned context rows go: one token each, checked (a
        tokenizer that splits "X" would shift every row after the context)."""
        text = " ".join(["X"] * n)
        tokens = self.bpe_length(text)
        if tokens != n:
            raise VlpromptError(f"backbone {self.source.name}: its tokenizer spells {n} placeholder words 'X' with "
                                f"{tokens} tokens; learned context rows need one token each")
        return text

    def check_prompts_fit(self, texts: Sequence[str], classnames: Sequence[str], detail: str = "") -> None:
        """One error line naming the first class whose prompt (``texts[i]`` for ``classnames[i]``) the tokenizer
        would cut to the context length."""
        too_long = [classnames[i] for i in self.tokens.overflowing(texts)]
        if too_long:
            name = too_long[0]
            raise VlpromptError(f"class name too long for the {self.context_length}-token context{detail}: "
                                f"{name[:80]!r}" + (f" ({len(name):,} characters)" if len(name) > 80 else ""))

    @property
    def n_start(self) -> int:
        """Special tokens before a text (1: CLIP's start token; 0: SigLIP's tokenizers have none)."""
        return self.tokens.n_start

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the pooled token of each tokenized prompt, by the tower's pooling rule (``last``: the last
        position, whatever the text)."""
        if self.text.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.text.pool_type == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        return (tokens == self.text.eos_id).int().argmax(dim=-1)

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) image features in float32 for a batch of preprocessed images."""
        images = images.to(self.device, self.dtype, non_blocking=True)
        if self.fast_image_unsupported is None:
            return encode_vit_cls(self.model.visual, images).float()
        return self.model.encode_image(images).float()

    def encode_images_prompted(self, images: torch.Tensor, prompts: Sequence[Optional[torch.Tensor]],
                               adapter=None) -> torch.Tensor:
        """Raw float32 image features with deep visual prompts (`vit.encode_vit_prompted`) and low-rank updates
        of the attention projections (``adapter``, `lora.LowRankQKV`), differentiable with respect to both: they
        are arguments, never state on the backbone, so one backbone serves a frozen teacher and any number of
        adapted learners."""
        if self.prompted_image_unsupported is not None:
            raise VlpromptError(f"backbone {self.source.name}: deep visual prompts cannot enter its image tower: "
                                f"{self.prompted_image_unsupported}")
        return encode_vit_prompted(self.model.visual, images.to(self.device, self.dtype, non_blocking=True), list(prompts),
                                   adapter).float()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """open_clip's own text encoding of plain strings (hand-crafted prompts), float32, unnormalised."""
        out = []
        for i in range(0, len(texts), batch_size):
            out.append(self.model.encode_text(self.tokenize(texts[i:i + batch_size])).float())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)
