"""CLIP-LoRA: low-rank updates of the query, key and value projections of every attention block of both towers
(`backbones.lora`), cross-entropy on the cosine logits at the official constant scale 100, one prompt for every
dataset ("a photo of a {}."). AdamW (lr 2e-4, weight decay 1e-2) with a cosine per iteration down to 1e-6, for
``500 x shots`` iterations over reshuffled batches of 32 that keep the last partial one.

The text tower runs the exact fast paths with the updates as an argument: in training, with dropout, every class
cut at its end token (each class draws its own masks, as the official 77-token batch does); without dropout (in
evaluation) the template's words before the class name are a shared prefix (``prefix_masks=shared`` uses it in
training too, one mask for every class's copy of those words: an approximation, recorded). A bidirectional tower
(SigLIP) computes every class whole, at full length (`text.dense`). The image tower runs the prompted
ViT path with the updates. A learner holds only the low-rank factors, and rebuilds its classes from any names:
it transfers to new classes and datasets (their names through the adapted text tower).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..backbones.lora import POSITIONS, PROJECTIONS, LowRankQKV, position_blocks
from ..engine.schedule import IterationCosine
from ..errors import VlpromptError
from ..prompts.base import TextClassifier
from ..prompts.templates import prompt_text
from ..recipes.records import Deviation
from ..text.dense import encode_dense
from ..text.fast import encode_shared_prefix, encode_truncated
from .base import MethodBase, MethodConfig, Needs, Objective, option

ENCODERS = ("both", "text", "vision")
PREFIX_MASKS = ("per_class", "shared")


@dataclass(frozen=True)
class CLIPLoRAOptions:
    rank: int = option(2, "rank r of every low-rank update")
    alpha: float = option(1.0, "updates are scaled by alpha / sqrt(rank)")
    dropout: float = option(0.25, "dropout on the input of each update in training, one mask per projection")
    encoder: str = option("both", "towers that get updates: both | text | vision")
    position: str = option("all", f"blocks that get updates: {' | '.join(POSITIONS)} (the presets count 12 blocks)")
    params: str = option("q,k,v", "projections that get updates: a comma list of q, k, v")
    text_template: str = option("a photo of a {}.", "the one prompt of every class (the official code's for "
                                "every dataset)")
    iters_per_shot: int = option(500, "training length: iters_per_shot x shots iterations")
    iterations: int = option(0, "training length in iterations (0: iters_per_shot x shots)")
    eta_min: float = option(1e-6, "the learning rate the per-iteration cosine ends at")
    logit_scale: float = option(100.0, "scale of the cosine logits (the official constant; 0: the model's own)")
    prefix_masks: str = option("per_class", "dropout masks of the template's words before the class name in "
                               "training: per_class (each class its own, as the official code; every class runs its "
                               "whole prompt) | shared (one mask for every class: the words run once, as a shared "
                               "prefix; faster, an approximation)")

    def __post_init__(self):
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise VlpromptError("method clip_lora: rank >= 1, alpha > 0 and 0 <= dropout < 1 are needed")
        if self.encoder not in ENCODERS:
            raise VlpromptError(f"method clip_lora: option encoder must be one of {list(ENCODERS)}, got {self.encoder!r}")
        if self.position not in POSITIONS:
            raise VlpromptError(f"method clip_lora: option position must be one of {list(POSITIONS)}, "
                                f"got {self.position!r}")
        if any(p.strip() not in tuple(PROJECTIONS) for p in self.params.split(",")):
            raise VlpromptError(f"method clip_lora: option params must be a comma list of q, k, v (the attention "
                                f"output projection is not adapted), got {self.params!r}")
        if self.prefix_masks not in PREFIX_MASKS:
            raise VlpromptError(f"method clip_lora: option prefix_masks must be one of {list(PREFIX_MASKS)}, "
                                f"got {self.prefix_masks!r}")
        if self.iters_per_shot < 1 or self.iterations < 0 or self.eta_min < 0 or self.logit_scale < 0:
            raise VlpromptError("method clip_lora: iters_per_shot >= 1, iterations >= 0, eta_min >= 0 and "
                                "logit_scale >= 0 are needed")
        from ..config import check_template

        check_template(self.text_template)

    @property
    def projections(self) -> str:
        """The adapted projections in q, k, v order ("qkv", "qv", ...)."""
        chosen = {p.strip() for p in self.params.split(",")}
        return "".join(p for p in PROJECTIONS if p in chosen)


class CLIPLoRA(TextClassifier):
    """Low-rank factors of the text tower (``text_lora``) and the image tower (``vision_lora``), either absent
    when ``encoder`` leaves that tower frozen. Image features always come from pixels."""

    from_pixels = True

    def __init__(self, backbone, classnames: Sequence[str], options: CLIPLoRAOptions):
        super().__init__()
        if not classnames:
            raise VlpromptError("clip_lora needs at least one class name")
        self.__dict__["backbone"] = backbone
        self.options, self.classnames = options, list(classnames)
        dev, o = backbone.device, options
        if o.prefix_masks == "shared" and not backbone.text.causal:
            raise VlpromptError(f"clip_lora: prefix_masks=shared is a shortcut of causal text towers; the text tower "
                                f"of {backbone.source.name} is bidirectional, so every class is computed whole")
        self.text_lora: Optional[LowRankQKV] = None
        self.vision_lora: Optional[LowRankQKV] = None
        if o.encoder in ("both", "text"):
            blocks = position_blocks(o.position, len(backbone.text.blocks), "text")
            self.text_lora = LowRankQKV(blocks, backbone.ctx_dim, o.rank, o.alpha, o.dropout, o.projections, dev)
        if o.encoder in ("both", "vision"):
            if backbone.prompted_image_unsupported:
                raise VlpromptError(f"clip_lora: the image tower of {backbone.source.name} cannot take low-rank "
                                    f"updates: {backbone.prompted_image_unsupported} (use --option encoder=text)")
            visual = backbone.model.visual
            blocks = position_blocks(o.position, len(visual.transformer.resblocks), "image")
            self.vision_lora = LowRankQKV(blocks, visual.class_embedding.shape[-1], o.rank, o.alpha, o.dropout,
                                          o.projections, dev)
        self._build_buffers()

    def _build_buffers(self) -> None:
        bb = self.backbone
        texts = [self.options.text_template.format(prompt_text(c)) for c in self.classnames]
        tokens = bb.tokenize(texts)
        bb.check_prompts_fit(texts, self.classnames)
        eot = bb.eot_index(tokens)
        with torch.no_grad():
            # a causal tower needs nothing after the last end token; a bidirectional one reads every position
            embedded = bb.text.token_embedding(tokens[:, :int(eot.max()) + 1] if bb.text.causal else tokens).float()
        self.register_buffer("embedded", embedded, persistent=False)
        self.register_buffer("eot_idx", eot, persistent=False)
        # The template's words before the class name, identical in every prompt: the shared prefix (SOS at least).
        words = self.options.text_template.split("{}")[0].strip()
        n = bb.n_start + (bb.bpe_length(words) if words else 0)
        self.n_prefix = n if n <= int(eot.min()) and bool((tokens[:, :n] == tokens[:1, :n]).all()) else 0

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        scale = self.options.logit_scale or self.backbone.logit_scale
        return scale * F.normalize(image_features.float(), dim=-1) @ text_features.T

    def text_features(self) -> torch.Tensor:
        """(C, d) L2-normalised class features through the adapted text tower."""
        bb, lora, n = self.backbone, self.text_lora, self.n_prefix
        masks = lora is not None and lora.training and lora.dropout > 0  # random masks in every block
        if not bb.text.causal:  # bidirectional (SigLIP): every class whole, at full length
            feats = encode_dense(bb, self.embedded, self.eot_idx, adapter=lora)
        elif not n or (masks and self.options.prefix_masks == "per_class"):
            feats = encode_truncated(bb, self.embedded, self.eot_idx, adapter=lora)
        else:
            feats = encode_shared_prefix(bb, self.embedded[0, :n], self.embedded[:, n:], self.eot_idx + 1 - n,
                                         adapter=lora, shared_masks=masks)
        return F.normalize(feats, dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, d) raw image features through the adapted image tower (differentiable)."""
        if self.vision_lora is None and self.backbone.prompted_image_unsupported:
            # encoder=text on a tower the differentiable path cannot enter (timm): it is frozen, its own forward
            return self.backbone.encode_images(images).clone()
        return self.backbone.encode_images_prompted(images, [], adapter=self.vision_lora)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.image_features(images), self.text_features())


class CLIPLoRAObjective(Objective):
    """Cross-entropy; AdamW; `IterationCosine` for ``iters_per_shot x shots`` iterations (``--epochs N``: N
    passes over the data instead)."""

    def __init__(self, options: CLIPLoRAOptions, shots: int):
        super().__init__(options)
        if not options.iterations and shots < 0:
            raise VlpromptError("method clip_lora counts its iterations per shot (iters_per_shot x shots): with "
                                "all images per class (shots -1) set --option iterations=N")
        self.reference_steps = options.iterations or options.iters_per_shot * max(shots, 0)  # 0: shots unknown

    def loss(self, learner: CLIPLoRA, batch):
        logits = learner(batch.pixels["weak"])
        loss = F.cross_entropy(logits, batch.labels)
        return loss, {"loss": loss.detach(), "logits": logits.detach()}

    def optimizer(self, params, settings) -> torch.optim.Optimizer:
        """The official AdamW: one group, the factors A and B both decayed."""
        return torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.999), weight_decay=settings.weight_decay)

    def schedule(self, settings, n_items: int) -> IterationCosine:
        per_epoch = -(-n_items // settings.batch_size)
        steps = settings.epochs * per_epoch if settings.explicit_epochs else self.reference_steps
        if not steps:
            raise VlpromptError("method clip_lora: no training length (the shots are unknown): set --option "
                                "iterations=N or --epochs")
        return IterationCosine(n_items, settings.batch_size, steps, settings.lr, self.options.eta_min,
                               self.reference_steps)

    @property
    def deviations(self) -> list:
        return [Deviation("clip_lora.fewshot_sampling", "vlprompt's few-shot split", "random.sample per class, "
                          "validation drawn first", "official code",
                          "the few-shot images are drawn by vlprompt's CoOp-compatible sampler (the official code "
                          "draws its own; the test split is the same CoOp split)")]


class CLIPLoRAMethod(MethodBase):
    name = "clip_lora"
    # The image tower is adapted: trained from pixels, evaluated from images; transfers to any class names.
    needs = Needs(pixels=True, cacheable_features=False)
    Options = CLIPLoRAOptions

    def build(self, backbone, classnames: Sequence[str], config: MethodConfig) -> CLIPLoRA:
        return CLIPLoRA(backbone, classnames, config.options)

    def objective(self, learner: CLIPLoRA, config: MethodConfig) -> CLIPLoRAObjective:
        return CLIPLoRAObjective(config.options, config.shots)
