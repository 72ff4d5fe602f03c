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


def sentencepiece_tokenizer(folder, length: int) -> int:
    """SigLIP's own tokenizer class (``SiglipTokenizer``: a sentencepiece model, ids pad 0, </s> 1, unk 2, padding
    with </s> as SigLIP's does) over a small unigram model trained here on a few phrases; its vocabulary size."""
    import io

    import sentencepiece as spm
    from transformers import SiglipTokenizer

    phrases = ["a photo of a face.", "a photo of a water lily", "stop sign", "motorbike", "a photo of the dog"] * 40
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(phrases), model_writer=model, vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    tokenizer = SiglipTokenizer(vocab_file=str(folder / "spiece.model"), model_max_length=length)
    (folder / "spiece.model").unlink()
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)


def save_siglip(folder, act: str = "gelu_pytorch_tanh", seed: int = 0, processor: bool = True,
                tokenizer: str = "unigram"):
    """A small random ``transformers`` SiglipModel (logit scale and bias moved off their initial values), its
    tokenizer (``unigram``: `support.build_tokenizer`; ``sentencepiece``: SigLIP's own class) and image processor,
    saved by ``transformers``."""
    from pathlib import Path

    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    length = 32 if tokenizer == "sentencepiece" else 16  # its small vocabulary spells a word in several pieces
    if tokenizer == "sentencepiece":
        vocab = sentencepiece_tokenizer(folder, length)
    else:
        vocab = 3 + len(SIGLIP_WORDS)
        build_tokenizer(folder)
    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=length, vocab_size=vocab, projection_size=48, pad_token_id=0,
                eos_token_id=1, bos_token_id=None, hidden_act=act)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act=act)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-7.5)
    model.save_pretrained(folder)
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


def test_siglips_own_tokenizer_class(tmp_path):
    """A folder with SigLIP's own tokenizer (sentencepiece, padding with </s>): vlprompt's tokens are those of
    ``transformers``' tokenizer with SigLIP's processing (canonicalised text, padded to the context length), the
    facade reads no start token and pad id 1, and CoOp's dense path gives ``transformers``' text features."""
    from transformers import AutoTokenizer

    ref = save_siglip(tmp_path, tokenizer="sentencepiece")
    bb = vp.load_backbone("hf", weights=str(tmp_path))
    assert (bb.n_start, bb.tokens.pad_id) == (0, 1)
    texts = [f"a photo of a {n}." for n in ["face", "dog"]]
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))(texts, padding="max_length", max_length=32,
                                                            truncation=True, return_tensors="pt").input_ids
    tokens = bb.tokenize(texts)
    assert torch.equal(tokens, theirs) and int(tokens[0, -1]) == 1  # padded with </s>
    learner = vp.CoOp(bb, ["face", "dog"], n_ctx=4, ctx_init="a photo of a")
    with torch.no_grad():
        assert rel(learner.text_features(), F.normalize(features(ref.get_text_features(input_ids=theirs)), dim=-1)) \
            < 1e-5
    # a prompt the tokenizer would cut ends with </s> as a padded one does: found by its length, one line
    with pytest.raises(VlpromptError, match="class name too long for the 32-token context"):
        vp.CoOp(bb, ["face", "dog " * 30], n_ctx=4, ctx_init="a photo of a")
    # this vocabulary never saw an "x": learned rows behind "X" placeholders would not be one token each
    with pytest.raises(VlpromptError, match="spells 2 placeholder words 'X' with 4 tokens"):
        vp.CoOp(bb, ["face"], n_ctx=2)
    # interpret reads the context through the same tokenizer: the phrase's first pieces (one learned vector per word
    # of the phrase, from its first token embeddings), at distance 0
    from vlprompt.practice.interpret import nearest_words

    pieces = AutoTokenizer.from_pretrained(str(tmp_path)).tokenize("a photo of a")
    records = nearest_words(learner, bb, top_k=2)
    assert [r["nearest"][0]["token"] for r in records] == pieces[:4] and all(r["nearest"][0]["distance"] < 1e-6
                                                                          for r in records)


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
