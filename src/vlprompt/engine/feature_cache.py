"""On-disk cache of evaluation image features (the frozen image tower encodes each test set once).

The image tower is frozen and the test transform deterministic, so each test split needs encoding once
per backbone. An entry is keyed by everything that changes the features: the backbone's architecture
and weights (file path, size and modification time; or tag; or random seed plus library versions), the
precision and device type, the transform (size, mean, std, recipe), and the exact image list (path,
label, file size and modification time of every image). The full key is stored inside the entry's own file
(safetensors metadata) and compared on load, with the tensors' shapes and labels, so a stale, foreign,
truncated or swapped entry is never used (it is recomputed and replaced). Entries are written to a temporary
file and renamed into place, so concurrent writers cannot leave a corrupt file: the last complete one wins.
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
from ..utils.faults import fault_point
from ..utils.io import atomic_write_bytes
from ..utils.progress import logger

TEST_TRANSFORM_ID = "resize-shorter-bicubic+center-crop+normalize/v1"

log = logger.getChild("cache")


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
    key = {"name": src.name, "quick_gelu": src.quick_gelu, "activation": bb.activation, "precision": bb.precision,
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
        "transform": {"id": TEST_TRANSFORM_ID, **{k: v for k, v in bb.preprocess.record().items() if k != "source"}},
        "dataset": dataset,
        "n_items": len(items),
        "width": bb.embed_dim,
        "items_sha256": digest.hexdigest(),
    }


KEY_FIELD = "vlprompt_feature_key"


class FeatureCache:
    """Features (N, d) float32 and labels (N,) per key, in ``folder`` (default ~/.cache/vlprompt/features):
    one safetensors file per entry that carries its key."""

    def __init__(self, folder: Optional[str | os.PathLike] = None):
        self.folder = Path(folder) if folder else default_cache_dir()

    def path(self, key: dict) -> Path:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.folder / f"{name}.safetensors"

    def load(self, key: dict, labels: Optional[torch.Tensor] = None) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The entry of ``key``, or None when it is missing or is not exactly that entry (``labels``, when
        given, must match the stored ones)."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                stored = json.loads((f.metadata() or {}).get(KEY_FIELD, "null"))
                if stored != json.loads(json.dumps(key)):
                    return None  # a foreign entry under this name: never used
                feats, stored_labels = f.get_tensor("features"), f.get_tensor("labels")
        except Exception:  # truncated or not a safetensors file: recomputed (and replaced)
            log.warning(f"feature cache: {path} is not a valid cache entry: ignored, the features are computed again")
            return None
        n, width = key["n_items"], key.get("width")
        if (feats.dtype != torch.float32 or feats.dim() != 2 or feats.shape[0] != n
                or (width is not None and feats.shape[1] != width) or tuple(stored_labels.shape) != (n,)):
            return None
        if labels is not None and not torch.equal(stored_labels, labels.to(stored_labels.dtype)):
            return None
        return feats, stored_labels

    def save(self, key: dict, feats: torch.Tensor, labels: torch.Tensor) -> Optional[str]:
        """Write the entry atomically; returns why it could not be written (the run goes on without it)."""
        from safetensors.torch import save

        blob = save({"features": feats.detach().float().cpu().contiguous(),
                     "labels": labels.detach().long().cpu().contiguous()},
                    metadata={KEY_FIELD: json.dumps(key, sort_keys=True)})
        path = self.path(key)
        try:
            fault_point("cache")
            atomic_write_bytes(path, blob)
        except OSError as exc:
            return f"{path.parent}: {exc.strerror or exc}"
        return None
