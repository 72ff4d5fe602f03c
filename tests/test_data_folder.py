"""User datasets from a folder, image transforms, the synthetic demo set and check_dataset."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlprompt.data import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDataset,
    check_dataset,
    load_dataset,
    load_image,
    make_synthetic_dataset,
    train_transform,
)
from vlprompt.data import transforms as T
from vlprompt.errors import VlpromptError


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def save_image(path: Path, size=(40, 30), color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def triples(items, root):
    return [(os.path.relpath(d.path, root), d.label, d.classname) for d in items]


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def test_real_cifar10_train_test_folders(cifar10_dir):
    ds = load_dataset(cifar10_dir)
    assert ds.name == "cifar10" and ds.info["source"] == "folders"
    assert ds.classnames == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
    ]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (50000, 0, 10000)
    assert [sum(d.label == y for d in ds.test) for y in range(10)] == [1000] * 10
    assert ds.template == "a photo of a {}."
    few = load_dataset(cifar10_dir, shots=4, seed=2, subsample="base")
    assert few.classnames == ["airplane", "automobile", "bird", "cat", "deer"] and len(few.train) == 20


def test_train_val_test_folders(tmp_path):
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for c in ("Zebra", "apple", "banana_split"):  # case-sensitive sort: Zebra first
            for i in range(n):
                touch(tmp_path / split / c / f"{i}.JPG")
    touch(tmp_path / "train" / "apple" / ".hidden.jpg")
    touch(tmp_path / "train" / "apple" / "notes.txt")
    touch(tmp_path / "test" / "apple" / "x.TiFf")
    ds = load_dataset(tmp_path)
    assert ds.classnames == ["Zebra", "apple", "banana_split"]
    assert triples(ds.train[:4], tmp_path) == [
        ("train/Zebra/0.JPG", 0, "Zebra"), ("train/Zebra/1.JPG", 0, "Zebra"),
        ("train/Zebra/2.JPG", 0, "Zebra"), ("train/apple/0.JPG", 1, "apple"),
    ]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 3, 7)
    assert ds.name == tmp_path.name


def test_folder_errors(tmp_path):
    touch(tmp_path / "train" / "cat" / "0.png")
    with pytest.raises(VlpromptError, match="has a train/ folder but no test/ folder"):
        load_dataset(tmp_path)
    touch(tmp_path / "test" / "dog" / "0.png")
    dog, cat = tmp_path / "test" / "dog", tmp_path / "test" / "cat"
    with pytest.raises(VlpromptError, match=re.escape(f"class folder {dog} has no counterpart")):
        load_dataset(tmp_path)
    (tmp_path / "test" / "dog" / "0.png").rename(tmp_path / "test" / "dog" / "0.txt")
    (tmp_path / "test" / "dog").rename(tmp_path / "test" / "cat")
    with pytest.raises(VlpromptError, match=re.escape(f"class folder {cat} holds no images")):
        load_dataset(tmp_path)
    with pytest.raises(VlpromptError, match="unknown dataset 'no_such_dir_x': not a registered name"):
        load_dataset("no_such_dir_x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlpromptError, match="no dataset found in"):
        load_dataset(tmp_path / "empty")


def test_user_split_json(tmp_path):
    split = {
        "train": [["imgs/a1.png", 0, "cat"], ["imgs/b1.png", 1, "dog"], ["imgs/a2.png", 0, "cat"]],
        "test": [["imgs/b2.png", 1, "dog"]],
    }
    (tmp_path / "split.json").write_text(json.dumps(split))
    for entries in split.values():
        for rel, _, _ in entries:
            touch(tmp_path / rel)
    ds = load_dataset(tmp_path, template="a photo of a {}, a pet.")
    assert ds.info["source"] == "split_json" and ds.classnames == ["cat", "dog"]
    assert triples(ds.train, tmp_path) == [tuple(e) for e in split["train"]] and ds.val == []
    assert ds.template == "a photo of a {}, a pet."
    # a class that only appears in test cannot be classified: clear error
    split["test"].append(["imgs/c.png", 2, "cow"])
    touch(tmp_path / "imgs/c.png")
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(VlpromptError, match=r"class 'cow' \(label 2\) appears in test but has no training"):
        load_dataset(tmp_path)


def test_csv_with_classnames_labels_and_remapping(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        touch(tmp_path / "img" / name)
    csv_text = lambda *rows: "\n".join(rows) + "\n"  # noqa: E731
    (tmp_path / "data.csv").write_text(
        csv_text("path,classname,split", "img/a.jpg,tiger,train", "img/b.jpg,cat,train",
                 "img/c.jpg,cat,test", "img/d.jpg,tiger,VAL")
    )
    ds = load_dataset(tmp_path)
    assert ds.info["source"] == "csv" and ds.classnames == ["cat", "tiger"]
    assert triples(ds.train, tmp_path) == [("img/a.jpg", 1, "tiger"), ("img/b.jpg", 0, "cat")]
    assert triples(ds.val, tmp_path) == [("img/d.jpg", 1, "tiger")]

    (tmp_path / "data.csv").write_text(
        csv_text("path,label,split", "img/a.jpg,7,train", "img/b.jpg,3,train", "img/c.jpg,7,test")
    )
    ds = load_dataset(tmp_path)
    assert ds.classnames == ["3", "7"] and [d.label for d in ds.train] == [1, 0]
    assert any("renumbered" in n for n in ds.info["notes"])

    (tmp_path / "split.csv").write_text(
        csv_text("path,label,classname,split",
                 "img/a.jpg,1,x,train", "img/b.jpg,0,y,train", "img/c.jpg,1,x,test")
    )
    ds = load_dataset(tmp_path)  # split.csv wins over another CSV; given labels are kept
    assert ds.classnames == ["y", "x"] and triples(ds.test, tmp_path) == [("img/c.jpg", 1, "x")]


@pytest.mark.parametrize(
    "content,pattern",
    [
        ("path,label\na.jpg,0\n", "needs header columns path,split"),
        ("path,label,split\na.jpg,zero,train\n", r"data.csv:2: label must be an integer >= 0, got 'zero'"),
        ("path,label,split\na.jpg,0,train\nb.jpg,1,dev\n", r"data.csv:3: split must be train, val or test"),
        ("path,label,split\na.jpg,0\n", r"data.csv:2: expected 3 fields, got 2"),
        ("path,label,classname,split\na.jpg,0,x,train\nb.jpg,0,y,test\n", "label 0 is used for both 'x' and"),
    ],
)
def test_csv_errors(tmp_path, content, pattern):
    (tmp_path / "data.csv").write_text(content)
    with pytest.raises(VlpromptError, match=pattern):
        load_dataset(tmp_path, check_files=False)


def test_several_csvs_is_an_error(tmp_path):
    (tmp_path / "a.csv").write_text("path,label,split\n")
    (tmp_path / "b.csv").write_text("path,label,split\n")
    with pytest.raises(VlpromptError, match=r"several CSV files \(a.csv, b.csv\)"):
        load_dataset(tmp_path)


def test_plain_class_folders_get_a_deterministic_auto_split(tmp_path):
    counts = {"cat": 10, "dog": 7, "emu": 2}
    for c, n in counts.items():
        for i in range(n):
            touch(tmp_path / c / f"{i:02d}.png")
    ds = load_dataset(tmp_path)
    assert ds.info["source"] == "auto_split"
    assert any("50/20/30" in n and "random.Random(0)" in n for n in ds.info["notes"])
    # reference: one Random(0) stream over the classes in sorted order, shuffling sorted names
    rng = random.Random(0)
    expected = {"train": [], "val": [], "test": []}
    for label, c in enumerate(sorted(counts)):
        files = [f"{c}/{i:02d}.png" for i in range(counts[c])]
        rng.shuffle(files)
        n_tr, n_va = {10: (5, 2), 7: (4, 1), 2: (1, 0)}[len(files)]
        parts = {"train": files[:n_tr], "val": files[n_tr:n_tr + n_va], "test": files[n_tr + n_va:]}
        for split, part in parts.items():
            expected[split] += [(f, label, c) for f in part]
    for split in expected:
        assert triples(getattr(ds, split), tmp_path) == expected[split]
    again = load_dataset(tmp_path)
    assert (again.train, again.val, again.test) == (ds.train, ds.val, ds.test)


def test_listing_does_not_decode(tmp_path):
    """Garbage bytes named .jpg list fine; only check_dataset (decode=True) notices."""
    touch(tmp_path / "train" / "a" / "0.jpg", b"not an image")
    save_image(tmp_path / "train" / "b" / "0.png")
    save_image(tmp_path / "test" / "a" / "1.png")
    touch(tmp_path / "test" / "b" / "1.jpg", b"\xff\xd8\xff truncated")
    ds = load_dataset(tmp_path)
    assert len(ds.train) == 2
    report = check_dataset(tmp_path)
    bad = [str(tmp_path / "train" / "a" / "0.jpg"), str(tmp_path / "test" / "b" / "1.jpg")]
    assert report["unreadable"] == 2 and report["missing"] == 0 and not report["ok"]
    assert report["counts"] == {"train": 2, "val": 0, "test": 2} and report["num_classes"] == 2
    assert [line.split(":")[0] for line in report["unreadable_first"]] == [f"cannot read image {p}" for p in bad]
    assert check_dataset(tmp_path, decode=False)["ok"]


def test_check_dataset_reports_missing(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "split.csv").write_text("path,classname,split\na.png,x,train\ngone.png,x,test\n")
    report = check_dataset(tmp_path)
    assert report["missing"] == 1 and report["missing_first"] == [str(tmp_path / "gone.png")]
    assert report["unreadable"] == 0
    with pytest.raises(VlpromptError, match=re.escape(f"missing, first: {tmp_path / 'gone.png'}")):
        load_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------
# Images and transforms
# ---------------------------------------------------------------------------------------------


def test_load_image_errors(tmp_path):
    bad = touch(tmp_path / "bad.jpg", b"garbage")
    with pytest.raises(VlpromptError, match=re.escape(f"cannot read image {bad}: ")):
        load_image(str(bad))
    with pytest.raises(VlpromptError, match=re.escape(f"cannot read image {tmp_path / 'none.png'}: ")):
        load_image(str(tmp_path / "none.png"))
    gray = tmp_path / "g.png"
    Image.new("L", (5, 5), 7).save(gray)
    assert load_image(str(gray)).mode == "RGB"


def test_test_transform_is_clip_resize_center_crop(tmp_path):
    # 896x448 with red | green | blue stripes at x = 0-300-600-896. Resize: shorter side to 224
    # (x scale 1/2), center crop keeps resized columns 112..335, i.e. stripes end at crop x 38, 188.
    img = Image.new("RGB", (896, 448), (255, 0, 0))
    img.paste((0, 255, 0), (300, 0, 600, 448))
    img.paste((0, 0, 255), (600, 0, 896, 448))
    x = T.test_transform()(img)
    assert x.shape == (3, 224, 224)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    colour = {k: (torch.tensor(v) - mean) / std for k, v in
              {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "blue": [0.0, 0.0, 1.0]}.items()}
    for col, name in ((20, "red"), (60, "green"), (170, "green"), (210, "blue")):
        assert torch.allclose(x[:, 100, col], colour[name], atol=1e-3), (col, name)
    assert torch.equal(x, T.test_transform()(img))  # deterministic
    small = T.test_transform()(Image.new("RGB", (50, 80), (10, 20, 30)))
    assert small.shape == (3, 224, 224)


def test_train_transform_is_random_but_shaped(tmp_path):
    img = Image.new("RGB", (300, 200))
    img.paste((255, 255, 0), (0, 0, 150, 200))
    tf = train_transform()
    torch.manual_seed(0)
    outs = [tf(img) for _ in range(6)]
    assert all(o.shape == (3, 224, 224) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert train_transform(image_size=32)(img).shape == (3, 32, 32)
    crop, flip, _, norm = tf.transforms  # SPEC 1.4: crop from the full image, flip, normalise
    assert (crop.size, crop.scale, crop.ratio) == ((224, 224), (0.08, 1.0), (3 / 4, 4 / 3))
    assert crop.interpolation == T.InterpolationMode.BICUBIC and flip.p == 0.5
    assert tuple(norm.mean) == CLIP_MEAN and tuple(norm.std) == CLIP_STD


def test_image_dataset(tmp_path):
    save_image(tmp_path / "train" / "a" / "0.png")
    save_image(tmp_path / "train" / "b" / "0.png", color=(0, 255, 0))
    save_image(tmp_path / "test" / "b" / "0.png")
    ds = load_dataset(tmp_path)
    data = ImageDataset(ds.train, T.test_transform(64))
    assert len(data) == 2
    x, y = data[1]
    assert x.shape == (3, 64, 64) and y == 1


# ---------------------------------------------------------------------------------------------
# Synthetic demo dataset
# ---------------------------------------------------------------------------------------------


def test_synthetic_dataset(tmp_path):
    small = {"n_train_per_class": 3, "n_test_per_class": 2, "image_size": 32}
    out = make_synthetic_dataset(tmp_path / "syn", seed=5, **small)
    ds = load_dataset(out)
    assert ds.num_classes >= 6 and all("_" in c for c in ds.classnames)
    assert "red_circle" in ds.classnames
    assert (len(ds.train), len(ds.test)) == (3 * ds.num_classes, 2 * ds.num_classes)
    assert load_image(ds.train[0].path).size == (32, 32)
    again = make_synthetic_dataset(tmp_path / "syn2", seed=5, **small)
    other = make_synthetic_dataset(tmp_path / "syn3", seed=6, **small)
    rel = os.path.relpath(ds.train[0].path, out)
    first = Path(out, rel).read_bytes()
    assert first == Path(again, rel).read_bytes() and first != Path(other, rel).read_bytes()
    assert check_dataset(out)["ok"]
    with pytest.raises(VlpromptError, match="image_size"):
        make_synthetic_dataset(tmp_path / "x", image_size=4)


def test_synthetic_classes_are_distinguishable_by_color(tmp_path):
    """The mean colour of the shape pixels separates the classes (the demo job must be learnable)."""
    out = make_synthetic_dataset(tmp_path, n_train_per_class=2, n_test_per_class=1, image_size=48, seed=0)
    ds = load_dataset(out)
    red = [d for d in ds.train if d.classname == "red_circle"]
    blue = [d for d in ds.train if d.classname == "blue_square"]
    r = np.asarray(load_image(red[0].path), dtype=np.int32).reshape(-1, 3)
    b = np.asarray(load_image(blue[0].path), dtype=np.int32).reshape(-1, 3)
    assert (r[:, 0] - r[:, 2] > 100).sum() > 20  # strongly red pixels exist
    assert (b[:, 2] - b[:, 0] > 100).sum() > 20


def test_check_dataset_with_absent_images_prints_counts_and_the_first_few(tmp_path, capsys):
    from vlprompt.cli import main

    save_image(tmp_path / "a.png")
    rows = "".join(f"gone{i}.png,x,test\n" for i in range(40))
    (tmp_path / "split.csv").write_text("path,classname,split\na.png,x,train\n" + rows)
    assert main(["datasets", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    report = json.loads(out)
    assert report["missing"] == 40 and len(report["missing_first"]) == 5
    assert all(out.count(f"gone{i}.png") <= 1 for i in range(40))  # each at most once, most not at all
    assert out.count("gone") == 5
