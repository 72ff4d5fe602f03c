"""Run folders written as one unit, and the hidden folders that make that possible.

A run is staged in ``.<name>.partial-<host>-<pid>`` beside its folder and renamed into place when complete;
a finished run being replaced is first moved to ``.<name>.old-<host>-<pid>``. Both name their owner, so that
what a killed process left behind can be told from another live process's work: a hidden folder is removed
only when its owner ran on this host and is no longer alive. A kill between the two renames of a
replacement leaves the previous finished run in its ``.old-`` copy: it is put back, never deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from typing import Iterable, Optional

from ..errors import VlpromptError
from ..utils.io import read_json
from ..utils.progress import logger

log = logger.getChild("runs")
# ".<name>.partial-<host>-<pid>" (this version) or ".<name>.partial-<pid>" (earlier ones, this host).
HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def this_host() -> str:
    """This machine's name as hidden folders carry it (without characters that folder names should not carry)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", socket.gethostname()) or "host"


def owner_tag() -> str:
    """``<host>-<pid>`` of this process."""
    return f"{this_host()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running: it exists and is not a zombie (a killed process whose
    parent has not reaped it, e.g. a worker of a fork server orphaned by a killed driver)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: existing is running


def _left_behind(match: re.Match) -> bool:
    """Whether a hidden folder's owner is gone: it ran on this host and its pid is not alive (or is ours,
    from an earlier attempt in this process)."""
    host = match.group("host")
    if host is not None and host != this_host():
        return False  # another machine's (shared storage): it cannot be judged from here
    pid = int(match.group("pid"))
    return pid == os.getpid() or not pid_alive(pid)


def clean_stale(parent: Path, names: Optional[Iterable[str]] = None) -> list[Path]:
    """Remove the staging and replaced-run copies in ``parent`` left by dead processes of this host (only for
    run folders in ``names`` when given). A replaced run whose new version never arrived is put back."""
    wanted = None if names is None else set(names)
    removed = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = HIDDEN.match(path.name)
        if not match or not path.is_dir() or (wanted is not None and match.group("name") not in wanted):
            continue
        if not _left_behind(match):
            continue
        target = parent / match.group("name")
        if match.group("kind") == "old" and not target.exists():
            try:
                os.replace(path, target)  # the finished run a killed replacement had moved aside
                log.warning(f"restored the finished run {target} from {path.name} (left by a killed process)")
                continue
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def clean_stale_tree(root: Path) -> int:
    """`clean_stale` in every folder under ``root`` (a study's runs): how many hidden folders were removed."""
    count = 0
    if not root.is_dir():
        return 0
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir() and not HIDDEN.match(p.name))]:
        if any(HIDDEN.match(part) for part in folder.relative_to(root).parts):
            continue
        count += len(clean_stale(folder))
    return count


def stage_run_folder(out: Path) -> Path:
    """A fresh hidden staging folder beside ``out``, made before any work so that an output that cannot be
    written fails at once; what dead processes left for ``out`` is cleaned first."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out.parent, [out.name])
        stage = out.parent / f".{out.name}.partial-{owner_tag()}"
        stage.mkdir()
    except OSError as exc:
        raise VlpromptError(f"cannot write the run folder {out}: {exc.strerror or exc}") from None
    return stage


def commit_run_folder(stage: Path, out: Path) -> None:
    """Move the complete staged run into place; a finished run already there is replaced as a whole."""
    try:
        if not out.exists():
            os.replace(stage, out)
            return
        old = out.parent / f".{out.name}.old-{owner_tag()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        try:
            os.replace(stage, out)
        except OSError:
            os.replace(old, out)  # the finished run stays where it was
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise VlpromptError(f"cannot move the finished run into {out}: {exc.strerror or exc}") from None


def recorded_key(out: Path) -> Optional[str]:
    """The ``config_key`` a finished run folder records, or None."""
    try:
        key = read_json(out / "metrics.json").get("config_key")
    except (OSError, ValueError, AttributeError):
        return None
    return key if isinstance(key, str) else None
