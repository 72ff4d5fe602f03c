"""CPT: contrastive prompt tuning on top of CoOp (docs/reconstructions.md).

What the paper shows (its abstract and overview figure): a CoOp prompt, frozen encoders, three augmented
views of every training image, cross-entropy on view 1, an instance-contrastive loss (InsCon) between the
logits of views 2 and 3, and a relational-consistency loss (RelCon) that pulls the batch's logit-similarity
matrix (views 2 x 3) towards its sharpened image-feature similarity matrix (views 1 x 3). The exact forms, temperatures,
weights and augmentations are not published: they are our reconstruction (docs/reconstructions.md), every
one an option of `CPTOptions`. Inference is CoOp's, and a CPT prompt is a CoOp prompt.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.transforms import strong_transform, train_transform
from ..errors import VlpromptError
from ..prompts.coop import CoOp
from ..recipes.records import Deviation
from .base import Objective, option
from .coop import CoOpMethod

INSCON_NEGATIVES = ("all", "cross_view")
KL_DIRECTIONS = ("p||q", "q||p")


@dataclass
class CPTOptions:
    """CPT's settings; every default is our assumption (docs/reconstructions.md)."""

    lambda_ins: float = option(1.0, "weight of InsCon")
    lambda_rel: float = option(1.0, "weight of RelCon")
    tau_ins: float = option(0.1, "InsCon temperature")
    tau_m: float = option(0.1, "temperature of the logit-similarity rows p_i")
    tau_f: float = option(0.04, "temperature of the feature-similarity rows q_i (sharper than tau_m)")
    inscon_negatives: str = option("all", "all: SimCLR NT-Xent, 2b-2 negatives | cross_view: symmetric CE over b x b")
    kl_direction: str = option("p||q", "p||q as in the paper's figure, or q||p")
    # strong augmentation of views 2 and 3 (SimCLR-style)
    jitter: float = option(0.4, "ColorJitter brightness, contrast and saturation")
    hue: float = option(0.1, "ColorJitter hue")
    jitter_p: float = option(0.8, "probability of the colour jitter")
    grayscale_p: float = option(0.2, "probability of grayscale")
    blur_p: float = option(0.0, "GaussianBlur probability (off by default)")

    def __post_init__(self):
        for key in ("lambda_ins", "lambda_rel", "jitter"):
            if not getattr(self, key) >= 0:
                raise VlpromptError(f"cpt option {key}: must be >= 0, got {getattr(self, key)}")
        for key in ("tau_ins", "tau_m", "tau_f"):
            if not getattr(self, key) > 0:
                raise VlpromptError(f"cpt option {key}: must be > 0, got {getattr(self, key)}")
        for key in ("jitter_p", "grayscale_p", "blur_p"):
            if not 0 <= getattr(self, key) <= 1:
                raise VlpromptError(f"cpt option {key}: must be a probability in [0, 1], got {getattr(self, key)}")
        if not 0 <= self.hue <= 0.5:
            raise VlpromptError(f"cpt option hue: must be in [0, 0.5], got {self.hue}")
        if self.inscon_negatives not in INSCON_NEGATIVES:
            raise VlpromptError(f"cpt option inscon_negatives: '{self.inscon_negatives}' is not one of "
                                f"{list(INSCON_NEGATIVES)}")
        if self.kl_direction not in KL_DIRECTIONS:
            raise VlpromptError(f"cpt option kl_direction: '{self.kl_direction}' is not one of "
                                f"{list(KL_DIRECTIONS)}")


def _need_pairs(b: int, what: str) -> None:
    if b < 2:
        raise VlpromptError(f"CPT's {what} needs at least 2 images per batch (got {b}): the contrastive terms "
                            "are undefined for a single image")


def inscon_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, tau: float, negatives: str = "all") -> torch.Tensor:
    """InsCon between two views' logits (b, C): row i of one view is positive with row i of the other.

    ``all``: NT-Xent over the 2b L2-normalised logit vectors, each anchor against the other 2b-1 (its
    positive and 2b-2 negatives), averaged over the 2b anchors. ``cross_view``: symmetric cross-entropy
    over the b x b matrix of view a against view b.
    """
    b = logits_a.shape[0]
    _need_pairs(b, "InsCon")
    ha, hb = F.normalize(logits_a, dim=-1), F.normalize(logits_b, dim=-1)
    target = torch.arange(b, device=ha.device)
    if negatives == "cross_view":
        sim = ha @ hb.T / tau
        return 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))
    if negatives != "all":
        raise VlpromptError(f"inscon negatives: '{negatives}' is not one of {list(INSCON_NEGATIVES)}")
    h = torch.cat([ha, hb])
    sim = h @ h.T / tau
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=h.device)
    sim = sim.masked_fill(self_mask, float("-inf"))  # an anchor is never its own negative
    return F.cross_entropy(sim, torch.cat([target + b, target]))


def relcon_loss(logits_2: torch.Tensor, logits_3: torch.Tensor, feats_1: torch.Tensor, feats_3: torch.Tensor,
                tau_m: float, tau_f: float, kl_direction: str = "p||q") -> torch.Tensor:
    """RelCon: mean over rows i of KL(p_i || q_i) (or KL(q_i || p_i)), diagonal included.

    p_i = softmax_j(<h_i^2, h_j^3> / tau_m) with h the L2-normalised logits; q_i = softmax_j(<z_i^1, z_j^3> /
    tau_f) with z the L2-normalised image features, a fixed target (no gradient).
    """
    _need_pairs(logits_2.shape[0], "RelCon")
    h2, h3 = F.normalize(logits_2, dim=-1), F.normalize(logits_3, dim=-1)
    log_p = F.log_softmax(h2 @ h3.T / tau_m, dim=1)
    z1, z3 = F.normalize(feats_1.detach(), dim=-1), F.normalize(feats_3.detach(), dim=-1)
    log_q = F.log_softmax(z1 @ z3.T / tau_f, dim=1).detach()
    if kl_direction == "p||q":
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    elif kl_direction == "q||p":
        kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    else:
        raise VlpromptError(f"kl_direction: '{kl_direction}' is not one of {list(KL_DIRECTIONS)}")
    return kl.mean()


class CPTObjective(Objective):
    """CE on the weak view + lambda_ins * InsCon(strong_a, strong_b) + lambda_rel * RelCon."""

    options: CPTOptions

    def __init__(self, options: CPTOptions | None = None):
        super().__init__(options if options is not None else CPTOptions())

    def view_transforms(self, bb) -> dict:
        o = self.options
        strong = strong_transform(**bb.preprocess.train_args(), jitter=o.jitter, hue=o.hue,
                                  jitter_p=o.jitter_p, grayscale_p=o.grayscale_p, blur_p=o.blur_p)
        # One transform object for both strong views: in feature-bank mode they then share a bank and
        # take different stored draws of it; in exact mode each is drawn afresh anyway.
        return {"weak": train_transform(**bb.preprocess.train_args()),
                "strong_a": strong, "strong_b": strong}

    def loss(self, learner: CoOp, batch):
        o = self.options
        v = batch.views
        w = learner.text_features()  # the one text pass of this step, shared by all three views
        l1, l2, l3 = (learner.logits(v[name], w) for name in ("weak", "strong_a", "strong_b"))
        ce = F.cross_entropy(l1, batch.labels)
        ins = inscon_loss(l2, l3, o.tau_ins, o.inscon_negatives)
        rel = relcon_loss(l2, l3, v["weak"], v["strong_b"], o.tau_m, o.tau_f, o.kl_direction)
        loss = ce + o.lambda_ins * ins + o.lambda_rel * rel
        terms = {"loss": loss.detach(), "ce": ce.detach(), "inscon": ins.detach(), "relcon": rel.detach(),
                 "logits": l1.detach()}
        return loss, terms

    @property
    def deviations(self) -> list[Deviation]:
        o = self.options
        return [Deviation("cpt.reconstruction", dataclasses.asdict(o), None, "our reconstruction",
                          "the paper publishes only the structure of its losses: every weight, temperature, the "
                          "negatives, the KL direction and the strong views are our choice (options above; logits "
                          "L2-normalised before both similarities; docs/reconstructions.md)")]


class CPTMethod(CoOpMethod):
    """The CoOp learner and options, trained with the CPT objective; saved prompts say method "cpt"."""

    name = "cpt"
    Options = CPTOptions

    def objective(self, learner: CoOp, config) -> CPTObjective:
        if config.batch_size < 2:
            raise VlpromptError(f"method cpt: batch_size={config.batch_size} is too small: the contrastive terms "
                                "need at least 2 images per batch")
        if config.n_train < 2:
            raise VlpromptError(f"method cpt: dataset {config.dataset} has {config.n_train} training image; "
                                "the contrastive terms need at least 2 images per batch")
        return CPTObjective(config.options)
