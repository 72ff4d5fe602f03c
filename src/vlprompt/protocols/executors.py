"""How a study's units are carried out. The driver (`study.run_study`) plans the units, hands each to an executor
when its training run (if any) has finished, and records every outcome in the study index: it is the index's only
writer. An executor only runs units and reports `Outcome`s; a unit's run folder is written by the run itself (as one
unit, under its lease).

- `LocalExecutor` (``local``): one unit at a time in this process, one model load per backbone and one feature store
  for the whole study.
- `PoolExecutor` (``pool``): N worker processes on this machine, each keeping its backbones and feature store
  across its units and running them within its own thread budget (``threads_per_worker``, by default the cores
  divided among the workers, so N runs at once are never slower than one after another; a run that would take
  fewer threads alone, a small model's one, keeps that number), or one GPU each
  (``gpus`` x ``runs_per_gpu`` workers, each seeing only its GPU). A worker that dies (killed, out of memory) is
  replaced and its unit given again, up to ``max_retries`` times; an exception inside a unit is that unit's
  failure.
- `ray_executor.RayExecutor` (``ray``): the same on the actors of a Ray cluster (an optional extra).

Each unit's ``metrics.json`` records how it ran under ``execution`` (executor, host, worker, attempt, device).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import RunConfig
from ..engine.feature_store import FeatureStore
from ..engine.run import backbone_from_config, eval_config, evaluate_prompt, run
from ..engine.run_folder import pid_alive
from ..errors import VlpromptError
from ..utils.threads import set_thread_budget
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
                 progress: bool, execution: Optional[dict] = None) -> Outcome:
    """Run one unit (a training run, or an evaluation of its training run's prompt); any exception becomes the
    unit's one-line error: one unit's failure never stops a study. ``execution``: recorded in its metrics. A worker's
    thread budget caps the run's threads (`utils.threads.set_thread_budget`)."""
    t = time.perf_counter()
    try:
        # A study owns its run folders: one whose configuration changed is replaced (overwrite).
        if unit.kind == "run":
            cfg = unit.cfg.replace(overwrite=True)
            metrics = run(cfg, backbone=load_backbone_once(backbones, unit.cfg), store=store,
                          execution={**(execution or {}), "device": cfg.device})
        else:
            trained = folder(unit.after)
            overrides = {**unit.eval_overrides, "progress": progress, "overwrite": True}
            cfg = eval_config(trained, overrides)[0]
            metrics = evaluate_prompt(str(trained), overrides, output=str(folder(unit.uid)),
                                      backbone=load_backbone_once(backbones, cfg), store=store,
                                      execution={**(execution or {}), "device": cfg.device})
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
        return execute_unit(self._queue.popleft(), self.folder, self.backbones, self.store, self.progress,
                            {"executor": "local", "host": socket.gethostname(), "attempt": 1})

    def in_flight(self) -> list:
        return []

    def close(self) -> None:
        self._queue.clear()


def _die_with_parent() -> None:
    """Ask the kernel to kill this worker when its parent dies (Linux). For a spawned (GPU) worker the parent is the
    driver; a fork server outlives a killed driver, so CPU workers rely on `_watch_driver`."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _watch_driver(driver: int) -> None:
    """Kill this worker as soon as the driver is gone (mid-run too): its unit is the restarted driver's to give
    again, and its lease then belongs to a dead process, which a rerun takes over at once."""
    while pid_alive(driver):
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def _worker(index: int, runs_dir: str, progress: bool, threads: int, tasks, results, driver: int, env: dict) -> None:
    """A pool worker: its own backbones and feature store for every unit it is given, its own thread budget, and
    the driver's environment as it was when the worker was started (a fork server's is older)."""
    import torch

    os.environ.clear()
    os.environ.update(env)
    _die_with_parent()
    threading.Thread(target=_watch_driver, args=(driver,), name="driver watch", daemon=True).start()
    torch.set_num_threads(threads)
    set_thread_budget(threads)
    backbones: dict = {}
    store = FeatureStore()

    def folder(uid: str) -> Path:
        return Path(runs_dir) / uid

    while True:
        task = tasks.get()  # a dead driver never sends one: `_watch_driver` ends this process then
        if task is None:
            return
        unit, attempt = task
        execution = {"executor": "pool", "host": socket.gethostname(), "worker": index, "attempt": attempt}
        results.put((index, execute_unit(unit, folder, backbones, store, progress, execution)))


class PoolExecutor:
    """N worker processes on this machine (see the module docstring)."""

    name = "pool"

    def __init__(self, runs_dir: Path, progress: bool, workers: int = 2, threads_per_worker: Optional[int] = None,
                 gpus: Optional[list] = None, runs_per_gpu: int = 1, max_retries: int = 1):
        import multiprocessing

        if gpus:
            workers = len(gpus) * runs_per_gpu
        if workers < 1 or runs_per_gpu < 1 or max_retries < 0:
            raise VlpromptError("executor pool: --workers and --runs-per-gpu must be >= 1, --max-retries >= 0")
        if threads_per_worker is not None and threads_per_worker < 1:
            raise VlpromptError(f"executor pool: --threads-per-worker must be >= 1, got {threads_per_worker}")
        self.threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        self.runs_dir, self.progress, self.max_retries = str(runs_dir), progress, max_retries
        self.gpus = [str(g) for g in gpus] if gpus else None
        self.runs_per_gpu = runs_per_gpu
        # CPU workers fork from a fork server: a clean process that has imported vlprompt and torch once and run
        # no torch work, so each worker starts at once without inheriting a thread pool's locks (forking the driver
        # itself deadlocks once it has run torch operations). GPU workers start a fresh interpreter each (a CUDA
        # context cannot be forked, and each must see only its own GPU from the start).
        if not gpus and "forkserver" in multiprocessing.get_all_start_methods():
            self._ctx = multiprocessing.get_context("forkserver")
            self._ctx.set_forkserver_preload([__name__])
        else:
            self._ctx = multiprocessing.get_context("spawn")
        self._results = self._ctx.Queue()
        self._workers: list = [None] * workers
        self._busy: dict = {}  # worker index -> (unit, attempt)
        for i in range(workers):
            self._start(i, first=True)

    def _start(self, index: int, first: bool) -> None:
        """Start worker ``index`` (with its GPU, where there are GPUs). Fault injection (the tests') applies to
        first workers only: a replacement runs clean."""
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[index // self.runs_per_gpu]
        if not first:
            env.pop("VLPROMPT_FAULTS", None)
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(env)  # a spawned worker's interpreter starts with it (CUDA_VISIBLE_DEVICES)
            tasks = self._ctx.Queue()
            proc = self._ctx.Process(target=_worker, args=(index, self.runs_dir, self.progress, self.threads, tasks,
                                                           self._results, os.getpid(), env), daemon=True)
            proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self._workers[index] = (proc, tasks)

    def describe(self) -> str:
        return (f"executor pool, {len(self._workers)} workers x {self.threads} thread(s)"
                + (f", GPUs {','.join(self.gpus)}" if self.gpus else ""))

    def prepare(self, units: list) -> None:
        """Nothing to load here: each worker loads the backbones of its own units."""

    def free_slots(self) -> int:
        return len(self._workers) - len(self._busy)

    def submit(self, unit: Unit, attempt: int = 1) -> None:
        index = next(i for i in range(len(self._workers)) if i not in self._busy)
        self._busy[index] = (unit, attempt)
        self._workers[index][1].put((unit, attempt))

    def in_flight(self) -> list:
        return [unit.uid for unit, _ in self._busy.values()]

    def next_outcome(self) -> Outcome:
        """The next finished unit's outcome; a dead worker's unit is given to a fresh worker again (or, past the
        retries, is that unit's failure)."""
        while True:
            try:
                index, outcome = self._results.get(timeout=0.5)
            except queue.Empty:
                dead = self._dead_worker()
                if dead is None:
                    continue
                index, code = dead
                unit, attempt = self._busy.pop(index)
                self._start(index, first=False)
                if attempt <= self.max_retries:
                    self.submit(unit, attempt + 1)
                    continue
                return Outcome(unit.uid, None, f"its worker process died (exit code {code}) in each of {attempt} "
                                               "attempts", 0.0)
            self._busy.pop(index, None)
            return outcome

    def _dead_worker(self) -> Optional[tuple]:
        for index in list(self._busy):
            proc = self._workers[index][0]
            if not proc.is_alive():
                return index, proc.exitcode
        return None

    def close(self) -> None:
        for proc, tasks in self._workers:
            if proc.is_alive():
                tasks.put(None)
        for proc, _ in self._workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
