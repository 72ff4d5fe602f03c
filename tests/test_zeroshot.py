"""Zero-shot CLIP and the prompt ensemble against open_clip's own encode_text."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import vlprompt as vp
from vlprompt.prompts import ENSEMBLE_TEMPLATES, ensemble_templates

NAMES = ["face", "sea_lion", "Annual Crop Land"]


def test_single_template(bb):
    zs = vp.ZeroShotCLIP(bb, NAMES, ["a photo of a {}, a type of pet."])
    tokens = bb.tokenize([f"a photo of a {n}, a type of pet." for n in ["face", "sea lion", "Annual Crop Land"]])
    expected = F.normalize(bb.model.encode_text(tokens), dim=-1)
    assert torch.allclose(zs.text_features(), expected, atol=1e-6)
    img = torch.randn(4, bb.embed_dim)
    assert torch.allclose(zs(img), bb.logit_scale * F.normalize(img, dim=-1) @ expected.T, atol=1e-5)


def test_ensemble_averages_normalised_features_then_renormalises(bb):
    templates = ensemble_templates("{} texture.", "dtd")
    assert templates == list(ENSEMBLE_TEMPLATES) + ["{} texture."] and len(ENSEMBLE_TEMPLATES) == 7
    assert ensemble_templates("a photo of a {}.", "imagenet") == list(ENSEMBLE_TEMPLATES)
    zs = vp.ZeroShotCLIP(bb, NAMES, templates)
    total = 0
    for t in templates:
        prompts = [t.format(n.replace("_", " ")) for n in NAMES]
        total = total + F.normalize(bb.model.encode_text(bb.tokenize(prompts)), dim=-1)
    expected = F.normalize(total / len(templates), dim=-1)
    assert torch.allclose(zs.text_features(), expected, atol=1e-6)


def test_zero_shot_is_not_trainable(bb):
    zs = vp.ZeroShotCLIP(bb, NAMES)
    assert not [p for p in zs.parameters() if p.requires_grad]
    assert vp.get_method("zeroshot").trains is False
