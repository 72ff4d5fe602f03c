"""``load_dataset`` and ``check_dataset``: registered benchmarks and user folders alike.

Order of operations follows CoOp exactly: read the full splits, few-shot sample train (and val,
except for ImageNet), then split base/new classes, then take the class names from train.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

from vlprompt.errors import VlpromptError

from .containment import ALLOW_ENV, OutsideEntry, outside_allowed, refusal
from .fewshot import check_seed, check_shots, check_subsample, sample_fewshot, subsample_classes
from .folder import read_folder_dataset
from .registry import DATASETS, PHOTO, resolve_dataset_dir
from .transforms import load_image
from .types import Datum, DatasetSplits


def _resolve(name_or_path, root):
    """Return (name, display_name, dataset_dir, raw splits, template, sample_val, image_dir)."""
    if isinstance(name_or_path, str) and name_or_path in DATASETS:
        spec = DATASETS[name_or_path]
        dataset_dir = resolve_dataset_dir(spec, root)
        raw = spec.read(dataset_dir)
        image_dir = os.path.join(dataset_dir, spec.image_root)
        return spec.name, spec.display_name, dataset_dir, raw, spec.template, spec.fewshot_val, image_dir
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise VlpromptError(f"dataset must be a registered name or a folder path, got {name_or_path!r}")
    path = os.path.expanduser(os.fspath(name_or_path))
    if not os.path.isdir(path) and root is not None:
        under_root = os.path.join(os.path.expanduser(os.fspath(root)), path)
        if os.path.isdir(under_root):
            path = under_root  # a user dataset folder named relative to the data root
    if not os.path.isdir(path):
        raise VlpromptError(
            f"unknown dataset {os.fspath(name_or_path)!r}: not a registered name "
            f"({', '.join(DATASETS)}) nor an existing folder"
        )
    path = os.path.abspath(path)
    for spec in DATASETS.values():
        # A benchmark folder passed as a path (e.g. ~/data/caltech-101) is read as the registered
        # benchmark: its split paths are relative to the benchmark's image root, not to the folder.
        # A released split file identifies it; otherwise the folder name plus its marker must match.
        marker = os.path.exists(os.path.join(path, spec.marker))
        if marker and (spec.split_json or os.path.basename(path) == spec.dir):
            raw = spec.read(path)
            raw.notes.append(f"{path} recognised as registered dataset {spec.name!r} by {spec.marker}")
            image_dir = os.path.join(path, spec.image_root)
            return spec.name, spec.display_name, path, raw, spec.template, spec.fewshot_val, image_dir
    raw = read_folder_dataset(path)
    return os.path.basename(path), os.path.basename(path), path, raw, PHOTO, True, None


def _classnames(name: str, train: list[Datum], val: list[Datum], test: list[Datum]) -> list[str]:
    """Dassl's ``get_lab2cname`` on train (on test for test-only datasets), plus sanity checks.

    Dassl silently picks one name if a label carries two and sizes the classifier by
    ``max(label) + 1``; both would break training quietly, so they are errors here.
    """
    names: dict[int, str] = {}
    for split, items in (("train", train), ("val", val), ("test", test)):
        for it in items:
            if names.setdefault(it.label, it.classname) != it.classname:
                raise VlpromptError(
                    f"{name}: label {it.label} has two class names, {names[it.label]!r} and "
                    f"{it.classname!r} ({split} item {it.path})"
                )
    source = train or test
    labels = sorted({it.label for it in source})
    if labels != list(range(len(labels))):
        missing = sorted(set(range(max(labels) + 1)) - set(labels))[:5]
        raise VlpromptError(
            f"{name}: labels must be 0..n-1 but no {'training' if train else 'test'} image has "
            f"label {', '.join(map(str, missing))}; every class needs at least one image"
        )
    for split, items in (("val", val), ("test", test)):
        for it in items:
            if it.label >= len(labels):
                raise VlpromptError(
                    f"{name}: class {it.classname!r} (label {it.label}) appears in {split} but has no "
                    f"training images ({it.path})"
                )
    return [names[y] for y in labels]


def load_dataset(
    name_or_path,
    root=None,
    shots: int = -1,
    seed: int = 1,
    subsample: str = "all",
    template: str | None = None,
    check_files: bool = True,
    allow_outside_root: bool = False,
) -> DatasetSplits:
    """Load a registered benchmark (``root`` = data root or its dataset folder) or a user folder.

    ``shots < 1`` keeps every image. ``check_files`` stats every image of the final lists (no
    decoding) and raises one error with the number missing and the first missing path.
    A split file or CSV entry whose path leaves the dataset folder is refused as soon as the lists
    are read, before any image is touched, unless ``allow_outside_root`` or the environment variable
    ``VLPROMPT_ALLOW_OUTSIDE_ROOT=1`` allows it (see ``containment``).
    """
    ds, _ = _load(name_or_path, root, shots, seed, subsample, template, check_files, allow_outside_root,
                  refuse_outside=True)
    return ds


def _load(name_or_path, root, shots, seed, subsample, template, check_files, allow_outside_root,
          refuse_outside: bool) -> tuple[DatasetSplits, list[OutsideEntry]]:
    """``load_dataset``, also returning the entries outside the dataset folder that were not allowed
    (always empty when ``refuse_outside``: the first one raises)."""
    shots, seed, subsample = check_shots(shots), check_seed(seed), check_subsample(subsample)
    if template is not None:
        from vlprompt.prompts.templates import check_template  # lazy: vlprompt.prompts imports torch models

        check_template(template)
    name, display, dataset_dir, raw, default_template, sample_val, image_dir = _resolve(name_or_path, root)
    outside = list(raw.outside)
    notes = list(raw.notes)
    if outside and outside_allowed(allow_outside_root):
        notes.append(f"{len(outside)} listed image path(s) lie outside the dataset folder ({ALLOW_ENV} or "
                     "allow_outside_root allowed them)")
        outside = []
    if outside and refuse_outside:
        raise VlpromptError(refusal(name, outside))
    if not (raw.train or raw.val or raw.test):
        raise VlpromptError(f"{name}: no images listed in {dataset_dir}")
    if check_files and image_dir is not None and not os.path.isdir(image_dir):
        raise VlpromptError(f"image folder not found: {image_dir}; unpack the {display} images there")

    train, val = sample_fewshot(raw.train, raw.val, shots, seed, sample_val=sample_val)
    test = list(raw.test)
    train, val, test = subsample_classes(train, val, test, subsample)
    classnames = _classnames(name, train, val, test)
    short = _short_classes(train, shots)
    if short:
        fewest = min(short.values())
        note = (f"shots={shots}: {len(short)} of {len(classnames)} classes have fewer training images (fewest: "
                f"{fewest}, class {classnames[min(short, key=short.get)]!r}); they train on all they have")
        warnings.warn(f"{name}: {note}")
        notes.append(note)

    if check_files:
        # ImageNet's val is its test list: stat those 50k files once, not twice.
        lists = (train, test) if val == test else (train, val, test)
        missing = [it.path for items in lists for it in items if not os.path.exists(it.path)]
        if missing:
            raise VlpromptError(
                f"{name}: {len(missing)} listed image file(s) missing, first: {missing[0]}; "
                "check the data root and the dataset layout"
            )
    info = {
        "root": dataset_dir,
        "display_name": display,
        "shots": shots,
        "seed": seed,
        "subsample": subsample,
        "source": raw.source,
        "notes": notes,
        "classes_short_of_shots": len(short),
    }
    return DatasetSplits(name, classnames, train, val, test, template or default_template, info), outside


def _short_classes(train, shots: int) -> dict[int, int]:
    """Label -> number of training images, for the classes with fewer than ``shots`` (none when all are used)."""
    if shots < 1:
        return {}
    counts: dict[int, int] = {}
    for item in train:
        counts[item.label] = counts.get(item.label, 0) + 1
    return {label: n for label, n in counts.items() if n < shots}


FIRST_FEW = 5


def check_dataset(name_or_path, root=None, decode: bool = True, allow_outside_root: bool = False) -> dict:
    """Audit a dataset: counts, class count, entries outside the dataset folder, missing files and
    (if ``decode``) undecodable images.

    Used by ``vlprompt datasets NAME --root R``. Loads the full splits without few-shot sampling;
    each distinct image inside the dataset folder is stat-ed, and with ``decode`` fully decoded with
    PIL. Entries outside the folder are listed from the list files alone, never stat-ed or opened,
    so the report does not reveal whether such a file exists (unless outside paths are allowed,
    when they are checked like the others).
    """
    ds, outside = _load(name_or_path, root, -1, 1, "all", None, False, allow_outside_root, refuse_outside=False)
    skipped = {entry.path for entry in outside}
    listed = dict.fromkeys(it.path for items in (ds.train, ds.val, ds.test) for it in items)
    paths = [p for p in listed if p not in skipped]
    missing = [p for p in paths if not os.path.isfile(p)]
    unreadable: list[str] = []
    problems: list[str] = []
    if decode:
        missing_set = set(missing)

        def _try(p):
            try:
                load_image(p)
                return None
            except VlpromptError as e:
                return str(e)

        present = [p for p in paths if p not in missing_set]
        # PIL releases the GIL while decoding, so threads help; batches bound the number of
        # pending futures for million-image datasets.
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
            for start in range(0, len(present), 1024):
                batch = present[start:start + 1024]
                for p, err in zip(batch, pool.map(_try, batch)):
                    if err is not None:
                        unreadable.append(p)
                        problems.append(err)
    return {
        "name": ds.name,
        "display_name": ds.info["display_name"],
        "root": ds.info["root"],
        "source": ds.info["source"],
        "num_classes": ds.num_classes,
        "classnames": ds.classnames,
        "counts": {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test)},
        "num_files": len(listed),
        # Listed from the split file / CSV alone: neither stat-ed nor opened.
        "outside": len(outside),
        "outside_first": [entry.message for entry in outside[:FIRST_FEW]],
        # Counts and the first few: a split whose images are absent lists thousands of them.
        "missing": len(missing),
        "missing_first": missing[:FIRST_FEW],
        "unreadable": len(unreadable),
        "unreadable_first": problems[:FIRST_FEW],
        "notes": ds.info["notes"],
        "ok": not outside and not missing and not unreadable,
    }
