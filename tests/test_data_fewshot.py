"""Few-shot sampling and base/new splitting must reproduce the CoOp code base exactly.

The reference below is written the way Dassl does it: the GLOBAL ``random`` module seeded once,
a ``defaultdict`` grouping, ``random.sample`` per class, train first and val second.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter, defaultdict

import pytest

from vlprompt.data import Datum, load_dataset, sample_fewshot, subsample_classes
from vlprompt.data.registry import DATASETS
from vlprompt.errors import VlpromptError

# registry name of each dataset whose split JSON ships in coop-splits/
JSON_DATASETS = ["caltech101", "dtd", "eurosat", "oxford_flowers", "oxford_pets", "stanford_cars", "ucf101"]
SHOTS = [1, 2, 4, 8, 16]
SEEDS = [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Reference implementation (Dassl generate_fewshot_dataset / CoCoOp subsample_classes)
# ---------------------------------------------------------------------------------------------


def ref_fewshot(items, k):
    tracker = defaultdict(list)
    for item in items:
        tracker[item[1]].append(item)
    out = []
    for _, group in tracker.items():
        out.extend(random.sample(group, k) if len(group) >= k else group)
    return out


def ref_subsample(train, val, test, which):
    labels = sorted({t[1] for t in train})
    m = math.ceil(len(labels) / 2)
    chosen = labels[:m] if which == "base" else labels[m:]
    new = {y: i for i, y in enumerate(chosen)}
    return [[(p, new[y], c) for p, y, c in split if y in new] for split in (train, val, test)]


def as_tuples(items):
    return [(d.path, d.label, d.classname) for d in items]


_json_cache: dict = {}


def json_entries(coop_splits_dir, name):
    """The JSON's lists as (absolute path, label, classname), paths joined like read_split."""
    if name not in _json_cache:
        spec = DATASETS[name]
        with open(coop_splits_dir / spec.split_json) as f:
            data = json.load(f)
        image_root = os.path.join(str(coop_splits_dir), spec.image_root)
        _json_cache[name] = {
            s: [(os.path.join(image_root, p), y, c) for p, y, c in data[s]]
            for s in ("train", "val", "test")
        }
    return _json_cache[name]


# ---------------------------------------------------------------------------------------------
# Exactness on the real split files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", JSON_DATASETS)
def test_fewshot_matches_global_random_reference(name, coop_splits_dir, keep_global_random):
    ref = json_entries(coop_splits_dir, name)
    full = load_dataset(name, root=coop_splits_dir, check_files=False)  # shots=-1: everything
    assert [as_tuples(full.train), as_tuples(full.val), as_tuples(full.test)] == [
        ref["train"], ref["val"], ref["test"]
    ]
    available = Counter(t[1] for t in ref["train"])
    available_val = Counter(t[1] for t in ref["val"])
    # The whole grid on the sampler load_dataset uses (re-reading the JSON 15 times adds nothing)...
    for shots in SHOTS:
        for seed in SEEDS:
            train, val = sample_fewshot(full.train, full.val, shots, seed)
            random.seed(seed)
            assert as_tuples(train) == ref_fewshot(ref["train"], shots), (name, shots, seed)
            assert as_tuples(val) == ref_fewshot(ref["val"], min(shots, 4)), (name, shots, seed)
            assert Counter(d.label for d in train) == {y: min(shots, n) for y, n in available.items()}
            assert Counter(d.label for d in val) == {y: min(shots, 4, n) for y, n in available_val.items()}
    # ...and load_dataset end to end for a few points of it.
    for shots, seed in ((1, 1), (16, 1), (16, 2), (16, 3)):
        ds = load_dataset(name, root=coop_splits_dir, shots=shots, seed=seed, check_files=False)
        random.seed(seed)
        assert as_tuples(ds.train) == ref_fewshot(ref["train"], shots), (name, shots, seed)
        assert as_tuples(ds.val) == ref_fewshot(ref["val"], min(shots, 4)), (name, shots, seed)
        assert as_tuples(ds.test) == ref["test"]
    # Different seeds must give different subsets (otherwise the seed is not reaching the sampler).
    assert sample_fewshot(full.train, [], 4, 1)[0] != sample_fewshot(full.train, [], 4, 2)[0]


@pytest.mark.parametrize("name", JSON_DATASETS)
def test_base_new_subsample_matches_reference(name, coop_splits_dir, keep_global_random):
    ref = json_entries(coop_splits_dir, name)
    all_names = {y: c for _, y, c in ref["train"]}
    for seed in (1, 3):
        random.seed(seed)
        ref_train = ref_fewshot(ref["train"], 16)
        ref_val = ref_fewshot(ref["val"], 4)
        n = len(all_names)
        for which in ("base", "new"):
            ds = load_dataset(
                name, root=coop_splits_dir, shots=16, seed=seed, subsample=which, check_files=False
            )
            exp_train, exp_val, exp_test = ref_subsample(ref_train, ref_val, ref["test"], which)
            assert as_tuples(ds.train) == exp_train
            assert as_tuples(ds.val) == exp_val
            assert as_tuples(ds.test) == exp_test
            m = math.ceil(n / 2)
            kept = range(m) if which == "base" else range(m, n)
            assert ds.classnames == [all_names[y] for y in kept]
            assert ds.num_classes == len(kept)
            assert {d.label for d in ds.test} == set(range(len(kept)))


def test_subsample_happens_after_fewshot(coop_splits_dir, keep_global_random):
    """Sampling first then splitting differs from splitting first: the RNG walks all classes."""
    ds = load_dataset("eurosat", root=coop_splits_dir, shots=2, seed=1, subsample="new", check_files=False)
    ref = json_entries(coop_splits_dir, "eurosat")
    random.seed(1)
    # Wrong order: split to new classes first, then sample.
    wrong = ref_fewshot(ref_subsample(ref["train"], [], [], "new")[0], 2)
    assert as_tuples(ds.train) != wrong
    assert ds.classnames[0] == "Pasture Land"  # EuroSAT new half starts at label 5


# ---------------------------------------------------------------------------------------------
# Unit behaviour on small synthetic lists
# ---------------------------------------------------------------------------------------------


def _items(counts):
    """Interleaved items so that 'order of first appearance' is not just label order."""
    out = []
    for i in range(max(counts.values())):
        for y, n in counts.items():
            if i < n:
                out.append(Datum(f"/x/{y}_{i}.jpg", y, f"c{y}"))
    return out


def test_groups_in_order_of_first_appearance_and_keeps_short_classes(keep_global_random):
    items = _items({2: 5, 0: 1, 1: 3})
    train, val = sample_fewshot(items, items, shots=3, seed=7)
    assert [d.label for d in train] == [2, 2, 2, 0, 1, 1, 1]
    # class 1 has exactly 3 == shots: random.sample still permutes it (as Dassl does)
    random.seed(7)
    assert as_tuples(train) == ref_fewshot(as_tuples(items), 3)
    # class 0 has fewer than k: all of it, no repetition
    assert [d.path for d in train if d.label == 0] == ["/x/0_0.jpg"]
    assert Counter(d.label for d in val) == {2: 3, 0: 1, 1: 3}


def test_all_shots_values_mean_everything():
    items = _items({0: 4, 1: 2})
    for shots in (-1, 0):
        train, val = sample_fewshot(items, items[:3], shots=shots, seed=1)
        assert train == items and val == items[:3]


def test_val_not_sampled_when_disabled():
    items = _items({0: 9, 1: 9})
    train, val = sample_fewshot(items, items, shots=2, seed=1, sample_val=False)
    assert len(train) == 4 and val == items


def test_does_not_touch_global_random():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    sample_fewshot(_items({0: 9}), [], shots=2, seed=5)
    assert random.random() == expected


@pytest.mark.parametrize("bad", ["16", 1.5, None, True])
def test_bad_shots_rejected(bad):
    with pytest.raises(VlpromptError, match="shots"):
        sample_fewshot([], [], shots=bad, seed=1)


@pytest.mark.parametrize("bad", [-1, "1", 2.0])
def test_bad_seed_rejected(bad):
    with pytest.raises(VlpromptError, match="seed"):
        sample_fewshot([], [], shots=1, seed=bad)


def test_subsample_odd_count_and_validation():
    items = _items({0: 1, 1: 1, 2: 1, 3: 1, 4: 1})
    base = subsample_classes(items, items, items, "base")
    new = subsample_classes(items, items, items, "new")
    assert [d.label for d in base[0]] == [0, 1, 2]  # ceil(5/2) = 3 base classes
    assert [(d.label, d.classname) for d in new[2]] == [(0, "c3"), (1, "c4")]
    assert subsample_classes(items, [], items, "all")[0] == items
    with pytest.raises(VlpromptError, match="'half'"):
        subsample_classes(items, [], items, "half")


def test_subsample_uses_test_labels_for_test_only_data():
    items = _items({0: 2, 1: 2, 2: 2, 3: 2})
    _, _, test = subsample_classes([], [], items, "new")
    assert sorted({(d.label, d.classname) for d in test}) == [(0, "c2"), (1, "c3")]


def test_imagenet_samples_train_only(tmp_path, keep_global_random):
    """ImageNet's val list is its test set: few-shot sampling must leave it whole."""
    wnids = ["n02", "n01", "n03"]
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("".join(f"{w} name {w}\n" for w in wnids))
    for split, n in (("train", 7), ("val", 3)):
        for w in wnids:
            d = tmp_path / "imagenet" / "images" / split / w
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{w}_{i}.JPEG").touch()
    ds = load_dataset("imagenet", root=tmp_path, shots=2, seed=3)
    assert len(ds.val) == len(ds.test) == 9 and as_tuples(ds.val) == as_tuples(ds.test)
    full = load_dataset("imagenet", root=tmp_path)
    random.seed(3)
    assert as_tuples(ds.train) == ref_fewshot(as_tuples(full.train), 2)
    assert any("sorted" in note for note in ds.info["notes"])
