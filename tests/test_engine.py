"""Training actually learns; runs write complete, reloadable results; multiple runs share one backbone."""

from __future__ import annotations

import json

import pytest
import torch
from support import tiny_backbone

import vlprompt as vp
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.run import FeatureMemo, evaluate_prompt, run


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=16,
                                  n_test_per_class=10, seed=0)


@pytest.fixture(scope="module")
def bb():
    return tiny_backbone()


def cfg(shapes, out, **kw):
    base = dict(dataset=shapes, backbone="vlprompt-tiny-ViT", pretrained="random", shots=16, epochs=12,
                n_ctx=4, csc=True, output=str(out), progress=False)
    return vp.RunConfig(**{**base, **kw})


def test_coop_learns_and_eval_reproduces(shapes, bb, tmp_path):
    memo = FeatureMemo()
    zs = run(cfg(shapes, tmp_path / "zs", method="zeroshot"), backbone=bb, memo=memo)
    m = run(cfg(shapes, tmp_path / "coop"), backbone=bb, memo=memo)
    epochs = m["train"]["epochs"]
    assert len(epochs) == 12 and m["train"]["steps"] == 12 * 4  # 128 images, batch 32
    assert epochs[0]["lr"] == 1e-5 and epochs[1]["lr"] == pytest.approx(0.002)
    first, last = epochs[0]["loss"], epochs[-1]["loss"]
    assert last < 0.8 * first, (first, last)
    assert epochs[-1]["train_accuracy"] > epochs[0]["train_accuracy"]
    chance = 100 / 8
    assert epochs[-1]["train_accuracy"] > 2.5 * chance
    assert m["test"]["accuracy"] > 1.5 * chance, m["test"]["accuracy"]
    assert m["test"]["accuracy"] > zs["test"]["accuracy"]
    # The run folder is complete.
    out = tmp_path / "coop"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"]["accuracy"] == m["test"]["accuracy"]
    assert any("RANDOM" in d for d in saved["deviations"])
    assert any("epochs=12" in d for d in saved["deviations"])
    assert {"torch", "open_clip", "vlprompt"} <= set(saved["versions"])
    assert (out / "config.yaml").is_file() and (out / "prompt" / "prompt.safetensors").is_file()
    # Evaluating the saved prompt in a fresh backbone reproduces the reported accuracy exactly.
    again = evaluate_prompt(str(out), {}, output=str(tmp_path / "eval"))
    assert again["test"]["accuracy"] == m["test"]["accuracy"]
    assert again["test"]["per_class"] == m["test"]["per_class"]


def test_same_seed_same_result(shapes, bb, tmp_path):
    a = run(cfg(shapes, tmp_path / "a", epochs=2), backbone=bb)
    b = run(cfg(shapes, tmp_path / "b", epochs=2), backbone=bb)
    assert a["train"]["epochs"][-1]["loss"] == b["train"]["epochs"][-1]["loss"]
    ctx_a = vp.CoOp.from_pretrained(tmp_path / "a" / "prompt", bb).ctx
    ctx_b = vp.CoOp.from_pretrained(tmp_path / "b" / "prompt", bb).ctx
    assert torch.equal(ctx_a, ctx_b)


def count_encodes(monkeypatch) -> list:
    import vlprompt.engine.run as engine_run

    calls = []
    real = engine_run.encode_items
    monkeypatch.setattr(engine_run, "encode_items", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_memo_encodes_each_test_split_once(shapes, bb, tmp_path, monkeypatch):
    calls = count_encodes(monkeypatch)
    memo = FeatureMemo()
    for seed in (1, 2):
        run(cfg(shapes, tmp_path / f"s{seed}", epochs=1, seed=seed, feature_cache=False), backbone=bb, memo=memo)
    assert len(calls) == 1


def test_disk_cache_serves_a_later_process(shapes, bb, tmp_path, monkeypatch):
    calls = count_encodes(monkeypatch)
    cache_dir = str(tmp_path / "cache")
    # Two memos stand for two processes: the second reads the features the first wrote.
    a = run(cfg(shapes, tmp_path / "a", epochs=1, cache_dir=cache_dir), backbone=bb, memo=FeatureMemo())
    b = run(cfg(shapes, tmp_path / "b", epochs=1, cache_dir=cache_dir), backbone=bb, memo=FeatureMemo())
    assert len(calls) == 1
    assert a["test"] == b["test"]


def test_base_to_new_on_generated_data(shapes, bb, tmp_path):
    m = run(cfg(shapes, tmp_path / "base", subsample="base", epochs=1, csc=False), backbone=bb)
    base_names = m["dataset"]["classnames"]
    assert len(base_names) == 4
    new = evaluate_prompt(str(tmp_path / "base"), {"subsample": "new"})
    assert new["dataset"]["subsample"] == "new"
    new_names = new["dataset"]["classnames"]
    all_names = vp.load_dataset(shapes).classnames
    # Base = the first ceil(n/2) labels, new = the rest, each relabelled from 0 (SPEC 6.2).
    assert base_names == all_names[:4] and new_names == all_names[4:]
    assert set(new["test"]["per_class"]) <= set(new_names)
