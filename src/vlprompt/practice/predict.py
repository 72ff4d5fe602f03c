"""``vlprompt predict``: the top-k classes of image files under a saved prompt, with probabilities.

Images are encoded exactly as ``vlprompt eval`` encodes a test split (`engine.features.encode_items` with the
test transform of the backbone) and scored by the learner's own logits with the class text features computed
once (per image for a conditional learner such as CoCoOp), the two branches of `engine.evaluate.classify`;
probabilities are the softmax of those logits (for a SigLIP backbone, with its logit bias, each class's sigmoid, as
that model scores classes). So the top-1 class of an image is the one ``eval`` counts.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from ..data.types import Datum
from ..engine.evaluate import class_logits, image_logits
from ..errors import VlpromptError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
FORMATS = ("table", "csv", "json")


def _images_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def collect_images(specs: Sequence[str]) -> list[str]:
    """Image paths from files, folders (recursively, by image extension) and glob patterns, in the order
    given (each folder and pattern sorted), without repeats; one error line for anything that names none."""
    out: list[str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = _images_in(path)
            if not found:
                raise VlpromptError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under folder {spec}")
        elif path.is_file():
            found = [str(path)]
        elif glob.has_magic(spec):
            found = []
            for match in sorted(glob.glob(os.path.expanduser(spec), recursive=True)):
                p = Path(match)
                if p.is_dir():
                    found.extend(_images_in(p))
                elif p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(match)
            if not found:
                raise VlpromptError(f"no image files match {spec}")
        else:
            raise VlpromptError(f"cannot read image {spec}: no such file or folder")
        out.extend(found)
    return list(dict.fromkeys(out))


def encode_paths(bb, paths: Sequence[str], batch_size: int = 100, progress: bool = True) -> torch.Tensor:
    """(N, d) raw image features of ``paths`` under the backbone's test transform (as ``vlprompt eval``); an
    unreadable image is one error line naming it."""
    from ..data.transforms import test_transform
    from ..engine.features import encode_items

    items = [Datum(str(p), 0, "") for p in paths]
    tf = test_transform(**bb.preprocess.test_args())
    feats, _ = encode_items(bb, items, tf, batch_size=batch_size, num_workers=0, desc="predicting",
                            progress=progress)
    return feats


@torch.no_grad()
def rank(learner, logits: torch.Tensor, paths: Sequence[str], top_k: int) -> list[dict]:
    """One record per image: its top-k classes, best first, with probabilities and logits. The probabilities are
    the softmax over the classes, or, for a model trained with a sigmoid loss and a logit bias (SigLIP), each class's
    own sigmoid, as that model scores them."""
    k = min(int(top_k), len(learner.classnames))
    sigmoid = getattr(learner.backbone, "logit_bias", None) is not None
    probs = torch.sigmoid(logits.double()) if sigmoid else torch.softmax(logits.double(), dim=-1)
    values, index = logits.topk(k, dim=-1)
    out = []
    for i, path in enumerate(paths):
        preds = []
        for r in range(k):
            c = int(index[i, r])
            logit = float(values[i, r])
            preds.append({"rank": r + 1, "class": learner.classnames[c], "index": c,
                          "probability": float(probs[i, c]), "logit": logit if math.isfinite(logit) else None})
        out.append({"image": str(path), "predictions": preds})
    return out


def predict(opened, images: Sequence[str], top_k: int = 5, batch_size: int = 100,
            progress: bool = True) -> list[dict]:
    """The top-k records (`rank`) of image files or folders or patterns under an `OpenedPrompt`."""
    if int(top_k) < 1:
        raise VlpromptError(f"--top-k: must be >= 1, got {top_k}")
    if int(batch_size) < 1:
        raise VlpromptError(f"--batch-size: must be >= 1, got {batch_size}")
    paths = collect_images(images)
    if opened.learner.from_pixels:  # prompted image tower: the images go through the learner itself
        items = [Datum(str(p), 0, "") for p in paths]
        logits, _ = image_logits(opened.learner, items, batch_size=batch_size, progress=progress, desc="predicting")
        return rank(opened.learner, logits, paths, top_k)
    feats = encode_paths(opened.backbone, paths, batch_size=batch_size, progress=progress)
    return rank(opened.learner, class_logits(opened.learner, feats), paths, top_k)


def render(records: list[dict], fmt: str, meta: dict) -> str:
    """``table`` (one line per image), ``csv`` (one row per image and rank) or ``json`` (``meta`` plus the
    records)."""
    if fmt == "json":
        return json.dumps({**meta, "images": records}, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "rank", "class", "index", "probability", "logit"])
        for rec in records:
            for p in rec["predictions"]:
                w.writerow([rec["image"], p["rank"], p["class"], p["index"], f"{p['probability']:.6f}",
                            "" if p["logit"] is None else f"{p['logit']:.6f}"])
        return buf.getvalue()
    if fmt != "table":
        raise VlpromptError(f"--format: '{fmt}' is not one of {list(FORMATS)}")
    k = max((len(r["predictions"]) for r in records), default=0)
    rows = [["image"] + [f"top-{r + 1} (p)" for r in range(k)]]
    for rec in records:
        rows.append([rec["image"]] + [f"{p['class']} ({p['probability']:.3f})" for p in rec["predictions"]])
    widths = [max(len(row[c]) for row in rows if c < len(row)) for c in range(k + 1)]
    lines = ["  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"
