"""The one writer and the one reader of every learner's artefact (`prompts.artifact`, format 3).

A learner is saved as its method, the `MethodConfig` it was built from and its ``state_dict()``; it is loaded by
building it again through the registry (`MethodBase.create`) from that configuration and loading the tensors
strictly. Nothing of a learner's settings is copied anywhere else."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import VlpromptError
from ..prompts.artifact import (BASE_KEYS, CONFIG_NAME, base_config, check_backbone, read_artifact, stored_learner,
                                warn_unknown_keys, write_artifact)
from .base import MethodConfig, PromptLayout, parse_options

DEFAULT_TEMPLATE = "a photo of a {}."


def learner_config(learner) -> MethodConfig:
    """The configuration ``learner`` was built from: recorded by `MethodBase.create`; for a learner built
    directly (the Python API), its own: its method's options where the learner holds one under the option's
    name (CLIP-Adapter's ``reduction``, the blend ``ensemble_hand``; the deep prompts hold all of them), the
    defaults for the rest, its prompt layout, and its one hand-crafted template."""
    recorded = learner.__dict__.get("method_config")
    if recorded is not None:
        return recorded
    from . import get_method

    method = get_method(learner.method)
    options = getattr(learner, "options", None)
    if options is None and method.Options is not None:
        held = {f.name: getattr(learner, f.name) for f in dataclasses.fields(method.Options) if f.name in vars(learner)}
        options = parse_options(method.name, method.Options, held)
    names = [f.name for f in dataclasses.fields(PromptLayout)]
    has_layout = all(hasattr(learner, n) for n in names)
    layout = PromptLayout(**{n: getattr(learner, n) for n in names}) if has_layout else PromptLayout()
    templates = getattr(learner, "templates", None) or [DEFAULT_TEMPLATE]
    if len(templates) > 1:  # an ensemble is derived from a dataset's template and name, which it does not know
        raise VlpromptError(f"a {type(learner).__name__} built directly with {len(templates)} templates cannot be "
                            f"saved: build it with vlprompt.METHODS['{method.name}'].create(backbone, classnames, config)")
    return MethodConfig(method.name, options, layout, templates[0], "")


def save_learner(learner, out_dir: str | os.PathLike) -> Path:
    config = learner_config(learner)
    return write_artifact(out_dir, {**base_config(learner, config.method), "config": config.artifact()},
                          dict(learner.state_dict()))


def load_prompt(path, backbone, classnames: Optional[Sequence[str]] = None, dataset=None,
                template: Optional[str] = None, learner_class: Optional[type] = None):
    """A saved prompt (a prompt folder or a run folder holding ``prompt/``) as the learner of the method it
    was saved by, on ``backbone``; ``classnames`` rebuilds it for other classes (refused, in one line, where
    the prompt cannot transfer). For another ``dataset`` (its ``name`` and ``template``), learners with
    hand-crafted prompts take that dataset's template, ``template`` when given. ``learner_class``: refuse a
    prompt another learner class wrote (`TextClassifier.from_pretrained`). Prompts of every format version
    load."""
    from ..prompts.legacy import LEGACY_KEYS, convert
    from . import METHODS

    folder = Path(path)
    if (folder / "prompt").is_dir():
        folder = folder / "prompt"
    cfg, tensors = read_artifact(folder)
    new = cfg.get("format_version", 1) >= 3
    warn_unknown_keys(cfg, folder, BASE_KEYS | ({"config"} if new else LEGACY_KEYS))
    check_backbone(cfg, folder, backbone)
    kind = cfg.get("type") or cfg.get("method") or "coop"
    if kind not in METHODS:
        raise VlpromptError(f"prompt {folder} was saved by method '{kind}', which this vlprompt does not know "
                            f"(known: {', '.join(sorted(METHODS))})")
    method = METHODS[kind]
    if not method.trains:
        raise VlpromptError(f"prompt {folder}: method '{kind}' has no saved prompt to load")
    stored = stored_learner(cfg)
    if learner_class is not None and stored != learner_class.__name__:
        raise VlpromptError(f"prompt {folder} is a {kind} prompt ({stored}); {learner_class.__name__}.from_pretrained "
                            "cannot load it: use vlprompt.load_prompt(path, backbone)")
    if new:
        if "config" not in cfg:
            raise VlpromptError(f"{folder / CONFIG_NAME}: missing field 'config'")
        saved, old = cfg["config"], None
    else:
        old = convert(cfg, tensors, folder)
        saved, tensors = old.config, old.tensors
    try:
        config = MethodConfig.from_artifact(method, saved)
    except VlpromptError as exc:
        raise VlpromptError(f"{folder / CONFIG_NAME}: {exc}") from None
    if dataset is not None:  # another dataset: its name and template, as a run on it would have them
        config = dataclasses.replace(config, dataset=dataset.name, template=dataset.template)
    if template is not None:
        config = dataclasses.replace(config, template=template)
    names = list(classnames) if classnames is not None else list(cfg["classnames"])
    refuse_transfer(method, config, folder, cfg["classnames"], names)
    try:
        learner = method.create(backbone, names, config)
    except VlpromptError as exc:
        raise VlpromptError(f"prompt {folder}: {exc}") from None
    if old is not None and old.templates and (not old.follow_dataset or (dataset is None and template is None)):
        if learner.templates != old.templates:  # the templates the prompt was written with, exactly
            learner.use_templates(old.templates)
    load_tensors(learner, tensors, folder)
    return learner


def refuse_transfer(method, config: MethodConfig, path, saved: list, names: list) -> None:
    if names == saved:
        return
    if not method.needs.transfers:
        raise VlpromptError(f"prompt {path}: {method.tied_to_classes} of its own {len(saved)} classes and cannot be "
                            "transferred to other class names")
    if config.layout.csc:
        raise VlpromptError(f"prompt {path}: a class-specific context belongs to its own {len(saved)} classes and "
                            f"cannot be transferred to other class names ({len(names)} given)")


def load_tensors(learner, tensors: dict, path) -> None:
    """``tensors`` into ``learner``, strictly: the first missing, unknown or wrongly shaped one is one error line.
    A buffer the learner declares ``data_sized`` takes the saved number of rows."""
    current = learner.state_dict()
    for name in getattr(learner, "data_sized", ()):
        saved = tensors.get(name)
        if saved is not None and name in current and saved.shape[1:] == current[name].shape[1:]:
            setattr(learner, name, torch.empty(saved.shape, dtype=current[name].dtype, device=current[name].device))
    expected = {k: tuple(v.shape) for k, v in learner.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        wrong = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        raise VlpromptError(f"prompt {path}: its tensors do not match its configuration (first difference: "
                            f"{wrong[0]}: saved {got.get(wrong[0], 'none')}, expected {expected.get(wrong[0], 'none')})")
    learner.load_state_dict(tensors)  # copied into the learner's own tensors: its devices and dtypes
