"""Training actually learns; runs write complete, reloadable results; multiple runs share one backbone."""

from __future__ import annotations

import json

import pytest
import torch

import vlprompt as vp
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.feature_store import FeatureStore
from vlprompt.engine.run import evaluate_prompt, run


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=16,
                                  n_test_per_class=10, seed=0)


def cfg(shapes, out, **kw):
    base = dict(dataset=shapes, backbone="vlprompt-tiny-ViT", pretrained="random", shots=16, epochs=12,
                n_ctx=4, csc=True, output=str(out), progress=False)
    return vp.RunConfig(**{**base, **kw})


def test_coop_learns_and_eval_reproduces(shapes, bb, tmp_path):
    memo = FeatureStore()
    zs = run(cfg(shapes, tmp_path / "zs", method="zeroshot"), backbone=bb, store=memo)
    m = run(cfg(shapes, tmp_path / "coop"), backbone=bb, store=memo)
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
    devs = {d["key"]: d for d in saved["deviations"]}
    assert devs["backbone.random"]["value"] is True and "RANDOM" in devs["backbone.random"]["words"]
    assert devs["epochs"]["value"] == 12
    assert {"torch", "open_clip", "vlprompt"} <= set(saved["versions"])
    assert saved["backbone"]["image_encoder"] == bb.image_encoder_id != "open_clip"  # tiny ViT: the shortcut
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
    import vlprompt.engine.feature_store as engine_run

    calls = []
    real = engine_run.encode_items
    monkeypatch.setattr(engine_run, "encode_items", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_memo_encodes_each_test_split_once(shapes, bb, tmp_path, monkeypatch):
    calls = count_encodes(monkeypatch)
    memo = FeatureStore()
    for seed in (1, 2):
        run(cfg(shapes, tmp_path / f"s{seed}", epochs=1, seed=seed, feature_cache=False), backbone=bb, store=memo)
    assert len(calls) == 1


def test_disk_cache_serves_a_later_process(shapes, bb, tmp_path, monkeypatch):
    calls = count_encodes(monkeypatch)
    cache_dir = str(tmp_path / "cache")
    # Two memos stand for two processes: the second reads the features the first wrote.
    a = run(cfg(shapes, tmp_path / "a", epochs=1, cache_dir=cache_dir), backbone=bb, store=FeatureStore())
    b = run(cfg(shapes, tmp_path / "b", epochs=1, cache_dir=cache_dir), backbone=bb, store=FeatureStore())
    assert len(calls) == 1
    assert a["test"] == b["test"]


def test_base_to_new_on_generated_data(shapes, bb, tmp_path):
    m = run(cfg(shapes, tmp_path / "base", subsample="base", epochs=1, csc=False), backbone=bb)
    base_names = m["data"]["classnames"]
    assert len(base_names) == 4
    new = evaluate_prompt(str(tmp_path / "base"), {"subsample": "new"})
    assert new["data"]["subsample"] == "new"
    new_names = new["data"]["classnames"]
    all_names = vp.load_dataset(shapes).classnames
    # Base = the first ceil(n/2) labels, new = the rest, each relabelled from 0 (SPEC 6.2).
    assert base_names == all_names[:4] and new_names == all_names[4:]
    assert set(new["test"]["per_class"]) <= set(new_names)


def test_feature_bank_mode_learns_and_is_recorded(shapes, bb, tmp_path):
    m = run(cfg(shapes, tmp_path / "bank", train_mode="feature_bank", bank_views=3), backbone=bb)
    epochs = m["train"]["epochs"]
    assert epochs[-1]["loss"] < 0.8 * epochs[0]["loss"]
    assert m["test"]["accuracy"] > 1.5 * 100 / 8
    assert m["train_mode"] == "feature_bank" and "feature_bank_s" in m["timings"]
    bank = next(d for d in m["deviations"] if d["key"] == "train_mode")
    assert (bank["value"], bank["reference"]) == ("feature_bank", "exact") and "3 augmented views" in bank["detail"]
    exact = run(cfg(shapes, tmp_path / "exact", epochs=1), backbone=bb)
    assert not any(d["key"] == "train_mode" for d in exact["deviations"]) and exact["train_mode"] == "exact"


def test_feature_bank_holds_distinct_augmented_views(shapes, bb):
    from vlprompt.data import train_transform
    from vlprompt.engine.trainer import FeatureBank, TrainSettings

    items = vp.load_dataset(shapes, shots=2).train
    settings = TrainSettings(epochs=1, batch_size=4, lr=0.002, momentum=0.9, weight_decay=5e-4, warmup_epochs=1,
                             warmup_lr=1e-5, seed=1)
    tf = train_transform(bb.image_size)
    bank = FeatureBank(bb, items, {"weak": tf}, settings, progress=False, bank_views=4)
    assert bank.bank.shape == (len(items), 4, bb.embed_dim)
    assert not torch.equal(bank.bank[:, 0], bank.bank[:, 1])  # fresh random crops per view
    batch = next(bank.epoch([[0, 1, 2]], 0))
    feats = batch.views["weak"]
    assert feats.shape == (3, bb.embed_dim) and batch.labels.tolist() == [items[i].label for i in range(3)]
    assert all(any(torch.equal(feats[i], bank.bank[i, v]) for v in range(4)) for i in range(3))


def test_views_sharing_a_transform_get_different_stored_draws(shapes, bb):
    from vlprompt.data import train_transform
    from vlprompt.engine.trainer import ExactFeatures, FeatureBank, TrainSettings

    items = vp.load_dataset(shapes, shots=2).train
    settings = TrainSettings(epochs=1, batch_size=4, lr=0.002, momentum=0.9, weight_decay=5e-4, warmup_epochs=1,
                             warmup_lr=1e-5, seed=1)
    weak, other = train_transform(bb.image_size), train_transform(bb.image_size)
    views = {"weak": weak, "a": other, "b": other}
    bank = FeatureBank(bb, items, views, settings, progress=False, bank_views=2)
    assert len(bank.banks) == 2  # one bank per distinct transform, not per view
    for batch in bank.epoch([list(range(len(items)))] * 3, 0):
        assert set(batch.views) == {"weak", "a", "b"}
        assert not any(torch.equal(batch.views["a"][i], batch.views["b"][i]) for i in range(len(items)))
    with pytest.raises(vp.VlpromptError, match="bank_views=1 is too few"):
        FeatureBank(bb, items, views, settings, progress=False, bank_views=1)
    # Exact mode: every view is its own fresh augmentation, all views encoded in one call.
    exact = ExactFeatures(bb, items, views, settings, progress=False)
    batch = next(exact.epoch([[0, 1, 2]], 0))
    assert {k: tuple(v.shape) for k, v in batch.views.items()} == {k: (3, bb.embed_dim) for k in views}
    assert batch.index.tolist() == [0, 1, 2]
    assert not torch.equal(batch.views["a"], batch.views["b"])


def test_method_options_are_parsed_typed_and_checked():
    import dataclasses

    from vlprompt.methods.base import parse_options

    @dataclasses.dataclass
    class Opts:
        weight: float = 1.0
        mode: str = "a"
        flag: bool = False

        def __post_init__(self):
            if self.mode not in ("a", "b"):
                raise vp.VlpromptError(f"mode: '{self.mode}' is not one of ['a', 'b']")

    assert parse_options("m", Opts, {"weight": "0.5", "flag": "yes"}) == Opts(weight=0.5, flag=True)
    assert parse_options("m", Opts, None) == Opts()
    with pytest.raises(vp.VlpromptError, match="method m: unknown option 'wieght'"):
        parse_options("m", Opts, {"wieght": 2})
    with pytest.raises(vp.VlpromptError, match="m option weight: invalid value 'heavy'"):
        parse_options("m", Opts, {"weight": "heavy"})
    with pytest.raises(vp.VlpromptError, match="mode: 'c'"):
        parse_options("m", Opts, {"mode": "c"})
    with pytest.raises(vp.VlpromptError, match="takes no options"):
        parse_options("m", None, {"x": 1})


def test_method_options_merge_file_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method_options: {a: 1, b: 2}\n")
    cfg = vp.RunConfig.from_sources(str(path), method_options={"b": "3"})
    assert cfg.method_options == {"a": 1, "b": "3"}
