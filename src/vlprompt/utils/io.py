"""Atomic file writes (a crash or a full disk never leaves a half-written result or checkpoint), and bounded
reads of the JSON records vlprompt writes (a planted or damaged record is refused, never a memory or stack
exhaustion)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: reading it sets it, which is not thread-safe


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files: results are as readable as any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


MAX_JSON_BYTES = 64 * 1024 * 1024  # a metrics.json of 1000 classes and 200 epochs is well under 1 MB


def read_json(path: str | os.PathLike):
    """A JSON file's value. ``ValueError`` (the error every caller already handles for invalid JSON) for a file
    larger than `MAX_JSON_BYTES`, one that is not UTF-8 or not JSON, or one nested too deeply to parse."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{size:,} bytes, more than the {MAX_JSON_BYTES:,} a vlprompt record may have")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply to read") from None

