"""Base-to-new generalisation (CoCoOp's protocol, docs/protocols.md): train on the base half of the classes, then
evaluate the last-epoch prompt on the base test images among the base classes, and on the new test images
among the new classes with prompts rebuilt from the new names. H comes from the seed-averaged base and new
accuracies (`report`). Zero-shot methods run once on each half; methods that cannot transfer to other
class names (a linear probe, Tip-Adapter's cache) get their base accuracy only. The settings of its runs
(ViT-B/16, 4 context vectors from "a photo of a" unless a method has its own) are the recipe table's
``base2new`` cells (`vlprompt.recipes`)."""

from __future__ import annotations

from .units import Planner, dataset_label

SHOTS = [16]
TRANSFER = False


def plan_method(spec, m, planner: Planner) -> None:
    for ds in spec.datasets:
        name = dataset_label(ds)
        role = {"dataset": name, "source": name}
        if not m.trains:
            for split in ("base", "new"):
                planner.add_run(f"{name}/{m.label}/zeroshot/{split}", m,
                                {**role, "shots": 0, "seed": None, "split": split}, dataset=ds, subsample=split)
            continue
        for k in spec.shots:
            for s in spec.seeds:
                uid, one = f"{name}/{m.label}/{k}shots_seed{s}", {**role, "shots": k, "seed": s}
                planner.add_run(f"{uid}/base", m, {**one, "split": "base"}, dataset=ds, shots=k, seed=s,
                                subsample="base")
                if m.transfers:  # a head over the base classes has no new-class accuracy (nor H)
                    planner.add_eval(f"{uid}/new", f"{uid}/base", m, {**one, "split": "new"}, subsample="new")
