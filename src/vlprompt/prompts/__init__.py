"""Prompt learners and hand-crafted templates."""

from .coop import CoOp
from .templates import DEFAULT_TEMPLATE, ENSEMBLE_TEMPLATES, ensemble_templates, format_prompts
from .zeroshot import ZeroShotCLIP, handcrafted_text_features

__all__ = ["CoOp", "ZeroShotCLIP", "DEFAULT_TEMPLATE", "ENSEMBLE_TEMPLATES", "ensemble_templates",
           "format_prompts", "handcrafted_text_features"]
