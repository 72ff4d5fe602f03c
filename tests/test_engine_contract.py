"""The engine's contract with its callers: metrics schema 2, evaluation folders, which backbone is used,
what a cross-dataset evaluation inherits, who owns the feature store, atomic run folders and run identity.

Every check compares against a reference computed here, in a different way from the engine (loops and
sorting instead of ``topk``, files read back from disk, weak references instead of trusting the docs).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import pkgutil
import re
import shutil
import stat
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from support import TINY_VIT, tiny_backbone

import vlprompt as vp
import vlprompt.engine.feature_store as fs_mod
import vlprompt.engine.run as run_mod
from vlprompt.config import load_yaml
from vlprompt.data import make_synthetic_dataset
from vlprompt.data.transforms import test_transform
from vlprompt.engine.evaluate import accuracy_report
from vlprompt.engine.feature_store import FeatureStore
from vlprompt.engine.features import encode_items
from vlprompt.engine.run import config_key, eval_config, evaluate_prompt, run

TINY = dict(backbone=TINY_VIT, pretrained="random", progress=False)
PHOTO = "a photo of a {}."  # the template of every user folder dataset
BLURRY = "a blurry photo of a {}."


# ----------------------------------------------------------------------------------------------
# Module fixtures: two generated datasets, one backbone, a few finished runs shared by the tests
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=4,
                                  n_test_per_class=4, seed=0)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Dataset B: the same generator, another seed, another folder (hence another dataset name)."""
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("otherset")), n_train_per_class=2,
                                  n_test_per_class=3, seed=7)


def make_cfg(dataset, out, **kw) -> vp.RunConfig:
    base = dict(dataset=dataset, shots=2, epochs=1, n_ctx=4, output=str(out), feature_cache=False, **TINY)
    return vp.RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def coop_run(shapes, bb, tmp_path_factory):
    """(metrics, run folder) of a finished CoOp run; the folder sits alone in its parent."""
    out = tmp_path_factory.mktemp("coop_parent") / "run"
    return run(make_cfg(shapes, out), backbone=bb), out


@pytest.fixture(scope="module")
def zs_run(shapes, bb, tmp_path_factory):
    out = tmp_path_factory.mktemp("zs_parent") / "run"
    return run(make_cfg(shapes, out, method="zeroshot"), backbone=bb), out


@pytest.fixture(scope="module")
def test_feats(shapes, bb):
    """(features, labels, classnames) of the test split, encoded here, not through the engine's store."""
    ds = vp.load_dataset(shapes, shots=2, seed=1)
    tf = test_transform(bb.image_size, bb.image_mean, bb.image_std)
    feats, labels = encode_items(bb, ds.test, tf, batch_size=100, progress=False)
    return feats, labels, ds.classnames


def reference_report(logits: torch.Tensor, labels: torch.Tensor, classnames) -> dict:
    """top-1, top-5 and macro accuracy in percent by plain Python: sort each row, look for the label."""
    rows, ys = logits.tolist(), labels.tolist()
    top1 = top5 = 0
    hits: dict[int, list[int]] = {}
    for row, y in zip(rows, ys):
        order = sorted(range(len(row)), key=lambda c: row[c], reverse=True)
        top1 += order[0] == y
        top5 += y in order[:5]
        hits.setdefault(y, []).append(int(order[0] == y))
    per_class = {classnames[c]: 100.0 * sum(h) / len(h) for c, h in hits.items()}
    return {"accuracy": 100.0 * top1 / len(ys), "top5_accuracy": 100.0 * top5 / len(ys),
            "macro_accuracy": sum(per_class.values()) / len(per_class), "per_class": per_class}


def assert_schema_2(m: dict, dataset_path: str, task: str, kind: str) -> None:
    assert m["schema_version"] == 2
    assert m["kind"] == kind
    assert isinstance(m["dataset"], str) and m["dataset"] == Path(dataset_path).name
    assert m["model"] == TINY_VIT
    assert m["pretrained"] == "random"
    assert m["task"] == task
    test = m["test"]
    assert set(m["metrics"]) >= {"acc1", "acc5", "mean_per_class_recall"}
    assert m["metrics"]["acc1"] == pytest.approx(test["accuracy"] / 100, abs=1e-12)
    assert m["metrics"]["acc5"] == pytest.approx(test["top5_accuracy"] / 100, abs=1e-12)
    assert m["metrics"]["mean_per_class_recall"] == pytest.approx(test["macro_accuracy"] / 100, abs=1e-12)
    for v in m["metrics"].values():
        assert 0.0 <= v <= 1.0
    # 8 classes: top-5 is a true top-5, and it can only add to top-1
    assert test["top5_k"] == 5 and test["top5_accuracy"] >= test["accuracy"]


def no_hidden_leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.glob(f".{name}.*"))


# ----------------------------------------------------------------------------------------------
# 1. Metrics schema 2
# ----------------------------------------------------------------------------------------------


def test_coop_run_metrics_schema_2_and_top5_matches_a_reference(coop_run, shapes, bb, test_feats):
    m, out = coop_run
    assert_schema_2(m, shapes, "prompt_classification", "train")
    saved = json.loads((out / "metrics.json").read_text())
    assert {k: v for k, v in m.items() if k != "output"} == saved  # what is returned is what is written
    feats, labels, names = test_feats
    learner = vp.CoOp.from_pretrained(out / "prompt", bb)
    assert learner.classnames == names
    with torch.no_grad():
        logits = learner(feats)
    ref = reference_report(logits, labels, names)
    assert abs(m["test"]["top5_accuracy"] - ref["top5_accuracy"]) <= 1e-9, (m["test"], ref)
    assert abs(m["test"]["accuracy"] - ref["accuracy"]) <= 1e-9
    assert abs(m["test"]["macro_accuracy"] - ref["macro_accuracy"]) <= 1e-9
    assert m["test"]["per_class"] == pytest.approx(ref["per_class"])
    assert m["test"]["n"] == len(labels) == 32


def test_zeroshot_run_metrics_schema_2_and_top5_matches_a_reference(zs_run, shapes, bb, test_feats):
    m, out = zs_run
    assert_schema_2(m, shapes, "zeroshot_classification", "zeroshot")
    assert json.loads((out / "metrics.json").read_text())["schema_version"] == 2
    assert not (out / "prompt").exists()
    feats, labels, names = test_feats
    with torch.no_grad():
        logits = vp.ZeroShotCLIP(bb, names, [PHOTO])(feats)
    ref = reference_report(logits, labels, names)
    assert abs(m["test"]["top5_accuracy"] - ref["top5_accuracy"]) <= 1e-9
    assert abs(m["test"]["accuracy"] - ref["accuracy"]) <= 1e-9


def test_eval_of_a_coop_prompt_has_schema_2_and_the_prompt_task(coop_run, shapes, bb, tmp_path):
    m, out = coop_run
    ev = evaluate_prompt(str(out), {}, output=str(tmp_path / "ev"), backbone=bb)
    assert_schema_2(ev, shapes, "prompt_classification", "eval")
    assert ev["metrics"] == m["metrics"]


def test_accuracy_report_on_hand_made_ranked_predictions():
    names = ["a", "b", "c", "d", "e", "f", "g"]
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    preds = torch.tensor([
        [0, 1, 2, 3, 4],  # label first: top-1 and top-5
        [6, 5, 4, 3, 1],  # label fifth: top-5 only
        [6, 5, 4, 3, 1],  # label absent
        [3, 0, 1, 2, 4],  # label first
        [0, 1, 2, 3, 5],  # label absent
        [0, 5, 1, 2, 3],  # label second
    ])
    r = accuracy_report(preds, labels, names)
    assert r["accuracy"] == pytest.approx(100 * 2 / 6)
    assert r["top5_accuracy"] == pytest.approx(100 * 4 / 6)
    assert r["top5_k"] == 5 and r["n"] == 6
    # per class over the classes with test images: a, d right; b, c, e, f wrong -> macro 2/6
    assert r["per_class"] == {"a": 100.0, "b": 0.0, "c": 0.0, "d": 100.0, "e": 0.0, "f": 0.0}
    assert r["macro_accuracy"] == pytest.approx(100 * 2 / 6)
    # only the first min(5, k) ranked labels count; top-1 labels alone give no top-5
    r3 = accuracy_report(preds[:, :3], labels, names)
    assert r3["top5_k"] == 3 and r3["top5_accuracy"] == pytest.approx(100 * 3 / 6)  # rows 0, 3, 5
    r1 = accuracy_report(preds[:, 0], labels, names)
    assert r1["top5_accuracy"] is None and r1["top5_k"] is None and r1["accuracy"] == r["accuracy"]


# ----------------------------------------------------------------------------------------------
# 2. The evaluation writes the same schema, to a folder of its own
# ----------------------------------------------------------------------------------------------


def test_evaluate_prompt_writes_a_run_folder_with_the_trained_runs_key(coop_run, shapes, tmp_path):
    m, out = coop_run
    dest = tmp_path / "ev"
    ev = evaluate_prompt(str(out), {}, output=str(dest))  # a fresh backbone from the prompt's record
    assert ev["output"] == str(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["config.yaml", "metrics.json"]
    saved = json.loads((dest / "metrics.json").read_text())
    assert saved["schema_version"] == 2 and saved["kind"] == "eval" == ev["kind"]
    assert saved["test"]["accuracy"] == m["test"]["accuracy"] == ev["test"]["accuracy"]
    assert saved["test"]["top5_accuracy"] == m["test"]["top5_accuracy"]
    assert saved["prompt"]["config_key"] == m["config_key"] == ev["prompt"]["config_key"]
    assert saved["prompt"]["trained_on"] == Path(shapes).name
    assert saved["config_key"] != m["config_key"]  # an evaluation is not the run it evaluates
    cfg = vp.RunConfig(**load_yaml(str(dest / "config.yaml")))
    assert (cfg.method, cfg.backbone, cfg.dataset) == ("coop", TINY_VIT, shapes)
    assert not no_hidden_leftovers(tmp_path, "ev")


def test_evaluate_prompt_without_output_writes_beside_the_run(coop_run, shapes, bb):
    m, out = coop_run
    expected = out.parent / (out.name + "_eval-" + os.path.basename(shapes))
    ev = evaluate_prompt(str(out), {}, backbone=bb)
    assert ev["output"] == str(expected)
    saved = json.loads((expected / "metrics.json").read_text())
    assert saved["kind"] == "eval" and saved["test"]["accuracy"] == m["test"]["accuracy"]
    assert (expected / "config.yaml").is_file()
    assert not no_hidden_leftovers(out.parent, expected.name)
    shutil.rmtree(expected)


# ----------------------------------------------------------------------------------------------
# 3. The prompt's recorded backbone wins; a backbone passed in must be the configured one
# ----------------------------------------------------------------------------------------------


def test_asking_an_eval_for_another_backbone_is_an_error_naming_both(coop_run, tmp_path):
    _, out = coop_run
    dest = tmp_path / "ev"
    with pytest.raises(vp.VlpromptError) as err:
        evaluate_prompt(str(out), {"backbone": "vlprompt-tiny-RN"}, output=str(dest))
    assert "vlprompt-tiny-RN" in str(err.value) and TINY_VIT in str(err.value)
    assert not dest.exists() and not no_hidden_leftovers(tmp_path, "ev")


def test_a_run_config_naming_another_backbone_is_not_used(coop_run, bb, tmp_path):
    m, out = coop_run
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    values = yaml.safe_load((edited / "config.yaml").read_text())
    assert values["backbone"] == TINY_VIT
    values["backbone"] = "vlprompt-tiny-RN"
    (edited / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    cfg, prompt = eval_config(str(edited), {})
    assert cfg.backbone == TINY_VIT and prompt == edited / "prompt"
    assert cfg.pretrained == "random" and cfg.weights is None
    # and the evaluation runs on it: the ViT passed in is accepted, the result is the trained run's
    ev = evaluate_prompt(str(edited), {}, output=str(tmp_path / "ev"), backbone=bb)
    assert ev["model"] == TINY_VIT and ev["test"]["accuracy"] == m["test"]["accuracy"]


def _mismatches(tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not really weights")
    return {
        "architecture": ({"backbone": "vlprompt-tiny-RN"}, ["vlprompt-tiny-RN", TINY_VIT]),
        "precision": ({"precision": "bf16"}, ["bf16", "fp32"]),
        "weights": ({"weights": str(weights), "pretrained": None}, [str(weights.resolve())]),
    }


@pytest.mark.parametrize("what", ["architecture", "precision", "weights"])
def test_run_with_a_mismatched_backbone_fails_before_writing(what, shapes, bb, tmp_path, monkeypatch):
    change, words = _mismatches(tmp_path)[what]
    loads = []
    real = run_mod.load_dataset
    monkeypatch.setattr(run_mod, "load_dataset", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "runs" / "mismatch"
    with pytest.raises(vp.VlpromptError) as err:
        run(make_cfg(shapes, out, **change), backbone=bb)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert not out.exists()
    assert not no_hidden_leftovers(out.parent, out.name)
    assert loads == []


# ----------------------------------------------------------------------------------------------
# 4. Cross-dataset evaluation: the target's own classes and template
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_blurry_run(shapes, bb, tmp_path_factory):
    out = tmp_path_factory.mktemp("base_parent") / "run"
    run(make_cfg(shapes, out, subsample="base", template=BLURRY), backbone=bb)
    return out


def test_cross_dataset_eval_config_does_not_inherit_subsample_or_template(base_blurry_run, shapes, other):
    run_cfg = load_yaml(str(base_blurry_run / "config.yaml"))
    assert (run_cfg["subsample"], run_cfg["template"]) == ("base", BLURRY)
    cfg, _ = eval_config(str(base_blurry_run), {"dataset": other})
    assert cfg.dataset == other and cfg.subsample == "all" and cfg.template is None
    cfg, _ = eval_config(str(base_blurry_run), {"subsample": "new"})
    assert cfg.dataset == shapes and cfg.subsample == "new" and cfg.template == BLURRY
    cfg, _ = eval_config(str(base_blurry_run), {"dataset": other, "template": "x {}"})
    assert cfg.subsample == "all" and cfg.template == "x {}"
    cfg, _ = eval_config(str(base_blurry_run), {"dataset": other, "subsample": "new"})
    assert cfg.subsample == "new" and cfg.template is None
    cfg, _ = eval_config(str(base_blurry_run), {})
    assert (cfg.dataset, cfg.subsample, cfg.template) == (shapes, "base", BLURRY)


def test_cross_dataset_coop_eval_records_the_targets_template(base_blurry_run, other, bb, tmp_path):
    ev = evaluate_prompt(str(base_blurry_run), {"dataset": other}, output=str(tmp_path / "ev"), backbone=bb)
    assert ev["dataset"] == Path(other).name and ev["data"]["subsample"] == "all"
    assert ev["data"]["template"] == PHOTO and ev["data"]["num_classes"] == 8
    assert ev["prompt"]["trained_on"] != ev["dataset"]


def test_the_same_dataset_spelled_another_way_is_not_another_dataset(base_blurry_run, shapes):
    for spelled in (shapes + os.sep, os.path.relpath(shapes)):
        assert os.path.samefile(spelled, shapes)
        cfg, _ = eval_config(str(base_blurry_run), {"dataset": spelled, "subsample": "new"})
        assert cfg.subsample == "new" and cfg.template == BLURRY, (spelled, cfg.template)


@pytest.fixture(scope="module")
def kg_run(shapes, bb, tmp_path_factory):
    out = tmp_path_factory.mktemp("kg_parent") / "run"
    cfg = vp.RunConfig.from_sources(dataset=shapes, method="kgcoop", shots=2, epochs=1, batch_size=8,
                                    template=BLURRY, output=str(out), feature_cache=False, **TINY)
    m = run(cfg, backbone=bb)
    return m, out


def spy_loaded_learners(monkeypatch) -> list:
    import vlprompt.engine.run as engine_run

    loaded = []
    real = engine_run.load_prompt

    def load(*a, **k):
        learner = real(*a, **k)
        loaded.append(learner)
        return learner

    monkeypatch.setattr(engine_run, "load_prompt", load)
    return loaded


def test_kgcoop_cross_dataset_eval_uses_the_targets_template_in_its_hand_view(kg_run, other, bb, tmp_path,
                                                                               monkeypatch):
    from vlprompt.prompts.zeroshot import handcrafted_text_features

    m, out = kg_run
    assert m["data"]["template"] == BLURRY
    saved = json.loads((out / "prompt" / "prompt_config.json").read_text())
    assert saved["config"]["template"] == BLURRY
    loaded = spy_loaded_learners(monkeypatch)
    ev = evaluate_prompt(str(out), {"dataset": other}, output=str(tmp_path / "ev"), backbone=bb)
    assert ev["method"] == "kgcoop" and ev["task"] == "prompt_classification"
    assert ev["data"]["template"] == PHOTO
    (learner,) = loaded
    assert learner.templates == [PHOTO]
    names = vp.load_dataset(other).classnames
    assert torch.allclose(learner.hand, handcrafted_text_features(bb, names, [PHOTO]), atol=1e-6)
    # on its own dataset the prompt keeps the template it was trained with
    same = evaluate_prompt(str(out), {}, output=str(tmp_path / "same"), backbone=bb)
    assert same["data"]["template"] == BLURRY and loaded[-1].templates == [BLURRY]
    assert same["test"]["accuracy"] == m["test"]["accuracy"]


# ----------------------------------------------------------------------------------------------
# 5. The feature store belongs to the caller
# ----------------------------------------------------------------------------------------------


def test_no_module_level_feature_store():
    assert not hasattr(run_mod, "_MEMO") and not hasattr(run_mod, "FeatureMemo")
    import vlprompt

    for info in pkgutil.walk_packages(vlprompt.__path__, "vlprompt."):
        if info.name.startswith("vlprompt.demo"):
            continue
        mod = importlib.import_module(info.name)
        held = [k for k, v in vars(mod).items() if isinstance(v, FeatureStore)]
        assert not held, (info.name, held)


def count_encodes(monkeypatch) -> list:
    calls = []
    real = fs_mod.encode_items

    def counting(*a, **k):
        calls.append(len(a[1]))
        return real(*a, **k)

    monkeypatch.setattr(fs_mod, "encode_items", counting)
    return calls


def test_one_store_encodes_the_test_split_once_and_separate_runs_do_not_share(shapes, bb, tmp_path,
                                                                              monkeypatch):
    calls = count_encodes(monkeypatch)
    store = FeatureStore()
    a = run(make_cfg(shapes, tmp_path / "a", seed=1), backbone=bb, store=store)
    b = run(make_cfg(shapes, tmp_path / "b", seed=2, method="zeroshot"), backbone=bb, store=store)
    assert calls == [32] and len(store) == 1
    assert a["test"]["n"] == b["test"]["n"] == 32
    run(make_cfg(shapes, tmp_path / "c", seed=1), backbone=bb)  # no store given: its own, encoded again
    assert calls == [32, 32] and len(store) == 1


def test_a_run_without_a_store_keeps_nothing_alive(shapes, tmp_path, monkeypatch):
    bb2 = tiny_backbone()
    ref = weakref.ref(bb2)
    m = run(make_cfg(shapes, tmp_path / "given"), backbone=bb2, store=None)
    del bb2
    gc.collect()
    assert ref() is None, "the engine keeps the backbone alive after the run returned"
    assert m["model"] == TINY_VIT
    # a backbone the run loads itself is released too
    refs = []
    real = run_mod.backbone_from_config

    def loading(cfg):
        loaded = real(cfg)
        refs.append(weakref.ref(loaded))
        return loaded

    monkeypatch.setattr(run_mod, "backbone_from_config", loading)
    run(make_cfg(shapes, tmp_path / "own"))
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None


def test_a_store_keeps_its_backbone_alive_until_the_caller_drops_it(shapes, tmp_path):
    """The positive control of the test above: the weak reference does see what a store holds."""
    bb2 = tiny_backbone()
    ref = weakref.ref(bb2)
    store = FeatureStore()
    run(make_cfg(shapes, tmp_path / "z", method="zeroshot"), backbone=bb2, store=store)
    del bb2
    gc.collect()
    assert ref() is not None and len(store) == 1
    del store
    gc.collect()
    assert ref() is None


# ----------------------------------------------------------------------------------------------
# 6. Run folders are written as one unit
# ----------------------------------------------------------------------------------------------


def test_a_run_failing_while_writing_leaves_the_finished_run_intact(shapes, bb, tmp_path, monkeypatch):
    out = tmp_path / "runs" / "r"
    run(make_cfg(shapes, out), backbone=bb)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert Path("metrics.json") in before and Path("prompt/prompt.safetensors") in before
    seen = []

    def failing(folder, cfg, metrics):
        seen.append((Path(folder).name, (Path(folder) / "prompt").is_dir()))
        (Path(folder) / "config.yaml").write_text("half written")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_mod, "write_run_files", failing)
    with pytest.raises(vp.VlpromptError, match="No space left on device"):
        run(make_cfg(shapes, out, seed=5, epochs=2, overwrite=True), backbone=bb)
    assert len(seen) == 1
    name, trained = seen[0]
    assert name.startswith(".r.partial-") and trained  # it failed after training, in the staging folder
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    # Only the failed run's checkpoint stays (its training is not lost: the next run resumes from it).
    assert no_hidden_leftovers(out.parent, "r") == [".r.checkpoint"]


def test_a_run_failing_to_move_into_place_leaves_the_finished_run_intact(shapes, bb, tmp_path, monkeypatch):
    out = tmp_path / "runs" / "r"
    run(make_cfg(shapes, out), backbone=bb)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_replace = os.replace
    failed = []

    def replace(src, dst, *a, **k):
        if Path(src).name.startswith(".r.partial-") and Path(dst) == out:
            failed.append(src)
            raise OSError(5, "Input/output error")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(run_mod.os, "replace", replace)
    with pytest.raises(vp.VlpromptError, match=re.escape(str(out))):
        run(make_cfg(shapes, out, seed=5, overwrite=True), backbone=bb)
    monkeypatch.undo()
    assert len(failed) == 1
    assert out.is_dir(), f"the finished run is gone from {out}: {sorted(os.listdir(out.parent))}"
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert no_hidden_leftovers(out.parent, "r") == [".r.checkpoint"]


@pytest.fixture
def record_dataset_loads(monkeypatch) -> list:
    loads = []
    real = run_mod.load_dataset
    monkeypatch.setattr(run_mod, "load_dataset", lambda *a, **k: loads.append(a) or real(*a, **k))
    return loads


def test_a_read_only_output_parent_fails_at_once(shapes, bb, tmp_path, record_dataset_loads, coop_run):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)  # 0o555
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user ignores directory permissions (root)")
        out = ro / "run"
        with pytest.raises(vp.VlpromptError, match=re.escape(str(out))):
            run(make_cfg(shapes, out), backbone=bb)
        with pytest.raises(vp.VlpromptError, match=re.escape(str(ro / "ev"))):
            evaluate_prompt(str(coop_run[1]), {}, output=str(ro / "ev"), backbone=bb)
        assert record_dataset_loads == []
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_an_unwritable_output_fails_at_once_even_for_root(shapes, bb, tmp_path, record_dataset_loads, coop_run):
    """The same contract where permissions cannot be relied on: the output's parent is a file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    with pytest.raises(vp.VlpromptError, match=re.escape(str(out))):
        run(make_cfg(shapes, out), backbone=bb)
    with pytest.raises(vp.VlpromptError, match=re.escape(str(blocker / "ev"))):
        evaluate_prompt(str(coop_run[1]), {}, output=str(blocker / "ev"), backbone=bb)
    assert record_dataset_loads == []
    assert blocker.read_text() == "not a folder"


# ----------------------------------------------------------------------------------------------
# 7. A run's identity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,a,b", [
    ("output", "runs/a", "elsewhere/b"),
    ("progress", True, False),
    ("num_workers", 0, 3),
    ("test_batch_size", 100, 7),
    ("feature_cache", True, False),
    ("cache_dir", None, "/tmp/some-cache"),
])
def test_config_key_ignores_how_a_run_is_carried_out(key, a, b):
    base = vp.RunConfig(dataset="shapes", method="kgcoop", **TINY)
    ka = config_key(base.replace(**{key: a}).to_dict())
    kb = config_key(base.replace(**{key: b}).to_dict())
    assert ka == kb
    # several at once, and in another key order
    d = base.to_dict()
    d.update(output="x", progress=False, num_workers=2, test_batch_size=3, feature_cache=False, cache_dir="/c")
    assert config_key(dict(reversed(list(d.items())))) == config_key(base.to_dict())


@pytest.mark.parametrize("change", [{"seed": 2}, {"epochs": 7}, {"method_options": {"weight": 4.0}},
                                    {"shots": 4}, {"method": "coop"}, {"template": "x {}"}])
def test_config_key_changes_with_what_changes_the_result(change):
    base = vp.RunConfig(dataset="shapes", method="kgcoop", epochs=3, method_options={"weight": 8.0}, **TINY)
    assert config_key(base.replace(**change).to_dict()) != config_key(base.to_dict())


def test_recorded_config_key_is_the_key_of_the_written_config(coop_run):
    m, out = coop_run
    written = vp.RunConfig(**load_yaml(str(out / "config.yaml")))
    assert m["config_key"] == config_key(written.to_dict())
    assert m["config_key"] == config_key(written.replace(output="moved/elsewhere", progress=True).to_dict())
    assert m["config_key"] != config_key(written.replace(seed=written.seed + 1).to_dict())


def test_config_key_reads_method_options_as_the_method_does():
    base = vp.RunConfig(dataset="shapes", method="kgcoop", epochs=3, **TINY)
    spelled = [{}, {"weight": 8.0}, {"weight": "8"}, {"weight": 8, "hand_templates": "dataset"}]
    assert len({config_key(base.replace(method_options=o).to_dict()) for o in spelled}) == 1
    assert config_key(base.replace(method_options={"weight": "4"}).to_dict()) != config_key(base.to_dict())


def test_training_sources_expose_stored_features_through_their_protocol(shapes, bb):
    from vlprompt.data.transforms import train_transform
    from vlprompt.engine.trainer import ExactFeatures, FeatureBank, TrainSettings

    ds = vp.load_dataset(shapes, shots=2, seed=1)
    settings = TrainSettings(epochs=1, batch_size=4, lr=0.002, momentum=0.9, weight_decay=5e-4, warmup_epochs=1,
                             warmup_lr=1e-5, seed=1)
    views = {"weak": train_transform(bb.image_size, bb.image_mean, bb.image_std)}
    bank = FeatureBank(bb, ds.train, views, settings, False, bank_views=3)
    feats, labels = bank.stored_features("weak")
    assert feats.shape == (3 * len(ds.train), bb.embed_dim)
    for i, item in enumerate(ds.train):
        for k in range(3):
            assert torch.equal(feats[3 * i + k], bank.bank[i, k]) and int(labels[3 * i + k]) == item.label
    assert ExactFeatures(bb, ds.train, views, settings, False).stored_features("weak") is None
