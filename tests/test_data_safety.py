"""Dataset list files (CSV, split JSON, FGVC lists) may only name files inside the dataset folder, and
malformed values in them (or in templates) are one clear line.

Real files in tmp_path; the outside "secret" is a real image next to the dataset folder.
"""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from vlprompt.cli import main
from vlprompt.data import check_dataset, load_dataset
from vlprompt.errors import VlpromptError
from vlprompt.prompts.templates import check_template, format_prompts

ALLOW = "VLPROMPT_ALLOW_OUTSIDE_ROOT"
HINT = "write one '{}' where the class name goes and '{{' / '}}' for a literal brace"
INSIDE_ROWS = ["img/a.png,cat,train", "img/b.png,dog,train", "img/c.png,cat,test"]


@pytest.fixture(autouse=True)
def no_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW, raising=False)


def save_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 200, 10)).save(path)
    return path


def csv_dataset(tmp_path: Path, *extra_rows: str) -> tuple[Path, Path]:
    """``tmp_path/data/mine`` with three images and a split.csv listing them plus ``extra_rows``."""
    root = tmp_path / "data" / "mine"
    for name in ("a", "b", "c"):
        save_image(root / "img" / f"{name}.png")
    csv_path = root / "split.csv"
    csv_path.write_text("\n".join(["path,classname,split", *INSIDE_ROWS, *extra_rows]) + "\n")
    return root, csv_path


def json_dataset(tmp_path: Path, data) -> tuple[Path, Path]:
    root = tmp_path / "data" / "mine"
    for name in ("a", "b"):
        save_image(root / "img" / f"{name}.png")
    json_path = root / "split.json"
    json_path.write_text(json.dumps(data))
    return root, json_path


GOOD_JSON = {"train": [["img/a.png", 0, "cat"], ["img/b.png", 1, "dog"]], "test": [["img/a.png", 0, "cat"]]}


def error_of(*args, **kwargs) -> str:
    with pytest.raises(VlpromptError) as info:
        load_dataset(*args, **kwargs)
    return str(info.value)


def refusal(first: str, count: int, name: str = "mine") -> str:
    more = f" (first of {count} such entries)" if count > 1 else ""
    return (f"{first}{more}; dataset {name} may only list files inside its folder: fix the entry, "
            f"or set {ALLOW}=1 if it is meant to point elsewhere")


@pytest.fixture
def touched(monkeypatch):
    """Every path given to os.stat, os.lstat or open while the test runs (os.path.exists/isfile use os.stat)."""
    seen: list[str] = []

    def recording(real):
        def wrapper(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)):
                seen.append(os.path.abspath(os.fspath(path)))
            return real(path, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "stat", recording(os.stat))
    monkeypatch.setattr(os, "lstat", recording(os.lstat))
    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    return seen


# ---------------------------------------------------------------------------------------------
# Entries outside the folder are refused when the dataset is read
# ---------------------------------------------------------------------------------------------


def test_csv_parent_and_absolute_entries_are_refused_before_any_image_is_touched(tmp_path, touched):
    secret = save_image(tmp_path / "data" / "secret.png")
    root, csv_path = csv_dataset(tmp_path, "../secret.png,cat,test", f"{secret},dog,train")
    touched.clear()  # forget the set-up's writes
    message = error_of(root)
    assert message == refusal(f"{csv_path}:5: path '../secret.png' is outside the dataset folder {root}", 2)
    images = {str(secret)} | {str(root / "img" / f"{n}.png") for n in "abc"}
    assert images.isdisjoint(touched)  # neither the outside file nor any listed image was stat-ed or opened


@pytest.mark.parametrize("value", ["img/../../secret.png", "img/..", "/etc/passwd", "..", "img/../../mine2/x.png"])
def test_each_kind_of_escape_in_a_csv_is_refused(tmp_path, value):
    root, csv_path = csv_dataset(tmp_path, f"{value},cat,test")
    assert error_of(root, check_files=False) == refusal(
        f"{csv_path}:5: path {value!r} is outside the dataset folder {root}", 1)


def test_parent_steps_that_stay_inside_are_accepted(tmp_path):
    root, _ = csv_dataset(tmp_path, "img/../img/a.png,cat,test", "..x/../img/b.png,dog,test")
    ds = load_dataset(root)
    assert [d.path for d in ds.test] == [str(root / "img" / n) for n in ("c.png", "a.png", "b.png")]
    data = {**GOOD_JSON, "test": [["img/../img/a.png", 0, "cat"]]}
    root, _ = json_dataset(tmp_path / "j", data)
    ds = load_dataset(root)
    assert os.path.normpath(ds.test[0].path) == str(root / "img" / "a.png")


def test_split_json_absolute_and_parent_entries_are_refused(tmp_path):
    secret = save_image(tmp_path / "secret.png")
    data = {**GOOD_JSON, "val": [["img/a.png", 0, "cat"], [str(secret), 0, "cat"], ["../../secret.png", 1, "dog"]]}
    root, json_path = json_dataset(tmp_path, data)
    assert error_of(root) == refusal(
        f"split file {json_path}: val[1]: path {str(secret)!r} is outside the dataset folder {root}", 2)


def test_registered_split_json_entries_stay_inside_the_image_folder(tmp_path):
    ddir = tmp_path / "food-101"
    (ddir / "images").mkdir(parents=True)
    data = {"train": [["apple_pie/1.jpg", 0, "apple_pie"]], "val": [],
            "test": [["../../food-101/images/apple_pie/1.jpg", 0, "apple_pie"], ["../split_zhou_Food101.json", 0,
                                                                                 "apple_pie"]]}
    json_path = ddir / "split_zhou_Food101.json"
    json_path.write_text(json.dumps(data))
    # The first test entry climbs out and back in: lexically inside. The second leaves images/ for its parent.
    assert error_of("food101", root=tmp_path, check_files=False) == refusal(
        f"split file {json_path}: test[1]: path '../split_zhou_Food101.json' is outside the "
        f"dataset folder {ddir / 'images'}", 1, name="food101")


def test_fgvc_list_entries_stay_inside_the_image_folder(tmp_path):
    ddir = tmp_path / "fgvc_aircraft"
    (ddir / "images").mkdir(parents=True)
    (ddir / "variants.txt").write_text("707-320\nA300B4\n")
    (ddir / "images_variant_train.txt").write_text("0034309 707-320\n0034958 A300B4\n")
    (ddir / "images_variant_val.txt").write_text("0037511 707-320\n")
    (ddir / "images_variant_test.txt").write_text("0041135 A300B4\n../../../etc/x 707-320\n")
    assert error_of("fgvc_aircraft", root=tmp_path, check_files=False) == refusal(
        f"{ddir}/images_variant_test.txt:2: path '../../../etc/x.jpg' is outside the dataset folder "
        f"{ddir / 'images'}", 1, name="fgvc_aircraft")


def test_an_images_folder_that_is_a_symlink_to_another_disk_is_accepted(tmp_path):
    """The check is lexical (normpath, not realpath): linking a big folder into the dataset is a normal layout."""
    disk = tmp_path / "bigdisk"
    for name in ("a", "b", "c"):
        save_image(disk / f"{name}.png")
    root = tmp_path / "data" / "mine"
    root.mkdir(parents=True)
    (root / "img").symlink_to(disk, target_is_directory=True)
    (root / "split.csv").write_text("\n".join(["path,classname,split", *INSIDE_ROWS]) + "\n")
    ds = load_dataset(root)
    assert [d.path for d in ds.train + ds.test] == [str(root / "img" / f"{n}.png") for n in "abc"]
    report = check_dataset(root)
    assert (report["ok"], report["outside"], report["missing"], report["unreadable"]) == (True, 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Opt-in
# ---------------------------------------------------------------------------------------------


def test_the_environment_variable_allows_outside_entries(tmp_path, monkeypatch):
    secret = save_image(tmp_path / "data" / "secret.png")
    root, _ = csv_dataset(tmp_path, "../secret.png,cat,test")
    monkeypatch.setenv(ALLOW, "0")
    assert error_of(root).startswith(f"{root}/split.csv:5: path '../secret.png' is outside")
    monkeypatch.setenv(ALLOW, "1")
    ds = load_dataset(root)
    assert ds.test[-1].path == str(secret)
    assert "1 listed image path(s) lie outside the dataset folder" in ds.info["notes"][-1]
    report = check_dataset(root)
    assert (report["outside"], report["outside_first"], report["ok"]) == (0, [], True)


def test_the_parameter_allows_outside_entries_and_then_they_are_checked_like_the_others(tmp_path):
    secret = save_image(tmp_path / "data" / "secret.png")
    root, _ = csv_dataset(tmp_path, "../secret.png,cat,test", "../absent.png,dog,test")
    with pytest.raises(VlpromptError, match=r"1 listed image file\(s\) missing, first: .*data/absent.png"):
        load_dataset(root, allow_outside_root=True)
    report = check_dataset(root, allow_outside_root=True)
    assert (report["outside"], report["missing"], report["missing_first"]) == (0, 1, [str(secret.parent / "absent.png")])


def test_a_bad_opt_in_value_is_one_line(tmp_path, monkeypatch):
    root, _ = csv_dataset(tmp_path, "../secret.png,cat,test")
    monkeypatch.setenv(ALLOW, "maybe")
    assert error_of(root) == (f"environment variable {ALLOW}='maybe': expected 1 (read dataset entries outside "
                              "the dataset folder) or 0")


# ---------------------------------------------------------------------------------------------
# The dataset check lists outside entries without revealing whether they exist
# ---------------------------------------------------------------------------------------------


def test_check_lists_outside_entries_identically_whether_or_not_they_exist(tmp_path, touched, capsys):
    root, csv_path = csv_dataset(tmp_path, "../secret.png,cat,test", "/nowhere/x.png,dog,test")
    secret = tmp_path / "data" / "secret.png"

    def check():
        report = check_dataset(root)
        assert main(["datasets", str(root)]) in (0, 1)
        return report, capsys.readouterr().out

    absent_report, absent_out = check()
    save_image(secret)
    touched.clear()
    present_report, present_out = check()
    assert present_report == absent_report and present_out == absent_out
    assert present_report["outside_first"] == [
        f"{csv_path}:5: path '../secret.png' is outside the dataset folder {root}",
        f"{csv_path}:6: path '/nowhere/x.png' is outside the dataset folder {root}",
    ]
    assert (present_report["outside"], present_report["missing"], present_report["ok"]) == (2, 0, False)
    assert present_report["counts"] == {"train": 2, "val": 0, "test": 3}
    assert str(secret) not in touched and "/nowhere/x.png" not in touched
    assert str(root / "img" / "a.png") in touched  # the inside images were checked


# ---------------------------------------------------------------------------------------------
# Wrong-typed values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "train,problem",
    [
        ([["img/a.png", "0", "cat"]], "train[0] = ['img/a.png', '0', 'cat']: label must be an integer >= 0, got '0'"),
        ([["img/a.png", True, "cat"]], "train[0] = ['img/a.png', True, 'cat']: label must be an integer >= 0, got True"),
        ([["img/a.png", 1.0, "cat"]], "train[0] = ['img/a.png', 1.0, 'cat']: label must be an integer >= 0, got 1.0"),
        ([["img/a.png", -1, "cat"]], "train[0] = ['img/a.png', -1, 'cat']: label must be an integer >= 0, got -1"),
        ([["img/a.png", 0, 7]], "train[0] = ['img/a.png', 0, 7]: class name must be a non-empty string, got 7"),
        ([["img/a.png", 0, " "]], "train[0] = ['img/a.png', 0, ' ']: class name must be a non-empty string, got ' '"),
        ([[5, 0, "cat"]], "train[0]: path must be a non-empty string, got 5"),
        ([["", 0, "cat"]], "train[0]: path must be a non-empty string, got ''"),
        ([["img/a\u0000.png", 0, "cat"]], "train[0]: path 'img/a\\x00.png' contains a NUL character"),
        (["img/a.png"], "train[0] = 'img/a.png' is not [relative_path, label >= 0, classname]"),
        ([["img/a.png", 0]], "train[0] = ['img/a.png', 0] is not [relative_path, label >= 0, classname]"),
        ({"img/a.png": 0}, "'train' must be a list, got dict"),
        ("img/a.png", "'train' must be a list, got str"),
    ],
)
def test_wrong_typed_split_json_values_are_one_line(tmp_path, train, problem):
    root, json_path = json_dataset(tmp_path, {**GOOD_JSON, "train": train})
    assert error_of(root, check_files=False) == f"split file {json_path}: {problem}"


def test_long_values_are_cut_in_messages(tmp_path):
    root, json_path = json_dataset(tmp_path, {**GOOD_JSON, "train": [[["x" * 500], 0, "cat"]]})
    message = error_of(root, check_files=False)
    assert message == f"split file {json_path}: train[0]: path must be a non-empty string, got " + (
        "[" + repr("x" * 500))[:120] + "..."


def test_deeply_nested_json_is_one_line(tmp_path):
    root, json_path = json_dataset(tmp_path, {})
    json_path.write_text("[" * 100_000)
    assert error_of(root) == f"split file {json_path} is nested too deeply to be a split file"


@pytest.mark.parametrize(
    "lines,problem",
    [
        (["path,classname,split", "img/a.png,cat"], "{csv}:2: expected 3 fields, got 2: ['img/a.png', 'cat']"),
        (["path,label,split,label", "img/a.png,0,train,1"],
         "CSV file {csv}: column 'label' appears more than once in the header"),
        (["path,label,split", "img/a.png,\u00b2,train"], "{csv}:2: label must be an integer >= 0, got '\u00b2'"),
        (["path,label,split", "img/a\u0000.png,0,train"], "{csv}:2: path 'img/a\\x00.png' contains a NUL character"),
        (["path,classname,split", "img/a.png,,train"], "{csv}:2: empty classname"),
    ],
)
def test_malformed_csv_rows_are_one_line(tmp_path, lines, problem):
    root, csv_path = csv_dataset(tmp_path)
    csv_path.write_text("\n".join(lines) + "\n")
    assert error_of(root, check_files=False) == problem.format(csv=csv_path)


# ---------------------------------------------------------------------------------------------
# Templates and class names with braces
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template,problem",
    [
        ("a photo of a {x}.", "template 'a photo of a {x}.': field '{x}' is not a plain '{}'; " + HINT),
        ("a photo of a {.", "template 'a photo of a {.': expected '}' before end of string; " + HINT),
        ("a } photo of a {}.", "template 'a } photo of a {}.': Single '}' encountered in format string; " + HINT),
        ("a photo of a {} {}.", "template 'a photo of a {} {}.' has 2 replacement fields; " + HINT),
        ("a photo", "template 'a photo' has no '{}'; " + HINT),
        ("a {0[0]}", "template 'a {0[0]}': field '{0[0]}' is not a plain '{}'; " + HINT),
        ("a {.upper}", "template 'a {.upper}': field '{.upper}' is not a plain '{}'; " + HINT),
        ("a {!r}", "template 'a {!r}': field '{!r}' is not a plain '{}'; " + HINT),
        ("a {:>9}", "template 'a {:>9}': field '{:>9}' is not a plain '{}'; " + HINT),
    ],
)
def test_bad_templates_are_one_line_wherever_they_are_used(tmp_path, template, problem):
    with pytest.raises(VlpromptError) as info:
        check_template(template)
    assert str(info.value) == problem
    with pytest.raises(VlpromptError) as info:
        format_prompts(template, ["cat"])
    assert str(info.value) == problem
    root, _ = csv_dataset(tmp_path)
    assert error_of(root, template=template) == problem


def test_a_template_that_is_not_a_string_is_one_line():
    with pytest.raises(VlpromptError) as info:
        check_template(3)
    assert str(info.value) == "template must be a string with one '{}' for the class name, got 3"


def test_good_templates_and_class_names_with_braces_format_as_written(tmp_path):
    names = ["{x}", "a_{b", "}", "{0}"]
    expected = ["a photo of a " + n.replace("_", " ") + "." for n in names]
    assert format_prompts("a photo of a {}.", names) == expected
    assert format_prompts("a photo of a {0}.", names) == expected
    assert format_prompts("{{literal}} {}", ["cat"]) == ["{literal} cat"]
    root, csv_path = csv_dataset(tmp_path)
    csv_path.write_text("path,classname,split\nimg/a.png,{x},train\nimg/b.png,a_{b,train\nimg/c.png,{x},test\n")
    ds = load_dataset(root, template="photo: {}")
    assert ds.classnames == ["a_{b", "{x}"] and ds.template == "photo: {}"
    assert format_prompts(ds.template, ds.classnames) == ["photo: a {b", "photo: {x}"]


# -- found by trying it ------------------------------------------------------------------------------------------

def test_a_class_name_with_a_control_character_is_refused_in_a_csv_and_a_split_json(tmp_path):
    # A NUL in a class name was accepted and `vlprompt datasets` said "ok": it went into prompts and records.
    root, csv_path = csv_dataset(tmp_path, "img/c.png,bi\x00rd,test")
    message = error_of(str(root))
    assert message == f"{csv_path}:5: classname holds the control character '\\x00'"
    bad = {**GOOD_JSON, "test": [["img/a.png", 0, "c\x1bat"]]}
    root, json_path = json_dataset(tmp_path / "j", bad)
    message = error_of(str(root))
    assert str(json_path) in message and "control character '\\x1b'" in message and "\n" not in message
