"""The class-token ViT shortcut equals open_clip's own image forward; other towers fall back to it."""

from __future__ import annotations

import json

import pytest
import torch
from support import tiny_backbone

from vlprompt.backbones import builtin_config_dir
from vlprompt.backbones.vit import encode_vit_cls, fast_image_unsupported


def images(bb, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, bb.image_size, bb.image_size, generator=g)


def assert_close_to_open_clip(bb, x: torch.Tensor, rtol: float) -> None:
    with torch.inference_mode():
        ref = bb.model.encode_image(x.to(bb.dtype)).float()
    got = bb.encode_images(x)
    err = (got - ref).abs().max() / ref.abs().max()
    assert err <= rtol, f"relative max error {err:.2e}"


@pytest.mark.parametrize("arch", ["vlprompt-tiny-ViT", "ViT-B-16"])
def test_vit_shortcut_matches_open_clip(arch):
    bb = tiny_backbone(arch)
    assert fast_image_unsupported(bb.model.visual) is None
    assert bb.image_encoder_id != "open_clip"
    assert_close_to_open_clip(bb, images(bb, 3), rtol=1e-5)


def test_vit_shortcut_bf16_stays_close():
    bb = tiny_backbone(precision="bf16")
    assert_close_to_open_clip(bb, images(bb, 4), rtol=3e-2)


def test_resnet_tower_uses_open_clips_forward():
    bb = tiny_backbone("vlprompt-tiny-RN")
    assert "ModifiedResNet" in fast_image_unsupported(bb.model.visual)
    assert bb.image_encoder_id == "open_clip"
    x = images(bb, 2)
    with torch.inference_mode():
        ref = bb.model.encode_image(x).float()
    assert torch.equal(bb.encode_images(x), ref)


def test_average_pooled_vit_falls_back(tmp_path):
    cfg = json.loads((builtin_config_dir() / "vlprompt-tiny-ViT.json").read_text())
    cfg["vision_cfg"]["pool_type"] = "avg"
    path = tmp_path / "avgpool-vit.json"
    path.write_text(json.dumps(cfg))
    bb = tiny_backbone(str(path))
    assert "avg" in fast_image_unsupported(bb.model.visual)
    x = images(bb, 2)
    with torch.inference_mode():
        ref = bb.model.encode_image(x).float()
    assert torch.equal(bb.encode_images(x), ref)


def test_direct_call_equals_visual_forward():
    bb = tiny_backbone()
    x = images(bb, 2, seed=3)
    with torch.inference_mode():
        ref = bb.model.visual(x)
        got = encode_vit_cls(bb.model.visual, x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_bf16_per_image_attention_equals_float32_attention():
    """The bf16 CPU attention (per image, float32 softmax) against fp32 attention on the same inputs:
    only bf16 rounding of the probabilities and the output may differ."""
    from vlprompt.backbones.vit import _attend_per_image

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 10, 16, generator=g).bfloat16() for _ in range(3))
    got = _attend_per_image(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert got.dtype == torch.bfloat16 and got.shape == (3, 10, 64)
    assert (got.float() - ref.transpose(1, 2).flatten(2)).abs().max() <= 2e-2
