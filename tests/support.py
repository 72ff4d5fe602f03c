"""Helpers shared by the model-side tests: tiny random backbones and a generated dataset."""

from __future__ import annotations

import math
import warnings

import torch

import vlprompt as vp

TINY_VIT = "vlprompt-tiny-ViT"


def tiny_backbone(arch: str = TINY_VIT, **kw):
    """A small randomly initialised CLIP of the real architecture (warning silenced: it is intended)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vp.load_backbone(arch, **kw)


# The deep-prompt methods' recipes prompt 12 blocks; the tiny towers have 2.
TINY_OPTIONS = {"ivlp": {"depth_text": 2, "depth_vision": 2}, "vpt_deep": {"depth_vision": 2},
                "deep_language": {"depth_text": 2}, "maple": {"depth": 2},
                "promptsrc": {"depth_text": 2, "depth_vision": 2}, "tcp": {"class_layer": 1}}


def write_old_prompt(learner, out, version: int = 2, drop=()):
    """``learner`` saved as vlprompt wrote prompts before format 3 (``version`` 2: its settings as top-level fields,
    its tensors under names of their own; 1: also without ``type``, ``learner``, ``format_version`` and
    ``vlprompt_version``), as the old ``config()`` / ``save_pretrained`` of each learner class did. ``drop``: fields
    left out (e.g. ``ctx_init_rule``, which older prompts did not record)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    bb, kind = learner.backbone, type(learner).__name__
    src = bb.source
    cfg = {"type": learner.method, "learner": kind, "format_version": 2, "vlprompt_version": vp.__version__,
           "method": learner.method, "classnames": list(learner.classnames),
           "backbone": {"name": src.name, "pretrained": src.pretrained, "weights": src.weights,
                        "random_init_seed": src.random_init_seed, "quick_gelu": src.quick_gelu,
                        "activation": src.activation, "fingerprint": bb.fingerprint}}
    if kind in ("CoOp", "GuidedCoOp", "CoCoOp"):
        cfg.update(n_ctx=learner.n_ctx, ctx_init=learner.ctx_init, csc=learner.csc,
                   class_token_position=learner.class_token_position, ctx_init_rule=learner.ctx_init_rule,
                   ctx_dim=bb.ctx_dim)
        tensors = {"ctx": learner.ctx}
        if kind == "GuidedCoOp":
            cfg.update(templates=learner.templates, ensemble_hand=learner.ensemble_hand, hand_view=learner.hand_view)
        if kind == "CoCoOp":
            cfg.update(vis_dim=bb.embed_dim, meta_hidden=learner.meta_net[0].out_features)
            tensors.update({f"meta_net.{k}": v for k, v in learner.meta_net.state_dict().items()})
    elif kind == "ClipAdapter":
        cfg.update(templates=learner.templates, reduction=learner.reduction, ratio=learner.ratio,
                   embed_dim=bb.embed_dim)
        tensors = {"down": learner.down.weight, "up": learner.up.weight}
    elif kind == "LinearProbe":
        cfg.update(c=learner.c, embed_dim=bb.embed_dim)
        tensors = {"weight": learner.weight, "bias": learner.bias}
    elif kind == "TipAdapter":
        cfg.update(alpha=learner.alpha, beta=learner.beta, templates=learner.templates)
        tensors = {"keys": learner.keys, "values": learner.values}
    elif kind == "DeepPrompts":  # format 2 already saved the options and the state_dict()
        import dataclasses

        cfg.update(options=dataclasses.asdict(learner.options), ctx_dim=bb.ctx_dim)
        tensors = dict(learner.state_dict())
    else:
        raise ValueError(kind)
    if version == 1:
        for key in ("type", "learner", "format_version", "vlprompt_version"):
            cfg.pop(key)
    for key in drop:
        cfg.pop(key)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(out / "prompt.safetensors"))
    (out / "prompt_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def study_outcomes(study) -> dict:
    """Per run folder of a study: its test result, its trained tensors, its key, how it ran."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for metrics_file in sorted((Path(study) / "runs").rglob("metrics.json")):
        m = json.loads(metrics_file.read_text())
        prompt = metrics_file.parent / "prompt" / "prompt.safetensors"
        tensors = {k: v.tolist() for k, v in load_file(str(prompt)).items()} if prompt.is_file() else {}
        out[str(metrics_file.parent.relative_to(study))] = (m["test"], tensors, m["config_key"], m["execution"])
    return out


# Families whose text towers fit the causal path, shrunk for tests: the family's own open_clip configuration with a
# 2-block text tower and the smallest image tower of the same timm family (EVA02: the tiny EVA02 with rotary
# positions; PE-Core: the tiny PE-Core at 384 px with its attention-pool head; MobileCLIP-B: the MCi0 FastViT of
# MobileCLIP's small models); MetaCLIP is open_clip's QuickGELU ViT.
FAMILIES = {
    "EVA02-B-16": {"timm_model_name": "eva02_tiny_patch14_224"},
    "PE-Core-B-16": {"timm_model_name": "vit_pe_core_tiny_patch16_384", "image_size": 384},
    "MobileCLIP-B": {"timm_model_name": "fastvit_mci0", "timm_pool": "avg", "image_size": 256},
    "ViT-B-16-quickgelu": {"layers": 2, "width": 64, "head_width": 32},  # MetaCLIP's architecture
}


def family_arch(folder, family: str) -> str:
    """An architecture JSON of ``family`` shrunk as `FAMILIES` says; its path."""
    import copy
    import json
    from pathlib import Path

    import open_clip

    cfg = copy.deepcopy(open_clip.get_model_config(family))
    cfg["text_cfg"].update(layers=2, width=64, heads=2)
    cfg["vision_cfg"].update(FAMILIES[family])
    cfg["embed_dim"] = 32
    path = Path(folder) / f"{family}-small.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def start_study_to_kill(args: list, out):
    """Start ``vlprompt`` with ``args`` (a study writing to ``out``) in a subprocess and return it with the study's
    units as soon as one unit is done and another running (the moment to kill the driver)."""
    import json
    import subprocess
    import sys
    import time

    driver = subprocess.Popen([sys.executable, "-m", "vlprompt.cli", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    units, deadline = [], time.time() + 240
    while time.time() < deadline and driver.poll() is None:
        try:
            units = json.loads((out / "index.json").read_text())["units"]
        except (OSError, ValueError):
            units = []
        if any(u["state"] == "done" for u in units) and any(u["state"] == "running" for u in units):
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the study ended before it could be killed"
    return driver, units


def alive(pid) -> bool:
    """A process that exists and is not a zombie (one left for a reaper that may never come in a container)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# A SigLIP text tower for tests: its tokenizer needs a hub, so a small one of the same kind is built here.
SIGLIP_WORDS = "a photo of the face water lily stop sign motorbike x black cross white circle square triangle".split()


def build_tokenizer(folder) -> str:
    """A Unigram tokenizer of sentencepiece's kind with T5's special ids (pad 0, eos 1 appended, unk 2), saved as a
    local Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in SIGLIP_WORDS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return str(folder)


def siglip_arch(folder, base: str = "ViT-B-16-SigLIP") -> str:
    """``base``'s configuration (ViT-B-16-SigLIP, ViT-B-16-SigLIP2) with a 2-block text tower, the local tokenizer
    (`build_tokenizer`) and a small ViT image tower, as an architecture file in ``folder``; its path."""
    import copy
    import json
    from pathlib import Path

    import open_clip

    folder = Path(folder)
    cfg = copy.deepcopy(open_clip.get_model_config(base))
    cfg["text_cfg"].update(layers=2, width=64, heads=2, vocab_size=3 + len(SIGLIP_WORDS),
                           hf_tokenizer_name=build_tokenizer(folder / "tokenizer"))
    cfg["vision_cfg"] = {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32}
    cfg["embed_dim"] = 32
    # open_clip_config.json's layout, with the preprocessing of SigLIP's webli tag (squash, mean and std 0.5)
    tag = open_clip.get_pretrained_cfg(base, "webli")
    pre = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode")}
    path = folder / "siglip-small.json"
    path.write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    return str(path)


class SplitLoRA:
    """One tower's updates as the official code builds them: per block and projection a frozen linear (rows of the
    packed weight), its own factors and its own dropout module."""

    def __init__(self, lora, width: int, dropout: float):
        self.lora, self.width = lora, width
        self.drop = {p: torch.nn.Dropout(dropout) for p in "qkv"}

    def project(self, block_index: int, block, h, train: bool):
        """q, k, v of the block's normalised input ``h`` (any layout, features last)."""
        w, b, d = block.attn.in_proj_weight, block.attn.in_proj_bias, self.width
        out = {}
        for slot, p in enumerate("qkv"):  # the official q_proj, k_proj, v_proj, called in this order
            y = h @ w[slot * d:(slot + 1) * d].T + b[slot * d:(slot + 1) * d]
            if self.lora is not None and block_index in self.lora.blocks:
                j = self.lora.blocks.index(block_index)
                drop = self.drop[p].train(train)
                y = y + self.lora.scale * (drop(h) @ self.lora.a[j, slot].T) @ self.lora.b[j, slot].T
            out[p] = y
        return out["q"], out["k"], out["v"]


def split_attention(block, q, k, v, mask=None):
    """(..., L, D) q, k, v -> heads -> explicit softmax(q k^T / sqrt(hd) + mask) v -> merged -> out_proj."""
    heads = block.attn.num_heads
    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(-2, -3)
    qh, kh, vh = split(q), split(k), split(v)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(dim=-1) @ vh).transpose(-2, -3).flatten(-2)
    return block.attn.out_proj(out)
