"""Studies and reports: the protocols' arithmetic, resuming, failures, kill -9, and reports that equal a
direct computation over the run folders."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

import vlprompt as vp
from vlprompt.cli import main
from vlprompt.data import make_synthetic_dataset
from vlprompt.protocols.report import aggregate, harmonic_mean
from vlprompt.protocols.store import RunRecord, collect
from vlprompt.protocols.study import MethodSpec, StudySpec, load_study_file, run_study

TINY = ["--backbone", "vlprompt-tiny-ViT", "--pretrained", "random"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=4,
                                  n_test_per_class=5, seed=0)


def rec(protocol, dataset, method, top1, seed=1, shots=16, split="all", source=None, method_type=None):
    return RunRecord(folder=Path("."), protocol=protocol, dataset=dataset, source=source or dataset, method=method,
                     method_type=method_type or method, backbone="RN50", shots=shots, seed=seed, split=split,
                     top1=top1, top5=None, random=False, config={})


def by(rows, **kw):
    hits = [r for r in rows if all(r[k] == v for k, v in kw.items())]
    assert len(hits) == 1, (kw, hits)
    return hits[0]


# -- arithmetic against hand-computed values --------------------------------------------------------------------

def test_base2new_h_from_seed_averaged_base_and_new_and_the_average_row():
    records = [rec("base2new", "a", "m", v, seed=s, split=sp) for sp, vals in
               (("base", (80.0, 90.0)), ("new", (60.0, 70.0))) for s, v in zip((1, 2), vals)]
    records += [rec("base2new", "b", "m", v, seed=s, split=sp) for sp, vals in
                (("base", (50.0, 50.0)), ("new", (100.0, 100.0))) for s, v in zip((1, 2), vals)]
    rows = aggregate(records)
    # Dataset a: B = 85, N = 65 (seed means), H = 2*85*65/150, not the mean of per-seed H values.
    assert by(rows, dataset="a", metric="base")["mean"] == 85.0
    assert by(rows, dataset="a", metric="base")["std"] == pytest.approx(5.0)  # population std of 80, 90
    assert by(rows, dataset="a", metric="h")["mean"] == pytest.approx(2 * 85 * 65 / 150)
    per_seed_h = (2 * 80 * 60 / 140 + 2 * 90 * 70 / 160) / 2
    assert by(rows, dataset="a", metric="h")["mean"] != pytest.approx(per_seed_h)
    # Average row: mean B = 67.5, mean N = 82.5, H of those (SPEC 8.14), not the mean of the datasets' H.
    assert by(rows, dataset="average", metric="base")["mean"] == 67.5
    assert by(rows, dataset="average", metric="new")["mean"] == 82.5
    h = by(rows, dataset="average", metric="h")["mean"]
    assert h == pytest.approx(2 * 67.5 * 82.5 / 150)
    h_b = 2 * 50 * 100 / 150
    assert h != pytest.approx((2 * 85 * 65 / 150 + h_b) / 2)
    assert by(rows, dataset="average", metric="h")["n"] == 2
    # SPEC 8.14's check on the published averages.
    assert round(harmonic_mean(69.34, 74.22), 2) == 71.70 and round(harmonic_mean(82.69, 63.22), 2) == 71.66


def test_fewshot_mean_population_std_zeroshot_at_zero_and_averages():
    records = [rec("fewshot", "a", "coop", v, seed=s, shots=1) for s, v in zip((1, 2, 3), (10.0, 20.0, 30.0))]
    records += [rec("fewshot", "b", "coop", 40.0, seed=1, shots=1)]
    records += [rec("fewshot", "a", "zs", 55.0, shots=0, seed=None, method_type="zeroshot"),
                rec("fewshot", "b", "zs", 45.0, shots=0, seed=None, method_type="zeroshot")]
    rows = aggregate(records)
    a = by(rows, dataset="a", method="coop", shots=1)
    assert a["mean"] == 20.0 and a["n"] == 3
    assert a["std"] == pytest.approx(math.sqrt(((10 - 20) ** 2 + 0 + (30 - 20) ** 2) / 3))  # ddof = 0
    assert by(rows, dataset="average", method="coop", shots=1)["mean"] == 30.0  # mean of dataset means
    assert by(rows, dataset="average", method="zs", shots=0)["mean"] == 50.0


def test_transfer_average_excludes_the_source():
    records = [rec("xd", "src", "coop", 90.0, source="src"), rec("xd", "t1", "coop", 40.0, source="src"),
               rec("xd", "t2", "coop", 60.0, source="src"), rec("xd", "t2", "coop", 80.0, source="src", seed=2)]
    rows = aggregate(records)
    assert by(rows, dataset="t2")["mean"] == 70.0 and by(rows, dataset="t2")["std"] == 10.0
    assert by(rows, dataset="average")["mean"] == 55.0 and by(rows, dataset="average")["n"] == 2


def test_published_numbers_are_shown_beside_matching_rows():
    records = [rec("fewshot", "caltech101", "zeroshot", 86.0, shots=0, seed=None)]
    row = by(aggregate(records), dataset="caltech101")
    assert row["published"] == 86.29 and row["diff"] == pytest.approx(86.0 - 86.29)
    assert row["published_source"] == "CoOp IJCV Fig. 3 [R]"  # the source and its confidence
    other = by(aggregate([rec("fewshot", "caltech101", "cpt", 86.0, shots=16)]), dataset="caltech101")
    assert other["published"] is None  # no published CPT numbers


# -- studies end to end on generated data ------------------------------------------------------------------------

def direct_rows(study_dir: Path) -> dict:
    """(dataset, method, split) -> seed-mean accuracy, read straight from every metrics.json."""
    values: dict = {}
    for path in (study_dir / "runs").rglob("metrics.json"):
        m = json.loads(path.read_text())
        method = path.relative_to(study_dir / "runs").parts[1]
        values.setdefault((m["dataset"], method, m["data"]["subsample"]), []).append(m["test"]["accuracy"])
    return {k: sum(v) / len(v) for k, v in values.items()}


def test_base2new_study_report_equals_the_run_folders(shapes, tmp_path, capsys):
    out = tmp_path / "b2n"
    args = ["study", "base2new", "--datasets", shapes, "--methods", "zeroshot,coop", "--seeds", "1,2",
            "--shots", "2", *TINY, "--epochs", "1", "--output", str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Base-to-new" in printed and f"| {Path(shapes).name} | coop |" in printed
    index = json.loads((out / "index.json").read_text())
    assert [u["state"] for u in index["units"]].count("done") == 6  # 2 zero-shot + 2 seeds x (base, new)
    assert (out / "study.yaml").is_file()
    assert main(["report", str(out), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    direct = direct_rows(out)
    ds = Path(shapes).name
    for method in ("zeroshot", "coop"):
        b, n = direct[(ds, method, "base")], direct[(ds, method, "new")]
        assert by(rows, dataset=ds, method=method, metric="base")["mean"] == pytest.approx(b, abs=1e-9)
        assert by(rows, dataset=ds, method=method, metric="new")["mean"] == pytest.approx(n, abs=1e-9)
        assert by(rows, dataset=ds, method=method, metric="h")["mean"] == pytest.approx(2 * b * n / (b + n))
    assert {"protocol", "dataset", "method", "backbone", "shots", "metric", "mean", "std", "n"} <= set(rows[0])
    assert all(r["random"] for r in rows)
    # New-class evaluations rebuilt the prompts from the new half's names.
    new = json.loads((out / "runs" / ds / "coop" / "2shots_seed1" / "new" / "metrics.json").read_text())
    base = json.loads((out / "runs" / ds / "coop" / "2shots_seed1" / "base" / "metrics.json").read_text())
    assert new["kind"] == "eval" and new["data"]["subsample"] == "new"
    assert not set(new["data"]["classnames"]) & set(base["data"]["classnames"])
    report = out / "report"
    assert list(report.glob("base2new_*.png")) and list(report.glob("base2new_*.pdf"))
    links = re.findall(r'(?:src|href)="([^"]+)"', (report / "index.html").read_text())
    assert links and all((report / unquote(link)).is_file() for link in links)
    assert not [link for link in links if "://" in link]


def test_resume_skips_finished_runs_by_configuration(shapes, tmp_path):
    spec = StudySpec("fewshot", [MethodSpec("coop")], datasets=[shapes], shots=[1], seeds=[1, 2],
                     settings={"backbone": "vlprompt-tiny-ViT", "pretrained": "random", "epochs": 1})
    first = run_study(spec, tmp_path / "s", progress=False)
    assert (first.done, first.skipped) == (2, 0)
    metrics = sorted((tmp_path / "s" / "runs").rglob("metrics.json"))
    stamps = [p.stat().st_mtime_ns for p in metrics]
    again = run_study(spec, tmp_path / "s", progress=False)
    assert (again.done, again.skipped) == (0, 2)
    assert [p.stat().st_mtime_ns for p in metrics] == stamps
    # Another configuration under the same folder names is not mistaken for the finished one.
    spec.settings["epochs"] = 2
    changed = run_study(spec, tmp_path / "s", progress=False)
    assert (changed.done, changed.skipped) == (2, 0)
    assert all(json.loads(p.read_text())["recipe"]["epochs"] == 2 for p in metrics)
    assert run_study(spec, tmp_path / "s", progress=False, rerun=True).done == 2


def test_a_failed_run_is_recorded_and_the_others_go_on(shapes, tmp_path, capsys):
    out = tmp_path / "f"
    missing = str(tmp_path / "no-such-dataset")
    args = ["study", "fewshot", "--datasets", f"{missing},{shapes}", "--methods", "coop", "--shots", "1",
            "--seeds", "1", *TINY, "--epochs", "1", "--output", str(out), "--quiet"]
    assert main(args) == 1
    printed = capsys.readouterr().out
    units = {u["uid"]: u for u in json.loads((out / "index.json").read_text())["units"]}
    bad = units["no-such-dataset/coop/1shots_seed1"]
    assert bad["state"] == "failed" and "no-such-dataset" in bad["error"] and "\n" not in bad["error"]
    assert units[f"{Path(shapes).name}/coop/1shots_seed1"]["state"] == "done"
    assert "failed: no-such-dataset/coop/1shots_seed1" in printed
    # Kept failed on a plain re-run, tried again with --retry-failed.
    result = run_study(load_study_file(str(out / "study.yaml")), out, progress=False)
    assert (result.done, result.skipped, len(result.failed)) == (0, 1, 1)
    os.makedirs(missing)
    make_synthetic_dataset(missing, n_train_per_class=2, n_test_per_class=2, seed=3)
    result = run_study(load_study_file(str(out / "study.yaml")), out, progress=False, retry_failed=True)
    assert (result.done, result.skipped, result.failed) == (1, 1, [])


def test_study_file_with_method_variants_is_written_resolved_and_rerunnable(shapes, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(f"""
protocol: xd
source: {shapes}
targets: [{shapes}2]
seeds: [1]
shots: [2]
backbone: vlprompt-tiny-ViT
pretrained: random
epochs: 1
methods:
  - zeroshot
  - method: coop
    label: coop_m2
    overrides: {{n_ctx: 2, ctx_init: null}}
  - method: kgcoop
    options: {{weight: 2.0}}
    overrides: {{batch_size: 8}}
""")
    make_synthetic_dataset(f"{shapes}2", n_train_per_class=2, n_test_per_class=3, seed=5)
    out = tmp_path / "xd"
    assert main(["study", "run", str(path), "--output", str(out), "--quiet"]) == 0
    resolved = load_study_file(str(out / "study.yaml"))
    assert [m.label for m in resolved.methods] == ["zeroshot", "coop_m2", "kgcoop"]
    assert resolved.settings["epochs"] == 1 and resolved.methods[2].options == {"weight": 2.0}
    cfg = json.loads((out / "runs" / "coop_m2" / "2shots_seed1" / Path(shapes).name / "metrics.json").read_text())
    assert cfg["recipe"]["batch_size"] == 32
    kg = json.loads((out / "runs" / "kgcoop" / "2shots_seed1" / Path(shapes).name / "metrics.json").read_text())
    assert kg["method_options"]["weight"] == 2.0 and kg["recipe"]["batch_size"] == 8
    target = json.loads((out / "runs" / "kgcoop" / "2shots_seed1" / (Path(shapes).name + "2") /
                         "metrics.json").read_text())
    assert target["kind"] == "eval" and target["prompt"]["trained_on"] == Path(shapes).name
    result = run_study(resolved, out, progress=False)
    assert result.done == 0 and result.skipped == result.total == 3 * 2
    rows = aggregate(collect(out))
    assert {r["dataset"] for r in rows if r["protocol"] == "xd"} == {Path(shapes).name, Path(shapes).name + "2",
                                                                     "average"}


@pytest.mark.parametrize("text, match", [
    ("protocol: nope\nmethods: [coop]\ndatasets: [x]", "protocol 'nope'"),
    ("protocol: fewshot\nmethods: [coop]\ndatasets: [x]\nbogus: 1", "unknown key 'bogus'"),
    ("protocol: fewshot\nmethods: [nosuch]\ndatasets: [x]", "unknown method 'nosuch'"),
    ("protocol: fewshot\nmethods: [{method: cpt, options: {nosuch: 1}}]\ndatasets: [x]", "unknown option 'nosuch'"),
    ("protocol: fewshot\nmethods: [coop, coop]\ndatasets: [x]", "label 'coop' is used twice"),
    ("protocol: fewshot\nmethods: [coop]\ndatasets: [x]\nlr: -1", "lr: must be a finite number > 0"),
    ("methods: [coop]", "missing key 'protocol'"),
])
def test_bad_study_files_are_one_line_before_any_work(tmp_path, capsys, text, match):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    assert main(["study", "run", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "runs").exists()


# -- kill -9 ----------------------------------------------------------------------------------------------------

def _study_cmd(shapes, out):
    return [sys.executable, "-m", "vlprompt.cli", "study", "fewshot", "--datasets", shapes, "--methods",
            "zeroshot,coop", "--shots", "1,2", "--seeds", "1,2", *TINY, "--epochs", "3", "--output", str(out),
            "--quiet"]


def test_kill_9_loses_nothing_finished_and_resumes_to_the_same_tables(shapes, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(_study_cmd(shapes, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    done = []
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                units = json.loads((out / "index.json").read_text())["units"]
            except (OSError, ValueError):
                units = []
            done = [u["uid"] for u in units if u["state"] == "done"]
            if len(done) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the study finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = {uid: (out / "runs" / uid / "metrics.json").read_bytes() for uid in done}
    for path in out.rglob("*.json"):  # every visible file is complete
        if not any(p.startswith(".") for p in path.relative_to(out).parts):
            json.loads(path.read_text())
    resumed = subprocess.run(_study_cmd(shapes, out), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for uid, content in finished.items():  # finished runs were not redone
        assert (out / "runs" / uid / "metrics.json").read_bytes() == content
    assert not [p for p in out.rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp")]
    clean = tmp_path / "clean"
    subprocess.run(_study_cmd(shapes, clean), env=env, check=True, capture_output=True, timeout=300)
    assert aggregate(collect(out)) == aggregate(collect(clean))
    assert len(aggregate(collect(out))) == 1 + 2  # zero-shot + coop at 1 and 2 shots (one dataset: no average)


def test_a_study_resumes_its_interrupted_run_from_its_checkpoint(shapes, tmp_path):
    """Killed inside a training run (after its 5th step, of 8: one batch per epoch), the study's next start
    continues that run from its checkpoint, and the tables equal an uninterrupted study's."""
    base = [sys.executable, "-m", "vlprompt.cli", "study", "fewshot", "--datasets", shapes, "--methods", "coop",
            "--shots", "2", "--seeds", "1", *TINY, "--epochs", "8", "--checkpoint-every", "1"]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run(base + ["--output", str(out)], env={**env, "VLPROMPT_FAULTS": "kill@step=5"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = list(out.rglob("*.checkpoint"))
    assert len(checkpoints) == 1
    resumed = subprocess.run(base + ["--output", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # killed after step 5, before its epoch-end checkpoint: it continues from the end of epoch 4
    assert "resuming from" in resumed.stderr and "epoch 5, step 1 of 1" in resumed.stderr
    assert not list(out.rglob("*.checkpoint"))
    clean = tmp_path / "clean"
    subprocess.run(base + ["--output", str(clean), "--quiet"], env=env, check=True, capture_output=True, timeout=300)
    assert aggregate(collect(out)) == aggregate(collect(clean))


# -- real data ---------------------------------------------------------------------------------------------------

def test_base2new_and_xd_studies_on_real_images(caltech_root, cifar10_dir, tmp_path, capsys):
    out = tmp_path / "b2n"
    common = [*TINY, "--epochs", "1", "--seeds", "1", "--shots", "4", "--quiet"]
    assert main(["study", "base2new", "--datasets", "caltech101", "--root", str(caltech_root), "--methods",
                 "zeroshot,coop", "--output", str(out), *common]) == 0
    rows = aggregate(collect(out))
    base = by(rows, dataset="caltech101", method="coop", metric="base")
    new = by(rows, dataset="caltech101", method="coop", metric="new")
    assert by(rows, dataset="caltech101", method="coop", metric="h")["mean"] == pytest.approx(
        harmonic_mean(base["mean"], new["mean"]))
    zs_new = json.loads((out / "runs" / "caltech101" / "zeroshot" / "zeroshot" / "new" / "metrics.json").read_text())
    every = vp.load_dataset("caltech101", str(caltech_root)).classnames
    assert zs_new["data"]["num_classes"] == 50 and zs_new["data"]["classnames"] == every[50:]
    capsys.readouterr()
    xd = tmp_path / "xd"
    assert main(["study", "xd", "--source", "caltech101", "--root", str(caltech_root), "--targets",
                 str(cifar10_dir), "--methods", "coop", "--output", str(xd), *common]) == 0
    printed = capsys.readouterr().out
    assert "Cross-dataset" in printed and "cifar10" in printed
    target = json.loads((xd / "runs" / "coop" / "4shots_seed1" / "cifar10" / "metrics.json").read_text())
    assert target["data"]["num_classes"] == 10 and target["data"]["template"] == "a photo of a {}."
    assert target["data"]["n_test"] == 10000 and target["prompt"]["trained_on"] == "caltech101"


def test_report_on_a_folder_of_loose_runs_in_every_format(shapes, tmp_path, capsys):
    loose = tmp_path / "loose"
    train = ["train", "--dataset", shapes, *TINY, "--shots", "2", "--epochs", "1", "--n-ctx", "2", "--quiet"]
    assert main([*train, "--subsample", "base", "--output", str(loose / "coop_base")]) == 0
    assert main(["eval", str(loose / "coop_base"), "--subsample", "new", "--quiet"]) == 0  # beside the run
    assert main(["train", "--dataset", shapes, *TINY, "--shots", "2", "--epochs", "1", "--n-ctx", "2",
                 "--quiet", "--output", str(loose / "coop_all")]) == 0
    capsys.readouterr()
    assert main(["report", str(loose), "--format", "json", "--no-plots"]) == 0
    rows = json.loads(capsys.readouterr().out)
    base = json.loads((loose / "coop_base" / "metrics.json").read_text())["test"]["accuracy"]
    new = json.loads((loose / f"coop_base_eval-{Path(shapes).name}-new" / "metrics.json").read_text())
    assert new["kind"] == "eval" and new["data"]["subsample"] == "new"
    h = by(rows, protocol="base2new", metric="h")
    assert h["mean"] == pytest.approx(harmonic_mean(base, new["test"]["accuracy"]))
    assert by(rows, protocol="fewshot")["shots"] == 2
    assert main(["report", str(loose), "--format", "latex", "--no-plots"]) == 0
    tex = capsys.readouterr().out
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "$\\pm$" not in tex.split("%")[0]
    assert main(["report", str(loose), "--format", "csv", "--no-plots"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("protocol,dataset,source,method") and len(lines) == 1 + len(rows)
    assert main(["report", str(loose), "--format", "yaml"]) == 2
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


def imagenet_family(root: Path, shapes: str) -> dict:
    """A small ImageNet family from the generated shapes: ImageNet (8 wnids), -V2 (folders 0..7) and -A with
    3 of the 8 classes (as -A and -R use 200 of the 1000), each in its reader's layout."""
    import shutil

    src = Path(shapes)
    names = sorted(p.name for p in (src / "train").iterdir())
    wnids = {f"n{1000 + i:08d}": name for i, name in enumerate(names)}
    inet = root / "imagenet"
    inet.mkdir(parents=True)
    (inet / "classnames.txt").write_text("".join(f"{w} {n.replace('_', ' ')}\n" for w, n in wnids.items()))
    for k, (w, name) in enumerate(wnids.items()):
        for split, folder in (("train", "train"), ("val", "test")):
            shutil.copytree(src / folder / name, inet / "images" / split / w)
        shutil.copytree(src / "test" / name, root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(k))
    subset = list(wnids)[5:]
    for w in subset:
        shutil.copytree(src / "test" / wnids[w], root / "imagenet-adversarial" / "imagenet-a" / w)
    return {w: wnids[w].replace("_", " ") for w in subset}


def test_dg_study_evaluates_each_variant_with_its_own_class_subset(shapes, tmp_path, capsys):
    root = tmp_path / "data"
    subset = imagenet_family(root, shapes)
    out = tmp_path / "dg"
    assert main(["study", "dg", "--root", str(root), "--targets", "imagenet_v2,imagenet_a,imagenet_sketch",
                 "--methods", "zeroshot,coop", "--shots", "2", "--seeds", "1", *TINY, "--epochs", "1",
                 "--output", str(out), "--quiet"]) == 1  # imagenet_sketch is not on disk: recorded, not fatal
    capsys.readouterr()
    a = json.loads((out / "runs" / "coop" / "2shots_seed1" / "imagenet_a" / "metrics.json").read_text())
    assert a["data"]["classnames"] == list(subset.values()) and a["data"]["num_classes"] == 3
    v2 = json.loads((out / "runs" / "coop" / "2shots_seed1" / "imagenet_v2" / "metrics.json").read_text())
    assert v2["data"]["num_classes"] == 8 and v2["prompt"]["trained_on"] == "imagenet"
    units = {u["uid"]: u for u in json.loads((out / "index.json").read_text())["units"]}
    assert units["coop/2shots_seed1/imagenet_sketch"]["state"] == "failed"
    assert "imagenet-sketch" in units["coop/2shots_seed1/imagenet_sketch"]["error"]
    rows = [r for r in aggregate(collect(out)) if r["protocol"] == "dg"]
    coop = {r["dataset"]: r["mean"] for r in rows if r["method"] == "coop"}
    assert set(coop) == {"imagenet", "imagenet_v2", "imagenet_a", "average"}
    assert coop["average"] == pytest.approx((coop["imagenet_v2"] + coop["imagenet_a"]) / 2)
    assert {r["dataset"] for r in rows if r["method"] == "zeroshot"} == set(coop)


def test_a_published_average_is_shown_only_beside_an_average_over_the_same_datasets():
    from vlprompt.protocols.xd import COOP_DATASETS

    def zs(datasets):
        return [rec("fewshot", d, "zeroshot", 60.0, shots=0, seed=None) for d in datasets]

    full = by(aggregate(zs(COOP_DATASETS)), dataset="average")
    assert full["published"] == 58.77 and full["n"] == 11  # SPEC 7.1's zero-shot RN50 average
    part = by(aggregate(zs(COOP_DATASETS[:3])), dataset="average")
    assert part["published"] is None and part["diff"] is None
    # xd: the average over the 10 targets (the source excluded) meets the published one.
    records = [rec("xd", d, "coop", 50.0, source="imagenet", method_type="coop") for d in COOP_DATASETS]
    records = [dataclasses.replace(r, backbone="ViT-B-16", config={"n_ctx": 4, "ctx_init": "a photo of a"})
               for r in records]
    avg = by(aggregate(records), dataset="average")
    assert avg["n"] == 10 and avg["published"] == 63.88


def test_a_wrong_weights_file_is_one_line_before_any_run(shapes, tmp_path, capsys):
    out = tmp_path / "w"
    args = ["study", "fewshot", "--datasets", shapes, "--methods", "coop", "--shots", "1", "--seeds", "1",
            "--backbone", "vlprompt-tiny-ViT", "--weights", str(tmp_path / "missing.pt"), "--output", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"vlprompt: error: weights file not found: {tmp_path / 'missing.pt'}"
    assert not (out / "runs").exists()


def test_base2new_study_with_the_baselines_on_real_images(caltech_root, tmp_path, capsys):
    out = tmp_path / "b2n-baselines"
    assert main(["study", "base2new", "--datasets", "caltech101", "--root", str(caltech_root), "--methods",
                 "cocoop,linear_probe,tip_adapter", "--seeds", "1", "--shots", "1", *TINY, "--epochs", "1",
                 "--option", "augment_passes=2", "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = aggregate(collect(out))
    assert {(r["method"], r["metric"]) for r in rows} == {
        ("cocoop", "base"), ("cocoop", "new"), ("cocoop", "h"), ("linear_probe", "base"), ("tip_adapter", "base")}
    for method in ("cocoop", "linear_probe", "tip_adapter"):
        assert f"| caltech101 | {method} |" in printed
    cocoop = json.loads((out / "runs" / "caltech101" / "cocoop" / "1shots_seed1" / "base" / "metrics.json").read_text())
    assert cocoop["recipe"]["batch_size"] == 1 and cocoop["recipe"]["preset"] == "cocoop"
    assert cocoop["train"]["steps"] == 50  # 50 base classes x 1 shot, batch 1, one epoch
