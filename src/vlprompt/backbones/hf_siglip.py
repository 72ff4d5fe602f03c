"""Hugging Face ``transformers`` SigLIP checkpoints (a ``SiglipModel`` folder: ``config.json`` + ``model.safetensors``
and the tokenizer's files) as vlprompt backbones, read as `hf_clip` reads CLIP folders: JSON and safetensors only,
rewritten once into open_clip's SigLIP layout, so the same paths compute with them as with open_clip's own SigLIP
(`hf_checkpoint.load_hf_checkpoint` reads either kind of folder).

- Text: open_clip's bidirectional text transformer (no mask, pooled at the last position, a linear head with bias),
  each block's q, k and v projections packed into the fused input projection; ``hidden_act`` decides the GELU
  (``gelu_pytorch_tanh``, SigLIP's: the tanh approximation; ``gelu``: exact).
- Image: timm's SigLIP ViT (no class token, attention-pool "map" head), as open_clip's SigLIP architectures build
  it, sized from the configuration; ``transformers``' pooling head (a probe attending to the tokens through one
  multi-head attention) maps onto timm's latent query, key-value and output projections.
- Logit scale and bias from the checkpoint. The tokenizer is the folder's own (``transformers`` needed), padded to
  the context length and cleaned as open_clip cleans SigLIP's (canonicalised: lower case, no punctuation).
- Preprocessing from ``preprocessor_config.json``: SigLIP's processor resizes to the square (squash), no crop.

SigLIP 2 (``Siglip2Model``, variable-resolution patches) is refused in one line: open_clip's SigLIP 2 architectures
load instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VlpromptError
from .hf_clip import pack_block, positive_int, processor_values, tower_configs
from .preprocess import Preprocess

TIMM_SIGLIP = "vit_base_patch16_siglip_224"  # the timm family open_clip builds SigLIP image towers from
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}  # transformers' names -> timm's


def siglip_config(folder: Path, config: dict) -> dict:
    """open_clip's configuration of a ``transformers`` SiglipModel configuration (one line for a bad field), with
    ``vision`` (timm's keyword arguments for the image trunk) and ``quick_gelu`` (False) beside it."""
    text, vision = tower_configs(folder, config)
    for part, name in ((text, "text_config"), (vision, "vision_config")):
        act = part.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ACTIVATIONS:
            raise VlpromptError(f"Hugging Face checkpoint {folder}: {name}.hidden_act {act!r} is not one of "
                                f"{sorted(ACTIVATIONS)}")
        eps = part.get("layer_norm_eps", 1e-6)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise VlpromptError(f"Hugging Face checkpoint {folder}: {name}.layer_norm_eps must be a small positive "
                                f"number, got {eps!r}")
    if vision.get("vision_use_head", True) is not True:
        raise VlpromptError(f"Hugging Face checkpoint {folder}: vision_config.vision_use_head is false (an image tower "
                            "without its pooling head gives no image feature)")

    def num(part, key, default, name):
        return positive_int(folder, part, key, default, name)

    t_width = num(text, "hidden_size", 768, "text_config")
    v_width = num(vision, "hidden_size", 768, "vision_config")
    embed = num(text, "projection_size", t_width, "text_config")
    if embed != v_width:
        raise VlpromptError(f"Hugging Face checkpoint {folder}: text features of {embed} and image features of "
                            f"{v_width} dimensions (text_config.projection_size must equal vision_config.hidden_size)")
    heads = num(vision, "num_attention_heads", 12, "vision_config")
    if v_width % heads:
        raise VlpromptError(f"Hugging Face checkpoint {folder}: vision_config.num_attention_heads {heads} does not "
                            f"divide its hidden_size {v_width}")
    size = num(vision, "image_size", 224, "vision_config")
    patch = num(vision, "patch_size", 16, "vision_config")
    text_act = text.get("hidden_act", "gelu_pytorch_tanh")
    return {
        "embed_dim": embed, "init_logit_bias": -10.0, "custom_text": True, "quick_gelu": False,
        "vision_cfg": {"image_size": size, "timm_model_name": TIMM_SIGLIP, "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": num(text, "max_position_embeddings", 64, "text_config"),
                     "vocab_size": num(text, "vocab_size", 32000, "text_config"), "width": t_width,
                     "heads": num(text, "num_attention_heads", 12, "text_config"),
                     "layers": num(text, "num_hidden_layers", 12, "text_config"),
                     "mlp_ratio": num(text, "intermediate_size", 3072, "text_config") / t_width,
                     "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                     "norm_kwargs": {"eps": float(text.get("layer_norm_eps", 1e-6))},
                     **({"act_kwargs": {"approximate": "tanh"}} if text_act == "gelu_pytorch_tanh" else {}),
                     "hf_tokenizer_name": str(folder), "tokenizer_kwargs": {"clean": "canonicalize"}},
        "vision": {"img_size": size, "patch_size": patch, "embed_dim": v_width,
                   "depth": num(vision, "num_hidden_layers", 12, "vision_config"), "num_heads": heads,
                   "mlp_ratio": num(vision, "intermediate_size", 3072, "vision_config") / v_width,
                   "act_layer": ACTIVATIONS[vision.get("hidden_act", "gelu_pytorch_tanh")],
                   "norm_layer": None, "norm_eps": float(vision.get("layer_norm_eps", 1e-6)),
                   "in_chans": num(vision, "num_channels", 3, "vision_config")},
    }


def _pairs(sd: dict, out: dict, pairs: dict) -> None:
    for a, b in pairs.items():
        for leaf in ("weight", "bias"):
            out[f"{b}.{leaf}"] = sd.pop(f"{a}.{leaf}")


def siglip_state_dict(sd: dict, cfg: dict) -> dict:
    """A ``transformers`` SiglipModel state dict rewritten as open_clip's SigLIP with a timm trunk (every tensor used
    once; KeyError names one that is missing)."""
    sd = dict(sd)
    for key in ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"):
        sd.pop(key, None)
    t, v, trunk = "text_model", "vision_model", "visual.trunk"
    out = {"logit_scale": sd.pop("logit_scale").reshape(()), "logit_bias": sd.pop("logit_bias").reshape(()),
           "text.token_embedding.weight": sd.pop(f"{t}.embeddings.token_embedding.weight"),
           "text.positional_embedding": sd.pop(f"{t}.embeddings.position_embedding.weight"),
           f"{trunk}.pos_embed": sd.pop(f"{v}.embeddings.position_embedding.weight").unsqueeze(0),
           f"{trunk}.attn_pool.latent": sd.pop(f"{v}.head.probe")}
    _pairs(sd, out, {f"{t}.final_layer_norm": "text.ln_final", f"{t}.head": "text.text_projection",
                     f"{v}.embeddings.patch_embedding": f"{trunk}.patch_embed.proj",
                     f"{v}.post_layernorm": f"{trunk}.norm", f"{v}.head.attention.out_proj": f"{trunk}.attn_pool.proj",
                     f"{v}.head.layernorm": f"{trunk}.attn_pool.norm", f"{v}.head.mlp.fc1": f"{trunk}.attn_pool.mlp.fc1",
                     f"{v}.head.mlp.fc2": f"{trunk}.attn_pool.mlp.fc2"})
    width = cfg["vision"]["embed_dim"]
    w, b = sd.pop(f"{v}.head.attention.in_proj_weight"), sd.pop(f"{v}.head.attention.in_proj_bias")
    out.update({f"{trunk}.attn_pool.q.weight": w[:width], f"{trunk}.attn_pool.q.bias": b[:width],
                f"{trunk}.attn_pool.kv.weight": w[width:], f"{trunk}.attn_pool.kv.bias": b[width:]})
    for i in range(cfg["text_cfg"]["layers"]):
        pack_block(sd, f"{t}.encoder.layers.{i}", f"text.transformer.resblocks.{i}", out)
    for i in range(cfg["vision"]["depth"]):  # timm's block: norm1, attn.qkv (packed), attn.proj, norm2, mlp.fc1/fc2
        block = {}
        pack_block(sd, f"{v}.encoder.layers.{i}", "b", block)
        names = {"b.attn.in_proj_weight": "attn.qkv.weight", "b.attn.in_proj_bias": "attn.qkv.bias",
                 "b.attn.out_proj.weight": "attn.proj.weight", "b.attn.out_proj.bias": "attn.proj.bias",
                 "b.ln_1.weight": "norm1.weight", "b.ln_1.bias": "norm1.bias", "b.ln_2.weight": "norm2.weight",
                 "b.ln_2.bias": "norm2.bias", "b.mlp.c_fc.weight": "mlp.fc1.weight", "b.mlp.c_fc.bias": "mlp.fc1.bias",
                 "b.mlp.c_proj.weight": "mlp.fc2.weight", "b.mlp.c_proj.bias": "mlp.fc2.bias"}
        out.update({f"{trunk}.blocks.{i}.{names[k]}": value for k, value in block.items()})
    if sd:
        raise KeyError(f"unexpected {sorted(sd)[:3]}")
    return out


def build_siglip(cfg: dict) -> torch.nn.Module:
    """open_clip's SigLIP model of ``cfg`` with its image trunk sized from the checkpoint (open_clip builds timm's
    base size; the trunk is rebuilt with the checkpoint's sizes and activation)."""
    from functools import partial

    import open_clip
    import timm

    model_cfg = {k: v for k, v in cfg.items() if k not in ("vision", "quick_gelu", "custom_text")}
    model = open_clip.CustomTextCLIP(**model_cfg)
    vision = dict(cfg["vision"])
    eps = vision.pop("norm_eps")
    vision["norm_layer"] = partial(torch.nn.LayerNorm, eps=eps)
    model.visual.trunk = timm.create_model(TIMM_SIGLIP, pretrained=False, num_classes=0, global_pool="map",
                                           class_token=False, **vision)
    return model


def siglip_preprocess(folder: Path, size: int) -> Preprocess:
    """SigLIP's image processor: resized to the square (squash) with its resampling, its mean and std (0.5 each when
    the folder has no ``preprocessor_config.json``)."""
    values = processor_values(folder, default_mean=(0.5, 0.5, 0.5), default_std=(0.5, 0.5, 0.5), default_resample=3)
    if values is None:
        return Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic",
                          resize_mode="squash", source=f"SigLIP's defaults ({folder.name} has no "
                          "preprocessor_config.json)")
    mean, std, interpolation = values
    return Preprocess(size=size, mean=mean, std=std, interpolation=interpolation, resize_mode="squash",
                      source=f"processor config of {folder.name}")
