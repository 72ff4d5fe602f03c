"""Files the user gives are parsed with bounded resources and checked by key and type; one study folder has
one driver; what killed processes leave is cleaned by its owner; runs record absolute paths and the threads
they used."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from vlprompt.cli import main
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.run_folder import clean_stale, commit_run_folder, stage_run_folder, this_host
from vlprompt.errors import VlpromptError
from vlprompt.utils.folder_lock import FolderLock
from vlprompt.utils.safe_yaml import MAX_NODES, load_yaml_text
from vlprompt.utils.threads import SMALL_MODEL_WIDTH, choose_threads

TINY = ["--backbone", "vlprompt-tiny-ViT", "--pretrained", "random"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=4,
                                  n_test_per_class=5, seed=0)


def one_error(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# -- YAML with bounded resources --------------------------------------------------------------------------------

def billion_laughs(levels: int = 9, key: str = "template") -> str:
    lines = ["protocol: fewshot", "datasets: [x]", "methods: [coop]", 'l0: &l0 ["lol","lol","lol","lol","lol","lol",'
             '"lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]")
    lines.append(f"{key}: *l{levels - 1}")
    return "\n".join(lines) + "\n"


def test_an_alias_expansion_bomb_is_refused_quickly_and_small():
    text = billion_laughs()
    assert len(text) < 1200  # a 1 kB file standing for 10^9 strings
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(VlpromptError, match="anchors and aliases expand to more than"):
        load_yaml_text(text, "study file s.yaml")
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 10 and peak < 50 * 2**20, (seconds, peak)


def test_the_bomb_through_the_command_line_is_one_line_under_a_gigabyte(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(billion_laughs())
    # VmHWM is this process's own peak (ru_maxrss would carry the forking test process's over exec).
    code = ("import sys\nfrom vlprompt.cli import main\nrc = main(sys.argv[1:])\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\nsys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "study", "run", str(study), "--output", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "expand to more than" in out.stderr
    assert int(out.stdout.strip()) < 1024 * 1024  # kB: the whole process stayed under 1 GB


def test_a_plain_anchor_still_works_and_counts_its_copies():
    data = load_yaml_text("base: &b {lr: 0.002, epochs: 5}\nother: *b\n", "f")
    assert data["other"] == {"lr": 0.002, "epochs": 5}
    # Just under and just over the bound: aliases count as the copies they stand for.
    n = MAX_NODES // 10
    items = ",".join(["1"] * 10)
    ok = f"a: &a [{items}]\nb: [" + ",".join(["*a"] * (n // 11 - 1)) + "]\n"
    assert len(load_yaml_text(ok, "f")["b"]) == n // 11 - 1
    over = f"a: &a [{items}]\nb: [" + ",".join(["*a"] * (MAX_NODES // 11 + 2)) + "]\n"
    with pytest.raises(VlpromptError, match="expand"):
        load_yaml_text(over, "f")


@pytest.mark.parametrize("text, match", [
    ("a: &a [*a]\n", "refers to the node that contains it"),
    ("a: &a {b: *a}\n", "refers to the node that contains it"),
    ("[" * 3000 + "]" * 3000, "nested"),
    ("a: [1, 2\n", "is not valid YAML"),
])
def test_self_reference_deep_nesting_and_syntax_are_one_line(text, match):
    with pytest.raises(VlpromptError, match=match):
        load_yaml_text(text, "config file c.yaml")


def test_a_huge_file_is_refused_before_it_is_read(tmp_path, capsys):
    big = tmp_path / "c.yaml"
    with open(big, "w") as f:
        f.write("epochs: 1\n")
        f.write("# " + "x" * (5 * 2**20) + "\n")
    one_error(capsys, ["train", "--config", str(big), "--output", str(tmp_path / "r"), *TINY], str(big), "bytes")


# -- study files: every bad value is one line naming the file and the key ------------------------------------------

STUDY = "protocol: fewshot\ndatasets: [x]\n"


@pytest.mark.parametrize("text, match", [
    (STUDY + "methods: [coop]\nseeds: [a]", "seeds[0]: expected a whole number, got 'a'"),
    (STUDY + "methods: [coop]\nshots: [1.5]", "shots[0]: expected a whole number"),
    (STUDY + "methods: [coop]\nseeds: {a: 1}", "seeds: expected a list"),
    ("protocol: fewshot\ndatasets: {a: 1}\nmethods: [coop]", "datasets: expected a list"),
    ("protocol: [1]\nmethods: [coop]", "protocol: expected a name"),
    (STUDY + "methods: {coop: 1}", "methods: expected a list"),
    (STUDY + "methods: [3]", "methods[0]: must be a method name or a mapping"),
    (STUDY + "methods: [{method: coop, overrides: {bogus: 1}}]", "methods[0]: overrides: unknown key 'bogus'"),
    (STUDY + "methods: [{method: coop, overrides: {seed: 3}}]", "methods[0]: overrides: unknown key 'seed'"),
    (STUDY + "methods: [{method: coop, overrides: {epochs: many}}]", "overrides: epochs: invalid value 'many'"),
    (STUDY + "methods: [{method: coop, overrides: [1]}]", "overrides: expected a mapping"),
    (STUDY + "methods: [{method: coop, options: [1]}]", "options: expected a mapping"),
    (STUDY + "methods: [{method: cpt, options: {weight: [1, 2]}}]", "options.weight: expected a number"),
    (STUDY + "methods: [{method: coop, label: ../../escape}]", "label '../../escape'"),
    (STUDY + "methods: [{method: coop, label: [x]}]", "label: expected a name"),
    (STUDY + "methods: [coop]\nsettings: 3", "settings: expected a mapping"),
    (STUDY + "methods: [coop]\nsettings: {epochs: [1, 2]}", "settings: epochs: invalid value [1, 2]"),
    (STUDY + "methods: [coop]\nepochs: {a: 1}", "epochs: invalid value"),
    (STUDY + "methods: [coop]\ntemplate: 'a {x} photo'", "template 'a {x} photo'"),
    (STUDY + "methods: [coop]\ntemplate: 'a { photo'", "template 'a { photo'"),
    (STUDY + "methods: [coop]\ntemplate: 'no name'", "template 'no name' has no '{}'"),
    (STUDY + "methods: [coop]\n1: 2", "unknown key 1"),
    ("- a\n- b", "expected a mapping"),
])
def test_bad_study_values_are_one_line_naming_the_file_and_key(tmp_path, capsys, text, match):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    one_error(capsys, ["study", "run", str(path), "--output", str(tmp_path / "out")], str(path), match)
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("text, match", [
    ("epochs: [1]", "epochs: invalid value [1]"),
    ("method_options: [1]", "method_options"),
    ("method_options: {weight: {a: 1}}", "method_options.weight: expected a number"),
    ("template: '{0[0]}'", "not a plain '{}'"),
    ("template: 5", "no '{}'"),
    ("threads: 0", "threads: must be a number >= 1 or 'auto'"),
    ("threads: some", "threads: must be a number >= 1 or 'auto'"),
    ("1: 2", "unknown key 1"),
])
def test_bad_config_file_values_are_one_line(tmp_path, capsys, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    one_error(capsys, ["train", "--config", str(path), "--output", str(tmp_path / "r"), *TINY], match)


def test_train_help_lists_the_registered_methods(capsys):
    from vlprompt.methods import METHODS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    listed = text.split("--method METHOD")[-1].split("--preset")[0]  # the help entry, after the usage line
    assert all(name in listed for name in METHODS), listed


# -- one driver per study folder ----------------------------------------------------------------------------------

HOLD = ("import sys, time\nfrom vlprompt.utils.folder_lock import FolderLock\n"
        "with FolderLock(sys.argv[1], 'study'):\n    print('held', flush=True)\n    time.sleep(600)\n")


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_driver_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(shapes, tmp_path, capsys):
    folder = tmp_path / "study"
    holder = _holder(folder)
    try:
        err = one_error(capsys, ["study", "fewshot", "--datasets", shapes, "--methods", "zeroshot", *TINY,
                                 "--output", str(folder)], "in use by", f"pid {holder.pid}", socket.gethostname(),
                        "--wait")
        assert "study folder" in err
        assert not (folder / "runs").exists() and not (folder / "index.json").exists()  # nothing touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 released it: the same command now runs
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "zeroshot", *TINY, "--output",
                 str(folder), "--quiet"]) == 0
    assert (folder / "runs").is_dir()


def test_two_studies_on_one_folder_run_each_unit_once(shapes, tmp_path):
    """Both start while a third process holds the folder; when it goes, one runs every unit and the other,
    waiting, then finds them finished."""
    folder = tmp_path / "study"
    cmd = [sys.executable, "-m", "vlprompt.cli", "study", "fewshot", "--datasets", shapes, "--methods",
           "zeroshot,coop", "--shots", "1", "--seeds", "1,2", *TINY, "--epochs", "2", "--threads", "1",
           "--output", str(folder), "--wait"]
    holder = _holder(folder)
    studies = []
    try:
        for _ in range(2):
            studies.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))
        deadline = time.time() + 120
        while sum("waiting" in _peek(p) for p in studies) < 2:
            assert time.time() < deadline and all(p.poll() is None for p in studies)
            time.sleep(0.1)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    errs = [_peek(p) + p.communicate(timeout=600)[1] for p in studies]
    assert [p.returncode for p in studies] == [0, 0], [e[-1500:] for e in errs]
    ran = sorted(int(e.split(" run now")[0].rsplit(" ", 1)[-1]) for e in errs)
    assert ran == [0, 3], errs
    assert any("0 run now, 3 skipped as finished" in e for e in errs)


def _peek(proc: subprocess.Popen) -> str:
    """What a running process has written to stderr so far (without blocking)."""
    import fcntl

    fd = proc.stderr.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    try:
        chunk = proc.stderr.read() or ""
    except (BlockingIOError, TypeError):
        chunk = ""
    proc._peeked = getattr(proc, "_peeked", "") + chunk
    return proc._peeked


# -- what killed processes leave --------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_and_replaced_copies_are_cleaned_by_owner(tmp_path):
    host = this_host()
    dead, alive = _dead_pid(), os.getppid()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    left = {
        f".run.partial-{host}-{dead}": False,  # a killed run's staging: removed
        f".run.partial-{dead}": False,  # the same, named by an earlier version
        f".run.old-{host}-{dead}": False,  # a replaced copy whose replacement arrived: removed
        f".run.partial-{host}-{alive}": True,  # a live process's work: kept
        f".run.partial-otherhost-{dead}": True,  # another machine's: cannot be judged here, kept
        f".other.partial-{host}-{dead}": True,  # another run folder's, not asked about
    }
    for name in left:
        (tmp_path / name).mkdir()
    clean_stale(tmp_path, ["run"])
    for name, kept in left.items():
        assert (tmp_path / name).exists() == kept, name
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_run_moved_aside_by_a_killed_replacement_is_put_back(tmp_path):
    host = this_host()
    aside = tmp_path / f".run.old-{host}-{_dead_pid()}"
    aside.mkdir()
    (aside / "metrics.json").write_text('{"config_key": "k"}')
    stage = stage_run_folder(tmp_path / "run")  # the next run of that folder finds it first
    assert (tmp_path / "run" / "metrics.json").read_text() == '{"config_key": "k"}' and not aside.exists()
    (stage / "metrics.json").write_text('{"config_key": "new"}')
    commit_run_folder(stage, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").read_text() == '{"config_key": "new"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_study_cleans_what_a_kill_9_left_in_its_runs(shapes, tmp_path):
    folder = tmp_path / "study"
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "zeroshot", *TINY, "--output", str(folder),
                 "--quiet"]) == 0
    unit = next((folder / "runs").rglob("metrics.json")).parent
    host = this_host()
    stale = [unit.parent / f".{unit.name}.partial-{host}-{_dead_pid()}", unit.parent / f".x.old-{_dead_pid()}"]
    for path in stale:
        path.mkdir()
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "zeroshot", *TINY, "--output", str(folder),
                 "--quiet"]) == 0
    assert not any(p.exists() for p in stale[:1])
    assert (unit.parent / "x").is_dir()  # an .old- copy without its folder is a finished run: put back


# -- paths recorded so that a run works from anywhere -----------------------------------------------------------

def test_a_run_with_relative_paths_evaluates_from_another_directory(shapes, tmp_path, monkeypatch, capsys):
    data = tmp_path / "work" / "data"
    shutil.copytree(shapes, data / "shapes")
    monkeypatch.chdir(tmp_path / "work")
    assert main(["train", "--dataset", "data/shapes", *TINY, "--epochs", "1", "--shots", "2", "--output",
                 "runs/r", "--quiet"]) == 0
    record = (tmp_path / "work" / "runs" / "r" / "config.yaml").read_text()
    assert f"dataset: {data / 'shapes'}" in record and f"output: {tmp_path / 'work' / 'runs' / 'r'}" in record
    trained = json.loads((tmp_path / "work" / "runs" / "r" / "metrics.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(tmp_path / "work" / "runs" / "r"), "--output", "e", "--quiet"]) == 0
    capsys.readouterr()
    evaluated = json.loads((elsewhere / "e" / "metrics.json").read_text())
    assert evaluated["test"]["accuracy"] == trained["test"]["accuracy"]
    # The dataset moved: the error says where the path came from and how to point at the new place.
    shutil.move(str(data / "shapes"), str(tmp_path / "moved"))
    one_error(capsys, ["eval", str(tmp_path / "work" / "runs" / "r"), "--output", "e2"],
              f"dataset folder {data / 'shapes'}", "recorded in", "config.yaml", "--dataset NEW_FOLDER")
    assert main(["eval", str(tmp_path / "work" / "runs" / "r"), "--dataset", str(tmp_path / "moved"),
                 "--output", "e3", "--quiet"]) == 0
    moved = json.loads((elsewhere / "e3" / "metrics.json").read_text())
    # The dataset is the same one wherever it lies: its fingerprint (classes, relative paths, labels) is kept.
    assert moved["data"]["fingerprint"] == evaluated["data"]["fingerprint"] == trained["data"]["fingerprint"]
    assert moved["data"]["root"] != evaluated["data"]["root"] and moved["test"] == evaluated["test"]


# -- threads -----------------------------------------------------------------------------------------------------

def test_threads_are_chosen_recorded_and_settable(shapes, tmp_path):
    import torch
    from safetensors.torch import load_file

    before = torch.get_num_threads()
    runs = {}
    for name, extra in (("a", []), ("again", []), ("b", ["--threads", "2"]), ("auto", ["--threads", "auto"])):
        assert main(["train", "--dataset", shapes, *TINY, "--epochs", "1", "--shots", "2", "--output",
                     str(tmp_path / name), "--quiet", *extra]) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    chosen = runs["a"]["execution"]["threads"]
    assert chosen == choose_threads(None, 64).as_record() and chosen["threads"] == 1  # the tiny model: width 64
    assert runs["b"]["execution"]["threads"] == {"threads": 2, "reason": "asked for (--threads)"}
    assert runs["auto"]["execution"]["threads"]["threads"] == 1  # a small model takes one thread in any case
    assert torch.get_num_threads() == before  # the run's choice ended with it
    assert len({r["config_key"] for r in runs.values()}) == 1  # threads never change a result's identity
    # The default does not depend on the load, so the same command gives the same prompt to the last bit.
    a, again = (load_file(str(tmp_path / n / "prompt" / "prompt.safetensors")) for n in ("a", "again"))
    assert a.keys() == again.keys() and all(torch.equal(a[k], again[k]) for k in a)
    assert runs["a"]["test"] == runs["again"]["test"]


def test_the_thread_choice_follows_the_model_and_with_auto_the_free_cores(monkeypatch):
    import vlprompt.utils.threads as threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    for busy, want in ((0.0, 8), (2.0, 6), (7.4, 1), (20.0, 1)):
        monkeypatch.setattr(threads, "busy_cores", lambda busy=busy: busy)
        assert threads.choose_threads("auto", SMALL_MODEL_WIDTH).threads == want
        assert threads.choose_threads(None, SMALL_MODEL_WIDTH).threads == 8  # the default ignores the load
    assert threads.choose_threads(None, SMALL_MODEL_WIDTH - 1).threads == 1
    assert threads.choose_threads("auto", SMALL_MODEL_WIDTH - 1).threads == 1
    assert threads.choose_threads("3", SMALL_MODEL_WIDTH - 1).threads == 3


# -- found by trying it ------------------------------------------------------------------------------------------

def test_a_planted_lock_symlink_is_refused_and_its_target_left_intact(tmp_path, capsys):
    # The lock file was opened through the link and truncated: a study folder copied from someone else with
    # `.lock -> ~/precious` emptied that file.
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    study = tmp_path / "study"
    study.mkdir()
    (study / ".lock").symlink_to(precious)
    with pytest.raises(VlpromptError, match="is a symbolic link"):
        FolderLock(study, "study").acquire()
    assert precious.read_text() == "keep me"


def test_a_study_folder_that_is_a_file_is_named_as_such(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("x")
    with pytest.raises(VlpromptError, match="is a file, not a folder"):  # was "cannot lock ...: File exists"
        FolderLock(path, "study").acquire()
    assert path.read_text() == "x"


def test_a_study_inside_another_studys_runs_is_refused(shapes, tmp_path, capsys):
    outer = tmp_path / "outer"
    (outer / "runs" / "shapes").mkdir(parents=True)
    (outer / "study.yaml").write_text("protocol: fewshot\n")
    (outer / "index.json").write_text('{"units": []}')
    study = tmp_path / "s.yaml"
    study.write_text(f"protocol: fewshot\ndatasets: [{shapes}]\nmethods: [coop]\nseeds: [1]\nshots: [1]\n")
    inner = outer / "runs" / "shapes" / "coop"
    one_error(capsys, ["study", "run", str(study), "--output", str(inner), "--quiet"],
              "lies inside the runs of the study in", str(outer))
    assert not inner.exists()


def test_a_study_of_no_seeds_is_refused(shapes, tmp_path, capsys):
    study = tmp_path / "s.yaml"
    study.write_text(f"protocol: fewshot\ndatasets: [{shapes}]\nmethods: [coop]\nseeds: []\n")
    # Was exit 0 with an empty study folder and report.
    one_error(capsys, ["study", "run", str(study), "--output", str(tmp_path / "o"), "--quiet"], "no seeds")
    assert not (tmp_path / "o").exists()


def test_a_deeply_nested_study_index_is_ignored_not_a_traceback(tmp_path, caplog):
    from vlprompt.protocols.study import read_index

    (tmp_path / "index.json").write_text("[" * 100_000)
    assert read_index(tmp_path) == {}  # was a RecursionError stack trace
    assert "is not a study index" in caplog.text


def test_a_deeply_nested_metrics_file_in_the_output_is_one_error_line(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("[" * 100_000)
    one_error(capsys, ["train", "--dataset", shapes, *TINY, "--epochs", "1", "--output", str(out), "--quiet"],
              str(out), "holds no finished run")


def test_duplicate_keys_in_a_yaml_file_are_refused(shapes, tmp_path, capsys):
    # PyYAML keeps the last one silently: `epochs: 1` then `epochs: 50` trained 50 epochs.
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 1\nshots: 2\nepochs: 50\n")
    one_error(capsys, ["train", "--config", str(config), "--dataset", shapes, *TINY, "--output",
                       str(tmp_path / "o")], str(config), "'epochs' is given twice", "line 3")
    assert not (tmp_path / "o").exists()
    assert load_yaml_text("a: &x {b: 1}\nc:\n  <<: *x\n  b: 2\n", "t") == {"a": {"b": 1}, "c": {"b": 2}}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_a_method_option_that_is_not_finite_is_refused_before_training(shapes, tmp_path, capsys, value):
    # Was accepted, and training stopped later with "the loss is nan".
    one_error(capsys, ["train", "--dataset", shapes, *TINY, "--epochs", "1", "--method", "kgcoop", "--option",
                       f"weight={value}", "--output", str(tmp_path / "o"), "--quiet"],
              "option weight must be a finite number", value)
    assert not (tmp_path / "o").exists()


def test_a_class_names_file_with_control_bytes_or_too_big_is_one_line(tmp_path):
    from vlprompt.practice import MAX_CLASSNAMES_BYTES, parse_classnames

    binary = tmp_path / "names.bin"
    binary.write_bytes(b"cat\ndo\x00g\n")  # was read as the class names "cat" and "do\x00g"
    with pytest.raises(VlpromptError, match=r"line 2: control character '\\x00'"):
        parse_classnames(file=str(binary))
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(MAX_CLASSNAMES_BYTES + 1)
    with pytest.raises(VlpromptError, match="more than the"):
        parse_classnames(file=str(huge))
    tabbed = tmp_path / "ok.txt"
    tabbed.write_text("a\tb\nc\n")
    assert parse_classnames(file=str(tabbed)) == ["a\tb", "c"]


def test_a_class_name_too_long_is_quoted_short_in_its_error():
    from support import tiny_backbone

    from vlprompt.prompts.coop import CoOp

    name = "a" * 200_000
    with pytest.raises(VlpromptError) as err:  # the message held the whole 200,000-character name
        CoOp(tiny_backbone(), ["cat", name])
    message = str(err.value)
    assert "class name too long" in message and "200,000 characters" in message and len(message) < 300


def test_a_checkpoint_folder_planted_as_a_link_is_not_written_through(shapes, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / ".r.checkpoint").symlink_to(elsewhere, target_is_directory=True)
    one_error(capsys, ["train", "--dataset", shapes, *TINY, "--epochs", "1", "--shots", "2", "--output",
                       str(tmp_path / "r")], ".r.checkpoint is a symbolic link")
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "r").exists()


def test_a_report_of_a_file_says_it_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    one_error(capsys, ["report", str(tmp_path / "f")], "is a file, not a folder")
    one_error(capsys, ["report", str(tmp_path / "missing")], "results folder not found")


def test_a_run_record_too_large_or_too_deep_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    import vlprompt.utils.io as io
    from vlprompt.utils.io import read_json

    record = tmp_path / "metrics.json"
    record.write_text('{"config_key": "' + "k" * 2000 + '"}')
    assert read_json(record)["config_key"] == "k" * 2000
    monkeypatch.setattr(io, "MAX_JSON_BYTES", 1000)
    with pytest.raises(ValueError, match="more than the 1,000"):
        read_json(record)
    monkeypatch.undo()
    record.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_json(record)
