"""Fault injection for the fault tests: ``VLPROMPT_FAULTS`` names points where this process is killed with
SIGKILL or gets a full disk, e.g. ``kill@step=7`` (after the 7th training step's bookkeeping) or
``enospc@checkpoint=2`` (the 2nd checkpoint write) or ``enospc@cache`` (every feature-cache write).
Unset (always, outside the tests), a fault point costs one dictionary lookup."""

from __future__ import annotations

import errno
import os
import signal

_counts: dict[str, int] = {}


def _rules() -> dict[str, tuple[str, int]]:
    out = {}
    for rule in filter(None, os.environ.get("VLPROMPT_FAULTS", "").split(",")):
        action, _, where = rule.strip().partition("@")
        point, _, n = where.partition("=")
        out[point] = (action, int(n) if n else 0)
    return out


def fault_point(point: str) -> None:
    """Count a pass through ``point`` and inject the fault configured for it on its n-th pass (every
    pass when no n is given)."""
    if "VLPROMPT_FAULTS" not in os.environ:
        return
    rule = _rules().get(point)
    if rule is None:
        return
    _counts[point] = _counts.get(point, 0) + 1
    action, n = rule
    if n and _counts[point] != n:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
