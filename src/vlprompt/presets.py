"""Named recipe presets: a method's published (or reconstructed) training recipe as RunConfig defaults.

A preset fills RunConfig keys *below* the YAML file and the command line (see `RunConfig.from_sources`),
so every value stays overridable. A method listed in ``METHOD_PRESETS`` gets its preset by default
(``preset: none`` turns that off). The same table is the reference that run.py compares a run against
when it records deviations, so a KgCoOp run is checked against KgCoOp's recipe, not CoOp's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import VlpromptError

NO_PRESET = "none"


@dataclass(frozen=True)
class Preset:
    name: str
    values: dict = field(default_factory=dict)  # RunConfig keys -> values
    source: str = ""  # where the values come from, in words (written into metrics.json)


# KgCoOp's ViT-B/16 base-to-new config (htyao89/KgCoOp vit_b16_ep100_ctxv1.yaml; SPEC 2.7, 10.1).
# lr / momentum / weight decay / warm-up are CoOp's and already RunConfig's defaults.
_KGCOOP_RECIPE = {"backbone": "ViT-B-16", "n_ctx": 4, "ctx_init": "a photo of a", "batch_size": 128, "epochs": 100}

PRESETS: dict[str, Preset] = {
    "kgcoop": Preset("kgcoop", dict(_KGCOOP_RECIPE),
                     "KgCoOp's published recipe (htyao89/KgCoOp, ViT-B/16 vit_b16_ep100_ctxv1; SPEC 2.7)"),
    # The dual-view MI paper's recipe is unknown (SPEC 4.1): this is our reconstruction, KgCoOp's recipe.
    "dualview_mi": Preset("dualview_mi", dict(_KGCOOP_RECIPE),
                          "our reconstruction of the dual-view MI recipe (SPEC 4.2 [A]: KgCoOp's recipe; the "
                          "paper's own recipe is not known)"),
    # CoCoOp's base-to-new config (KaiyangZhou/CoOp vit_b16_c4_ep10_batch1_ctxv1.yaml; SPEC-baselines 2).
    "cocoop": Preset("cocoop", {"backbone": "ViT-B-16", "n_ctx": 4, "ctx_init": "a photo of a", "batch_size": 1,
                                "epochs": 10},
                     "CoCoOp's published recipe (KaiyangZhou/CoOp vit_b16_c4_ep10_batch1_ctxv1; SPEC-baselines 2)"),
}

# Methods whose runs start from a preset unless told otherwise.
METHOD_PRESETS = {"kgcoop": "kgcoop", "dualview_mi": "dualview_mi", "cocoop": "cocoop"}


def check_preset(name: Optional[str]) -> None:
    if name is not None and name != NO_PRESET and name not in PRESETS:
        raise VlpromptError(f"preset: unknown preset '{name}' (known: {', '.join(sorted(PRESETS))}, {NO_PRESET})")


def resolve_preset(name: Optional[str], method: str) -> Optional[Preset]:
    """The preset a run uses: the one named, else the method's default; None for ``none`` or no default."""
    check_preset(name)
    if name == NO_PRESET:
        return None
    name = name or METHOD_PRESETS.get(method)
    return PRESETS[name] if name else None


def method_recipe(method: str) -> Optional[Preset]:
    """The published (or reconstructed) recipe a run of ``method`` is compared against; None: CoOp's."""
    name = METHOD_PRESETS.get(method)
    return PRESETS[name] if name else None
