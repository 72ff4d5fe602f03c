"""How a study's units are carried out. The driver (`study.run_study`) plans the units, hands each to an executor
when its training run (if any) has finished, and records every outcome in the study index: it is the index's only
writer. An executor only runs units and reports `Outcome`s; a unit's run folder is written by the run itself (as one
unit, under its lease).

- `LocalExecutor` (``local``): one unit at a time in this process, one model load per backbone and one feature store
  for the whole study.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import RunConfig
from ..engine.feature_store import FeatureStore
from ..engine.run import backbone_from_config, eval_config, evaluate_prompt, run
from ..errors import VlpromptError
from .units import Unit


@dataclass
class Outcome:
    """What became of one unit: its metrics, or its one-line error; how long it took."""

    uid: str
    metrics: Optional[dict]
    error: Optional[str]
    seconds: float


def one_line(exc: BaseException) -> str:
    text = (str(exc) or type(exc).__name__).strip().splitlines()[0]
    return text if isinstance(exc, VlpromptError) else f"{type(exc).__name__}: {text}"


def load_backbone_once(cache: dict, cfg: RunConfig):
    """One model load per backbone for every unit an executor runs."""
    key = (cfg.backbone.replace("/", "-"), cfg.weights, cfg.pretrained if not cfg.weights else None,
           cfg.precision, cfg.device)
    if key not in cache:
        cache[key] = backbone_from_config(cfg)
    return cache[key]


def execute_unit(unit: Unit, folder: Callable[[str], Path], backbones: dict, store: FeatureStore,
                 progress: bool) -> Outcome:
    """Run one unit (a training run, or an evaluation of its training run's prompt); any exception becomes the
    unit's one-line error: one unit's failure never stops a study."""
    t = time.perf_counter()
    try:
        # A study owns its run folders: one whose configuration changed is replaced (overwrite).
        if unit.kind == "run":
            metrics = run(unit.cfg.replace(overwrite=True), backbone=load_backbone_once(backbones, unit.cfg),
                          store=store)
        else:
            trained = folder(unit.after)
            overrides = {**unit.eval_overrides, "progress": progress, "overwrite": True}
            bb = load_backbone_once(backbones, eval_config(trained, overrides)[0])
            metrics = evaluate_prompt(str(trained), overrides, output=str(folder(unit.uid)), backbone=bb,
                                      store=store)
    except Exception as exc:
        return Outcome(unit.uid, None, one_line(exc), time.perf_counter() - t)
    return Outcome(unit.uid, metrics, None, time.perf_counter() - t)


class LocalExecutor:
    """Units one after another in this process (the default)."""

    name = "local"

    def __init__(self, folder: Callable[[str], Path], progress: bool):
        self.folder, self.progress = folder, progress
        self.backbones: dict = {}
        self.store = FeatureStore()
        self._queue: deque = deque()

    def prepare(self, units: list) -> None:
        """Every backbone the training runs need, loaded now: a wrong architecture or weights file is one error
        line before any work, not a failure recorded for every run."""
        for u in units:
            if u.kind == "run":
                load_backbone_once(self.backbones, u.cfg)

    def free_slots(self) -> int:
        return 1 - len(self._queue)

    def submit(self, unit: Unit) -> None:
        self._queue.append(unit)

    def next_outcome(self) -> Outcome:
        """The outcome of the next submitted unit (run here, now)."""
        return execute_unit(self._queue.popleft(), self.folder, self.backbones, self.store, self.progress)

    def close(self) -> None:
        self._queue.clear()
