"""Study executors: a study run by the pool executor (worker processes, each with its own thread budget) gives the
same run folders' results and report as the local one; dependencies (an evaluation after its training run) hold; a
run that raises is recorded failed and the rest finish; a worker killed mid-run is replaced and its run retried."""

from __future__ import annotations

import json

from support import TINY_VIT, alive, start_study_to_kill, study_outcomes as outcomes

from vlprompt.cli import main

TINY = ["--backbone", TINY_VIT, "--pretrained", "random", "--epochs", "2", "--seeds", "1,2", "--quiet"]


def test_pool_gives_the_local_results(shapes, tmp_path, capsys):
    args = ["study", "fewshot", "--datasets", shapes, "--methods", "zeroshot,coop,kgcoop", "--shots", "1", *TINY]
    assert main([*args, "--output", str(tmp_path / "local")]) == 0
    local_report = capsys.readouterr().out.split("report:")[0]
    assert main([*args, "--output", str(tmp_path / "pool"), "--executor", "pool", "--workers", "2",
                 "--threads-per-worker", "1"]) == 0
    pool_report = capsys.readouterr().out.split("report:")[0]
    local, pool = outcomes(tmp_path / "local"), outcomes(tmp_path / "pool")
    assert local.keys() == pool.keys() and len(local) == 5  # zero-shot once, coop and kgcoop x 2 seeds
    for uid in local:
        assert local[uid][:3] == pool[uid][:3], uid  # test results, tensors and keys, exactly
        assert local[uid][3]["executor"] == "local" and pool[uid][3]["executor"] == "pool"
        assert pool[uid][3]["attempt"] == 1 and pool[uid][3]["worker"] in (0, 1) and pool[uid][3]["device"] == "cpu"
    assert {p[3]["worker"] for p in pool.values()} == {0, 1}  # both workers ran units
    assert local_report == pool_report.replace(str(tmp_path / "pool"), str(tmp_path / "local"))


def test_pool_keeps_dependencies_and_records_failures(shapes, tmp_path, capsys):
    out = tmp_path / "b2n"
    # ivlp's recipe depth (12) does not fit the 2-block tiny towers: its runs fail, the rest finish
    assert main(["study", "base2new", "--datasets", shapes, "--methods", "coop,ivlp", "--shots", "1", *TINY,
                 "--output", str(out), "--executor", "pool", "--workers", "2"]) == 1
    printed = capsys.readouterr().out
    index = {u["uid"]: u for u in json.loads((out / "index.json").read_text())["units"]}
    for uid, unit in index.items():
        if "/coop/" in uid:
            assert unit["state"] == "done", unit
        else:
            assert unit["state"] == "failed"
            assert ("depth_text=12" in unit["error"]) if uid.endswith("base") else "did not finish" in unit["error"]
    assert "failed:" in printed
    new = json.loads(next(out.rglob("coop/*/new/metrics.json")).read_text())
    assert new["kind"] == "eval" and new["execution"]["executor"] == "pool"


def test_a_killed_worker_is_replaced_and_its_run_retried(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLPROMPT_FAULTS", "kill@step=2")  # the first workers die at their second training step
    out = tmp_path / "killed"
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "coop", "--shots", "1", *TINY,
                 "--output", str(out), "--executor", "pool", "--workers", "2", "--max-retries", "1"]) == 0
    capsys.readouterr()
    runs = outcomes(out)
    assert len(runs) == 2 and all(r[3]["attempt"] == 2 for r in runs.values())
    monkeypatch.delenv("VLPROMPT_FAULTS")
    reference = tmp_path / "reference"
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "coop", "--shots", "1", *TINY,
                 "--output", str(reference)]) == 0
    assert {k: v[:3] for k, v in outcomes(reference).items()} == {k: v[:3] for k, v in runs.items()}


def test_past_its_retries_a_dying_run_is_recorded_failed(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLPROMPT_FAULTS", "kill@step=2")
    out = tmp_path / "killed"
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "coop", "--shots", "1", *TINY,
                 "--output", str(out), "--executor", "pool", "--workers", "1", "--max-retries", "0"]) == 1
    printed = capsys.readouterr().out
    assert "its worker process died (exit code -9) in each of 1 attempts" in printed


def test_local_takes_no_pool_options(shapes, tmp_path, capsys):
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "zeroshot", *TINY, "--output",
                 str(tmp_path / "s"), "--workers", "2"]) == 2
    assert "executor local takes no --workers (an option of pool and ray)" in capsys.readouterr().err


def test_a_driver_killed_mid_study_leaves_no_worker_and_resumes(shapes, tmp_path, capsys):
    import subprocess
    import time

    out = tmp_path / "study"
    args = ["study", "fewshot", "--datasets", shapes, "--methods", "coop", "--shots", "1", "--backbone", TINY_VIT,
            "--pretrained", "random", "--epochs", "60", "--seeds", "1,2,3,4", "--quiet", "--output", str(out),
            "--executor", "pool", "--workers", "2"]
    driver, units = start_study_to_kill(args, out)
    helpers = subprocess.run(["pgrep", "-P", str(driver.pid)], capture_output=True, text=True).stdout.split()
    workers = [w for h in helpers  # forked by the fork server, a child of the driver
               for w in subprocess.run(["pgrep", "-P", h], capture_output=True, text=True).stdout.split()]
    driver.kill()
    driver.wait()
    finished = {u["uid"]: u["seconds"] for u in units if u["state"] == "done"}
    time.sleep(1.0)
    assert workers and not [w for w in workers if alive(w)]  # they died with the driver
    deadline = time.monotonic() + 20  # the fork server and resource tracker end when their pipes from it close
    while [h for h in helpers if alive(h)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert helpers and not [h for h in helpers if alive(h)]
    assert main(args) == 0
    capsys.readouterr()
    after = {u["uid"]: u for u in json.loads((out / "index.json").read_text())["units"]}
    assert all(u["state"] == "done" for u in after.values()) and len(after) == 4
    assert all(after[uid]["seconds"] == seconds for uid, seconds in finished.items())  # not run again


def test_the_eta_counts_running_units_and_shares_the_work_among_the_slots(monkeypatch):
    from types import SimpleNamespace

    from vlprompt.protocols import study

    def unit(method, kind="run"):
        return SimpleNamespace(role={"method": method}, kind=kind)

    durations = {"coop/run": [100.0, 200.0], "zeroshot/run": [10.0]}  # means 150 and 10; all three: 310 / 3
    monkeypatch.setattr(study.time, "monotonic", lambda: 1000.0)
    waiting = [unit("coop"), unit("coop"), unit("zeroshot")]  # 150 + 150 + 10
    running = [(unit("coop"), 1000.0 - 60.0), (unit("coop"), 1000.0 - 400.0)]  # 90 left, and overdue: 0
    assert study._eta(waiting, running, durations, slots=1) == f"ETA {study._fmt_s(400.0)}"
    assert study._eta(waiting, running, durations, slots=2) == "ETA 3.3 min"  # 200 s
    # a method with no finished unit yet is guessed at the mean of all finished units, and marked so
    assert study._eta([unit("kgcoop")], [], durations, slots=1) == f"ETA ~{study._fmt_s(310.0 / 3)}"
    assert study._eta(waiting, [], {}, slots=2) == "ETA after the first run"


def test_a_backbone_the_workers_could_not_load_is_one_line_before_they_start(shapes, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "coop", *TINY, "--weights",
                 str(tmp_path / "missing.pt"), "--output", str(out), "--executor", "pool", "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"vlprompt: error: weights file not found: {tmp_path / 'missing.pt'}"
    assert not list(out.rglob("metrics.json"))
