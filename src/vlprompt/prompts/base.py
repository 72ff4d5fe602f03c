"""What every classifier built from class text features shares: cosine logits at CLIP's scale, and the one
artefact of every learner (`save_pretrained`, `from_pretrained`)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class TextClassifier(nn.Module):
    """Subclasses provide ``text_features()`` -> (C, d) normalised, and set ``self.backbone``. A learner whose
    image features depend on its parameters sets ``from_pixels`` and provides ``image_features(images)``: it
    is trained from pixels and evaluated from images (`engine.evaluate.image_logits`).

    Everything a learner learns is in its ``state_dict()`` (persistent parameters and buffers): that, with the
    `MethodConfig` it was built from, is its artefact. Buffers rebuilt from the class names (token embeddings,
    hand-crafted features) are registered with ``persistent=False``."""

    from_pixels = False
    method = ""  # the registered method a learner of this class is built by, unless `MethodBase.create` says
    # Buffers whose first dimension is the number of training images (a cache): a loaded one takes the saved size.
    data_sized: tuple = ()
    # Learned numbers, read and set as Python floats (None: not set) and kept as 0-d float64 buffers, so that
    # they are saved with the tensors, exactly.
    scalars: tuple = ()

    def text_features(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """logit_scale * normalise(image_features) @ text_features.T (+ the model's logit bias, SigLIP's: a constant
        that moves no softmax and no ranking, but is part of each logit the model gives)."""
        logits = self.backbone.logit_scale * F.normalize(image_features.float(), dim=-1) @ text_features.T
        bias = getattr(self.backbone, "logit_bias", None)
        return logits if bias is None else logits + bias

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits(image_features, self.text_features())

    # -- scalars ------------------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        if name in type(self).scalars and name in self.__dict__.get("_buffers", {}):
            value = float(self._buffers[name])
            return None if math.isnan(value) else value
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name in type(self).scalars and not isinstance(value, torch.Tensor):
            old = self.__dict__.get("_buffers", {}).get(name)
            value = torch.tensor(math.nan if value is None else float(value), dtype=torch.float64,
                                 device=old.device if old is not None else None)
            if old is None:
                self.register_buffer(name, value)
                return
        super().__setattr__(name, value)

    # -- the artefact -------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``prompt_config.json`` (the method, the `MethodConfig` the learner was built from, the classes
        and the backbone) and ``prompt.safetensors`` (its ``state_dict()``) atomically."""
        from ..methods.loading import save_learner  # lazily: the methods import the learners

        return save_learner(self, out_dir)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backbone, classnames: Optional[Sequence[str]] = None):
        """`vlprompt.load_prompt` of a prompt this class wrote (one error line otherwise); ``classnames`` rebuilds
        it for other classes where its method can transfer."""
        from ..methods.loading import load_prompt

        return load_prompt(path, backbone, classnames, learner_class=cls)
