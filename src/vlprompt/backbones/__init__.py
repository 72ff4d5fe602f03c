"""Frozen CLIP-like backbones (open_clip)."""

from .backbone import Backbone, BackboneSource, TextTower
from .loader import builtin_config_dir, load_backbone

__all__ = ["Backbone", "BackboneSource", "TextTower", "builtin_config_dir", "load_backbone"]
