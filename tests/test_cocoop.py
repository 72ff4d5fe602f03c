"""CoCoOp's per-image prompts through the fast text encoder equal the official 77-token computation: logits
and the gradients of the context and of the meta-net (fp32), on the tiny and a real-size text tower."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import tiny_backbone

import vlprompt as vp
from vlprompt.methods.cocoop import CoCoOp
from vlprompt.text.encoder import reference_encode

NAMES = ["cat", "golden retriever", "sea lion", "airplane", "Leopard", "hot air balloon"]


def reference_logits(learner: CoCoOp, feats: torch.Tensor) -> torch.Tensor:
    """The official construction: for each image, every class's full 77-token prompt with ctx + pi(f)."""
    bb = learner.backbone
    f = feats / feats.norm(dim=-1, keepdim=True)
    pi = learner.meta_net(f)
    rows = []
    for b in range(f.shape[0]):
        ctx = (learner.ctx + pi[b]).unsqueeze(0).expand(len(learner.classnames), -1, -1)
        prompts = torch.cat([learner.token_prefix, ctx, learner.token_suffix], dim=1)
        g = reference_encode(bb, prompts, learner.eot_idx)
        rows.append(bb.logit_scale * (g / g.norm(dim=-1, keepdim=True)) @ f[b])
    return torch.stack(rows)


def grads(learner, logits, y):
    learner.zero_grad(set_to_none=True)
    F.cross_entropy(logits, y).backward()
    return {n: p.grad.clone() for n, p in learner.named_parameters()}


@pytest.mark.parametrize("arch", ["vlprompt-tiny-ViT", "ViT-B-16"])
def test_fast_per_image_prompts_equal_the_77_token_computation(arch):
    bb = tiny_backbone(arch)
    torch.manual_seed(0)
    learner = CoCoOp(bb, NAMES, ctx_init="a photo of a")
    with torch.no_grad():  # a meta-net whose bias is not negligible against the context
        for p in learner.meta_net.parameters():
            p.mul_(20)
    feats, y = torch.randn(3, bb.embed_dim), torch.tensor([0, 4, 2])
    fast = learner(feats)
    ref = reference_logits(learner, feats)
    assert fast.shape == (3, len(NAMES))
    assert (fast - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max())
    g_fast, g_ref = grads(learner, learner(feats), y), grads(learner, reference_logits(learner, feats), y)
    assert set(g_fast) == {"ctx", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight", "meta_net.2.bias"}
    for name, g in g_ref.items():
        rel = float((g_fast[name] - g).norm() / g.norm())
        assert rel <= 1e-4, (name, rel)


def test_each_image_gets_its_own_prompts_and_the_artefact_round_trips(tmp_path):
    bb = tiny_backbone()
    torch.manual_seed(1)
    learner = CoCoOp(bb, NAMES)
    feats = torch.randn(4, bb.embed_dim)
    per_image = learner.image_text_features(feats)
    assert per_image.shape == (4, len(NAMES), bb.embed_dim)
    assert not torch.allclose(per_image[0], per_image[1])  # the bias moves the prompts per image
    learner.save_pretrained(tmp_path)
    again = vp.load_prompt(tmp_path, bb)
    assert isinstance(again, CoCoOp) and torch.equal(again(feats), learner(feats))
    moved = vp.load_prompt(tmp_path, bb, classnames=["owl", "bee"])
    assert moved(feats).shape == (4, 2)
    with pytest.raises(vp.VlpromptError, match="unified"):
        CoCoOp(bb, NAMES, ctx_init=None, n_ctx=2, csc=True)
