"""Compatibility with open_clip versions and library use.

- The fast paths recognise attention by its parts (packed in-projection, head count, output projection),
  not by class: a stand-in module with those parts, and open_clip's own ``Attention`` (``block_type:
  custom``), give the standard results; a block with a part missing or an extra one is refused (text) or
  runs open_clip's forward (image), with the reason named.
- Output goes through `logging` ("vlprompt"): silenced by the logger's level, received by a user's handler.
- Real-data fixtures fail instead of skipping when VLPROMPT_REQUIRE_DATA=1.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from support import tiny_backbone
from torch import nn

import vlprompt as vp
from vlprompt.backbones import Backbone, builtin_config_dir
from vlprompt.text import encode_shared_prefix, encode_truncated, reference_encode
from vlprompt.backbones.blocks import attention_parts, block_unsupported, open_clip_version
from vlprompt.utils import progress as progress_mod

TINY = "vlprompt-tiny-ViT"


# ----------------------------------------------------------------------------------------------
# Attention recognised by its parts
# ----------------------------------------------------------------------------------------------


class StandInAttention(nn.Module):
    """Not an nn.MultiheadAttention: the parts the fast paths read, and a forward of its own that open_clip's
    ResidualAttentionBlock can call (batch-first (N, L, D), additive float mask)."""

    def __init__(self, mha: nn.MultiheadAttention, heads_attr: str = "num_heads"):
        super().__init__()
        self.in_proj_weight = nn.Parameter(mha.in_proj_weight.detach().clone())
        self.in_proj_bias = nn.Parameter(mha.in_proj_bias.detach().clone())
        setattr(self, heads_attr, mha.num_heads)
        self.out_proj = copy.deepcopy(mha.out_proj)
        self.heads = mha.num_heads

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        q, k, v = F.linear(q_x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).flatten(2)), None


def towers(model):
    return {"text": model.transformer.resblocks, "image": model.visual.transformer.resblocks}


def rebuilt(bb, towers_to_swap=("text", "image"), **kw) -> Backbone:
    """A copy of ``bb`` whose chosen towers' attention modules are stand-ins holding the same weights."""
    model = copy.deepcopy(bb.model)
    for name, blocks in towers(model).items():
        if name in towers_to_swap:
            for block in blocks:
                block.attn = StandInAttention(block.attn, **kw)
    return Backbone(model, bb.tokenizer, bb.source)


@pytest.fixture(scope="module")
def ref():
    return tiny_backbone(TINY)


def prompts(bb, n_cls=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_cls, bb.context_length, bb.ctx_dim, generator=g) * 0.1
    eot = torch.tensor([3, 7, 5, 12, 9][:n_cls])
    return x, eot


def images(bb, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, bb.image_size, bb.image_size, generator=g)


def test_stand_in_attention_gives_the_standard_text_features(ref):
    alt = rebuilt(ref)
    assert not isinstance(alt.text.blocks[0].attn, nn.MultiheadAttention)
    x, eot = prompts(ref)
    with torch.no_grad():
        fast_ref, fast_alt = encode_truncated(ref, x, eot), encode_truncated(alt, x, eot)
        assert torch.equal(fast_alt, fast_ref)  # the same tensors through the same computation
        prefix, suffix = x[0, :3], x[:, 3:]  # one prefix for all: exact for the first prompt only, enough here
        lens = eot - 2  # each suffix up to and including its EOT
        assert torch.equal(encode_shared_prefix(alt, prefix, suffix, lens),
                           encode_shared_prefix(ref, prefix, suffix, lens))
        oc = reference_encode(alt, x, eot)  # open_clip's own block forward, calling the stand-in's forward
    assert (fast_alt - oc).abs().max().item() <= 1e-6 * max(1.0, oc.abs().max().item())


def test_stand_in_attention_keeps_the_image_shortcut(ref):
    alt = rebuilt(ref)
    assert alt.fast_image_unsupported is None and alt.image_encoder_id == ref.image_encoder_id != "open_clip"
    x = images(ref)
    got = alt.encode_images(x)
    assert torch.equal(got, ref.encode_images(x))
    with torch.inference_mode():
        oc = alt.model.encode_image(x).float()
    assert (got - oc).abs().max().item() <= 1e-6 * max(1.0, oc.abs().max().item())


def custom_arch(tmp_path, text: dict | None = None, vision: dict | None = None) -> str:
    """The tiny architecture with open_clip's own Attention module (block_type 'custom') in both towers."""
    cfg = json.loads((builtin_config_dir() / f"{TINY}.json").read_text())
    cfg["text_cfg"].update({"block_type": "custom", **(text or {})})
    cfg["vision_cfg"].update({"block_type": "custom", **(vision or {})})
    path = tmp_path / f"custom-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_open_clips_own_attention_module_is_accepted(ref, tmp_path):
    """open_clip's `Attention` (not nn.MultiheadAttention), loaded with the standard model's weights, gives
    the standard features on both fast paths."""
    from open_clip.transformer import Attention

    weights = tmp_path / "w.pt"
    torch.save(ref.model.state_dict(), str(weights))
    bb = vp.load_backbone(custom_arch(tmp_path), weights=str(weights))
    assert type(bb.text.blocks[0].attn) is Attention and type(bb.model.visual.transformer.resblocks[0].attn) is Attention
    assert bb.fast_image_unsupported is None
    x, eot = prompts(ref)
    with torch.no_grad():
        assert torch.equal(encode_truncated(bb, x, eot), encode_truncated(ref, x, eot))
        oc = reference_encode(bb, x, eot)
    assert (encode_truncated(bb, x, eot) - oc).abs().max() <= 1e-6 * max(1.0, oc.abs().max().item())
    xi = images(ref)
    assert torch.equal(bb.encode_images(xi), ref.encode_images(xi))


def test_text_block_with_a_missing_part_is_refused_by_name(ref):
    with pytest.raises(vp.VlpromptError) as err:
        rebuilt(ref, towers_to_swap=("text",), heads_attr="n_heads")  # num_heads is missing
    msg = str(err.value)
    assert "\n" not in msg
    assert f"open_clip {open_clip_version()}" in msg and "text block 0" in msg and "num_heads" in msg
    assert "StandInAttention" in msg


def test_text_attention_with_an_extra_part_is_refused_by_name(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(vp.VlpromptError, match=rf"text block 0 .*open_clip {open_clip_version()}.*has ln_q, ln_k, ") as err:
            vp.load_backbone(custom_arch(tmp_path, text={"qk_norm": True}))
    assert "\n" not in str(err.value)


def test_image_block_with_a_missing_part_falls_back_to_open_clip(ref):
    alt = rebuilt(ref, towers_to_swap=("image",), heads_attr="n_heads")
    why = alt.fast_image_unsupported
    assert why and f"open_clip {open_clip_version()}" in why and "num_heads" in why and "image block 0" in why
    assert alt.image_encoder_id == "open_clip"
    x = images(ref)
    with torch.inference_mode():
        assert torch.equal(alt.encode_images(x), alt.model.encode_image(x).float())


def test_image_attention_with_an_extra_part_falls_back_to_open_clip(tmp_path):
    bb = tiny_backbone(custom_arch(tmp_path, vision={"qk_norm": True}))
    assert "ln_q" in bb.fast_image_unsupported and bb.image_encoder_id == "open_clip"
    x = images(bb)
    with torch.inference_mode():
        assert torch.equal(bb.encode_images(x), bb.model.encode_image(x).float())


def test_missing_private_open_clip_helper_falls_back(ref, monkeypatch):
    from open_clip.transformer import VisionTransformer

    from vlprompt.backbones.vit import fast_image_unsupported

    monkeypatch.delattr(VisionTransformer, "_embeds")
    why = fast_image_unsupported(ref.model.visual)
    assert why == f"open_clip {open_clip_version()}: VisionTransformer has no _embeds"


def test_block_checks_name_each_problem(ref):
    block = copy.deepcopy(ref.text.blocks[0])
    assert block_unsupported(block) is None
    assert attention_parts(block).heads == block.attn.num_heads
    del block.ls_1
    assert block_unsupported(block) == "it has no ls_1"
    block = copy.deepcopy(ref.text.blocks[0])
    block.extra_norm = nn.LayerNorm(ref.ctx_dim)
    assert "extra_norm" in block_unsupported(block)
    block = copy.deepcopy(ref.text.blocks[0])
    block.attn = nn.MultiheadAttention(ref.ctx_dim, 4, add_bias_kv=True)
    assert "bias_k" in block_unsupported(block)
    block.attn = nn.MultiheadAttention(ref.ctx_dim, 4, kdim=8, vdim=8)
    assert "in_proj_weight" in block_unsupported(block)
    with pytest.raises(vp.VlpromptError, match="in_proj_weight"):
        attention_parts(block)


# ----------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def vlprompt_logger(monkeypatch):
    """The "vlprompt" logger as a library user finds it: at INFO with only the default handler (a CLI
    handler that a test of the command line may have left is taken off); restored afterwards."""
    log = logging.getLogger("vlprompt")
    monkeypatch.setattr(log, "handlers", [progress_mod.DEFAULT_HANDLER])
    old = log.level
    log.setLevel(logging.INFO)  # setLevel, not an attribute: it also clears logging's level cache
    yield log
    log.setLevel(old)


@contextlib.contextmanager
def bare_root_logger():
    """No handler on the root logger, as in a plain script: pytest's own capture handlers (installed for
    each test phase) would otherwise make the default handler step aside."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = []
    try:
        yield root
    finally:
        root.handlers[:] = saved


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from vlprompt.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(str(tmp_path_factory.mktemp("shapes")), n_train_per_class=2,
                                  n_test_per_class=3, seed=0)


def zeroshot(shapes, out, ref):
    cfg = vp.RunConfig(dataset=shapes, backbone=TINY, pretrained="random", method="zeroshot", output=str(out),
                       progress=True)
    return vp.run(cfg, backbone=ref)


def test_library_progress_shows_by_default_and_the_logger_level_silences_it(shapes, ref, tmp_path, capfd,
                                                                             vlprompt_logger):
    with bare_root_logger():
        metrics = zeroshot(shapes, tmp_path / "a", ref)
        err = capfd.readouterr().err
        assert "zeroshot on" in err and "top-1" in err  # shown with no logging set-up at all
        vlprompt_logger.setLevel(logging.WARNING)
        zeroshot(shapes, tmp_path / "b", ref)
        captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert metrics["backbone"]["source"].endswith("activation=quickgelu")  # the run records the activation


def test_a_users_handler_receives_the_messages_instead(shapes, ref, tmp_path, capfd, vlprompt_logger):
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.levelno, record.getMessage()))

    vlprompt_logger.addHandler(Collect())
    with bare_root_logger():
        zeroshot(shapes, tmp_path / "c", ref)
    assert any(name.startswith("vlprompt") and level == logging.INFO and "top-1" in msg
               for name, level, msg in seen)
    assert capfd.readouterr().err == ""  # the default handler steps aside: nothing printed twice


def test_root_logging_configuration_takes_over(shapes, ref, tmp_path, capfd, vlprompt_logger):
    handler = logging.StreamHandler()  # stderr as captured now
    handler.setFormatter(logging.Formatter("ROOT %(name)s %(message)s"))
    with bare_root_logger() as root:
        root.addHandler(handler)  # what logging.basicConfig() does
        zeroshot(shapes, tmp_path / "d", ref)
    lines = [line for line in capfd.readouterr().err.splitlines() if "top-1" in line]
    assert len(lines) == 1 and lines[0].startswith("ROOT vlprompt")


def test_cli_logging_is_bare_messages_on_stderr_and_idempotent(capsys, vlprompt_logger):
    first = progress_mod.configure_cli_logging()
    assert progress_mod.configure_cli_logging() is first
    progress_mod.say("hello from the cli")
    progress_mod.Progress("step", 2, every_s=0.0).update(2)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "hello from the cli" and err[1].startswith("step: 2/2 (100%)")
    progress_mod.configure_cli_logging(quiet=True)
    progress_mod.say("not shown")
    logging.getLogger("vlprompt.x").warning("a warning")
    assert capsys.readouterr().err == "a warning\n"


# ----------------------------------------------------------------------------------------------
# Required real data
# ----------------------------------------------------------------------------------------------


def test_missing_real_data_fails_when_required(monkeypatch, tmp_path):
    import conftest

    monkeypatch.setenv("VLPROMPT_DATA", str(tmp_path / "nothing-here"))
    monkeypatch.delenv("VLPROMPT_REQUIRE_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception):
        conftest._real_subdir("cifar10")
    monkeypatch.setenv("VLPROMPT_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="VLPROMPT_REQUIRE_DATA=1"):
        conftest._real_subdir("cifar10")
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(pytest.fail.Exception, match="cifar10"):
        conftest._real_subdir("cifar10")
