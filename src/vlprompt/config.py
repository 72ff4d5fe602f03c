"""Typed run configuration: the same keys on the command line, in a YAML file and from Python.

Precedence: defaults < the recipe cell (a method's recipe for the protocol and dataset, see `recipes`) < YAML
file < explicit command-line options (`recipes.resolve`). Every value is validated in ``__post_init__`` and a
bad one is reported as one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, get_type_hints

from .errors import VlpromptError

CHOICES = {
    "precision": ("fp32", "bf16", "fp16", "auto"),
    "ctx_init_rule": ("words", "tokens", "first_tokens"),
    "resume": ("auto", "never"),
    "subsample": ("all", "base", "new"),
    "class_token_position": ("end", "middle", "front"),
    "train_mode": ("exact", "feature_bank"),
}


def setting(default, help: str, group: str, flag: Optional[str] = None, factory=None):
    """One RunConfig key: its default, its help text (without the default, which is added from here) and the
    command-line group it belongs to. ``flag`` overrides the option name (``--no-feature-cache``); ``flag=""``
    keeps the key out of the generic options (a command adds its own)."""
    meta = {"help": help, "group": group, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    dataset: str = setting("caltech101", "registered dataset name (see `vlprompt datasets`) or a folder path", "data")
    root: Optional[str] = setting(None, "data root holding the dataset folders (registered datasets)", "data")
    method: str = setting("coop", "training method (see `vlprompt methods`)", "method")
    method_options: dict = setting(None, "the method's own settings (see `vlprompt methods`)", "method", flag="",
                                   factory=dict)
    preset: Optional[str] = setting(None, "recipe cell: default the method's cell for the protocol and dataset "
                                    "(see `vlprompt methods`, docs/recipes.md); NAME: a named cell (e.g. kgcoop, "
                                    "ivlp-4+4); 'none': no cell", "method")
    protocol: Optional[str] = setting(None, "fewshot | base2new | xd | dg: the protocol whose recipe cell applies; "
                                      "default: base2new for --subsample base or new, else fewshot", "method")
    shots: int = setting(16, "images per class for training (-1: the whole training split); `train` takes a list "
                         "such as 1,2,4,8,16", "data")
    seed: int = setting(1, "random seed (>= 0); `train` takes a list such as 1,2,3", "data")
    subsample: str = setting("all", "all | base | new classes (base: the first half of the labels, docs/protocols.md)",
                             "data")
    template: Optional[str] = setting(None, "override the dataset's hand-crafted template, e.g. 'a photo of a {}.'",
                                      "data")
    backbone: str = setting("RN50", "open_clip architecture (RN50, ViT-B-16, ViT-B-16-quickgelu, ...) or an "
                            "architecture .json", "backbone")
    pretrained: Optional[str] = setting("openai", "open_clip pretrained tag (needs a reachable hub), or 'random'",
                                        "backbone")
    weights: Optional[str] = setting(None, "local weights file (OpenAI .pt, open_clip checkpoint, .safetensors, "
                                     ".bin); wins over --pretrained", "backbone")
    precision: str = setting("fp32", "frozen encoders: fp32 | bf16 | fp16 (GPU only, as the official code runs "
                             "them) | auto (bf16 where faster); prompt parameters are always float32 master "
                             "weights", "backbone")
    device: str = setting("cpu", "cpu, cuda, cuda:1, ...", "backbone")
    n_ctx: int = setting(16, "number of context vectors", "prompt")
    ctx_init: Optional[str] = setting(None, "initialise the context from words, e.g. 'a photo of a' or "
                                      "a_photo_of_a", "prompt")
    ctx_init_rule: str = setting("words", "words: one vector per word of --ctx-init, as the official CoOp code "
                                 "(a word of several BPE tokens keeps the rest frozen) | tokens: one per BPE token | "
                                 "first_tokens: the first --n-ctx BPE tokens, the rest of the phrase fixed (the "
                                 "deep-prompt code's rule)",
                                 "prompt")
    csc: bool = setting(False, "class-specific context", "prompt")
    class_token_position: str = setting("end", "end | middle | front", "prompt")
    epochs: Optional[int] = setting(None, "training epochs; default: the recipe cell's (`vlprompt methods`), else "
                                    "CoOp's by shot count (1: 50, 2 and 4: 100, 8 and 16: 200; ImageNet 50)",
                                    "recipe")
    batch_size: int = setting(32, "training batch size", "recipe")
    lr: float = setting(0.002, "learning rate", "recipe")
    momentum: float = setting(0.9, "SGD momentum", "recipe")
    weight_decay: float = setting(5e-4, "SGD weight decay", "recipe")
    warmup_epochs: int = setting(1, "epochs at the constant warm-up learning rate", "recipe")
    warmup_lr: float = setting(1e-5, "warm-up learning rate", "recipe")
    train_mode: str = setting("exact", "exact: fresh augmentation every step | feature_bank: K augmented views "
                              "encoded once (an approximation)", "recipe")
    bank_views: int = setting(10, "augmented views per training image in feature_bank mode", "recipe")
    test_batch_size: int = setting(100, "images per batch when encoding test images", "execution")
    num_workers: Optional[int] = setting(None, "image-loading worker processes (default: 0 on a CPU, where the "
                                         "training images are decoded once and kept in memory; on a GPU the "
                                         "cores less one, at most 8)", "execution")
    threads: Optional[str] = setting(None, "CPU threads: N, or auto (the cores other processes leave free when the "
                                     "run starts; the last bits of results depend on the thread count); default: "
                                     "1 for small models, else every core (recorded in metrics.json)", "execution")
    feature_cache: bool = setting(True, "keep encoded test splits on disk, keyed by everything that changes them",
                                  "execution", flag="--no-feature-cache")
    cache_dir: Optional[str] = setting(None, "feature cache folder; default $VLPROMPT_CACHE/features or "
                                       "~/.cache/vlprompt/features", "execution")
    checkpoint_every: int = setting(0, "also checkpoint every N training steps (0: only at the end of each epoch)",
                                    "execution")
    resume: str = setting("auto", "auto: continue from the run's checkpoint when there is one | never: start over",
                          "execution")
    keep_checkpoints: bool = setting(False, "keep the checkpoint of a finished run", "execution")
    overwrite: bool = setting(False, "replace a finished run folder that holds another configuration", "execution")
    output: Optional[str] = setting(None, "run folder; default runs/<dataset>/<method>/<backbone>/<shots>_seed<S>",
                                    "output", flag="")
    progress: bool = setting(True, "progress lines on stderr", "output", flag="--quiet")

    def __post_init__(self):
        hints = get_type_hints(RunConfig)
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        from .recipes import PROTOCOLS, check_preset

        check_preset(self.preset)
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise VlpromptError(f"protocol: '{self.protocol}' is not one of {list(PROTOCOLS)}")
        self._resolve_paths()
        if self.template is not None:
            check_template(self.template)
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise VlpromptError(f"{key}: '{getattr(self, key)}' is not one of {list(allowed)}")
        for key in ("batch_size", "test_batch_size", "n_ctx", "bank_views"):
            if getattr(self, key) < 1:
                raise VlpromptError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.epochs is not None and self.epochs < 1:
            raise VlpromptError(f"epochs: must be >= 1, got {self.epochs}")
        check_device(self.device)
        if self.precision == "fp16":
            from .utils.hardware import check_precision

            check_precision(self.precision, self.device)
        if self.seed < 0:
            raise VlpromptError(f"seed: must be >= 0, got {self.seed}")
        if self.checkpoint_every < 0:
            raise VlpromptError(f"checkpoint_every: must be >= 0, got {self.checkpoint_every}")
        if self.shots == 0 or self.shots < -1:
            raise VlpromptError(f"shots: must be a positive number of images per class or -1 (all), got {self.shots}")
        for key in ("lr", "warmup_lr"):
            if not 0 < getattr(self, key) < math.inf:
                raise VlpromptError(f"{key}: must be a finite number > 0, got {getattr(self, key)}")
        if not 0 <= self.weight_decay < math.inf:
            raise VlpromptError(f"weight_decay: must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise VlpromptError(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.threads is not None and self.threads != "auto" and not (self.threads.isdigit() and int(self.threads) > 0):
            raise VlpromptError(f"threads: must be a number >= 1 or 'auto', got {self.threads!r}")
        if self.warmup_epochs < 0 or (self.num_workers is not None and self.num_workers < 0):
            raise VlpromptError("warmup_epochs and num_workers must be >= 0")

    def _resolve_paths(self) -> None:
        """Paths as absolute paths, so that a run's record works from any working directory. A dataset is
        a path when it is not a registered name and names an existing folder (else it stays as written: a
        folder under ``root``, or an unknown name that fails with its own message when the data is read)."""
        from .data.registry import DATASETS

        for key in ("root", "weights", "cache_dir", "output"):
            value = getattr(self, key)
            if value:
                setattr(self, key, os.path.abspath(os.path.expanduser(value)))
        if self.dataset not in DATASETS and os.path.isdir(os.path.expanduser(self.dataset)):
            self.dataset = os.path.abspath(os.path.expanduser(self.dataset))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_sources(cls, yaml_path: Optional[str] = None, **overrides) -> "RunConfig":
        """Defaults, then the recipe cell, then the YAML file, then the non-None overrides (`recipes.resolve`).

        The cell is the one ``preset`` names, else the best match for the method, protocol and dataset
        (`recipes.select`); its values only fill keys that the file and the overrides leave unset, and
        ``method_options`` merge key by key (a command-line option wins over the file's, which wins over the
        cell's).
        """
        from .recipes import resolve

        values = load_yaml(yaml_path) if yaml_path else {}
        if not isinstance(values.get("method_options") or {}, dict):
            raise VlpromptError(f"config file {yaml_path}: method_options must be a mapping")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return cls(**resolve(values, overrides))


def check_device(device: str) -> None:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and present on this machine (else one line saying why)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise VlpromptError(f"device: '{device}' is not a device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__} " + ("with CUDA" if torch.version.cuda else "built without CUDA")
            raise VlpromptError(f"device: '{device}' asked for, but no CUDA GPU is available ({build})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VlpromptError(f"device: '{device}' asked for, but this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise VlpromptError(f"device: '{device}' asked for, but MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise VlpromptError(f"device: '{device}' is not supported (cpu, cuda, cuda:N, mps)")


def load_yaml(path: str) -> dict:
    """A ``--config`` file (or a run's config.yaml): a mapping of RunConfig keys, parsed with bounded resources."""
    from .utils.safe_yaml import load_yaml_file

    data = load_yaml_file(path, "config file") or {}
    if not isinstance(data, dict):
        raise VlpromptError(f"config file {path}: expected a mapping of keys to values")
    return check_values(data, f"config file {path}")


def check_values(values: dict, where: str, allowed: Optional[set] = None) -> dict:
    """RunConfig keys and values read from a file (``where`` names it in errors): every key known (and in
    ``allowed`` when given), every value of its declared type, ``method_options`` a mapping of names to plain
    values. Returns the values coerced, so that nothing of the wrong type reaches a run."""
    hints = get_type_hints(RunConfig)
    known = set(RunConfig.keys()) if allowed is None else set(allowed)
    out = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in known:
            raise VlpromptError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        try:
            out[key] = coerce(key, value, hints[key])
            if key == "method_options" and value is not None:
                check_plain_mapping(value, f"{key}")
            if key == "template" and value is not None:
                check_template(out[key])
        except VlpromptError as exc:
            raise VlpromptError(f"{where}: {exc}") from None
    return out


def check_plain_mapping(value: Any, where: str) -> None:
    """A mapping of name -> number, string, boolean or null (a method's options)."""
    if not isinstance(value, dict):
        raise VlpromptError(f"{where}: expected a mapping of names to values, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, str):
            raise VlpromptError(f"{where}: key {k!r} is not a name")
        if v is not None and not isinstance(v, (str, int, float, bool)):
            raise VlpromptError(f"{where}.{k}: expected a number, string or boolean, got {type(v).__name__}")


def check_template(template: str) -> None:
    """A prompt template takes the class name through exactly one ``{}`` (`prompts.templates.check_template`)."""
    from .prompts.templates import check_template as check  # lazy: vlprompt.prompts imports the torch models

    check(template)


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
