"""The on-disk feature cache returns identical features and is invalidated by each key ingredient."""

from __future__ import annotations

import os

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


def test_truncated_foreign_or_swapped_entries_are_never_used_and_get_replaced(bb, items, tmp_path):
    cache = FeatureCache(tmp_path)
    key = split_key(bb, items, "shapes")
    other_key = split_key(bb, items[:-1] + items[-1:], "another-name")  # another entry, same shapes
    feats, labels = encode(bb, items)
    cache.save(other_key, feats + 1.0, labels)
    path = cache.path(key)
    cache.save(key, feats, labels)
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])  # truncated
    assert cache.load(key) is None
    path.write_bytes(b"not a safetensors file")  # foreign bytes
    assert cache.load(key) is None
    path.write_bytes(cache.path(other_key).read_bytes())  # a valid entry of the same shape, other key
    assert cache.load(key) is None
    from safetensors.torch import save

    from vlprompt.engine.feature_cache import KEY_FIELD
    meta = {KEY_FIELD: __import__("json").dumps(key, sort_keys=True)}
    path.write_bytes(save({"features": feats[:, :3].contiguous(), "labels": labels}, metadata=meta))  # width
    assert cache.load(key) is None
    path.write_bytes(save({"features": feats, "labels": labels.flip(0).contiguous()}, metadata=meta))
    assert cache.load(key) is not None and cache.load(key, labels) is None  # labels not the split's
    cache.save(key, feats, labels)  # recomputed entries replace the bad one
    got = cache.load(key, labels)
    assert torch.equal(got[0], feats) and torch.equal(got[1], labels)


def test_a_full_disk_keeps_the_previous_entry_and_says_so(bb, items, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    key = split_key(bb, items, "shapes")
    feats, labels = encode(bb, items)
    cache.save(key, feats, labels)
    before = cache.path(key).read_bytes()
    monkeypatch.setenv("VLPROMPT_FAULTS", "enospc@cache")
    why = cache.save(key, feats * 2, labels)
    assert "No space left on device" in why and str(tmp_path) in why
    assert cache.path(key).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


_WRITER = """
import sys, torch
from vlprompt.engine.feature_cache import FeatureCache
cache, key, value = FeatureCache(sys.argv[1]), {"n_items": 64, "width": 512, "k": 1}, float(sys.argv[2])
for _ in range(40):
    cache.save(key, torch.full((64, 512), value), torch.arange(64))
"""


def test_two_processes_writing_one_entry_with_different_contents(tmp_path):
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(v)]) for v in (1.0, 2.0)]
    cache, key, seen = FeatureCache(tmp_path), {"n_items": 64, "width": 512, "k": 1}, set()
    while any(p.poll() is None for p in procs):
        got = cache.load(key)
        if got is not None:  # whenever an entry is there, it is one writer's complete entry
            assert got[0].unique().numel() == 1 and float(got[0][0, 0]) in (1.0, 2.0)
            seen.add(float(got[0][0, 0]))
    assert [p.returncode for p in procs] == [0, 0]
    got = cache.load(key)
    assert got is not None and float(got[0][0, 0]) in (1.0, 2.0) and got[0].unique().numel() == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
