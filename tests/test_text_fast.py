"""The fast text paths equal the straightforward 77-token computation: features, logits and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import tiny_backbone

import vlprompt as vp
from vlprompt.text import encode_shared_prefix, encode_truncated, reference_encode

SINGLE = ["dog", "cat", "face", "car", "tree", "bird", "boat", "fish"]  # one BPE token each
MANY = ["american pit bull terrier", "2012 Tesla Model S Sedan", "F/A-18", "outdoor apartment_building",
        "a very long class name made of many words that tokenize to many tokens indeed"]


def names(n: int) -> list[str]:
    pool = SINGLE + MANY
    return [pool[i % len(pool)] + ("" if i < len(pool) else f" {i}") for i in range(n)]


@pytest.fixture(scope="module", params=["vlprompt-tiny-ViT", "vlprompt-tiny-RN"])
def bb(request):
    return tiny_backbone(request.param)


def compare(bb, learner, fast):
    torch.manual_seed(3)
    img = torch.randn(16, bb.embed_dim)
    labels = torch.randint(0, learner.n_cls, (16,))
    weights = torch.randn(16, learner.n_cls)  # a loss with a gradient even for a single class

    def loss(logits):
        return F.cross_entropy(logits, labels) + (weights * logits).sum() / 100

    ref_w = F.normalize(reference_encode(bb, learner.prompt_embeddings(), learner.eot_idx), dim=-1)
    ref_logits = learner.logits(img, ref_w)
    g_ref = torch.autograd.grad(loss(ref_logits), learner.ctx)[0]
    fast_logits = learner.logits(img, F.normalize(fast(), dim=-1))
    g_fast = torch.autograd.grad(loss(fast_logits), learner.ctx)[0]
    assert (fast_logits - ref_logits).abs().max().item() <= 1e-4
    assert g_ref.norm() > 0
    assert ((g_fast - g_ref).norm() / g_ref.norm()).item() <= 1e-4


@pytest.mark.parametrize("n_cls", [1, 8, 37])
@pytest.mark.parametrize("n_ctx", [1, 4, 16])
def test_shared_prefix_matches_reference(bb, n_cls, n_ctx):
    torch.manual_seed(0)
    learner = vp.CoOp(bb, names(n_cls), n_ctx=n_ctx)
    assert learner.shares_prefix

    def fast():
        prefix = torch.cat([learner.token_prefix[0], learner.ctx])
        return encode_shared_prefix(bb, prefix, learner.token_suffix, learner.eot_idx - learner.n_ctx)

    compare(bb, learner, fast)


@pytest.mark.parametrize("layout", [dict(class_token_position="middle"), dict(class_token_position="front"),
                                    dict(csc=True), dict(csc=True, class_token_position="middle")])
@pytest.mark.parametrize("n_cls", [1, 13])
def test_truncated_matches_reference(bb, layout, n_cls):
    torch.manual_seed(0)
    learner = vp.CoOp(bb, names(n_cls), n_ctx=6, **layout)
    compare(bb, learner, lambda: encode_truncated(bb, learner.prompt_embeddings(), learner.eot_idx))


def test_learner_picks_the_shared_path_only_when_exact(bb):
    assert vp.CoOp(bb, ["a"], n_ctx=2).shares_prefix
    assert not vp.CoOp(bb, ["a"], n_ctx=2, csc=True).shares_prefix
    assert not vp.CoOp(bb, ["a"], n_ctx=2, class_token_position="middle").shares_prefix


@pytest.mark.parametrize("arch", ["RN50", "ViT-B-16"])
def test_real_size_towers(arch):
    big = tiny_backbone(arch)
    torch.manual_seed(0)
    shared = vp.CoOp(big, names(24), n_ctx=16)
    prefix = lambda: torch.cat([shared.token_prefix[0], shared.ctx])  # noqa: E731
    compare(big, shared, lambda: encode_shared_prefix(big, prefix(), shared.token_suffix, shared.eot_idx - 16))
    middle = vp.CoOp(big, names(24), n_ctx=8, csc=True, class_token_position="middle")
    compare(big, middle, lambda: encode_truncated(big, middle.prompt_embeddings(), middle.eot_idx))


@pytest.mark.parametrize("p", [0, 3])
@pytest.mark.parametrize("rows,longest", [(4, 5), (16, 20)])  # windows shorter and longer than a chunk
def test_attention_plan_matches_its_definition(p, rows, longest):
    """Each prefix query sees the earlier-or-same prefix rows; each own query sees the whole prefix and
    exactly the earlier-or-same rows of its own class, each key once; padding queries see everything; each
    EOT sees exactly its own class's rows."""
    from vlprompt.text.fast import _Plan

    g = torch.Generator().manual_seed(rows + p)
    lengths = torch.randint(1, longest + 1, (11,), generator=g)
    plan = _Plan(lengths, p, rows)
    owner = [-1] * p + [c for c, n in enumerate(lengths.tolist()) for _ in range(n)]  # -1: prefix rows
    total = p + plan.t
    r = plan.rows
    assert r >= plan.s - 1
    keys = plan.key_index.view(plan.n, p + plan.w)
    for chunk in range(plan.n):
        for i in range(r):
            q = chunk * r + i
            seen = [keys[chunk, j].item() for j in range(p + plan.w) if not plan.chunk_mask[chunk, i, j]]
            if q >= total:
                assert len(seen) == p + plan.w
            elif owner[q] < 0:
                assert seen == list(range(q + 1))
            else:
                assert seen == list(range(p)) + [k for k in range(p, q + 1) if owner[k] == owner[q]]
    own = owner[p:]
    for c in range(len(lengths)):
        eot = plan.eot[c].item()
        assert own[eot] == c and (eot + 1 == plan.t or own[eot + 1] == c + 1)
        rows_seen = [eot - (plan.s - 1) + w for w in range(plan.s) if not plan.eot_mask[c, 0, p + w]]
        assert rows_seen == [k for k in range(plan.t) if own[k] == c]
        assert not plan.eot_mask[c, 0, :p].any()
