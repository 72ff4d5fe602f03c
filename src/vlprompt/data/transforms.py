"""Image loading and CLIP/CoOp pre-processing (Dassl's transforms, as the official code uses them).

Train: RandomResizedCrop on the full-resolution image (no resize first, as in Dassl), flip,
normalise. Test: CLIP's own resize-shorter-side + center crop, which is deterministic so test
features can be cached. The backbone's pretrained tag decides the normalisation, the interpolation and the test
resize (`backbones.preprocess`: SigLIP squashes, MobileCLIP does not normalise); the crops and flips stay the recipe's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from vlprompt.errors import VlpromptError

from .types import Datum

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def train_transform(image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, scale=(0.08, 1.0),
                    interpolation: str = "bicubic") -> T.Compose:
    """Dassl's training augmentation; Tip-Adapter's cache uses ``scale=(0.5, 1.0)``."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                image_size, scale=tuple(scale), ratio=(3 / 4, 4 / 3),
                interpolation=INTERPOLATION[interpolation],
            ),
            T.RandomHorizontalFlip(p=0.5),
            T.ToTensor(),
            T.Normalize(mean=mean, std=std),
        ]
    )


def strong_transform(image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, jitter: float = 0.4, hue: float = 0.1,
                     jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_p: float = 0.0,
                     interpolation: str = "bicubic") -> T.Compose:
    """SimCLR-style strong augmentation for CPT's views 2 and 3 (our assumption, docs/reconstructions.md):
    the CoOp crop and flip, then colour jitter (brightness, contrast and saturation ``jitter``, ``hue``)
    with probability ``jitter_p``, grayscale with ``grayscale_p``, and an optional Gaussian blur."""
    steps = [
        T.RandomResizedCrop(
            image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
            interpolation=INTERPOLATION[interpolation],
        ),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=hue)], p=jitter_p),
        T.RandomGrayscale(p=grayscale_p),
    ]
    if blur_p > 0:
        # SimCLR's kernel: about a tenth of the image side, odd.
        kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
    steps += [T.ToTensor(), T.Normalize(mean=mean, std=std)]
    return T.Compose(steps)


def test_transform(image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, interpolation: str = "bicubic",
                   resize_mode: str = "shortest") -> T.Compose:
    """The deterministic test pre-processing: ``shortest`` (CLIP's) resizes the shorter side and crops the centre,
    ``squash`` (SigLIP's) resizes to the square, ``longest`` resizes the longer side and pads the centre with 0."""
    mode = INTERPOLATION[interpolation]
    if resize_mode == "squash":
        resize = [T.Resize((image_size, image_size), interpolation=mode)]
    elif resize_mode == "longest":
        resize = [LongestSide(image_size, mode), T.CenterCrop(image_size)]  # CenterCrop pads a smaller image
    else:
        resize = [T.Resize(image_size, interpolation=mode), T.CenterCrop(image_size)]  # shorter side
    return T.Compose([*resize, T.ToTensor(), T.Normalize(mean=mean, std=std)])


class LongestSide:
    """Resize so that the longer side is ``size``, keeping the aspect ratio."""

    def __init__(self, size: int, interpolation: InterpolationMode):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        scale = self.size / max(w, h)
        return T.functional.resize(image, [max(1, round(h * scale)), max(1, round(w * scale))],
                                   interpolation=self.interpolation)


# The name starts with "test_"; stop pytest from collecting it when a test module imports it.
test_transform.__test__ = False


def load_image(path: str) -> Image.Image:
    """Decode an image fully as RGB; any failure becomes one ``VlpromptError`` line."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces a full decode, so truncation shows here
    except Exception as e:  # noqa: BLE001 - any decoder failure means "this file is bad"
        # PIL raises OSError/UnidentifiedImageError for corrupt or truncated files and
        # FileNotFoundError for missing ones, but malformed headers can also surface as
        # SyntaxError, ValueError, struct.error or DecompressionBombError.
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise VlpromptError(f"cannot read image {path}: {reason}") from None


class ImageDataset(torch.utils.data.Dataset):
    """``(transform(image), label)`` pairs for a list of ``Datum``."""

    def __init__(self, items: Sequence[Datum], transform: Callable, loader: Callable = load_image):
        self.items = list(items)
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        return self.transform(self.loader(item.path)), item.label
