"""Training length and learning rates (docs/recipes.md): CoOp's epochs by shot count, batches per epoch and per-epoch
LR, and a run's `Schedule` (CoOp's per-epoch cosine, or a per-iteration cosine over a fixed number of steps)."""

from __future__ import annotations

import math
from typing import Optional

# Epochs by shot count from CoOp's configs (COOP.md); ImageNet uses 50 for every shot count.
EPOCHS_BY_SHOTS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}


def default_epochs(shots: int, dataset: str) -> int:
    """Paper recipe; shot counts outside the table use the next listed count (all data: 200)."""
    if dataset == "imagenet":
        return 50
    for k in sorted(EPOCHS_BY_SHOTS):
        if 0 < shots <= k:
            return EPOCHS_BY_SHOTS[k]
    return 200


def batches_per_epoch(n_items: int, batch_size: int) -> int:
    """Dassl's drop-last rule: drop the last partial batch only when at least one full batch exists."""
    if n_items <= 0:
        return 0
    return n_items // batch_size if n_items >= batch_size else 1


def coop_lr(epoch: int, max_epoch: int, base_lr: float, warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    """LR used during 0-based ``epoch``: constant warm-up, then cosine over ``max_epoch`` stepped per epoch.

    Dassl's ConstantWarmupScheduler steps the wrapped CosineAnnealingLR(T_max=max_epoch) with
    ``epoch - warmup_epochs``, so after warm-up lr(e) = base/2 * (1 + cos(pi * (e - warmup) / max_epoch));
    the last epoch does not reach zero. Matches the LRs logged in CoOp issue #26 digit for digit.
    """
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / max_epoch))


class Schedule:
    """How long a run trains and the learning rate of every step: ``epochs`` passes over a fresh permutation
    each, ``per_epoch`` batches in a full one, ``steps`` in all (the last epoch may stop early), and
    ``drop_last`` (Dassl's rule) or every batch kept. ``unit`` says what the recipe counts ("epochs" or
    "iterations"); ``reference_steps`` is the recipe's own length in steps."""

    unit = "epochs"

    def __init__(self, n_items: int, batch_size: int, steps: int, drop_last: bool, reference_steps: int):
        self.drop_last = drop_last
        self.per_epoch = batches_per_epoch(n_items, batch_size) if drop_last else -(-n_items // batch_size)
        self.steps, self.reference_steps = steps, reference_steps
        self.epochs = -(-steps // self.per_epoch) if self.per_epoch else 0

    def steps_in_epoch(self, epoch: int) -> int:
        """Batches of 0-based ``epoch``: the last one stops where the run's steps end."""
        return max(0, min(self.per_epoch, self.steps - epoch * self.per_epoch))

    def lr(self, epoch: int, step_in_epoch: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class EpochCosine(Schedule):
    """CoOp's (Dassl's): whole epochs with the drop-last rule, the rate set per epoch (`coop_lr`)."""

    def __init__(self, n_items: int, settings, reference_epochs: Optional[int] = None):
        per_epoch = batches_per_epoch(n_items, settings.batch_size)
        super().__init__(n_items, settings.batch_size, settings.epochs * per_epoch, True,
                         (reference_epochs or settings.epochs) * per_epoch)
        self.epochs, self.settings = settings.epochs, settings

    def lr(self, epoch: int, step_in_epoch: int) -> float:
        s = self.settings
        return coop_lr(epoch, s.epochs, s.lr, s.warmup_epochs, s.warmup_lr)


class IterationCosine(Schedule):
    """A fixed number of iterations over reshuffled epochs that keep their last partial batch, the rate
    following a cosine from ``base_lr`` to ``eta_min`` stepped every iteration, no warm-up (PyTorch's
    ``CosineAnnealingLR(T_max=steps)`` stepped after each optimiser step: step t uses
    eta_min + (base_lr - eta_min) (1 + cos(pi t / steps)) / 2)."""

    unit = "iterations"

    def __init__(self, n_items: int, batch_size: int, steps: int, base_lr: float, eta_min: float,
                 reference_steps: int):
        super().__init__(n_items, batch_size, steps, False, reference_steps)
        self.base_lr, self.eta_min = base_lr, eta_min

    def lr(self, epoch: int, step_in_epoch: int) -> float:
        t = epoch * self.per_epoch + step_in_epoch
        return self.eta_min + (self.base_lr - self.eta_min) * 0.5 * (1.0 + math.cos(math.pi * t / self.steps))
