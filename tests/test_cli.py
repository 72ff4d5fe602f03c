"""The `vlprompt` command end to end, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlprompt.cli import main
from vlprompt.data import make_synthetic_dataset

TINY = ["--backbone", "vlprompt-tiny-ViT", "--pretrained", "random"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=8,
                                  n_test_per_class=5, seed=1)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-m", "vlprompt.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_train_then_eval_reproduces_accuracy(shapes, tmp_path):
    out = tmp_path / "run"
    r = cli("train", "--dataset", shapes, *TINY, "--shots", "8", "--epochs", "3", "--n-ctx", "4",
            "--class-token-position", "middle", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "RANDOMLY INITIALISED" in r.stderr and "Traceback" not in r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["epochs"] == 3 and len(metrics["train"]["epochs"]) == 3
    acc = metrics["test"]["accuracy"]
    assert f"{acc:6.2f}%" in r.stdout
    e = cli("eval", str(out), "--output", str(tmp_path / "ev"))
    assert e.returncode == 0, e.stderr
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["test"]["accuracy"] == acc


def test_yaml_config_and_overrides(shapes, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {shapes}\nbackbone: vlprompt-tiny-ViT\npretrained: random\nshots: 2\n"
                   f"epochs: 1\nn_ctx: 2\ncsc: true\nseed: 5\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--seed", "3", "--output", str(out), "--quiet"]) == 0
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["seed"] == 3 and resolved["csc"] is True and resolved["shots"] == 2  # CLI wins over YAML
    assert main(["zeroshot", "--config", str(cfg), "--ensemble", "--output", str(tmp_path / "zs"), "--quiet"]) == 0
    assert json.loads((tmp_path / "zs" / "metrics.json").read_text())["method"] == "zeroshot_ensemble"


def test_datasets_lists_and_checks(shapes, capsys):
    assert main(["datasets"]) == 0
    listing = capsys.readouterr().out
    for name in ("caltech101", "oxford_pets", "imagenet_r", "eurosat"):
        assert name in listing
    assert main(["datasets", shapes]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["missing"] == 0 and report["unreadable"] == 0 and report["ok"]


@pytest.mark.parametrize("args, match", [
    (["train", "--dataset", "no_such_dataset"], "unknown dataset"),
    (["train", "--dataset", "caltech101", "--root", "/nonexistent/data"], "/nonexistent/data"),
    (["train", "--dataset", "caltech101"], "root"),
    (["train", "--shots", "abc", "--dataset", "x"], "shots"),
    (["train", "--precision", "fp16x", "--dataset", "x"], "precision"),
    (["train", "--config", "/nonexistent.yaml"], "config file not found"),
    (["eval", "/nonexistent/run"], "not found"),
    (["train", "--bogus-flag"], "unrecognized arguments"),
    (["train", "--dataset", "x", "--option", "novalue"], "expected KEY=VALUE"),
    (["train", "--dataset", "x", "--option", "lambda=1"], "method coop takes no options"),
])
def test_bad_input_is_one_line(args, match, capsys):
    # In process: an exception other than the one-line error would fail this test with its traceback.
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("vlprompt: error:") and match in lines[0]


def test_no_traceback_from_the_installed_command():
    r = cli("train", "--dataset", "caltech101", "--root", "/nonexistent/data")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("vlprompt: error:")


def test_unreadable_image_is_named(tmp_path):
    root = make_synthetic_dataset(str(tmp_path / "d"), n_train_per_class=2, n_test_per_class=2, seed=0)
    victim = sorted((tmp_path / "d" / "test").rglob("*.png"))[0]
    victim.write_bytes(b"\x89PNG broken")
    r = cli("zeroshot", "--dataset", root, *TINY, "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(victim) in r.stderr.strip().splitlines()[-1]


def test_methods_lists_every_registered_method(capsys):
    from vlprompt.methods import METHODS

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert listed == list(METHODS)
    # Every option is declared once, with its help text, and printed from that declaration.
    import dataclasses

    for name, method in METHODS.items():
        for f in dataclasses.fields(method.Options) if method.Options else ():
            assert f.metadata.get("help"), f"{name} option {f.name} has no help text"
            assert any(line.strip().startswith(f"{f.name} = ") and f.metadata["help"] in line for line in lines)


def test_train_grid_shares_one_process(shapes, tmp_path, monkeypatch, capsys):
    import vlprompt.engine.run as engine_run

    loads = []
    real = engine_run.load_backbone
    monkeypatch.setattr(engine_run, "load_backbone", lambda *a, **k: loads.append(1) or real(*a, **k))
    out = tmp_path / "grid"
    assert main(["train", "--dataset", shapes, *TINY, "--shots", "1,2", "--seed", "1,2", "--epochs", "1",
                 "--n-ctx", "2", "--output", str(out), "--quiet"]) == 0
    assert len(loads) == 1  # one model load for the whole grid
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["1shots_seed1", "1shots_seed2", "2shots_seed1", "2shots_seed2"]
    for name in folders:
        m = json.loads((out / name / "metrics.json").read_text())
        assert f"{m['data']['shots']}shots_seed{m['data']['seed']}" == name
        assert m["data"]["n_train"] == m["data"]["shots"] * m["data"]["num_classes"]
    assert "mean top-1" in capsys.readouterr().out
    assert main(["train", "--dataset", shapes, "--seed", "1,x"]) == 2


def test_options_come_from_the_run_configuration_declarations():
    """Every RunConfig key is a `train` option generated from its one declaration (name, help, default), and a
    key that recipe cells set says so instead of claiming the plain default."""
    import dataclasses

    from vlprompt.cli import build_parser
    from vlprompt.config import RunConfig

    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    options = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(RunConfig):
        assert f.name in options, f.name  # method_options is --option, progress is --quiet, output is --output
        action = options[f.name]
        if f.metadata["flag"] != "" and f.type not in ("bool", bool):
            assert f.metadata["help"] in action.help
            if f.default is not None:
                assert f"default {f.default}" in action.help, (f.name, action.help)
    assert "--no-feature-cache" in options["feature_cache"].option_strings
    assert "--quiet" in options["progress"].option_strings
    # The methods named are read from the recipe table: every cell that sets the key.
    from vlprompt.recipes import table

    for key in ("batch_size", "lr", "backbone"):
        setters = sorted({c.method for c in table() if key in c.values and c.method != "any"})
        assert f"the recipes of {', '.join(setters)}" in " ".join(options[key].help.split()), key
    assert "cocoop" in options["batch_size"].help and "recipes" not in options["momentum"].help
