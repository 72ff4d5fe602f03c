"""Faults: a full disk while writing a checkpoint, the run folder or the feature cache; an output that cannot be
written or holds another run; an image that becomes unreadable in the middle of a run. Each is one clear line,
loses no finished work, and the next run is healthy. (Kills at a random step: test_resume.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import TINY_VIT

import vlprompt as vp
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.checkpoint import CHECKPOINT_FILE, checkpoint_folder, read_checkpoint
from vlprompt.engine.run import run

VALUES = {"backbone": TINY_VIT, "pretrained": "random", "shots": 2, "epochs": 2, "batch_size": 4,
          "checkpoint_every": 1}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=4,
                                  n_test_per_class=2, seed=0)


def cfg(shapes, out, **kw):
    return vp.RunConfig.from_sources(dataset=shapes, output=str(out), progress=False, **{**VALUES, **kw})


def cli(shapes, out, faults: str = "", *extra) -> subprocess.CompletedProcess:
    args = ["train", "--dataset", shapes, "--output", str(out), "--quiet", *extra]
    for key, value in VALUES.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    env = {**os.environ, "VLPROMPT_FAULTS": faults} if faults else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "vlprompt.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("vlprompt: error")]


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    m = run(cfg(shapes, out))
    return m, load_file(str(out / "prompt" / "prompt.safetensors"))["ctx"]


def same_result(out: Path, reference) -> None:
    m, ctx = reference
    assert json.loads((out / "metrics.json").read_text())["test"] == m["test"]
    assert torch.equal(load_file(str(out / "prompt" / "prompt.safetensors"))["ctx"], ctx)


def test_full_disk_while_writing_a_checkpoint(shapes, reference, tmp_path):
    out = tmp_path / "run"
    proc = cli(shapes, out, "enospc@checkpoint=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = errors(proc)
    assert "cannot write the checkpoint" in line and "No space left on device" in line and "intact" in line
    saved = read_checkpoint(checkpoint_folder(out) / CHECKPOINT_FILE)
    assert (saved["epoch"], saved["step_in_epoch"]) in ((0, 2), (1, 0))  # the second save, untouched
    assert not out.exists() and not list(checkpoint_folder(out).glob("*.tmp"))
    healthy = cli(shapes, out)  # the next run resumes from the intact checkpoint and ends where it should
    assert healthy.returncode == 0, healthy.stderr
    same_result(out, reference)


def test_full_disk_while_writing_the_run_folder(shapes, reference, tmp_path):
    out = tmp_path / "run"
    proc = cli(shapes, out, "enospc@run_folder")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = errors(proc)
    assert str(out) in line and "No space left on device" in line and "resume" in line
    assert not out.exists() and (checkpoint_folder(out) / CHECKPOINT_FILE).exists()  # training not lost
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    healthy = cli(shapes, out)
    assert healthy.returncode == 0, healthy.stderr
    same_result(out, reference)
    assert not checkpoint_folder(out).exists()


def test_full_disk_while_writing_the_feature_cache(shapes, reference, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    proc = cli(shapes, out, "enospc@cache", "--cache-dir", str(cache))
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "feature cache not written" in line]
    assert len(warned) == 1 and "No space left on device" in warned[0]
    assert not list(cache.glob("*.safetensors")) and not list(cache.glob("*.tmp"))
    same_result(out, reference)
    again = cli(shapes, tmp_path / "again", "", "--cache-dir", str(cache))  # the next run fills the cache
    assert again.returncode == 0 and len(list(cache.glob("*.safetensors"))) == 1


def test_an_output_that_is_a_file_is_refused_before_any_work(shapes, tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("keep me")
    proc = cli(shapes, target)
    assert proc.returncode == 2 and errors(proc) == [f"vlprompt: error: output {target} exists and is not a folder"]
    assert target.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="this user ignores directory permissions (root)")
def test_a_read_only_output_folder_is_refused_before_any_work(shapes, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = cli(shapes, parent / "run")
        assert proc.returncode == 2 and len(errors(proc)) == 1 and str(parent / "run") in errors(proc)[0]
    finally:
        parent.chmod(0o755)


def test_a_finished_run_of_another_configuration_is_kept_unless_overwrite(shapes, bb, reference, tmp_path):
    out = tmp_path / "run"
    run(cfg(shapes, out), backbone=bb)
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(vp.VlpromptError, match=r"another configuration \(differs in: lr, seed\).*--overwrite"):
        run(cfg(shapes, out, lr=0.01, seed=3), backbone=bb)
    assert (out / "metrics.json").read_bytes() == before
    run(cfg(shapes, out), backbone=bb)  # the same configuration again: replaced by the same result
    same_result(out, reference)
    m = run(cfg(shapes, out, lr=0.01, seed=3, overwrite=True), backbone=bb)
    assert json.loads((out / "metrics.json").read_text())["config_key"] == m["config_key"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    with pytest.raises(vp.VlpromptError, match="holds no finished run"):
        run(cfg(shapes, tmp_path / "other"), backbone=bb)
    assert (tmp_path / "other" / "notes.txt").read_text() == "not a run"


def test_an_image_unreadable_in_the_middle_of_a_run(shapes, bb, reference, tmp_path, monkeypatch):
    from vlprompt.engine import trainer

    root = tmp_path / "d"
    shutil.copytree(shapes, root)
    real_settings = trainer.TrainSettings.from_config  # decode every step, so that a file can go bad mid-run
    monkeypatch.setattr(trainer.TrainSettings, "from_config", classmethod(
        lambda cls, c, epochs: dataclasses.replace(real_settings(c, epochs), cache_images=0)))
    train = vp.load_dataset(str(root), shots=2).train
    victim = Path(train[0].path)
    good = victim.read_bytes()
    real_load, calls = trainer.load_image, []

    def load_image(path):  # the victim breaks on disk after a few steps
        calls.append(path)
        if len(calls) == 3 * len(train) // 2:
            victim.write_bytes(b"\x89PNG now broken")
        return real_load(path)

    monkeypatch.setattr(trainer, "load_image", load_image)
    out = tmp_path / "run"
    with pytest.raises(vp.VlpromptError, match=f"cannot read image {victim}"):
        run(cfg(str(root), out), backbone=bb)
    assert (checkpoint_folder(out) / CHECKPOINT_FILE).exists() and not out.exists()
    victim.write_bytes(good)  # fixed: the same run resumes and ends as an uninterrupted one
    run(cfg(str(root), out), backbone=bb)
    m, ctx = reference
    assert torch.equal(load_file(str(out / "prompt" / "prompt.safetensors"))["ctx"], ctx)


def test_results_are_written_with_the_usual_file_mode(shapes, bb, tmp_path):
    out = tmp_path / "run"
    run(cfg(shapes, out, epochs=1), backbone=bb)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("metrics.json", "config.yaml", "prompt/prompt.safetensors", "prompt/prompt_config.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
