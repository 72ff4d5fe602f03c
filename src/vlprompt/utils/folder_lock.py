"""One driver per folder: an exclusive lock on ``<folder>/.lock`` that the operating system releases when
its holder exits, however it exits (``flock``: a killed process never leaves the folder stuck).

The lock file names its holder (host, pid, command, since when) so that a second process can say who has
the folder. ``flock`` locks are exact on local disks; on network file systems (NFS, Lustre) they depend on
the mount, which is why studies across machines use leases instead (planned with the cluster executors).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from ..errors import VlpromptError

LOCK_NAME = ".lock"


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}


def describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (f"pid {info['pid']} on {info['host']} since {info['since']}"
                + (f" ({info['command']})" if info.get("command") else ""))
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class FolderLock:
    """``with FolderLock(folder, "study"):`` holds the folder for this process. ``wait``: block until the
    holder finishes (printing once who it is) instead of refusing with one line naming the holder."""

    def __init__(self, folder: Path, what: str = "folder", wait: bool = False, on_wait=None):
        self.folder, self.what, self.wait, self.on_wait = Path(folder), what, wait, on_wait
        self._fd: Optional[int] = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> None:
        import fcntl

        if self.folder.exists() and not self.folder.is_dir():
            raise VlpromptError(f"{self.what} folder {self.folder} is a file, not a folder; give another path")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a planted `.lock` symlink must not make us truncate the file it points to
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if self.path.is_symlink():
                raise VlpromptError(f"cannot lock the {self.what} folder {self.folder}: {self.path} is a symbolic "
                                    "link (not written through; remove it)") from None
            raise VlpromptError(f"cannot lock the {self.what} folder {self.folder}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(self.path)
            if not self.wait:
                os.close(fd)
                raise VlpromptError(f"{self.what} folder {self.folder} is in use by {holder}; wait for it to "
                                    "finish (or pass --wait to wait here)") from None
            if self.on_wait:
                self.on_wait(f"{self.what} folder {self.folder} is in use by {holder}: waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            raise VlpromptError(f"cannot lock the {self.what} folder {self.folder}: {exc.strerror or exc}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
