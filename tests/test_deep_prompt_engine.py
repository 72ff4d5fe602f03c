"""The engine reads what a deep-prompt method declares: a learner whose image features depend on its parameters
trains from pixels, is evaluated (eval, studies, predict) through its own image tower, never through the frozen
feature cache, and refuses feature-bank training and export in one line; a text-only deep prompt keeps the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import TINY_OPTIONS, TINY_VIT

import vlprompt as vp
from vlprompt.cli import main
from vlprompt.data import make_synthetic_dataset
from vlprompt.engine.evaluate import accuracy_report, image_logits, rank_logits
from vlprompt.engine.run import evaluate_prompt, run
from vlprompt.protocols.report import aggregate
from vlprompt.protocols.store import collect

TINY = ["--backbone", TINY_VIT, "--pretrained", "random"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=4, n_test_per_class=3,
                                  seed=0)


def train(method, shapes, out, bb, cache_dir, **kw):
    cfg = vp.RunConfig.from_sources(dataset=shapes, method=method, backbone=TINY_VIT, pretrained="random", shots=2,
                                    epochs=2, batch_size=4, output=str(out), progress=False, cache_dir=str(cache_dir),
                                    method_options=TINY_OPTIONS.get(method), **kw)
    return run(cfg, backbone=bb)


def cached_files(folder: Path) -> list:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.mark.parametrize("method", ["ivlp", "vpt_deep"])
def test_prompted_image_tower_is_evaluated_from_images_never_from_the_cache(method, shapes, bb, tmp_path):
    cache = tmp_path / "cache"
    m = train(method, shapes, tmp_path / "run", bb, cache)
    assert cached_files(cache) == []  # neither the training nor the evaluation encoded frozen features
    assert m["train"]["epochs"][-1]["train_accuracy"] >= 0 and m["test"]["n"] == len(vp.load_dataset(shapes).test)
    learner = vp.load_prompt(tmp_path / "run", bb)
    assert learner.from_pixels
    ds = vp.load_dataset(shapes)
    logits, labels = image_logits(learner, ds.test, progress=False)
    assert accuracy_report(rank_logits(logits, len(ds.classnames)), labels, ds.classnames) == m["test"]
    evaluated = evaluate_prompt(str(tmp_path / "run"), {"cache_dir": str(cache)}, output=str(tmp_path / "ev"),
                                backbone=bb)
    assert evaluated["test"] == m["test"] and cached_files(cache) == []


def test_predict_goes_through_the_prompted_learner(shapes, bb, tmp_path, capsys):
    train("ivlp", shapes, tmp_path / "run", bb, tmp_path / "cache")
    ds = vp.load_dataset(shapes)
    assert main(["predict", str(tmp_path / "run"), *[d.path for d in ds.test], "--format", "json", "--top-k", "1",
                 "--quiet"]) == 0
    records = {r["image"]: r["predictions"][0]["index"] for r in json.loads(capsys.readouterr().out)["images"]}
    learner = vp.load_prompt(tmp_path / "run", bb)
    logits, _ = image_logits(learner, ds.test, progress=False)
    assert [records[d.path] for d in ds.test] == logits.argmax(-1).tolist()


def test_text_only_deep_prompts_keep_the_frozen_feature_cache(shapes, bb, tmp_path):
    cache = tmp_path / "cache"
    train("deep_language", shapes, tmp_path / "run", bb, cache)
    assert cached_files(cache)  # the test split's frozen features


@pytest.mark.parametrize("method", ["vpt_deep", "clip_lora"])
def test_feature_bank_and_export_are_refused_in_one_line(method, shapes, bb, tmp_path, capsys):
    args = ["train", "--dataset", shapes, *TINY, "--method", method, "--train-mode", "feature_bank", "--shots", "1",
            "--output", str(tmp_path / "fb"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"feature_bank: method {method} learns inside the image tower" in err[0]
    assert not (tmp_path / "fb").exists()
    train(method, shapes, tmp_path / "run", bb, tmp_path / "cache")
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "head")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"method '{method}' learns inside the image tower" in err[0]


def test_interpret_reads_the_text_context_of_ivlp(shapes, bb, tmp_path, capsys):
    train("ivlp", shapes, tmp_path / "run", bb, tmp_path / "cache")
    assert main(["interpret", str(tmp_path / "run"), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_ctx"] == 2 and result["ctx_init"] == "a photo of a" and len(result["contexts"]) == 2


def test_prompted_learner_leaves_the_shared_backbone_frozen(shapes, bb, tmp_path):
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    train("ivlp", shapes, tmp_path / "run", bb, tmp_path / "cache")
    after = bb.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_base2new_study_with_deep_prompts_on_real_images(caltech_root, tmp_path, capsys):
    out = tmp_path / "b2n-deep"
    assert main(["study", "base2new", "--datasets", "caltech101", "--root", str(caltech_root), "--methods",
                 "zeroshot,coop,ivlp,vpt_deep,maple,promptsrc,tcp", "--seeds", "1", "--shots", "1", *TINY, "--epochs", "1",
                 "--option", "depth_text=2", "--option", "depth_vision=2", "--option", "depth=2",
                 "--option", "class_layer=1", "--output", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = aggregate(collect(out))
    for method in ("ivlp", "vpt_deep", "maple", "promptsrc", "tcp", "coop"):
        assert {r["metric"] for r in rows if r["method"] == method} == {"base", "new", "h"}
        assert f"| caltech101 | {method} |" in printed
    ivlp = json.loads((out / "runs" / "caltech101" / "ivlp" / "1shots_seed1" / "base" / "metrics.json").read_text())
    assert ivlp["method_options"]["depth_text"] == 2 and ivlp["recipe"]["batch_size"] == 4


def test_fewshot_and_cross_dataset_studies_with_deep_prompts(shapes, tmp_path, capsys):
    other = make_synthetic_dataset(str(tmp_path / "other"), n_train_per_class=2, n_test_per_class=2, seed=3)
    options = ["--option", "depth_text=2", "--option", "depth_vision=2"]
    out = tmp_path / "fs"
    assert main(["study", "fewshot", "--datasets", shapes, "--methods", "ivlp,deep_language", "--shots", "1",
                 "--seeds", "1", *TINY, "--epochs", "1", *options, "--output", str(out), "--quiet"]) == 0
    capsys.readouterr()
    rows = aggregate(collect(out))
    assert {r["method"] for r in rows} == {"ivlp", "deep_language"}
    out = tmp_path / "xd"
    assert main(["study", "xd", "--source", shapes, "--targets", other, "--methods", "vpt_deep", "--shots", "1",
                 "--seeds", "1", *TINY, "--epochs", "1", "--option", "depth_vision=2", "--output", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    target = json.loads((out / "runs" / "vpt_deep" / "1shots_seed1" / Path(other).name / "metrics.json").read_text())
    assert target["kind"] == "eval" and target["data"]["name"] == Path(other).name
    assert target["test"]["n"] == len(vp.load_dataset(other).test)


def test_a_depth_beyond_the_tower_fails_before_any_encoding(shapes, bb, tmp_path):
    cfg = vp.RunConfig.from_sources(dataset=shapes, method="deep_language", backbone=TINY_VIT, pretrained="random",
                                    shots=2, epochs=1, output=str(tmp_path / "run"), progress=False,
                                    cache_dir=str(tmp_path / "cache"))  # the recipe's depth 12 on 2 blocks
    with pytest.raises(vp.VlpromptError, match="depth_text=12, but the text tower of vlprompt-tiny-ViT has 2 blocks"):
        run(cfg, backbone=bb)
    assert cached_files(tmp_path / "cache") == [] and not (tmp_path / "run").exists()


def test_published_deep_prompt_numbers_match_runs_by_their_options():
    from vlprompt.protocols.published import lookup

    def h(options, epochs):
        rows = lookup("base2new", "average", "ivlp", "ViT-B-16", 16, "h", {"method_options": options, "epochs": epochs})
        return [r.value for r in rows]
    assert h({"n_ctx_text": 2, "n_ctx_vision": 2}, 5) == [77.90]  # the MaPLe paper's IVLP
    assert h({"n_ctx_text": 4}, 20) == [77.51]  # the PromptSRC paper's IVLP
    assert h({"n_ctx_text": 3}, 5) == []
    assert [r.value for r in lookup("base2new", "average", "deep_language", "ViT-B-16", 16, "h", {})] == [77.56]
