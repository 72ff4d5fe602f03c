"""Image preprocessing per pretrained tag: mean, std, interpolation and test resize come from open_clip's pretrained
registry and architecture configs (SigLIP squashes with mean and std 0.5, MobileCLIP does not normalise), the test
transforms equal a straightforward PIL computation in each resize mode, and a backbone's preprocessing reaches its
transforms, its run record and its feature-cache keys; a bad one is one line."""

from __future__ import annotations

import json
import re
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image
from support import TINY_VIT

import vlprompt as vp
from vlprompt.backbones.preprocess import Preprocess, resolve_preprocess
from vlprompt.cli import main
from vlprompt.data import make_synthetic_dataset
from vlprompt.data.transforms import test_transform as make_test_transform
from vlprompt.errors import VlpromptError

CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@pytest.mark.parametrize("arch, tag, mean, std, interpolation, resize_mode", [
    ("ViT-B-16", "openai", *CLIP, "bicubic", "shortest"),
    ("ViT-B-16-SigLIP", "webli", (0.5,) * 3, (0.5,) * 3, "bicubic", "squash"),
    ("ViT-B-16-SigLIP2", "webli", (0.5,) * 3, (0.5,) * 3, "bicubic", "squash"),
    ("MobileCLIP-S2", "datacompdr", (0.0,) * 3, (1.0,) * 3, "bilinear", "shortest"),
    ("PE-Core-B-16", "meta", (0.5,) * 3, (0.5,) * 3, "bilinear", "squash"),
    # no tag of that name (a weights file with the default tag, a random model): what every tag of the
    # architecture does, where they agree
    ("MobileCLIP-B", "openai", (0.0,) * 3, (1.0,) * 3, "bilinear", "shortest"),
    ("ViT-B-16-SigLIP", None, (0.5,) * 3, (0.5,) * 3, "bicubic", "squash"),
])
def test_each_tag_brings_its_own_preprocessing(arch, tag, mean, std, interpolation, resize_mode):
    import open_clip

    pre = resolve_preprocess(arch, open_clip.get_model_config(arch), 224, tag)
    assert (pre.mean, pre.std, pre.interpolation, pre.resize_mode) == (mean, std, interpolation, resize_mode)
    known = tag in open_clip.list_pretrained_tags_by_model(arch)
    assert pre.source == (f"pretrained tag {arch}/{tag}" if known else f"every pretrained tag of {arch}")


def _reference(image: Image.Image, size: int, mode: str, mean, std, resample) -> torch.Tensor:
    """The test preprocessing computed with PIL and NumPy directly."""
    w, h = image.size
    if mode == "squash":
        out = image.resize((size, size), resample)
    elif mode == "shortest":
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        img = image.resize((nw, nh), resample)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        out = img.crop((left, top, left + size, top + size))
    else:  # longest: resize the longer side, paste in the middle of a black square
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = image.resize((nw, nh), resample)
        out = Image.new("RGB", (size, size))
        out.paste(img, (int(round((size - nw) / 2.0)), int(round((size - nh) / 2.0))))
    x = np.asarray(out, dtype=np.float32) / 255.0
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("interpolation, resample", [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)])
@pytest.mark.parametrize("shape", [(61, 37), (30, 52)])
def test_the_test_transform_equals_a_straightforward_pil_computation(mode, interpolation, resample, shape):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (*shape[::-1], 3), dtype=np.uint8))
    pre = Preprocess(size=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation=interpolation,
                     resize_mode=mode)
    got = make_test_transform(**pre.test_args())(image)
    want = _reference(image, 24, mode, pre.mean, pre.std, resample)
    assert got.shape == (3, 24, 24)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def _arch_with(tmp_path, preprocess: dict) -> str:
    """The tiny architecture as an open_clip_config.json with its own preprocessing."""
    model_cfg = json.loads(resources.files("vlprompt.backbones").joinpath(f"configs/{TINY_VIT}.json").read_text())
    path = tmp_path / "tiny-squash.json"
    path.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    return str(path)


def test_a_backbones_preprocessing_reaches_its_run_record_and_cache_keys(tmp_path, capsys):
    from vlprompt.engine.feature_cache import split_key

    arch = _arch_with(tmp_path, {"mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bilinear",
                                 "resize_mode": "squash"})
    with pytest.warns(UserWarning, match="RANDOMLY"):
        bb = vp.load_backbone(arch, pretrained="random")
    assert bb.preprocess == Preprocess(size=bb.image_size, mean=(0.0,) * 3, std=(1.0,) * 3, interpolation="bilinear",
                                       resize_mode="squash", source="architecture tiny-squash")
    assert (bb.image_mean, bb.image_std) == ((0.0,) * 3, (1.0,) * 3)
    with pytest.warns(UserWarning, match="RANDOMLY"):
        plain = vp.load_backbone(TINY_VIT, pretrained="random")
    assert plain.preprocess.mean == CLIP[0] and plain.preprocess.resize_mode == "shortest"
    assert split_key(bb, [], "d")["transform"] != split_key(plain, [], "d")["transform"]
    assert split_key(bb, [], "d")["transform"]["resize_mode"] == "squash"

    data = make_synthetic_dataset(str(tmp_path / "shapes"), n_train_per_class=1, n_test_per_class=1, seed=0)
    assert main(["train", "--dataset", data, "--backbone", arch, "--pretrained", "random", "--epochs", "1",
                 "--shots", "1", "--n-ctx", "2", "--output", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["backbone"]["preprocess"] == {"size": bb.image_size, "mean": [0.0] * 3, "std": [1.0] * 3,
                                                 "interpolation": "bilinear", "resize_mode": "squash",
                                                 "source": "architecture tiny-squash"}


def test_an_architecture_files_preprocessing_must_be_a_mapping(tmp_path):
    model_cfg = json.loads(resources.files("vlprompt.backbones").joinpath(f"configs/{TINY_VIT}.json").read_text())
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({**model_cfg, "preprocess_cfg": [0.5, 0.5]}))
    with pytest.raises(VlpromptError, match=re.escape("image preprocessing (architecture odd): preprocess_cfg must be "
                                                      "a mapping, got list")):
        vp.load_backbone(str(path), pretrained="random")


@pytest.mark.parametrize("bad, message", [
    ({"resize_mode": "stretch"}, "resize_mode 'stretch' is not one of ['shortest', 'squash', 'longest']"),
    ({"interpolation": "nearest"}, "interpolation 'nearest' is not one of ['bicubic', 'bilinear']"),
    ({"std": [1, 0, 1]}, "std must be 3 numbers above 0, got [1.0, 0.0, 1.0]"),
    ({"mean": "grey"}, "mean and std must be lists of 3 numbers"),
])
def test_a_bad_preprocessing_is_one_line(tmp_path, bad, message):
    arch = _arch_with(tmp_path, bad)
    with pytest.raises(VlpromptError, match="image preprocessing \\(architecture tiny-squash\\)") as info:
        vp.load_backbone(arch, pretrained="random")
    assert message in str(info.value)
