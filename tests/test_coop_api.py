"""CoOp artefacts: save / load round trip, transfer to other class names, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from support import tiny_backbone

import vlprompt as vp
from vlprompt.prompts.artifact import CONFIG_NAME, WEIGHTS_NAME

NAMES = ["face", "leopard", "motorbike", "accordion"]


@pytest.mark.parametrize("kw", [dict(n_ctx=16), dict(n_ctx=3, csc=True, class_token_position="middle"),
                                dict(ctx_init="a photo of a", class_token_position="front")])
def test_save_load_round_trip(bb, tmp_path, kw):
    torch.manual_seed(0)
    learner = vp.CoOp(bb, NAMES, **kw)
    with torch.no_grad():
        learner.ctx.add_(0.1 * torch.randn_like(learner.ctx))  # something a fresh init would not give
    learner.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    # Tiny: the context only, no backbone weights.
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < learner.ctx.numel() * 4 + 1024
    # built directly, it records the method coop with its own layout
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["type"] == "coop" and saved["config"]["options"] is None
    assert saved["config"]["layout"] == {"n_ctx": learner.n_ctx, "ctx_init": learner.ctx_init, "csc": learner.csc,
                                         "class_token_position": learner.class_token_position,
                                         "ctx_init_rule": "words"}
    loaded = vp.CoOp.from_pretrained(tmp_path, bb)
    assert loaded.classnames == NAMES and loaded.class_token_position == learner.class_token_position
    assert torch.equal(loaded.ctx, learner.ctx)
    assert torch.equal(loaded.text_features(), learner.text_features())


def test_transfer_to_other_class_names(bb, tmp_path):
    torch.manual_seed(0)
    learner = vp.CoOp(bb, NAMES, n_ctx=4)
    learner.save_pretrained(tmp_path)
    other = ["dog", "cat", "sea_lion"]
    moved = vp.CoOp.from_pretrained(tmp_path, bb, classnames=other)
    fresh = vp.CoOp(bb, other, n_ctx=4)
    with torch.no_grad():
        fresh.ctx.copy_(learner.ctx)
    assert moved.text_features().shape == (3, bb.embed_dim)
    assert torch.equal(moved.text_features(), fresh.text_features())


def test_class_specific_context_cannot_move_to_other_classes(bb, tmp_path):
    vp.CoOp(bb, NAMES, n_ctx=2, csc=True).save_pretrained(tmp_path)
    with pytest.raises(vp.VlpromptError, match="class-specific context belongs to its own 4 classes"):
        vp.CoOp.from_pretrained(tmp_path, bb, classnames=["a", "b"])
    with pytest.raises(vp.VlpromptError, match="cannot be transferred"):  # same count, other names
        vp.CoOp.from_pretrained(tmp_path, bb, classnames=["a", "b", "c", "d"])
    assert vp.CoOp.from_pretrained(tmp_path, bb, classnames=list(NAMES)).classnames == list(NAMES)


def test_checkpoint_that_does_not_fit_the_backbone(bb, tmp_path):
    vp.CoOp(bb, NAMES, n_ctx=2).save_pretrained(tmp_path)
    wide = tiny_backbone("RN50")
    with pytest.raises(vp.VlpromptError, match="does not fit backbone"):
        vp.CoOp.from_pretrained(tmp_path, wide)


def test_broken_artefacts_are_named(bb, tmp_path):
    with pytest.raises(vp.VlpromptError, match="prompt folder not found"):
        vp.CoOp.from_pretrained(tmp_path / "nope", bb)
    vp.CoOp(bb, NAMES, n_ctx=2).save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{broken")
    with pytest.raises(vp.VlpromptError, match="not valid JSON"):
        vp.CoOp.from_pretrained(tmp_path, bb)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"n_ctx": 2}))
    with pytest.raises(vp.VlpromptError, match="missing field"):
        vp.CoOp.from_pretrained(tmp_path, bb)


def test_invalid_options(bb):
    with pytest.raises(vp.VlpromptError, match="class_token_position"):
        vp.CoOp(bb, NAMES, class_token_position="left")
    with pytest.raises(vp.VlpromptError, match="ctx_init and csc"):
        vp.CoOp(bb, NAMES, ctx_init="a photo of a", csc=True)
    fallback = vp.CoOp(bb, NAMES, ctx_init="a photo of a", csc=True, allow_unified_fallback=True)
    assert not fallback.csc and fallback.ctx.shape == (4, bb.ctx_dim)
    with pytest.raises(vp.VlpromptError, match="n_ctx"):
        vp.CoOp(bb, NAMES, n_ctx=0)
    with pytest.raises(vp.VlpromptError, match="too long"):
        vp.CoOp(bb, ["word " * 80], n_ctx=16)


def test_first_tokens_rule_learns_the_first_tokens_and_keeps_the_rest_of_the_phrase(bb, tmp_path):
    names = ["cat", "traffic light"]
    learner = vp.CoOp(bb, names, n_ctx=2, ctx_init="a_photo of a", ctx_init_rule="first_tokens")
    assert learner.n_ctx == 2 and tuple(learner.ctx.shape) == (2, bb.ctx_dim)
    # The learned rows start as "a photo" and "of a" stays fixed: the prompt is the hand-written one.
    expected = torch.nn.functional.normalize(bb.encode_texts([f"a photo of a {n}." for n in names]), dim=-1)
    torch.testing.assert_close(learner.text_features().detach(), expected, rtol=2e-5, atol=2e-6)
    learner.save_pretrained(tmp_path / "p")
    again = vp.load_prompt(tmp_path / "p", bb)
    assert again.n_ctx == 2 and torch.equal(again.ctx, learner.ctx)
    with pytest.raises(vp.VlpromptError, match="has 4 BPE tokens; ctx_init_rule first_tokens learns the first n_ctx"):
        vp.CoOp(bb, names, n_ctx=5, ctx_init="a photo of a", ctx_init_rule="first_tokens")
