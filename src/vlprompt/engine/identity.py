"""A run's identity: what decides its result, and nothing of where or how it runs, so that a study copied to
another machine (the data mounted elsewhere, another device, another weights path, other worker counts) skips
every run it has finished.

Version 3 (``IDENTITY_VERSION``):
- left out: execution-only keys (`EXECUTION_KEYS`: the data root, the device, the weights file's path, worker and
  thread counts, output and cache settings, checkpointing, the protocol that planned the run);
- the dataset is its name plus a hash of its split definition and image list (paths relative to the dataset
  folder, labels, class names) before any few-shot sampling (`dataset_identity`); shots and seed are in the key;
- a weights file is the hash of its bytes (`weights_identity`), the architecture and pretrained tag stay as given;
- precision is resolved (``auto`` becomes what this machine runs, never the word);
- the method's options are parsed with their defaults filled in.

Keys of version 2 (root, device and weights path included, precision as written) are still recognised
(`legacy_config_key`): a study finished by an earlier vlprompt is not rerun on the same machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from functools import lru_cache
from typing import Optional

from ..errors import VlpromptError
from ..methods import get_method
from ..methods.base import parse_options
from ..utils.hardware import resolve_precision

IDENTITY_VERSION = 3
# RunConfig keys that change how a run is carried out but never its result (version 2 left out these). The
# ``protocol`` only picks the recipe cell whose values the resolved configuration already holds.
NON_RESULT_KEYS = ("output", "progress", "num_workers", "threads", "test_batch_size", "feature_cache", "cache_dir",
                   "checkpoint_every", "resume", "keep_checkpoints", "overwrite", "protocol")
# Version 3 also leaves out where the data and the weights lie and where the run computes.
EXECUTION_KEYS = NON_RESULT_KEYS + ("root", "device", "weights")


# What decides a Hugging Face checkpoint folder's model (`backbones.hf_clip`), hashed in this order.
HF_FOLDER_FILES = ("config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin")


def _weights_files(path: str) -> list:
    """The files whose bytes are a weights path's identity: the file itself, or a checkpoint folder's files."""
    if not os.path.isdir(path):
        return [path]
    return [os.path.join(path, f) for f in HF_FOLDER_FILES if os.path.isfile(os.path.join(path, f))]


def _file_state(path: str) -> tuple:
    return tuple((st.st_size, st.st_mtime_ns) for st in map(os.stat, _weights_files(path)))


@lru_cache(maxsize=32)
def _weights_hash(path: str, state: tuple) -> str:
    digest = hashlib.sha256()
    folder = os.path.isdir(path)
    for file in _weights_files(path):
        if folder:  # a folder's files by name; a single file's bytes alone (as before)
            digest.update(os.path.basename(file).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:20]


def weights_identity(weights: str) -> str:
    """``sha256:<hash>`` of a weights file's bytes (hashed once per file state in a process); one error line when
    the file cannot be read."""
    path = os.path.abspath(os.path.expanduser(weights))
    try:
        return f"sha256:{_weights_hash(path, _file_state(path))}"
    except OSError as exc:
        raise VlpromptError(f"weights file {weights}: cannot be read ({exc.strerror or exc})") from None


def dataset_identity(dataset: str, root: Optional[str]) -> str:
    """``<name>@<hash>`` of a dataset's split definition and image list, wherever it lies (read afresh each time:
    a folder's lists are its content). A dataset that cannot be read here is ``<name>@unread``: a key no finished
    run carries (a run needs its data)."""
    from ..data.loader import _resolve  # lazily: the engine imports the data code only where it runs

    try:
        name, _, dataset_dir, raw, *_ = _resolve(dataset, root)
    except (VlpromptError, OSError):
        return f"{os.path.basename(os.path.normpath(str(dataset)))}@unread"
    digest = hashlib.sha256(name.encode())
    for split in (raw.train, raw.val, raw.test):
        digest.update(b"|split|")
        for item in split:
            digest.update(f"{os.path.relpath(item.path, dataset_dir)}\t{item.label}\t{item.classname}\n".encode())
    return f"{name}@{digest.hexdigest()[:16]}"


def _method_options(kept: dict) -> None:
    """The method's options in full (parsed, defaults filled in: ``weight: "4"`` from the command line and
    ``weight: 4.0`` from a file are one run); left as written when the configuration cannot run."""
    try:
        method = get_method(kept["method"])
        options = parse_options(method.name, method.Options, kept.get("method_options"))
        kept["method_options"] = dataclasses.asdict(options) if options is not None else {}
    except (KeyError, VlpromptError):
        pass


def result_identity(values: dict) -> dict:
    """The configuration that decides a run's result (version 3: portable; what a checkpoint, an overwrite check
    and a study compare). Raises `VlpromptError` when the weights file cannot be read."""
    kept = {k: v for k, v in values.items() if k not in EXECUTION_KEYS}
    _method_options(kept)
    kept["precision"] = resolve_precision(values.get("precision", "fp32"), values.get("device") or "cpu")
    kept["dataset"] = dataset_identity(values["dataset"], values.get("root"))
    kept["weights"] = weights_identity(values["weights"]) if values.get("weights") else None
    kept["identity_version"] = IDENTITY_VERSION
    return kept


def legacy_identity(values: dict) -> dict:
    """Version 2's identity: execution keys other than root, device and weights path left out, precision as
    written."""
    kept = {k: v for k, v in values.items() if k not in NON_RESULT_KEYS}
    _method_options(kept)
    return kept


def key_of(identity: dict) -> str:
    """The key of an identity (`result_identity`, `legacy_identity`): a short hash of it."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def config_key(values: dict) -> str:
    """A run's key: the hash of its `result_identity`. Studies recognise a finished run by it (never by its
    folder name)."""
    return key_of(result_identity(values))


def legacy_config_key(values: dict) -> str:
    """The key version 2 gave the same configuration (a run folder written by an earlier vlprompt)."""
    return key_of(legacy_identity(values))


def same_run(recorded: Optional[str], values: dict) -> bool:
    """Whether a folder's recorded key is the run of ``values``: its current key or the earlier version's."""
    if recorded is None:
        return False
    try:
        if recorded == config_key(values):
            return True
    except VlpromptError:
        pass
    return recorded == legacy_config_key(values)
