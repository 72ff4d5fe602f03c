"""How a backbone's images are prepared: size, mean, std, resize mode and interpolation, as its pretrained tag says.

open_clip keeps these per architecture (an architecture JSON's ``preprocess_cfg``) and per pretrained tag (its
pretrained registry, read offline): CLIP's OpenAI tags normalise with CLIP's mean and std and resize the shorter side
then crop, SigLIP's squash the image to the square with mean and std 0.5, MobileCLIP's do not normalise. The order is
open_clip's own: its defaults < the architecture's < the tag's. The CoOp recipes keep their crops and flips on top
(`data.transforms`): only the normalisation, the interpolation and the test-time resize come from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ..errors import VlpromptError

DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "squash", "longest")
DEFAULTS = {"mean": DEFAULT_MEAN, "std": DEFAULT_STD, "interpolation": "bicubic", "resize_mode": "shortest"}


@dataclass(frozen=True)
class Preprocess:
    size: int = 224
    mean: tuple = DEFAULT_MEAN
    std: tuple = DEFAULT_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # shortest: resize the shorter side, centre crop | squash | longest: pad
    source: str = "open_clip defaults"  # where the values came from (recorded)

    def __post_init__(self):
        for key in ("mean", "std"):
            value = getattr(self, key)
            if len(value) != 3 or (key == "std" and min(value) <= 0):
                raise VlpromptError(f"image preprocessing ({self.source}): {key} must be 3 numbers"
                                    + (" above 0" if key == "std" else "") + f", got {list(value)}")
        for key, allowed in (("interpolation", INTERPOLATIONS), ("resize_mode", RESIZE_MODES)):
            if getattr(self, key) not in allowed:
                raise VlpromptError(f"image preprocessing ({self.source}): {key} '{getattr(self, key)}' is not one "
                                    f"of {list(allowed)}")

    def record(self) -> dict:
        """What a run, an export and a feature-cache key record."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    def train_args(self) -> dict:
        """Keyword arguments of the training transforms (`data.transforms.train_transform`, `strong_transform`)."""
        return {"image_size": self.size, "mean": self.mean, "std": self.std, "interpolation": self.interpolation}

    def test_args(self) -> dict:
        """Keyword arguments of `data.transforms.test_transform`."""
        return {**self.train_args(), "resize_mode": self.resize_mode}


def _merge(base: dict, extra: Optional[dict]) -> dict:
    keys = ("mean", "std", "interpolation", "resize_mode")
    return {**base, **{k: v for k, v in (extra or {}).items() if k in keys and v is not None}}


def resolve_preprocess(arch: str, arch_cfg: dict, size: int, tag: Optional[str] = None) -> Preprocess:
    """The preprocessing of architecture ``arch`` (its config ``arch_cfg``, image side ``size``) with pretrained tag
    ``tag``: open_clip's defaults < the architecture's ``preprocess_cfg`` < the tag's entry in open_clip's pretrained
    registry (no download)."""
    own = arch_cfg.get("preprocess_cfg")
    if own is not None and not isinstance(own, dict):
        raise VlpromptError(f"image preprocessing (architecture {arch}): preprocess_cfg must be a mapping, got "
                            f"{type(own).__name__}")
    values = _merge(DEFAULTS, own)
    source = "open_clip defaults"
    if arch_cfg.get("preprocess_cfg"):
        source = f"architecture {arch}"
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    tag_cfg = get_pretrained_cfg(arch, tag) if tag else {}
    if tag_cfg:
        values = _merge(values, tag_cfg)
        source = f"pretrained tag {arch}/{tag}"
    else:
        # No such tag (a weights file with the default tag, a random model): where every tag of the architecture
        # prepares images alike (MobileCLIP's, SigLIP's), that is how its weights expect them.
        kinds = {tuple(_merge(values, get_pretrained_cfg(arch, t)).items())
                 for t in list_pretrained_tags_by_model(arch)}
        if len(kinds) == 1:
            values = dict(kinds.pop())
            source = f"every pretrained tag of {arch}"
    return _preprocess(values, size, source)


def _preprocess(values: dict, size: int, source: str) -> Preprocess:
    try:
        mean, std = tuple(float(v) for v in values["mean"]), tuple(float(v) for v in values["std"])
    except (TypeError, ValueError):
        raise VlpromptError(f"image preprocessing ({source}): mean and std must be lists of 3 numbers, got "
                            f"{values['mean']!r} and {values['std']!r}") from None
    return Preprocess(size=int(size), mean=mean, std=std, interpolation=str(values["interpolation"]),
                      resize_mode=str(values["resize_mode"]), source=source)


def model_image_size(model) -> int:
    """The square input size of an open_clip model's image tower (224 when it does not say)."""
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def from_open_clip(model) -> Preprocess:
    """The preprocessing open_clip attached to a model it created (``model.visual.preprocess_cfg``)."""
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    return _preprocess(_merge(DEFAULTS, cfg), model_image_size(model), "open_clip's model" if cfg else "open_clip defaults")
