"""CoOp: cross-entropy on image-text cosine logits, nothing else (SPEC 2.3)."""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F

from ..prompts.coop import CoOp


class CoOpMethod:
    name = "coop"
    trains = True

    def build(self, backbone, classnames: Sequence[str], cfg, dataset=None) -> CoOp:
        return CoOp(backbone, classnames, n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init, csc=cfg.csc,
                    class_token_position=cfg.class_token_position)

    def loss(self, learner: CoOp, image_features, labels):
        logits = learner(image_features)
        loss = F.cross_entropy(logits, labels)
        return loss, {"loss": loss.detach(), "logits": logits.detach()}

    def load(self, path, backbone, classnames) -> CoOp:
        return CoOp.from_pretrained(path, backbone, classnames=classnames)
