"""Studies: the field's protocols (SPEC 6) as one resumable job each.

A `StudySpec` names a protocol, its datasets (or a source and targets), methods, shots, seeds and the
settings every run shares. `plan` turns it into units: training runs (`engine.run.run`) and evaluations of
a trained prompt on other classes or datasets (`engine.run.evaluate_prompt`). `run_study` carries them out
in one process with one model load per backbone and one `FeatureStore`, and keeps the study folder:

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
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import RunConfig
from ..engine.feature_store import FeatureStore
from ..engine.run import backbone_from_config, config_key, eval_config, eval_key, evaluate_prompt, run
from ..errors import VlpromptError
from ..methods import get_method
from ..methods.base import parse_options
from ..presets import resolve_preset
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.progress import say
from . import base2new, dg, fewshot, xd
from .units import Planner, Unit

# The protocols, one module each (a registry, not import side effects).
PROTOCOLS = {"fewshot": fewshot, "base2new": base2new, "xd": xd, "dg": dg}
# Keys a study decides per unit; a study's settings may not set them.
UNIT_KEYS = ("dataset", "shots", "seed", "subsample", "method", "method_options", "preset", "output")


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
        level is a shared setting; a method is a name or a mapping with the keys of `MethodSpec`."""
        if not isinstance(data, dict):
            raise VlpromptError(f"{where}: expected a mapping")
        own = {f.name for f in dataclasses.fields(cls)}
        settings = dict(data.get("settings") or {})
        for key, value in data.items():
            if key in own:
                continue
            if key in RunConfig.keys() and key not in UNIT_KEYS:
                settings[key] = value
            else:
                raise VlpromptError(f"{where}: unknown key '{key}' (study keys: {', '.join(sorted(own))}, "
                                    "or any train setting)")
        methods = []
        for i, m in enumerate(data.get("methods") or []):
            if isinstance(m, str):
                methods.append(MethodSpec(m))
                continue
            if not isinstance(m, dict) or "method" not in m:
                raise VlpromptError(f"{where}: methods[{i}] must be a method name or a mapping with 'method'")
            extra = sorted(set(m) - {f.name for f in dataclasses.fields(MethodSpec)})
            if extra:
                raise VlpromptError(f"{where}: methods[{i}]: unknown key '{extra[0]}'")
            methods.append(MethodSpec(**m))
        values = {k: data[k] for k in own if k in data and k not in ("methods", "settings")}
        for key in ("datasets", "targets", "shots", "seeds"):
            if isinstance(values.get(key), (str, int)):
                values[key] = [v.strip() for v in str(values[key]).split(",") if v.strip()]
        return cls(methods=methods, settings=settings, **values)


def run_config(spec: StudySpec, m: MethodSpec, **unit_values) -> RunConfig:
    """A unit's RunConfig: protocol defaults < the method's preset < the study's settings < the method's
    overrides < what the unit decides (dataset, shots, seed, subsample, output)."""
    explicit = {**spec.settings, **m.overrides, **unit_values, "method": m.method, "method_options": m.options}
    if m.preset:
        explicit["preset"] = m.preset
    preset = resolve_preset(explicit.get("preset"), m.method)
    values = {**PROTOCOLS[spec.protocol].DEFAULTS, **(preset.values if preset else {}), **explicit}
    if preset:
        values["preset"] = preset.name
    return RunConfig(**values)


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
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # written atomically, so only a foreign file gets here: start the index afresh
    return {u["uid"]: u for u in data.get("units", []) if isinstance(u, dict) and "uid" in u}


def _finished_key(folder: Path) -> Optional[str]:
    try:
        return json.loads((folder / "metrics.json").read_text()).get("config_key")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


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

    def expected_key(self, unit: Unit) -> Optional[str]:
        """The key a finished folder of ``unit`` carries; None when it cannot be known yet (an evaluation
        whose training run has not finished)."""
        if unit.kind == "run":
            return config_key(unit.cfg.to_dict())
        trained = self.folder(unit.after)
        prompt_key = _finished_key(trained)
        if prompt_key is None:
            return None
        cfg, _ = eval_config(trained, unit.eval_overrides)
        return eval_key(cfg, prompt_key)

    def is_finished(self, unit: Unit) -> bool:
        try:
            key = self.expected_key(unit)
        except VlpromptError:
            return False
        return key is not None and _finished_key(self.folder(unit.uid)) == key


@dataclass
class StudyResult:
    study_dir: Path
    done: int
    skipped: int
    failed: list[tuple[str, str]]  # (uid, one-line error)
    total: int


def _one_line(exc: BaseException) -> str:
    text = (str(exc) or type(exc).__name__).strip().splitlines()[0]
    return text if isinstance(exc, VlpromptError) else f"{type(exc).__name__}: {text}"


def run_study(spec: StudySpec, study_dir: str | Path, retry_failed: bool = False, rerun: bool = False,
              progress: bool = True) -> StudyResult:
    """Carry out (or continue) a study in this process; see the module docstring for what is kept."""
    study = Study(spec, Path(study_dir), progress)
    study.dir.mkdir(parents=True, exist_ok=True)
    for stale in study.dir.glob(".*.tmp"):  # an index write cut short by a kill
        stale.unlink(missing_ok=True)
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
    # Every backbone the remaining runs need is loaded now: a wrong architecture or weights file is one error
    # line before any work, not a failure recorded for every run.
    backbones: dict = {}
    for u in todo:
        if u.kind == "run":
            _backbone(backbones, u.cfg)
    store = FeatureStore()
    durations: list[float] = []
    done = 0
    for i, u in enumerate(todo, 1):
        entry = study.entries[u.uid]
        eta = f", ETA {_fmt_s(sum(durations) / len(durations) * (len(todo) - i + 1))}" if durations else ""
        say(f"study: run {i}/{len(todo)}{eta}: {u.uid}", progress)
        if u.after and study.entries[u.after]["state"] != "done":
            entry.update(state="failed", error=f"its training run {u.after} did not finish")
            study.save()
            say(f"study: run {i}/{len(todo)} {u.uid} FAILED: {entry['error']}", progress)
            continue
        entry.update(state="running")
        study.save()
        t = time.perf_counter()
        try:
            # A study owns its run folders: one whose configuration changed is replaced (overwrite).
            if u.kind == "run":
                metrics = run(u.cfg.replace(overwrite=True), backbone=_backbone(backbones, u.cfg), store=store)
            else:
                trained = study.folder(u.after)
                overrides = {**u.eval_overrides, "progress": progress, "overwrite": True}
                bb = _backbone(backbones, eval_config(trained, overrides)[0])
                metrics = evaluate_prompt(str(trained), overrides, output=str(study.folder(u.uid)), backbone=bb,
                                          store=store)
        except Exception as exc:  # one run's failure never stops the study
            entry.update(state="failed", error=_one_line(exc), seconds=time.perf_counter() - t)
            study.save()
            say(f"study: run {i}/{len(todo)} {u.uid} FAILED: {entry['error']}", progress)
            continue
        durations.append(time.perf_counter() - t)
        entry.update(state="done", key=metrics["config_key"], error=None, seconds=durations[-1])
        study.save()
        done += 1
    failed = [(uid, e["error"]) for uid, e in study.entries.items() if e["state"] == "failed"]
    say(f"study {spec.protocol}: {done} run now, {skipped} skipped as finished, {len(failed)} failed -> "
        f"{study.dir} (vlprompt report {study.dir})", progress)
    return StudyResult(study.dir, done, skipped, failed, len(study.units))


def _backbone(cache: dict, cfg: RunConfig):
    """One model load per backbone for the whole study."""
    key = (cfg.backbone.replace("/", "-"), cfg.weights, cfg.pretrained if not cfg.weights else None,
           cfg.precision, cfg.device)
    if key not in cache:
        cache[key] = backbone_from_config(cfg)
    return cache[key]


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def load_study_file(path: str) -> StudySpec:
    """A study definition from a YAML file (one clear line for a bad file)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise VlpromptError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise VlpromptError(f"study file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise VlpromptError(f"study file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and "protocol" not in data:
        raise VlpromptError(f"study file {path}: missing key 'protocol' (one of {', '.join(PROTOCOLS)})")
    return StudySpec.from_dict(data, where=f"study file {path}")
