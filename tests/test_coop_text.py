"""CoOp text features against a straightforward 77-token reference, for every layout.

The reference builds each class's 77-token prompt in a plain Python loop from the tokenized
placeholder prompt, as the official CoOp code does, and runs open_clip's own text transformer over all
77 positions with the full causal mask before pooling at the EOT token.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import vlprompt as vp
from vlprompt.prompts.templates import prompt_text

NAMES = [
    "face",  # one BPE token
    "american_pit_bull_terrier",  # underscores become spaces
    "2012 Tesla Model S Sedan",
    "F/A-18",
    "outdoor apartment_building",
    "Apply_Eye_Makeup",
    "a very long class name made of many words that tokenize to many tokens indeed",
]


def tiny(arch: str = "vlprompt-tiny-ViT", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vp.load_backbone(arch, **kw)


@pytest.fixture(scope="module", params=["vlprompt-tiny-ViT", "vlprompt-tiny-RN"])
def bb(request):
    return tiny(request.param)


def reference_features(bb, learner) -> torch.Tensor:
    """Loop-based CoOp prompt assembly + open_clip's full-length text transformer."""
    model = bb.model
    M = learner.n_ctx
    placeholder = learner.ctx_init or " ".join(["X"] * M)
    rows, eots = [], []
    for c, name in enumerate(learner.classnames):
        text = prompt_text(name)
        tokens = bb.tokenizer([f"{placeholder} {text}."])[0]
        emb = model.token_embedding(tokens)
        k = len(bb.tokenizer.encode(text))
        ctx = learner.ctx[c] if learner.ctx.dim() == 3 else learner.ctx
        sos, suffix = emb[:1], emb[1 + M:]
        name_tokens, rest = suffix[:k], suffix[k:]
        if learner.class_token_position == "end":
            parts = [sos, ctx, name_tokens, rest]
        elif learner.class_token_position == "middle":
            h = M // 2
            parts = [sos, ctx[:h], name_tokens, ctx[h:], rest]
        else:
            parts = [sos, name_tokens, ctx, rest]
        rows.append(torch.cat(parts, dim=0))
        eots.append(int(tokens.argmax()))
    x = torch.stack(rows) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(len(rows)), torch.tensor(eots)] @ model.text_projection
    return F.normalize(x, dim=-1)


LAYOUTS = [
    dict(n_ctx=16, csc=False, class_token_position="end"),
    dict(n_ctx=16, csc=False, class_token_position="middle"),
    dict(n_ctx=7, csc=False, class_token_position="middle"),  # odd M: floor(M/2) first
    dict(n_ctx=16, csc=False, class_token_position="front"),
    dict(n_ctx=4, csc=True, class_token_position="end"),
    dict(n_ctx=5, csc=True, class_token_position="middle"),
    dict(n_ctx=8, csc=True, class_token_position="front"),
    dict(n_ctx=1, csc=False, class_token_position="end"),
    dict(ctx_init="a photo of a", class_token_position="end"),
    dict(ctx_init="a photo of a", class_token_position="middle"),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("n_classes", [1, 3, len(NAMES)])
def test_text_features_equal_77_token_reference(bb, layout, n_classes):
    torch.manual_seed(0)
    learner = vp.CoOp(bb, NAMES[:n_classes], **layout)
    ours = learner.text_features()
    ref = reference_features(bb, learner)
    assert ours.shape == (n_classes, bb.embed_dim)
    assert (ours - ref).abs().max().item() <= 1e-5
    # Gradients with respect to the context agree too (relative error of the whole gradient, the issue's
    # criterion: single entries near zero differ by float reduction order).
    probe = torch.randn_like(ours)
    g_ours = torch.autograd.grad((ours * probe).sum(), learner.ctx)[0]
    g_ref = torch.autograd.grad((ref * probe).sum(), learner.ctx)[0]
    assert g_ref.norm() > 0
    assert ((g_ours - g_ref).norm() / g_ref.norm()).item() <= 1e-4


def test_word_init_reproduces_the_hand_written_prompt(bb):
    """With ctx = embeddings of "a photo of a", CoOp is exactly open_clip's encoding of "a photo of a <name>."."""
    learner = vp.CoOp(bb, NAMES, ctx_init="a photo of a")
    assert learner.n_ctx == 4
    expected = F.normalize(bb.model.encode_text(bb.tokenize([f"a photo of a {prompt_text(n)}." for n in NAMES])),
                           dim=-1)
    assert (learner.text_features() - expected).abs().max().item() <= 1e-5


def test_random_init_is_normal_with_std_002(bb):
    torch.manual_seed(0)
    learner = vp.CoOp(bb, ["a", "b"], n_ctx=16)
    assert learner.ctx.shape == (16, bb.ctx_dim)
    assert abs(learner.ctx.std().item() - 0.02) < 0.002
    csc = vp.CoOp(bb, ["a", "b", "c"], n_ctx=4, csc=True)
    assert csc.ctx.shape == (3, 4, bb.ctx_dim)


def test_logits_are_scaled_cosines(bb):
    torch.manual_seed(0)
    learner = vp.CoOp(bb, NAMES[:3], n_ctx=4)
    img = torch.randn(5, bb.embed_dim)
    w = learner.text_features()
    expected = bb.logit_scale * F.normalize(img, dim=-1) @ w.T
    assert torch.allclose(learner(img), expected, atol=1e-5)


def test_only_the_context_is_trainable(bb):
    learner = vp.CoOp(bb, NAMES[:2], n_ctx=4)
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["ctx"]
    assert not any(p.requires_grad for p in bb.model.parameters())
    learner.train()
    bb.train()
    assert not bb.model.training and not any(m.training for m in bb.model.modules())


@pytest.mark.parametrize("arch", ["ViT-B-16", "RN50"])
def test_real_size_text_towers_match_the_reference(arch):
    """The CLIP text tower of the real architectures (width 512, 12 layers, 8 heads)."""
    big = tiny(arch)
    for layout in (LAYOUTS[0], LAYOUTS[2], LAYOUTS[5]):
        torch.manual_seed(1)
        learner = vp.CoOp(big, NAMES, **layout)
        assert (learner.text_features() - reference_features(big, learner)).abs().max().item() <= 1e-5


def test_bf16_encoders_keep_float32_context_and_stay_close_to_fp32():
    fp32, bf16 = tiny(), tiny(precision="bf16")
    torch.manual_seed(0)
    a = vp.CoOp(fp32, NAMES, n_ctx=4)
    torch.manual_seed(0)
    b = vp.CoOp(bf16, NAMES, n_ctx=4)
    assert b.ctx.dtype == torch.float32 and torch.equal(a.ctx, b.ctx)
    wa, wb = a.text_features(), b.text_features()
    assert wb.dtype == torch.float32
    assert (wa * wb).sum(-1).min().item() > 0.99  # cosine between the fp32 and bf16 class features
    wb.sum().backward()
    assert b.ctx.grad is not None and b.ctx.grad.dtype == torch.float32 and b.ctx.grad.abs().sum() > 0
