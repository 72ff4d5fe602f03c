"""The GPU path's logic, tested on the CPU (no test needs a GPU): fp16 is refused on a CPU in one line wherever a
run or a backbone is asked for; the float16 towers themselves (built through the Backbone class, which does not
police devices) give the fp32 towers' features to float16 accuracy, and prompts trained through them stay float32
master weights with float32 gradients and learn; image-loading workers and pinned memory follow the device; the
thread budget of a worker caps a run's threads."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from support import TINY_OPTIONS, TINY_VIT, tiny_backbone

import vlprompt as vp
from vlprompt.backbones.backbone import Backbone
from vlprompt.cli import main
from vlprompt.errors import VlpromptError
from vlprompt.methods import get_method
from vlprompt.methods.base import MethodConfig, PromptLayout, parse_options

NAMES = ["face", "leopard", "motorbike", "accordion", "water lily"]
REFUSED = "precision fp16 runs on a GPU (--device cuda): float16 on a CPU is about 100x slower than float32"


@pytest.fixture(scope="module")
def pair():
    """The tiny backbone in fp32, and the same weights with the frozen encoders in float16."""
    bb = tiny_backbone()
    return bb, Backbone(copy.deepcopy(bb.model).float(), bb.tokenizer, bb.source, precision="fp16")


def test_fp16_on_a_cpu_is_one_line_wherever_it_is_asked_for(tmp_path, capsys):
    with pytest.raises(VlpromptError, match=re.escape(REFUSED)):
        vp.RunConfig(precision="fp16")
    with pytest.raises(VlpromptError, match=re.escape(REFUSED)):
        vp.load_backbone(TINY_VIT, precision="fp16")
    assert main(["train", "--dataset", str(tmp_path), "--backbone", TINY_VIT, "--pretrained", "random",
                 "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert REFUSED in err and len(err.splitlines()) == 1
    vp.RunConfig(precision="bf16")  # the CPU's reduced precision is accepted


def test_float16_towers_give_the_fp32_features_to_half_precision(pair):
    bb, half = pair
    assert half.dtype == torch.float16 and next(half.model.parameters()).dtype == torch.float16
    images = torch.randn(4, 3, bb.image_size, bb.image_size)
    full, low = bb.encode_images(images), half.encode_images(images)
    assert low.dtype == torch.float32  # features leave the tower in float32
    assert F.cosine_similarity(full, low).min() > 0.999
    assert (full - low).norm() / full.norm() < 5e-3
    torch.manual_seed(0)
    a = vp.CoOp(bb, NAMES, n_ctx=4)
    torch.manual_seed(0)
    b = vp.CoOp(half, NAMES, n_ctx=4)
    assert torch.equal(a.ctx, b.ctx) and b.ctx.dtype == torch.float32
    ta, tb = a.text_features(), b.text_features()
    assert tb.dtype == torch.float32 and F.cosine_similarity(ta, tb).min() > 0.999


def test_prompts_through_float16_towers_are_float32_master_weights_that_learn(pair):
    _, half = pair
    torch.manual_seed(0)
    learner = vp.CoOp(half, NAMES, n_ctx=4)
    feats = F.normalize(torch.randn(20, half.embed_dim), dim=-1)
    labels = torch.arange(20) % len(NAMES)
    opt = torch.optim.SGD([learner.ctx], lr=0.5)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(learner(feats), labels)
        opt.zero_grad()
        loss.backward()
        assert learner.ctx.grad.dtype == torch.float32 and torch.isfinite(learner.ctx.grad).all()
        opt.step()
        losses.append(loss.item())
    assert learner.ctx.dtype == torch.float32
    assert losses[-1] < 0.7 * losses[0]


def test_deep_prompts_through_float16_towers_get_float32_gradients(pair):
    _, half = pair
    method = get_method("ivlp")
    options = parse_options("ivlp", method.Options, TINY_OPTIONS["ivlp"])
    torch.manual_seed(0)
    learner = method.create(half, NAMES, MethodConfig("ivlp", options, PromptLayout(n_ctx=2), "a photo of a {}.",
                                                      ""))
    images = torch.randn(3, 3, half.image_size, half.image_size)
    loss = F.cross_entropy(learner(images), torch.tensor([0, 1, 2]))
    loss.backward()
    params = [p for p in learner.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)


def test_image_loading_follows_the_device():
    import os

    from vlprompt.engine.features import make_loader
    from vlprompt.utils.hardware import loader_workers

    assert loader_workers(None, "cpu") == 0 and loader_workers(3, "cpu") == 3
    assert loader_workers(None, "cuda") == max(0, min(8, (os.cpu_count() or 1) - 1))
    assert loader_workers(0, "cuda:1") == 0  # asked for: kept
    on_gpu = make_loader([], None, 8, None, device=torch.device("cuda"))
    on_cpu = make_loader([], None, 8, None)
    assert on_gpu.pin_memory and not on_cpu.pin_memory and on_cpu.num_workers == 0


def test_a_workers_thread_budget_caps_its_runs():
    from vlprompt.utils import threads

    try:
        threads.set_thread_budget(1)
        capped = threads.choose_threads(None, 512)
        assert capped.threads == 1 and "capped at this worker's budget of 1" in capped.reason
        small = threads.choose_threads(None, 64)  # one thread anyway: no cap to mention
        assert small.threads == 1 and "capped" not in small.reason
        threads.set_thread_budget(4)
        assert threads.choose_threads("2", 512).threads == 2
        assert threads.choose_threads("8", 512).threads == 4
    finally:
        threads.set_thread_budget(None)
    assert threads.choose_threads("8", 512).threads == 8
