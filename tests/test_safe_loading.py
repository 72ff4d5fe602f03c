"""Nothing vlprompt reads from disk can run code. A pickle whose payload would create a marker file is planted in
every place a run or a study reads from (the checkpoint folder, a weights file, a TorchScript archive, a cached
download of a pretrained tag, a prompt folder, the feature cache, a run folder, a study's index), and the real
code path runs: the marker never appears, and the file is refused in one line naming it, or ignored where that is
what vlprompt does with foreign files. A control test shows that every planted file does run its payload when it
is unpickled the usual way. The checkpoint format's round trip is checked here too."""

from __future__ import annotations

import builtins
import io
import json
import math
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save
from support import TINY_VIT

import vlprompt as vp
import vlprompt.backbones.loader as loader
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.checkpoint import (CHECKPOINT_FILE, FORMAT_FIELD, OLD_CHECKPOINT_FILE, STATE_FIELD,
                                        checkpoint_bytes, checkpoint_folder, encode_tree, read_checkpoint)
from vlprompt.engine.run import run
from vlprompt.errors import VlpromptError
from vlprompt.protocols.study import MethodSpec, StudySpec, plan, run_study

VALUES = {"backbone": TINY_VIT, "pretrained": "random", "shots": 2, "epochs": 1, "batch_size": 4}


class _Plant:
    """Pickles as a call of ``exec`` that creates ``marker``: what a malicious file would do."""

    def __init__(self, marker: Path, via_os_system: bool = False):
        self.marker, self.via_os_system = str(marker), via_os_system

    def __reduce__(self):
        if self.via_os_system:
            return os.system, (f"touch '{self.marker}'",)
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def pickle_plant(marker: Path) -> bytes:
    return pickle.dumps({"ctx": _Plant(marker)}, protocol=2)


def torch_save_plant(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"ctx": _Plant(marker)}, buffer)  # a zip like every .pt torch.save writes, data.pkl inside
    return buffer.getvalue()


PLANTS = {"pickle": pickle_plant, "torch.save": torch_save_plant}


def torchscript_plant(marker: Path, folder: Path, via_os_system: bool) -> bytes:
    """A real TorchScript archive whose data.pkl is replaced by the payload."""
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(folder / "genuine.pt"))
    out = io.BytesIO()
    with zipfile.ZipFile(folder / "genuine.pt") as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(_Plant(marker, via_os_system), protocol=2)
            dst.writestr(item, data)
    return out.getvalue()


def unpickle_the_usual_way(data: bytes) -> None:
    """What loading each kind of planted file without vlprompt's readers would do."""
    if data[:2] == b"PK" and b"constants.pkl" in data:  # TorchScript: its data.pkl is a plain pickle
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl"))))
    elif data[:2] == b"PK":
        torch.load(io.BytesIO(data), weights_only=False)
    else:
        pickle.loads(data)


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and "weights_only" not in message  # never a hint to load it unsafely
    return message


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=4,
                                  n_test_per_class=2, seed=0)


def cfg(shapes, out, **kw):
    return vp.RunConfig.from_sources(dataset=shapes, output=str(out), progress=False, **{**VALUES, **kw})


@pytest.fixture(scope="module")
def real_checkpoint(shapes, bb, tmp_path_factory) -> bytes:
    """The bytes of a checkpoint a real training run wrote (kept with keep_checkpoints)."""
    out = tmp_path_factory.mktemp("kept") / "run"
    run(cfg(shapes, out, keep_checkpoints=True), backbone=bb)
    return (out / "checkpoint" / CHECKPOINT_FILE).read_bytes()


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD-RAN"


# -- the control: every planted file is live --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["pickle", "torch.save", "torchscript exec", "torchscript os.system"])
def test_every_planted_file_runs_its_payload_when_unpickled_the_usual_way(tmp_path, marker, kind):
    if kind.startswith("torchscript"):
        data = torchscript_plant(marker, tmp_path, via_os_system=kind.endswith("os.system"))
    else:
        data = PLANTS[kind](marker)
    unpickle_the_usual_way(data)
    assert marker.exists()


# -- the checkpoint folder --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", PLANTS)
def test_an_old_pickle_checkpoint_is_refused_and_never_loaded(shapes, bb, tmp_path, marker, kind):
    out = tmp_path / "run"
    folder = checkpoint_folder(out)
    folder.mkdir()
    (folder / OLD_CHECKPOINT_FILE).write_bytes(PLANTS[kind](marker))
    with pytest.raises(VlpromptError) as err:
        run(cfg(shapes, out), backbone=bb)
    message = one_line(err)
    assert str(folder / OLD_CHECKPOINT_FILE) in message and "old pickle format" in message
    assert "could run code" in message and "--resume never" in message
    assert not marker.exists() and not out.exists()
    run(cfg(shapes, out, resume="never"), backbone=bb)  # what the line says: the run starts over
    assert (out / "metrics.json").is_file() and not folder.exists() and not marker.exists()


def _not_our_checkpoints(marker: Path, real: bytes) -> dict[str, bytes]:
    return {
        "pickle": pickle_plant(marker),
        "torch.save": torch_save_plant(marker),
        "garbage": b"\x00\x01 not a checkpoint at all" * 20,
        "truncated": real[: len(real) // 2],
        "foreign safetensors": save({"x": torch.zeros(2)}, metadata={"format": "pt"}),
        "another format": save({"x": torch.zeros(2)}, metadata={FORMAT_FIELD: "1", STATE_FIELD: "{}"}),
    }


@pytest.mark.parametrize("kind", ["pickle", "torch.save", "garbage", "truncated", "foreign safetensors",
                                  "another format"])
def test_a_file_that_is_not_our_checkpoint_is_one_error_line(shapes, bb, tmp_path, marker, real_checkpoint, kind):
    out = tmp_path / "run"
    path = checkpoint_folder(out) / CHECKPOINT_FILE
    path.parent.mkdir()
    path.write_bytes(_not_our_checkpoints(marker, real_checkpoint)[kind])
    with pytest.raises(VlpromptError) as err:
        run(cfg(shapes, out), backbone=bb)
    message = one_line(err)
    assert message.startswith(f"checkpoint {path} is not a vlprompt checkpoint of format 2")
    assert message.endswith("remove it or pass --resume never")
    assert not marker.exists() and path.exists() and not out.exists()


def _with_tree(tree, tensors=None) -> bytes:
    return save(tensors or {"tensor0": torch.zeros(1)},
                metadata={FORMAT_FIELD: "2", STATE_FIELD: tree if isinstance(tree, str) else json.dumps(tree)})


WHOLE = {"identity": {}, "learner": {}, "optimizer": {}, "generator": None, "epoch": 0, "step_in_epoch": 0,
         "history": [], "partial": None, "random": {}, "objective": {}}


@pytest.mark.parametrize("tree, why", [
    ({**WHOLE, "learner": {"$eval": "__import__('os')"}}, "unknown or malformed node '$eval'"),
    ({**WHOLE, "learner": {"ctx": {"$tensor": "tensor7"}}}, "'tensor7' that is not in the file"),
    ({**WHOLE, "history": {"$tuple": [1], "x": 2}}, "a tagged node with other keys"),
    ({**WHOLE, "optimizer": {"$dict": [[1]]}}, "not a [key, value] pair"),
    ({**WHOLE, "random": {"$ndarray": {"dtype": "object", "shape": [1], "values": [1]}}}, "malformed $ndarray"),
    ({**WHOLE, "random": {"$ndarray": {"dtype": "uint8", "shape": [2], "values": [1]}}}, "shape [2] with 1 values"),
    ('{"epoch": NaN}', "a bare JSON NaN"),
    ("{not json", "damaged"),
    ({k: v for k, v in WHOLE.items() if k != "optimizer"}, "missing optimizer"),
    ([1, 2], "missing identity"),
])
def test_a_damaged_state_tree_is_one_error_line(tmp_path, tree, why):
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(_with_tree(tree))
    with pytest.raises(VlpromptError) as err:
        read_checkpoint(path)
    message = one_line(err)
    assert str(path) in message and why in message and "remove it or pass --resume never" in message


# -- the checkpoint format: every value the trainer saves comes back exactly --------------------------------------

def _identical(a, b, where="state") -> None:
    """Same types all the way down, and equal values (NaN equal to NaN, -0.0 distinct from 0.0, tensors and
    arrays by dtype, shape and elements)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} became {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), where
    else:
        assert a == b, where


def test_every_kind_of_value_round_trips_exactly(tmp_path):
    param = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.sum().backward()
    opt.step()
    numpy_gen = np.random.default_rng(11)
    numpy_gen.random(3)
    torch_gen = torch.Generator().manual_seed(5)
    torch.rand(4, generator=torch_gen)
    state = {
        "identity": {"lr": 0.002, "shots": 2, "template": None, "csc": False, "names": ("a", "b"), "$odd": "key"},
        "learner": {"ctx": torch.randn(2, 4), "half": torch.randn(3).half(), "bf16": torch.randn(3).bfloat16(),
                    "empty": torch.zeros(0, 5), "labels": torch.arange(4), "flags": torch.tensor([True, False])},
        "optimizer": opt.state_dict(),  # int parameter ids as dict keys, None, booleans, a momentum tensor
        "generator": torch_gen.get_state(),
        "epoch": 3, "step_in_epoch": 0,
        "history": [{"loss": float("nan"), "low": float("-inf"), "high": float("inf"), "zero": -0.0,
                     "third": 1 / 3}],
        "partial": None,
        "random": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "objective": {"rng": ("numpy", numpy_gen.bit_generator.state), "gen": ("torch", torch_gen.get_state())},
        "big": [2**127 + 1, -(2**64), 2**53, -(2**53) - 1],
        "arrays": [np.arange(6, dtype=np.uint32).reshape(2, 3), np.array([1.5, np.nan], dtype=np.float32)],
    }
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(checkpoint_bytes(state))
    back = read_checkpoint(path)
    assert back.pop("format") == 2
    _identical(state, back)
    # And the generators restored from it draw what the originals draw.
    random.setstate(back["random"]["python"])
    np.random.set_state(back["random"]["numpy"])
    drawn = (random.random(), np.random.random())
    random.setstate(state["random"]["python"])
    np.random.set_state(state["random"]["numpy"])
    assert drawn == (random.random(), np.random.random())
    restored = np.random.default_rng(0)
    restored.bit_generator.state = back["objective"]["rng"][1]
    assert restored.random() == numpy_gen.random()


def test_values_a_checkpoint_cannot_hold_are_refused_when_saving():
    for value, what in ((object(), "object"), ({1, 2}, "set"), (np.array(["a"]), "NumPy array of <U1")):
        with pytest.raises(TypeError, match=what) as err:
            encode_tree({"history": [{"x": value}]}, {})
        assert "state['history'][0]['x']" in str(err.value)


# -- weights files ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
@pytest.mark.parametrize("kind", PLANTS)
def test_a_pickle_weights_file_is_refused_in_one_line(shapes, tmp_path, marker, suffix, kind):
    weights = tmp_path / f"weights{suffix}"
    weights.write_bytes(PLANTS[kind](marker))
    with pytest.raises(VlpromptError) as err:
        run(cfg(shapes, tmp_path / "run", weights=str(weights)))
    message = one_line(err)
    assert str(weights) in message and "the global 'exec'" in message and "could run code" in message
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("via_os_system", [False, True])
def test_a_torchscript_archive_naming_another_global_is_refused_in_one_line(tmp_path, marker, via_os_system):
    weights = tmp_path / "ViT-B-16.pt"
    weights.write_bytes(torchscript_plant(marker, tmp_path, via_os_system))
    with pytest.raises(VlpromptError) as err:
        vp.load_backbone(TINY_VIT, weights=str(weights))
    message = one_line(err)
    # As the pickle names them: protocol 2 (TorchScript's) writes Python 2's module name for builtins.
    named = f"{os.system.__module__}.system" if via_os_system else "__builtin__.exec"
    assert str(weights) in message and f"the global '{named}'" in message
    assert not marker.exists()


def test_a_pretrained_tag_whose_cached_download_is_a_pickle_is_refused(tmp_path, marker, monkeypatch):
    """open_clip's download of a tag is read by vlprompt's readers too (open_clip would retry a failed
    weights_only load with torch's default)."""
    monkeypatch.setattr(loader, "hub_reachable", lambda timeout=2.0: False)  # read from the cache only
    repo = tmp_path / "hub" / "models--timm--resnet50_clip.openai"
    cached = repo / "snapshots" / ("0" * 40) / "open_clip_pytorch_model.bin"
    cached.parent.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    cached.write_bytes(pickle_plant(marker))
    with pytest.raises(VlpromptError) as err:
        vp.load_backbone("RN50", pretrained="openai", cache_dir=str(tmp_path / "hub"))
    message = one_line(err)
    assert str(cached) in message and "the global 'exec'" in message and "could run code" in message
    assert not marker.exists()


# -- prompts, the feature cache, run folders --------------------------------------------------------------------

@pytest.mark.parametrize("kind", PLANTS)
def test_a_prompt_folder_holding_a_pickle_is_refused_in_one_line(bb, tmp_path, marker, kind):
    folder = tmp_path / "prompt"
    vp.CoOp(bb, ["circle", "square"], n_ctx=2).save_pretrained(folder)
    for name in ("prompt.safetensors", "prompt_config.json"):
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(PLANTS[kind](marker))
        with pytest.raises(VlpromptError) as err:
            vp.load_prompt(folder, bb)
        assert str(folder / name) in one_line(err)
        (folder / name).write_bytes(original)
    assert not marker.exists()
    assert vp.load_prompt(folder, bb).classnames == ["circle", "square"]  # the restored folder is fine


def test_a_pickle_in_the_feature_cache_is_ignored_and_replaced(shapes, bb, tmp_path, marker):
    cache = tmp_path / "cache"
    first = run(cfg(shapes, tmp_path / "a", method="zeroshot", cache_dir=str(cache)), backbone=bb)
    entries = sorted(cache.rglob("*.safetensors"))
    assert entries
    for i, entry in enumerate(entries):
        entry.write_bytes(list(PLANTS.values())[i % 2](marker))
    again = run(cfg(shapes, tmp_path / "b", method="zeroshot", cache_dir=str(cache)), backbone=bb)
    assert again["test"] == first["test"] and not marker.exists()
    for entry in entries:  # recomputed and written again as safetensors
        assert set(load_file(str(entry))) == {"features", "labels"}


@pytest.mark.parametrize("kind", PLANTS)
def test_pickles_in_a_run_folder_are_refused_in_one_line(shapes, bb, tmp_path, marker, kind):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_bytes(PLANTS[kind](marker))
    (out / "config.yaml").write_bytes(PLANTS[kind](marker))
    with pytest.raises(VlpromptError) as err:
        run(cfg(shapes, out), backbone=bb)
    assert str(out) in one_line(err)
    (out / "metrics.json").write_text(json.dumps({"config_key": "another"}))  # a finished run; config.yaml a pickle
    with pytest.raises(VlpromptError) as err:
        run(cfg(shapes, out), backbone=bb)
    assert str(out) in one_line(err) and "another configuration" in str(err.value)
    assert not marker.exists()


# -- studies ----------------------------------------------------------------------------------------------------

def _spec(shapes) -> StudySpec:
    return StudySpec("fewshot", [MethodSpec("coop")], datasets=[shapes], shots=[1], seeds=[1],
                     settings={"backbone": TINY_VIT, "pretrained": "random", "epochs": 1})


@pytest.mark.parametrize("kind", PLANTS)
def test_a_study_resumes_past_planted_pickles(shapes, tmp_path, marker, kind):
    spec, folder = _spec(shapes), tmp_path / "study"
    (unit,) = plan(spec, folder, progress=False)
    old_checkpoint = checkpoint_folder(folder / "runs" / unit.uid) / OLD_CHECKPOINT_FILE
    old_checkpoint.parent.mkdir(parents=True)
    old_checkpoint.write_bytes(PLANTS[kind](marker))
    first = run_study(spec, folder, progress=False)
    ((uid, error),) = first.failed  # the unit fails with the checkpoint's line; the study goes on
    assert uid == unit.uid and str(old_checkpoint) in error and "old pickle format" in error and "\n" not in error
    old_checkpoint.unlink()
    (folder / "runs" / unit.uid).mkdir(exist_ok=True)
    (folder / "runs" / unit.uid / "metrics.json").write_bytes(PLANTS[kind](marker))
    second = run_study(spec, folder, retry_failed=True, progress=False)
    assert second.done == 1 and not second.failed  # a pickle in place of metrics.json is no finished run
    assert json.loads((folder / "runs" / unit.uid / "metrics.json").read_text())["config_key"]
    assert not marker.exists()


@pytest.mark.parametrize("kind", PLANTS)
def test_a_pickle_in_place_of_a_study_index_is_ignored(shapes, tmp_path, marker, kind):
    spec, folder = _spec(shapes), tmp_path / "study"
    folder.mkdir()
    (folder / "index.json").write_bytes(PLANTS[kind](marker))
    result = run_study(spec, folder, progress=False)  # a foreign index is started afresh
    assert result.done == 1 and not marker.exists()
    assert json.loads((folder / "index.json").read_text())["units"][0]["state"] == "done"


def test_before_torch_2_6_a_pickle_weights_file_is_not_read_at_all(tmp_path, monkeypatch):
    """torch.load's weights_only reader could be made to run code before torch 2.6 (CVE-2025-32434)."""
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, str(weights))  # even a genuine state dict: it cannot be told apart unread
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(VlpromptError) as err:
        vp.load_backbone(TINY_VIT, weights=str(weights))
    message = one_line(err)
    assert str(weights) in message and "torch 2.5.1" in message and ".safetensors" in message


# -- found by trying it ------------------------------------------------------------------------------------------

def _real_with(real: bytes, tmp_path: Path, change) -> bytes:
    """The real checkpoint with its state tree edited by ``change(tree)``: still a well-formed file."""
    from safetensors import safe_open

    src = tmp_path / "real.safetensors"
    src.write_bytes(real)
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    tree = json.loads(meta[STATE_FIELD])
    change(tree)
    return save(tensors, metadata={**meta, STATE_FIELD: json.dumps(tree)})


@pytest.mark.parametrize("change, why", [
    (lambda t: t.update(epoch="x"), "damaged: epoch x"),
    (lambda t: t.update(epoch=-5), "damaged: epoch -5"),
    (lambda t: t.update(step_in_epoch=10**9), "damaged: step_in_epoch"),
    (lambda t: t.update(history="x"), "history is not a list"),
    (lambda t: t.update(partial=[1, 2]), "partial epoch is malformed"),
    (lambda t: t.update(learner=[]), "is not a mapping"),
    (lambda t: t.update(generator=5), "generator is not a tensor"),
    (lambda t: t.update(learner={"ctx": 3}), "cannot restore its state"),
    (lambda t: t.update(optimizer={}), "cannot restore its state"),
    (lambda t: t["random"].update(python=[1]), "cannot restore its state"),
])
def test_a_well_formed_checkpoint_with_wrong_values_is_one_error_line(shapes, bb, tmp_path, real_checkpoint,
                                                                     change, why):
    # Each of these was a TypeError / KeyError / ValueError stack trace from the trainer (or, for the epoch and
    # step, a run that silently trained the wrong number of epochs).
    out = tmp_path / "run"
    path = checkpoint_folder(out) / CHECKPOINT_FILE
    path.parent.mkdir()
    path.write_bytes(_real_with(real_checkpoint, tmp_path, change))
    with pytest.raises(VlpromptError) as err:
        run(cfg(shapes, out), backbone=bb)
    message = one_line(err)
    assert str(path) in message and why in message and "remove it or pass --resume never" in message
    assert not out.exists()


@pytest.mark.parametrize("edit, why", [
    ({"backbone": []}, "field 'backbone' has a value of the wrong type"),
    ({"n_ctx": "x"}, "field 'n_ctx'"),
    ({"n_ctx": True}, "field 'n_ctx'"),
    ({"ctx_init": 5}, "field 'ctx_init'"),
    ({"classnames": [1, 2]}, "'classnames' must be a list of strings"),
])
def test_a_prompt_config_with_a_value_of_the_wrong_type_is_one_error_line(shapes, bb, tmp_path, edit, why):
    out = tmp_path / "run"
    run(cfg(shapes, out), backbone=bb)
    config = out / "prompt" / "prompt_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **edit}))
    with pytest.raises(VlpromptError) as err:  # was an AttributeError / ValueError stack trace
        vp.load_prompt(str(out), bb)
    message = one_line(err)
    assert str(config) in message and why in message


def test_a_deeply_nested_prompt_config_is_one_error_line(shapes, bb, tmp_path):
    out = tmp_path / "run"
    run(cfg(shapes, out), backbone=bb)
    (out / "prompt" / "prompt_config.json").write_text("[" * 100_000)
    with pytest.raises(VlpromptError) as err:  # was a RecursionError stack trace
        vp.load_prompt(str(out), bb)
    assert "nested too deeply" in one_line(err)
