"""The 15 benchmark datasets of CoOp / CoCoOp (CoOp's DATASETS.md layout), as one explicit table.

Importing this module has no side effects: ``DATASETS`` is a plain dict built from literals.
Each entry says where the data lives under the data root and how the splits are read: a released
CoOp split JSON for most datasets, a reader function for FGVC-Aircraft and the ImageNet family.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from vlprompt.errors import VlpromptError

from . import readers
from .readers import RawSplits

PHOTO = "a photo of a {}."


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # registry key used on the command line, e.g. "caltech101"
    display_name: str  # CoOp's DATASET.NAME, e.g. "Caltech101"
    dir: str  # folder under the data root, e.g. "caltech-101"
    image_root: str  # folder (relative to ``dir``) that split paths are relative to; "" = ``dir``
    template: str  # hand-crafted zero-shot template (CoOp's CUSTOM_TEMPLATES)
    split_json: Optional[str] = None  # released CoOp split file inside ``dir``
    reader: Optional[Callable[[str], RawSplits]] = None  # used when there is no split JSON
    fewshot_val: bool = True  # False for ImageNet: its val list is its test set
    test_only: bool = False  # ImageNet-V2/-Sketch/-A/-R

    @property
    def marker(self) -> str:
        """A path (relative to ``dir``) whose presence identifies the dataset folder itself."""
        if self.split_json:
            return self.split_json
        return self.image_root or "variants.txt"

    def read(self, dataset_dir: str) -> RawSplits:
        if self.reader is not None:
            return self.reader(dataset_dir)
        json_path = os.path.join(dataset_dir, self.split_json)
        if not os.path.isfile(json_path):
            # The split defines the benchmark; regenerating it would give different subsets.
            raise VlpromptError(
                f"split file not found: {json_path}; download CoOp's released {self.split_json} "
                "(see CoOp's DATASETS.md) and put it there"
            )
        return readers.read_split_json(json_path, os.path.join(dataset_dir, self.image_root))


def _json(name, display, dir_, image_root, template) -> DatasetSpec:
    return DatasetSpec(name, display, dir_, image_root, template, split_json=f"split_zhou_{display}.json")


DATASETS: dict[str, DatasetSpec] = {
    "caltech101": _json("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", PHOTO),
    "oxford_pets": _json(
        "oxford_pets", "OxfordPets", "oxford_pets", "images", "a photo of a {}, a type of pet."
    ),
    "stanford_cars": _json("stanford_cars", "StanfordCars", "stanford_cars", "", PHOTO),
    "oxford_flowers": _json(
        "oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "a photo of a {}, a type of flower."
    ),
    "food101": _json("food101", "Food101", "food-101", "images", "a photo of {}, a type of food."),
    "fgvc_aircraft": DatasetSpec(
        "fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images",
        "a photo of a {}, a type of aircraft.", reader=readers.read_fgvc_aircraft,
    ),
    "sun397": _json("sun397", "SUN397", "sun397", "SUN397", PHOTO),
    "dtd": _json("dtd", "DescribableTextures", "dtd", "images", "{} texture."),
    "eurosat": _json("eurosat", "EuroSAT", "eurosat", "2750", "a centered satellite photo of {}."),
    "ucf101": _json("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "a photo of a person doing {}."),
    "imagenet": DatasetSpec(
        "imagenet", "ImageNet", "imagenet", "images", PHOTO,
        reader=readers.read_imagenet, fewshot_val=False,
    ),
    "imagenet_v2": DatasetSpec(
        "imagenet_v2", "ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val", PHOTO,
        reader=readers.read_imagenet_v2, fewshot_val=False, test_only=True,
    ),
    "imagenet_sketch": DatasetSpec(
        "imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "images", PHOTO,
        reader=readers.read_imagenet_sketch, fewshot_val=False, test_only=True,
    ),
    "imagenet_a": DatasetSpec(
        "imagenet_a", "ImageNetA", "imagenet-adversarial", "imagenet-a", PHOTO,
        reader=readers.read_imagenet_a, fewshot_val=False, test_only=True,
    ),
    "imagenet_r": DatasetSpec(
        "imagenet_r", "ImageNetR", "imagenet-rendition", "imagenet-r", PHOTO,
        reader=readers.read_imagenet_r, fewshot_val=False, test_only=True,
    ),
}


def list_datasets() -> list[str]:
    """Registered dataset names, in the table's order."""
    return list(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise VlpromptError(
            f"unknown dataset {name!r}; registered names: {', '.join(DATASETS)}"
        ) from None


def resolve_dataset_dir(spec: DatasetSpec, root: str) -> str:
    """Accept either the data root holding ``spec.dir`` or that dataset folder itself."""
    if root is None:
        raise VlpromptError(
            f"dataset {spec.name!r} needs a data root (the folder that holds {spec.dir}/); pass root="
        )
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise VlpromptError(f"data root not found: {root}; pass the folder that holds {spec.dir}/")
    nested = os.path.join(root, spec.dir)
    if os.path.isdir(nested):
        return nested
    if os.path.basename(root) == spec.dir or os.path.exists(os.path.join(root, spec.marker)):
        return root
    raise VlpromptError(
        f"dataset folder not found: {nested} (and {root} itself has no {spec.marker}); "
        f"pass the folder that holds {spec.dir}/ or the {spec.dir} folder itself"
    )
