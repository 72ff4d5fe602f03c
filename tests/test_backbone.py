"""Backbone loading: architecture JSONs, weights files of every supported format, clear errors, frozen."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

import vlprompt as vp
from vlprompt.backbones import builtin_config_dir

TINY = "vlprompt-tiny-ViT"


def load(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vp.load_backbone(*args, **kw)


def outputs(bb):
    torch.manual_seed(123)
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    return bb.encode_images(images), bb.encode_texts(["a photo of a dog.", "itap of a cat."])


@pytest.fixture(scope="module")
def reference():
    return load(TINY, random_init_seed=7)


def test_random_init_warns_loudly_and_is_reproducible():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        a = vp.load_backbone(TINY)
    b = load(TINY)
    for x, y in zip(outputs(a), outputs(b)):
        assert torch.equal(x, y)
    assert a.source.is_random and "RANDOM" in a.source.describe()


def test_architecture_json_file(tmp_path):
    cfg = json.loads((builtin_config_dir() / f"{TINY}.json").read_text())
    cfg["text_cfg"]["layers"] = 1
    path = tmp_path / "my-arch.json"
    path.write_text(json.dumps(cfg))
    bb = load(str(path))
    assert len(bb.text.blocks) == 1 and bb.embed_dim == cfg["embed_dim"]


@pytest.mark.parametrize("fmt", ["pt", "bin", "safetensors", "openclip_ckpt", "torchscript"])
def test_weights_file_formats_load_identically(tmp_path, reference, fmt):
    sd = {k: v.clone() for k, v in reference.model.state_dict().items()}
    path = tmp_path / f"weights.{ 'pt' if fmt in ('openclip_ckpt', 'torchscript') else fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "openclip_ckpt":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, str(path))
    elif fmt == "torchscript":
        # The shape of OpenAI's released archives: a TorchScript module holding the CLIP state dict.
        images = torch.randn(1, 3, reference.image_size, reference.image_size)
        tokens = reference.tokenize(["a"])
        traced = torch.jit.trace(reference.model, (images, tokens), check_trace=False, strict=False)
        traced.save(str(path))
    else:
        torch.save(sd, str(path))
    bb = vp.load_backbone(TINY, weights=str(path))
    assert not bb.source.is_random and bb.source.weights.endswith(path.name)
    # A TorchScript archive means OpenAI weights, which come from QuickGELU models (as the tiny config).
    assert bb.source.quick_gelu and bb.activation == bb.source.activation == "quickgelu"
    for x, y in zip(outputs(bb), outputs(reference)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("quick", [True, False])
def test_activation_is_read_from_the_model_recorded_and_said(tmp_path, reference, caplog, quick):
    """A plain state dict fits a QuickGELU and a GELU architecture alike: the activation actually built is
    recorded in the source (so in describe() and every run's metrics) and said in one info line."""
    cfg = json.loads((builtin_config_dir() / f"{TINY}.json").read_text())
    cfg["quick_gelu"] = quick
    arch = tmp_path / f"tiny-{'quick' if quick else 'plain'}.json"
    arch.write_text(json.dumps(cfg))
    weights = tmp_path / "plain.pt"
    torch.save(reference.model.state_dict(), str(weights))
    caplog.set_level(logging.INFO, logger="vlprompt")
    bb = vp.load_backbone(str(arch), weights=str(weights))
    want = "quickgelu" if quick else "gelu"
    assert bb.activation == bb.source.activation == want
    assert bb.source.describe().endswith(f"activation={want}")
    said = [r.getMessage() for r in caplog.records if r.name.startswith("vlprompt") and "activation" in r.getMessage()]
    assert len(said) == 1 and f"activation {want}" in said[0] and weights.name in said[0]
    assert ("ViT-B-16-quickgelu" in said[0]) is (not quick)  # the hint for OpenAI weights, where it matters
    random = load(str(arch))  # no weights file: recorded, not said
    assert random.source.activation == want and "activation=" + want in random.source.describe()
    if not quick:  # the outputs really differ: the activation is not a label only
        assert not torch.equal(outputs(bb)[0], outputs(reference)[0])


def test_weights_that_do_not_fit_name_the_key(tmp_path, reference):
    sd = dict(reference.model.state_dict())
    sd["text_projection"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(sd, str(path))
    with pytest.raises(vp.VlpromptError, match="text_projection"):
        vp.load_backbone(TINY, weights=str(path))


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="no-such-arch"), "unknown backbone"),
    (dict(name=TINY, weights="/nonexistent/w.pt"), "weights file not found"),
    (dict(name="/nonexistent/arch.json"), "architecture file not found"),
    (dict(name=TINY, precision="fp64"), "precision"),
])
def test_bad_inputs_are_one_line_errors(kwargs, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(vp.VlpromptError, match=match) as err:
            vp.load_backbone(**kwargs)
    assert "\n" not in str(err.value)


def test_garbage_weights_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(vp.VlpromptError, match="cannot read weights file"):
        vp.load_backbone(TINY, weights=str(path))


def test_unreachable_hub_gives_offline_hint(monkeypatch):
    import open_clip

    def offline(*a, **k):
        raise RuntimeError("Failed to download weights: connection refused")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(vp.VlpromptError, match="--weights FILE"):
        vp.load_backbone("ViT-B-32", pretrained="openai")


def test_real_architectures_build_and_are_frozen():
    for name, dim in [("RN50", 1024), ("ViT-B-16", 512)]:
        bb = load(name)
        assert bb.embed_dim == dim and bb.ctx_dim == 512 and bb.context_length == 77
        assert not any(p.requires_grad for p in bb.model.parameters())
        assert not bb.model.training


def test_bf16_casts_the_frozen_weights_once():
    bb = load(TINY, precision="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bb.model.parameters())
    img, txt = outputs(bb)
    assert img.dtype == torch.float32 and txt.dtype == torch.float32


# -- TorchScript archives are read without torch.jit.load: compared with it here, key by key ----------------------

class _Block(torch.nn.Module):
    def __init__(self, width: int, bias: bool):
        super().__init__()
        self.proj = torch.nn.Linear(width, width, bias=bias)  # bias=False: a parameter slot holding None
        self.norm = torch.nn.BatchNorm1d(width)  # buffers, one of them an int64 counter
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width))
        self.register_buffer("mask", torch.triu(torch.ones(width, width)), persistent=False)  # kept by TorchScript

    def forward(self, x):
        return self.norm(self.proj(x)) * self.scale + x @ self.mask


class _Nested(torch.nn.Module):

    def __init__(self):
        super().__init__()
        self.first = _Block(4, bias=True)
        self.layers = torch.nn.ModuleList([_Block(4, bias=False), _Block(4, bias=True)])
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        self.temperature = torch.nn.Parameter(torch.tensor(2.5))
        self.constant = torch.ones(3)  # a plain tensor attribute: neither parameter nor buffer
        self.ids = [1, 2]  # a List[int] attribute: pickled through TorchScript's typed-list helpers

    def forward(self, x):
        x = self.first(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x) * self.temperature + self.constant * len(self.ids)


def _same_state_dict(path) -> None:
    from vlprompt.backbones.torchscript_reader import read_torchscript_state_dict

    reference = torch.jit.load(str(path), map_location="cpu").state_dict()
    got = read_torchscript_state_dict(path)
    assert list(got) == list(reference)
    for key, want in reference.items():
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        assert torch.equal(got[key], want), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_reader_equals_jit_load_on_nested_modules(tmp_path, how, dtype):
    torch.manual_seed(0)
    module = _Nested().eval()
    module.first.norm.running_mean.normal_()
    module.layers[1].norm.num_batches_tracked.fill_(7)
    module.to(dtype)
    other = torch.float16 if dtype == torch.float32 else torch.float32
    module.layers[0].register_buffer("stats", torch.randn(5).to(other))  # one archive holds fp16 and fp32
    example = torch.randn(2, 4, dtype=dtype)
    scripted = torch.jit.script(module) if how == "script" else torch.jit.trace(module, example, check_trace=False)
    scripted.save(str(tmp_path / "m.pt"))
    _same_state_dict(tmp_path / "m.pt")


@pytest.mark.parametrize("arch", [TINY, "vlprompt-tiny-RN"])
@pytest.mark.parametrize("how", ["script", "trace", "trace_fp16"])
def test_torchscript_reader_equals_jit_load_on_the_tiny_clips(tmp_path, arch, how):
    bb = load(arch, random_init_seed=3)
    model = bb.model
    if how == "script":
        archive = torch.jit.script(model)
    else:
        images, tokens = torch.randn(1, 3, bb.image_size, bb.image_size), bb.tokenize(["a"])
        archive = torch.jit.trace(model, (images, tokens), check_trace=False, strict=False)
        if how == "trace_fp16":
            archive = archive.half()  # OpenAI's released archives hold fp16 weights
    archive.save(str(tmp_path / "clip.pt"))
    _same_state_dict(tmp_path / "clip.pt")
