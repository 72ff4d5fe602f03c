"""CoOp's optimisation recipe (docs/recipes.md): epochs by shot count, batches per epoch, the per-epoch LR."""

from __future__ import annotations

import math

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
