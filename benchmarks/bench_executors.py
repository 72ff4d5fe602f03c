"""Study executors on this machine (printed figures, never asserted): one study of 8 tiny-model training runs (CoOp,
8 seeds, a generated dataset) carried out by the local executor, by the pool executor with 1 and 2 workers (each
with its default thread budget, the cores divided among the workers, as a user gets it) and by the ray executor
with 2 workers of 1 CPU each on a local Ray cluster (started by the executor, counted in its time), in one process,
each in a fresh study folder: wall time and speed-up over local.

    .venv/bin/python benchmarks/bench_executors.py [--epochs 40] [--workers 1,2] [--ray-workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
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
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--ray-workers", dest="ray_workers", type=int, default=2, help="0: no ray row")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="vlprompt-bench-exec-"))
    try:
        data = make_synthetic_dataset(str(tmp / "shapes"), n_train_per_class=8, n_test_per_class=8, seed=0)
        settings = {"backbone": "vlprompt-tiny-ViT", "pretrained": "random", "epochs": args.epochs,
                    "batch_size": 8, "feature_cache": False}
        spec = StudySpec(protocol="fewshot", methods=[MethodSpec("coop")], datasets=[data], shots=[4],
                         seeds=list(range(1, args.runs + 1)), settings=settings)
        print(f"study: {args.runs} CoOp runs on vlprompt-tiny-ViT, {args.epochs} epochs each")
        print(f"{'executor':>22} {'wall s':>8} {'speed-up':>9}")
        t0 = time.perf_counter()
        run_study(spec, tmp / "local", progress=False)
        local = time.perf_counter() - t0
        print(f"{'local':>22} {local:8.1f} {1.0:8.2f}x", flush=True)
        for n in [int(w) for w in args.workers.split(",")]:
            threads = max(1, (os.cpu_count() or 1) // n)
            t0 = time.perf_counter()
            run_study(spec, tmp / f"pool{n}", progress=False, executor="pool", workers=n)
            wall = time.perf_counter() - t0
            print(f"{f'pool {n} x {threads} thread(s)':>22} {wall:8.1f} {local / wall:8.2f}x", flush=True)
        if args.ray_workers:
            n = args.ray_workers
            t0 = time.perf_counter()
            run_study(spec, tmp / "ray", progress=False, executor="ray", workers=n, cpus_per_run=1)
            wall = time.perf_counter() - t0
            print(f"{f'ray {n} x 1 CPU':>22} {wall:8.1f} {local / wall:8.2f}x", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
