"""The results store: run folders read back as records that reports aggregate.

A record is one evaluated run: the dataset it was evaluated on, the dataset its prompt was trained on, the
method, backbone, shots, seed, which classes (all | base | new), and its accuracies. In a study folder the
roles come from ``index.json`` (only units in state ``done`` count); a folder of loose runs is walked for
``metrics.json`` files and each run's role is read from what it recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import VlpromptError

DG_DATASETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


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


def _load_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _config(folder: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _data_section(m: dict) -> dict:
    """The dataset details: ``data`` (schema 2) or the ``dataset`` mapping of schema 1."""
    if isinstance(m.get("data"), dict):
        return m["data"]
    return m["dataset"] if isinstance(m.get("dataset"), dict) else {}


def read_run(folder: Path, role: Optional[dict] = None) -> Optional[RunRecord]:
    """The record of a finished run folder (None if it holds no readable metrics.json). ``role`` (from a
    study's index) says what the run stands for; without it the role is inferred from the metrics."""
    m = _load_json(folder / "metrics.json")
    if m is None or "test" not in m:
        return None
    data, cfg = _data_section(m), _config(folder)
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
    bb = m.get("backbone") or {}
    return RunRecord(folder=folder, protocol=role["protocol"], dataset=role["dataset"], source=role["source"],
                     method=role["method"], method_type=role["method_type"],
                     backbone=str(bb.get("name") or m.get("model")).replace("/", "-"), shots=int(role["shots"] or 0),
                     seed=role.get("seed"), split=role["split"], top1=float(m["test"]["accuracy"]),
                     top5=m["test"].get("top5_accuracy"), random=bool(bb.get("random")), config=cfg)


def collect(folder: str | Path) -> list[RunRecord]:
    """Every finished run under ``folder``: a study folder (its index) or a folder of loose run folders."""
    root = Path(folder)
    if not root.is_dir():
        raise VlpromptError(f"results folder not found: {root}")
    index = _load_json(root / "index.json")
    if index is not None and isinstance(index.get("units"), list):
        out = []
        for unit in index["units"]:
            if unit.get("state") == "done":
                rec = read_run(root / "runs" / unit["uid"], unit.get("role"))
                if rec is not None:
                    out.append(rec)
        return out
    found = []
    for path in sorted(root.rglob("metrics.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # staging folders of runs in progress
        rec = read_run(path.parent)
        if rec is not None:
            found.append(rec)
    return found
