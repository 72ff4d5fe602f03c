"""Cross-dataset transfer (CoCoOp Table 2, docs/protocols.md): train once on the source (all classes), evaluate the
same prompt on every target's full test split with the target's class names and template (never the
source's subsample or template override). The average is over the targets; the source is reported beside.
`dg` uses the same machinery with the ImageNet variants as targets. The settings of its runs are the recipe
table's ``xd`` cells (`vlprompt.recipes`)."""

from __future__ import annotations

from .units import Planner, dataset_label

SHOTS = [16]
TRANSFER = True
COOP_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")


def default_targets(source: str) -> list[str]:
    return [d for d in COOP_DATASETS if d != source]


def plan_method(spec, m, planner: Planner) -> None:
    src = dataset_label(spec.source)
    if not m.trains:  # zero-shot: one run on the source and on each target
        for ds in [spec.source, *spec.targets]:
            planner.add_run(f"{m.label}/zeroshot/{dataset_label(ds)}", m,
                            {"dataset": dataset_label(ds), "source": src, "shots": 0, "seed": None}, dataset=ds)
        return
    for k in spec.shots:
        for s in spec.seeds:
            uid, role = f"{m.label}/{k}shots_seed{s}", {"source": src, "shots": k, "seed": s}
            planner.add_run(f"{uid}/{src}", m, {**role, "dataset": src}, dataset=spec.source, shots=k, seed=s)
            for t in spec.targets if m.transfers else ():  # a head over the source's classes: source only
                if dataset_label(t) != src:
                    planner.add_eval(f"{uid}/{dataset_label(t)}", f"{uid}/{src}", m,
                                     {**role, "dataset": dataset_label(t)}, dataset=t, subsample="all")
