"""The few-shot grid of one dataset: every (shots, seed) pair in one process, one model load, one store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..backbones import Backbone
from ..config import RunConfig
from ..engine.feature_store import FeatureStore
from ..engine.run import backbone_for, default_output, run


def run_grid(cfg: RunConfig, shots: Sequence[int], seeds: Sequence[int],
             backbone: Optional[Backbone] = None, store: Optional[FeatureStore] = None) -> list[dict]:
    """Each run writes its own folder: ``cfg.output/<shots>shots_seed<S>`` when ``cfg.output`` is set,
    else the default layout. Returns the metrics of every run, shots-major."""
    bb = backbone_for(cfg, backbone)
    store = store if store is not None else FeatureStore()
    results = []
    for k in shots:
        for seed in seeds:
            one = cfg.replace(shots=k, seed=seed)
            if cfg.output:
                one = one.replace(output=str(Path(cfg.output) / Path(default_output(one)).name))
            results.append(run(one, backbone=bb, store=store))
    return results
