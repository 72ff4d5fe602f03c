"""Helpers shared by the model-side tests: tiny random backbones and a generated dataset."""

from __future__ import annotations

import warnings

import vlprompt as vp

TINY_VIT = "vlprompt-tiny-ViT"


def tiny_backbone(arch: str = TINY_VIT, **kw):
    """A small randomly initialised CLIP of the real architecture (warning silenced: it is intended)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vp.load_backbone(arch, **kw)
