"""CoCoOp (KaiyangZhou/CoOp, trainers/cocoop.py): CoOp's context shifted per image by a meta-net's bias.

    f = normalize(image feature),  pi(f) = Linear(d_vis / 16 -> D)(ReLU(Linear(d_vis -> d_vis / 16)(f)))
    ctx_m(x) = ctx_m + pi(f) for every m,  logit_{i,c} = logit_scale <f_i, g_c(x_i)>

Every image gets its own prompts for all classes, at training and at test. They share SOS + context within
an image, so on a causal tower the fast text encoder runs each image's classes against that image's prefix
(`encode_per_image_prefix`): exact against the 77-token computation and far cheaper than it. A bidirectional
tower (SigLIP) computes every image's prompts whole (`text.dense`). The recipe
(the recipe cell ``cocoop``, docs/recipes.md): ViT-B/16, M = 4 from "a photo of a", batch 1, 10 epochs; a
larger batch is allowed and recorded as a deviation from the recipe. The unified context with the class name
at the end is required.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VlpromptError
from ..prompts.coop import CoOp
from ..text.dense import encode_dense
from ..text.fast import encode_per_image_prefix
from .coop import CoOpMethod


class CoCoOp(CoOp):
    method = "cocoop"
    conditional = True  # its class features depend on the image: classify per image

    def __init__(self, backbone, classnames, n_ctx: int = 4, ctx_init="a photo of a", csc: bool = False,
                 class_token_position: str = "end", **kw):
        if csc or class_token_position != "end":
            raise VlpromptError("cocoop: the context is unified with the class name at the end (no csc, no "
                                "middle/front layout)")
        super().__init__(backbone, classnames, n_ctx=n_ctx, ctx_init=ctx_init, csc=False,
                         class_token_position="end", **kw)
        vis, hidden = backbone.embed_dim, max(1, backbone.embed_dim // 16)
        self.meta_net = nn.Sequential(nn.Linear(vis, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, backbone.ctx_dim)).to(backbone.device)

    def bias(self, image_features: torch.Tensor) -> torch.Tensor:
        """pi(f): (B, D) from the normalised image features."""
        return self.meta_net(F.normalize(image_features.float(), dim=-1))

    def image_text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, C, d) normalised class features of each image's own prompts."""
        ctx = self.ctx.unsqueeze(0) + self.bias(image_features).unsqueeze(1)  # (B, M, D)
        if not self.backbone.text.causal:  # bidirectional: B x C whole prompts
            b, c = ctx.shape[0], self.n_cls
            prompts = torch.cat([self.token_prefix.expand(b, -1, -1, -1), ctx.unsqueeze(1).expand(-1, c, -1, -1),
                                 self.token_suffix.expand(b, -1, -1, -1)], dim=2)
            feats = encode_dense(self.backbone, prompts.flatten(0, 1), self.eot_idx.repeat(b)).view(b, c, -1)
            return F.normalize(feats, dim=-1)
        sos = self.token_prefix[0].unsqueeze(0).expand(ctx.shape[0], -1, -1)
        feats = encode_per_image_prefix(self.backbone, torch.cat([sos, ctx], dim=1), self.token_suffix,
                                        self.eot_idx - self.n_ctx)
        return F.normalize(feats, dim=-1)

    def text_features(self) -> torch.Tensor:
        raise VlpromptError("cocoop: class features depend on the image; use the learner on image features")

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(image_features.float(), dim=-1)
        return self.backbone.logit_scale * torch.einsum("bd,bcd->bc", f, self.image_text_features(image_features))


class CoCoOpMethod(CoOpMethod):
    name = "cocoop"

    def build(self, backbone, classnames, config) -> CoCoOp:
        return CoCoOp(backbone, classnames, **config.layout.kwargs())
