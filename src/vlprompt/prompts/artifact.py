"""The one artefact format of every method: ``prompt_config.json`` (the method's ``type``, the ``learner``
class, ``format_version``, ``vlprompt_version``, the class names, the backbone it was trained on, and under
``config`` the `MethodConfig` the learner is built from) plus ``prompt.safetensors`` holding the learner's
``state_dict()``: every tensor it learned, under the names the learner has them. The frozen backbone is never
inside. Both files are written atomically. Formats 1 and 2 (settings as top-level fields, tensors under names of
their own) are read by `prompts.legacy`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import VlpromptError
from ..utils.io import atomic_write_bytes, atomic_write_text, read_json

CONFIG_NAME = "prompt_config.json"
WEIGHTS_NAME = "prompt.safetensors"
# 1: CoOp-era prompts (the method under "method", no type); 2: "type", "learner", "format_version",
# "vlprompt_version", each learner's settings as fields of its own; 3: the settings are the method's
# configuration ("config"), the tensors the learner's state_dict(). Versions 1 and 2 still load.
FORMAT_VERSION = 3


def base_config(learner, method: str) -> dict:
    """The fields every artefact config starts with (the backbone's widths: a prompt of another width is refused
    before anything is built)."""
    from .. import __version__

    bb = learner.backbone
    src = bb.source
    return {"type": method, "learner": type(learner).__name__, "format_version": FORMAT_VERSION,
            "vlprompt_version": __version__, "method": method, "classnames": list(learner.classnames),
            "backbone": {"name": src.name, "pretrained": src.pretrained, "weights": src.weights,
                         "random_init_seed": src.random_init_seed, "quick_gelu": src.quick_gelu,
                         "activation": src.activation, "fingerprint": bb.fingerprint, "ctx_dim": bb.ctx_dim,
                         "embed_dim": bb.embed_dim}}


def write_artifact(out_dir: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # float32, except the float64 scalars (`TextClassifier.scalars`), which are kept exactly
    blob = save({k: (v if v.dtype == torch.float64 else v.float()).detach().cpu().contiguous()
                 for k, v in tensors.items()})
    atomic_write_bytes(out / WEIGHTS_NAME, blob)
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2))
    return out


def read_artifact(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a saved artefact folder, with one clear error line for each way it can be broken."""
    from safetensors.torch import load_file

    folder = Path(path)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise VlpromptError(f"prompt folder not found: {folder}")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise VlpromptError(f"prompt folder {folder} has no {p.name}")
    try:
        cfg = read_json(cfg_path)
    except (OSError, ValueError) as exc:  # not JSON, not UTF-8, too large or nested too deeply
        raise VlpromptError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise VlpromptError(f"{cfg_path}: expected a JSON object")
    if not isinstance(cfg.get("classnames"), list):
        raise VlpromptError(f"{cfg_path}: missing field 'classnames'")
    check_field_types(cfg, cfg_path)
    try:
        tensors = load_file(str(w_path))
    except Exception as exc:
        raise VlpromptError(f"cannot read {w_path}: {str(exc).splitlines()[0][:200]}") from None
    return cfg, tensors


_STR, _INT, _NUM = (str,), (int,), (int, float)
# The type of every field some learner reads back (absent fields are left to the learner's own defaults): a
# hand-edited or crafted config is refused here in one line instead of failing inside a constructor.
FIELD_TYPES = {"type": _STR, "learner": _STR, "method": _STR, "vlprompt_version": _STR, "format_version": _INT,
               "backbone": (dict,), "n_ctx": _INT, "ctx_dim": _INT, "vis_dim": _INT, "meta_hidden": _INT,
               "embed_dim": _INT, "reduction": _INT, "ctx_init": (str, type(None)), "hand_view": (str, type(None)),
               "csc": (bool,), "class_token_position": _STR, "ctx_init_rule": _STR, "ensemble_hand": _NUM,
               "alpha": _NUM, "beta": _NUM, "ratio": _NUM, "c": (int, float, type(None)), "config": (dict,)}
LIST_OF_STR = ("classnames", "templates")


def check_field_types(cfg: dict, cfg_path) -> None:
    for key, types in FIELD_TYPES.items():
        value = cfg.get(key)
        if key in cfg and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise VlpromptError(f"{cfg_path}: field {key!r} has a value of the wrong type ({str(value)[:40]!r})")
    for key in LIST_OF_STR:
        if key in cfg and not (isinstance(cfg[key], list) and all(isinstance(v, str) for v in cfg[key])):
            raise VlpromptError(f"{cfg_path}: field {key!r} must be a list of strings")
    for key, value in (cfg.get("backbone") or {}).items():
        wrong_int = key in ("ctx_dim", "embed_dim") and (not isinstance(value, int) or isinstance(value, bool))
        if wrong_int or key in ("name", "pretrained", "weights", "fingerprint") and not isinstance(value, (str, type(None))):
            raise VlpromptError(f"{cfg_path}: field 'backbone.{key}' has a value of the wrong type ({str(value)[:40]!r})")


def stored_learner(cfg: dict) -> str:
    """The learner class that wrote a prompt: format 1 configs did not record it, and only GuidedCoOp wrote
    hand-crafted templates."""
    return cfg.get("learner") or ("GuidedCoOp" if cfg.get("templates") else "CoOp")


def check_backbone(cfg: dict, path, backbone) -> None:
    """The backbone a prompt was trained on, by name and (where recorded) by the fingerprint of
    its weights: two backbones of one width are not interchangeable."""
    recorded = cfg.get("backbone") or {}
    # Format 3 records the widths with the backbone; formats 1 and 2 with the learner's settings.
    widths = {"token": (recorded.get("ctx_dim", cfg.get("ctx_dim")), backbone.ctx_dim),
              "embedding": (recorded.get("embed_dim", cfg.get("embed_dim", cfg.get("vis_dim"))), backbone.embed_dim)}
    for what, (saved, have) in widths.items():
        if saved is not None and saved != have:
            raise VlpromptError(f"prompt {path}: its {what} width {saved} does not fit backbone {backbone.source.name} "
                                f"({what} width {have})")
    name = recorded.get("name")
    if name and name.replace("/", "-") != backbone.source.name.replace("/", "-"):
        raise VlpromptError(f"prompt {path} was trained on backbone {name!r}, not {backbone.source.name!r}")
    if recorded.get("fingerprint") and recorded["fingerprint"] != backbone.fingerprint:
        was = recorded.get("weights") or recorded.get("pretrained") or f"random seed {recorded.get('random_init_seed')}"
        raise VlpromptError(f"prompt {path} was trained on other weights of {name or 'this architecture'} ({was}; "
                            f"fingerprint {recorded['fingerprint']}), not on {backbone.source.describe()} "
                            f"(fingerprint {backbone.fingerprint})")


def warn_unknown_keys(cfg: dict, path, known) -> None:
    import warnings

    unknown = sorted(set(cfg) - set(known))
    if unknown:
        warnings.warn(f"prompt {path}: ignoring config keys this vlprompt version does not know: "
                      f"{', '.join(unknown)} (written by vlprompt {cfg.get('vlprompt_version', '?')})", stacklevel=3)


BASE_KEYS = frozenset({"type", "learner", "format_version", "vlprompt_version", "method", "classnames", "backbone"})
