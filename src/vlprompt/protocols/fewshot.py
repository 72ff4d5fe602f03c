"""Few-shot classification (docs/protocols.md): every dataset x method x shots x seed, on the full test split.
Zero-shot methods have no shots or seeds: one run per dataset, reported at 0 shots. The settings of its runs
are the recipe table's ``fewshot`` cells (CoOp's recipe unless a method has its own; `vlprompt.recipes`)."""

from __future__ import annotations

from .units import Planner, dataset_label

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
