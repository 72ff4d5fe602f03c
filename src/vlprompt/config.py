"""Typed run configuration: the same keys on the command line, in a YAML file and from Python.

Precedence: defaults < preset (a method's recipe, see `presets`) < YAML file < explicit command-line
options. Every value is validated in
``__post_init__`` and a bad one is reported as one line naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, get_type_hints

from .errors import VlpromptError
from .presets import check_preset, resolve_preset

CHOICES = {
    "precision": ("fp32", "bf16", "auto"),
    "subsample": ("all", "base", "new"),
    "class_token_position": ("end", "middle", "front"),
    "train_mode": ("exact", "feature_bank"),
}


@dataclass
class RunConfig:
    dataset: str = "caltech101"  # a registered dataset name or a folder path
    root: Optional[str] = None  # data root holding the dataset folders (registered datasets)
    method: str = "coop"
    method_options: dict = field(default_factory=dict)  # the method's own settings (see `vlprompt methods`)
    preset: Optional[str] = None  # recipe preset (presets.PRESETS); default: the method's own; "none": no preset
    shots: int = 16  # -1: the whole training split
    seed: int = 1
    subsample: str = "all"  # all | base | new classes (SPEC 6.2)
    template: Optional[str] = None  # override the dataset's hand-crafted template
    # backbone
    backbone: str = "RN50"
    pretrained: Optional[str] = "openai"  # open_clip tag; "random" for a random model
    weights: Optional[str] = None  # local weights file (wins over pretrained)
    precision: str = "fp32"  # frozen encoders: fp32 | bf16 | auto; prompt parameters are always float32
    device: str = "cpu"
    # CoOp
    n_ctx: int = 16
    ctx_init: Optional[str] = None
    csc: bool = False
    class_token_position: str = "end"
    # recipe (SPEC 2.4); epochs None = by shot count
    epochs: Optional[int] = None
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    train_mode: str = "exact"  # exact: fresh augmentation every step | feature_bank (an approximation)
    bank_views: int = 10  # augmented views per training image in feature_bank mode
    test_batch_size: int = 100
    num_workers: int = 0
    feature_cache: bool = True  # keep encoded test splits on disk, keyed by everything that changes them
    cache_dir: Optional[str] = None  # default $VLPROMPT_CACHE/features or ~/.cache/vlprompt/features
    output: Optional[str] = None  # run folder; default runs/<dataset>/<method>/<backbone>/...
    progress: bool = True

    def __post_init__(self):
        hints = get_type_hints(RunConfig)
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        check_preset(self.preset)
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise VlpromptError(f"{key}: '{getattr(self, key)}' is not one of {list(allowed)}")
        for key in ("batch_size", "test_batch_size", "n_ctx", "bank_views"):
            if getattr(self, key) < 1:
                raise VlpromptError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.epochs is not None and self.epochs < 1:
            raise VlpromptError(f"epochs: must be >= 1, got {self.epochs}")
        if self.shots == 0 or self.shots < -1:
            raise VlpromptError(f"shots: must be a positive number of images per class or -1 (all), got {self.shots}")
        for key in ("lr", "warmup_lr"):
            if not getattr(self, key) > 0:
                raise VlpromptError(f"{key}: must be > 0, got {getattr(self, key)}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise VlpromptError("weight_decay must be >= 0 and momentum in [0, 1)")
        if self.warmup_epochs < 0 or self.num_workers < 0:
            raise VlpromptError("warmup_epochs and num_workers must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_sources(cls, yaml_path: Optional[str] = None, **overrides) -> "RunConfig":
        """Defaults, then the preset, then the YAML file, then the non-None overrides.

        The preset is the one named (``preset`` key) or else the method's own (`presets.METHOD_PRESETS`);
        its values only fill keys that the file and the overrides leave unset.
        """
        values = load_yaml(yaml_path) if yaml_path else {}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "method_options" in overrides:  # merged key by key: a command-line option wins over the file
            file_options = values.get("method_options") or {}
            if not isinstance(file_options, dict):
                raise VlpromptError(f"config file {yaml_path}: method_options must be a mapping")
            overrides["method_options"] = {**file_options, **overrides["method_options"]}
        values.update(overrides)
        preset = resolve_preset(values.get("preset"), str(values.get("method", cls.method)))
        if preset is not None:
            values = {**preset.values, **values, "preset": preset.name}
        return cls(**values)


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise VlpromptError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise VlpromptError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise VlpromptError(f"config file {path}: expected a mapping of keys to values")
    known = set(RunConfig.keys())
    for key in data:
        if key not in known:
            raise VlpromptError(f"config file {path}: unknown key '{key}' (known: {', '.join(sorted(known))})")
    return data


def coerce(name: str, value: Any, hint) -> Any:
    """Accept strings for numbers and booleans (YAML and CLI), reject anything else with one line."""
    if value is None:
        return None
    base = hint
    args = getattr(hint, "__args__", None)
    if args and type(None) in args:  # Optional[X]
        base = next(a for a in args if a is not type(None))
    if base is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    elif base is int:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        else:
            try:
                return int(str(value).strip())
            except ValueError:
                pass
    elif base is float:
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
    elif base is dict:
        if isinstance(value, dict):
            return dict(value)
    elif base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise VlpromptError(f"{name}: invalid value {value!r} (expected {getattr(base, '__name__', base)})")
