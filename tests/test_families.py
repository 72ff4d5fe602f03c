"""Families that fit the causal text path (EVA02, PE-Core, MobileCLIP-B, MetaCLIP), built randomly from their real
open_clip configurations shrunk (support.FAMILIES): vlprompt's text fast path gives the library's own encode_text
and its image encoding the library's encode_image (fp32, 1e-5 relative); CoOp, KgCoOp and text-only deep prompts
train, save, load and evaluate on each; deep visual prompts are refused in one line on the timm image towers; zero-shot
classification runs on the shared Caltech-101 images."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from support import FAMILIES, family_arch

import vlprompt as vp
from vlprompt.cli import main

NAMES = ["face", "water lily", "stop sign", "motorbike"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family name, architecture file, backbone)."""
    arch = family_arch(tmp_path_factory.mktemp("arch"), request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return request.param, arch, vp.load_backbone(arch, pretrained="random")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_text_and_image_features_equal_the_librarys_own_forward(family):
    name, _, bb = family
    torch.manual_seed(0)
    learner = vp.CoOp(bb, NAMES, n_ctx=4, ctx_init="a photo of a")  # the context is the phrase's own embeddings
    with torch.no_grad():
        ours = learner.text_features()
        theirs = F.normalize(bb.model.encode_text(bb.tokenize([f"a photo of a {n}." for n in NAMES])), dim=-1)
        images = torch.randn(2, 3, bb.image_size, bb.image_size)
        image_ours, image_theirs = bb.encode_images(images), bb.model.encode_image(images)
    assert rel(ours, theirs) < 1e-5, name
    assert rel(image_ours, image_theirs) < 1e-5, name


@pytest.mark.parametrize("method, options", [("coop", []), ("kgcoop", []),
                                             ("deep_language", ["--option", "depth_text=2"])])
def test_prompt_methods_train_save_load_and_evaluate(family, shapes, method, options, tmp_path, capsys):
    name, arch, _ = family
    out = tmp_path / "run"
    common = ["--backbone", arch, "--pretrained", "random", "--quiet"]
    assert main(["train", "--dataset", shapes, "--method", method, *options, "--shots", "1", "--epochs", "1",
                 "--n-ctx", "2", "--output", str(out), *common]) == 0, capsys.readouterr().err
    trained = json.loads((out / "metrics.json").read_text())
    assert main(["eval", str(out), "--output", str(tmp_path / "eval"), "--quiet"]) == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["test"]["accuracy"] == trained["test"]["accuracy"], name  # the loaded prompt, the same result


def test_deep_visual_prompts_are_one_line_on_a_timm_image_tower(family, shapes, tmp_path, capsys):
    name, arch, bb = family
    args = ["train", "--dataset", shapes, "--method", "ivlp", "--option", "depth_text=2", "--option",
            "depth_vision=2", "--shots", "1", "--epochs", "1", "--backbone", arch, "--pretrained", "random",
            "--output", str(tmp_path / "run"), "--quiet"]
    if bb.prompted_image_unsupported is None:  # open_clip's own ViT (MetaCLIP): deep visual prompts work
        assert main(args) == 0, capsys.readouterr().err
        return
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its image tower is timm's (open_clip's TimmModel)" in err, err


@pytest.mark.realdata
def test_zero_shot_runs_on_caltech_images(family, caltech_root):
    name, _, bb = family
    cal = vp.load_dataset("caltech101", str(caltech_root))
    items = cal.test[::250]
    learner = vp.ZeroShotCLIP(bb, cal.classnames)
    from vlprompt.engine.features import encode_items
    from vlprompt.data.transforms import test_transform

    feats, labels = encode_items(bb, items, test_transform(**bb.preprocess.test_args()), batch_size=8,
                                 progress=False)
    with torch.no_grad():
        logits = learner(feats)
    assert logits.shape == (len(items), len(cal.classnames)) and torch.isfinite(logits).all(), name
    assert labels.tolist() == [d.label for d in items]


# The methods that learn inside the image tower: a timm tower (EVA02's, PE-Core's, MobileCLIP's) has no ViT tokens
# to prompt and no open_clip attention to update.
IMAGE_TOWER_METHODS = {"ivlp", "vpt_deep", "maple", "promptsrc", "clip_lora"}


def test_every_method_runs_on_a_timm_image_tower_family_or_is_one_line(shapes, tmp_path, capsys):
    from support import TINY_OPTIONS

    from vlprompt.methods import METHODS

    arch = family_arch(tmp_path, "EVA02-B-16")
    common = ["--dataset", shapes, "--backbone", arch, "--pretrained", "random", "--quiet"]
    for method in METHODS:
        out = str(tmp_path / method)
        if method.startswith("zeroshot"):
            args = ["zeroshot", *common, "--output", out] + (["--ensemble"] if method == "zeroshot_ensemble" else [])
        else:
            options = [x for k, v in TINY_OPTIONS.get(method, {}).items() for x in ("--option", f"{k}={v}")]
            args = ["train", *common, "--method", method, *options, "--shots", "1", "--epochs", "1", "--n-ctx", "2",
                    "--output", out]
        rc = main(args)
        err = capsys.readouterr().err.strip()
        if method in IMAGE_TOWER_METHODS:
            assert rc == 2 and len(err.splitlines()) == 1 and "its image tower is timm's (open_clip's TimmModel)" in err, (method, err)
        else:
            assert rc == 0, (method, err)
    # CLIP-LoRA's text side alone fits any causal text tower
    assert main(["train", *common, "--method", "clip_lora", "--option", "encoder=text", "--option", "iterations=2",
                 "--shots", "1", "--output", str(tmp_path / "lora_text")]) == 0, capsys.readouterr().err
