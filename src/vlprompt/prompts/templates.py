"""Hand-crafted prompt templates."""

from __future__ import annotations

import string
from typing import Sequence

from ..errors import VlpromptError

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


TEMPLATE_HINT = "write one '{}' where the class name goes and '{{' / '}}' for a literal brace"


def check_template(template, where: str = "template") -> str:
    """``template`` if it takes the class name through exactly one plain ``{}`` (or ``{0}``), else one line.

    Anything else would fail or misbehave in ``str.format``: ``{x}`` raises KeyError, a lone ``{``
    ValueError, two fields IndexError, and ``{0[0]}`` or ``{.upper}`` would format a piece or an
    attribute of the name. ``where`` names the template's origin in the message.
    """
    if not isinstance(template, str):
        raise VlpromptError(f"{where} must be a string with one '{{}}' for the class name, got {template!r}")
    try:
        fields = [(name, conv, spec) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:  # a lone '{' or '}'
        raise VlpromptError(f"{where} {template!r}: {e}; {TEMPLATE_HINT}") from None
    if len(fields) != 1:
        problem = "has no '{}'" if not fields else f"has {len(fields)} replacement fields"
        raise VlpromptError(f"{where} {template!r} {problem}; {TEMPLATE_HINT}")
    name, conv, spec = fields[0]
    if name not in ("", "0") or conv is not None or spec:
        field = "{" + name + (f"!{conv}" if conv is not None else "") + (f":{spec}" if spec else "") + "}"
        raise VlpromptError(f"{where} {template!r}: field {field!r} is not a plain '{{}}'; {TEMPLATE_HINT}")
    return template


def format_prompts(template: str, classnames: Sequence[str]) -> list[str]:
    """One prompt per class. Class names may hold braces: ``str.format`` does not parse its arguments."""
    check_template(template)
    return [template.format(prompt_text(c)) for c in classnames]


def ensemble_templates(dataset_template: str, dataset_name: str) -> list[str]:
    """The 7 templates, plus the dataset's own template for every dataset except ImageNet (as CoOp)."""
    templates = list(ENSEMBLE_TEMPLATES)
    if dataset_name != "imagenet":
        templates.append(dataset_template)
    return templates
