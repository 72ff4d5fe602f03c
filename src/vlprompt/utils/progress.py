"""Progress lines on stderr for long work; throttled so logs stay readable without a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, desc: str, total: int, enabled: bool = True, every_s: float = 5.0):
        self.desc, self.total, self.enabled, self.every_s = desc, total, enabled, every_s
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            pct = 100.0 * self.done / max(self.total, 1)
            msg = f"{self.desc}: {self.done}/{self.total} ({pct:.0f}%) {now - self.start:.1f}s"
            print(msg + (f" {extra}" if extra else ""), file=sys.stderr, flush=True)


def say(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)
