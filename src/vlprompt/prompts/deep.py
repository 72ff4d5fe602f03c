"""Deep prompts in both towers (IVLP), in the image tower only (VPT-deep) or in the text tower only (deep
language prompting): learned rows that enter the frozen towers as arguments of their forwards.

Text: the prompt is "<phrase> <class>." tokenised; its first ``n_ctx_text`` tokens after the start token (SOS;
none for SigLIP) are learned (from the phrase's embeddings, or N(0, 0.02) with "X" placeholders), the rest of the
phrase stays fixed. At the input of every block 1 <= i < ``depth_text`` those rows are replaced by that block's own
learned rows. All of this is shared by every class, so on a causal tower it is the shared prefix of
`text.fast.encode_shared_prefix`; a bidirectional one computes every class whole (`text.dense`).

Image: ``n_ctx_vision`` learned rows appended after the patch tokens (normalised by ``ln_pre`` with them, no
positional embedding), replaced by each block's own rows at the input of blocks 1 <= i < ``depth_vision``, and
never pooled (`backbones.vit.encode_vit_prompted`).

The official code casts every prompt to fp16 where it enters a tower; ``prompt_rounding="fp16"`` does the same
(the value used is rounded, the float32 master weight is not), ``"none"`` skips it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.backbone import Backbone
from ..errors import VlpromptError
from ..text.dense import encode_dense
from ..text.fast import encode_shared_prefix
from .base import TextClassifier
from .templates import prompt_text

# The deep-prompt code learns the phrase's first tokens only when there are at most this many (else the
# phrase is dropped and the context starts from noise).
MAX_PHRASE_CTX = 4
ROUNDINGS = ("fp16", "none")


def _normal(shape, device) -> nn.Parameter:
    t = torch.empty(shape, dtype=torch.float32, device=device)
    nn.init.normal_(t, std=0.02)
    return nn.Parameter(t)


def phrase_context(bb: Backbone, phrase: Optional[str], n_ctx: int) -> tuple[str, Optional[torch.Tensor]]:
    """(the text the context stands in front of the class name, the initial context or None for noise).

    The ``first_tokens`` rule of the deep-prompt code: with a phrase of at least ``n_ctx`` BPE tokens and
    ``n_ctx`` <= 4, the context is the embeddings of its first ``n_ctx`` tokens and the phrase's remaining
    tokens stay in the prompt, fixed ("a photo of a" with n_ctx = 2: "a photo" learned, "of a" fixed). With
    ``n_ctx`` > 4 the phrase is dropped and the context is noise in front of "X" placeholders."""
    phrase = " ".join((phrase or "").replace("_", " ").split())
    if not phrase or n_ctx > MAX_PHRASE_CTX:
        return bb.placeholder(n_ctx), None
    n_bpe = bb.bpe_length(phrase)
    if n_ctx > n_bpe:
        raise VlpromptError(f"ctx_init '{phrase}' has {n_bpe} tokens, fewer than the {n_ctx} context vectors "
                            "asked for (n_ctx_text)")
    with torch.no_grad():
        ctx = bb.text.token_embedding(bb.tokenize([phrase]))[0, bb.n_start:bb.n_start + n_ctx].float().clone()
    return phrase, ctx


class DeepPrompts(TextClassifier):
    """Deep prompts in either or both towers. ``options`` is the method's Options (the learner's whole
    configuration, saved as it is): it must have ``prompt_rounding`` and the fields of the towers it prompts,
    ``n_ctx_text``/``depth_text``/``ctx_init`` and ``n_ctx_vision``/``depth_vision``, a depth of 0 (or a
    missing field) leaving that tower unprompted; with no text prompts the classes are ``text_template``
    encoded once by the frozen tower."""

    def __init__(self, backbone: Backbone, classnames: Sequence[str], options, method: str):
        super().__init__()
        if not classnames:
            raise VlpromptError(f"{method} needs at least one class name")
        self.__dict__["backbone"] = backbone  # not a submodule: never saved with the prompt
        self.method, self.options, self.classnames = method, options, list(classnames)
        self.n_text = int(getattr(options, "n_ctx_text", 0)) if getattr(options, "depth_text", 0) else 0
        self.depth_text = int(getattr(options, "depth_text", 0)) if self.n_text else 0
        self.n_vision = int(getattr(options, "n_ctx_vision", 0)) if getattr(options, "depth_vision", 0) else 0
        self.depth_vision = int(getattr(options, "depth_vision", 0)) if self.n_vision else 0
        self.rounding = options.prompt_rounding
        if self.rounding not in ROUNDINGS:
            raise VlpromptError(f"{method}: prompt_rounding '{self.rounding}' is not one of {list(ROUNDINGS)}")
        self.from_pixels = self.n_vision > 0
        dev = backbone.device
        self._check_depth("depth_text", self.depth_text, len(backbone.text.blocks), "text")
        if self.n_vision:
            width = self._image_width("depth_vision", self.depth_vision)
            self.vision_ctx = _normal((self.n_vision, width), dev)
            self.vision_deep = nn.ParameterList([_normal((self.n_vision, width), dev)
                                                 for _ in range(self.depth_vision - 1)])
        if self.n_text:
            self.phrase, init = phrase_context(backbone, getattr(options, "ctx_init", None), self.n_text)
            self.ctx_init = self.phrase if init is not None else None  # what the context started from
            self.ctx = nn.Parameter(init.to(dev)) if init is not None else _normal((self.n_text, backbone.ctx_dim), dev)
            self.text_deep = nn.ParameterList([_normal((self.n_text, backbone.ctx_dim), dev)
                                               for _ in range(self.depth_text - 1)])
        self._build_buffers()

    def _image_width(self, key: str, depth: int) -> int:
        """The width of the image tower's tokens, after checking that it takes prompts ``depth`` blocks deep."""
        bb = self.backbone
        if bb.prompted_image_unsupported:
            raise VlpromptError(f"{self.method}: backbone {bb.source.name} cannot take deep visual prompts: "
                                f"{bb.prompted_image_unsupported}")
        visual = bb.model.visual
        self._check_depth(key, depth, len(visual.transformer.resblocks), "image")
        return visual.class_embedding.shape[-1]

    def _check_depth(self, key: str, depth: int, blocks: int, tower: str) -> None:
        if depth > blocks:
            raise VlpromptError(f"{self.method}: {key}={depth}, but the {tower} tower of {self.backbone.source.name} "
                                f"has {blocks} blocks")

    def _build_buffers(self) -> None:
        bb = self.backbone
        names = [prompt_text(c) for c in self.classnames]
        if not self.n_text:  # fixed hand-crafted prompts, encoded once (not saved: rebuilt from the names)
            template = self.options.text_template
            feats = bb.encode_texts([template.format(n) for n in names])
            self.register_buffer("fixed_text", F.normalize(feats, dim=-1), persistent=False)
            return
        texts = [f"{self.phrase} {n}." for n in names]
        tokens = bb.tokenize(texts)
        bb.check_prompts_fit(texts, self.classnames)
        n_prefix = bb.n_start + bb.bpe_length(self.phrase)  # start token(s) + the phrase (context + fixed rest)
        with torch.no_grad():
            embedded = bb.text.token_embedding(tokens).float()
        eot = bb.eot_index(tokens)
        self.register_buffer("token_prefix", embedded[0, :n_prefix].clone(), persistent=False)
        self.register_buffer("token_suffix", embedded[:, n_prefix:].clone(), persistent=False)
        self.register_buffer("eot_idx", eot, persistent=False)
        self.register_buffer("suffix_len", eot + 1 - n_prefix, persistent=False)

    # -- the prompts as the towers take them --------------------------------------------------------
    def _round(self, p: torch.Tensor) -> torch.Tensor:
        """The official code's fp16 cast at insertion: the value used is fp16, and so is the gradient on its way
        back (the cast's backward), before it reaches the float32 master weight."""
        return p.half().float() if self.rounding == "fp16" else p

    def text_prompts(self) -> tuple[torch.Tensor, list]:
        """(shared prefix (P, D): start token(s), context, fixed rest of the phrase; deep rows per block, index 0
        unused)."""
        s = self.backbone.n_start
        prefix = torch.cat([self.token_prefix[:s], self._round(self.ctx), self.token_prefix[s + self.n_text:]])
        return prefix, [None] + [self._round(p) for p in self.text_deep]

    def vision_prompts(self) -> list:
        """Per block, the rows that enter it (block 0: appended; later blocks: replacing)."""
        return [self._round(self.vision_ctx)] + [self._round(p) for p in self.vision_deep] if self.n_vision else []

    def text_features(self) -> torch.Tensor:
        """(C, d) L2-normalised class features, differentiable with respect to the text prompts."""
        if not self.n_text:
            return self.fixed_text
        prefix, deep = self.text_prompts()
        if not self.backbone.text.causal:  # bidirectional (SigLIP): every class whole, at full length
            prompts = torch.cat([prefix.unsqueeze(0).expand(self.n_cls, -1, -1), self.token_suffix], dim=1)
            return F.normalize(encode_dense(self.backbone, prompts, self.eot_idx, deep), dim=-1)
        return F.normalize(encode_shared_prefix(self.backbone, prefix, self.token_suffix, self.suffix_len, deep), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, d) raw image features through the prompted image tower (differentiable)."""
        return self.backbone.encode_images_prompted(images, self.vision_prompts())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of preprocessed images (``from_pixels``), else of frozen image features."""
        feats = self.image_features(x) if self.from_pixels else x
        return self.logits(feats, self.text_features())

    @property
    def n_cls(self) -> int:
        return len(self.classnames)
