"""Domain generalisation (SPEC 6.4): the cross-dataset machinery (`xd`) with ImageNet as the source and its
four variants as targets. ImageNet-A and -R are 200-way: their readers give them their own class lists, and
prompts are rebuilt from those."""

from __future__ import annotations

from . import xd

DEFAULTS = dict(xd.DEFAULTS)  # SPEC 6.4: the ImageNet-trained xd model
SHOTS = [16]
TRANSFER = True
TARGETS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def default_targets(source: str) -> list[str]:
    return list(TARGETS)


plan_method = xd.plan_method
