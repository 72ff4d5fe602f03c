"""Prompts of formats 1 and 2, read as format 3: each learner class wrote its settings as top-level fields and
its tensors under names of its own; here they become the method's configuration (`MethodConfig.artifact`)
and the learner's ``state_dict()`` names, and the prompt then loads as a format 3 one does
(`methods.loading.load_prompt`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import VlpromptError
from .artifact import CONFIG_NAME, WEIGHTS_NAME, stored_learner

COOP_FAMILY = ("CoOp", "GuidedCoOp", "CoCoOp")
# Every field some learner wrote in formats 1 and 2 (others are warned about and ignored).
LEGACY_KEYS = frozenset({"n_ctx", "ctx_init", "csc", "class_token_position", "ctx_init_rule", "ctx_dim", "templates",
                         "ensemble_hand", "hand_view", "vis_dim", "meta_hidden", "reduction", "ratio", "embed_dim",
                         "c", "alpha", "beta", "options"})


@dataclass
class Converted:
    config: dict  # the format 3 "config" field
    tensors: dict  # state_dict name -> tensor
    # The hand-crafted templates the prompt stored (GuidedCoOp, CLIP-Adapter, Tip-Adapter): used as they are,
    # unless ``follow_dataset`` and the prompt is loaded for a dataset or with a template (then the method
    # derives them from that dataset's template, as it did when the prompt was written).
    templates: Optional[list] = None
    follow_dataset: bool = False


def convert(cfg: dict, tensors: dict, path) -> Converted:
    """The format 3 form of a format 1 or 2 prompt (one error line when it misses what its learner needs)."""
    learner = stored_learner(cfg)
    layout, options, template = {}, None, "a photo of a {}."
    templates = cfg.get("templates") or None
    follow = False
    if learner in COOP_FAMILY:
        for key in ("n_ctx", "ctx_dim"):
            if key not in cfg:
                raise VlpromptError(f"{path}/{CONFIG_NAME}: missing field '{key}'")
        if "ctx" not in tensors:
            raise VlpromptError(f"{path}/{WEIGHTS_NAME} holds no 'ctx' tensor")
        # prompts saved before ctx_init_rule was recorded were read per token
        layout = {"n_ctx": cfg["n_ctx"], "ctx_init": cfg.get("ctx_init"), "csc": cfg.get("csc", False),
                  "class_token_position": cfg.get("class_token_position", "end"),
                  "ctx_init_rule": cfg.get("ctx_init_rule", "tokens")}
        if learner == "GuidedCoOp":
            if not templates:
                raise VlpromptError(f"prompt {path}: its config names no hand-crafted templates")
            view = cfg.get("hand_view")
            options = {"hand_templates": view or "dataset", "ensemble_hand": cfg.get("ensemble_hand", 0.0)}
            follow = view is not None  # format 1 did not say how its templates follow a dataset: they never did
    elif learner == "ClipAdapter":
        _need(cfg, tensors, path, ("templates", "reduction", "ratio"), ("down", "up"))
        options = {"reduction": cfg["reduction"], "ratio": cfg["ratio"]}
        tensors = {"down.weight": tensors["down"], "up.weight": tensors["up"]}
        follow = True
    elif learner == "LinearProbe":
        _need(cfg, tensors, path, (), ("weight", "bias"))
        c = cfg.get("c")
        tensors = {"weight": tensors["weight"], "bias": tensors["bias"], "c": _scalar(math.nan if c is None else c)}
    elif learner == "TipAdapter":
        _need(cfg, tensors, path, ("templates", "alpha", "beta"), ("keys", "values"))
        tensors = {"keys": tensors["keys"], "values": tensors["values"], "alpha": _scalar(cfg["alpha"]),
                   "beta": _scalar(cfg["beta"])}
    elif learner == "DeepPrompts":  # format 2 already saved its options and its state_dict()
        if not isinstance(cfg.get("options"), dict):
            raise VlpromptError(f"prompt {path}: missing field 'options'")
        options = cfg["options"]
    else:
        raise VlpromptError(f"prompt {path}: learner {learner!r} (format {cfg.get('format_version', 1)}) is not one "
                            "this vlprompt can read")
    if templates:
        template = templates[-1]  # the dataset's own template: the only one, or the last of an ensemble
    return Converted({"options": options, "layout": layout, "template": template, "dataset": ""}, dict(tensors),
                     templates, follow)


def _need(cfg: dict, tensors: dict, path, fields: tuple, names: tuple) -> None:
    for key in fields:
        if key not in cfg:
            raise VlpromptError(f"{path}/{CONFIG_NAME}: missing field '{key}'")
    for key in names:
        if key not in tensors:
            raise VlpromptError(f"{path}/{WEIGHTS_NAME} holds no '{key}' tensor")


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float64)
