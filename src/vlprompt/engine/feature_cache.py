"""On-disk cache of evaluation image features (DESIGN.md, Performance 3).

The image tower is frozen and the test transform deterministic, so each test split needs encoding once
per backbone. An entry is keyed by everything that changes the features: the backbone's architecture
and weights (file path, size and modification time; or tag; or random seed plus library versions), the
precision and device type, the transform (size, mean, std, recipe), and the exact image list (path,
label, file size and modification time of every image). The full key is stored beside the features and
compared on load, so a stale or foreign entry is never used. Entries are written to a temporary file and
renamed into place, so concurrent writers cannot leave a corrupt file: the last complete one wins.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..backbones.backbone import Backbone
from ..data.types import Datum
from ..utils.io import atomic_write_bytes, atomic_write_text

TEST_TRANSFORM_ID = "resize-shorter-bicubic+center-crop+normalize/v1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLPROMPT_CACHE", Path.home() / ".cache" / "vlprompt")) / "features"


def _file_id(path: str) -> list:
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [None, None]


def backbone_key(bb: Backbone) -> dict:
    import open_clip

    src = bb.source
    key = {"name": src.name, "quick_gelu": src.quick_gelu, "precision": bb.precision,
           "device": bb.device.type, "image_encoder": bb.image_encoder_id, "torch": torch.__version__,
           "open_clip": open_clip.__version__}
    if src.name.endswith(".json"):
        key["arch_file"] = hashlib.sha256(Path(src.name).read_bytes()).hexdigest()
    if src.weights:
        key["weights"] = [os.path.abspath(src.weights), *_file_id(src.weights)]
    elif src.pretrained:
        key["pretrained"] = src.pretrained
    else:
        key["random_init_seed"] = src.random_init_seed
    return key


def split_key(bb: Backbone, items: Sequence[Datum], dataset: str) -> dict:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.path, item.label, *_file_id(item.path)]).encode())
        digest.update(b"\n")
    return {
        "backbone": backbone_key(bb),
        "transform": {"id": TEST_TRANSFORM_ID, "size": bb.image_size, "mean": list(bb.image_mean),
                      "std": list(bb.image_std)},
        "dataset": dataset,
        "n_items": len(items),
        "items_sha256": digest.hexdigest(),
    }


class FeatureCache:
    """Features (N, d) float32 and labels (N,) per key, in ``folder`` (default ~/.cache/vlprompt/features)."""

    def __init__(self, folder: Optional[str | os.PathLike] = None):
        self.folder = Path(folder) if folder else default_cache_dir()

    def _paths(self, key: dict) -> tuple[Path, Path]:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.folder / f"{name}.safetensors", self.folder / f"{name}.json"

    def load(self, key: dict) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        from safetensors.torch import load_file

        data_path, key_path = self._paths(key)
        try:
            stored = json.loads(key_path.read_text())
            if stored != json.loads(json.dumps(key)):
                return None  # a foreign entry under the same name: never use it
            tensors = load_file(str(data_path))
            feats, labels = tensors["features"], tensors["labels"]
        except Exception:  # missing, partial or corrupt: recompute
            return None
        if feats.shape[0] != key["n_items"] or labels.shape[0] != key["n_items"]:
            return None
        return feats, labels

    def save(self, key: dict, feats: torch.Tensor, labels: torch.Tensor) -> None:
        from safetensors.torch import save

        data_path, key_path = self._paths(key)
        blob = save({"features": feats.detach().float().cpu().contiguous(),
                     "labels": labels.detach().long().cpu().contiguous()})
        try:
            atomic_write_bytes(data_path, blob)
            atomic_write_text(key_path, json.dumps(key, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only or full cache folder only costs speed
