"""Registered benchmark datasets: layouts, class names, label order and error messages.

Fake trees hold empty files: listing must never decode an image, so empty files are enough.
The real CoOp split files are used where available (skipped otherwise).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from vlprompt.data import DATASETS, list_datasets, load_dataset
from vlprompt.errors import VlpromptError

PETS = (
    "abyssinian american_bulldog american_pit_bull_terrier basset_hound beagle bengal birman bombay "
    "boxer british_shorthair chihuahua egyptian_mau english_cocker_spaniel english_setter "
    "german_shorthaired great_pyrenees havanese japanese_chin keeshond leonberger maine_coon "
    "miniature_pinscher newfoundland persian pomeranian pug ragdoll russian_blue saint_bernard samoyed "
    "scottish_terrier shiba_inu siamese sphynx staffordshire_bull_terrier wheaten_terrier "
    "yorkshire_terrier"
).split()
DTD = (
    "banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted "
    "fibrous flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined "
    "marbled matted meshed paisley perforated pitted pleated polka-dotted porous potholed scaly smeared "
    "spiralled sprinkled stained stratified striped studded swirly veined waffled woven wrinkled zigzagged"
).split()
EUROSAT = [
    "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
    "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake",
]
# SPEC 5.1 sizes (train, val, test, classes) of the 7 datasets whose split files ship with the data
SIZES = {
    "caltech101": (4128, 1649, 2465, 100),
    "oxford_pets": (2944, 736, 3669, 37),
    "stanford_cars": (6509, 1635, 8041, 196),
    "oxford_flowers": (4093, 1633, 2463, 102),
    "dtd": (2820, 1128, 1692, 47),
    "eurosat": (13500, 5400, 8100, 10),
    "ucf101": (7639, 1898, 3783, 101),
}
TEMPLATES = {
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}

# ---------------------------------------------------------------------------------------------
# Fake-tree builders
# ---------------------------------------------------------------------------------------------


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def json_tree(root: Path, name: str, split: dict, with_images: bool = False) -> Path:
    spec = DATASETS[name]
    ddir = root / spec.dir
    ddir.mkdir(parents=True)
    (ddir / spec.split_json).write_text(json.dumps(split))
    if with_images:
        for entries in split.values():
            for rel, _, _ in entries:
                touch(ddir / spec.image_root / rel)
    return ddir


def real_json_tree(root: Path, name: str, coop_splits_dir: Path) -> Path:
    spec = DATASETS[name]
    ddir = root / spec.dir
    ddir.mkdir(parents=True)
    shutil.copy(coop_splits_dir / spec.split_json, ddir / spec.split_json)
    return ddir


FOOD = {
    "train": [["apple_pie/1.jpg", 0, "apple_pie"], ["baby_back_ribs/2.jpg", 1, "baby_back_ribs"],
              ["apple_pie/3.jpg", 0, "apple_pie"], ["baklava/4.jpg", 2, "baklava"]],
    "val": [["baklava/5.jpg", 2, "baklava"]],
    "test": [["apple_pie/6.jpg", 0, "apple_pie"], ["baklava/7.jpg", 2, "baklava"]],
}
SUN = {
    "train": [["a/abbey/sun_1.jpg", 0, "abbey"],
              ["a/apartment_building/outdoor/sun_2.jpg", 1, "outdoor apartment_building"]],
    "val": [["a/abbey/sun_3.jpg", 0, "abbey"]],
    "test": [["a/apartment_building/outdoor/sun_4.jpg", 1, "outdoor apartment_building"]],
}
WNIDS = {  # deliberately not in sorted order in classnames.txt
    "n01443537": "goldfish",
    "n01440764": "tench",
    "n01491361": "tiger shark",
    "n01484850": "great white shark",
    "n01494475": "hammerhead shark",
}


def imagenet_tree(root: Path, n_train=3, n_val=2) -> Path:
    ddir = root / "imagenet"
    ddir.mkdir(parents=True)
    (ddir / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in WNIDS.items()))
    for split, n in (("train", n_train), ("val", n_val)):
        for w in WNIDS:
            for i in range(n):
                touch(ddir / "images" / split / w / f"{w}_{i}.JPEG")
    touch(ddir / "images" / "train" / "n01440764" / ".DS_Store")  # hidden: ignored
    (ddir / "images" / "train" / ".cache").mkdir()  # hidden folder: not a class
    return ddir


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry_lists_the_15_datasets_with_spec_templates():
    assert list_datasets() == list(TEMPLATES)
    for name, template in TEMPLATES.items():
        assert DATASETS[name].template == template
    assert DATASETS["dtd"].display_name == "DescribableTextures"
    assert not DATASETS["imagenet"].fewshot_val and DATASETS["caltech101"].fewshot_val


@pytest.mark.parametrize("name", list(SIZES))
def test_real_split_files_names_and_sizes(name, tmp_path, coop_splits_dir):
    real_json_tree(tmp_path, name, coop_splits_dir)
    ds = load_dataset(name, root=tmp_path, check_files=False)
    assert (len(ds.train), len(ds.val), len(ds.test), ds.num_classes) == SIZES[name]
    assert ds.template == TEMPLATES[name] and ds.info["source"] == "split_json"
    image_root = os.path.join(str(tmp_path), DATASETS[name].dir, DATASETS[name].image_root)
    assert all(os.path.dirname(d.path).startswith(image_root.rstrip("/")) for d in ds.test)
    # names are indexed by label
    assert all(ds.classnames[d.label] == d.classname for d in ds.train + ds.val + ds.test)


def test_label_orders(tmp_path, coop_splits_dir):
    for name in SIZES:
        real_json_tree(tmp_path, name, coop_splits_dir)
    load = lambda n: load_dataset(n, root=tmp_path, check_files=False)  # noqa: E731
    cal = load("caltech101")
    assert cal.classnames[:5] == ["face", "leopard", "motorbike", "accordion", "airplane"]
    assert "BACKGROUND_Google" not in cal.classnames
    assert load("oxford_pets").classnames == PETS
    assert load("dtd").classnames == DTD
    assert load("eurosat").classnames == EUROSAT
    assert load("oxford_flowers").classnames[0] == "pink primrose"
    ucf = load("ucf101").classnames
    assert ucf[0] == "Apply_Eye_Makeup" and len(ucf) == 101  # underscores kept as stored
    assert "2012 Tesla Model S Sedan" in load("stanford_cars").classnames
    cars = load("stanford_cars")
    assert cars.train[0].path == str(tmp_path / "stanford_cars" / "cars_train" / "05266.jpg")


def test_root_may_be_the_dataset_folder_itself(tmp_path):
    ddir = json_tree(tmp_path, "food101", FOOD)
    a = load_dataset("food101", root=tmp_path, check_files=False)
    b = load_dataset("food101", root=ddir, check_files=False)
    assert a.train == b.train and a.info["root"] == b.info["root"] == str(ddir)


def test_food101_and_sun397_from_json(tmp_path):
    json_tree(tmp_path, "food101", FOOD, with_images=True)
    json_tree(tmp_path, "sun397", SUN, with_images=True)
    food = load_dataset("food101", root=tmp_path)  # check_files: empty files exist
    assert food.classnames == ["apple_pie", "baby_back_ribs", "baklava"]
    assert food.train[1].path == str(tmp_path / "food-101" / "images" / "baby_back_ribs" / "2.jpg")
    sun = load_dataset("sun397", root=tmp_path)
    assert sun.classnames == ["abbey", "outdoor apartment_building"]
    assert sun.test[0].path.endswith("sun397/SUN397/a/apartment_building/outdoor/sun_4.jpg")


def test_fgvc_aircraft_reader(tmp_path):
    ddir = tmp_path / "fgvc_aircraft"
    ddir.mkdir()
    (ddir / "variants.txt").write_text("707-320\nA300B4\nCessna 172\nF/A-18\n")
    (ddir / "images_variant_train.txt").write_text(
        "1025794 707-320\n1340192 Cessna 172\n0056978 F/A-18\n1111111 A300B4\n"
    )
    (ddir / "images_variant_val.txt").write_text("2222222 Cessna 172\n")
    (ddir / "images_variant_test.txt").write_text("3333333 F/A-18\n\n")
    (ddir / "images").mkdir()
    ds = load_dataset("fgvc_aircraft", root=tmp_path, check_files=False)
    assert ds.classnames == ["707-320", "A300B4", "Cessna 172", "F/A-18"]
    assert [(os.path.basename(d.path), d.label, d.classname) for d in ds.train] == [
        ("1025794.jpg", 0, "707-320"), ("1340192.jpg", 2, "Cessna 172"),
        ("0056978.jpg", 3, "F/A-18"), ("1111111.jpg", 1, "A300B4"),
    ]
    assert ds.train[0].path == str(ddir / "images" / "1025794.jpg")
    assert len(ds.val) == 1 and len(ds.test) == 1 and ds.info["source"] == "fgvc_variant_txt"
    (ddir / "images_variant_val.txt").write_text("2222222 Boeing 999\n")
    with pytest.raises(VlpromptError, match=r"images_variant_val.txt:1: variant 'Boeing 999'"):
        load_dataset("fgvc_aircraft", root=tmp_path, check_files=False)


def test_imagenet_labels_follow_sorted_folders(tmp_path):
    imagenet_tree(tmp_path)
    ds = load_dataset("imagenet", root=tmp_path)
    assert ds.classnames == ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark"]
    assert [d.label for d in ds.train[:4]] == [0, 0, 0, 1]
    assert [os.path.basename(d.path) for d in ds.train[:3]] == [f"n01440764_{i}.JPEG" for i in range(3)]
    assert len(ds.train) == 15 and ds.val == ds.test and len(ds.test) == 10
    base = load_dataset("imagenet", root=tmp_path, subsample="base")
    assert base.classnames == ["tench", "goldfish", "great white shark"]


def test_imagenet_v2_folder_k_is_line_k(tmp_path):
    imagenet_tree(tmp_path)  # provides the shared imagenet/classnames.txt
    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for k in range(len(WNIDS)):
        touch(v2 / str(k) / f"img{k}.jpeg")
    ds = load_dataset("imagenet_v2", root=tmp_path)
    assert ds.classnames == list(WNIDS.values())  # file order, not sorted wnids
    assert [(os.path.basename(d.path), d.label) for d in ds.test] == [(f"img{k}.jpeg", k) for k in range(5)]
    assert ds.train == [] and ds.val == []
    # a variant's own classnames.txt wins over the shared one
    (tmp_path / "imagenetv2" / "classnames.txt").write_text("".join(f"w{k} own {k}\n" for k in range(5)))
    assert load_dataset("imagenet_v2", root=tmp_path).classnames[0] == "own 0"
    shutil.rmtree(v2 / "3")
    with pytest.raises(VlpromptError, match="format-val/3"):
        load_dataset("imagenet_v2", root=tmp_path)


@pytest.mark.parametrize(
    "name,dir_,sub,ext",
    [
        ("imagenet_sketch", "imagenet-sketch", "images", ".JPEG"),
        ("imagenet_a", "imagenet-adversarial", "imagenet-a", ".jpg"),
        ("imagenet_r", "imagenet-rendition", "imagenet-r", ".jpg"),
    ],
)
def test_imagenet_variants_use_their_own_sorted_folders(tmp_path, name, dir_, sub, ext):
    imagenet_tree(tmp_path)
    # a 3-of-5 subset, like A/R use 200 of the 1000 classes
    for w in ("n01494475", "n01440764", "n01491361"):
        for i in range(2):
            touch(tmp_path / dir_ / sub / w / f"{i}{ext}")
    touch(tmp_path / dir_ / sub / "README.txt")
    ds = load_dataset(name, root=tmp_path)
    assert ds.classnames == ["tench", "tiger shark", "hammerhead shark"]
    assert ds.num_classes == 3 and [d.label for d in ds.test] == [0, 0, 1, 1, 2, 2]
    new = load_dataset(name, root=tmp_path, subsample="new")
    assert new.classnames == ["hammerhead shark"] and {d.label for d in new.test} == {0}


def test_real_caltech101(caltech_root):
    ds = load_dataset("caltech101", root=caltech_root)  # check_files: every path must exist
    assert (ds.num_classes, len(ds.train), len(ds.val), len(ds.test)) == (100, 4128, 1649, 2465)
    assert ds.classnames[:3] == ["face", "leopard", "motorbike"]
    assert os.path.isfile(ds.test[0].path)
    few = load_dataset("caltech101", root=caltech_root / "caltech-101", shots=16, seed=1, subsample="new")
    assert few.num_classes == 50 and len(few.train) == 50 * 16
    full = load_dataset("caltech101", root=caltech_root, check_files=False)
    assert few.classnames[0] == full.classnames[50]


# ---------------------------------------------------------------------------------------------
# Errors: one VlpromptError naming the offending thing
# ---------------------------------------------------------------------------------------------


def test_unknown_name(tmp_path):
    with pytest.raises(VlpromptError, match="unknown dataset 'caltech102'.*caltech101"):
        load_dataset("caltech102", root=tmp_path)


def test_missing_root(tmp_path):
    with pytest.raises(VlpromptError, match="needs a data root"):
        load_dataset("dtd")
    missing = tmp_path / "nope"
    with pytest.raises(VlpromptError, match=re.escape(f"data root not found: {missing}")):
        load_dataset("dtd", root=missing)
    with pytest.raises(VlpromptError, match=re.escape(f"dataset folder not found: {tmp_path / 'dtd'}")):
        load_dataset("dtd", root=tmp_path)


def test_missing_split_file(tmp_path):
    (tmp_path / "caltech-101").mkdir()
    expected = tmp_path / "caltech-101" / "split_zhou_Caltech101.json"
    with pytest.raises(VlpromptError, match=re.escape(f"split file not found: {expected}")):
        load_dataset("caltech101", root=tmp_path)


def test_missing_image_and_image_dir(tmp_path):
    ddir = json_tree(tmp_path, "food101", FOOD)
    with pytest.raises(VlpromptError, match=re.escape(f"image folder not found: {ddir / 'images'}")):
        load_dataset("food101", root=tmp_path)
    for entries in FOOD.values():
        for rel, _, _ in entries:
            touch(ddir / "images" / rel)
    os.remove(ddir / "images" / "baklava" / "5.jpg")
    pattern = r"1 listed image file\(s\) missing, first: " + re.escape(f"{ddir}/images/baklava/5.jpg")
    with pytest.raises(VlpromptError, match=pattern):
        load_dataset("food101", root=tmp_path)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"subsample": "bases"}, "subsample must be one of all, base, new; got 'bases'"),
        ({"shots": "16"}, "shots must be an integer, got '16'"),
        ({"seed": -2}, "seed must be >= 0, got -2"),
        ({"template": "a photo"}, re.escape("template 'a photo' has no '{}'; write one '{}' where")),
    ],
)
def test_bad_values(tmp_path, kwargs, pattern):
    json_tree(tmp_path, "food101", FOOD)
    with pytest.raises(VlpromptError, match=pattern):
        load_dataset("food101", root=tmp_path, check_files=False, **kwargs)


def test_empty_class_folder(tmp_path):
    ddir = imagenet_tree(tmp_path)
    empty = ddir / "images" / "val" / "n01484850"
    shutil.rmtree(empty)
    empty.mkdir()
    touch(empty / "notes.txt")  # not an image
    with pytest.raises(VlpromptError, match=re.escape(f"class folder {empty} holds no images")):
        load_dataset("imagenet", root=tmp_path)


def test_malformed_split_json(tmp_path):
    ddir = json_tree(tmp_path, "food101", FOOD)
    path = ddir / "split_zhou_Food101.json"
    path.write_text('{"train": [')
    with pytest.raises(VlpromptError, match=re.escape(f"split file {path} is not valid JSON")):
        load_dataset("food101", root=tmp_path, check_files=False)
    path.write_text(json.dumps({**FOOD, "val": [["x.jpg", "2", "baklava"]]}))
    with pytest.raises(VlpromptError, match=r"val\[0\] = \['x.jpg', '2', 'baklava'\]"):
        load_dataset("food101", root=tmp_path, check_files=False)
    path.write_text(json.dumps({"train": FOOD["train"], "test": FOOD["test"]}))
    with pytest.raises(VlpromptError, match="has no 'val' list"):
        load_dataset("food101", root=tmp_path, check_files=False)


def test_missing_classnames_txt(tmp_path):
    touch(tmp_path / "imagenet-sketch" / "images" / "n01440764" / "a.JPEG")
    with pytest.raises(VlpromptError, match="class-name file not found: tried .*sketch/classnames.txt"):
        load_dataset("imagenet_sketch", root=tmp_path)
    (tmp_path / "imagenet-sketch" / "classnames.txt").write_text("n09999999 other\n")
    with pytest.raises(VlpromptError, match="n01440764 has no line in"):
        load_dataset("imagenet_sketch", root=tmp_path)


def test_inconsistent_label_names_are_rejected(tmp_path):
    bad = {**FOOD, "test": [["apple_pie/6.jpg", 0, "apple pie"]]}
    json_tree(tmp_path, "food101", bad)
    with pytest.raises(VlpromptError, match="label 0 has two class names, 'apple_pie' and 'apple pie'"):
        load_dataset("food101", root=tmp_path, check_files=False)


def test_a_benchmark_folder_given_as_a_path_is_read_as_the_benchmark(tmp_path):
    ddir = json_tree(tmp_path, "food101", FOOD)
    ds = load_dataset(str(ddir), check_files=False)
    assert ds.name == "food101" and ds.template == TEMPLATES["food101"]
    assert ds.train[0].path == str(ddir / "images" / "apple_pie" / "1.jpg")
    assert any("recognised as registered dataset 'food101'" in n for n in ds.info["notes"])
    inet = imagenet_tree(tmp_path)
    assert load_dataset(inet).name == "imagenet"
