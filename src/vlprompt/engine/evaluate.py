"""Accuracy metrics (SPEC 6.5): top-1 over all images (micro), per class, and their mean (macro)."""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def classify(learner, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Predicted labels; class text features are computed once for the whole evaluation."""
    text = learner.text_features().detach()
    preds = [learner.logits(features[i:i + batch_size], text).argmax(dim=-1)
             for i in range(0, features.shape[0], batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy_report(preds: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> dict:
    """``{"accuracy", "macro_accuracy", "per_class": {name: acc}, "n": N}`` in percent.

    Macro accuracy averages over the classes that have test images.
    """
    preds, labels = preds.cpu(), labels.cpu()
    n = int(labels.numel())
    correct = (preds == labels)
    per_class = {}
    for c, name in enumerate(classnames):
        mask = labels == c
        if mask.any():
            per_class[name] = 100.0 * float(correct[mask].float().mean())
    return {
        "accuracy": 100.0 * float(correct.float().mean()) if n else float("nan"),
        "macro_accuracy": sum(per_class.values()) / len(per_class) if per_class else float("nan"),
        "per_class": per_class,
        "n": n,
    }
