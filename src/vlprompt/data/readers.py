"""Readers that turn files on disk into train/val/test lists of ``Datum``, following CoOp.

Nothing here opens or decodes an image: listing is done with ``os.scandir`` and split files only.
Every malformed or missing input raises ``VlpromptError`` with one line naming the file. Paths read
from list files that leave the dataset folder are not refused here but returned in
``RawSplits.outside`` (see ``containment``): the loader refuses them, the dataset check lists them.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

from vlprompt.errors import VlpromptError

from .containment import OutsideEntry, brief, check_path_text, folder_prefix, leaves_folder, outside_message
from .types import Datum

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class RawSplits(NamedTuple):
    """What a reader returns before few-shot sampling."""

    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    source: str  # how the lists were obtained, stored in DatasetSplits.info["source"]
    notes: list[str]  # deviations from the reference code worth reporting
    outside: tuple = ()  # OutsideEntry for each listed path that leaves the dataset folder


# --------------------------------------------------------------------------------------------
# Directory listing helpers
# --------------------------------------------------------------------------------------------


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def require_dir(path: str, what: str, hint: str = "") -> None:
    if not os.path.isdir(path):
        raise VlpromptError(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))


def require_file(path: str, what: str, hint: str = "") -> None:
    if not os.path.isfile(path):
        raise VlpromptError(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))


def list_subdirs(path: str) -> list[str]:
    """Sorted (case-sensitive, like Python's ``sorted``) non-hidden sub-folder names."""
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise VlpromptError(f"cannot list folder {path}: {e.strerror or e}") from None


def list_images(folder: str, *, allow_empty: bool = False) -> list[str]:
    """Sorted image file names in ``folder`` (no decoding; hidden files and non-images skipped).

    Sorting makes listings independent of the file system; CoOp's ImageNet readers use an
    unsorted ``os.listdir`` instead (recorded as a note by those readers).
    """
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if is_image_name(e.name) and e.is_file())
    except OSError as e:
        raise VlpromptError(f"cannot list folder {folder}: {e.strerror or e}") from None
    if not names and not allow_empty:
        raise VlpromptError(
            f"class folder {folder} holds no images ({'/'.join(IMAGE_EXTENSIONS)}); "
            "add images or remove the folder"
        )
    return names


def read_text_lines(path: str, what: str) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise VlpromptError(f"cannot read {what} {path}: {e}") from None


# --------------------------------------------------------------------------------------------
# CoOp split JSON: {"train"|"val"|"test": [[relative path, label, class name], ...]}
# --------------------------------------------------------------------------------------------


def read_split_json(json_path: str, image_root: str, required=("train", "val", "test")) -> RawSplits:
    """CoOp's ``read_split``: ``{"train": [[rel_path, label, classname], ...], ...}``.

    ``rel_path`` is joined onto ``image_root`` and must stay inside it (see ``containment``; entries
    that leave it are returned in ``outside``); the label is the stored int and the class name is
    kept exactly as stored. Splits not in ``required`` may be absent (they become empty lists).
    """
    data = _read_json(json_path)
    prefix = folder_prefix(image_root)
    lists: dict[str, list[Datum]] = {}
    outside: list[OutsideEntry] = []
    for split in ("train", "val", "test"):
        if split not in data:
            if split in required:
                raise VlpromptError(f"split file {json_path} has no '{split}' list")
            lists[split] = []
            continue
        entries = data[split]
        if not isinstance(entries, list):
            raise VlpromptError(
                f"split file {json_path}: '{split}' must be a list, got {type(entries).__name__}"
            )
        items = []
        for i, entry in enumerate(entries):
            where = f"split file {json_path}: {split}[{i}]"
            rel, label, classname = _split_entry(where, entry)
            # Plain concatenation equals os.path.join for relative paths and is ~5x faster,
            # which matters for 100k-entry split files.
            path = prefix + rel
            if leaves_folder(prefix, rel):
                path = os.path.normpath(os.path.join(prefix, rel))
                outside.append(OutsideEntry(outside_message(where, rel, prefix), path))
            items.append(Datum(path, label, classname))
        lists[split] = items
    return RawSplits(lists["train"], lists["val"], lists["test"], "split_json", [], tuple(outside))


def _read_json(json_path: str) -> dict:
    require_file(json_path, "split file")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlpromptError(f"split file {json_path} is not valid JSON: {e}") from None
    except RecursionError:
        raise VlpromptError(f"split file {json_path} is nested too deeply to be a split file") from None
    except OSError as e:
        raise VlpromptError(f"cannot read split file {json_path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise VlpromptError(
            f"split file {json_path} must hold an object with keys train/val/test, "
            f"got {type(data).__name__}"
        )
    return data


def control_char(text: str):
    """The first control character (NUL, newline, ...) in a class name, or None: such a name comes from a
    damaged or binary file and would end up in prompts, tables and record keys."""
    return next((c for c in text if ord(c) < 32 or ord(c) == 127), None)


def _split_entry(where: str, entry) -> tuple[str, int, str]:
    """``[relative_path, label, classname]`` with each value of the right type, else one line naming it."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        raise VlpromptError(f"{where} = {brief(entry)} is not [relative_path, label >= 0, classname]")
    rel, label, classname = entry
    check_path_text(where, rel)
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        problem = f"label must be an integer >= 0, got {brief(label)}"
    elif not isinstance(classname, str) or not classname.strip():
        problem = f"class name must be a non-empty string, got {brief(classname)}"
    elif control_char(classname):
        problem = f"class name holds the control character {control_char(classname)!r}"
    else:
        problem = None
    if problem:
        raise VlpromptError(f"{where} = {brief(entry)}: {problem}")
    return rel, label, classname


# --------------------------------------------------------------------------------------------
# ImageNet-family class names
# --------------------------------------------------------------------------------------------


def read_classnames_txt(path: str) -> dict[str, str]:
    """``classnames.txt``: one ``<wnid> <class name with spaces>`` per line, in file order."""
    names: dict[str, str] = {}
    for n, line in enumerate(read_text_lines(path, "class-name file"), 1):
        wnid, _, name = line.partition(" ")
        if not name.strip():
            raise VlpromptError(f"{path}:{n}: expected '<wnid> <class name>', got {line!r}")
        if wnid in names:  # would silently shift ImageNetV2's line-index labels
            raise VlpromptError(f"{path}:{n}: wnid {wnid} is listed twice")
        names[wnid] = name.strip()
    return names


def _classnames_file(dataset_dir: str) -> str:
    """A variant's own ``classnames.txt``, else the shared ``<data root>/imagenet/classnames.txt``."""
    own = os.path.join(dataset_dir, "classnames.txt")
    shared = os.path.join(os.path.dirname(os.path.abspath(dataset_dir)), "imagenet", "classnames.txt")
    for path in (own, shared):
        if os.path.isfile(path):
            return path
    raise VlpromptError(
        f"class-name file not found: tried {own} and {shared}; copy CoOp's ImageNet "
        "classnames.txt ('<wnid> <name>' per line) to one of them"
    )


def _read_wnid_folders(split_dir: str, classnames: dict[str, str], names_file: str) -> list[Datum]:
    """Label = index of the wnid folder in the sorted folder list; name from classnames.txt."""
    require_dir(split_dir, "image folder")
    folders = list_subdirs(split_dir)
    if not folders:
        raise VlpromptError(f"image folder {split_dir} has no class sub-folders")
    items = []
    for label, wnid in enumerate(folders):
        if wnid not in classnames:
            raise VlpromptError(
                f"class folder {os.path.join(split_dir, wnid)} has no line in {names_file}"
            )
        folder = os.path.join(split_dir, wnid)
        items.extend(Datum(os.path.join(folder, f), label, classnames[wnid]) for f in list_images(folder))
    return items


_SORTED_NOTE = (
    "image files within each class folder are sorted by name (CoOp uses an unsorted os.listdir, "
    "so its ImageNet few-shot subsets depend on the file system)"
)


def read_imagenet(dataset_dir: str) -> RawSplits:
    """ImageNet: train from images/train, test = val = images/val (CoOp evaluates on val)."""
    names_file = os.path.join(dataset_dir, "classnames.txt")
    classnames = read_classnames_txt(names_file)
    train_dir = os.path.join(dataset_dir, "images", "train")
    val_dir = os.path.join(dataset_dir, "images", "val")
    train = _read_wnid_folders(train_dir, classnames, names_file)
    test = _read_wnid_folders(val_dir, classnames, names_file)
    # CoOp labels each split by its own sorted listing; that is only consistent if both splits
    # have the same folders, so insist on it instead of silently mislabelling.
    if list_subdirs(train_dir) != list_subdirs(val_dir):
        raise VlpromptError(
            f"class folders of {train_dir} and {val_dir} differ; both need the same wnid folders"
        )
    notes = [_SORTED_NOTE, "val is the test set (images/val), as in CoOp"]
    return RawSplits(train, test, test, "folders", notes)


def read_imagenet_v2(dataset_dir: str) -> RawSplits:
    """ImageNetV2 matched-frequency: folder k <-> label k <-> k-th line of classnames.txt."""
    names_file = _classnames_file(dataset_dir)
    classnames = read_classnames_txt(names_file)
    image_dir = os.path.join(dataset_dir, "imagenetv2-matched-frequency-format-val")
    require_dir(image_dir, "image folder")
    test = []
    for label, name in enumerate(classnames.values()):
        folder = os.path.join(image_dir, str(label))
        require_dir(folder, "class folder", f"ImageNetV2 needs folders 0..{len(classnames) - 1}")
        test.extend(Datum(os.path.join(folder, f), label, name) for f in list_images(folder))
    return RawSplits([], [], test, "folders", [_SORTED_NOTE, "test-only dataset"])


def _wnid_test_only(image_subdir: str):
    """Sketch / -A / -R: label = index in the sorted folder list of that dataset."""

    def reader(dataset_dir: str) -> RawSplits:
        names_file = _classnames_file(dataset_dir)
        classnames = read_classnames_txt(names_file)
        test = _read_wnid_folders(os.path.join(dataset_dir, image_subdir), classnames, names_file)
        return RawSplits([], [], test, "folders", [_SORTED_NOTE, "test-only dataset"])

    reader.__name__ = f"read_wnid_folders_{image_subdir.replace('/', '_').replace('-', '_')}"
    return reader


read_imagenet_sketch = _wnid_test_only("images")
read_imagenet_a = _wnid_test_only("imagenet-a")  # README.txt there is a file, so it is skipped
read_imagenet_r = _wnid_test_only("imagenet-r")


# --------------------------------------------------------------------------------------------
# FGVC-Aircraft (no JSON in CoOp)
# --------------------------------------------------------------------------------------------


def read_fgvc_aircraft(dataset_dir: str) -> RawSplits:
    """Lines ``<imname> <variant words...>``; path images/<imname>.jpg; label = line in variants.txt."""
    variants_file = os.path.join(dataset_dir, "variants.txt")
    variants = read_text_lines(variants_file, "FGVC variants file")
    cname2lab = {name: i for i, name in enumerate(variants)}
    image_dir = os.path.join(os.path.abspath(dataset_dir), "images")
    prefix = folder_prefix(image_dir)
    splits = {}
    outside: list[OutsideEntry] = []
    for split in ("train", "val", "test"):
        path = os.path.join(dataset_dir, f"images_variant_{split}.txt")
        items = []
        for n, line in enumerate(read_text_lines(path, "FGVC split file"), 1):
            parts = line.split(" ")  # CoOp: imname, then the variant words re-joined by spaces
            classname = " ".join(parts[1:])
            if classname not in cname2lab:
                raise VlpromptError(f"{path}:{n}: variant {classname!r} is not listed in {variants_file}")
            rel = parts[0] + ".jpg"
            check_path_text(f"{path}:{n}", rel)
            image = os.path.join(image_dir, rel)
            if leaves_folder(prefix, rel):
                image = os.path.normpath(image)
                outside.append(OutsideEntry(outside_message(f"{path}:{n}", rel, prefix), image))
            items.append(Datum(image, cname2lab[classname], classname))
        splits[split] = items
    return RawSplits(splits["train"], splits["val"], splits["test"], "fgvc_variant_txt", [], tuple(outside))
