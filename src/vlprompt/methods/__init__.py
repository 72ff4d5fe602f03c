"""Methods by name. A new method is one module here plus one entry in ``METHODS``."""

from __future__ import annotations

from ..errors import VlpromptError
from .coop import CoOpMethod
from .cpt import CPTMethod, CPTOptions
from .dualview import DualViewMethod
from .kgcoop import KgCoOpMethod
from .zeroshot import ZeroShotMethod

METHODS = {
    "zeroshot": ZeroShotMethod(ensemble=False),
    "zeroshot_ensemble": ZeroShotMethod(ensemble=True),
    "coop": CoOpMethod(),
    "cpt": CPTMethod(),
    "kgcoop": KgCoOpMethod(),
    "dualview_mi": DualViewMethod(),
}


def get_method(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise VlpromptError(f"unknown method '{name}': choose one of {sorted(METHODS)}") from None


def list_methods() -> list[str]:
    return sorted(METHODS)


__all__ = ["CPTOptions", "METHODS", "get_method", "list_methods"]
