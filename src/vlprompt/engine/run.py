"""One run end to end: dataset -> backbone -> method -> (train) -> evaluate -> run folder.

A run folder holds ``config.yaml`` (the resolved configuration), ``prompt/`` (the learned prompt,
for methods that train) and ``metrics.json`` (accuracies, per-epoch history, timings, versions and every
deviation from the paper recipe). All files are written atomically.
"""

from __future__ import annotations

import dataclasses
import platform
import random
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .. import __version__
from ..backbones import Backbone, load_backbone
from ..config import RunConfig, load_yaml
from ..data import load_dataset
from ..data.transforms import test_transform
from ..errors import VlpromptError
from ..methods import get_method
from ..methods.base import parse_options
from ..presets import method_recipe
from ..prompts.coop import read_prompt_artifact
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.progress import say
from .evaluate import accuracy_report, classify
from .feature_cache import FeatureCache, split_key
from .features import encode_items
from .schedule import default_epochs
from .trainer import ExactFeatures, FeatureBank, TrainSettings, train_prompt

# RunConfig's defaults are the paper recipe (SPEC 2.4); any other value is a recorded deviation.
PAPER_RECIPE = {k: RunConfig.__dataclass_fields__[k].default
                for k in ("batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "warmup_lr")}
COOP_RECIPE_SOURCE = "CoOp's paper recipe (SPEC 2.4)"


def reference_recipe(method: str) -> tuple[dict, str]:
    """(recipe, where it comes from) that a run of ``method`` is compared against: the method's own
    published or reconstructed recipe (`presets.method_recipe`) over CoOp's, else CoOp's."""
    recipe = method_recipe(method)
    if recipe is None:
        return dict(PAPER_RECIPE), COOP_RECIPE_SOURCE
    return {**PAPER_RECIPE, **recipe.values}, recipe.source


def option_deviations(method, options) -> list[str]:
    """Method options that differ from their defaults, for methods whose defaults are a recipe."""
    if options is None or method_recipe(method.name) is None:
        return []
    defaults = dataclasses.asdict(method.Options())
    return [f"{method.name} option {k}={v} (recipe: {defaults[k]})"
            for k, v in dataclasses.asdict(options).items() if v != defaults[k]]


def set_seed(seed: int) -> None:
    """Seed random, numpy and torch before the dataset is built, as CoOp's train.py does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict:
    import open_clip

    return {"vlprompt": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def default_output(cfg: RunConfig) -> str:
    ds = Path(cfg.dataset).name if Path(cfg.dataset).is_dir() else cfg.dataset
    bb = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.backbone).stem if cfg.backbone.endswith(".json") else cfg.backbone)
    shots = "all" if cfg.shots < 0 else f"{cfg.shots}shots"
    sub = "" if cfg.subsample == "all" else f"_{cfg.subsample}"
    return str(Path("runs") / ds / cfg.method / bb / f"{shots}_seed{cfg.seed}{sub}")


def backbone_from_config(cfg: RunConfig) -> Backbone:
    return load_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, precision=cfg.precision,
                         device=cfg.device)


def deviations(cfg: RunConfig, bb: Backbone, epochs: int, paper_epochs: int, trains: bool, notes) -> list[str]:
    """Every way this run differs from the paper protocol, in words (recorded in metrics.json)."""
    out = []
    if bb.source.is_random:
        out.append("backbone weights are RANDOM: accuracies are meaningless except as smoke tests")
    out.append(f"frozen encoders run in {bb.precision} (official CoOp: fp16 on GPU)")
    if trains:
        out.append("prompt parameters and SGD state are float32 master weights (official CoOp: fp16; SPEC 8.1)")
        recipe, source = reference_recipe(cfg.method)
        label = "paper recipe"
        if source != COOP_RECIPE_SOURCE:
            out.append(f"reference recipe: {source}")
            label = f"{cfg.method} recipe"
        if epochs != paper_epochs:
            out.append(f"epochs={epochs} ({label}{'' if label != 'paper recipe' else f' for {cfg.shots} shots'}: "
                       f"{paper_epochs})")
        for key, value in recipe.items():
            if key == "epochs" or (key == "n_ctx" and cfg.ctx_init):  # epochs above; ctx_init fixes M
                continue
            if getattr(cfg, key) != value:
                out.append(f"{key}={getattr(cfg, key)} ({label}: {value})")
    out.extend(notes or [])
    return out


class FeatureMemo:
    """Encoded evaluation splits: in memory for this process, and on disk (`FeatureCache`) across runs."""

    def __init__(self):
        self._store: dict = {}

    def get(self, bb: Backbone, items, cfg: RunConfig, desc: str, dataset: str = ""):
        key = (bb, bb.precision, bb.image_size, tuple((d.path, d.label) for d in items))
        if key in self._store:
            return self._store[key]
        disk = FeatureCache(cfg.cache_dir) if cfg.feature_cache else None
        disk_key = split_key(bb, items, dataset) if disk else None
        found = disk.load(disk_key) if disk else None
        if found is None:
            tf = test_transform(bb.image_size, bb.image_mean, bb.image_std)
            found = encode_items(bb, items, tf, cfg.test_batch_size, cfg.num_workers, desc=desc,
                                 progress=cfg.progress)
            if disk:
                disk.save(disk_key, *found)
        else:
            say(f"{desc}: {len(items)} features from the cache", cfg.progress)
        self._store[key] = found
        return found


_MEMO = FeatureMemo()


def run(cfg: RunConfig, backbone: Optional[Backbone] = None, memo: Optional[FeatureMemo] = None) -> dict:
    """Run ``cfg`` and write its run folder; returns the metrics dictionary."""
    memo = memo or _MEMO
    t_total = time.perf_counter()
    timings = {}
    method = get_method(cfg.method)
    parse_options(method.name, method.Options, cfg.method_options)  # a bad option fails before any work
    out = Path(cfg.output or default_output(cfg))
    set_seed(cfg.seed)

    t = time.perf_counter()
    ds = load_dataset(cfg.dataset, cfg.root, shots=cfg.shots, seed=cfg.seed, subsample=cfg.subsample,
                      template=cfg.template)
    timings["load_dataset_s"] = time.perf_counter() - t
    if method.trains and not ds.train:
        raise VlpromptError(f"dataset {ds.name} has no training images")
    if not ds.test:
        raise VlpromptError(f"dataset {ds.name} has no test images")
    say(f"dataset {ds.name}: {ds.num_classes} classes, train {len(ds.train)} / val {len(ds.val)} / "
        f"test {len(ds.test)}", cfg.progress)

    t = time.perf_counter()
    bb = backbone or backbone_from_config(cfg)
    timings["load_backbone_s"] = time.perf_counter() - t
    say(f"backbone {bb.source.describe()} ({bb.precision})", cfg.progress)

    torch.manual_seed(cfg.seed)  # prompt initialisation does not depend on how the backbone was obtained
    learner = method.build(bb, ds.classnames, cfg, ds)
    # A method with its own recipe (KgCoOp, dual-view MI) has fixed epochs; CoOp's depend on the shots.
    paper_epochs = reference_recipe(cfg.method)[0].get("epochs") or default_epochs(cfg.shots, ds.name)
    epochs = cfg.epochs or paper_epochs
    history = None
    extra_deviations: list[str] = []
    options = {}
    if method.trains:
        objective = method.objective(learner, cfg, ds)
        options = objective.options_dict()
        settings = TrainSettings.from_config(cfg, epochs)
        views = objective.view_transforms(bb)
        t = time.perf_counter()
        if cfg.train_mode == "feature_bank":
            source = FeatureBank(bb, ds.train, views, settings, cfg.progress, bank_views=cfg.bank_views)
            timings["feature_bank_s"] = time.perf_counter() - t
        else:
            source = ExactFeatures(bb, ds.train, views, settings, cfg.progress)
        objective.prepare(bb, ds.train, source)
        t = time.perf_counter()
        history = train_prompt(learner, objective.loss, source, len(ds.train), settings, progress=cfg.progress)
        timings["train_s"] = time.perf_counter() - t
        extra_deviations.extend(objective.deviations)  # read after prepare(), which may add to them
        extra_deviations.extend(option_deviations(method, objective.options))
        if source.deviation:
            extra_deviations.append(source.deviation)
        learner.save_pretrained(out / "prompt")

    t = time.perf_counter()
    feats, labels = memo.get(bb, ds.test, cfg, desc="encoding test images", dataset=ds.name)
    timings["encode_test_s"] = time.perf_counter() - t
    t = time.perf_counter()
    report = accuracy_report(classify(learner, feats), labels, ds.classnames)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_total

    metrics = {
        "method": cfg.method,
        "method_options": options,
        "dataset": {"name": ds.name, "root": ds.info.get("root"), "shots": cfg.shots, "seed": cfg.seed,
                    "subsample": cfg.subsample, "num_classes": ds.num_classes, "n_train": len(ds.train),
                    "n_val": len(ds.val), "n_test": len(ds.test), "classnames": ds.classnames},
        "backbone": {"name": cfg.backbone, "source": bb.source.describe(), "precision": bb.precision,
                     "random": bb.source.is_random, "image_encoder": bb.image_encoder_id},
        "test": report,
        "recipe": {"epochs": epochs if method.trains else 0, "paper_epochs": paper_epochs,
                   **{k: getattr(cfg, k) for k in PAPER_RECIPE}, "preset": cfg.preset,
                   "reference": reference_recipe(cfg.method)[1]},
        "train": history,
        "timings": timings,
        "versions": versions(),
        "deviations": deviations(cfg, bb, epochs, paper_epochs, method.trains, ds.info.get("notes"))
        + extra_deviations,
        "train_mode": cfg.train_mode if method.trains else None,
    }
    write_run_folder(out, cfg, metrics)
    say(f"{cfg.method} on {ds.name}: top-1 {report['accuracy']:.2f}%  macro {report['macro_accuracy']:.2f}%  "
        f"-> {out}", cfg.progress)
    metrics["output"] = str(out)
    return metrics


def run_grid(cfg: RunConfig, shots: Sequence[int], seeds: Sequence[int],
             backbone: Optional[Backbone] = None) -> list[dict]:
    """Every (shots, seed) pair of one dataset in this process: one backbone load and one feature memo.

    Each run writes its own folder: ``cfg.output/<shots>shots_seed<S>`` when ``cfg.output`` is set,
    else the default layout. Returns the metrics of every run, shots-major.
    """
    bb = backbone or backbone_from_config(cfg)
    memo = FeatureMemo()
    results = []
    for k in shots:
        for seed in seeds:
            one = cfg.replace(shots=k, seed=seed)
            if cfg.output:
                one = one.replace(output=str(Path(cfg.output) / Path(default_output(one)).name))
            results.append(run(one, backbone=bb, memo=memo))
    return results


def write_run_folder(out: Path, cfg: RunConfig, metrics: dict) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_json(out / "metrics.json", metrics)


def evaluate_prompt(prompt: str, cfg_overrides: dict, output: Optional[str] = None,
                    backbone: Optional[Backbone] = None) -> dict:
    """Evaluate a saved prompt (a run folder or a prompt folder) on a dataset's test split.

    Dataset, backbone and subsample default to the run's own configuration; any key in
    ``cfg_overrides`` (for example ``subsample="new"`` or another dataset) replaces it.
    """
    path = Path(prompt)
    run_cfg: dict = {}
    if (path / "prompt").is_dir():
        if (path / "config.yaml").is_file():
            run_cfg = load_yaml(str(path / "config.yaml"))
        path = path / "prompt"
    pcfg, _ = read_prompt_artifact(path)
    bsrc = pcfg.get("backbone", {})
    base = {"backbone": bsrc.get("name"), "weights": bsrc.get("weights"),
            "pretrained": bsrc.get("pretrained") or ("random" if not bsrc.get("weights") else None)}
    values = {**base, **run_cfg, **{k: v for k, v in cfg_overrides.items() if v is not None}}
    values["method"] = pcfg.get("method", "coop")
    values.pop("output", None)
    cfg = RunConfig(**values)
    method = get_method(cfg.method)
    set_seed(cfg.seed)
    ds = load_dataset(cfg.dataset, cfg.root, shots=cfg.shots, seed=cfg.seed, subsample=cfg.subsample,
                      template=cfg.template)
    bb = backbone or backbone_from_config(cfg)
    learner = method.load(str(path), bb, ds.classnames, dataset=ds, template=cfg.template)
    t = time.perf_counter()
    feats, labels = _MEMO.get(bb, ds.test, cfg, desc="encoding test images", dataset=ds.name)
    report = accuracy_report(classify(learner, feats), labels, ds.classnames)
    metrics = {"prompt": str(path), "method": cfg.method,
               "dataset": {"name": ds.name, "subsample": cfg.subsample, "num_classes": ds.num_classes,
                           "n_test": len(ds.test), "classnames": ds.classnames},
               "backbone": {"name": cfg.backbone, "source": bb.source.describe(), "precision": bb.precision},
               "test": report, "timings": {"evaluate_s": time.perf_counter() - t}, "versions": versions(),
               "deviations": deviations(cfg, bb, 0, 0, False, ds.info.get("notes"))}
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "eval_metrics.json", metrics)
    return metrics
