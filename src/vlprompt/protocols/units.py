"""The units a study is made of, and the planner the protocol modules fill.

A unit is one run folder: a training (or zero-shot) run, or an evaluation of a trained prompt on other
classes or another dataset. Each protocol module (`fewshot`, `base2new`, `xd`, `dg`) says, per method,
which units it needs through `Planner.add_run` and `Planner.add_eval`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import RunConfig


@dataclass
class Unit:
    uid: str  # the folder under STUDY_DIR/runs, e.g. "caltech101/coop/16shots_seed1/base"
    kind: str  # "run" | "eval"
    cfg: Optional[RunConfig]  # the run's configuration (kind run)
    eval_overrides: dict  # what an evaluation changes from the trained run (kind eval)
    after: Optional[str]  # the training unit an evaluation needs
    role: dict  # protocol, dataset (evaluated), source (trained on), method, method_type, shots, seed, split


def dataset_label(dataset: str) -> str:
    """How a dataset appears in folder names and tables: its registry name, or a folder's own name."""
    return Path(dataset).name if ("/" in dataset or dataset.startswith(".")) else dataset


class Planner:
    """Collects the units of one study; ``make_config(method, **values)`` resolves a unit's RunConfig."""

    def __init__(self, protocol: str, runs_dir: Path, make_config: Callable[..., RunConfig], progress: bool):
        self.protocol, self.runs_dir, self.make_config, self.progress = protocol, runs_dir, make_config, progress
        self.units: list[Unit] = []

    def _role(self, m, role: dict) -> dict:
        return {"protocol": self.protocol, "split": "all", **role, "method": m.label, "method_type": m.method}

    def add_run(self, uid: str, m, role: dict, **values) -> None:
        """A run of method spec ``m`` with RunConfig ``values`` (dataset, shots, seed, subsample)."""
        cfg = self.make_config(m, output=str(self.runs_dir / uid), progress=self.progress, **values)
        self.units.append(Unit(uid, "run", cfg, {}, None, self._role(m, role)))

    def add_eval(self, uid: str, after: str, m, role: dict, **overrides) -> None:
        """An evaluation of the prompt trained by unit ``after``, with ``overrides`` (dataset, subsample)."""
        self.units.append(Unit(uid, "eval", None, overrides, after, self._role(m, role)))
