"""Methods by name. A new method is one module here plus one entry in ``METHODS``."""

from __future__ import annotations

from ..errors import VlpromptError
from .clip_adapter import ClipAdapterMethod
from .cocoop import CoCoOpMethod
from .coop import CoOpMethod
from .cpt import CPTMethod, CPTOptions
from .deep_prompts import DeepLanguageOptions, DeepPromptMethod, IVLPOptions, VPTDeepOptions
from .dualview import DualViewMethod
from .kgcoop import KgCoOpMethod
from .linear_probe import LinearProbeMethod
from .prograd import ProGradMethod
from .tip_adapter import TipAdapterMethod
from .tip_adapter_f import TipAdapterFMethod
from .zeroshot import ZeroShotMethod

METHODS = {
    "zeroshot": ZeroShotMethod(ensemble=False),
    "zeroshot_ensemble": ZeroShotMethod(ensemble=True),
    "coop": CoOpMethod(),
    "cpt": CPTMethod(),
    "kgcoop": KgCoOpMethod(),
    "dualview_mi": DualViewMethod(),
    "prograd": ProGradMethod(),
    "cocoop": CoCoOpMethod(),
    "linear_probe": LinearProbeMethod(),
    "tip_adapter": TipAdapterMethod(),
    "tip_adapter_f": TipAdapterFMethod(),
    "clip_adapter": ClipAdapterMethod(),
    "ivlp": DeepPromptMethod("ivlp", IVLPOptions, prompts_image=True),
    "vpt_deep": DeepPromptMethod("vpt_deep", VPTDeepOptions, prompts_image=True),
    "deep_language": DeepPromptMethod("deep_language", DeepLanguageOptions, prompts_image=False),
}


def get_method(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise VlpromptError(f"unknown method '{name}': choose one of {sorted(METHODS)}") from None


def list_methods() -> list[str]:
    return sorted(METHODS)


def load_prompt(path, backbone, classnames=None, dataset=None, template=None):
    """A saved prompt (a prompt folder or a run folder holding ``prompt/``) as the learner of the method it
    was saved by, on ``backbone``; ``classnames`` rebuilds it for other classes (refused, in one line, where
    the prompt cannot transfer). Prompts of every format version load."""
    from pathlib import Path

    from ..prompts.artifact import read_artifact

    folder = Path(path)
    if (folder / "prompt").is_dir():
        folder = folder / "prompt"
    cfg, _ = read_artifact(folder)
    kind = cfg.get("type") or cfg.get("method") or "coop"
    if kind not in METHODS:
        raise VlpromptError(f"prompt {folder} was saved by method '{kind}', which this vlprompt does not know "
                            f"(known: {', '.join(sorted(METHODS))})")
    method = METHODS[kind]
    if not method.trains:
        raise VlpromptError(f"prompt {folder}: method '{kind}' has no saved prompt to load")
    return method.load(str(folder), backbone, classnames, dataset=dataset, template=template)


__all__ = ["CPTOptions", "METHODS", "get_method", "list_methods", "load_prompt"]
