"""An objective's lifecycle (`methods.base.Objective`): ``on_epoch_end`` once per epoch (not again after a
resume), ``on_train_end`` before the learner is saved, ``state_dict`` / ``load_state_dict`` in the checkpoint (a
PromptSRC-like Gaussian-weighted prompt average resumes bit-identically after SIGKILL at a random step), its own
``optimizer`` and ``backward``, and checkpoints of the older layout (generator states only) still resume."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import TINY_VIT

import vlprompt as vp
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.checkpoint import (CHECKPOINT_FILE, OBJECTIVE_LAYOUT, Checkpointer, check_progress,
                                        checkpoint_bytes, checkpoint_folder, objective_state, read_checkpoint)
from vlprompt.engine.schedule import coop_lr
from vlprompt.engine.trainer import FeatureBank, TrainSettings, train_prompt
from vlprompt.errors import VlpromptError
from vlprompt.methods import METHODS
from vlprompt.methods.base import MethodConfig, Objective, option
from vlprompt.methods.coop import CoOpMethod, CoOpObjective
from vlprompt.utils.io import atomic_write_bytes

EPOCHS, BATCH = 4, 4  # 16 training images: 4 steps per epoch


# -- a PromptSRC-like objective: Gaussian-weighted prompt aggregation (GPA) -----------------------------------

@dataclass
class GPAOptions:
    mu: float = option(2.5, "the epoch (1-based) at which the Gaussian weights peak")
    sigma: float = option(1.0, "their spread, in epochs")


class GPAObjective(CoOpObjective):
    """CoOp's loss, scaled by a factor of its own generator's (so the default generator state must resume
    too), plus a running Gaussian-weighted sum of the prompt after each epoch, swapped in at the end."""

    def __init__(self, options: GPAOptions):
        super().__init__(options)
        self.gen = torch.Generator().manual_seed(7)
        self.sum, self.total = None, 0.0

    def loss(self, learner, batch):
        loss, terms = super().loss(learner, batch)
        return loss * (1.0 + 0.5 * torch.rand((), generator=self.gen)), terms

    def on_epoch_end(self, epoch, learner):
        w = math.exp(-((epoch + 1 - self.options.mu) ** 2) / (2 * self.options.sigma ** 2))
        ctx = learner.ctx.detach()
        self.sum = w * ctx if self.sum is None else self.sum + w * ctx
        self.total += w

    def on_train_end(self, learner):
        with torch.no_grad():
            learner.ctx.copy_(self.sum / self.total)

    def state_dict(self):
        return {**super().state_dict(), "sum": self.sum, "total": self.total}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.sum, self.total = state["sum"], state["total"]


class GPAMethod(CoOpMethod):
    """Test-only: the CoOp learner trained by `GPAObjective` (registered by the tests, never in the package)."""

    name = "gpa_test"
    Options = GPAOptions

    def objective(self, learner, config: MethodConfig) -> GPAObjective:
        return GPAObjective(config.options)


# Runs a configuration with the test method registered (a subprocess does not see monkeypatching).
RUN_WITH_GPA = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import vlprompt as vp
from vlprompt.methods import METHODS
from test_objective_lifecycle import GPAMethod
METHODS["gpa_test"] = GPAMethod()
vp.run(vp.RunConfig(**json.loads(sys.argv[1])))
"""


# -- fixtures and helpers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=4,
                                  n_test_per_class=3, seed=0)


@pytest.fixture(scope="module")
def ds(shapes):
    return vp.load_dataset(shapes, shots=2)


@pytest.fixture(scope="module")
def bank(bb, ds):
    return FeatureBank(bb, ds.train, CoOpObjective().view_transforms(bb), settings(), False, bank_views=2)


def settings(**kw) -> TrainSettings:
    base = dict(epochs=EPOCHS, batch_size=BATCH, lr=0.002, momentum=0.9, weight_decay=5e-4, warmup_epochs=1,
                warmup_lr=1e-5, seed=1)
    return TrainSettings(**{**base, **kw})


def learner_of(bb, ds):
    torch.manual_seed(0)
    return vp.CoOp(bb, ds.classnames, n_ctx=4)


class Crash(Exception):
    """Stands for a process that died at a step (in-process, so the objective can be inspected)."""


class Recording(CoOpObjective):
    """Records every ``on_epoch_end`` call (also in its state, so the checkpoint shows which it saved) and
    dies at its ``crash_at``-th step."""

    def __init__(self, crash_at=None):
        super().__init__()
        self.calls, self.ended, self.steps, self.crash_at = [], [], 0, crash_at

    def loss(self, learner, batch):
        self.steps += 1
        if self.steps == self.crash_at:
            raise Crash
        return super().loss(learner, batch)

    def on_epoch_end(self, epoch, learner):
        self.calls.append((epoch, learner))
        self.ended.append(epoch)

    def state_dict(self):
        return {**super().state_dict(), "ended": list(self.ended)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.ended = list(state["ended"])


def run_values(shapes, out: Path, **kw) -> dict:
    return {"dataset": shapes, "method": "gpa_test", "backbone": TINY_VIT, "pretrained": "random", "shots": 2,
            "epochs": EPOCHS, "batch_size": BATCH, "train_mode": "feature_bank", "bank_views": 2,
            "precision": "fp32", "checkpoint_every": 1, "keep_checkpoints": True,
            "method_options": {"mu": 2.5, "sigma": 1.2}, "progress": False, "output": str(out), **kw}


# -- on_epoch_end and on_train_end ----------------------------------------------------------------------------

def test_on_epoch_end_once_per_epoch_and_not_again_after_a_resume(bb, ds, bank, tmp_path):
    per_epoch = len(ds.train) // BATCH
    learner = learner_of(bb, ds)
    plain = Recording()
    train_prompt(learner, plain, bank, len(ds.train), settings(), progress=False)
    assert plain.calls == [(e, learner) for e in range(EPOCHS)]  # 0-based, the learner itself

    for crash_at in (per_epoch + 2, 2 * per_epoch + 1):  # mid-epoch 2; the first step of epoch 3
        folder = tmp_path / f"crash{crash_at}"
        first = Recording(crash_at)
        with pytest.raises(Crash):
            train_prompt(learner_of(bb, ds), first, bank, len(ds.train), settings(), progress=False,
                         checkpoint=Checkpointer(folder, {}, every=1))
        saved = read_checkpoint(folder / CHECKPOINT_FILE)
        done = saved["epoch"]
        assert [e for e, _ in first.calls] == list(range(done))
        assert saved["objective"]["ended"] == list(range(done))  # called before that epoch's checkpoint
        again, resumed = Recording(), learner_of(bb, ds)
        train_prompt(resumed, again, bank, len(ds.train), settings(), progress=False,
                     checkpoint=Checkpointer(folder, {}, every=1))
        assert again.calls == [(e, resumed) for e in range(done, EPOCHS)]  # only the epochs not yet done
        assert again.ended == list(range(EPOCHS))
        assert torch.equal(resumed.ctx, learner.ctx)


def test_on_train_end_runs_after_the_last_checkpoint_and_again_on_a_resume_with_nothing_left(bb, ds, bank,
                                                                                          tmp_path):
    folder = tmp_path / "ckpt"
    objective, learner = GPAObjective(GPAOptions()), learner_of(bb, ds)
    train_prompt(learner, objective, bank, len(ds.train), settings(), progress=False,
                 checkpoint=Checkpointer(folder, {}, every=0))
    saved = read_checkpoint(folder / CHECKPOINT_FILE)
    assert saved["epoch"] == EPOCHS
    assert torch.equal(learner.ctx, objective.sum / objective.total)  # the average, swapped in
    assert not torch.equal(saved["learner"]["ctx"], learner.ctx)  # the checkpoint holds the last epoch's prompt
    # Killed after the last checkpoint, before the prompt was saved: the next run only swaps the average in.
    again, resumed = GPAObjective(GPAOptions()), learner_of(bb, ds)
    history = train_prompt(resumed, again, bank, len(ds.train), settings(), progress=False,
                           checkpoint=Checkpointer(folder, {}, every=0))
    assert len(history["epochs"]) == EPOCHS and torch.equal(resumed.ctx, learner.ctx)


# -- the state in the checkpoint: killed at a random step, resumed bit-identically ------------------------------

@pytest.fixture(scope="module")
def gpa_reference(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpa") / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(METHODS, "gpa_test", GPAMethod())
        metrics = vp.run(vp.RunConfig(**run_values(shapes, out)))
    return metrics, out


def gpa_outcome(folder: Path) -> tuple[dict, dict, dict]:
    """(final prompt tensors, the kept last checkpoint, metrics without times and paths)."""
    prompt = load_file(str(folder / "prompt" / "prompt.safetensors"))
    kept = read_checkpoint(folder / "checkpoint" / CHECKPOINT_FILE)
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("timings", "output", "finished_at", "execution"):
        metrics.pop(key, None)
    for record in metrics["train"]["epochs"]:
        record.pop("seconds")
    metrics["train"].pop("seconds")
    return prompt, kept, metrics


@pytest.mark.parametrize("where", ["random step", "last step of an epoch"])
def test_gpa_killed_and_resumed_ends_bit_identical(where, shapes, gpa_reference, tmp_path, monkeypatch):
    per_epoch = len(vp.load_dataset(shapes, shots=2).train) // BATCH
    # After the first epoch, so that the average holds something when the process dies.
    kill_at = random.randrange(per_epoch + 1, EPOCHS * per_epoch) if where == "random step" else 3 * per_epoch
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", RUN_WITH_GPA, json.dumps(run_values(shapes, out))],
                          env={**os.environ, "VLPROMPT_FAULTS": f"kill@step={kill_at}"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    saved = read_checkpoint(checkpoint_folder(out) / CHECKPOINT_FILE)
    assert saved["objective_layout"] == OBJECTIVE_LAYOUT and saved["epoch"] >= 1, f"kill at step {kill_at}"
    assert saved["objective"]["total"] > 0 and saved["objective"]["sum"].dtype == torch.float32
    assert set(saved["objective"]["generators"]) == {"gen"}

    monkeypatch.setitem(METHODS, "gpa_test", GPAMethod())
    resumed = vp.run(vp.RunConfig(**run_values(shapes, out)))
    reference, ref_folder = gpa_reference
    assert resumed["test"] == reference["test"]
    (ref_prompt, ref_kept, ref_metrics), (prompt, kept, metrics) = gpa_outcome(ref_folder), gpa_outcome(out)
    why = f"kill at step {kill_at}"
    assert torch.equal(kept["objective"]["sum"], ref_kept["objective"]["sum"]), why  # the running average
    assert kept["objective"]["total"] == ref_kept["objective"]["total"], why
    assert torch.equal(kept["learner"]["ctx"], ref_kept["learner"]["ctx"]), why  # the last epoch's prompt
    assert torch.equal(prompt["ctx"], ref_prompt["ctx"]), why  # the final (averaged) prompt
    assert metrics == ref_metrics, why
    # The saved prompt is the average, not the last epoch's prompt.
    assert torch.equal(prompt["ctx"], kept["objective"]["sum"] / kept["objective"]["total"])
    assert not torch.equal(prompt["ctx"], kept["learner"]["ctx"])


def test_objective_state_tensors_are_stored_exactly_in_any_dtype(tmp_path):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5, 3, generator=gen) * 1e3
    tensors = {str(dt).removeprefix("torch."): values.to(dt) for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                                  torch.int64, torch.int8, torch.uint8)}
    tensors["bool"] = values > 0
    tensors["nan payload"] = torch.tensor([0x7FC00001, -0x3EEDCBA, 0x7F800000], dtype=torch.int32).view(torch.float32)
    tensors["transposed"] = values.t()  # not contiguous
    tensors["scalar"], tensors["empty"] = values[0, 0].clone(), values[:0]
    state = {"identity": {}, "learner": {}, "optimizer": {}, "generator": torch.Generator().get_state(), "epoch": 0,
             "step_in_epoch": 0, "history": [], "partial": None, "random": {}, "objective_layout": OBJECTIVE_LAYOUT,
             "objective": {"generators": {}, "average": tensors, "nested": [(tensors["bfloat16"], 1.5)]}}
    atomic_write_bytes(tmp_path / CHECKPOINT_FILE, checkpoint_bytes(state))
    got = read_checkpoint(tmp_path / CHECKPOINT_FILE)["objective"]

    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8)

    for name, t in tensors.items():
        back = got["average"][name]
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(raw(back), raw(t)), name
    assert torch.equal(got["nested"][0][0], tensors["bfloat16"]) and got["nested"][0][1] == 1.5
    with pytest.raises(TypeError, match="sparse"):
        checkpoint_bytes({**state, "objective": {"sparse": values.to_sparse()}})


def test_an_unknown_objective_layout_is_refused_in_one_line(tmp_path):
    state = {"identity": {}, "learner": {}, "optimizer": {}, "generator": torch.Generator().get_state(), "epoch": 0,
             "step_in_epoch": 0, "history": [], "partial": None, "random": {}, "objective": {},
             "objective_layout": OBJECTIVE_LAYOUT + 1}
    with pytest.raises(VlpromptError, match="objective_layout 2"):
        check_progress(state, tmp_path / CHECKPOINT_FILE, EPOCHS, 4)


# -- optimizer and backward -----------------------------------------------------------------------------------

class AdamObjective(CoOpObjective):
    def __init__(self, crash_at=None):
        super().__init__()
        self.lrs, self.steps, self.crash_at = [], 0, crash_at

    def optimizer(self, params, settings):
        self.opt = torch.optim.Adam(params, lr=settings.lr)
        return self.opt

    def loss(self, learner, batch):
        self.steps += 1
        if self.steps == self.crash_at:
            raise Crash
        return super().loss(learner, batch)

    def on_epoch_end(self, epoch, learner):
        self.lrs.append(self.opt.param_groups[0]["lr"])


class DoubledGradients(CoOpObjective):
    def backward(self, params, loss, terms):
        assert all(p.grad is None for p in params)
        (2 * loss).backward()


def test_an_objective_chooses_its_optimiser_and_the_trainer_keeps_the_schedule(bb, ds, bank, tmp_path):
    s = settings()
    results = {}
    for name, make in (("sgd", CoOpObjective), ("adam", AdamObjective), ("adam again", AdamObjective)):
        learner = learner_of(bb, ds)
        objective = make()
        train_prompt(learner, objective, bank, len(ds.train), s, progress=False)
        results[name] = (learner.ctx.detach().clone(), objective)
    assert torch.equal(results["adam"][0], results["adam again"][0])  # deterministic
    assert not torch.allclose(results["adam"][0], results["sgd"][0], atol=1e-6)  # and not SGD
    assert isinstance(results["adam"][1].opt, torch.optim.Adam)
    assert results["adam"][1].lrs == [coop_lr(e, EPOCHS, s.lr, s.warmup_epochs, s.warmup_lr) for e in range(EPOCHS)]
    # Adam's own state (moments, step counts) goes into the checkpoint: a crashed run resumes to the same prompt.
    folder = tmp_path / "adam"
    with pytest.raises(Crash):
        train_prompt(learner_of(bb, ds), AdamObjective(crash_at=7), bank, len(ds.train), s, progress=False,
                     checkpoint=Checkpointer(folder, {}, every=1))
    assert "exp_avg" in next(iter(read_checkpoint(folder / CHECKPOINT_FILE)["optimizer"]["state"].values()))
    resumed = learner_of(bb, ds)
    train_prompt(resumed, AdamObjective(), bank, len(ds.train), s, progress=False,
                 checkpoint=Checkpointer(folder, {}, every=1))
    assert torch.equal(resumed.ctx, results["adam"][0])


def test_an_objective_sets_its_own_gradients(bb, ds, bank):
    # SGD without weight decay: gradients doubled are steps of twice the learning rate, to the last bit
    # (doubling is exact in floating point), and the loss curve is the same.
    base = dict(weight_decay=0.0, warmup_epochs=0)
    doubled, plain = learner_of(bb, ds), learner_of(bb, ds)
    h1 = train_prompt(doubled, DoubledGradients(), bank, len(ds.train), settings(**base), progress=False)
    h2 = train_prompt(plain, CoOpObjective(), bank, len(ds.train), settings(**base, lr=0.004), progress=False)
    assert torch.equal(doubled.ctx, plain.ctx)
    assert [e["loss"] for e in h1["epochs"]] == [e["loss"] for e in h2["epochs"]]
    same_lr = learner_of(bb, ds)
    train_prompt(same_lr, CoOpObjective(), bank, len(ds.train), settings(**base), progress=False)
    assert not torch.equal(same_lr.ctx, doubled.ctx)


def test_a_bare_loss_function_trains_with_every_default(bb, ds, bank):
    by_function, by_objective = learner_of(bb, ds), learner_of(bb, ds)
    train_prompt(by_function, CoOpObjective().loss, bank, len(ds.train), settings(), progress=False)
    train_prompt(by_objective, CoOpObjective(), bank, len(ds.train), settings(), progress=False)
    assert torch.equal(by_function.ctx, by_objective.ctx)


def test_prograd_declares_its_backward_on_the_base_class():
    from vlprompt.methods.prograd import ProGradObjective

    assert ProGradObjective.backward is not Objective.backward
    assert "backward" in vars(Objective) and "optimizer" in vars(Objective)


# -- checkpoints of the older layout -------------------------------------------------------------------------

def test_a_checkpoint_of_the_older_layout_still_resumes(shapes, bb, tmp_path):
    """Before objectives had a state, the objective entry held its generators' states only, and the file had no
    ``objective_layout``. DualView draws from a torch and a NumPy generator of its own."""
    values = {"dataset": shapes, "method": "dualview_mi", "backbone": TINY_VIT, "pretrained": "random", "shots": 2,
              "epochs": 2, "batch_size": BATCH, "train_mode": "feature_bank", "bank_views": 2, "precision": "fp32",
              "checkpoint_every": 1, "progress": False}
    reference = vp.run(vp.RunConfig.from_sources(**values, output=str(tmp_path / "reference")), backbone=bb)
    out = tmp_path / "old"
    args = ["train", "--output", str(out), "--quiet"]
    for key, value in values.items():
        if key != "progress":
            args += ["--" + key.replace("_", "-"), str(value)]
    proc = subprocess.run([sys.executable, "-m", "vlprompt.cli", *args],
                          env={**os.environ, "VLPROMPT_FAULTS": "kill@step=6"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    path = checkpoint_folder(out) / CHECKPOINT_FILE
    state = read_checkpoint(path)
    state.pop("format")
    del state["objective_layout"]
    state["objective"] = state["objective"]["generators"]  # the older layout, as it was written
    assert set(state["objective"]) == {"gen", "rng"}
    atomic_write_bytes(path, checkpoint_bytes(state))
    old = read_checkpoint(path)
    assert "objective_layout" not in old and objective_state(old) == {"generators": old["objective"]}

    from vlprompt.methods.dualview import DualViewObjective, DualViewOptions

    objective = DualViewObjective(DualViewOptions())
    objective.load_state_dict(objective_state(old))
    assert torch.equal(objective.gen.get_state(), old["objective"]["gen"][1])
    assert objective.rng.bit_generator.state == old["objective"]["rng"][1]

    resumed = vp.run(vp.RunConfig.from_sources(**values, output=str(out)), backbone=bb)
    assert resumed["test"] == reference["test"]
    assert without_seconds(resumed["train"]["epochs"]) == without_seconds(reference["train"]["epochs"])
    a = load_file(str(out / "prompt" / "prompt.safetensors"))
    b = load_file(str(tmp_path / "reference" / "prompt" / "prompt.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_seconds(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in epochs]
