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


# PromptSRC's text teacher: 60 of the 80 templates of OpenAI's ImageNet prompt-engineering notebook, "a photo of a
# {}." first, the same list for every dataset (muzairkhattak/PromptSRC, trainers/imagenet_templates.py).
PROMPTSRC_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.",
    "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
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
