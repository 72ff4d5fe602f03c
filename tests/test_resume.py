"""Checkpoints and resume: a run killed with SIGKILL at a random step and run again ends with exactly the prompt
and metrics of an uninterrupted run, for every method trained by SGD, in exact and in feature-bank mode, fp32
and bf16; and the checkpoint's rules (another configuration refused, --resume never, deleted or kept)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import TINY_OPTIONS, TINY_VIT

import vlprompt as vp
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.checkpoint import CHECKPOINT_FILE, checkpoint_folder, read_checkpoint
from vlprompt.engine.run import run
from vlprompt.methods import METHODS

SGD_METHODS = [name for name, m in METHODS.items() if m.trains and not m.needs.fitted]
EPOCHS, BATCH = 3, 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=4,
                                  n_test_per_class=3, seed=0)


def settings(shapes, method, mode, precision):
    return {"dataset": shapes, "method": method, "backbone": TINY_VIT, "pretrained": "random", "shots": 2,
            "epochs": EPOCHS, "batch_size": BATCH, "train_mode": mode, "bank_views": 2, "precision": precision,
            "checkpoint_every": 1, "method_options": TINY_OPTIONS.get(method, {})}


def cli_args(values: dict, out: Path) -> list[str]:
    args = ["train", "--output", str(out), "--quiet"]
    for key, value in values.items():
        if key == "method_options":
            args += [arg for k, v in value.items() for arg in ("--option", f"{k}={v}")]
        else:
            args += ["--" + key.replace("_", "-"), str(value)]
    return args


# Every SGD method in exact mode; in feature-bank mode those whose image features may be drawn from a bank.
RESUME_CASES = [(method, mode) for method in SGD_METHODS for mode in ("exact", "feature_bank")
                if mode == "exact" or METHODS[method].needs.cacheable_features]


def outcome(folder: Path) -> tuple[dict, dict]:
    """(trained tensors, metrics without what may differ between two identical runs: times and paths)."""
    tensors = load_file(str(folder / "prompt" / "prompt.safetensors"))
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("timings", "output", "finished_at", "execution"):
        metrics.pop(key, None)
    for record in metrics["train"]["epochs"]:
        record.pop("seconds")
    metrics["train"].pop("seconds")
    return tensors, metrics


def n_steps(bb, shapes) -> int:
    n_train = len(vp.load_dataset(shapes, shots=2).train)
    return EPOCHS * (n_train // BATCH)


@pytest.mark.parametrize("method, mode", RESUME_CASES)
def test_killed_at_a_random_step_resumes_to_the_uninterrupted_result(method, mode, shapes, bb, tmp_path):
    # Both precisions are covered in both modes: the method's position in the registry decides which.
    precision = ("fp32", "bf16")[(SGD_METHODS.index(method) + (mode == "exact")) % 2]
    values = settings(shapes, method, mode, precision)
    reference = run(vp.RunConfig.from_sources(**values, output=str(tmp_path / "reference"), progress=False))
    kill_at = random.randrange(1, n_steps(bb, shapes))  # after this many steps: the run is never finished
    out = tmp_path / "killed"
    env = {**os.environ, "VLPROMPT_FAULTS": f"kill@step={kill_at}"}
    proc = subprocess.run([sys.executable, "-m", "vlprompt.cli", *cli_args(values, out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()  # nothing of a half-finished run is where the result goes
    saved = read_checkpoint(checkpoint_folder(out) / CHECKPOINT_FILE)
    per_epoch = n_steps(bb, shapes) // EPOCHS
    # Killed after an epoch's last step: that step is saved only with the epoch, which the kill came before.
    assert saved["epoch"] * per_epoch + saved["step_in_epoch"] == kill_at - (kill_at % per_epoch == 0)
    resumed = run(vp.RunConfig.from_sources(**values, output=str(out), progress=False))
    assert resumed["test"] == reference["test"]
    ref_tensors, ref_metrics = outcome(tmp_path / "reference")
    got_tensors, got_metrics = outcome(out)
    assert ref_tensors.keys() == got_tensors.keys()
    for name in ref_tensors:
        assert torch.equal(ref_tensors[name], got_tensors[name]), f"{name} differs after a kill at step {kill_at}"
    assert got_metrics == ref_metrics, f"kill at step {kill_at}"
    assert not checkpoint_folder(out).exists()  # a finished run deletes its checkpoint


def test_same_command_twice_is_identical(shapes, bb, tmp_path):
    values = settings(shapes, "cpt", "exact", "fp32")
    for name in ("a", "b"):
        run(vp.RunConfig.from_sources(**values, output=str(tmp_path / name), progress=False), backbone=bb)
    a, b = outcome(tmp_path / "a"), outcome(tmp_path / "b")
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1] == b[1]


def test_workers_do_not_change_the_result(shapes, bb, tmp_path):
    values = settings(shapes, "coop", "exact", "fp32")
    for name, workers in (("w0", 0), ("w2", 2)):
        run(vp.RunConfig.from_sources(**values, num_workers=workers, output=str(tmp_path / name), progress=False),
            backbone=bb)
    assert torch.equal(outcome(tmp_path / "w0")[0]["ctx"], outcome(tmp_path / "w2")[0]["ctx"])


def _killed_run(values: dict, out: Path, kill_at: int = 2) -> None:
    env = {**os.environ, "VLPROMPT_FAULTS": f"kill@step={kill_at}"}
    proc = subprocess.run([sys.executable, "-m", "vlprompt.cli", *cli_args(values, out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_checkpoint_of_another_configuration_is_refused_naming_the_keys(shapes, tmp_path):
    values = settings(shapes, "coop", "feature_bank", "fp32")
    out = tmp_path / "run"
    _killed_run(values, out)
    changed = {**values, "lr": 0.01, "n_ctx": 8}
    proc = subprocess.run([sys.executable, "-m", "vlprompt.cli", *cli_args(changed, out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "warning" not in line]
    assert len(lines) == 1 and "another configuration" in lines[0] and "lr, n_ctx" in lines[0], proc.stderr
    assert (checkpoint_folder(out) / CHECKPOINT_FILE).exists() and not out.exists()
    # --resume never starts over: the result is the uninterrupted one of the changed configuration.
    ref = run(vp.RunConfig.from_sources(**changed, output=str(tmp_path / "ref"), progress=False))
    again = run(vp.RunConfig.from_sources(**changed, resume="never", output=str(out), progress=False))
    assert again["test"] == ref["test"] and again["train"]["epochs"][0]["loss"] == ref["train"]["epochs"][0]["loss"]


def test_keep_checkpoints_moves_the_last_one_into_the_run(shapes, bb, tmp_path):
    values = settings(shapes, "coop", "feature_bank", "fp32")
    run(vp.RunConfig.from_sources(**values, keep_checkpoints=True, output=str(tmp_path / "run"), progress=False),
        backbone=bb)
    kept = read_checkpoint(tmp_path / "run" / "checkpoint" / CHECKPOINT_FILE)
    assert kept["epoch"] == EPOCHS and kept["step_in_epoch"] == 0
    assert not checkpoint_folder(tmp_path / "run").exists()


@pytest.mark.parametrize("method", [name for name, m in METHODS.items() if m.needs.fitted])
def test_fitted_methods_run_again_to_the_same_result(method, shapes, bb, tmp_path):
    """A fitted method (no SGD epochs, no checkpoint) killed mid-fit simply runs again: it is deterministic."""
    values = {k: v for k, v in settings(shapes, method, "exact", "fp32").items() if k != "checkpoint_every"}
    for name in ("a", "b"):
        run(vp.RunConfig.from_sources(**values, output=str(tmp_path / name), progress=False), backbone=bb)
    a, b = load_file(str(tmp_path / "a" / "prompt" / "prompt.safetensors")), \
        load_file(str(tmp_path / "b" / "prompt" / "prompt.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("a", "b"))
    assert ma["test"] == mb["test"] and ma["train"] == mb["train"]
    assert not checkpoint_folder(tmp_path / "a").exists()


def test_killed_from_outside_at_an_arbitrary_moment(shapes, bb, tmp_path):
    """SIGKILL from another process at a random moment once checkpoints are being written (mid-step, mid-save
    or between them), as `kill -9` or a lost machine would: the next run still ends as an uninterrupted one."""
    import time

    values = {**settings(shapes, "coop", "exact", "fp32"), "epochs": 40}
    reference = run(vp.RunConfig.from_sources(**values, output=str(tmp_path / "reference"), progress=False))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vlprompt.cli", *cli_args(values, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = checkpoint_folder(out) / CHECKPOINT_FILE
    deadline = time.time() + 240
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and checkpoint.exists()
    resumed = run(vp.RunConfig.from_sources(**values, output=str(out), progress=False))
    assert resumed["test"] == reference["test"]
    (got_tensors, got_metrics), (ref_tensors, ref_metrics) = outcome(out), outcome(tmp_path / "reference")
    assert torch.equal(got_tensors["ctx"], ref_tensors["ctx"]) and got_metrics == ref_metrics
