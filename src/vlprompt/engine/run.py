"""One run end to end: dataset -> backbone -> method -> (train) -> evaluate -> run folder.

A run folder holds ``config.yaml`` (the resolved configuration), ``prompt/`` (the learned prompt,
for methods that train) and ``metrics.json`` (accuracies, per-epoch history, timings, versions, the recipe cell
the run is compared against and every deviation from it as a record; schema `SCHEMA_VERSION`, the same for
trained, zero-shot and evaluated runs). The folder is written as one unit: everything goes into a hidden
staging folder beside it, which is renamed into place at the end, so a killed run never leaves a folder that
mixes two runs.

Grids and studies (several runs) live in `vlprompt.protocols`; this module runs one configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import random
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import __version__
from ..backbones import Backbone, load_backbone
from ..config import RunConfig, load_yaml
from ..data import load_dataset
from ..errors import VlpromptError
from ..methods import get_method, load_prompt
from ..methods.base import method_config, parse_options
from ..prompts.artifact import read_artifact
from ..recipes import NO_PRESET, RECIPE_KEYS, Deviation, as_record, as_records, reference
from ..utils.faults import fault_point
from ..utils.hardware import resolve_precision
from ..utils.io import atomic_write_json, atomic_write_text, read_json
from ..utils.progress import say
from ..utils.safe_yaml import load_yaml_file
from ..utils.threads import ThreadChoice, apply_threads, choose_threads
from .checkpoint import Checkpointer, checkpoint_folder, differing_keys
from .evaluate import accuracy_report, classify, image_logits, rank_logits
from .feature_store import FeatureStore
from .lease import Lease
from .identity import IDENTITY_VERSION, config_key, key_of, legacy_config_key, legacy_identity, result_identity
from .run_folder import commit_run_folder, recorded_key, stage_run_folder
from .schedule import default_epochs
from .trainer import ExactFeatures, FeatureBank, PixelSource, TrainSettings, train_prompt

# The optimiser settings every recipe block records (RunConfig's defaults are CoOp's recipe).
PAPER_RECIPE = {k: RunConfig.__dataclass_fields__[k].default for k in RECIPE_KEYS}


def reference_recipe(cfg: RunConfig, dataset: Optional[str] = None):
    """The `recipes.Reference` a run of ``cfg`` is compared against: its recipe cell (the one ``preset``
    names, else the best match for its method, protocol and dataset) over RunConfig's defaults."""
    return reference(cfg, dataset)


def recipe_epochs(cfg: RunConfig, dataset: str) -> tuple[int, int]:
    """(the reference's epochs, the epochs this run trains). A cell without epochs, and CoOp's rule, give
    epochs by shot count; ``epochs`` unset trains the reference's, except under ``preset: none`` (no cell:
    CoOp's rule)."""
    by_shots = default_epochs(cfg.shots, dataset)
    paper = reference_recipe(cfg).epochs or by_shots
    return paper, cfg.epochs or (by_shots if cfg.preset == NO_PRESET else paper)


def recipe_record(cfg: RunConfig, epochs: int, paper_epochs: int) -> dict:
    """metrics.json's ``recipe``: the epochs trained and the reference's, the optimiser settings used, the
    ``preset`` asked for, and the reference cell (``cell``, ``source``, ``reconstructed``, ``values``;
    ``reference`` repeats the source for readers of earlier records)."""
    ref = reference_recipe(cfg)
    return {"epochs": epochs, "paper_epochs": paper_epochs, **{k: getattr(cfg, k) for k in PAPER_RECIPE},
            "preset": cfg.preset, "reference": ref.source, **ref.record()}


def iteration_record(cfg: RunConfig, history: dict) -> Optional[dict]:
    """For a run whose recipe counts iterations (CLIP-LoRA), metrics.json's ``recipe.iterations`` and
    ``recipe.paper_iterations``, with a deviation when they differ (``deviations``); None for epochs."""
    sched = history["schedule"]
    if sched["unit"] != "iterations":
        return None
    steps, paper = history["steps"], sched["reference_steps"]
    out = [Deviation("iterations", steps, paper, reference_recipe(cfg).label,
                     f"{cfg.epochs} epochs of {sched['batches_per_epoch']} batches asked for")] if steps != paper else []
    return {"iterations": steps, "paper_iterations": paper, "deviations": out}


def option_deviations(method, options, cfg: Optional[RunConfig] = None) -> list[Deviation]:
    """Method options that differ from the recipe's: the reference cell's options over the method's defaults,
    for methods whose reference cell is their own (an option at its ``official`` value is no deviation)."""
    if options is None or cfg is None:
        return []
    ref = reference_recipe(cfg)
    if ref.cell is None or ref.cell.method != method.name:
        return []
    recipe = {**dataclasses.asdict(method.Options()), **ref.options}
    official = {f.name: f.metadata.get("official") for f in dataclasses.fields(method.Options)}
    return [Deviation(f"method_options.{k}", v, recipe[k], ref.label)
            for k, v in dataclasses.asdict(options).items() if v != recipe[k] and v != official[k]]


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


def deviations(cfg: RunConfig, bb: Backbone, epochs: int, paper_epochs: int, trains: bool, notes) -> list[dict]:
    """Every way this run differs from its reference (its recipe cell, the official code), as records
    (`recipes.records`): the backbone's weights and precision, and for a trained run the prompt's precision, a
    reconstructed recipe, the epochs and every recipe setting; the dataset's notes last."""
    ref = reference_recipe(cfg)
    out = []
    if bb.source.is_random:
        out.append(Deviation("backbone.random", True, False, "recipe",
                             "backbone weights are RANDOM: accuracies are meaningless except as smoke tests"))
    if bb.precision != ref.official("precision"):
        out.append(Deviation("precision", bb.precision, ref.official("precision"), "official code",
                             "the precision the frozen encoders run in"))
    if trains:
        if ref.official("prompt_precision") != "fp32":
            out.append(Deviation("prompt_precision", "fp32", ref.official("prompt_precision"), "official code",
                                 "prompt parameters and their SGD state are float32 master weights"))
        if ref.cell is not None and ref.cell.reconstructed:
            out.append(Deviation("recipe", ref.cell.id, None, "our reconstruction",
                                 f"no official configuration for {cfg.method} under {ref.protocol}: the values "
                                 "are our choice (docs/recipes.md)"))
        if epochs != paper_epochs:
            out.append(Deviation("epochs", epochs, paper_epochs, ref.label,
                                 f"by shot count, for {cfg.shots} shots" if ref.epochs is None else ""))
        for key, value in ref.values.items():
            if key == "n_ctx" and cfg.ctx_init:  # ctx_init fixes the number of context vectors
                continue
            if getattr(cfg, key) != value:
                out.append(Deviation(key, getattr(cfg, key), value, ref.label))
    out.extend(as_record(note, "data") for note in notes or [])
    return as_records(out)


SCHEMA_VERSION = 2


def _arch_name(name: Optional[str]) -> str:
    return str(name or "").replace("/", "-")


def _pretrained_tag(pretrained: Optional[str]) -> Optional[str]:
    return None if pretrained is None or str(pretrained).lower() in ("", "none", "random") else str(pretrained)


def backbone_mismatch(cfg: RunConfig, bb: Backbone) -> Optional[str]:
    """How backbone ``bb`` differs from the one ``cfg`` asks for, in words; None when it is that backbone."""
    src = bb.source
    if _arch_name(cfg.backbone) != _arch_name(src.name):
        return f"backbone {cfg.backbone!r} was asked for, the model given is {src.name!r}"
    if cfg.weights:
        want = str(Path(cfg.weights).expanduser().resolve())
        if want != src.weights:
            return f"weights {want} were asked for, the model given has {src.describe()}"
    elif _pretrained_tag(cfg.pretrained) != src.pretrained or src.weights:
        return (f"pretrained={_pretrained_tag(cfg.pretrained) or 'random'} was asked for, the model given has "
                f"{src.describe()}")
    precision = resolve_precision(cfg.precision, cfg.device)
    if precision != bb.precision:
        return f"precision {precision} was asked for, the model given runs in {bb.precision}"
    if torch.device(cfg.device) != bb.device:
        return f"device {cfg.device} was asked for, the model given is on {bb.device}"
    return None


def backbone_for(cfg: RunConfig, backbone: Optional[Backbone]) -> Backbone:
    """``backbone`` when it is the one ``cfg`` names (else one clear error), or a fresh load."""
    if backbone is None:
        return backbone_from_config(cfg)
    why = backbone_mismatch(cfg, backbone)
    if why:
        raise VlpromptError(f"the backbone passed in does not match the configuration: {why}")
    return backbone


def check_output(out: Path, cfg: RunConfig, key: str, legacy_key: Optional[str] = None) -> None:
    """Before any work: ``out`` must be a folder (or not exist yet), and a finished run there of another
    configuration (its recorded ``config_key`` is neither ``key`` nor ``legacy_key``, the key an earlier version
    gave it) is replaced only with ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise VlpromptError(f"output {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()) or cfg.overwrite:
        return
    recorded = recorded_key(out)
    if recorded is None:
        raise VlpromptError(f"output {out} is a folder that holds no finished run; choose another --output or "
                            "pass --overwrite to replace it")
    if recorded in (key, legacy_key):
        return
    try:
        old = load_yaml_file(out / "config.yaml", "run record")
        keys = differing_keys(legacy_identity(old), legacy_identity(cfg.to_dict())) if isinstance(old, dict) else []
    except VlpromptError:
        keys = []
    what = f"differs in: {', '.join(keys)}" if keys else "another prompt or configuration"
    raise VlpromptError(f"output {out} holds a finished run of another configuration ({what}); pass --overwrite "
                        "to replace it, or another --output")


def write_run_files(folder: Path, cfg: RunConfig, metrics: dict) -> None:
    import yaml

    fault_point("run_folder")
    atomic_write_text(folder / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_json(folder / "metrics.json", metrics)


def use_threads(cfg: RunConfig, bb: Backbone) -> Optional[ThreadChoice]:
    """Set this run's CPU threads (`utils.threads`); None on a GPU, where they do not decide the speed."""
    if bb.device.type != "cpu":
        return None
    choice = choose_threads(cfg.threads, bb.text.width)
    apply_threads(choice)
    return choice


def dataset_fingerprint(ds) -> str:
    """The dataset as used, independent of where it lies: a hash of its class names and of every image of
    every split as (path relative to the dataset folder, label). A moved dataset keeps its fingerprint."""
    root = str(ds.info.get("root") or "")
    digest = hashlib.sha256(json.dumps(ds.classnames).encode())
    for split in (ds.train, ds.val, ds.test):
        digest.update(b"|split|")
        for item in split:
            path = os.path.relpath(item.path, root) if root else item.path
            digest.update(f"{path}\t{item.label}\n".encode())
    return digest.hexdigest()[:20]


def result_record(kind: str, cfg: RunConfig, ds, bb: Backbone, report: dict, trains: bool, key: str) -> dict:
    """The fields every metrics.json starts with (one schema for trained, zero-shot and evaluated runs; ``key``: the
    run's identity, `config_key` or `eval_key`):
    the CLIP_benchmark-style summary (dataset, model, pretrained, task, metrics as fractions), then the
    dataset, backbone and test report in full (accuracies in percent)."""
    src = bb.source
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,  # train | zeroshot | eval
        "dataset": ds.name,
        "model": src.name,
        "pretrained": src.pretrained or src.weights or "random",
        "task": "prompt_classification" if trains else "zeroshot_classification",
        "language": "en",
        "metrics": {"acc1": report["accuracy"] / 100.0,
                    "acc5": None if report["top5_accuracy"] is None else report["top5_accuracy"] / 100.0,
                    "mean_per_class_recall": report["macro_accuracy"] / 100.0},
        "config_key": key,
        "identity_version": IDENTITY_VERSION,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": cfg.method,
        "data": {"name": ds.name, "root": ds.info.get("root"), "fingerprint": dataset_fingerprint(ds),
                 "shots": cfg.shots, "seed": cfg.seed,
                 "subsample": cfg.subsample, "template": cfg.template or ds.template,
                 "num_classes": ds.num_classes, "n_train": len(ds.train), "n_val": len(ds.val),
                 "n_test": len(ds.test), "classnames": ds.classnames,
                 "classes_short_of_shots": ds.info.get("classes_short_of_shots", 0)},
        "backbone": {"name": src.name, "source": src.describe(), "precision": bb.precision,
                     "random": src.is_random, "image_encoder": bb.image_encoder_id,
                     "preprocess": bb.preprocess.record()},
        "test": report,
    }


def run(cfg: RunConfig, backbone: Optional[Backbone] = None, store: Optional[FeatureStore] = None,
        execution: Optional[dict] = None) -> dict:
    """Run ``cfg`` and write its run folder; returns the metrics dictionary.

    ``backbone`` (checked against ``cfg``) and ``store`` let several runs share one model load and one set
    of encoded test splits; without them this run loads its own and releases them when it returns.
    ``execution``: how the run was carried out (executor, host, device, attempt), recorded in ``metrics.json``
    under ``execution`` (never part of its identity).
    """
    store = store if store is not None else FeatureStore()
    threads_before = torch.get_num_threads()  # a run's thread choice ends with it
    t_total = time.perf_counter()
    timings = {}
    method = get_method(cfg.method)
    parse_options(method.name, method.Options, cfg.method_options)  # a bad option fails before any work
    check_train_mode(method, cfg)
    out = Path(cfg.output or default_output(cfg))
    values = cfg.to_dict()
    identity = result_identity(values)  # reads the dataset's lists: once per run
    key = key_of(identity)
    check_output(out, cfg, key, legacy_config_key(values))
    lease = Lease.acquire(out)  # the one process that writes this run's checkpoint and folder
    try:
        stage = stage_run_folder(out)
        checkpoint = None
        try:
            if method.trains and not method.needs.fitted:  # trained by SGD: resumable
                checkpoint = Checkpointer(checkpoint_folder(out), identity, cfg.checkpoint_every,
                                          resume=cfg.resume == "auto", legacy_identity=legacy_identity(values),
                                          lease=lease)
                if cfg.resume == "never":
                    checkpoint.discard()
                checkpoint.check_writable()
                checkpoint.load()  # one of another configuration is refused here, before any work
            try:
                metrics = _run_into(stage, out, cfg, method, backbone, store, timings, t_total, checkpoint,
                                    execution or {}, key)
            except OSError as exc:  # a full disk, a vanished folder: one line; the checkpoint is kept
                where = exc.filename or stage
                raise VlpromptError(f"run {out} stopped: cannot write {where}: {exc.strerror or exc}"
                                    + ("; run the same command again to resume" if checkpoint else "")) from None
            lease.check("the run folder")
            commit_run_folder(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # gone already when the commit moved it into place
            torch.set_num_threads(threads_before)
        if checkpoint is not None:
            checkpoint.keep_in(out) if cfg.keep_checkpoints else checkpoint.discard()
    finally:
        lease.release()
    say(f"{cfg.method} on {metrics['dataset']}: top-1 {metrics['test']['accuracy']:.2f}%  "
        f"macro {metrics['test']['macro_accuracy']:.2f}%  -> {out}", cfg.progress)
    metrics["output"] = str(out)
    return metrics


def check_train_mode(method, cfg: RunConfig) -> None:
    """A learner whose image features depend on its parameters cannot draw them from a feature bank."""
    if cfg.train_mode == "feature_bank" and not method.needs.cacheable_features:
        raise VlpromptError(f"train_mode feature_bank: method {method.name} learns inside the image tower, so its image "
                            "features change at every step and cannot be encoded once; use train_mode exact")


def frozen_test_features(method, bb: Backbone, ds, cfg: RunConfig, store: FeatureStore):
    """(features, labels) of the test split from the frozen tower (cached), for methods that classify frozen
    features; None for a method whose image features depend on it (its test images are checked to exist)."""
    if method.needs.cacheable_features:
        return store.get(bb, ds.test, cfg, desc="encoding test images", dataset=ds.name)
    missing = next((d.path for d in ds.test if not os.path.isfile(d.path)), None)
    if missing is not None:
        raise VlpromptError(f"test image not found: {missing}")
    return None


def test_report(learner, ds, cfg: RunConfig, test_features) -> dict:
    """The accuracy report of ``learner`` on the test split: from the frozen features, or through the learner's
    own image tower (``test_features`` None)."""
    if test_features is not None:
        feats, labels = test_features
        return accuracy_report(classify(learner, feats), labels, ds.classnames)
    logits, labels = image_logits(learner, ds.test, cfg.test_batch_size, cfg.num_workers, cfg.progress)
    return accuracy_report(rank_logits(logits, len(ds.classnames)), labels, ds.classnames)


def _run_into(stage: Path, out: Path, cfg: RunConfig, method, backbone, store, timings, t_total,
              checkpoint: Optional[Checkpointer], execution: dict, key: str) -> dict:
    if backbone is not None:
        backbone_for(cfg, backbone)  # a mismatch fails before the dataset is read
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
    bb = backbone if backbone is not None else backbone_from_config(cfg)  # checked above
    timings["load_backbone_s"] = time.perf_counter() - t
    threads = use_threads(cfg, bb)
    say(f"backbone {bb.source.describe()} ({bb.precision})"
        + (f", {threads.threads} thread(s): {threads.reason}" if threads else ""), cfg.progress)

    # The learner first (a setting that does not fit the backbone fails before any encoding), then the test
    # split: an unreadable test image is found before training, not after it (encoding never draws from the
    # global random state, so the order does not change the result).
    torch.manual_seed(cfg.seed)  # prompt initialisation does not depend on how the backbone was obtained
    mcfg = method_config(method, cfg, ds)
    learner = method.create(bb, ds.classnames, mcfg)  # it records mcfg: what its artefact saves
    t = time.perf_counter()
    test_features = frozen_test_features(method, bb, ds, cfg, store)
    timings["encode_test_s"] = time.perf_counter() - t
    # A method with its own recipe (KgCoOp, dual-view MI) has fixed epochs; CoOp's depend on the shots.
    paper_epochs, epochs = recipe_epochs(cfg, ds.name)
    history = iterations = None
    extra_deviations: list = []  # records, or words (`recipes.as_records` converts them)
    options = {}
    fits = method.needs.fitted  # fitted in closed form or by a search (linear probe, Tip-Adapter), not SGD
    by_sgd = method.trains and not fits
    if fits:
        t = time.perf_counter()
        fitted = method.fit(learner, bb, ds, cfg, store)
        timings["fit_s"] = time.perf_counter() - t
        extra_deviations.extend(fitted.pop("deviations", []))
        options = dataclasses.asdict(mcfg.options) if mcfg.options is not None else {}
        history = {"fit": fitted}
        learner.save_pretrained(stage / "prompt")
    elif method.trains:
        objective = method.objective(learner, mcfg)
        options = objective.options_dict()
        settings = TrainSettings.from_config(cfg, epochs)
        views = objective.view_transforms(bb)
        t = time.perf_counter()
        if cfg.train_mode == "feature_bank":
            source = FeatureBank(bb, ds.train, views, settings, cfg.progress, bank_views=cfg.bank_views)
            timings["feature_bank_s"] = time.perf_counter() - t
        elif method.needs.cacheable_features:
            source = ExactFeatures(bb, ds.train, views, settings, cfg.progress)
        else:  # image features depend on the learner: pixels only
            source = PixelSource(bb, ds.train, views, settings, cfg.progress)
        objective.prepare(bb, ds.train, source)
        t = time.perf_counter()
        history = train_prompt(learner, objective, source, len(ds.train), settings, progress=cfg.progress,
                               checkpoint=checkpoint)
        timings["train_s"] = time.perf_counter() - t
        iterations = iteration_record(cfg, history)
        if iterations is not None:  # counted in iterations: the epochs are what those iterations took
            epochs = paper_epochs = history["schedule"]["epochs"]
            extra_deviations.extend(iterations.pop("deviations"))
        extra_deviations.extend(objective.deviations)  # read after prepare(), which may add to them
        extra_deviations.extend(option_deviations(method, objective.options, cfg))
        if source.deviation:
            extra_deviations.append(source.deviation)
        learner.save_pretrained(stage / "prompt")

    t = time.perf_counter()
    report = test_report(learner, ds, cfg, test_features)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_total

    metrics = {
        **result_record("train" if method.trains else "zeroshot", cfg, ds, bb, report, method.trains, key),
        "method_options": options,
        "recipe": {**recipe_record(cfg, epochs if by_sgd else 0, paper_epochs), **(iterations or {})},
        "train": history,
        "timings": timings,
        "versions": versions(),
        "deviations": deviations(cfg, bb, epochs, paper_epochs, by_sgd, ds.info.get("notes"))
        + as_records(extra_deviations, cfg.method),
        "train_mode": cfg.train_mode if by_sgd else None,
        "execution": {"threads": threads.as_record() if threads else None, **execution},
    }
    write_run_files(stage, cfg, metrics)
    return metrics


def default_eval_output(prompt: Path, cfg: RunConfig) -> Path:
    """Beside the evaluated run: ``<run>_eval-<dataset>[-<subsample>]``."""
    ds = Path(cfg.dataset).name if Path(cfg.dataset).is_dir() else cfg.dataset
    sub = "" if cfg.subsample == "all" else f"-{cfg.subsample}"
    run_dir = prompt.parent if prompt.name == "prompt" else prompt
    return run_dir.parent / f"{run_dir.name}_eval-{ds}{sub}"


def eval_config(prompt: str | os.PathLike, cfg_overrides: dict) -> tuple[RunConfig, Path]:
    """(the configuration `evaluate_prompt` evaluates with, the prompt folder).

    The dataset and its settings default to the run's own configuration and any key of ``cfg_overrides``
    replaces them. On another dataset the prompt sees that dataset's classes and template: the run's
    ``subsample`` and ``template`` are not inherited (pass them to ask for them). The backbone is the one the
    prompt recorded; asking for another is an error (``weights`` may say where the recorded file lives now).
    """
    path = Path(prompt)
    run_cfg: dict = {}
    if (path / "prompt").is_dir():
        if (path / "config.yaml").is_file():
            run_cfg = load_yaml(str(path / "config.yaml"))
        path = path / "prompt"
    pcfg, _ = read_artifact(path)
    recorded = pcfg.get("backbone", {})
    overrides = {k: v for k, v in cfg_overrides.items() if v is not None}
    overrides.pop("output", None)
    asked = overrides.pop("backbone", None)
    if asked is not None and _arch_name(asked) != _arch_name(recorded.get("name")):
        raise VlpromptError(f"prompt {path} was trained on backbone {recorded.get('name')!r}; it cannot be "
                            f"evaluated on {asked!r}")
    if "pretrained" in overrides or "weights" in overrides:
        recorded_random = not recorded.get("weights") and not recorded.get("pretrained")
        asked_random = not overrides.get("weights") and _pretrained_tag(overrides.get("pretrained")) is None
        if asked_random != recorded_random:
            raise VlpromptError(f"prompt {path} was trained on {'random' if recorded_random else 'pretrained'} "
                                f"weights of {recorded.get('name')!r}; it cannot be evaluated on "
                                f"{'random' if asked_random else 'pretrained'} ones")
    values = dict(run_cfg)
    if "dataset" in overrides and not _same_dataset(overrides["dataset"], run_cfg.get("dataset")):
        for key in ("subsample", "template"):  # another dataset: its own classes and template
            values.pop(key, None)
    values.update(overrides)
    values["backbone"] = recorded.get("name")
    values.setdefault("weights", recorded.get("weights"))
    if not values.get("weights"):
        values["pretrained"] = recorded.get("pretrained") or "random"
    values["method"] = pcfg.get("method", "coop")
    values.pop("output", None)
    _check_recorded_paths(values, overrides, run_cfg, path.parent / "config.yaml")
    return RunConfig(**values), path


def _check_recorded_paths(values: dict, overrides: dict, recorded: dict, record: Path) -> None:
    """A dataset folder or data root taken from a run's record that is no longer there: one line saying that
    the path came from the record and how to point at the new place."""
    from ..data.registry import DATASETS

    dataset, root = values.get("dataset"), values.get("root")
    if "dataset" not in overrides and dataset and dataset == recorded.get("dataset") and dataset not in DATASETS:
        under_root = root and os.path.isdir(os.path.join(os.path.expanduser(str(root)), str(dataset)))
        if not os.path.isdir(os.path.expanduser(str(dataset))) and not under_root:
            raise VlpromptError(f"dataset folder {dataset} (recorded in {record}) no longer exists; if it moved, "
                                "pass --dataset NEW_FOLDER")
    if "root" not in overrides and root and root == recorded.get("root") and dataset in DATASETS:
        if not os.path.isdir(os.path.expanduser(str(root))):
            raise VlpromptError(f"data root {root} (recorded in {record}) no longer exists; if the data moved, "
                                "pass --root NEW_ROOT")


def _same_dataset(a, b) -> bool:
    """Whether two dataset arguments name one dataset: equal names, or folders that resolve to one path."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    pa, pb = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def trained_record(prompt: Path) -> dict:
    """The metrics.json of the run a prompt folder belongs to ({} for a bare prompt folder)."""
    source = prompt.parent / "metrics.json"
    try:
        return read_json(source) if source.is_file() else {}
    except (OSError, ValueError):
        return {}


def eval_key(cfg: RunConfig, prompt_key: Optional[str], legacy: bool = False) -> str:
    """The identity of an evaluation: its configuration plus the identity of the run that trained the prompt
    (``legacy``: the key an earlier version gave it)."""
    values = {**cfg.to_dict(), "prompt_key": prompt_key}
    return legacy_config_key(values) if legacy else config_key(values)


def evaluate_prompt(prompt: str, cfg_overrides: dict, output: Optional[str] = None,
                    backbone: Optional[Backbone] = None, store: Optional[FeatureStore] = None,
                    execution: Optional[dict] = None) -> dict:
    """Evaluate a saved prompt (a run folder or a prompt folder) on a dataset's test split (configuration:
    `eval_config`) and write a run folder (``config.yaml`` + ``metrics.json``, the schema of a training run)
    at ``output`` (default: beside the evaluated run, `default_eval_output`)."""
    cfg, path = eval_config(prompt, cfg_overrides)
    out = Path(output) if output else default_eval_output(path, cfg)
    prompt_key = trained_record(path).get("config_key")
    key = eval_key(cfg, prompt_key)
    check_output(out, cfg, key, eval_key(cfg, prompt_key, legacy=True))
    lease = Lease.acquire(out)
    threads_before = torch.get_num_threads()
    try:
        stage = stage_run_folder(out)
        try:
            metrics = _evaluate_into(stage, path, cfg, backbone, store if store is not None else FeatureStore(),
                                     execution or {}, key)
            lease.check("the run folder")
            commit_run_folder(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # gone already when the commit moved it into place
    finally:
        torch.set_num_threads(threads_before)
        lease.release()
    metrics["output"] = str(out)
    return metrics


def _evaluate_into(stage: Path, path: Path, cfg: RunConfig, backbone, store: FeatureStore, execution: dict,
                   key: str) -> dict:
    method = get_method(cfg.method)
    if backbone is not None:
        backbone_for(cfg, backbone)  # a mismatch fails before the dataset is read
    set_seed(cfg.seed)
    ds = load_dataset(cfg.dataset, cfg.root, shots=cfg.shots, seed=cfg.seed, subsample=cfg.subsample,
                      template=cfg.template)
    if not ds.test:
        raise VlpromptError(f"dataset {ds.name} has no test images")
    bb = backbone if backbone is not None else backbone_from_config(cfg)  # checked above
    threads = use_threads(cfg, bb)
    learner = load_prompt(path, bb, ds.classnames, dataset=ds, template=cfg.template)
    t = time.perf_counter()
    report = test_report(learner, ds, cfg, frozen_test_features(method, bb, ds, cfg, store))
    trained = trained_record(path)
    metrics = {
        **result_record("eval", cfg, ds, bb, report, method.trains, key),
        "prompt": {"path": str(path), "config_key": trained.get("config_key"),
                   "trained_on": (trained.get("data") or trained.get("dataset") or {}).get("name")},
        "timings": {"evaluate_s": time.perf_counter() - t},
        "versions": versions(),
        "deviations": deviations(cfg, bb, 0, 0, False, ds.info.get("notes")),
        "execution": {"threads": threads.as_record() if threads else None, **execution},
    }
    write_run_files(stage, cfg, metrics)
    return metrics
