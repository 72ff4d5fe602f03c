"""Dual-view mutual-information prompt tuning (Zhang 2024, arXiv 2410.03189): OUR RECONSTRUCTION.

Known from the abstract: the soft prompt and the hand-crafted prompt are two views of the text modality whose
mutual information is maximised, plus a class-wise augmentation from the visual modality. Everything else
here is our assumption (docs/reconstructions.md), each one an option:

    L = CE(100 z W_s^T, y) + lambda_mi * L_MI + lambda_aug * L_aug
    L_MI = symmetric class-level InfoNCE between w^s and w^h over all C classes, temperature tau;
           logged with the lower bound I(w^s; w^h) >= log C - L_MI(soft -> hand)
    L_aug = one of mix_softlabel | mix_virtual_class | feat_gauss | proto_mix (see `AUGMENTATIONS`)

Pixel mixing needs the augmented images, which only exact mode has (`TrainBatch.pixels`); in feature-bank
mode the stored (normalised) image features are mixed instead, and the run records that deviation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import VlpromptError
from ..prompts.guided import GuidedCoOp
from ..recipes.records import Deviation
from .base import Needs, Objective, option
from .kgcoop import GuidedMethod, HandViewOptions

AUGMENTATIONS = ("mix_softlabel", "mix_virtual_class", "feat_gauss", "proto_mix")
COVARIANCES = ("shared", "diagonal")


@dataclass
class DualViewOptions(HandViewOptions):
    lambda_mi: float = option(1.0, "weight of the InfoNCE term")
    tau: float = option(0.07, "InfoNCE temperature (0.01 = CLIP's scale of 100)")
    lambda_aug: float = option(1.0, "weight of the augmentation term (0 switches it off)")
    augmentation: str = option("mix_softlabel", "mix_softlabel | mix_virtual_class | feat_gauss | proto_mix")
    mix_alpha: float = option(1.0, "lambda ~ Beta(alpha, alpha) for the two mixing readings")
    gauss_cov: str = option("shared", "feat_gauss: shared full within-class covariance | its diagonal")
    proto_min: float = option(0.5, "proto_mix: a ~ U(proto_min, 1) in normalize(a w_c^s + (1 - a) p_c)")
    proto_ce: bool = option(False, "proto_mix: also classify the batch with the augmented soft features")

    def __post_init__(self):
        self.check_hand()
        if self.augmentation not in AUGMENTATIONS:
            raise VlpromptError(f"option augmentation: '{self.augmentation}' is not one of {list(AUGMENTATIONS)}")
        if self.gauss_cov not in COVARIANCES:
            raise VlpromptError(f"option gauss_cov: '{self.gauss_cov}' is not one of {list(COVARIANCES)}")
        for key in ("tau", "mix_alpha"):
            if not getattr(self, key) > 0:
                raise VlpromptError(f"option {key}: must be > 0, got {getattr(self, key)}")
        for key in ("lambda_mi", "lambda_aug"):
            if getattr(self, key) < 0:
                raise VlpromptError(f"option {key}: must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.proto_min <= 1.0:
            raise VlpromptError(f"option proto_min: must be in [0, 1], got {self.proto_min}")


# -- the MI term --------------------------------------------------------------------------------------------

def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Rows of ``a`` against all rows of ``b``; row c's positive is b_c. Inputs (C, d), normalised."""
    logits = a @ b.T / tau
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def symmetric_info_nce(soft: torch.Tensor, hand: torch.Tensor, tau: float) -> torch.Tensor:
    return 0.5 * (info_nce(soft, hand, tau) + info_nce(hand, soft, tau))


def mi_lower_bound(soft: torch.Tensor, hand: torch.Tensor, tau: float) -> torch.Tensor:
    """The InfoNCE bound I(w^s; w^h) >= log C - L_MI(soft -> hand), in nats."""
    return math.log(soft.shape[0]) - info_nce(soft, hand, tau)


# -- mixing (mix_softlabel, mix_virtual_class) ---------------------------------------------------------------

def different_class_partners(labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(partner index (B,), has_partner (B,) bool): each sample's partner is drawn uniformly among the batch
    samples of a different class; a sample whose batch holds only its own class has none."""
    n = labels.shape[0]
    scores = torch.rand(n, n, generator=generator).to(labels.device)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    scores = scores.masked_fill(same, -1.0)
    return scores.argmax(dim=1), ~same.all(dim=1)


def mix_weights(n: int, alpha: float, rng: np.random.Generator, device) -> torch.Tensor:
    """(n,) mixing coefficients lambda ~ Beta(alpha, alpha)."""
    return torch.from_numpy(rng.beta(alpha, alpha, size=n)).float().to(device)


def mix(x: torch.Tensor, partners: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lam x_i + (1 - lam) x_partner(i), for images (B, 3, H, W) or features (B, d).

    Mixing normalised pixels equals normalising mixed pixels (the normalisation is affine per channel and
    the weights sum to one), so exact mode can mix the transform's output directly."""
    lam = lam.view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1.0 - lam) * x[partners]


def soft_targets(labels: torch.Tensor, partners: torch.Tensor, lam: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, C) targets lam onehot(y_i) + (1 - lam) onehot(y_partner); each row sums to one."""
    one_hot = F.one_hot(labels, n_classes).float()
    return lam.unsqueeze(1) * one_hot + (1.0 - lam).unsqueeze(1) * one_hot[partners]


def virtual_class_features(soft: torch.Tensor, labels: torch.Tensor, partners: torch.Tensor,
                           lam: torch.Tensor) -> torch.Tensor:
    """(B, d) one virtual class per mixed sample: normalize(lam w_{y_i}^s + (1 - lam) w_{y_partner}^s)."""
    lam = lam.unsqueeze(1)
    return F.normalize(lam * soft[labels] + (1.0 - lam) * soft[labels[partners]], dim=-1)


# -- class statistics (feat_gauss, proto_mix) ---------------------------------------------------------------

class ClassStats:
    """Per-class mean and within-class covariance of normalised frozen image features.

    ``covariance``: "shared" pools the full covariance over classes, "diagonal" keeps only its diagonal.
    Sampling uses an eigendecomposition, which also handles the rank-deficient case (few shots, d large).
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, n_classes: int, covariance: str = "shared"):
        z = F.normalize(features.float(), dim=-1)
        counts = torch.bincount(labels, minlength=n_classes).float()
        if bool((counts == 0).any()):
            missing = int((counts == 0).nonzero()[0])
            raise VlpromptError(f"class statistics: class {missing} has no training features")
        self.mean = torch.zeros(n_classes, z.shape[1], device=z.device).index_add_(0, labels, z) / counts.unsqueeze(1)
        centred = z - self.mean[labels]
        dof = max(z.shape[0] - n_classes, 1)
        cov = centred.T @ centred / dof
        if covariance == "diagonal":
            cov = torch.diag(torch.diagonal(cov))
        self.cov = cov
        evals, evecs = torch.linalg.eigh(cov.double())
        self.scale = (evecs * evals.clamp(min=0).sqrt()).float()  # cov = scale @ scale.T

    @property
    def prototypes(self) -> torch.Tensor:
        """(C, d) normalised class means p_c."""
        return F.normalize(self.mean, dim=-1)

    def draw(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, d) z~ ~ N(mu_{y}, Sigma), before re-normalisation."""
        noise = torch.randn(labels.shape[0], self.scale.shape[1], generator=generator).to(self.scale.device)
        return self.mean[labels] + noise @ self.scale.T

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, d) Gaussian draws re-normalised to the unit sphere, where CLIP's image features live."""
        return F.normalize(self.draw(labels, generator), dim=-1)


def proto_mix_features(soft: torch.Tensor, prototypes: torch.Tensor, classes: torch.Tensor,
                       a: torch.Tensor) -> torch.Tensor:
    """(K, d) normalize(a w_c^s + (1 - a) p_c) for the K ``classes``; ``a`` is (K,)."""
    a = a.unsqueeze(1)
    return F.normalize(a * soft[classes] + (1.0 - a) * prototypes[classes], dim=-1)


# -- the objective ------------------------------------------------------------------------------------------

class DualViewObjective(Objective):
    """CE + lambda_mi * symmetric InfoNCE(w^s, w^h) + lambda_aug * the chosen class-wise augmentation."""

    def __init__(self, options: DualViewOptions, seed: int = 1, train_mode: str = "exact"):
        super().__init__(options)
        self.train_mode = train_mode
        self.gen = torch.Generator().manual_seed(seed)  # partners, Gaussian noise, proto_mix weights
        self.rng = np.random.default_rng(seed)  # Beta draws (torch's Beta takes no generator)
        self.stats: Optional[ClassStats] = None
        self.stats_note = ""

    @property
    def needs_stats(self) -> bool:
        return self.options.lambda_aug > 0 and self.options.augmentation in ("feat_gauss", "proto_mix")

    def prepare(self, bb, items, source) -> None:
        """Class statistics from frozen training features, once per run: the feature bank's stored draws, or
        in exact mode one encoding of the training images with the deterministic test transform."""
        if not self.needs_stats:
            return
        n_classes = 1 + max(it.label for it in items)
        stored = source.stored_features("weak")
        if stored is not None:
            feats, labels = stored
            self.stats_note = f"all {feats.shape[0] // len(items)} stored feature-bank draws per training image"
        else:
            from ..data.transforms import test_transform
            from ..engine.features import encode_items

            tf = test_transform(**bb.preprocess.test_args())
            feats, labels = encode_items(bb, items, tf, progress=False)
            feats, labels = feats.clone(), labels.to(feats.device)
            self.stats_note = "the training images encoded once with the test transform"
        self.stats = ClassStats(feats, labels, n_classes, self.options.gauss_cov)

    def loss(self, learner: GuidedCoOp, batch):
        opt = self.options
        soft = learner.soft_features()
        logits = learner.logits(batch.views["weak"], soft)
        ce = F.cross_entropy(logits, batch.labels)
        mi = symmetric_info_nce(soft, learner.hand, opt.tau)
        loss = ce + opt.lambda_mi * mi
        terms = {"ce": ce.detach(), "mi": mi.detach(),
                 "mi_bound": mi_lower_bound(soft.detach(), learner.hand, opt.tau)}
        if opt.lambda_aug > 0:
            aug = self.augmentation_loss(learner, batch, soft)
            loss = loss + opt.lambda_aug * aug
            terms["aug"] = aug.detach()
        return loss, {"loss": loss.detach(), **terms, "logits": logits.detach()}

    def augmentation_loss(self, learner: GuidedCoOp, batch, soft: torch.Tensor) -> torch.Tensor:
        kind = self.options.augmentation
        if kind in ("mix_softlabel", "mix_virtual_class"):
            return self._mixing_loss(learner, batch, soft, kind)
        if self.stats is None:
            raise VlpromptError(f"augmentation {kind} needs class statistics: call objective.prepare() first")
        if kind == "feat_gauss":
            z = self.stats.sample(batch.labels, self.gen)
            return F.cross_entropy(learner.logits(z, soft), batch.labels)
        return self._proto_mix_loss(learner, batch, soft)

    def mixed_features(self, batch, keep: torch.Tensor, partners: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Features of the mixed samples ``keep``: pixels mixed and encoded in exact mode, stored
        (normalised) features mixed in feature-bank mode."""
        if batch.pixels is not None and batch.encode is not None:
            x = batch.pixels["weak"]
            return batch.encode(mix(x, partners, lam)[keep])
        z = F.normalize(batch.views["weak"], dim=-1)
        return mix(z, partners, lam)[keep]

    def _mixing_loss(self, learner, batch, soft, kind: str) -> torch.Tensor:
        y = batch.labels
        partners, has_partner = different_class_partners(y, self.gen)
        lam = mix_weights(len(y), self.options.mix_alpha, self.rng, y.device)
        keep = has_partner.nonzero().squeeze(1)
        if keep.numel() == 0:  # a batch of one class has nothing to mix
            return soft.sum() * 0.0
        z = self.mixed_features(batch, keep, partners, lam)
        if kind == "mix_softlabel":
            targets = soft_targets(y, partners, lam, soft.shape[0])[keep]
            return F.cross_entropy(learner.logits(z, soft), targets)
        # mix_virtual_class: one appended class per mixed sample, hard target on its own virtual class.
        virtual = virtual_class_features(soft, y, partners, lam)[keep]
        weights = torch.cat([soft, virtual])
        targets = soft.shape[0] + torch.arange(len(keep), device=y.device)
        return F.cross_entropy(learner.logits(z, weights), targets)

    def _proto_mix_loss(self, learner, batch, soft) -> torch.Tensor:
        classes = batch.labels.unique()
        low = self.options.proto_min
        a = (low + (1.0 - low) * torch.rand(len(classes), generator=self.gen)).to(soft.device)
        aug = proto_mix_features(soft, self.stats.prototypes.to(soft.device), classes, a)
        tau = self.options.tau
        # The augmented soft view is an extra positive of its class in the MI term, both directions.
        forward = F.cross_entropy(aug @ learner.hand.T / tau, classes)
        backward = F.cross_entropy(learner.hand[classes] @ aug.T / tau,
                                   torch.arange(len(classes), device=soft.device))
        loss = 0.5 * (forward + backward)
        if self.options.proto_ce:
            weights = soft.index_copy(0, classes, aug)
            loss = loss + F.cross_entropy(learner.logits(batch.views["weak"], weights), batch.labels)
        return loss

    @property
    def deviations(self) -> list[Deviation]:
        o = self.options
        out = [Deviation("dualview_mi.reconstruction", dataclasses.asdict(o), None, "our reconstruction",
                         "dualview_mi is OUR RECONSTRUCTION of Zhang 2024 (arXiv 2410.03189): only the abstract is "
                         "known; MI term = symmetric class-level InfoNCE, every value above our choice "
                         "(docs/reconstructions.md)")]
        mixing = o.lambda_aug > 0 and o.augmentation in ("mix_softlabel", "mix_virtual_class")
        if mixing and self.train_mode == "feature_bank":
            out.append(Deviation("dualview_mi.mix", "features", "pixels", "our reconstruction",
                                 f"{o.augmentation}: feature_bank mode has no pixels, so the stored normalised image "
                                 "features are mixed instead of the images"))
        if self.stats_note:
            out.append(Deviation("dualview_mi.class_statistics", self.stats_note, None, "",
                                 f"{o.augmentation}: class statistics from {self.stats_note}"))
        return out


class DualViewMethod(GuidedMethod):
    name = "dualview_mi"
    Options = DualViewOptions
    needs = Needs(pixels=True)  # mixes the augmented images in exact mode (features in feature-bank mode)

    def objective(self, learner: GuidedCoOp, config) -> DualViewObjective:
        return DualViewObjective(config.options, seed=config.seed, train_mode=config.train_mode)
