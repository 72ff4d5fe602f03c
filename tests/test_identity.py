"""A run's identity (version 3) is portable: it leaves out where the data and the weights lie, the device, worker and
thread counts, and resolves the precision; it changes with the data's lists and the weights' bytes; keys written by
the previous version are still recognised; a study copied elsewhere with its data skips every finished run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support import TINY_VIT

import vlprompt as vp
from vlprompt.cli import main
from vlprompt.config import load_yaml
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.identity import IDENTITY_VERSION, config_key, legacy_config_key, result_identity
from vlprompt.utils.hardware import resolve_precision

TINY = {"backbone": TINY_VIT, "pretrained": "random"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes") / "shapes"), n_train_per_class=2,
                                  n_test_per_class=2, seed=0)


def registered_root(base: Path, labels=(0, 1)) -> Path:
    """A data root holding a Caltech-101 split file (the identity reads the lists, not the images)."""
    folder = base / "caltech-101"
    folder.mkdir(parents=True)
    entries = [[f"cat_{i}/image_{i}.jpg", label, f"class{label}"] for i, label in enumerate(labels)]
    (folder / "split_zhou_Caltech101.json").write_text(json.dumps({"train": entries, "val": entries,
                                                                   "test": entries}))
    return base


def key(**values) -> str:
    return config_key(vp.RunConfig(**{"method": "coop", **TINY, **values}).to_dict())


def test_the_data_root_does_not_change_the_key_but_the_lists_do(tmp_path):
    a, b = registered_root(tmp_path / "a"), registered_root(tmp_path / "b")
    assert key(dataset="caltech101", root=str(a)) == key(dataset="caltech101", root=str(b))
    other = registered_root(tmp_path / "c", labels=(0, 0))
    assert key(dataset="caltech101", root=str(other)) != key(dataset="caltech101", root=str(a))
    identity = result_identity(vp.RunConfig(dataset="caltech101", root=str(a), **TINY).to_dict())
    assert identity["dataset"].startswith("caltech101@") and "root" not in identity
    assert identity["identity_version"] == IDENTITY_VERSION == 3


def test_a_dataset_folder_moved_elsewhere_keeps_its_key(shapes, tmp_path):
    moved = shutil.copytree(shapes, tmp_path / "mounted" / "elsewhere" / "shapes")
    assert key(dataset=shapes) == key(dataset=str(moved))
    (Path(moved) / "train" / sorted(p.name for p in (Path(moved) / "train").iterdir())[0] / "extra.png").write_bytes(
        next((Path(shapes) / "train").rglob("*.png")).read_bytes())
    assert key(dataset=str(moved)) != key(dataset=shapes)  # one more image: other lists


def test_device_workers_threads_and_weights_path_do_not_change_the_key(shapes, tmp_path):
    one, two = tmp_path / "w1.safetensors", tmp_path / "copy" / "w.safetensors"
    one.write_bytes(b"weights" * 100)
    two.parent.mkdir()
    two.write_bytes(one.read_bytes())
    base = key(dataset=shapes, weights=str(one))
    assert key(dataset=shapes, weights=str(two)) == base
    elsewhere = {**vp.RunConfig(method="coop", dataset=shapes, weights=str(one), num_workers=4, threads="2",
                                **TINY).to_dict(), "device": "cuda:1"}  # as a GPU machine would write it
    assert config_key(elsewhere) == base
    other = tmp_path / "w2.safetensors"
    other.write_bytes(b"other" * 100)
    assert key(dataset=shapes, weights=str(other)) != base  # other bytes: another backbone


def test_precision_is_resolved_before_hashing(shapes):
    resolved = resolve_precision("auto", "cpu")
    assert key(dataset=shapes, precision="auto") == key(dataset=shapes, precision=resolved)
    assert key(dataset=shapes, precision="fp32") != key(dataset=shapes, precision="bf16")
    assert result_identity(vp.RunConfig(dataset=shapes, precision="auto", **TINY).to_dict())["precision"] == resolved


def study(shapes: str, out: Path) -> list[str]:
    return ["study", "fewshot", "--datasets", shapes, "--methods", "coop,zeroshot", "--shots", "1", "--seeds", "1",
            "--backbone", TINY_VIT, "--pretrained", "random", "--epochs", "1", "--output", str(out), "--quiet"]


def finished_units(out: Path) -> dict:
    return {u["uid"]: u["seconds"] for u in json.loads((out / "index.json").read_text())["units"]}


def test_a_study_copied_with_its_data_skips_every_finished_run(shapes, tmp_path, capsys):
    out = tmp_path / "here" / "study"
    assert main(study(shapes, out)) == 0
    first = finished_units(out)
    there = tmp_path / "there"
    data = shutil.copytree(shapes, there / "data" / "shapes")
    moved = shutil.copytree(out, there / "study")
    shutil.rmtree(tmp_path / "here")  # nothing of the first place is left
    capsys.readouterr()
    assert main(study(str(data), moved)) == 0
    assert finished_units(moved) == first  # no unit ran again (their recorded times are the first run's)
    for metrics in Path(moved).rglob("metrics.json"):
        assert json.loads(metrics.read_text())["identity_version"] == 3


def test_keys_of_the_previous_version_are_still_recognised(shapes, tmp_path):
    out = tmp_path / "study"
    assert main(study(shapes, out)) == 0
    first = finished_units(out)
    for path in out.rglob("metrics.json"):  # as the previous version wrote them
        m = json.loads(path.read_text())
        config = vp.RunConfig(**load_yaml(str(path.parent / "config.yaml")))
        m["config_key"] = legacy_config_key(config.to_dict())
        m.pop("identity_version")
        path.write_text(json.dumps(m))
    assert main(study(shapes, out)) == 0
    assert finished_units(out) == first


def test_a_checkpoint_written_by_the_previous_version_resumes(shapes, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from vlprompt.engine.checkpoint import CHECKPOINT_FILE, checkpoint_bytes, checkpoint_folder, read_checkpoint
    from vlprompt.engine.identity import legacy_identity
    from vlprompt.engine.run import run

    out = tmp_path / "run"
    values = {"dataset": shapes, "method": "coop", "shots": 2, "epochs": 2, "batch_size": 4, "checkpoint_every": 1,
              **TINY}
    args = [sys.executable, "-m", "vlprompt.cli", "train", "--dataset", shapes, "--method", "coop", "--shots", "2",
            "--epochs", "2", "--batch-size", "4", "--checkpoint-every", "1", "--backbone", TINY_VIT, "--pretrained",
            "random", "--output", str(out), "--quiet"]
    proc = subprocess.run(args, env={**os.environ, "VLPROMPT_FAULTS": "kill@step=3"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    path = checkpoint_folder(out) / CHECKPOINT_FILE
    state = read_checkpoint(path)
    assert state["identity"]["identity_version"] == 3
    cfg = vp.RunConfig(**values, output=str(out), progress=False)
    state["identity"] = legacy_identity(cfg.to_dict())  # as the previous version saved it
    path.write_bytes(checkpoint_bytes(state))
    resumed = run(cfg)
    reference = run(vp.RunConfig(**values, output=str(tmp_path / "reference"), progress=False))
    assert resumed["test"] == reference["test"]
