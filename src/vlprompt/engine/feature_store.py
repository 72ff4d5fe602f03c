"""The one owner of evaluation image features: an in-memory memo for the caller's lifetime, the on-disk
`FeatureCache` across processes, and the encoding itself.

A `FeatureStore` is an object the caller creates and passes on (a study keeps one for all its runs); there is
no module-global store, so backbones and test splits are released when their owner is.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from ..backbones import Backbone
from ..data.transforms import test_transform
from ..data.types import Datum
from ..utils.progress import say
from .feature_cache import FeatureCache, split_key
from .features import encode_items


class FeatureStore:
    """Encoded test splits, keyed by backbone, precision, image size and the exact item list."""

    def __init__(self):
        self._store: dict = {}

    def __len__(self) -> int:
        return len(self._store)

    def get(self, bb: Backbone, items: Sequence[Datum], cfg, desc: str = "encoding test images",
            dataset: str = ""):
        """(features (N, d), labels (N,)) of ``items`` under the test transform; ``cfg`` (a RunConfig) gives
        the disk cache settings, the batch size, the workers and whether to print progress."""
        key = (bb, bb.precision, bb.image_size, tuple((d.path, d.label) for d in items))
        if key in self._store:
            return self._store[key]
        disk = FeatureCache(cfg.cache_dir) if cfg.feature_cache else None
        disk_key = split_key(bb, items, dataset) if disk else None
        found = disk.load(disk_key, torch.tensor([d.label for d in items])) if disk else None
        if found is None:
            tf = test_transform(**bb.preprocess.test_args())
            # Never touches the global random state, so whether the split was cached cannot change what follows.
            with torch.random.fork_rng(devices=[]):
                found = encode_items(bb, items, tf, cfg.test_batch_size, cfg.num_workers, desc=desc,
                                     progress=cfg.progress)
            why = disk.save(disk_key, *found) if disk else None
            if why:
                warnings.warn(f"feature cache not written ({why}); the run goes on without it")
        else:
            say(f"{desc}: {len(items)} features from the cache", cfg.progress)
        self._store[key] = found
        return found
