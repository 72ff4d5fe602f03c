"""The ``ray`` executor: a study's units on a Ray cluster (the optional extra ``pip install "vlprompt[ray]"``).

Each Ray worker is an actor holding ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs (a fraction packs several runs on
one GPU) for its lifetime, and like a pool worker keeps its backbones and feature store across the units it is given.
By default there are as many workers as the cluster's resources fit when the study starts (``workers`` asks for more:
the extra ones wait for resources an autoscaler adds). A worker that dies (its node lost, out of memory, killed) is
replaced and its unit given again, up to ``max_retries`` times; an exception inside a unit is that unit's failure.
Actors belong to the driver: killing the driver ends them, and the same command resumes.

Every node must have vlprompt installed and see the study folder and the data at the paths the driver gives (shared
storage). ``address``: an existing cluster (``auto``, or ``host:port``); without it this process starts a local one
with the machine's cores and GPUs and stops it at the end. A process already connected to Ray (``ray.init`` called
by the caller) is used as it is.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Optional

from ..errors import VlpromptError
from .executors import Outcome, execute_unit
from .units import Unit

# The object store carries units and metrics only (a few kB each): a local cluster needs little of it.
LOCAL_OBJECT_STORE = 128 * 2**20


def import_ray():
    try:
        import ray
    except ImportError:
        raise VlpromptError('executor ray needs Ray, an optional extra: pip install "vlprompt[ray]"') from None
    return ray


def _check_reachable(address: str) -> None:
    """A host:port that nothing listens on is one line at once (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # auto, or a ray:// client address: Ray's own connection answers
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise VlpromptError(f"executor ray: no Ray cluster at --address {address}: {exc.strerror or exc}") from None


class RayWorker:
    """One actor: its backbones, feature store and thread budget for every unit it runs (see the module docstring).
    ``env``: the driver's VLPROMPT_* settings, which replace the node's own (a cluster started by another process
    has its environment, not the driver's)."""

    def __init__(self, index: int, runs_dir: str, progress: bool, threads: int, env: dict):
        import torch

        from ..engine.feature_store import FeatureStore
        from ..utils.threads import set_thread_budget

        for key in [k for k in os.environ if k.startswith("VLPROMPT_")]:
            del os.environ[key]
        os.environ.update(env)
        torch.set_num_threads(threads)
        set_thread_budget(threads)
        self.index, self.runs_dir, self.progress, self.threads = index, Path(runs_dir), progress, threads
        self.backbones: dict = {}
        self.store = FeatureStore()

    def execute(self, unit: Unit, attempt: int) -> Outcome:
        import ray

        gpus = [str(g) for g in ray.get_gpu_ids()]
        execution = {"executor": "ray", "host": socket.gethostname(), "worker": self.index, "attempt": attempt,
                     "node": ray.get_runtime_context().get_node_id(), "gpus": gpus}
        return execute_unit(unit, lambda uid: self.runs_dir / uid, self.backbones, self.store, self.progress,
                            execution)


class RayExecutor:
    """Units on Ray actors (see the module docstring)."""

    name = "ray"

    def __init__(self, runs_dir: Path, progress: bool, address: Optional[str] = None, workers: Optional[int] = None,
                 cpus_per_run: float = 1.0, gpus_per_run: float = 0.0, max_retries: int = 1):
        if cpus_per_run <= 0 or gpus_per_run < 0 or max_retries < 0 or (workers is not None and workers < 1):
            raise VlpromptError("executor ray: --cpus-per-run must be > 0, --gpus-per-run >= 0, --workers >= 1, "
                                "--max-retries >= 0")
        if gpus_per_run > 1 and gpus_per_run != int(gpus_per_run):
            raise VlpromptError(f"executor ray: --gpus-per-run {gpus_per_run}: a fraction of one GPU, or whole GPUs")
        ray = self.ray = import_ray()
        self.connected_here = not ray.is_initialized()  # else the caller's connection, left as it is
        if self.connected_here:
            options = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=progress)
            if address:
                _check_reachable(address)
                try:
                    ray.init(address=address, **options)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise VlpromptError(f"executor ray: no Ray cluster at --address {address}: {first}") from None
            else:
                ray.init(object_store_memory=LOCAL_OBJECT_STORE, **options)
        resources = ray.cluster_resources()
        fits = math.floor(resources.get("CPU", 0) / cpus_per_run + 1e-9)
        if gpus_per_run:
            fits = min(fits, math.floor(resources.get("GPU", 0) / gpus_per_run + 1e-9))
        if fits < 1 and workers is None:
            self.close()
            raise VlpromptError(f"executor ray: the cluster cannot hold one run of {cpus_per_run:g} CPU(s) and "
                                f"{gpus_per_run:g} GPU(s): it has {resources.get('CPU', 0):g} CPU(s), "
                                f"{resources.get('GPU', 0):g} GPU(s)")
        self.cpus, self.gpus, self.max_retries = cpus_per_run, gpus_per_run, max_retries
        self.threads = max(1, int(cpus_per_run))
        self.runs_dir, self.progress = str(runs_dir), progress
        self.env = {k: v for k, v in os.environ.items() if k.startswith("VLPROMPT_")}
        self._actor_class = ray.remote(RayWorker).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run,
                                                          max_restarts=0, max_concurrency=1)
        self._actors: list = [None] * (workers or fits)
        self._busy: dict = {}  # worker index -> (unit, attempt, object ref)
        for i in range(len(self._actors)):
            self._start(i, first=True)

    def describe(self) -> str:
        return (f"executor ray, {len(self._actors)} workers x {self.cpus:g} CPU(s)"
                + (f" and {self.gpus:g} GPU(s)" if self.gpus else "") + " each")

    def _start(self, index: int, first: bool) -> None:
        """Start worker ``index``. Fault injection (the tests') applies to first workers only."""
        env = dict(self.env)
        if not first:
            env.pop("VLPROMPT_FAULTS", None)
        self._actors[index] = self._actor_class.remote(index, self.runs_dir, self.progress, self.threads, env)

    def prepare(self, units: list) -> None:
        """Nothing to load here: each worker loads the backbones of its own units."""

    def free_slots(self) -> int:
        return len(self._actors) - len(self._busy)

    def submit(self, unit: Unit, attempt: int = 1) -> None:
        index = next(i for i in range(len(self._actors)) if i not in self._busy)
        self._busy[index] = (unit, attempt, self._actors[index].execute.remote(unit, attempt))

    def in_flight(self) -> list:
        return [unit.uid for unit, _, _ in self._busy.values()]

    def next_outcome(self) -> Outcome:
        """The next finished unit's outcome; a dead worker's unit is given to a fresh worker again (or, past the
        retries, is that unit's failure)."""
        ray = self.ray
        while True:
            refs = {ref: index for index, (_, _, ref) in self._busy.items()}
            ready, _ = ray.wait(list(refs), num_returns=1)
            index = refs[ready[0]]
            unit, attempt, ref = self._busy.pop(index)
            try:
                return ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            except ray.exceptions.RayError as exc:  # not the unit's own exception (execute_unit catches those)
                return Outcome(unit.uid, None, f"ray: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}", 0.0)
            self._start(index, first=False)
            if attempt <= self.max_retries:
                self.submit(unit, attempt + 1)
                continue
            return Outcome(unit.uid, None, f"its Ray worker died in each of {attempt} attempts ({why})", 0.0)

    def close(self) -> None:
        for actor in getattr(self, "_actors", []):
            if actor is not None:
                self.ray.kill(actor)
        self._actors = []
        if self.connected_here:
            self.ray.shutdown()  # and a local cluster started here stops
