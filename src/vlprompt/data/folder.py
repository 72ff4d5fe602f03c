"""A user's own dataset from a folder, with no code to write.

The layout is detected in this order (the first that matches wins):

(a) a CSV file: ``<root>/split.csv``, or the only ``*.csv`` in root, with header columns
    ``path``, ``split`` (train/val/test) and ``label`` and/or ``classname``; paths are relative
    to the CSV's folder and must stay inside it (see ``containment``);
(b) a CoOp-format split JSON: ``<root>/split.json``, or the only ``split_*.json``, with paths
    relative to root (and inside it);
(c) ``train/`` and ``test/`` (and optionally ``val/``) folders, each holding class folders;
(d) class folders only: a deterministic per-class 50/20/30 train/val/test split is made, in the
    way CoOp created its split files (shuffle each class's files, cut by rounded fractions).

Class names are sorted folder names (Python's case-sensitive sort) and label = index. Listing
never opens an image.
"""

from __future__ import annotations

import csv
import glob
import os
import random

from vlprompt.errors import VlpromptError

from .containment import OutsideEntry, brief, check_path_text, folder_prefix, leaves_folder, outside_message
from .readers import RawSplits, control_char, list_images, list_subdirs, read_split_json
from .types import Datum

SPLITS = ("train", "val", "test")
AUTO_SPLIT = (0.5, 0.2)  # train, val fractions; test gets the rest (CoOp's read_and_split_data)
AUTO_SPLIT_SEED = 0


def read_folder_dataset(root: str) -> RawSplits:
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise VlpromptError(f"dataset folder not found: {root}")
    csv_path = _pick_one(root, "split.csv", "*.csv", "CSV file")
    if csv_path:
        return _read_csv(csv_path)
    json_path = _pick_one(root, "split.json", "split_*.json", "split JSON")
    if json_path:
        return read_split_json(json_path, root, required=("train", "test"))
    has_train, has_test = (os.path.isdir(os.path.join(root, d)) for d in ("train", "test"))
    if has_train or has_test:
        if not (has_train and has_test):
            missing = "test" if has_train else "train"
            raise VlpromptError(
                f"{root} has a {'train' if has_train else 'test'}/ folder but no {missing}/ folder; "
                "add it, or put class folders directly in the dataset folder for an automatic split"
            )
        return _read_split_folders(root)
    return _auto_split(root)


def _pick_one(root: str, preferred: str, pattern: str, what: str) -> str | None:
    """``root/preferred`` if present, else the single match of ``pattern``; None if none."""
    if os.path.isfile(os.path.join(root, preferred)):
        return os.path.join(root, preferred)
    found = sorted(
        p for p in glob.glob(os.path.join(glob.escape(root), pattern))
        if os.path.isfile(p) and not os.path.basename(p).startswith(".")
    )
    if len(found) > 1:
        names = ", ".join(os.path.basename(p) for p in found)
        raise VlpromptError(f"{root} holds several {what}s ({names}); name the one to use {preferred}")
    return found[0] if found else None


# --------------------------------------------------------------------------------------------
# (a) CSV
# --------------------------------------------------------------------------------------------


def _read_csv(path: str) -> RawSplits:
    base = os.path.dirname(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise VlpromptError(f"cannot read CSV file {path}: {e}") from None
    col = {name: i for i, name in enumerate(header)}
    duplicated = sorted({h for h in header if h and header.count(h) > 1})
    if duplicated:
        raise VlpromptError(f"CSV file {path}: column {duplicated[0]!r} appears more than once in the header")
    if "path" not in col or "split" not in col or not ({"label", "classname"} & col.keys()):
        raise VlpromptError(
            f"CSV file {path} needs header columns path,split and label and/or classname; "
            f"found {','.join(header) or 'no header'}"
        )
    prefix = folder_prefix(base)
    outside: list[OutsideEntry] = []
    parsed = []  # (split, abs path, label or None, classname or None, line number)
    for line, row in rows:
        if len(row) != len(header):
            raise VlpromptError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}: {brief(row)}")
        rel = row[col["path"]].strip()
        split = row[col["split"]].strip().lower()
        if not rel:
            raise VlpromptError(f"{path}:{line}: empty path")
        check_path_text(f"{path}:{line}", rel)
        if split not in SPLITS:
            raise VlpromptError(
                f"{path}:{line}: split must be train, val or test, got {row[col['split']]!r}"
            )
        label = name = None
        if "label" in col:
            text = row[col["label"]].strip()
            if not (text.isascii() and text.isdigit()):  # ASCII digits only ("²" is a digit to isdigit)
                raise VlpromptError(f"{path}:{line}: label must be an integer >= 0, got {text!r}")
            label = int(text)
        if "classname" in col:
            name = row[col["classname"]].strip()
            if not name:
                raise VlpromptError(f"{path}:{line}: empty classname")
            if control_char(name):
                raise VlpromptError(f"{path}:{line}: classname holds the control character {control_char(name)!r}")
        image = os.path.normpath(os.path.join(base, rel))
        if leaves_folder(prefix, rel):
            outside.append(OutsideEntry(outside_message(f"{path}:{line}", rel, prefix), image))
        parsed.append((split, image, label, name, line))

    notes = []
    if "label" not in col:
        # Only names: labels are positions in the sorted list of names.
        index = {n: i for i, n in enumerate(sorted({p[3] for p in parsed}))}
        parsed = [(s, p, index[n], n, ln) for s, p, _, n, ln in parsed]
    else:
        if "classname" in col:
            _check_one_to_one(path, parsed)
        else:
            parsed = [(s, p, y, str(y), ln) for s, p, y, _, ln in parsed]
        labels = sorted({p[2] for p in parsed})
        if labels != list(range(len(labels))):
            # Models need labels 0..n-1; keep the stored names, compact the numbers in order.
            remap = {y: i for i, y in enumerate(labels)}
            parsed = [(s, p, remap[y], n, ln) for s, p, y, n, ln in parsed]
            notes.append(f"labels in {os.path.basename(path)} were not 0..n-1; renumbered in sorted order")
    out = {s: [] for s in SPLITS}
    for split, p, y, n, _ in parsed:
        out[split].append(Datum(p, y, n))
    return RawSplits(out["train"], out["val"], out["test"], "csv", notes, tuple(outside))


def _check_one_to_one(path: str, parsed) -> None:
    by_label, by_name = {}, {}
    for _, _, y, n, line in parsed:
        if by_label.setdefault(y, n) != n:
            raise VlpromptError(f"{path}:{line}: label {y} is used for both {by_label[y]!r} and {n!r}")
        if by_name.setdefault(n, y) != y:
            raise VlpromptError(f"{path}:{line}: class {n!r} has both label {by_name[n]} and {y}")


# --------------------------------------------------------------------------------------------
# (c) train/ val/ test/ folders and (d) class folders only
# --------------------------------------------------------------------------------------------


def _class_folders(folder: str) -> list[str]:
    classes = list_subdirs(folder)
    if not classes:
        raise VlpromptError(
            f"{folder} has no class sub-folders; expected one folder of images per class"
        )
    return classes


def _read_split_folders(root: str) -> RawSplits:
    classes = _class_folders(os.path.join(root, "train"))
    label_of = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in SPLITS:
        split_dir = os.path.join(root, split)
        if split == "val" and not os.path.isdir(split_dir):
            out[split] = []
            continue
        items = []
        for c in _class_folders(split_dir):
            if c not in label_of:
                raise VlpromptError(
                    f"class folder {os.path.join(split_dir, c)} has no counterpart in "
                    f"{os.path.join(root, 'train')}; every class needs training images"
                )
            folder = os.path.join(split_dir, c)
            items.extend(Datum(os.path.join(folder, f), label_of[c], c) for f in list_images(folder))
        out[split] = items
    return RawSplits(out["train"], out["val"], out["test"], "folders", [])


def _auto_split(root: str) -> RawSplits:
    classes = list_subdirs(root)
    if not classes:
        raise VlpromptError(
            f"no dataset found in {root}: expected split.csv, split.json, train/ and test/ "
            "folders, or one folder of images per class"
        )
    rng = random.Random(AUTO_SPLIT_SEED)  # one stream over classes in order, as CoOp did
    p_train, p_val = AUTO_SPLIT
    out = {s: [] for s in SPLITS}
    no_test = []
    for label, c in enumerate(classes):
        folder = os.path.join(root, c)
        files = [os.path.join(folder, f) for f in list_images(folder)]
        rng.shuffle(files)
        n = len(files)
        n_train = max(1, round(n * p_train))
        n_val = min(round(n * p_val), n - n_train)
        if n - n_train - n_val < 1 and n_val > 0:
            n_val -= 1  # tiny classes: keep at least one test image before any val image
        if n - n_train - n_val < 1:
            no_test.append(c)
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
        for split, (a, b) in bounds.items():
            out[split].extend(Datum(p, label, c) for p in files[a:b])
    notes = [
        "no split file or train/test folders: made a deterministic per-class 50/20/30 "
        f"train/val/test split (sorted file names shuffled with random.Random({AUTO_SPLIT_SEED}))"
    ]
    if no_test:
        notes.append(f"classes with too few images for a test image: {', '.join(no_test)}")
    return RawSplits(out["train"], out["val"], out["test"], "auto_split", notes)
