"""Reports say what they were computed from: tiny studies run once, then a copy of each is broken (a bad
metrics.json, a removed seed, a failed and a pending unit) and the report's rows, markdown, csv, latex and HTML
are checked against the run folders read directly."""

from __future__ import annotations

import html
import json
import logging
import shutil
from pathlib import Path

import pytest

from vlprompt.cli import main
from vlprompt.data import make_synthetic_dataset
from vlprompt.protocols.report import MARKS, build_report, to_csv, to_json, to_latex, to_markdown, write_report
from vlprompt.protocols.store import not_validated, scan
from vlprompt.protocols.study import MethodSpec, StudySpec, run_study

TINY = {"backbone": "vlprompt-tiny-ViT", "pretrained": "random", "epochs": 1}
BROKEN_REASON = "metrics.json is not a readable JSON object"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return [make_synthetic_dataset(str(root / name), n_train_per_class=2, n_test_per_class=3, seed=i)
            for i, name in enumerate(("alpha", "beta"))]


@pytest.fixture(scope="module")
def fewshot_study(data, tmp_path_factory):
    """Two datasets, three seeds, methods given as coop, zeroshot, linear_probe (neither alphabetical nor
    zero-shot first)."""
    out = tmp_path_factory.mktemp("fs") / "study"
    spec = StudySpec("fewshot", [MethodSpec("coop"), MethodSpec("zeroshot"), MethodSpec("linear_probe")],
                     datasets=data, shots=[1], seeds=[1, 2, 3], settings=dict(TINY))
    assert run_study(spec, out, progress=False).failed == []
    return out


@pytest.fixture(scope="module")
def b2n_study(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("b2n") / "study"
    spec = StudySpec("base2new", [MethodSpec("linear_probe"), MethodSpec("coop")], datasets=data[:1], shots=[1],
                     seeds=[1, 2], settings=dict(TINY))
    assert run_study(spec, out, progress=False).failed == []
    return out


@pytest.fixture(scope="module")
def xd_study(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("xd") / "study"
    spec = StudySpec("xd", [MethodSpec("coop"), MethodSpec("tip_adapter", options={"augment_passes": 1})],
                     source=data[0], targets=[data[1]], shots=[1], seeds=[1], settings=dict(TINY))
    assert run_study(spec, out, progress=False).failed == []
    return out


def copy_of(study: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(study, out)
    return out


def set_unit(study: Path, uid: str, **values) -> None:
    path = study / "index.json"
    index = json.loads(path.read_text())
    (unit,) = [u for u in index["units"] if u["uid"] == uid]
    unit.update(values)
    path.write_text(json.dumps(index))


def accuracy(study: Path, uid: str) -> float:
    return json.loads((study / "runs" / uid / "metrics.json").read_text())["test"]["accuracy"]


def row(rows, **kw):
    hits = [r for r in rows if all(r[k] == v for k, v in kw.items())]
    assert len(hits) == 1, (kw, hits)
    return hits[0]


def md_line(md: str, dataset: str, method: str) -> list[str]:
    (line,) = [x for x in md.splitlines() if x.startswith(f"| {dataset} | {method} |")]
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture
def damaged(fewshot_study, tmp_path):
    """alpha/coop seed 2: metrics.json broken; alpha/linear_probe seed 3: folder removed; beta/coop seed 3:
    failed; beta/zeroshot: pending."""
    study = copy_of(fewshot_study, tmp_path)
    (study / "runs" / "alpha/coop/1shots_seed2/metrics.json").write_text("{not json")
    shutil.rmtree(study / "runs" / "alpha/linear_probe/1shots_seed3")
    set_unit(study, "beta/coop/1shots_seed3", state="failed", error="RuntimeError: CUDA out of memory")
    set_unit(study, "beta/zeroshot/zeroshot", state="pending")
    return study


def test_intact_study_cells_have_all_their_runs_and_no_marks_but_the_search_one(fewshot_study):
    rows = build_report(fewshot_study)
    for ds in ("alpha", "beta"):
        coop = row(rows, dataset=ds, method="coop")
        assert (coop["n_runs"], coop["n_expected"], coop["marks"], coop["note"]) == (3, 3, [], None)
        zs = row(rows, dataset=ds, method="zeroshot")
        assert (zs["n_runs"], zs["n_expected"], zs["marks"]) == (1, 1, [])
        # The generated data has no validation split: the probe's C is the default, not a selected one.
        lp = row(rows, dataset=ds, method="linear_probe")
        assert (lp["n_runs"], lp["n_expected"], lp["marks"]) == (3, 3, ["not-validated"])
        assert lp["note"] == "search kept its initial values in 3 of 3 runs (no validation split)"
    assert row(rows, dataset="average", method="coop")["marks"] == []
    md = to_markdown(rows)
    assert "(3/3)" not in md and "[F]" not in md and "[B]" not in md and "[M]" not in md and "[P]" not in md
    assert "### Failed runs" not in md and "### Warnings" not in md


def test_broken_removed_failed_and_pending_runs_are_counted_and_marked(damaged, caplog):
    with caplog.at_level(logging.WARNING, logger="vlprompt"):
        rows = build_report(damaged)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"vlprompt: warning: report: broken run folder runs/alpha/coop/1shots_seed2: "
                        f"{BROKEN_REASON}; left out of the report"]

    coop_a = row(rows, dataset="alpha", method="coop")
    expected = [accuracy(damaged, f"alpha/coop/1shots_seed{s}") for s in (1, 3)]
    assert coop_a["mean"] == pytest.approx(sum(expected) / 2, abs=1e-12)
    assert (coop_a["n_runs"], coop_a["n_expected"], coop_a["marks"]) == (2, 3, ["broken"])
    assert coop_a["note"] == f"mean of 2 of 3 planned runs; seed 2: broken run folder ({BROKEN_REASON})"

    lp_a = row(rows, dataset="alpha", method="linear_probe")
    assert (lp_a["n_runs"], lp_a["n_expected"], lp_a["marks"]) == (2, 3, ["missing", "not-validated"])
    assert "seed 3 not run yet (its run folder was removed)" in lp_a["note"]

    coop_b = row(rows, dataset="beta", method="coop")
    assert (coop_b["n_runs"], coop_b["n_expected"], coop_b["marks"]) == (2, 3, ["failed"])
    assert coop_b["note"] == "mean of 2 of 3 planned runs; seed 3 failed: RuntimeError: CUDA out of memory"

    zs_b = row(rows, dataset="beta", method="zeroshot")
    assert (zs_b["mean"], zs_b["n_runs"], zs_b["n_expected"], zs_b["marks"]) == (None, 0, 1, ["missing"])
    zs_avg = row(rows, dataset="average", method="zeroshot")
    assert (zs_avg["mean"], zs_avg["marks"]) == (None, ["partial-average"])
    assert zs_avg["note"] == "not computed: 1 of 2 datasets have results"
    coop_avg = row(rows, dataset="average", method="coop")
    assert coop_avg["mean"] == pytest.approx((coop_a["mean"] + coop_b["mean"]) / 2)
    assert coop_avg["marks"] == ["partial-average"] and coop_avg["note"] == "alpha, beta: fewer runs than planned"
    assert row(rows, dataset="alpha", method="zeroshot")["marks"] == []

    # The JSON has the structured fields, the empty cell included.
    printed = {(r["dataset"], r["method"]): r for r in json.loads(to_json(rows))}
    assert printed[("beta", "zeroshot")]["mean"] is None
    assert {k: printed[("beta", "coop")][k] for k in ("n_runs", "n_expected", "marks")} == {
        "n_runs": 2, "n_expected": 3, "marks": ["failed"]}
    # Methods in the study's order, in the JSON and in the tables.
    assert [r["method"] for r in rows if r["dataset"] == "alpha"] == ["coop", "zeroshot", "linear_probe"]


def test_markdown_says_the_settings_the_failed_runs_the_warnings_and_the_marks(damaged):
    md = to_markdown(build_report(damaged))
    settings = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in md.split("### Failed")[0]
                .splitlines() if line.startswith("| ") and not line.startswith("| setting")}
    assert settings["protocol"] == "fewshot"
    assert settings["methods"] == "coop, zeroshot, linear_probe"
    assert settings["shots"] == "1" and settings["seeds"] == "1, 2, 3"
    assert settings["backbone"] == "vlprompt-tiny-ViT" and settings["pretrained"] == "random"
    assert settings["precision"] == "fp32" and settings["weights file"] == "–"
    assert "RANDOM" in settings["backbone source"]
    assert settings["epochs"] == "coop 1; linear_probe fitted"
    assert settings["runs"] == ("14 planned: 10 done, 1 failed, 2 pending (not run yet), 1 broken "
                                "(run folder unreadable)")
    assert settings["runs finished"].endswith("UTC")
    assert "- beta/coop/1shots_seed3: RuntimeError: CUDA out of memory" in md.splitlines()
    assert (f"- broken run folder runs/alpha/coop/1shots_seed2: {BROKEN_REASON}; left out of the report"
            in md.splitlines())
    assert md_line(md, "alpha", "coop")[3].endswith("† (2/3) [B]")
    assert md_line(md, "alpha", "linear_probe")[3].endswith("† (2/3) [M] [V]")
    assert md_line(md, "beta", "coop")[3].endswith("† (2/3) [F]")
    assert md_line(md, "beta", "zeroshot") == ["beta", "zeroshot", "– [M]", "–"]
    assert md_line(md, "average", "zeroshot") == ["average", "zeroshot", "– [P]", "–"]
    # Rows in the order the user gave the methods.
    names = [x.split("|")[2].strip() for x in md.splitlines() if x.startswith("| alpha |")]
    assert names == ["coop", "zeroshot", "linear_probe"]
    for code in ("failed", "missing", "broken", "not-validated", "partial-average"):
        symbol, legend = MARKS[code]
        assert f"- {symbol} {legend}" in md.splitlines()
    assert f"- {MARKS['does-not-transfer'][0]}" not in md  # no such cell here, no such legend line


def test_csv_and_latex_carry_the_counts_and_marks(damaged):
    rows = build_report(damaged)
    import csv
    import io

    lines = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert len(lines) == len(rows)
    (coop_b,) = [x for x in lines if (x["dataset"], x["method"]) == ("beta", "coop")]
    assert (coop_b["n_runs"], coop_b["n_expected"], coop_b["marks"]) == ("2", "3", "failed")
    (zs_b,) = [x for x in lines if (x["dataset"], x["method"]) == ("beta", "zeroshot")]
    assert (zs_b["mean"], zs_b["marks"], zs_b["n_runs"]) == ("", "missing", "0")
    tex = to_latex(rows)
    assert "% seeds: 1, 2, 3" in tex.splitlines()
    assert "% failed run beta/coop/1shots_seed3: RuntimeError: CUDA out of memory" in tex.splitlines()
    assert "(2/3) [B]" in tex and "beta & zeroshot & – [M]" in tex


def test_html_page_and_report_json(damaged, capsys):
    rows, out = write_report(damaged, plots=False)
    page = (out / "index.html").read_text(encoding="utf-8")
    for text in ("<h2>Settings</h2>", "<td>seeds</td>", "<td>1, 2, 3</td>", "<td>vlprompt-tiny-ViT</td>",
                 "<h2>Failed runs</h2>", "<td>beta/coop/1shots_seed3</td>", "<td>RuntimeError: CUDA out of memory</td>",
                 "<h2>Warnings</h2>", "(2/3) [B]", "– [M]", "– [P]", html.escape(MARKS["broken"][1])):
        assert text in page, text
    context = json.loads((out / "report.json").read_text())
    assert context["method_order"] == ["coop", "zeroshot", "linear_probe"]
    assert context["failed"] == [{"run": "beta/coop/1shots_seed3", "error": "RuntimeError: CUDA out of memory"}]
    assert context["settings"]["seeds"] == "1, 2, 3"
    assert context["runs"] == {"planned": 14, "done": 10, "failed": 1, "pending": 2, "broken": 1}
    assert set(context["legend"]) == set(MARKS)
    assert json.loads((out / "tables.json").read_text()) == json.loads(to_json(rows))


def test_the_command_prints_the_warning_once_through_the_logger(damaged, capsys):
    assert main(["report", str(damaged), "--no-plots", "--format", "json"]) == 0
    captured = capsys.readouterr()
    broken = [x for x in captured.err.splitlines() if "broken run folder" in x]
    assert broken == [f"vlprompt: warning: report: broken run folder runs/alpha/coop/1shots_seed2: {BROKEN_REASON}; "
                      "left out of the report"]
    printed = json.loads(captured.out)
    assert row(printed, dataset="alpha", method="coop")["n_runs"] == 2


def test_base2new_head_that_cannot_transfer_and_a_failed_new_evaluation(b2n_study, tmp_path):
    rows = build_report(b2n_study)
    for metric in ("new", "h"):
        lp = row(rows, method="linear_probe", metric=metric, dataset="alpha")
        assert (lp["mean"], lp["marks"], lp["n_runs"], lp["n_expected"]) == (None, ["does-not-transfer"], 0, 0)
        assert lp["note"] == "linear_probe does not transfer: its head is over its training classes"
    assert row(rows, method="coop", metric="h", dataset="alpha")["marks"] == []
    md = to_markdown(rows)
    assert md_line(md, "alpha", "linear_probe")[3:] == ["– [T]", "– [T]"]
    assert f"- {MARKS['does-not-transfer'][0]} {MARKS['does-not-transfer'][1]}" in md.splitlines()
    assert [x.split("|")[2].strip() for x in md.splitlines() if x.startswith("| alpha |")] == ["linear_probe", "coop"]

    study = copy_of(b2n_study, tmp_path)
    set_unit(study, "alpha/coop/1shots_seed2/new", state="failed", error="its training run did not finish")
    rows = build_report(study)
    new = row(rows, method="coop", metric="new", dataset="alpha")
    assert new["mean"] == accuracy(study, "alpha/coop/1shots_seed1/new")
    assert (new["n_runs"], new["n_expected"], new["marks"]) == (1, 2, ["failed"])
    h = row(rows, method="coop", metric="h", dataset="alpha")
    b = row(rows, method="coop", metric="base", dataset="alpha")["mean"]
    assert h["mean"] == pytest.approx(2 * b * new["mean"] / (b + new["mean"]))
    assert (h["n_runs"], h["n_expected"], h["marks"]) == (1, 2, ["failed"])
    assert h["note"] == "new: mean of 1 of 2 planned runs; new: seed 2 failed: its training run did not finish"
    assert md_line(to_markdown(rows), "alpha", "coop")[3].endswith("(1/2) [F]")


def test_xd_head_that_cannot_transfer_has_marked_targets_and_average(xd_study):
    rows = build_report(xd_study)
    for ds in ("beta", "average"):
        tip = row(rows, method="tip_adapter", dataset=ds)
        assert (tip["mean"], tip["marks"]) == (None, ["does-not-transfer"])
    assert row(rows, method="tip_adapter", dataset="alpha")["mean"] is not None
    assert row(rows, method="coop", dataset="average")["marks"] == []
    (line,) = [x for x in to_markdown(rows).splitlines() if x.startswith("| tip_adapter |")]
    assert [c.strip() for c in line.strip("|").split("|")][2:] == ["– [T]", "– [T]"]


def test_loose_run_folders_settings_from_the_runs_and_a_broken_folder(fewshot_study, tmp_path, caplog):
    loose = tmp_path / "loose"
    for uid in ("beta/linear_probe/1shots_seed1", "alpha/coop/1shots_seed1", "alpha/zeroshot/zeroshot",
                "beta/coop/1shots_seed1"):
        shutil.copytree(fewshot_study / "runs" / uid, loose / uid.replace("/", "_"))
    metrics = json.loads((loose / "beta_coop_1shots_seed1" / "metrics.json").read_text())
    del metrics["test"]
    (loose / "beta_coop_1shots_seed1" / "metrics.json").write_text(json.dumps(metrics))
    with caplog.at_level(logging.WARNING, logger="vlprompt"):
        rows = build_report(loose)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "vlprompt: warning: report: broken run folder beta_coop_1shots_seed1: metrics.json has no 'test' results; "
        "left out of the report"]
    assert rows.context.method_order == ["zeroshot", "coop", "linear_probe"]  # zero-shot first, then alphabetical
    settings = dict(rows.context.settings)
    assert settings["backbone"] == "vlprompt-tiny-ViT" and settings["precision"] == "fp32"
    assert settings["runs"] == "3 run folders read, 1 broken (left out)"
    assert settings["seeds"] == "1" and "loose run folders" in settings["computed from"]
    coop = row(rows, dataset="alpha", method="coop")
    assert (coop["n_runs"], coop["n_expected"], coop["marks"]) == (1, None, [])
    # beta's coop folder is broken: the cell beta x coop is not in any line of the table, so no row for it.
    assert [r for r in rows if (r["dataset"], r["method"]) == ("beta", "coop")] == []
    assert "broken run folder beta_coop_1shots_seed1" in to_markdown(rows)


def test_loose_base_run_without_its_new_evaluation_has_marked_new_and_h(b2n_study, tmp_path):
    loose = tmp_path / "loose"
    shutil.copytree(b2n_study / "runs" / "alpha/coop/1shots_seed1/base", loose / "coop_base")
    shutil.copytree(b2n_study / "runs" / "alpha/linear_probe/1shots_seed1/base", loose / "probe_base")
    rows = build_report(loose)
    new = row(rows, method="coop", metric="new")
    assert (new["mean"], new["n_runs"], new["n_expected"], new["marks"]) == (None, 0, None, ["missing"])
    assert new["note"] == "no run folder for this cell"
    h = row(rows, method="coop", metric="h")
    assert (h["mean"], h["marks"], h["note"]) == (None, ["missing"], "new: no run folder for this cell")
    assert row(rows, method="linear_probe", metric="new")["marks"] == ["does-not-transfer"]
    assert md_line(to_markdown(rows), "alpha", "coop")[3:] == ["– [M]", "– [M]"]


def test_a_fitted_run_records_whether_its_search_was_validated():
    def fit(method, fit, **extra):
        return {"method": method, "train": {"fit": fit}, **extra}

    # The field a fit records: read as it says, whichever method wrote it.
    assert not_validated(fit("coop", {"search": {"validated": False, "reason": "no validation split"}})) == \
        "no validation split"
    assert not_validated(fit("linear_probe", {"search": {"validated": True, "reason": "val split"}})) is None
    assert not_validated(fit("tip_adapter", {"search": {"validated": False}})) == "no validation split"
    # Records written before it: an empty search log, a Tip-Adapter search that selected nothing.
    assert not_validated(fit("linear_probe", {"search": []})) == "no validation split"
    assert not_validated(fit("linear_probe", {"search": [{"stage": "grid", "c": 1.0, "val_accuracy": 0.5}]})) is None
    assert not_validated(fit("tip_adapter", {"selected": {"alpha": 1.0, "beta": 1.0, "val_accuracy": None}})) == \
        "no validation split"
    assert not_validated(fit("tip_adapter", {"selected": {"val_accuracy": None}}, method_options={"search": False})) \
        == "search turned off (option search=false)"
    assert not_validated(fit("tip_adapter", {"selected": {"val_accuracy": 71.0}})) is None
    assert not_validated({"method": "coop", "train": {"epochs": []}}) is None
    assert not_validated({"method": "zeroshot", "train": None}) is None


def test_an_unreadable_index_is_a_warning_and_the_folders_are_read_as_loose_runs(fewshot_study, tmp_path):
    study = copy_of(fewshot_study, tmp_path)
    (study / "index.json").write_text("[1, 2")
    results = scan(study)
    assert not results.is_study and len(results.records) == 14
    assert results.warnings == [f"{study / 'index.json'} cannot be read: the run folders under {study} are read "
                                "as loose runs (no failed or pending runs known)"]


def test_an_unreadable_config_or_study_file_is_named_and_the_rest_still_reported(fewshot_study, tmp_path):
    study = copy_of(fewshot_study, tmp_path)
    (study / "runs" / "beta/linear_probe/1shots_seed1/config.yaml").write_text("a: [1, 2\n")
    (study / "study.yaml").write_text("methods: *nowhere\n")
    rows = build_report(study)
    (bad,) = [w for w in rows.context.warnings if w.startswith("broken run folder")]
    assert bad.startswith("broken run folder runs/beta/linear_probe/1shots_seed1: config.yaml is not valid YAML")
    lp = row(rows, dataset="beta", method="linear_probe")
    assert (lp["n_runs"], lp["n_expected"], lp["marks"]) == (2, 3, ["broken", "not-validated"])
    (bad_study,) = [w for w in rows.context.warnings if w.startswith("study.yaml")]
    assert bad_study.startswith("study.yaml is not valid YAML")
    assert rows.context.method_order == ["zeroshot", "coop", "linear_probe"]
    assert dict(rows.context.settings)["protocol"] == "fewshot"  # from the runs, as for loose folders


# -- found by trying it ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), -50, 250])
def test_an_accuracy_that_is_not_a_percentage_is_a_broken_run(fewshot_study, tmp_path, value):
    # Was shown in the table as nan / inf / -50.00 as if it were a result.
    study = copy_of(fewshot_study, tmp_path)
    path = study / "runs" / "alpha/coop/1shots_seed2/metrics.json"
    m = json.loads(path.read_text())
    m["test"]["accuracy"] = value
    path.write_text(json.dumps(m))
    rows = build_report(study)
    (warning,) = [w for w in rows.context.warnings if "alpha/coop/1shots_seed2" in w]
    assert "not a percentage in [0, 100]" in warning
    cell = row(rows, dataset="alpha", method="coop")
    assert (cell["n_runs"], cell["n_expected"], cell["marks"]) == (2, 3, ["broken"])


def test_a_deeply_nested_metrics_file_is_a_broken_run_not_a_traceback(fewshot_study, tmp_path, capsys):
    study = copy_of(fewshot_study, tmp_path)
    (study / "runs" / "alpha/coop/1shots_seed2/metrics.json").write_text("[" * 100_000)
    assert main(["report", str(study)]) == 0  # was a RecursionError stack trace, exit 1
    assert "broken run folder runs/alpha/coop/1shots_seed2" in capsys.readouterr().err
