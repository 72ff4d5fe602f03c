"""Few-shot classification (SPEC 6.1): every dataset x method x shots x seed, on the full test split.
Zero-shot methods have no shots or seeds: one run per dataset, reported at 0 shots."""

from __future__ import annotations

from .units import Planner, dataset_label

DEFAULTS: dict = {}  # the CoOp recipe: RunConfig's own defaults (RN50, M = 16, epochs by shots)
SHOTS = [1, 2, 4, 8, 16]
TRANSFER = False  # datasets, not a source and targets


def plan_method(spec, m, planner: Planner) -> None:
    for ds in spec.datasets:
        name = dataset_label(ds)
        role = {"dataset": name, "source": name}
        if not m.trains:
            planner.add_run(f"{name}/{m.label}/zeroshot", m, {**role, "shots": 0, "seed": None}, dataset=ds)
            continue
        for k in spec.shots:
            for s in spec.seeds:
                planner.add_run(f"{name}/{m.label}/{k}shots_seed{s}", m, {**role, "shots": k, "seed": s},
                                dataset=ds, shots=k, seed=s)
