"""Encode images with the frozen image tower (inference mode, no graph)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..backbones.backbone import Backbone
from ..data.transforms import ImageDataset, load_image
from ..data.types import Datum
from ..utils.hardware import loader_workers
from ..utils.progress import Progress


def make_loader(items: Sequence[Datum], transform: Callable, batch_size: int, num_workers: Optional[int],
                loader: Callable = load_image, device: torch.device = torch.device("cpu")):
    """Batches in list order; ``num_workers`` None: `loader_workers` decides by ``device``; pinned batches on a GPU
    (the encoders copy them without blocking)."""
    ds = ImageDataset(items, transform, loader=loader)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                       num_workers=loader_workers(num_workers, device),
                                       pin_memory=device.type == "cuda")


def encode_items(bb: Backbone, items: Sequence[Datum], transform: Callable, batch_size: int = 100,
                 num_workers: Optional[int] = 0, desc: str = "encoding images", progress: bool = True,
                 loader: Callable = load_image, bar: Optional[Progress] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, d) float32, labels (N,)) for a list of items, in list order. ``loader`` decodes a path
    (e.g. from images already in memory); ``bar`` lets several calls share one progress line."""
    feats, labels = [], []
    bar = bar or Progress(desc, len(items), enabled=progress)
    for images, y in make_loader(items, transform, batch_size, num_workers, loader=loader, device=bb.device):
        feats.append(bb.encode_images(images))
        labels.append(y)
        bar.update(len(y))
    if not feats:
        return torch.empty(0, bb.embed_dim), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)
