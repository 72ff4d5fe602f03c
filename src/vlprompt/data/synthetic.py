"""A tiny, nameable image dataset for the built-in demo job and for tests.

Each class is a coloured shape ("red circle", "blue square", ...) drawn at a random position,
size and rotation on a noisy background, so a CLIP prompt such as "a photo of a red circle."
makes sense and the classes are separable. Output is ``train/<class>/NNNN.png`` and
``test/<class>/NNNN.png``, which the folder loader reads as layout (c). Deterministic per seed.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw

from vlprompt.errors import VlpromptError

# class folder name -> fill colour (RGB); the shape is the second word.
CLASSES = {
    "red_circle": (220, 30, 30),
    "blue_square": (30, 60, 220),
    "green_triangle": (30, 170, 50),
    "yellow_star": (240, 220, 30),
    "purple_hexagon": (140, 40, 170),
    "orange_diamond": (250, 140, 20),
    "black_cross": (15, 15, 15),
    "white_heart": (245, 245, 245),
}


def _polygon(cx, cy, radii, angle):
    """Points of a polygon with vertex ``i`` at radius ``radii[i]``, evenly spaced in angle."""
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * i / n), cy + r * math.sin(angle + 2 * math.pi * i / n))
        for i, r in enumerate(radii)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, angle, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r] * 4, math.pi / 4 + angle * 0.25), fill=color)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r] * 3, -math.pi / 2 + angle), fill=color)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r, 0.42 * r] * 5, -math.pi / 2 + angle), fill=color)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, angle), fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.62 * r, cy), (cx, cy + r), (cx - 0.62 * r, cy)], fill=color)
    elif shape == "cross":
        t = 0.32 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=color)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=color)
    elif shape == "heart":
        h = 0.5 * r
        draw.ellipse([cx - 2 * h, cy - 0.9 * r, cx, cy - 0.9 * r + 2 * h], fill=color)
        draw.ellipse([cx, cy - 0.9 * r, cx + 2 * h, cy - 0.9 * r + 2 * h], fill=color)
        tip = [(cx - 0.97 * r, cy - 0.2 * r), (cx + 0.97 * r, cy - 0.2 * r), (cx, cy + r)]
        draw.polygon(tip, fill=color)
    else:  # pragma: no cover - CLASSES and this function are edited together
        raise ValueError(shape)


def _render(rng: np.random.Generator, size: int, shape: str, color) -> Image.Image:
    # Low-saturation mid-tone background with pixel noise: every class colour stands out on it.
    base = rng.integers(80, 176, size=3)
    noise = rng.normal(0.0, 18.0, size=(size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    r = float(rng.uniform(0.18, 0.36)) * size
    cx, cy = (float(rng.uniform(r, size - r)) for _ in range(2))
    angle = float(rng.uniform(-math.pi / 6, math.pi / 6))
    jitter = rng.integers(-20, 21, size=3)
    fill = tuple(int(v) for v in np.clip(np.array(color) + jitter, 0, 255))
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, angle, fill)
    return img


def _positive(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise VlpromptError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def make_synthetic_dataset(
    out_dir,
    n_train_per_class: int = 16,
    n_test_per_class: int = 20,
    image_size: int = 64,
    seed: int = 0,
) -> str:
    """Write the synthetic shapes dataset under ``out_dir`` and return its absolute path.

    Existing files with the same names are overwritten; nothing else in ``out_dir`` is touched.
    """
    n_train = _positive(n_train_per_class, "n_train_per_class")
    n_test = _positive(n_test_per_class, "n_test_per_class")
    size = _positive(image_size, "image_size", minimum=16)
    seed = _positive(seed, "seed", minimum=0)
    out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    rng = np.random.default_rng(seed)
    try:
        for split, n in (("train", n_train), ("test", n_test)):
            for name, color in CLASSES.items():
                folder = os.path.join(out_dir, split, name)
                os.makedirs(folder, exist_ok=True)
                shape = name.split("_", 1)[1]
                for i in range(n):
                    _render(rng, size, shape, color).save(os.path.join(folder, f"{i:04d}.png"))
    except OSError as e:
        raise VlpromptError(f"cannot write synthetic dataset to {out_dir}: {e}") from None
    return out_dir
