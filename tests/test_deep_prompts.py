"""Deep prompts (IVLP, VPT-deep, deep language prompting) against a straightforward reference written the way the
official code computes it: sequence-first (LND) tensors, a plain loop over open_clip's own blocks, the prompt
rows cut and concatenated on dim 0, 77-token text prompts. Features, logits and the gradient of every prompt
tensor must agree, at depth 1, an intermediate depth and the full depth."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from support import tiny_backbone

from vlprompt.backbones import builtin_config_dir
from vlprompt.errors import VlpromptError
from vlprompt.methods import METHODS
from vlprompt.methods.base import MethodConfig, PromptLayout, parse_options
from vlprompt.methods.deep_prompts import trainable_count

CLASSES = ["cat", "traffic light", "golden retriever"]


def four_block_vit(tmp_path_factory, pool: str = "tok") -> str:
    """The tiny ViT with four blocks in each tower (room for an intermediate depth)."""
    cfg = json.loads((builtin_config_dir() / "vlprompt-tiny-ViT.json").read_text())
    cfg["vision_cfg"]["layers"] = 4
    cfg["text_cfg"]["layers"] = 4
    if pool != "tok":
        cfg["vision_cfg"]["pool_type"] = pool
    path = tmp_path_factory.mktemp("arch") / f"tiny-4-{pool}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def build(bb, method: str, classes=CLASSES, **options):
    m = METHODS[method]
    opts = parse_options(method, m.Options, options)
    config = MethodConfig(method, opts, PromptLayout(), "a photo of a {}.", "", 4, 1, "exact", 0)
    torch.manual_seed(0)
    learner = m.build(bb, classes, config)
    with torch.no_grad():  # every prompt tensor away from its initial value, so nothing passes by accident
        for p in learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return learner


# ------------------------------------------------------------------------------------------------
# The reference: the official code's computation, sequence-first
# ------------------------------------------------------------------------------------------------

def as_used(p: torch.Tensor, rounding: str) -> torch.Tensor:
    return p.half().float() if rounding == "fp16" else p


def reference_image(bb, images, layer0, deeper, rounding):
    """CLS feature of a ViT with prompts: appended after the positions, before ln_pre; block i >= 1 replaces the
    last rows of its input by its own prompt; blocks called one by one in (N, B, D)."""
    v = bb.model.visual
    x = v.conv1(images.to(bb.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
    x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
    b = x.shape[0]
    if layer0 is not None:
        x = torch.cat([x, as_used(layer0, rounding).expand(b, -1, -1).to(x.dtype)], dim=1)
    x = v.ln_pre(x).permute(1, 0, 2)  # LND
    n = 0 if layer0 is None else layer0.shape[0]
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i <= len(deeper):
            prompt = as_used(deeper[i - 1], rounding).expand(b, -1, -1).permute(1, 0, 2).to(x.dtype)
            x = torch.cat([x[:x.shape[0] - n], prompt], dim=0)
        x = block(x.permute(1, 0, 2)).permute(1, 0, 2)  # open_clip blocks are batch-first
    x = x.permute(1, 0, 2)
    if getattr(v, "pool_type", "tok") == "avg":
        pooled = v.ln_post(x[:, 1:x.shape[1] - n]).mean(dim=1)
    else:
        pooled = v.ln_post(x[:, 0])
    return (pooled @ v.proj).float()


def reference_text(bb, classes, phrase, ctx, deeper, rounding):
    """"<phrase> <class>." tokenised to 77 tokens; rows 1..N replaced by the context before the positions; block
    i >= 1 replaces rows 1..N of its input by its own prompt (LND); EOT row after ln_final, projected."""
    tokens = bb.tokenize([f"{phrase} {c}." for c in classes])
    emb = bb.text.token_embedding(tokens).to(bb.dtype)
    n = ctx.shape[0]
    c = len(classes)
    emb = torch.cat([emb[:, :1], as_used(ctx, rounding).expand(c, -1, -1).to(bb.dtype), emb[:, 1 + n:]], dim=1)
    x = (emb + bb.text.positional_embedding.to(bb.dtype)).permute(1, 0, 2)
    mask = bb.text.attn_mask.to(bb.dtype)
    for i, block in enumerate(bb.text.blocks):
        if 1 <= i <= len(deeper):
            prompt = as_used(deeper[i - 1], rounding).expand(c, -1, -1).permute(1, 0, 2).to(x.dtype)
            x = torch.cat([x[:1], prompt, x[1 + n:]], dim=0)
        x = block(x.permute(1, 0, 2), attn_mask=mask).permute(1, 0, 2)
    x = bb.text.ln_final(x.permute(1, 0, 2))
    rows = x[torch.arange(c), tokens.argmax(dim=-1)]
    return bb.text.project(rows).float()


def reference_logits(bb, learner, images, phrase):
    o = learner.options
    rounding = o.prompt_rounding
    if learner.n_vision:
        img = reference_image(bb, images, learner.vision_ctx, list(learner.vision_deep), rounding)
    else:
        img = reference_image(bb, images, None, [], rounding)
    if learner.n_text:
        txt = reference_text(bb, CLASSES, phrase, learner.ctx, list(learner.text_deep), rounding)
    else:
        with torch.no_grad():
            txt = bb.model.encode_text(bb.tokenize([o.text_template.format(c) for c in CLASSES])).float()
    return img, txt, bb.logit_scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T


def assert_matches_reference(bb, learner, phrase, rtol=2e-5, grad_rtol=2e-4, reference=None):
    if learner.rounding == "fp16":  # gradients pass through fp16 at the casts (as in the official code): an ulp
        grad_rtol = max(grad_rtol, 2 ** -10)
    images = torch.randn(2, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    ref_img, ref_txt, ref_logits = (reference or reference_logits)(bb, learner, images, phrase)
    F.cross_entropy(ref_logits, labels).backward()
    ref_grads = {k: p.grad.clone() for k, p in learner.named_parameters()}
    learner.zero_grad(set_to_none=True)
    img = learner.image_features(images) if learner.from_pixels else bb.encode_images(images)
    txt = learner.text_features()
    logits = learner.logits(img, txt)
    F.cross_entropy(logits, labels).backward()

    def close(a, b, tol, what):
        a, b = a.detach(), b.detach()
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        assert err <= tol, f"{what}: relative max error {err:.2e}"

    close(img, ref_img, rtol, "image features")
    close(txt, F.normalize(ref_txt, dim=-1), rtol, "text features")
    close(logits, ref_logits, rtol, "logits")
    assert ref_grads.keys() == dict(learner.named_parameters()).keys()
    for name, p in learner.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, f"{name} gets no gradient"
        close(p.grad, ref_grads[name], grad_rtol, f"gradient of {name}")


@pytest.fixture(scope="module")
def bb4(tmp_path_factory):
    return tiny_backbone(four_block_vit(tmp_path_factory))


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("rounding", ["fp16", "none"])
def test_ivlp_matches_the_reference_on_a_tiny_model(bb4, depth, rounding):
    learner = build(bb4, "ivlp", depth_text=depth, depth_vision=depth, prompt_rounding=rounding)
    assert len(learner.text_deep) == depth - 1 and len(learner.vision_deep) == depth - 1
    assert_matches_reference(bb4, learner, "a photo of a")


@pytest.mark.parametrize("depth", [1, 3])
def test_vpt_deep_and_deep_language_match_the_reference(bb4, depth):
    vpt = build(bb4, "vpt_deep", depth_vision=depth, n_ctx_vision=3)
    assert not vpt.n_text and not list(vpt.buffers()) == []
    assert_matches_reference(bb4, vpt, None)
    lang = build(bb4, "deep_language", depth_text=depth, n_ctx_text=3, ctx_init="a photo of a")
    assert not lang.from_pixels
    assert_matches_reference(bb4, lang, "a photo of a")


def test_random_context_without_a_phrase_matches_the_reference(bb4):
    learner = build(bb4, "ivlp", depth_text=2, depth_vision=2, n_ctx_text=5, ctx_init="a photo of a")
    assert learner.phrase == "X X X X X"  # more than 4 context vectors: the phrase is dropped (official rule)
    assert_matches_reference(bb4, learner, "X X X X X")


def test_average_pooled_tower_never_pools_the_prompt_rows(tmp_path_factory):
    bb = tiny_backbone(four_block_vit(tmp_path_factory, pool="avg"))
    learner = build(bb, "vpt_deep", depth_vision=2, n_ctx_vision=2)
    assert_matches_reference(bb, learner, None)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 6, 12])
def test_ivlp_matches_the_reference_on_a_real_size_vit_b16(depth):
    bb = tiny_backbone("ViT-B-16")
    learner = build(bb, "ivlp", classes=CLASSES, depth_text=depth, depth_vision=depth)
    assert_matches_reference(bb, learner, "a photo of a", rtol=1e-4, grad_rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# Where the rows go, seen from inside the towers (hooks on each block's first norm)
# ------------------------------------------------------------------------------------------------

def block_inputs(blocks) -> tuple[list, list]:
    seen = []
    hooks = [b.ln_1.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone())) for b in blocks]
    return seen, hooks


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_each_block_sees_its_own_prompt_until_the_depth(bb4, depth):
    learner = build(bb4, "ivlp", depth_text=depth, depth_vision=depth, prompt_rounding="none")
    images = torch.randn(2, 3, bb4.image_size, bb4.image_size)
    seen, hooks = block_inputs(bb4.model.visual.transformer.resblocks)
    with torch.no_grad():
        learner.image_features(images)
    for h in hooks:
        h.remove()
    prompts = [learner.vision_ctx] + list(learner.vision_deep)
    for i, x in enumerate(seen):
        rows = x[:, -learner.n_vision:]
        if 1 <= i < depth:
            assert torch.equal(rows, prompts[i].expand_as(rows))
        elif i >= depth:  # the prompt rows carry the previous block's outputs
            assert not torch.equal(rows, prompts[min(i, depth - 1)].expand_as(rows))
    seen, hooks = block_inputs(bb4.text.blocks)
    with torch.no_grad():
        learner.text_features()
    for h in hooks:
        h.remove()
    deep = [None] + list(learner.text_deep)
    for i, x in enumerate(seen):
        rows = x[1:1 + learner.n_text]  # packed shared prefix: SOS, then the context rows
        if 1 <= i < depth:
            assert torch.equal(rows, deep[i])
        elif i >= depth and depth > 1:
            assert not torch.equal(rows, deep[depth - 1])


def test_phrase_rule_learns_the_first_tokens_and_keeps_the_rest(bb4):
    learner = build(bb4, "ivlp", depth_text=1, depth_vision=1, n_ctx_text=2, ctx_init="a_photo of a")
    fresh = METHODS["ivlp"].build(bb4, CLASSES, MethodConfig("ivlp", parse_options(
        "ivlp", METHODS["ivlp"].Options, {"depth_text": 1, "depth_vision": 1, "n_ctx_text": 2}),
        PromptLayout(), "", "", 4, 1, "exact", 0))
    emb = bb4.text.token_embedding(bb4.tokenize(["a photo of a"]))[0].float()
    assert torch.equal(fresh.ctx.detach(), emb[1:3])  # "a photo" learned
    assert torch.equal(learner.token_prefix[3:5], emb[3:5])  # "of a" fixed, shared by every class
    with pytest.raises(VlpromptError, match="fewer than the 3 context vectors"):
        build(bb4, "ivlp", n_ctx_text=3, ctx_init="a photo", depth_text=1, depth_vision=1)


def test_depth_beyond_the_tower_and_a_resnet_are_one_line_errors(bb4):
    with pytest.raises(VlpromptError, match="depth_text=12, but the text tower .* has 4 blocks"):
        build(bb4, "ivlp", depth_vision=2)
    with pytest.raises(VlpromptError, match="not a ViT"):
        build(tiny_backbone("vlprompt-tiny-RN"), "vpt_deep", depth_vision=1)
    with pytest.raises(VlpromptError, match="n_ctx_vision must be an integer >= 1"):
        parse_options("ivlp", METHODS["ivlp"].Options, {"n_ctx_vision": 0})


def test_trainable_counts_of_the_official_configurations():
    bb = tiny_backbone("ViT-B-16")
    counts = {("ivlp", ()): 30720, ("deep_language", ()): 24576, ("vpt_deep", ()): 73728,
              ("ivlp", (("n_ctx_text", 4), ("n_ctx_vision", 4), ("depth_text", 9), ("depth_vision", 9))): 46080}
    for (method, options), expected in counts.items():
        assert trainable_count(build(bb, method, **dict(options))) == expected, (method, options)


def test_no_prompts_is_the_frozen_tower_and_learners_share_one_backbone(bb4):
    images = torch.randn(3, 3, bb4.image_size, bb4.image_size, generator=torch.Generator().manual_seed(2))
    frozen = bb4.encode_images(images)
    with torch.no_grad():
        torch.testing.assert_close(bb4.encode_images_prompted(images, []), frozen, rtol=1e-5, atol=1e-6)
        a = build(bb4, "ivlp", depth_text=2, depth_vision=2)
        b = build(bb4, "vpt_deep", depth_vision=4, n_ctx_vision=3)
        first = a.image_features(images), a.text_features()
        b.image_features(images), b.text_features()  # another learner on the same backbone in between
        again = a.image_features(images), a.text_features()
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert torch.equal(bb4.encode_images(images), frozen)  # the frozen tower (a teacher) is untouched
    assert not torch.equal(first[0], frozen)


# ------------------------------------------------------------------------------------------------
# MaPLe: image prompts projected from the text prompts
# ------------------------------------------------------------------------------------------------

def maple_reference(bb, learner, images, phrase):
    """V_0 = proj(T_0) as the official fp16 tensors compute it (rounded inputs and weights, the product rounded;
    here in float64), V_i = F_i(T_i) in float32 rounded at insertion; then the IVLP reference towers."""
    fp16 = learner.rounding == "fp16"

    def r(t):
        return t.half().double() if fp16 else t.double()

    v0 = F.linear(r(learner.ctx), r(learner.proj.weight), r(learner.proj.bias))
    v0 = (v0.half() if fp16 else v0).float()
    deeper = [f(t) for f, t in zip(learner.couplings, learner.text_deep)]
    deeper = [v.half().float() if fp16 else v for v in deeper]
    img = reference_image(bb, images, v0, deeper, "none")
    txt = reference_text(bb, CLASSES, phrase, learner.ctx, list(learner.text_deep), learner.rounding)
    return img, txt, bb.logit_scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("rounding", ["fp16", "none"])
def test_maple_matches_the_reference(bb4, depth, rounding):
    learner = build(bb4, "maple", depth=depth, prompt_rounding=rounding)
    assert len(learner.couplings) == depth - 1 and learner.from_pixels
    assert_matches_reference(bb4, learner, "a photo of a", rtol=1e-4 if rounding == "fp16" else 2e-5,
                             reference=maple_reference)


def test_maple_couplings_start_equal_and_the_official_count():
    bb = tiny_backbone("ViT-B-16")
    torch.manual_seed(0)
    learner = METHODS["maple"].build(bb, CLASSES, MethodConfig("maple", parse_options("maple", METHODS["maple"].Options,
                                                                                      {}), PromptLayout(), "", ""))
    first = learner.couplings[0].weight
    assert all(torch.equal(c.weight, first) for c in learner.couplings) and len(learner.couplings) == 8
    assert not torch.equal(learner.proj.weight, first)
    assert trainable_count(learner) == 3_555_072  # J = 9 (official count)
