"""How many CPU threads a run uses: chosen for the load on the machine and the size of the work.

PyTorch starts one intra-op thread per core. Beside other busy processes those threads outnumber the free
cores, and every one of a training step's many small operations waits for its slowest thread, which the
scheduler has put behind another process: measured here, a run slowed 4.8x beside two busy processes where
its fair share is 2x. A small model, whose operations are too small to split, takes one thread; others take
every core, or with ``threads="auto"`` the cores that are free when the run starts (never fewer than one).
The default depends only on the machine and the model, never on the load, because the thread count decides
how sums are split and so the last bits of a result. The number used and why are recorded in the run.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Optional

# Text-tower width below which the matrices of one step are too small for a second thread to pay off.
SMALL_MODEL_WIDTH = 256


@dataclass
class ThreadChoice:
    threads: int
    reason: str

    def as_record(self) -> dict:
        return {"threads": self.threads, "reason": self.reason}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _runnable_now() -> Optional[int]:
    """Threads runnable on the machine at this instant (the kernel's count in /proc/loadavg, this one
    included); None where there is no such file."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def busy_cores(samples: int = 7, interval_s: float = 0.02) -> float:
    """Cores kept busy by other processes now: the median over a few instants of the runnable threads
    besides this one (the one-minute load average elsewhere, which lags)."""
    counts = []
    for i in range(samples):
        n = _runnable_now()
        if n is None:
            break
        counts.append(max(n - 1, 0))
        if i + 1 < samples:
            time.sleep(interval_s)
    if counts:
        return float(statistics.median(counts))
    try:
        return max(os.getloadavg()[0] - 1.0, 0.0)
    except (AttributeError, OSError):
        return 0.0


# This process's share of the machine when it is one of several workers (`set_thread_budget`); None: all of it.
_budget: Optional[int] = None


def set_thread_budget(threads: Optional[int]) -> None:
    """Cap every run of this process at ``threads`` (an executor's worker, one of several on the machine)."""
    global _budget
    _budget = threads


def choose_threads(requested: Optional[str], model_width: Optional[int] = None) -> ThreadChoice:
    """The threads of a run: `_choose_threads`, capped by the worker's budget where this process has one (a run
    never takes more than its share, and a small model keeps its one thread in a worker as it does alone)."""
    choice = _choose_threads(requested, model_width)
    if _budget is not None and choice.threads > _budget:
        return ThreadChoice(_budget, f"{choice.reason}; capped at this worker's budget of {_budget}")
    return choice


def _choose_threads(requested: Optional[str], model_width: Optional[int] = None) -> ThreadChoice:
    """``requested``: a number, ``"auto"`` (the cores free now), or None: one thread for a small model, every core
    otherwise. The default never depends on the load: the thread count changes how sums are split, and so the last
    bits of a result, and the same command must give the same result."""
    cores = usable_cores()
    if requested not in (None, "auto"):
        return ThreadChoice(int(requested), "asked for (--threads)")
    if model_width is not None and model_width < SMALL_MODEL_WIDTH:
        return ThreadChoice(1, f"small model (width {model_width} < {SMALL_MODEL_WIDTH}): its operations are "
                               "too small to split")
    if requested is None:
        return ThreadChoice(cores, f"every core ({cores}); --threads auto takes only the free ones")
    busy = busy_cores()
    free = max(1, min(cores, round(cores - busy)))
    if free == cores:
        return ThreadChoice(cores, f"--threads auto: all {cores} cores are free")
    return ThreadChoice(free, f"--threads auto: {free} of {cores} cores free ({busy:g} busy with other work)")


def apply_threads(choice: ThreadChoice) -> None:
    import torch

    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
