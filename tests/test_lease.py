"""Leases on run folders: a live lease of another process refuses the run in one line; an expired one, or one whose
owner on this host is dead, is taken over; the heartbeat renews it; a process whose lease was taken over writes
neither a checkpoint nor its run folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from support import TINY_VIT

import vlprompt as vp
from vlprompt.engine.checkpoint import CHECKPOINT_FILE, Checkpointer
from vlprompt.engine.lease import Lease, lease_path
from vlprompt.engine.run import run
from vlprompt.engine.run_folder import this_host


def cfg(shapes, out: Path):
    return vp.RunConfig(dataset=shapes, method="coop", backbone=TINY_VIT, pretrained="random", shots=1, epochs=1,
                        output=str(out), progress=False)


def plant(out: Path, owner: str, age: float, seconds: float = 120.0) -> Path:
    path = lease_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"owner": owner, "token": "theirs", "seconds": seconds}))
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_a_live_lease_of_another_process_refuses_the_run(shapes, bb, tmp_path):
    out = tmp_path / "run"
    plant(out, "node7-4242", age=5)
    with pytest.raises(vp.VlpromptError, match=r"is being run by node7-4242 \(its lease was renewed 5s ago"):
        run(cfg(shapes, out), backbone=bb)
    assert not out.exists() and json.loads(lease_path(out).read_text())["token"] == "theirs"  # left as it was


def test_an_expired_lease_is_taken_over(shapes, bb, tmp_path):
    out = tmp_path / "run"
    plant(out, "node7-4242", age=200, seconds=120)
    m = run(cfg(shapes, out), backbone=bb)
    assert m["test"]["n"] > 0 and (out / "metrics.json").is_file()
    assert not lease_path(out).exists()  # released when the run ended


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(shapes, bb, tmp_path):
    out = tmp_path / "run"
    dead = 2 ** 22 + 12345  # beyond any pid this machine hands out
    plant(out, f"{this_host()}-{dead}", age=0)
    run(cfg(shapes, out), backbone=bb)
    assert (out / "metrics.json").is_file()


def test_the_heartbeat_renews_the_lease(tmp_path):
    out = tmp_path / "run"
    lease = Lease.acquire(out, seconds=0.4)
    try:
        then = time.time() - 10
        os.utime(lease_path(out), (then, then))
        time.sleep(0.35)  # at least one beat (every 0.1 s)
        assert time.time() - lease_path(out).stat().st_mtime < 0.3
        with pytest.raises(vp.VlpromptError, match="is being run by"):
            Lease.acquire(out, seconds=0.4)  # renewed: not expired
    finally:
        lease.release()
    assert not lease_path(out).exists()


def test_a_process_whose_lease_was_taken_over_writes_nothing(tmp_path):
    out = tmp_path / "run"
    lease = Lease.acquire(out)
    checkpoint = Checkpointer(tmp_path / ".run.checkpoint", {"seed": 1}, lease=lease)
    checkpoint.save({"learner": {"w": torch.zeros(1)}})
    assert checkpoint.path.is_file()
    first = checkpoint.path.read_bytes()
    plant(out, "node9-7", age=0)  # a retry elsewhere took the run over
    with pytest.raises(vp.VlpromptError, match="lease on run lost to node9-7: this process stops without writing the "
                                               "checkpoint"):
        checkpoint.save({"learner": {"w": torch.ones(1)}})
    assert checkpoint.path.read_bytes() == first
    with pytest.raises(vp.VlpromptError, match="without writing the run folder"):
        lease.check("the run folder")
    lease.release()
    assert json.loads(lease_path(out).read_text())["owner"] == "node9-7"  # the new holder's lease stays
    assert (tmp_path / ".run.checkpoint" / CHECKPOINT_FILE).is_file()


def test_the_lease_duration_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VLPROMPT_LEASE_SECONDS", "nope")
    with pytest.raises(vp.VlpromptError, match="VLPROMPT_LEASE_SECONDS='nope': expected a positive number"):
        Lease.acquire(tmp_path / "run")
    monkeypatch.setenv("VLPROMPT_LEASE_SECONDS", "30")
    lease = Lease.acquire(tmp_path / "run")
    assert lease.seconds == 30 and json.loads(lease_path(tmp_path / "run").read_text())["seconds"] == 30
    lease.release()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"owner": "a", "token": "b", "seconds": "soon"}'])
def test_a_damaged_lease_file_is_one_line_and_expires_like_any_other(text, tmp_path):
    out = tmp_path / "run"
    path = lease_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    with pytest.raises(vp.VlpromptError, match=r"is being run by an unknown process \(unreadable lease file\)"):
        Lease.acquire(out)
    then = time.time() - 1000
    os.utime(path, (then, then))
    lease = Lease.acquire(out)  # expired: taken over
    assert lease.holds()
    lease.release()
