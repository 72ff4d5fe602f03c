"""Data layer: benchmark readers (CoOp layouts), user folders, few-shot sampling, transforms.

Typical use::

    ds = load_dataset("caltech101", root="~/data", shots=16, seed=1, subsample="base")
    ds.classnames, ds.train, ds.test, ds.template
"""

from .fewshot import fewshot_subset, sample_fewshot, subsample_classes
from .loader import check_dataset, load_dataset
from .readers import IMAGE_EXTENSIONS
from .registry import DATASETS, DatasetSpec, list_datasets
from .synthetic import make_synthetic_dataset
from .transforms import (CLIP_MEAN, CLIP_STD, ImageDataset, load_image, strong_transform, test_transform,
                         train_transform)
from .types import DatasetSplits, Datum

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "DatasetSpec",
    "DatasetSplits",
    "Datum",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "check_dataset",
    "fewshot_subset",
    "list_datasets",
    "load_dataset",
    "load_image",
    "make_synthetic_dataset",
    "sample_fewshot",
    "strong_transform",
    "subsample_classes",
    "test_transform",
    "train_transform",
]
