"""The ray executor on a real local Ray cluster started here (2 CPUs and one logical GPU, so that two runs of half a
GPU each are packed on it): the same run folders' results and report as the local executor; a worker killed
mid-run is replaced and its run retried; a run that raises is recorded failed and the rest finish; the driver killed
with kill -9 leaves no worker and the same command resumes without redoing finished runs; bad options and a
missing extra are one line each. No part of Ray is mocked."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import TINY_VIT, alive, start_study_to_kill, study_outcomes

from vlprompt.cli import main

if not os.environ.get("CI"):
    pytest.importorskip("ray")  # scripts/setup.sh installs it; CI must not skip these tests

TINY = ["--backbone", TINY_VIT, "--pretrained", "random", "--epochs", "2", "--seeds", "1,2", "--quiet"]
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A Ray head node of 2 CPUs and 1 logical GPU; its address. Authentication is off for this throwaway
    cluster (a driver would otherwise need the token of the session that started it)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("VLPROMPT_FAULTS", None)
    started = subprocess.run([str(RAY), "start", "--head", "--num-cpus=2", "--num-gpus=1", f"--port={_free_port()}",
                              "--include-dashboard=false", "--disable-usage-stats"], env=env, capture_output=True,
                             text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    address = re.search(r"--address='([^']+)'", started.stdout + started.stderr).group(1)
    yield address
    subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def local(shapes, tmp_path_factory):
    """The reference: the same study by the local executor; its folder and printed report."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("local") / "study"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["study", "fewshot", "--datasets", shapes, "--methods", "zeroshot,coop,kgcoop", "--shots", "1",
                     *TINY, "--output", str(out)]) == 0
    return out, printed.getvalue().split("report:")[0]


def test_ray_gives_the_local_results_with_two_runs_packed_on_one_gpu(cluster, shapes, local, tmp_path, capsys):
    out = tmp_path / "ray"
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "zeroshot,coop,kgcoop", "--shots", "1",
                 *TINY, "--output", str(out), "--executor", "ray", "--address", cluster, "--gpus-per-run", "0.5",
                 "--cpus-per-run", "1"]) == 0
    report = capsys.readouterr().out.split("report:")[0]
    reference, ray = study_outcomes(local[0]), study_outcomes(out)
    assert reference.keys() == ray.keys() and len(ray) == 5
    for uid in ray:
        assert reference[uid][:3] == ray[uid][:3], uid  # test results, tensors and keys, exactly
        execution = ray[uid][3]
        assert execution["executor"] == "ray" and execution["attempt"] == 1 and execution["device"] == "cpu"
        assert execution["gpus"] == ["0"]  # half of the one logical GPU each
    assert {r[3]["worker"] for r in ray.values()} == {0, 1}  # both workers, on one GPU, ran units
    assert report == local[1].replace(str(local[0]), str(out))


def test_a_killed_ray_worker_is_replaced_and_its_run_retried(cluster, shapes, local, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLPROMPT_FAULTS", "kill@step=2")  # the first workers die at their second training step
    out = tmp_path / "killed"
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "coop", "--shots", "1", *TINY,
                 "--output", str(out), "--executor", "ray", "--address", cluster, "--max-retries", "1"]) == 0
    capsys.readouterr()
    runs, reference = study_outcomes(out), study_outcomes(local[0])
    assert len(runs) == 2 and all(r[3]["attempt"] == 2 for r in runs.values())
    assert all(runs[uid][:3] == reference[uid][:3] for uid in runs)
    # past its retries, a dying run is that run's failure
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "coop", "--shots", "1", *TINY,
                 "--output", str(tmp_path / "dies"), "--executor", "ray", "--address", cluster,
                 "--max-retries", "0"]) == 1
    assert "its Ray worker died in each of 1 attempts" in capsys.readouterr().out


def test_a_run_that_raises_is_recorded_failed_and_the_rest_finish(cluster, shapes, tmp_path, capsys):
    out = tmp_path / "s"
    # ivlp's recipe depth (12) does not fit the 2-block tiny towers
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "zeroshot,ivlp", "--shots", "1", *TINY,
                 "--output", str(out), "--executor", "ray", "--address", cluster]) == 1
    capsys.readouterr()
    index = {u["uid"]: u for u in json.loads((out / "index.json").read_text())["units"]}
    assert len(index) == 3
    for uid, unit in index.items():
        if "/ivlp/" in uid:
            assert unit["state"] == "failed" and "depth_text=12" in unit["error"], unit
        else:
            assert unit["state"] == "done", unit


def test_a_killed_driver_leaves_no_ray_worker_and_the_same_command_resumes(cluster, shapes, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "fewshot", "--datasets", shapes, "--methods", "coop", "--shots", "1", "--backbone", TINY_VIT,
            "--pretrained", "random", "--epochs", "60", "--seeds", "1,2,3,4", "--quiet", "--output", str(out),
            "--executor", "ray", "--address", cluster]
    driver, units = start_study_to_kill(args, out)
    assert _ray_workers()  # its actors, running
    driver.kill()
    driver.wait()
    finished = {u["uid"]: u["seconds"] for u in units if u["state"] == "done"}
    deadline = time.time() + 60
    while _ray_workers() and time.time() < deadline:  # Ray ends the actors of a driver that is gone
        time.sleep(0.5)
    assert not _ray_workers()
    assert main(args) == 0
    capsys.readouterr()
    after = {u["uid"]: u for u in json.loads((out / "index.json").read_text())["units"]}
    assert all(u["state"] == "done" for u in after.values()) and len(after) == 4
    assert all(after[uid]["seconds"] == seconds for uid, seconds in finished.items())  # not run again


def _ray_workers() -> list:
    """The live processes of vlprompt's Ray actors (Ray titles them after the actor class)."""
    found = subprocess.run(["pgrep", "-f", "ray::RayWorker"], capture_output=True, text=True).stdout.split()
    return [pid for pid in found if alive(pid)]


@pytest.mark.parametrize("options, message", [
    (["--gpus-per-run", "2"], "the cluster cannot hold one run of 1 CPU(s) and 2 GPU(s): it has 2 CPU(s), 1 GPU(s)"),
    (["--gpus-per-run", "1.5"], "--gpus-per-run 1.5: a fraction of one GPU, or whole GPUs"),
    (["--cpus-per-run", "0"], "--cpus-per-run must be > 0"),
    (["--threads-per-worker", "1"], "executor ray takes no --threads-per-worker (an option of pool)"),
])
def test_bad_ray_options_are_one_line(cluster, shapes, tmp_path, capsys, options, message):
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "coop", "--shots", "1", *TINY,
                 "--output", str(tmp_path / "s"), "--executor", "ray", "--address", cluster, *options]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_no_cluster_at_the_address_is_one_line_at_once(shapes, tmp_path, capsys):
    t = time.time()
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "coop", *TINY, "--output",
                 str(tmp_path / "s"), "--executor", "ray", "--address", f"127.0.0.1:{_free_port()}"]) == 2
    assert "no Ray cluster at --address 127.0.0.1:" in capsys.readouterr().err and time.time() - t < 30


def test_without_the_extra_the_ray_executor_is_one_line_before_any_work(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: `import ray` raises ImportError
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "coop", *TINY, "--output",
                 str(tmp_path / "s"), "--executor", "ray"]) == 2
    assert capsys.readouterr().err.strip() == ('vlprompt: error: executor ray needs Ray, an optional extra: '
                                               'pip install "vlprompt[ray]"')
    assert not (tmp_path / "s").exists()
