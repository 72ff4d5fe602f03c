"""Hugging Face ``transformers`` CLIP checkpoints: a small random CLIPModel saved by ``transformers`` itself (config.json
+ model.safetensors + preprocessor_config.json) loads as a vlprompt backbone whose image and text features equal
``transformers``' own get_image_features / get_text_features on the same inputs (fp32, 1e-5 relative), for both of
its pooling rules; its preprocessing comes from the processor configuration; CoOp trains, saves, loads and evaluates
on it; a bad folder is one line."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

import vlprompt as vp
from vlprompt.cli import main
from vlprompt.data import make_synthetic_dataset
from vlprompt.errors import VlpromptError

if not os.environ.get("CI"):
    pytest.importorskip("transformers")  # scripts/setup.sh installs it; CI must not skip these tests

NAMES = ["face", "water lily", "stop sign", "motorbike"]


def save_clip(folder, eos_token_id: int = 49407, act: str = "quick_gelu", seed: int = 0):
    """A small random ``transformers`` CLIPModel and its image processor, saved by ``transformers``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, vocab_size=49408, eos_token_id=eos_token_id, hidden_act=act)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act=act)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=2,
                       image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4]).save_pretrained(folder)
    return model


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("eos_token_id, act", [(49407, "quick_gelu"), (2, "gelu")])
def test_features_equal_transformers_own(tmp_path, eos_token_id, act):
    ref = save_clip(tmp_path, eos_token_id, act)
    bb = vp.load_backbone("hf", weights=str(tmp_path))
    assert bb.activation == ("quickgelu" if act == "quick_gelu" else "gelu")
    tokens = bb.tokenize([f"a photo of a {n}." for n in NAMES])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        text_ref = ref.get_text_features(input_ids=tokens, attention_mask=(tokens != 0).long())
        image_ref = ref.get_image_features(pixel_values=images)
        if not torch.is_tensor(text_ref):  # transformers 5 returns an output object
            text_ref, image_ref = text_ref.pooler_output, image_ref.pooler_output
        text_ours = bb.model.encode_text(tokens)
        image_ours = bb.encode_images(images)
    assert rel(text_ours, text_ref) < 1e-5 and rel(image_ours, image_ref) < 1e-5
    # the prompt learners' fast path on this tower: CoOp's context taken from the phrase gives the same features
    learner = vp.CoOp(bb, NAMES, n_ctx=4, ctx_init="a photo of a")
    with torch.no_grad():
        assert rel(learner.text_features(), torch.nn.functional.normalize(text_ref, dim=-1)) < 1e-5
    assert bb.preprocess.record() == {"size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4],
                                      "interpolation": "bilinear", "resize_mode": "shortest",
                                      "source": f"processor config of {tmp_path.name}"}
    assert abs(bb.logit_scale - float(ref.logit_scale.detach().exp())) < 1e-4


def test_coop_trains_saves_loads_and_evaluates_on_a_hugging_face_checkpoint(tmp_path, capsys):
    folder = tmp_path / "clip-hf"
    save_clip(folder)
    data = make_synthetic_dataset(str(tmp_path / "shapes"), n_train_per_class=2, n_test_per_class=2, seed=0)
    out = tmp_path / "run"
    assert main(["train", "--dataset", data, "--backbone", "hf", "--weights", str(folder), "--shots", "1",
                 "--epochs", "2", "--n-ctx", "2", "--output", str(out), "--quiet"]) == 0, capsys.readouterr().err
    trained = json.loads((out / "metrics.json").read_text())
    assert trained["backbone"]["name"] == "hf" and trained["backbone"]["preprocess"]["interpolation"] == "bilinear"
    assert main(["eval", str(out), "--output", str(tmp_path / "eval"), "--quiet"]) == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["test"]["accuracy"] == trained["test"]["accuracy"]
    # the folder's identity is its files' bytes, not its path: a copy elsewhere is the same run
    from vlprompt.engine.identity import weights_identity

    shutil.copytree(folder, tmp_path / "elsewhere")
    assert weights_identity(str(folder)) == weights_identity(str(tmp_path / "elsewhere"))
    save_clip(tmp_path / "other", seed=1)
    assert weights_identity(str(folder)) != weights_identity(str(tmp_path / "other"))


def test_bad_hugging_face_folders_are_one_line(tmp_path):
    folder = tmp_path / "clip-hf"
    save_clip(folder)
    with pytest.raises(VlpromptError, match="is a Hugging Face checkpoint folder: use --backbone hf"):
        vp.load_backbone("ViT-B-16", weights=str(folder))
    with pytest.raises(VlpromptError, match="backbone hf: give a Hugging Face checkpoint folder"):
        vp.load_backbone("hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "siglip2"}))
    with pytest.raises(VlpromptError, match="model_type 'siglip2' is not 'clip' or 'siglip' \\(Siglip2Model's"):
        vp.load_backbone("hf", weights=str(folder))
    for edit, why in [({"text_config": [1]}, "text_config must be a mapping, got list"),
                      ({"vision_config": {**config["vision_config"], "num_hidden_layers": 2.5}},
                       "vision_config.num_hidden_layers must be a positive whole number, got 2.5"),
                      ({"text_config": {**config["text_config"], "eos_token_id": "eos"}},
                       "text_config.eos_token_id must be a token id, got 'eos'"),
                      ({"text_config": {**config["text_config"], "hidden_act": ["gelu"]}}, "activation")]:
        (folder / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(VlpromptError, match=re.escape(why)):
            vp.load_backbone("hf", weights=str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "resample": [3]}))
    with pytest.raises(VlpromptError, match=re.escape("resample [3] is not one of [2, 3]")):
        vp.load_backbone("hf", weights=str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    (folder / "model.safetensors").unlink()
    with pytest.raises(VlpromptError, match="no model.safetensors or pytorch_model.bin beside its config.json"):
        vp.load_backbone("hf", weights=str(folder))


def test_a_checkpoint_named_in_the_backbone(tmp_path):
    """``hf:<folder>`` is the folder; ``hf:<hub id>`` with no hub and nothing cached is one line."""
    folder = tmp_path / "clip-hf"
    ref = save_clip(folder)
    bb = vp.load_backbone(f"hf:{folder}")
    tokens = bb.tokenize(["a photo of a face."])
    with torch.no_grad():
        want = ref.get_text_features(input_ids=tokens, attention_mask=(tokens != 0).long())
        want = want if torch.is_tensor(want) else want.pooler_output
        assert rel(bb.model.encode_text(tokens), want) < 1e-5
    with pytest.raises(VlpromptError, match="names its checkpoint itself"):
        vp.load_backbone(f"hf:{folder}", weights=str(folder))
    with pytest.raises(VlpromptError, match="backbone hf:nobody/no-such-clip: not a local folder, and cannot fetch"):
        vp.load_backbone("hf:nobody/no-such-clip", cache_dir=str(tmp_path / "cache"))


def test_a_prompt_trained_on_a_named_checkpoint_is_evaluated_again(tmp_path, capsys):
    folder = tmp_path / "clip-hf"
    save_clip(folder)
    data = make_synthetic_dataset(str(tmp_path / "shapes"), n_train_per_class=2, n_test_per_class=1, seed=0)
    out = tmp_path / "run"
    assert main(["train", "--dataset", data, "--backbone", f"hf:{folder}", "--shots", "1", "--epochs", "1",
                 "--n-ctx", "2", "--output", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert main(["eval", str(out), "--output", str(tmp_path / "eval"), "--quiet"]) == 0, capsys.readouterr().err
    first = json.loads((out / "metrics.json").read_text())["test"]["accuracy"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]["accuracy"] == first
