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


# The deep-prompt methods' recipes prompt 12 blocks; the tiny towers have 2.
TINY_OPTIONS = {"ivlp": {"depth_text": 2, "depth_vision": 2}, "vpt_deep": {"depth_vision": 2},
                "deep_language": {"depth_text": 2}}
