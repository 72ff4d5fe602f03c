"""`vlprompt predict`, `export` and `interpret` (vlprompt.practice) on the tiny random models: predictions are
eval's, the exported head and ONNX graph reproduce vlprompt's logits, interpret finds the words a context was
initialised from, and bad input is one error line with exit status 2."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support import TINY_VIT

import vlprompt as vp
from vlprompt.cli import main
from vlprompt.data.transforms import load_image, test_transform
from vlprompt.engine.evaluate import classify
from vlprompt.engine.features import encode_items
from vlprompt.engine.run import run
from vlprompt.methods.cocoop import CoCoOp


@pytest.fixture(scope="module")
def ds(shapes):
    return vp.load_dataset(shapes)


def _train(method, shapes, bb, out, **kw):
    cfg = vp.RunConfig.from_sources(dataset=shapes, method=method, backbone=TINY_VIT, pretrained="random", shots=2,
                                    epochs=1, batch_size=8, n_ctx=4, output=str(out), progress=False, **kw)
    return run(cfg, backbone=bb)


@pytest.fixture(scope="module")
def coop_run(shapes, bb, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "coop"
    _train("coop", shapes, bb, out)
    return out


@pytest.fixture(scope="module")
def probe_run(shapes, bb, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "probe"
    _train("linear_probe", shapes, bb, out)
    return out


def _cli(capsys, *args):
    """(exit status, stdout, stderr) of `vlprompt ARGS` in this process."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(rc, err) -> str:
    """The one `vlprompt: error:` line of a failed command; nothing else on stderr but warnings."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("vlprompt: warning:")]
    assert len(lines) == 1 and lines[0].startswith("vlprompt: error: "), err
    return lines[0]


def _features(bb, items):
    return encode_items(bb, items, test_transform(bb.image_size, bb.image_mean, bb.image_std), progress=False)[0]


def _preprocessed(bb, items) -> torch.Tensor:
    tf = test_transform(bb.image_size, bb.image_mean, bb.image_std)
    return torch.stack([tf(load_image(d.path)) for d in items])


# -- predict --------------------------------------------------------------------------------------------------


def test_predict_gives_evals_classes(coop_run, shapes, bb, ds, tmp_path, capsys):
    rc, _, err = _cli(capsys, "eval", coop_run, "--output", tmp_path / "ev")
    assert rc == 0, err
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())["test"]

    rc, out, err = _cli(capsys, "predict", coop_run, Path(shapes) / "test", "--format", "json", "--top-k", "3",
                        "--quiet")
    assert rc == 0, err
    result = json.loads(out)
    by_path = {r["image"]: r["predictions"] for r in result["images"]}
    assert sorted(by_path) == sorted(d.path for d in ds.test) and result["top_k"] == 3

    # The accuracies eval reported, recomputed from predict's top-1 classes against the folder labels.
    hits = {c: [] for c in ds.classnames}
    for d in ds.test:
        hits[d.classname].append(by_path[d.path][0]["class"] == d.classname)
    per_class = {c: 100.0 * sum(h) / len(h) for c, h in hits.items()}
    assert per_class == pytest.approx(evaluated["per_class"])
    assert 100.0 * sum(sum(h) for h in hits.values()) / len(ds.test) == pytest.approx(evaluated["accuracy"])

    # Image by image: the engine's ranking (classify) and the softmax of the learner's own logits.
    learner = vp.load_prompt(coop_run, bb)
    feats = _features(bb, ds.test)
    ranked = classify(learner, feats, k=3)
    probs = torch.softmax(learner(feats).double(), dim=-1)
    for i, d in enumerate(ds.test):
        preds = by_path[d.path]
        assert [p["class"] for p in preds] == [ds.classnames[int(c)] for c in ranked[i]]
        assert [p["probability"] for p in preds] == pytest.approx([float(probs[i, int(c)]) for c in ranked[i]],
                                                                  abs=1e-6)


def test_predict_inputs_formats_and_top_k(coop_run, shapes, ds, capsys):
    test_dir = Path(shapes) / "test"
    one = ds.test[0].path
    pattern = str(test_dir / "red_*" / "*.png")
    # A file, a glob pattern and a folder: each image once, in the order given.
    rc, out, err = _cli(capsys, "predict", coop_run, one, pattern, test_dir, "--format", "csv", "--top-k", "50",
                        "--batch-size", "3", "--quiet")
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    images = list(dict.fromkeys(r["image"] for r in rows))
    reds = sorted(str(p) for p in (test_dir / "red_circle").glob("*.png"))
    assert images[0] == one and images[1:1 + len(reds)] == [p for p in reds if p != one]
    assert sorted(images) == sorted(d.path for d in ds.test)
    assert len(rows) == len(images) * len(ds.classnames)  # --top-k capped at the number of classes
    for image in images:
        probs = [float(r["probability"]) for r in rows if r["image"] == image]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and probs == sorted(probs, reverse=True)
        assert sorted(r["class"] for r in rows if r["image"] == image) == sorted(ds.classnames)

    rc, out, err = _cli(capsys, "predict", coop_run, one, "--quiet")
    assert rc == 0, err
    header, line = out.strip().splitlines()
    assert header.split()[:2] == ["image", "top-1"] and line.startswith(one) and line.count("(") == 5


def test_predict_with_other_class_names(coop_run, shapes, bb, ds, tmp_path, capsys):
    names = ["teapot", "violin", "zebra"]
    rc, out, err = _cli(capsys, "predict", coop_run, Path(shapes) / "test", "--classnames", ",".join(names),
                        "--format", "json", "--quiet")
    assert rc == 0, err
    result = json.loads(out)
    moved = vp.load_prompt(coop_run, bb, classnames=names)
    ranked = classify(moved, _features(bb, ds.test), k=3)
    by_path = {r["image"]: [p["class"] for p in r["predictions"]] for r in result["images"]}
    assert result["num_classes"] == 3
    assert [by_path[d.path] for d in ds.test] == [[names[int(c)] for c in row] for row in ranked]
    listed = tmp_path / "names.txt"
    listed.write_text("\n".join(names) + "\n\n")
    rc, out2, err = _cli(capsys, "predict", coop_run, Path(shapes) / "test", "--classnames-file", listed,
                         "--format", "json", "--quiet")
    assert rc == 0 and json.loads(out2)["images"] == result["images"], err


def test_predict_conditional_learner_matches_classify(shapes, bb, ds, tmp_path, capsys):
    torch.manual_seed(0)
    learner = CoCoOp(bb, ds.classnames, n_ctx=4)  # class features depend on each image
    learner.save_pretrained(tmp_path / "cocoop")
    rc, out, err = _cli(capsys, "predict", tmp_path / "cocoop", Path(shapes) / "test", "--format", "json",
                        "--top-k", "2", "--quiet")
    assert rc == 0, err
    by_path = {r["image"]: [p["class"] for p in r["predictions"]] for r in json.loads(out)["images"]}
    ranked = classify(learner, _features(bb, ds.test), k=2)
    assert [by_path[d.path] for d in ds.test] == [[ds.classnames[int(c)] for c in row] for row in ranked]


@pytest.mark.realdata
def test_predict_on_caltech_files(caltech_root, bb, tmp_path, capsys):
    cal = vp.load_dataset("caltech101", str(caltech_root))
    items = cal.test[::400][:6]
    learner = vp.CoOp(bb, cal.classnames, n_ctx=4)
    learner.save_pretrained(tmp_path / "prompt")
    rc, out, err = _cli(capsys, "predict", tmp_path / "prompt", *[d.path for d in items], "--format", "json",
                        "--quiet")
    assert rc == 0, err
    got = [[p["class"] for p in r["predictions"]] for r in json.loads(out)["images"]]
    ranked = classify(learner, _features(bb, items), k=5)
    assert got == [[cal.classnames[int(c)] for c in row] for row in ranked]


# -- export ---------------------------------------------------------------------------------------------------


def _load_head_plain(folder: Path):
    """The exported head with safetensors + numpy only (what a user without vlprompt does)."""
    from safetensors.numpy import load_file

    meta = json.loads((folder / "head.json").read_text())
    tensors = load_file(str(folder / "head.safetensors"))

    def logits(features: np.ndarray) -> np.ndarray:
        f = features.astype(np.float32)
        if meta["normalize_features"]:
            f = f / np.linalg.norm(f, axis=-1, keepdims=True)
        out = f @ tensors["weight"].T
        return out + tensors["bias"] if "bias" in tensors else out

    return meta, tensors, logits


@pytest.mark.parametrize("which", ["coop", "linear_probe"])
def test_exported_head_reproduces_logits(which, coop_run, probe_run, bb, ds, tmp_path, capsys):
    source = coop_run if which == "coop" else probe_run
    rc, out, err = _cli(capsys, "export", source, "--output", tmp_path / "head")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["head.json", "head.safetensors"]
    meta, tensors, logits = _load_head_plain(tmp_path / "head")
    learner = vp.load_prompt(source, bb)
    assert meta["classnames"] == learner.classnames and meta["method"] == which
    assert meta["vlprompt_version"] == vp.__version__ and meta["usage"]
    assert meta["backbone"]["architecture"] == TINY_VIT and meta["backbone"]["embed_dim"] == bb.embed_dim
    assert meta["backbone"]["image_size"] == bb.image_size
    assert meta["transform"]["mean"] == list(bb.image_mean) and meta["transform"]["std"] == list(bb.image_std)
    assert meta["normalize_features"] is (which == "coop") and ("bias" in tensors) is (which == "linear_probe")
    assert tensors["weight"].shape == (len(ds.classnames), bb.embed_dim)
    if which == "coop":
        assert meta["logit_scale"] == pytest.approx(bb.logit_scale)
        assert np.linalg.norm(tensors["weight"], axis=-1) == pytest.approx(bb.logit_scale, rel=1e-5)
    feats = _features(bb, ds.test)
    want = learner(feats).detach().numpy()
    got = logits(feats.numpy())
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert (got.argmax(-1) == classify(learner, feats, k=1)[:, 0].numpy()).all()


def test_onnx_graph_reproduces_logits(coop_run, bb, ds, tmp_path, capsys):
    import onnxruntime as ort

    rc, out, err = _cli(capsys, "export", coop_run, "--output", tmp_path / "ex", "--onnx")
    assert rc == 0, err
    meta = json.loads((tmp_path / "ex" / "head.json").read_text())
    assert meta["onnx"]["file"] == "model.onnx" and meta["onnx"]["checked"]["max_abs_logit_diff"] <= 1e-4
    sess = ort.InferenceSession(str(tmp_path / "ex" / "model.onnx"), providers=["CPUExecutionProvider"])
    learner = vp.load_prompt(coop_run, bb)
    images = _preprocessed(bb, ds.test[:5])  # another batch size than the export's example: a dynamic axis
    got = sess.run(["logits"], {"image": images.numpy()})[0]
    want = learner(bb.encode_images(images)).detach().numpy()
    assert got.shape == (5, len(ds.classnames))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # Exporting again without --onnx leaves no stale graph behind.
    assert _cli(capsys, "export", coop_run, "--output", tmp_path / "ex")[0] == 0
    assert not (tmp_path / "ex" / "model.onnx").exists() and json.loads(
        (tmp_path / "ex" / "head.json").read_text())["onnx"] is None


def test_onnx_without_the_package_is_one_line(coop_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    line = _one_error_line(*_cli(capsys, "export", coop_run, "--output", tmp_path / "ex", "--onnx")[::2])
    assert "pip install vlprompt[export]" in line and not (tmp_path / "ex").exists()


# -- interpret ------------------------------------------------------------------------------------------------


def test_interpret_finds_the_initial_words(bb, ds, tmp_path, capsys):
    vp.CoOp(bb, ds.classnames, ctx_init="a photo of a").save_pretrained(tmp_path / "init")
    rc, out, err = _cli(capsys, "interpret", tmp_path / "init", "--format", "json", "--top-k", "3")
    assert rc == 0, err
    result = json.loads(out)
    contexts = result["contexts"]
    assert [c["nearest"][0]["word"] for c in contexts] == ["a", "photo", "of", "a"]
    assert all(c["nearest"][0]["distance"] < 1e-6 < c["nearest"][1]["distance"] for c in contexts)
    assert all(len(c["nearest"]) == 3 for c in contexts) and result["readings"]["all"] == "a photo of a [CLASS]."
    rc, table, err = _cli(capsys, "interpret", tmp_path / "init")
    assert rc == 0 and "a photo of a [CLASS]." in table and "photo (0.0000)" in table, err


def test_interpret_class_specific_context_per_class(bb, ds, tmp_path, capsys):
    torch.manual_seed(0)
    learner = vp.CoOp(bb, ds.classnames[:2], n_ctx=2, csc=True)
    learner.save_pretrained(tmp_path / "csc")
    rc, out, err = _cli(capsys, "interpret", tmp_path / "csc", "--format", "json", "--top-k", "2")
    assert rc == 0, err
    contexts = json.loads(out)["contexts"]
    assert [(c["class"], c["position"]) for c in contexts] == [(n, m) for n in ds.classnames[:2] for m in (1, 2)]
    emb = bb.text.token_embedding.weight.float()
    for c, vec in zip(contexts, learner.ctx.detach().reshape(-1, emb.shape[1]), strict=True):
        d = ((emb - vec) ** 2).sum(-1).sqrt()  # brute force, independent of the command's cdist
        assert c["nearest"][0]["token_id"] == int(d.argmin())
        assert c["nearest"][0]["distance"] == pytest.approx(float(d.min()), rel=1e-5)
        assert c["nearest"][0]["word"] == bb.tokenizer.decode([int(d.argmin())]).strip()


# -- one-line errors ------------------------------------------------------------------------------------------


def test_error_lines(coop_run, probe_run, shapes, bb, ds, tmp_path, capsys):
    test_dir = Path(shapes) / "test"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    CoCoOp(bb, ds.classnames, n_ctx=4).save_pretrained(tmp_path / "cocoop")
    torch.manual_seed(0)
    vp.CoOp(bb, ds.classnames, n_ctx=2, csc=True).save_pretrained(tmp_path / "csc")
    _train("zeroshot", shapes, bb, tmp_path / "zs")
    cases = [
        (["predict", tmp_path / "zs", test_dir], ["zeroshot run", "no learned prompt"]),
        (["export", tmp_path / "zs", "--output", tmp_path / "no"], ["zeroshot run"]),
        (["predict", coop_run, test_dir, tmp_path / "missing.png"], ["missing.png"]),
        (["predict", coop_run, bad, "--quiet"], ["cannot read image", "broken.png"]),
        (["predict", coop_run, str(tmp_path / "nothing*.jpg")], ["nothing*.jpg"]),
        (["predict", tmp_path / "csc", test_dir, "--classnames", "cat,dog"], ["cannot be transferred"]),
        (["predict", probe_run, test_dir, "--classnames", "cat,dog"], ["cannot be transferred"]),
        (["predict", coop_run, test_dir, "--classnames", "cat,cat"], ["given twice"]),
        (["export", tmp_path / "cocoop", "--output", tmp_path / "no"], ["cannot export", "cocoop"]),
        (["interpret", probe_run], ["no learned context vectors"]),
        (["predict", coop_run, test_dir, "--format", "xml"], ["--format"]),
    ]
    for args, words in cases:
        line = _one_error_line(*_cli(capsys, *args)[::2])
        assert all(w in line for w in words), (args, line)
    assert not (tmp_path / "no").exists()
