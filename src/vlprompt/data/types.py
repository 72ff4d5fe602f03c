"""Plain records shared by every dataset reader.

``Datum`` mirrors Dassl's ``Datum`` (impath, label, classname) so that lists read here can be
compared item by item with what the CoOp code base produces. ``DatasetSplits`` is what
``load_dataset`` returns: the three lists after few-shot sampling and base/new subsampling, plus
the class names in label order and the zero-shot template.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Datum:
    """One labelled image. Frozen so that lists can be shared between splits safely."""

    path: str  # absolute path of the image file
    label: int
    classname: str  # exactly as stored (may contain underscores; replaced only in prompts)


@dataclass
class DatasetSplits:
    """A dataset ready for training/evaluation.

    ``classnames`` is ordered by label and built from ``train`` (Dassl's ``get_lab2cname``), or
    from ``test`` for test-only datasets such as ImageNet-V2/-Sketch/-A/-R.
    ``info`` holds: root (the dataset folder read), display_name, shots, seed, subsample,
    source (how the splits were obtained) and notes (a list of deviations worth reporting).
    """

    name: str
    classnames: list[str]
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    template: str
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)
