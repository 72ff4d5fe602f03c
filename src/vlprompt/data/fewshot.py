"""Few-shot sampling and base/new class splitting, exactly as in the CoOp / CoCoOp code base.

CoOp seeds Python's global ``random`` with the run seed and then calls Dassl's
``generate_fewshot_dataset`` on train and then on val, with no other ``random`` call in between.
We use a private ``random.Random(seed)`` instead of the global one: it produces the same stream,
so the subsets are identical (same images, same order) without touching global state.
"""

from __future__ import annotations

import math
import operator
import random
from dataclasses import replace
from typing import Sequence

from vlprompt.errors import VlpromptError

from .types import Datum

SUBSAMPLE_CHOICES = ("all", "base", "new")


def _as_int(value, what: str) -> int:
    """Accept real integers only (not bools, floats or strings), so a typo fails loudly."""
    if isinstance(value, bool):
        raise VlpromptError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise VlpromptError(
            f"{what} must be an integer, got {value!r} ({type(value).__name__})"
        ) from None


def check_shots(shots) -> int:
    """Validate a shot count; any value < 1 means "use all images"."""
    return _as_int(shots, "shots")


def check_seed(seed) -> int:
    seed = _as_int(seed, "seed")
    if seed < 0:
        # Dassl skips seeding for negative seeds, which makes sampling irreproducible.
        raise VlpromptError(f"seed must be >= 0, got {seed}")
    return seed


def check_subsample(subsample) -> str:
    if subsample not in SUBSAMPLE_CHOICES:
        raise VlpromptError(
            f"subsample must be one of {', '.join(SUBSAMPLE_CHOICES)}; got {subsample!r}"
        )
    return subsample


def fewshot_subset(items: Sequence[Datum], k: int, rng: random.Random) -> list[Datum]:
    """Dassl's ``generate_fewshot_dataset`` for one list (``repeat=False``).

    Items are grouped by label in order of first appearance (a ``defaultdict`` in Dassl); each
    group gives ``rng.sample(group, k)`` if it has at least ``k`` items, else the whole group in
    its original order. ``k < 1`` returns the list unchanged.
    """
    if k < 1:
        return list(items)
    groups: dict[int, list[Datum]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    out: list[Datum] = []
    for group in groups.values():
        out.extend(rng.sample(group, k) if len(group) >= k else group)
    return out


def sample_fewshot(
    train: Sequence[Datum],
    val: Sequence[Datum],
    shots: int,
    seed: int,
    sample_val: bool = True,
) -> tuple[list[Datum], list[Datum]]:
    """CoOp's few-shot step: ``shots`` per class from train, then ``min(shots, 4)`` from val.

    Both draws use one RNG stream seeded with ``seed``, as ``random.seed(seed)`` followed by two
    ``generate_fewshot_dataset`` calls does. ``sample_val=False`` is for ImageNet, whose val list
    is its test set and must stay whole. ``shots < 1`` means "all images".
    """
    shots = check_shots(shots)
    seed = check_seed(seed)
    if shots < 1:
        return list(train), list(val)
    rng = random.Random(seed)
    new_train = fewshot_subset(train, shots, rng)
    new_val = fewshot_subset(val, min(shots, 4), rng) if sample_val else list(val)
    return new_train, new_val


def subsample_classes(
    train: Sequence[Datum],
    val: Sequence[Datum],
    test: Sequence[Datum],
    subsample: str = "all",
) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """CoCoOp's base/new split (docs/protocols.md), applied after few-shot sampling.

    Labels are taken from ``train`` and sorted; with ``m = ceil(n / 2)``, base = the first ``m``
    labels and new = the rest. Each half is relabelled 0.. in sorted order and items of the other
    half are dropped from all three lists. For test-only datasets (empty ``train``) the labels
    come from ``test``, which is what Dassl sees there (CoOp passes the test list as ``train_x``).
    """
    check_subsample(subsample)
    if subsample == "all":
        return list(train), list(val), list(test)
    labels = sorted({item.label for item in (train or test)})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(selected)}

    def _keep(items: Sequence[Datum]) -> list[Datum]:
        return [replace(it, label=relabel[it.label]) for it in items if it.label in relabel]

    return _keep(train), _keep(val), _keep(test)
