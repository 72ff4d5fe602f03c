"""The prompt-training loop (SPEC 2.4), exact mode: fresh augmentation every step.

SGD on the prompt parameters only (float32 master weights); LR set per epoch from `coop_lr`; a fresh
random permutation of the training set each epoch with Dassl's drop-last rule; the model of the last
epoch is the result (no validation). The image tower runs under inference mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..backbones.backbone import Backbone
from ..data.transforms import ImageDataset, load_image
from ..data.types import Datum
from ..utils.progress import Progress, say
from .schedule import batches_per_epoch, coop_lr


@dataclass
class TrainSettings:
    """The optimisation recipe; its paper defaults live in `RunConfig` (see `from_config`)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    warmup_epochs: int
    warmup_lr: float
    seed: int
    num_workers: int = 0
    cache_images: int = 5000  # decode at most this many training images once and keep them in memory

    @classmethod
    def from_config(cls, cfg, epochs: int) -> "TrainSettings":
        return cls(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                   weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                   seed=cfg.seed, num_workers=cfg.num_workers)


class DecodedImages:
    """Keeps decoded full-resolution training images in memory: RandomResizedCrop needs the original."""

    def __init__(self, items: Sequence[Datum], limit: int, progress: bool):
        self.images = {}
        if len(items) <= limit:
            bar = Progress("decoding training images", len(items), enabled=progress)
            for item in items:
                if item.path not in self.images:
                    self.images[item.path] = load_image(item.path)
                bar.update()

    def __call__(self, path: str):
        image = self.images.get(path)
        return image if image is not None else load_image(path)


def epoch_batches(n_items: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """A fresh permutation cut into batches with the drop-last rule."""
    perm = torch.randperm(n_items, generator=generator).tolist()
    n_batches = batches_per_epoch(n_items, batch_size)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def train_prompt(learner: torch.nn.Module, loss_fn: Callable, bb: Backbone, items: Sequence[Datum],
                 transform: Callable, settings: TrainSettings, progress: bool = True) -> dict:
    """Train ``learner`` in place. ``loss_fn(learner, image_features, labels) -> (loss, {term: value})``.

    Returns the per-epoch history: lr, mean loss of each term, training accuracy, seconds.
    """
    params = [p for p in learner.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay, dampening=0, nesterov=False)
    gen = torch.Generator().manual_seed(settings.seed)
    images = DecodedImages(items, settings.cache_images, progress)
    dataset = ImageDataset(items, transform, loader=images)
    history = []
    n_steps = settings.epochs * batches_per_epoch(len(items), settings.batch_size)
    bar = Progress("training", n_steps, enabled=progress, every_s=10.0)
    learner.train()
    t_start = time.perf_counter()
    for epoch in range(settings.epochs):
        t0 = time.perf_counter()
        lr = coop_lr(epoch, settings.epochs, settings.lr, settings.warmup_epochs, settings.warmup_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        batches = epoch_batches(len(items), settings.batch_size, gen)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=settings.num_workers)
        sums: dict[str, float] = {}
        correct = seen = 0
        for x, y in loader:
            feats = bb.encode_images(x).clone()  # a normal tensor: inference tensors cannot enter autograd
            y = y.to(feats.device)
            loss, terms = loss_fn(learner, feats, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in terms.items():
                if k != "logits":
                    sums[k] = sums.get(k, 0.0) + float(v) * len(y)
            if "logits" in terms:
                correct += int((terms["logits"].argmax(-1) == y).sum())
            seen += len(y)
            bar.update(1, extra=f"epoch {epoch + 1}/{settings.epochs} loss {float(loss.detach()):.4f}")
        record = {"epoch": epoch + 1, "lr": lr, **{k: v / max(seen, 1) for k, v in sums.items()},
                  "train_accuracy": 100.0 * correct / max(seen, 1), "seconds": time.perf_counter() - t0}
        history.append(record)
    learner.eval()
    say(f"training done in {time.perf_counter() - t_start:.1f}s", progress)
    return {"epochs": history, "steps": n_steps, "seconds": time.perf_counter() - t_start}
