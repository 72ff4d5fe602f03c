"""Methods by name. A new method is one module here plus one entry in ``METHODS``; `load_prompt` rebuilds any
saved learner through it (`methods.loading`)."""

from __future__ import annotations

from ..errors import VlpromptError
from .clip_adapter import ClipAdapterMethod
from .clip_lora import CLIPLoRAMethod
from .cocoop import CoCoOpMethod
from .coop import CoOpMethod
from .cpt import CPTMethod, CPTOptions
from .deep_prompts import DeepLanguageOptions, DeepPromptMethod, IVLPOptions, VPTDeepOptions
from .dualview import DualViewMethod
from .kgcoop import KgCoOpMethod
from .linear_probe import LinearProbeMethod
from .maple import MaPLeMethod
from .loading import load_prompt
from .prograd import ProGradMethod
from .promptsrc import PromptSRCMethod
from .tcp import TCPMethod
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
    "maple": MaPLeMethod(),
    "promptsrc": PromptSRCMethod(),
    "tcp": TCPMethod(),
    "clip_lora": CLIPLoRAMethod(),
}


def get_method(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise VlpromptError(f"unknown method '{name}': choose one of {sorted(METHODS)}") from None


def list_methods() -> list[str]:
    return sorted(METHODS)


__all__ = ["CPTOptions", "METHODS", "get_method", "list_methods", "load_prompt"]
