"""Studies: the field's protocols (docs/protocols.md) as one resumable job each.

A `StudySpec` names a protocol, its datasets (or a source and targets), methods, shots, seeds and the
settings every run shares. `plan` turns it into units: training runs (`engine.run.run`) and evaluations of
a trained prompt on other classes or datasets (`engine.run.evaluate_prompt`). `run_study` drives them: it hands
each unit to an executor (`executors`: ``local`` runs them in this process with one model load per backbone and
one `FeatureStore`) and records every outcome; it is the only writer of the study folder's index:

    STUDY_DIR/study.yaml     the resolved study definition (re-runnable with `vlprompt study run`)
    STUDY_DIR/index.json     every unit with its state (done | failed | running | pending), key, error
    STUDY_DIR/runs/<uid>/    one run folder per unit (config.yaml, prompt/, metrics.json)

A unit is finished when its folder's metrics.json carries the unit's key: the hash of its resolved
configuration (for an evaluation, plus the key of the run that trained the prompt), never its folder name.
Re-running the same study skips finished units, redoes interrupted ones, keeps failed ones failed unless
``retry_failed``, and ``rerun`` redoes everything. Run folders are written as one unit and the index
atomically, so a kill at any point loses nothing that had finished.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import RunConfig, check_plain_mapping, check_values
from ..engine.identity import config_key, legacy_config_key
from ..engine.run import eval_config, eval_key
from ..errors import VlpromptError
from ..methods import get_method
from ..methods.base import parse_options
from ..recipes import resolve
from ..engine.run_folder import clean_stale_tree, recorded_key
from ..utils.folder_lock import FolderLock
from ..utils.io import atomic_write_json, atomic_write_text, read_json
from ..utils.progress import logger, say
from . import base2new, dg, fewshot, xd
from .executors import LocalExecutor, PoolExecutor
from .units import Planner, Unit

# Each executor and the options it takes (the command line's names, with _ for -).
EXECUTORS = {"local": (), "pool": ("workers", "threads_per_worker", "gpus", "runs_per_gpu", "max_retries"),
             "ray": ("address", "workers", "cpus_per_run", "gpus_per_run", "max_retries")}

# The protocols, one module each (a registry, not import side effects).
PROTOCOLS = {"fewshot": fewshot, "base2new": base2new, "xd": xd, "dg": dg}
# Keys a study decides per unit; a study's settings may not set them.
UNIT_KEYS = ("dataset", "shots", "seed", "subsample", "method", "method_options", "preset", "protocol", "output")


@dataclass
class MethodSpec:
    """One method of a study: a registered method, the label its rows carry, and its own settings."""

    method: str
    label: str = ""
    options: dict = field(default_factory=dict)  # the method's own options (method_options)
    preset: Optional[str] = None
    overrides: dict = field(default_factory=dict)  # RunConfig keys for this method's runs only

    def __post_init__(self):
        self.label = self.label or self.method
        # The label names the method's run folders: a plain name, so that no label reaches outside the study.
        if not re.fullmatch(r"[A-Za-z0-9_+=-][A-Za-z0-9_.+=-]*", self.label):
            raise VlpromptError(f"method label {self.label!r}: use letters, digits and _ . + = - (it names folders)")

    @property
    def trains(self) -> bool:
        return get_method(self.method).trains

    @property
    def transfers(self) -> bool:
        """Whether its prompts can be rebuilt for other classes (a head over its own classes cannot)."""
        return get_method(self.method).needs.transfers


@dataclass
class StudySpec:
    protocol: str
    methods: list[MethodSpec]
    datasets: list[str] = field(default_factory=list)  # fewshot, base2new
    source: Optional[str] = None  # xd, dg
    targets: list[str] = field(default_factory=list)  # xd, dg
    shots: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    settings: dict = field(default_factory=dict)  # RunConfig keys shared by every run
    output: Optional[str] = None  # the study folder (the command line's --output wins)

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise VlpromptError(f"study: protocol '{self.protocol}' is not one of {list(PROTOCOLS)}")
        module = PROTOCOLS[self.protocol]
        if not self.methods:
            raise VlpromptError("study: no methods")
        labels = [m.label for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise VlpromptError(f"study: method label {dup[0]!r} is used twice; give each variant its own label")
        for m in self.methods:
            get_method(m.method)
            parse_options(m.method, get_method(m.method).Options, m.options)
        self.shots = [int(k) for k in (self.shots or module.SHOTS)]
        self.seeds = [int(s) for s in self.seeds]
        if not self.seeds:  # else a study of no runs that "succeeds"
            raise VlpromptError("study: no seeds (seeds: [1, 2, 3])")
        if module.TRANSFER:
            self.source = self.source or "imagenet"
            self.targets = list(self.targets or module.default_targets(self.source))
            if self.datasets:
                raise VlpromptError(f"study {self.protocol}: give --source and --targets, not datasets")
        else:
            if not self.datasets:
                raise VlpromptError(f"study {self.protocol}: no datasets (--datasets D1,D2,...)")
            if self.source or self.targets:
                raise VlpromptError(f"study {self.protocol}: source and targets belong to xd and dg studies")
        bad = sorted(set(self.settings) & set(UNIT_KEYS))
        if bad:
            raise VlpromptError(f"study: '{bad[0]}' is set by the study itself, not in its settings")
        unknown = sorted(set(self.settings) - set(RunConfig.keys()))
        if unknown:
            raise VlpromptError(f"study: unknown setting '{unknown[0]}'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "study") -> "StudySpec":
        """A study definition as YAML holds it. Besides the spec's own keys, any RunConfig key at the top
        level is a shared setting; a method is a name or a mapping with the keys of `MethodSpec`. Every key
        and value is checked here, so a bad one is one line naming ``where`` and the key."""
        if not isinstance(data, dict):
            raise VlpromptError(f"{where}: expected a mapping")
        own = {f.name for f in dataclasses.fields(cls)}
        shared = set(RunConfig.keys()) - set(UNIT_KEYS)
        settings = data.get("settings") or {}
        if not isinstance(settings, dict):
            raise VlpromptError(f"{where}: settings: expected a mapping of train settings, got "
                                f"{type(settings).__name__}")
        settings = dict(settings)
        for key, value in data.items():
            if key in own:
                continue
            if isinstance(key, str) and key in shared:
                settings[key] = value
            else:
                raise VlpromptError(f"{where}: unknown key {key!r} (study keys: {', '.join(sorted(own))}, "
                                    "or any train setting)")
        settings = check_values(settings, f"{where}: settings", allowed=shared)
        methods = data.get("methods") or []
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        if not isinstance(methods, list):
            raise VlpromptError(f"{where}: methods: expected a list of method names or mappings")
        values = {k: data[k] for k in own if k in data and k not in ("methods", "settings")}
        for key, kind in (("datasets", str), ("targets", str), ("shots", int), ("seeds", int)):
            if key in values:
                values[key] = _typed_list(values[key], kind, f"{where}: {key}")
        for key in ("protocol", "source", "output"):
            if values.get(key) is not None and not isinstance(values[key], str):
                raise VlpromptError(f"{where}: {key}: expected a name, got {values[key]!r}")
        return cls(methods=[_method_spec(m, f"{where}: methods[{i}]", shared) for i, m in enumerate(methods)],
                   settings=settings, **values)


def _typed_list(value, kind, where: str) -> list:
    """A list of names or numbers, written as a YAML list or a comma-separated string."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [v.strip() for v in str(value).split(",") if v.strip()]
    if not isinstance(value, list):
        raise VlpromptError(f"{where}: expected a list, got {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, (str, int)) or isinstance(v, bool):  # a float, a list, a mapping, true/false
            raise VlpromptError(f"{where}[{i}]: expected {'a whole number' if kind is int else 'a name'}, got {v!r}")
        if kind is str:
            out.append(str(v))
            continue
        try:
            out.append(int(v))
        except ValueError:
            raise VlpromptError(f"{where}[{i}]: expected a whole number, got {v!r}") from None
    return out


def _method_spec(m, where: str, shared: set) -> MethodSpec:
    """One entry of a study's ``methods``: a name, or a mapping with MethodSpec's keys, each checked."""
    if isinstance(m, str):
        return MethodSpec(m)
    if not isinstance(m, dict) or not isinstance(m.get("method"), str):
        raise VlpromptError(f"{where}: must be a method name or a mapping with 'method: NAME'")
    extra = sorted(str(k) for k in set(m) - {f.name for f in dataclasses.fields(MethodSpec)})
    if extra:
        raise VlpromptError(f"{where}: unknown key '{extra[0]}' (keys: method, label, options, preset, overrides)")
    for key in ("label", "preset"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise VlpromptError(f"{where}: {key}: expected a name, got {m[key]!r}")
    if m.get("options") is not None:
        check_plain_mapping(m["options"], f"{where}: options")
    overrides = m.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise VlpromptError(f"{where}: overrides: expected a mapping of train settings")
    values = {**m, "options": dict(m.get("options") or {}),
              "overrides": check_values(overrides, f"{where}: overrides", allowed=shared)}
    try:
        return MethodSpec(**values)
    except VlpromptError as exc:
        raise VlpromptError(f"{where}: {exc}") from None


def run_config(spec: StudySpec, m: MethodSpec, **unit_values) -> RunConfig:
    """A unit's RunConfig (`recipes.resolve`): the recipe cell of the method for the study's protocol and the
    unit's dataset (or the cell ``m.preset`` names) < the study's settings < the method's overrides < what the
    unit decides (dataset, shots, seed, subsample, output)."""
    unit = {**unit_values, "method": m.method, "method_options": m.options, "protocol": spec.protocol}
    if m.preset:
        unit["preset"] = m.preset
    return RunConfig(**resolve(spec.settings, m.overrides, unit))


def plan(spec: StudySpec, study_dir: Path, progress: bool = True) -> list[Unit]:
    """Every unit of the study in the order it runs (an evaluation right after its training run)."""
    planner = Planner(spec.protocol, study_dir / "runs", lambda m, **values: run_config(spec, m, **values),
                      progress)
    for m in spec.methods:
        PROTOCOLS[spec.protocol].plan_method(spec, m, planner)
    return planner.units


# -- the study folder -----------------------------------------------------------------------------------------

def read_index(study_dir: Path) -> dict:
    path = study_dir / "index.json"
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except (OSError, ValueError):  # not UTF-8, not JSON, too large or nested too deeply
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("units"), list):
        # written atomically, so only a foreign file gets here: the index is rebuilt from the run folders
        logger.warning(f"study: {path} is not a study index: ignored (rebuilt from the run folders)")
        return {}
    return {u["uid"]: u for u in data.get("units", []) if isinstance(u, dict) and "uid" in u}


class Study:
    """A study folder and the state of its units, saved to index.json after every change."""

    def __init__(self, spec: StudySpec, study_dir: Path, progress: bool = True):
        self.spec, self.dir, self.progress = spec, Path(study_dir), progress
        self.units = plan(spec, self.dir, progress)
        previous = read_index(self.dir)
        self.entries = {}
        for u in self.units:
            old = previous.get(u.uid, {})
            self.entries[u.uid] = {"uid": u.uid, "kind": u.kind, "after": u.after, "role": u.role,
                                   "state": old.get("state", "pending"), "key": old.get("key"),
                                   "error": old.get("error"), "seconds": old.get("seconds")}

    def folder(self, uid: str) -> Path:
        return self.dir / "runs" / uid

    def save(self) -> None:
        import yaml

        atomic_write_text(self.dir / "study.yaml", yaml.safe_dump(self.spec.to_dict(), sort_keys=False))
        atomic_write_json(self.dir / "index.json", {"protocol": self.spec.protocol, "schema_version": 1,
                                                    "units": list(self.entries.values())})

    def expected_key(self, unit: Unit, legacy: bool = False) -> Optional[str]:
        """The key a finished folder of ``unit`` carries (``legacy``: the key an earlier version gave it); None
        when it cannot be known yet (an evaluation whose training run has not finished)."""
        if unit.kind == "run":
            return legacy_config_key(unit.cfg.to_dict()) if legacy else config_key(unit.cfg.to_dict())
        trained = self.folder(unit.after)
        prompt_key = recorded_key(trained)
        if prompt_key is None:
            return None
        cfg, _ = eval_config(trained, unit.eval_overrides)
        return eval_key(cfg, prompt_key, legacy=legacy)

    def is_finished(self, unit: Unit) -> bool:
        """Whether ``unit``'s folder holds its finished run: recorded under this version's key, or under the key an
        earlier version gave it (a study finished before an upgrade is not rerun)."""
        recorded = recorded_key(self.folder(unit.uid))
        if recorded is None:
            return False
        for legacy in (False, True):
            try:
                if recorded == self.expected_key(unit, legacy):
                    return True
            except VlpromptError:
                continue
        return False


@dataclass
class StudyResult:
    study_dir: Path
    done: int
    skipped: int
    failed: list[tuple[str, str]]  # (uid, one-line error)
    total: int


def run_study(spec: StudySpec, study_dir: str | Path, retry_failed: bool = False, rerun: bool = False,
              progress: bool = True, wait: bool = False, executor: str = "local", **executor_options) -> StudyResult:
    """Carry out (or continue) a study; see the module docstring for what is kept. ``executor``: ``local`` (this
    process), ``pool`` (worker processes on this machine, `executors.PoolExecutor`) or ``ray`` (a Ray cluster,
    `ray_executor.RayExecutor`); ``executor_options``: the options `EXECUTORS` lists for it. One process drives a
    study folder at a time: another one refuses in one line naming the holder, or with ``wait`` waits for it (and
    then skips what it finished)."""
    if executor not in EXECUTORS:
        raise VlpromptError(f"executor '{executor}' is not one of {list(EXECUTORS)}")
    foreign = sorted(set(executor_options) - set(EXECUTORS[executor]))
    if foreign:
        owners = [name for name, keys in EXECUTORS.items() if foreign[0] in keys]
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise VlpromptError(f"executor {executor} takes no {flags} (an option of {' and '.join(owners) or 'no executor'})")
    if executor == "ray":
        from .ray_executor import import_ray

        import_ray()  # a missing extra is one line before any planning
    _not_inside_a_study(Path(study_dir))
    with FolderLock(Path(study_dir), "study", wait=wait, on_wait=lambda msg: say(msg, progress)):
        return _run_study(spec, Path(study_dir), retry_failed, rerun, progress, executor, executor_options)


def _not_inside_a_study(study_dir: Path) -> None:
    """A study folder inside another study's ``runs/`` would mix its runs into that study's (and its reports)."""
    here = study_dir.expanduser().resolve()
    for parent in here.parents:
        if (parent / "study.yaml").is_file() and (parent / "index.json").is_file() \
                and (here == parent / "runs" or parent / "runs" in here.parents):
            raise VlpromptError(f"study folder {study_dir} lies inside the runs of the study in {parent}; "
                                "give a folder outside it")


def _run_study(spec: StudySpec, study_dir: Path, retry_failed: bool, rerun: bool, progress: bool, executor_name: str,
               executor_options: dict) -> StudyResult:
    study = Study(spec, study_dir, progress)
    for stale in study.dir.glob(".*.tmp"):  # an index write cut short by a kill
        stale.unlink(missing_ok=True)
    cleaned = clean_stale_tree(study.dir / "runs")  # staging and replaced copies of killed runs
    if cleaned:
        say(f"study: removed {cleaned} unfinished run folder(s) left by killed processes", progress)
    todo = []
    for u in study.units:
        entry = study.entries[u.uid]
        if not rerun and study.is_finished(u):
            entry.update(state="done", error=None)
        elif entry["state"] == "failed" and not (retry_failed or rerun):
            pass
        else:
            entry.update(state="pending", error=None)
            todo.append(u)
    study.save()
    skipped = sum(1 for e in study.entries.values() if e["state"] == "done")
    kept_failed = sum(1 for e in study.entries.values() if e["state"] == "failed")
    say(f"study {spec.protocol}: {len(study.units)} runs, {skipped} finished, {kept_failed} failed before "
        f"{'(kept; --retry-failed to retry) ' if kept_failed else ''}-> {len(todo)} to run in {study.dir}", progress)
    if executor_name != "local":  # the workers load the backbones: what would fail there is one line here first
        from ..backbones.loader import check_backbone

        for cfg in {(u.cfg.backbone, u.cfg.weights) for u in todo if u.kind == "run"}:
            check_backbone(*cfg)
    executor = _executor(executor_name if todo else "local", study, progress, executor_options)
    if executor_name != "local" and todo:
        say(f"study: {executor.describe()}", progress)
    executor.prepare(todo)
    durations: dict[str, list[float]] = {}  # seconds per finished unit, by method label and kind
    done, started = 0, 0
    pending, in_flight = list(todo), {}
    try:
        while pending or in_flight:
            while pending and executor.free_slots() > 0:
                u = _next_ready(pending, in_flight)
                if u is None:
                    break
                pending.remove(u)
                started += 1
                entry = study.entries[u.uid]
                flying = executor.in_flight()
                slots = executor.free_slots() + len(flying)
                eta = _eta([u, *pending], [(v, t) for v, _, t in in_flight.values()], durations, slots)
                say(f"study: run {started}/{len(todo)}, {eta}: {u.uid}"
                    + (f" ({len(flying)} in flight: {', '.join(flying)})" if flying else ""), progress)
                if u.after and study.entries[u.after]["state"] != "done":
                    entry.update(state="failed", error=f"its training run {u.after} did not finish")
                    study.save()
                    say(f"study: run {started}/{len(todo)} {u.uid} FAILED: {entry['error']}", progress)
                    continue
                entry.update(state="running")
                study.save()
                executor.submit(u)
                in_flight[u.uid] = (u, started, time.monotonic())
            if not in_flight:
                continue
            outcome = executor.next_outcome()
            u, number, _ = in_flight.pop(outcome.uid)
            entry = study.entries[u.uid]
            if outcome.error is not None:
                entry.update(state="failed", error=outcome.error, seconds=outcome.seconds)
                study.save()
                say(f"study: run {number}/{len(todo)} {u.uid} FAILED: {entry['error']}", progress)
                continue
            durations.setdefault(_kind(u), []).append(outcome.seconds)
            entry.update(state="done", key=outcome.metrics["config_key"], error=None, seconds=outcome.seconds)
            study.save()
            done += 1
    finally:
        executor.close()
    failed = [(uid, e["error"]) for uid, e in study.entries.items() if e["state"] == "failed"]
    say(f"study {spec.protocol}: {done} run now, {skipped} skipped as finished, {len(failed)} failed -> "
        f"{study.dir} (vlprompt report {study.dir})", progress)
    return StudyResult(study.dir, done, skipped, failed, len(study.units))


def _executor(name: str, study: Study, progress: bool, options: dict):
    if name == "pool":
        return PoolExecutor(study.dir / "runs", progress, **options)
    if name == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(study.dir / "runs", progress, **options)
    return LocalExecutor(study.folder, progress)


def _next_ready(pending: list, in_flight: dict) -> Optional[Unit]:
    """The first pending unit whose training run (if any) is neither pending nor running."""
    waiting = {u.uid for u in pending} | set(in_flight)
    return next((u for u in pending if not u.after or u.after not in waiting), None)


def _kind(u: Unit) -> str:
    return f"{u.role.get('method')}/{u.kind}"


def _eta(waiting: list[Unit], running: list[tuple[Unit, float]], durations: dict[str, list[float]],
         slots: int) -> str:
    """The study's time left: each unit still to start at the mean time of the finished units of its method and
    kind (a linear-probe search and a zero-shot run differ by orders of magnitude), else of all of them; each
    running unit at that mean less the time it has run (``running``: units and their monotonic start times); the
    sum shared among the executor's ``slots``."""
    every = [s for values in durations.values() for s in values]
    if not every:
        return "ETA after the first run"
    overall = sum(every) / len(every)
    known = {k: sum(v) / len(v) for k, v in durations.items()}
    guessed = any(_kind(u) not in known for u in [*waiting, *(u for u, _ in running)])
    now = time.monotonic()
    left = sum(known.get(_kind(u), overall) for u in waiting)
    left += sum(max(0.0, known.get(_kind(u), overall) - (now - t)) for u, t in running)
    return f"ETA {'~' if guessed else ''}{_fmt_s(left / max(1, slots))}"


def _fmt_s(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def load_study_file(path: str) -> StudySpec:
    """A study definition from a YAML file (bounded parsing; one clear line for a bad file)."""
    from ..utils.safe_yaml import load_yaml_file

    data = load_yaml_file(path, "study file")
    if isinstance(data, dict) and "protocol" not in data:
        raise VlpromptError(f"study file {path}: missing key 'protocol' (one of {', '.join(PROTOCOLS)})")
    return StudySpec.from_dict(data, where=f"study file {path}")
