"""Domain generalisation (docs/protocols.md): the cross-dataset machinery (`xd`) with ImageNet as the source and its
four variants as targets. ImageNet-A and -R are 200-way: their readers give them their own class lists, and
prompts are rebuilt from those. The settings of its runs are the recipe table's ``dg`` cells, the same as
``xd``'s: the ImageNet-trained cross-dataset model (`vlprompt.recipes`)."""

from __future__ import annotations

from . import xd

SHOTS = [16]
TRANSFER = True
TARGETS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def default_targets(source: str) -> list[str]:
    return list(TARGETS)


plan_method = xd.plan_method
