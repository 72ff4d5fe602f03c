"""CoOp: learned context vectors in place of a hand-written prompt.

Per class, the tokenized prompt is ``[SOS] X x M  name-tokens . [EOT] pad...``. Its token embeddings
are frozen buffers; the M context vectors are the only parameters. The layout decides where the class
name goes relative to the context: ``end`` (paper default), ``middle`` (first floor(M/2) context vectors,
the name, the rest) or ``front``. Moving the name never changes a prompt's length, so the EOT position
is the one of the tokenized placeholder prompt.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.backbone import Backbone
from ..errors import VlpromptError
from ..text.dense import encode_dense
from ..text.fast import encode_shared_prefix, encode_truncated
from .base import TextClassifier
from .templates import prompt_text

POSITIONS = ("end", "middle", "front")
CTX_INIT_RULES = ("words", "tokens", "first_tokens")


def init_phrase(ctx_init: Optional[str], rule: str) -> tuple[Optional[str], Optional[int]]:
    """(phrase, number of learned vectors) of a ``ctx_init``. ``words`` is the official CoOp rule: underscores
    are spaces (``a_photo_of_a``) and one vector is learned per word, taken from the phrase's first token
    embeddings; tokens beyond them stay frozen in front of the class name. ``tokens`` learns one vector per
    BPE token of the phrase as written (how prompts saved before the rule was recorded were read).
    ``first_tokens`` is the deep-prompt code's rule: the first ``n_ctx`` BPE tokens are learned and the rest of
    the phrase stays fixed in front of the class name ("a photo of a" with n_ctx = 2: "of a" fixed)."""
    if rule not in CTX_INIT_RULES:
        raise VlpromptError(f"ctx_init_rule: '{rule}' is not one of {list(CTX_INIT_RULES)}")
    phrase = (ctx_init or "").strip()
    if rule in ("words", "first_tokens"):
        phrase = " ".join(phrase.replace("_", " ").split())
    if not phrase:
        return None, None
    return phrase, (len(phrase.split()) if rule == "words" else None)


def _layout_index(n_cls_tokens: int, n_ctx: int, name_len: int, position: str, n_start: int = 1) -> list[int]:
    """Order in which rows of ``[start tokens (SOS for CLIP, none for SigLIP), ctx_1..ctx_M, suffix...]`` form the
    prompt of one class."""
    total = n_cls_tokens
    start = list(range(n_start))
    ctx = list(range(n_start, n_start + n_ctx))
    name = list(range(n_start + n_ctx, n_start + n_ctx + name_len))
    rest = list(range(n_start + n_ctx + name_len, total))
    if position == "end":
        order = start + ctx + name + rest
    elif position == "middle":
        half = n_ctx // 2
        order = start + ctx[:half] + name + ctx[half:] + rest
    else:  # front
        order = start + name + ctx + rest
    return order


class CoOp(TextClassifier):
    """CoOp prompt learner.

    ``n_ctx``: number of context vectors M (ignored when ``ctx_init`` is given: M is then its number of words,
    or of BPE tokens with ``ctx_init_rule="tokens"``; see `init_phrase`).
    ``ctx_init``: a phrase such as "a photo of a" whose token embeddings initialise the context; otherwise
    i.i.d. N(0, 0.02^2). ``csc``: one context per class. ``class_token_position``: end / middle / front.
    The official code silently ignores ``csc`` when ``ctx_init`` is set; here that combination is an error
    unless ``allow_unified_fallback=True`` reproduces the official behaviour.
    """

    method = "coop"

    def __init__(self, backbone: Backbone, classnames: Sequence[str], n_ctx: int = 16,
                 ctx_init: Optional[str] = None, csc: bool = False, class_token_position: str = "end",
                 allow_unified_fallback: bool = False, ctx_init_rule: str = "words"):
        super().__init__()
        if class_token_position not in POSITIONS:
            raise VlpromptError(f"class_token_position '{class_token_position}' is not one of {list(POSITIONS)}")
        if not classnames:
            raise VlpromptError("CoOp needs at least one class name")
        ctx_init, n_words = init_phrase(ctx_init, ctx_init_rule)
        self.ctx_init_rule = ctx_init_rule
        if ctx_init and csc:
            if not allow_unified_fallback:
                raise VlpromptError(
                    "ctx_init and csc cannot be combined (the official code silently falls back to a unified "
                    "context; pass allow_unified_fallback=True to do the same)"
                )
            csc = False
        self.__dict__["backbone"] = backbone  # not a submodule: never saved with the prompt
        self.classnames = list(classnames)
        self.ctx_init = ctx_init
        self.csc = bool(csc)
        self.class_token_position = class_token_position
        dim = backbone.ctx_dim
        dev = backbone.device
        emb = backbone.text.token_embedding

        if ctx_init:
            init_tokens = backbone.tokenize([ctx_init])
            n_bpe = backbone.bpe_length(ctx_init)
            n_ctx = int(n_ctx) if ctx_init_rule == "first_tokens" else n_words or n_bpe
            if not 1 <= n_ctx <= n_bpe:
                raise VlpromptError(f"ctx_init '{ctx_init}' has {n_bpe} BPE tokens; ctx_init_rule first_tokens learns "
                                    f"the first n_ctx of them, and n_ctx is {n_ctx}")
            if n_bpe > n_ctx and class_token_position != "end":
                raise VlpromptError(
                    f"ctx_init '{ctx_init}': {n_bpe} BPE tokens for {n_ctx} learned vectors; the frozen remainder "
                    f"only fits the 'end' class position (or use ctx_init_rule=tokens)")
            with torch.no_grad():
                ctx = emb(init_tokens)[0, backbone.n_start:backbone.n_start + n_ctx].float().clone()
            placeholder = ctx_init
        else:
            if int(n_ctx) < 1:
                raise VlpromptError(f"n_ctx must be >= 1, got {n_ctx}")
            n_ctx = int(n_ctx)
            shape = (len(self.classnames), n_ctx, dim) if self.csc else (n_ctx, dim)
            ctx = torch.empty(shape, dtype=torch.float32, device=dev)
            nn.init.normal_(ctx, std=0.02)
            placeholder = backbone.placeholder(n_ctx)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx.to(dev))  # float32 master weights, whatever the encoder precision
        self._build_buffers(placeholder)

    # -- buffers for one label space -------------------------------------------------------------
    def _build_buffers(self, placeholder: str) -> None:
        bb = self.backbone
        names = [prompt_text(c) for c in self.classnames]
        texts = [f"{placeholder} {n}." for n in names]
        tokens = bb.tokenize(texts)
        name_lens = [bb.bpe_length(n) for n in names]
        eot = bb.eot_index(tokens)
        bb.check_prompts_fit(texts, self.classnames, f" with {self.n_ctx} context tokens")
        with torch.no_grad():
            embedded = bb.text.token_embedding(tokens).float()
        length = tokens.shape[1]
        s = bb.n_start
        order = torch.tensor([_layout_index(length, self.n_ctx, k, self.class_token_position, s) for k in name_lens],
                             device=bb.device)
        self.register_buffer("token_prefix", embedded[:, :s].clone(), persistent=False)
        self.register_buffer("token_suffix", embedded[:, s + self.n_ctx:].clone(), persistent=False)
        self.register_buffer("eot_idx", eot, persistent=False)
        self.register_buffer("order", order, persistent=False)
        self.name_lens = name_lens

    @property
    def n_cls(self) -> int:
        return len(self.classnames)

    def prompt_embeddings(self) -> torch.Tensor:
        """(C, context_length, D) prompt token embeddings with the context spliced in."""
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        full = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        if self.class_token_position == "end":
            return full
        index = self.order.unsqueeze(-1).expand(-1, -1, full.shape[-1])
        return full.gather(1, index)

    @property
    def shares_prefix(self) -> bool:
        """One context for every class with the name at the end: SOS + context is a shared prefix."""
        return not self.csc and self.class_token_position == "end"

    def text_features(self) -> torch.Tensor:
        """(C, d) L2-normalised class features, differentiable with respect to the context."""
        if not self.backbone.text.causal:  # bidirectional (SigLIP): every class whole, at full length
            feats = encode_dense(self.backbone, self.prompt_embeddings(), self.eot_idx)
        elif self.shares_prefix:
            prefix = torch.cat([self.token_prefix[0], self.ctx], dim=0)
            feats = encode_shared_prefix(self.backbone, prefix, self.token_suffix, self.eot_idx - self.n_ctx)
        else:
            feats = encode_truncated(self.backbone, self.prompt_embeddings(), self.eot_idx)
        return F.normalize(feats, dim=-1)
