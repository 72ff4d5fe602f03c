"""Hugging Face ``transformers`` SigLIP checkpoints: a small random SiglipModel saved by ``transformers`` itself, with a
tokenizer of SigLIP's kind built here (`support.build_tokenizer`: SigLIP's own needs a hub) and an image processor,
loads as a vlprompt backbone whose text and image features equal ``transformers``' get_text_features /
get_image_features on the same inputs (fp32, 1e-5 relative), for both activations; its logit scale and bias and its
preprocessing come from the folder; the text-side methods train, save, load and evaluate on it; a bad folder, or one
read without ``transformers``, is one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from support import SIGLIP_WORDS, build_tokenizer

import vlprompt as vp
from vlprompt.cli import main
from vlprompt.data import make_synthetic_dataset
from vlprompt.errors import VlpromptError

if not os.environ.get("CI"):
    pytest.importorskip("transformers")  # scripts/setup.sh installs it; CI must not skip these tests

NAMES = ["face", "water lily", "stop sign", "motorbike"]


def save_siglip(folder, act: str = "gelu_pytorch_tanh", seed: int = 0, processor: bool = True, **text_extra):
    """A small random ``transformers`` SiglipModel (logit scale and bias moved off their initial values), its
    tokenizer and image processor, saved by ``transformers``."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, vocab_size=3 + len(SIGLIP_WORDS), projection_size=48, pad_token_id=0,
                eos_token_id=1, bos_token_id=None, hidden_act=act, **text_extra)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act=act)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-7.5)
    model.save_pretrained(folder)
    build_tokenizer(folder)
    if processor:
        SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2, image_mean=[0.5, 0.4, 0.3],
                             image_std=[0.2, 0.3, 0.4]).save_pretrained(folder)
    return model


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def features(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns an output object


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_features_equal_transformers_own(tmp_path, act):
    ref = save_siglip(tmp_path, act)
    bb = vp.load_backbone("hf", weights=str(tmp_path))
    assert not bb.text.causal and bb.text.pool_type == "last" and bb.n_start == 0 and bb.context_length == 16
    tokens = bb.tokenize([f"a photo of a {n}." for n in NAMES])
    assert tokens[0].tolist()[:6] == [3, 4, 5, 3, 7, 1]  # "a photo of a face" + </s>: canonicalised, then padded
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        text_ref = features(ref.get_text_features(input_ids=tokens))
        image_ref = features(ref.get_image_features(pixel_values=images))
        assert rel(bb.model.encode_text(tokens), text_ref) < 1e-5
        assert rel(bb.encode_images(images), image_ref) < 1e-5
        # the prompt learners' dense path: CoOp's context taken from the phrase gives the same features
        learner = vp.CoOp(bb, NAMES, n_ctx=4, ctx_init="a photo of a")
        assert rel(learner.text_features(), F.normalize(text_ref, dim=-1)) < 1e-5
        want = ref(input_ids=tokens, pixel_values=images).logits_per_image
        assert rel(learner(bb.encode_images(images)), want) < 1e-5  # logit scale and bias from the checkpoint
    assert bb.logit_bias == pytest.approx(-7.5) and bb.logit_scale == pytest.approx(float(torch.tensor(2.3).exp()))
    assert bb.preprocess.record() == {"size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4],
                                      "interpolation": "bilinear", "resize_mode": "squash",
                                      "source": f"processor config of {tmp_path.name}"}


def test_without_a_processor_configuration_siglips_own_preprocessing(tmp_path):
    save_siglip(tmp_path, processor=False)
    pre = vp.load_backbone("hf", weights=str(tmp_path)).preprocess
    assert (pre.mean, pre.std, pre.interpolation, pre.resize_mode) == ((0.5,) * 3, (0.5,) * 3, "bicubic", "squash")


@pytest.mark.parametrize("method, options", [("coop", ["--n-ctx", "2"]), ("deep_language", ["--option", "depth_text=2"]),
                                             ("tcp", ["--option", "class_layer=1"]), ("cocoop", []),
                                             ("clip_lora", ["--option", "encoder=text", "--option", "iterations=2"])])
def test_text_side_methods_train_save_load_and_evaluate(tmp_path, capsys, method, options):
    folder = tmp_path / "siglip-hf"
    save_siglip(folder)
    data = make_synthetic_dataset(str(tmp_path / "shapes"), n_train_per_class=1, n_test_per_class=2, seed=0)
    out = tmp_path / "run"
    assert main(["train", "--dataset", data, "--backbone", "hf", "--weights", str(folder), "--method", method,
                 *options, "--shots", "1", "--epochs", "1", "--output", str(out), "--quiet"]) == 0, \
        capsys.readouterr().err
    trained = json.loads((out / "metrics.json").read_text())
    assert trained["backbone"]["preprocess"]["resize_mode"] == "squash"
    assert main(["eval", str(out), "--output", str(tmp_path / "eval"), "--quiet"]) == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["test"]["accuracy"] == trained["test"]["accuracy"]


def test_image_tower_methods_are_one_line(tmp_path, capsys):
    """SigLIP's image tower is timm's: deep visual prompts cannot enter it."""
    folder = tmp_path / "siglip-hf"
    save_siglip(folder)
    data = make_synthetic_dataset(str(tmp_path / "shapes"), n_train_per_class=1, n_test_per_class=1, seed=0)
    capsys.readouterr()  # transformers' progress bar while saving
    assert main(["train", "--dataset", data, "--backbone", "hf", "--weights", str(folder), "--method", "vpt_deep",
                 "--option", "depth_vision=2", "--shots", "1", "--epochs", "1", "--output", str(tmp_path / "run"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot take deep visual prompts: its image tower is timm's" in err, err


def test_bad_siglip_folders_are_one_line(tmp_path):
    folder = tmp_path / "siglip-hf"
    save_siglip(folder)
    config = json.loads((folder / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    for edit, why in [({"text_config": {**text, "projection_size": 40}},
                       "text features of 40 and image features of 48 dimensions"),
                      ({"vision_config": {**vision, "hidden_act": "relu"}}, "vision_config.hidden_act 'relu' is not"),
                      ({"vision_config": {**vision, "vision_use_head": False}}, "vision_use_head is false"),
                      ({"text_config": {**text, "layer_norm_eps": "small"}}, "text_config.layer_norm_eps must be"),
                      ({"vision_config": {**vision, "num_attention_heads": 5}}, "num_attention_heads 5 does not divide"),
                      ({"text_config": {**text, "num_hidden_layers": 3}}, "is not a transformers SiglipModel of its "
                                                                          "config.json: text_model.encoder.layers.2")]:
        (folder / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(VlpromptError, match=re.escape(why)):
            vp.load_backbone("hf", weights=str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(VlpromptError, match="cannot load its tokenizer"):
        vp.load_backbone("hf", weights=str(folder))


def test_without_transformers_the_folder_is_one_line_naming_the_extra(tmp_path):
    """SigLIP's tokenizer is a Hugging Face one: without ``transformers`` (hidden from a fresh interpreter) loading
    the folder stops in one line that names the extra."""
    folder = tmp_path / "siglip-hf"
    save_siglip(folder)
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import vlprompt as vp\n"
            "try:\n    vp.load_backbone('hf', weights=sys.argv[1])\n"
            "except vp.VlpromptError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    line = out.stdout.strip()
    assert len(line.splitlines()) == 1 and 'needs transformers: pip install "vlprompt[hf]"' in line, (line, out.stderr)
