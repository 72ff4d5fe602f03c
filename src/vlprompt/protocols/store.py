"""The results store: run folders read back as records that reports aggregate.

A record is one evaluated run: the dataset it was evaluated on, the dataset its prompt was trained on, the
method, backbone, shots, seed, which classes (all | base | new), and its accuracies. In a study folder the
roles come from ``index.json`` (only units in state ``done`` count); a folder of loose runs is walked for
``metrics.json`` files and each run's role is read from what it recorded.

`scan` also says what a report is computed from: the study's definition (``study.yaml``), every unit the
study planned with its state (done, failed with its error, pending, or broken), and the run folders that
could not be read (a broken folder is left out of the tables and listed, never dropped silently).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..errors import VlpromptError
from ..utils.io import read_json

DG_DATASETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
# Methods whose fit searches hyperparameters on the validation split, in records written before the fit
# said so itself (``train.fit.search = {"validated": ...}``).
_SEARCHING = {"linear_probe", "tip_adapter", "tip_adapter_f"}


@dataclass
class RunRecord:
    folder: Path
    protocol: str  # fewshot | base2new | xd | dg
    dataset: str  # evaluated on
    source: str  # the prompt was trained on (= dataset for fewshot and base2new)
    method: str  # label in tables
    method_type: str  # registered method
    backbone: str
    shots: int  # 0 for zero-shot methods
    seed: Optional[int]
    split: str  # all | base | new
    top1: float  # percent
    top5: Optional[float]
    random: bool
    config: dict = field(default_factory=dict)  # the run's config.yaml
    not_validated: Optional[str] = None  # why a fitted method's search kept its initial values (None: it did not)
    facts: dict = field(default_factory=dict)  # what the run recorded about its setting (`run_facts`)


@dataclass
class BrokenRun:
    """A run folder that cannot be reported: what is wrong with it, and its role when a study planned it."""

    folder: Path
    reason: str
    role: Optional[dict] = None


@dataclass
class PlannedRun:
    """A unit of a study's index: ``state`` is done (``record`` read), failed (``error`` from the index),
    pending (not run yet, interrupted, or its folder removed) or broken (done, but its folder cannot be read:
    ``error`` says why)."""

    uid: str
    role: dict
    state: str
    error: Optional[str] = None
    record: Optional[RunRecord] = None


@dataclass
class Results:
    """Everything a report is computed from (`scan`)."""

    root: Path
    records: list[RunRecord]
    broken: list[BrokenRun]
    planned: list[PlannedRun]  # a study's units in its index order; empty for a folder of loose runs
    study: Optional[dict]  # study.yaml as written; None for loose runs (or when it cannot be read)
    warnings: list[str]  # one line each: broken run folders, an unreadable study.yaml or index.json

    @property
    def is_study(self) -> bool:
        return bool(self.planned)


def _load_json(path: Path) -> Optional[dict]:
    try:
        data = read_json(path)
    except (OSError, ValueError):  # not UTF-8, not JSON, too large or nested too deeply
        return None
    return data if isinstance(data, dict) else None


def _load_yaml(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """``(mapping, None)``, or ``(None, why not)`` naming the file by its name (bounded parsing)."""
    from ..utils.safe_yaml import load_yaml_text

    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"), path.name)
    except OSError as exc:
        return None, f"{path.name} cannot be read ({exc.strerror or exc})"
    except UnicodeDecodeError:
        return None, f"{path.name} is not UTF-8 text"
    except VlpromptError as exc:
        return None, str(exc)
    return (data, None) if isinstance(data, dict) else (None, f"{path.name} is not a YAML mapping")


def _data_section(m: dict) -> dict:
    """The dataset details: ``data`` (schema 2) or the ``dataset`` mapping of schema 1."""
    if isinstance(m.get("data"), dict):
        return m["data"]
    return m["dataset"] if isinstance(m.get("dataset"), dict) else {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics_problem(m: Optional[dict], needs_method: bool) -> Optional[str]:
    """What makes a parsed metrics.json unusable for a report (None when nothing does)."""
    if m is None:
        return "metrics.json is not a readable JSON object"
    if not isinstance(m.get("test"), dict):
        return "metrics.json has no 'test' results"
    if not _is_number(m["test"].get("accuracy")):
        return "metrics.json has no number at 'test.accuracy'"
    if not 0 <= m["test"]["accuracy"] <= 100:  # also false for NaN: a hand-edited or damaged record
        return f"metrics.json has 'test.accuracy' {m['test']['accuracy']!r}, not a percentage in [0, 100]"
    if needs_method and not m.get("method"):
        return "metrics.json does not name its 'method'"
    return None


def not_validated(m: dict) -> Optional[str]:
    """Why a fitted method's hyperparameter search kept its initial values, or None (searched, or no search).

    Read from ``train.fit.search = {"validated": bool, "reason": str}`` where a run records it; in records
    written before that field: a linear probe with an empty search log, a Tip-Adapter whose search was turned
    off or selected nothing on a validation split."""
    fit = (m.get("train") or {}).get("fit") if isinstance(m.get("train"), dict) else None
    if not isinstance(fit, dict):
        return None
    search = fit.get("search")
    if isinstance(search, dict) and "validated" in search:
        return None if search["validated"] else str(search.get("reason") or "no validation split")
    method = m.get("method")
    if method not in _SEARCHING:
        return None
    if method == "linear_probe":
        kept = search == []
    else:
        options = m.get("method_options") if isinstance(m.get("method_options"), dict) else {}
        selected = fit.get("selected") if isinstance(fit.get("selected"), dict) else {}
        if options.get("search") is False:
            return "search turned off (option search=false)"
        kept = selected.get("val_accuracy", 0) is None
    return "no validation split" if kept else None


def run_facts(m: dict, cfg: dict, metrics_path: Path) -> dict:
    """What a run recorded about how it was made, for a report's settings section."""
    bb = m.get("backbone") if isinstance(m.get("backbone"), dict) else {}
    recipe = m.get("recipe") if isinstance(m.get("recipe"), dict) else {}
    train = m.get("train") if isinstance(m.get("train"), dict) else {}
    versions = m.get("versions") if isinstance(m.get("versions"), dict) else {}
    finished = None
    if isinstance(m.get("finished_at"), str):  # recorded by the run (vlprompt >= this version)
        try:
            finished = datetime.fromisoformat(m["finished_at"])
        except ValueError:
            finished = None
    if finished is None:  # earlier records: the file's time
        try:
            finished = datetime.fromtimestamp(metrics_path.stat().st_mtime, timezone.utc)
        except OSError:
            finished = None
    devs = m.get("deviations") if isinstance(m.get("deviations"), list) else []
    return {"recipe_cell": recipe.get("cell_id"),  # None for evaluations and records of earlier versions
            # records (dicts), or the plain words of an earlier version's run folder
            "deviations": [d for d in devs if isinstance(d, (str, dict))],
            "backbone_source": bb.get("source"), "precision": bb.get("precision") or cfg.get("precision"),
            "pretrained": m.get("pretrained") or cfg.get("pretrained"), "weights": cfg.get("weights"),
            "epochs": recipe.get("epochs") if m.get("kind") == "train" else None,
            "fitted": "fit" in train, "vlprompt": versions.get("vlprompt"), "finished": finished}


def load_run(folder: Path, role: Optional[dict] = None) -> tuple[Optional[RunRecord], Optional[str]]:
    """``(record, None)`` for a finished run folder, ``(None, why)`` for one that cannot be reported. ``role``
    (from a study's index) says what the run stands for; without it the role is inferred from the metrics."""
    if not (folder / "metrics.json").is_file():
        return None, "no metrics.json"
    m = _load_json(folder / "metrics.json")
    problem = metrics_problem(m, needs_method=role is None)
    if problem:
        return None, problem
    if not (folder / "config.yaml").is_file():
        return None, "no config.yaml"
    cfg, why = _load_yaml(folder / "config.yaml")
    if cfg is None:
        return None, why
    data = _data_section(m)
    trains = m.get("task") == "prompt_classification" or bool(m.get("train")) or m.get("kind") == "eval"
    dataset = data.get("name") or str(m.get("dataset"))
    source = (m.get("prompt") or {}).get("trained_on") or dataset
    split = data.get("subsample") or "all"
    if role is None:
        if source != dataset:
            protocol = "dg" if dataset in DG_DATASETS and source == "imagenet" else "xd"
        else:
            protocol = "base2new" if split in ("base", "new") else "fewshot"
        role = {"protocol": protocol, "dataset": dataset, "source": source, "split": split,
                "method": m.get("method"), "method_type": m.get("method"),
                "shots": data.get("shots", 0) if trains else 0, "seed": data.get("seed") if trains else None}
    bb = m.get("backbone") if isinstance(m.get("backbone"), dict) else {}
    record = RunRecord(folder=folder, protocol=role["protocol"], dataset=role["dataset"], source=role["source"],
                       method=role["method"], method_type=role["method_type"],
                       backbone=str(bb.get("name") or m.get("model")).replace("/", "-"),
                       shots=int(role["shots"] or 0), seed=role.get("seed"), split=role["split"],
                       top1=float(m["test"]["accuracy"]), top5=m["test"].get("top5_accuracy"),
                       random=bool(bb.get("random")), config=cfg, not_validated=not_validated(m),
                       facts=run_facts(m, cfg, folder / "metrics.json"))
    return record, None


def read_run(folder: Path, role: Optional[dict] = None) -> Optional[RunRecord]:
    """The record of a finished run folder (None if it cannot be reported: `load_run` says why)."""
    return load_run(folder, role)[0]


def collect(folder: str | Path) -> list[RunRecord]:
    """Every finished run under ``folder``: a study folder (its index) or a folder of loose run folders."""
    return scan(folder).records


def scan(folder: str | Path) -> Results:
    """What a report of ``folder`` is computed from: a study folder (``index.json`` and ``study.yaml``) or a
    folder of loose run folders (every ``metrics.json`` under it, hidden staging folders skipped)."""
    root = Path(folder)
    if not root.is_dir():
        raise VlpromptError(f"results folder {root} is a file, not a folder" if root.exists()
                            else f"results folder not found: {root}")
    warnings: list[str] = []
    index = _load_json(root / "index.json") if (root / "index.json").is_file() else None
    if (root / "index.json").is_file() and (index is None or not isinstance(index.get("units"), list)):
        warnings.append(f"{root / 'index.json'} cannot be read: the run folders under {root} are read as loose "
                        "runs (no failed or pending runs known)")
        index = None
    if index is not None:
        study = None
        if (root / "study.yaml").is_file():
            study, why = _load_yaml(root / "study.yaml")
            if study is None:
                warnings.append(f"{why}: the report names no study settings, and lists zero-shot methods "
                                "first, then alphabetical")
        return _scan_study(root, index["units"], study, warnings)
    return _scan_loose(root, warnings)


def _scan_study(root: Path, units: list, study: Optional[dict], warnings: list[str]) -> Results:
    records, broken, planned = [], [], []
    for unit in units:
        if not isinstance(unit, dict) or not isinstance(unit.get("uid"), str):
            continue  # the study driver writes only whole units; anything else is not one of its units
        uid, state = unit["uid"], unit.get("state")
        role = unit["role"] if isinstance(unit.get("role"), dict) else None  # None: inferred from the metrics
        if state == "failed":
            error = str(unit.get("error") or "no error recorded")
            planned.append(PlannedRun(uid, role or {}, "failed", error=error))
        elif state != "done":
            planned.append(PlannedRun(uid, role or {}, "pending"))
        elif not (root / "runs" / uid).is_dir():  # removed since: the study runs it again
            planned.append(PlannedRun(uid, role or {}, "pending", error="its run folder was removed"))
        else:
            record, why = load_run(root / "runs" / uid, role)
            if record is None:
                broken.append(BrokenRun(root / "runs" / uid, why, role))
                warnings.append(_broken_line(root, root / "runs" / uid, why))
                planned.append(PlannedRun(uid, role or {}, "broken", error=why))
            else:
                records.append(record)
                planned.append(PlannedRun(uid, role or {}, "done", record=record))
    return Results(root, records, broken, planned, study, warnings)


def _scan_loose(root: Path, warnings: list[str]) -> Results:
    records, broken = [], []
    for path in sorted(root.rglob("metrics.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # staging folders of runs in progress
        record, why = load_run(path.parent)
        if record is None:
            broken.append(BrokenRun(path.parent, why))
            warnings.append(_broken_line(root, path.parent, why))
        else:
            records.append(record)
    return Results(root, records, broken, [], None, warnings)


def _broken_line(root: Path, folder: Path, why: str) -> str:
    return f"broken run folder {folder.relative_to(root)}: {why}; left out of the report"
