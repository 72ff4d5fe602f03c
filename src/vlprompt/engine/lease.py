"""A lease on a run folder: whoever holds it is the one process that may write that run's checkpoint and move its
folder into place, so that a straggler and a retry of the same run never both write (studies on shared storage,
several workers or machines).

The lease is the file ``.<name>.lease`` beside the run folder: created exclusively, naming its owner (``host-pid``)
and a token; its modification time is the heartbeat, renewed by a background thread every quarter of the lease's
life (``VLPROMPT_LEASE_SECONDS``, default 120). Another process takes it over only when it has expired (no renewal
for that long) or when its owner ran on this host and is dead (a kill -9: the rerun need not wait); the takeover
renames the old file away first, which only one taker can do. A holder checks that its token is still there before
each checkpoint and before committing the run folder: a process whose lease was taken over stops without writing.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from ..errors import VlpromptError
from .run_folder import owner_tag, pid_alive, this_host

LEASE_ENV = "VLPROMPT_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 120.0


def lease_seconds() -> float:
    raw = os.environ.get(LEASE_ENV)
    if raw is None:
        return DEFAULT_LEASE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise VlpromptError(f"{LEASE_ENV}={raw!r}: expected a positive number of seconds")
    return value


def lease_path(run_folder: Path) -> Path:
    return run_folder.parent / f".{run_folder.name}.lease"


def _read(path: Path) -> Optional[dict]:
    """The lease at ``path`` (owner, token, seconds, age), or None when there is none. A file that is not a valid
    lease (damaged, cut short by a kill) counts as one of an unknown owner: it expires like any other."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except OSError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    seconds = info.get("seconds") if isinstance(info, dict) else None
    if not (isinstance(info, dict) and isinstance(info.get("owner"), str) and isinstance(info.get("token"), str)
            and isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0):
        info = {"owner": "an unknown process (unreadable lease file)", "token": None,
                "seconds": DEFAULT_LEASE_SECONDS}
    return {**info, "age": age}


def _owner_gone(info: dict) -> bool:
    """Its owner ran on this host and is no longer alive (a lease of this very process is live: it releases its
    leases when a run ends, however it ends)."""
    owner = str(info.get("owner", ""))
    host, _, pid = owner.rpartition("-")
    if host != this_host() or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not pid_alive(int(pid))


class Lease:
    """The lease this process holds on one run folder (`acquire`); `check` before writing, `release` at the end."""

    def __init__(self, path: Path, token: str, seconds: float):
        self.path, self.token, self.seconds = path, token, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {path.name}", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, run_folder: Path, seconds: Optional[float] = None) -> "Lease":
        """The lease on ``run_folder``, taking over an expired or abandoned one; one error line naming the holder
        when another live process holds it."""
        seconds = lease_seconds() if seconds is None else seconds
        try:
            return cls._take(run_folder, seconds)
        except OSError as exc:
            raise VlpromptError(f"cannot write the run folder {run_folder}: {exc.strerror or exc}") from None

    @classmethod
    def _take(cls, run_folder: Path, seconds: float) -> "Lease":
        path = lease_path(run_folder)
        token = f"{owner_tag()}-{uuid.uuid4().hex[:8]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = _read(path)
                if info is None:
                    continue  # released or taken over meanwhile
                if info["age"] <= float(info.get("seconds", seconds)) and not _owner_gone(info):
                    raise VlpromptError(f"run folder {run_folder} is being run by {info.get('owner')} (its lease was "
                                        f"renewed {info['age']:.0f}s ago and expires after {info.get('seconds')}s "
                                        "without renewal)")
                try:  # only one taker can move this file away
                    aside = path.with_name(f"{path.name}.expired-{token}")
                    os.rename(path, aside)
                    os.remove(aside)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"owner": owner_tag(), "token": token, "seconds": seconds}, f)
            return cls(path, token, seconds)
        raise VlpromptError(f"run folder {run_folder}: its lease changes hands too often to be taken; try again")

    def holds(self) -> bool:
        info = _read(self.path)
        return info is not None and info.get("token") == self.token

    def check(self, what: str) -> None:
        """Raise (one line) when this process no longer holds the lease: it must not write ``what``."""
        if not self.holds():
            info = _read(self.path) or {}
            raise VlpromptError(f"lease on {self.path.name[1:-6]} lost to {info.get('owner', 'another process')}: "
                                f"this process stops without writing {what}")

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            if not self.holds():
                return
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.holds():
            try:
                os.remove(self.path)
            except OSError:
                pass
