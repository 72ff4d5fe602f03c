"""Hand-crafted prompt templates (SPEC 2.7 and 5.4)."""

from __future__ import annotations

from typing import Sequence

DEFAULT_TEMPLATE = "a photo of a {}."

# CoOp's `IMAGENET_TEMPLATES_SELECT`: the seven templates of the prompt-ensemble baseline (ZeroshotCLIP2).
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def prompt_text(classname: str) -> str:
    """Class names are stored as in the split files; underscores become spaces only in prompts."""
    return classname.replace("_", " ")


def format_prompts(template: str, classnames: Sequence[str]) -> list[str]:
    return [template.format(prompt_text(c)) for c in classnames]


def ensemble_templates(dataset_template: str, dataset_name: str) -> list[str]:
    """The 7 templates, plus the dataset's own template for every dataset except ImageNet (as CoOp)."""
    templates = list(ENSEMBLE_TEMPLATES)
    if dataset_name != "imagenet":
        templates.append(dataset_template)
    return templates
