"""Accuracy metrics (docs/protocols.md): top-1 over all images (micro), top-5, per class, and their mean (macro)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

TOP_K = 5


@torch.no_grad()
def class_logits(learner, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """(N, C) float32 logits; class text features are computed once for the evaluation (per image, 16 at a
    time, for a learner whose class features depend on the image, such as CoCoOp)."""
    if getattr(learner, "conditional", False):
        parts = [learner(features[i:i + 16]) for i in range(0, features.shape[0], 16)]
    else:
        text = learner.text_features().detach()
        parts = [learner.logits(features[i:i + batch_size], text) for i in range(0, features.shape[0], batch_size)]
    return torch.cat(parts).float() if parts else torch.empty(0, len(learner.classnames))


def classify(learner, features: torch.Tensor, batch_size: int = 4096, k: int = TOP_K) -> torch.Tensor:
    """(N, min(k, C)) label indices, best first (`class_logits` ranked)."""
    return rank_logits(class_logits(learner, features, batch_size), len(learner.classnames), k)


def accuracy_report(preds: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> dict:
    """``{"accuracy", "top5_accuracy", "macro_accuracy", "per_class": {name: acc}, "n", "top5_k"}`` in percent.

    ``preds`` is (N,) top-1 labels or (N, k) ranked labels (`classify`); top-5 counts an image as right when
    its label is among the first min(5, k) (``top5_k``; fewer than 5 when there are fewer classes, and None
    when only top-1 labels were given). Macro accuracy averages over the classes that have test images.
    """
    preds, labels = preds.cpu(), labels.cpu()
    ranked = preds if preds.dim() == 2 else preds[:, None]
    n = int(labels.numel())
    correct = ranked[:, 0] == labels if n else torch.zeros(0, dtype=torch.bool)
    top5_k = min(TOP_K, ranked.shape[1]) if preds.dim() == 2 else None
    in_top5 = (ranked[:, :top5_k] == labels[:, None]).any(dim=1) if top5_k else None
    # Percentages from integer counts (a float32 mean is off by up to 1e-6 points).
    per_class = {}
    for c, name in enumerate(classnames):
        mask = labels == c
        if mask.any():
            per_class[name] = 100.0 * int(correct[mask].sum()) / int(mask.sum())
    n_correct = int(correct.sum())
    return {
        "accuracy": 100.0 * n_correct / n if n else float("nan"),
        "correct": n_correct,
        "top5_accuracy": 100.0 * int(in_top5.sum()) / n if n and top5_k else None,
        "top5_k": top5_k,
        "macro_accuracy": sum(per_class.values()) / len(per_class) if per_class else float("nan"),
        "per_class": per_class,
        "n": n,
    }


@torch.inference_mode()
def image_logits(learner, items, batch_size: int = 100, num_workers: Optional[int] = 0, progress: bool = True,
                 desc: str = "classifying test images") -> tuple[torch.Tensor, torch.Tensor]:
    """((N, C) float32 logits, (N,) labels) of test images through a learner whose image features depend on
    its parameters (``learner.from_pixels``: deep visual prompts): batched, with progress, never through the
    frozen feature cache. The class text features are computed once."""
    from ..data.transforms import test_transform
    from ..utils.progress import Progress
    from .features import make_loader

    bb = learner.backbone
    tf = test_transform(**bb.preprocess.test_args())
    text = learner.text_features()
    bar = Progress(desc, len(items), enabled=progress)
    parts, labels = [], []
    for images, y in make_loader(items, tf, batch_size, num_workers, device=bb.device):
        parts.append(learner.logits(learner.image_features(images), text).float())
        labels.append(y)
        bar.update(len(y))
    if not parts:
        return torch.empty(0, len(learner.classnames)), torch.empty(0, dtype=torch.long)
    return torch.cat(parts), torch.cat(labels)


def rank_logits(logits: torch.Tensor, n_classes: int, k: int = TOP_K) -> torch.Tensor:
    """(N, min(k, C)) label indices, best first."""
    return logits.topk(min(k, n_classes), dim=-1).indices
