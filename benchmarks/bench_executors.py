"""Study executors on this machine (printed figures, never asserted): one study of 8 tiny-model training runs (CoOp,
8 seeds, a generated dataset) carried out by the local executor, by the pool executor with 1 and 2 workers (each
with its default thread budget, the cores divided among the workers, as a user gets it) and by the ray executor
with 2 workers of 1 CPU each on a local Ray cluster (started by the executor, counted in its time), in one process,
each in a fresh study folder: wall time and speed-up over local.

    .venv/bin/python benchmarks/bench_executors.py [--epochs 120] [--workers 1,2] [--ray-workers 2] [--rounds 2]

The executors run in one order and then in the reverse one (``--rounds``), and each figure is the mean of its rounds:
this machine's speed drifts by up to 1.7x over minutes, which one pass in a fixed order would charge to one
executor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED.*")

from vlprompt.data import make_synthetic_dataset  # noqa: E402
from vlprompt.protocols.study import MethodSpec, StudySpec, run_study  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--ray-workers", dest="ray_workers", type=int, default=2, help="0: no ray row")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="vlprompt-bench-exec-"))
    try:
        data = make_synthetic_dataset(str(tmp / "shapes"), n_train_per_class=8, n_test_per_class=8, seed=0)
        settings = {"backbone": "vlprompt-tiny-ViT", "pretrained": "random", "epochs": args.epochs,
                    "batch_size": 8, "feature_cache": False}
        spec = StudySpec(protocol="fewshot", methods=[MethodSpec("coop")], datasets=[data], shots=[4],
                         seeds=list(range(1, args.runs + 1)), settings=settings)
        print(f"study: {args.runs} CoOp runs on vlprompt-tiny-ViT, {args.epochs} epochs each; {args.rounds} "
              "round(s), the executors in one order and then the reverse (the machine's speed drifts)")
        executors = {"local": ("local", {})}
        for n in [int(w) for w in args.workers.split(",")]:
            threads = max(1, (os.cpu_count() or 1) // n)
            executors[f"pool {n}, <= {threads} thread(s)"] = ("pool", {"workers": n})
        if args.ray_workers:
            executors[f"ray {args.ray_workers} x 1 CPU"] = ("ray", {"workers": args.ray_workers, "cpus_per_run": 1})
        walls: dict = {name: [] for name in executors}
        order = list(executors)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                kind, options = executors[name]
                t0 = time.perf_counter()
                run_study(spec, tmp / f"round{r}" / name.replace(" ", "_"), progress=False, executor=kind, **options)
                walls[name].append(time.perf_counter() - t0)
        local = statistics.mean(walls["local"])
        print(f"{'executor':>22} {'wall s (mean)':>14} {'rounds':>16} {'speed-up':>9}")
        for name, values in walls.items():
            mean = statistics.mean(values)
            print(f"{name:>22} {mean:14.1f} {' '.join(f'{v:.1f}' for v in values):>16} {local / mean:8.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
