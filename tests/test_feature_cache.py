"""The on-disk feature cache returns identical features and is invalidated by each key ingredient."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from support import tiny_backbone

from vlprompt.data import load_dataset, make_synthetic_dataset, test_transform
from vlprompt.engine import encode_items
from vlprompt.engine.feature_cache import FeatureCache, split_key


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = make_synthetic_dataset(str(tmp_path_factory.mktemp("d")), n_train_per_class=1, n_test_per_class=3)
    return load_dataset(root).test


@pytest.fixture(scope="module")
def bb():
    return tiny_backbone()


def encode(bb, items):
    return encode_items(bb, items, test_transform(bb.image_size, bb.image_mean, bb.image_std), progress=False)


def test_round_trip_is_identical(bb, items, tmp_path):
    cache = FeatureCache(tmp_path)
    key = split_key(bb, items, "shapes")
    assert cache.load(key) is None
    feats, labels = encode(bb, items)
    cache.save(key, feats, labels)
    got = cache.load(split_key(bb, items, "shapes"))
    assert torch.equal(got[0], feats) and torch.equal(got[1], labels)


def test_each_ingredient_changes_the_key(bb, items, tmp_path):
    base = split_key(bb, items, "shapes")
    other_impl = tiny_backbone()
    other_impl.image_encoder_id = "open_clip"
    variants = {
        "other weights": split_key(tiny_backbone(random_init_seed=1), items, "shapes"),
        "precision": split_key(tiny_backbone(precision="bf16"), items, "shapes"),
        "architecture/transform size": split_key(tiny_backbone("vlprompt-tiny-RN"), items, "shapes"),
        "image-encoder implementation": split_key(other_impl, items, "shapes"),
        "dataset": split_key(bb, items, "other"),
        "image list": split_key(bb, items[:-1], "shapes"),
        "labels": split_key(bb, [type(items[0])(items[0].path, 7, "x")] + list(items[1:]), "shapes"),
    }
    for what, key in variants.items():
        assert key != base, what
    # Editing an image file (size / mtime) invalidates the entry too.
    cache = FeatureCache(tmp_path)
    cache.save(base, *encode(bb, items))
    victim = items[0].path
    st = os.stat(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert cache.load(split_key(bb, items, "shapes")) is None
    finally:
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.load(split_key(bb, items, "shapes")) is not None


def test_weights_file_identity_is_part_of_the_key(bb, items, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(bb.model.state_dict(), str(path))
    a = split_key(tiny_backbone(weights=str(path)), items, "shapes")
    os.utime(path, ns=(0, 10**9))
    b = split_key(tiny_backbone(weights=str(path)), items, "shapes")
    assert a != b and a != split_key(bb, items, "shapes")


def test_corrupt_or_foreign_entries_are_never_used(bb, items, tmp_path):
    cache = FeatureCache(tmp_path)
    key = split_key(bb, items, "shapes")
    feats, labels = encode(bb, items)
    cache.save(key, feats, labels)
    data_path, key_path = cache._paths(key)
    data_path.write_bytes(b"garbage")
    assert cache.load(key) is None
    cache.save(key, feats, labels)
    key_path.write_text('{"something": "else"}')
    assert cache.load(key) is None


def test_concurrent_writers_leave_a_valid_entry(bb, items, tmp_path):
    cache = FeatureCache(tmp_path)
    key = split_key(bb, items, "shapes")
    feats, labels = encode(bb, items)
    threads = [threading.Thread(target=cache.save, args=(key, feats, labels)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = cache.load(key)
    assert got is not None and torch.equal(got[0], feats)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
