"""Hugging Face ``transformers`` CLIP checkpoints (a ``CLIPModel`` folder: ``config.json`` + ``model.safetensors``) as
vlprompt backbones, without ``transformers``: the folder's configuration is read as JSON, its tensors with
safetensors, and both are rewritten once into the open_clip model every fast path works with (the separate q, k and v
projections of each attention block packed into the fused input projection; the projections transposed). Nothing
in the folder runs code. Image preprocessing comes from its ``preprocessor_config.json`` when it has one.

The text tower is CLIP's causal transformer, pooled as ``transformers`` pools for the checkpoint's configuration:
at the highest token id when ``eos_token_id`` is 2 (the configurations written before that field was fixed), else at
the first ``eos_token_id``. The tokenizer is CLIP's byte-level BPE (the vocabulary Hugging Face CLIP tokenizers ship),
so a checkpoint with another vocabulary size is refused. ``SiglipModel`` folders: `hf_siglip`; which kind a folder
is: `hf_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VlpromptError
from .preprocess import DEFAULT_MEAN, DEFAULT_STD, Preprocess

CLIP_VOCAB = 49408
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as Hugging Face image processors store them


def is_hf_folder(path) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


def weights_file(folder: Path) -> Path:
    found = next((folder / name for name in WEIGHTS if (folder / name).is_file()), None)
    if found is None:
        raise VlpromptError(f"Hugging Face checkpoint {folder}: no {' or '.join(WEIGHTS)} beside its config.json")
    return found


def read_json_mapping(path: Path, what: str) -> dict:
    from ..utils.io import read_json

    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise VlpromptError(f"{what} {path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise VlpromptError(f"{what} {path}: expected a mapping")
    return data


def tower_configs(folder: Path, config: dict) -> tuple[dict, dict]:
    """(text_config, vision_config) of a ``transformers`` configuration, each checked to be a mapping."""
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    for part, name in ((text, "text_config"), (vision, "vision_config")):
        if not isinstance(part, dict):
            raise VlpromptError(f"Hugging Face checkpoint {folder}: {name} must be a mapping, got "
                                f"{type(part).__name__}")
    return text, vision


def positive_int(folder: Path, part: dict, key: str, default, name: str) -> int:
    """``part[key]`` (``default`` when absent), checked to be a positive whole number; ``name``: the part's name."""
    v = part.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise VlpromptError(f"Hugging Face checkpoint {folder}: {name}.{key} must be a positive whole number, got {v!r}")
    return v


def open_clip_config(folder: Path, config: dict) -> dict:
    """The open_clip model configuration of a ``transformers`` CLIP configuration (one line for anything else)."""
    text, vision = tower_configs(folder, config)

    def value(part: dict, key: str, default, name: str) -> int:
        return positive_int(folder, part, key, default, name)

    acts = {str(text.get("hidden_act", "quick_gelu")), str(vision.get("hidden_act", "quick_gelu"))}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) > 1:
        raise VlpromptError(f"Hugging Face checkpoint {folder}: activation {sorted(acts)} (need quick_gelu or gelu, "
                            "the same in both towers)")
    for part, name in ((text, "text_config"), (vision, "vision_config")):
        if part.get("layer_norm_eps", 1e-5) != 1e-5:
            raise VlpromptError(f"Hugging Face checkpoint {folder}: {name}.layer_norm_eps must be 1e-05 (CLIP's), "
                                f"got {part.get('layer_norm_eps')}")
    if value(text, "vocab_size", CLIP_VOCAB, "text_config") != CLIP_VOCAB:
        raise VlpromptError(f"Hugging Face checkpoint {folder}: text vocabulary of {text.get('vocab_size')} tokens; "
                            f"only CLIP's BPE vocabulary ({CLIP_VOCAB}) is supported")
    t_width = value(text, "hidden_size", 512, "text_config")
    v_width = value(vision, "hidden_size", 768, "vision_config")
    eos = text.get("eos_token_id", 2)
    if not isinstance(eos, int) or isinstance(eos, bool) or eos < 0:
        raise VlpromptError(f"Hugging Face checkpoint {folder}: text_config.eos_token_id must be a token id, got "
                            f"{eos!r}")
    return {
        "embed_dim": value(config, "projection_dim", 512, "config"),
        "quick_gelu": acts == {"quick_gelu"},
        "vision_cfg": {"image_size": value(vision, "image_size", 224, "vision_config"),
                       "patch_size": value(vision, "patch_size", 32, "vision_config"),
                       "width": v_width, "layers": value(vision, "num_hidden_layers", 12, "vision_config"),
                       "head_width": v_width // value(vision, "num_attention_heads", 12, "vision_config"),
                       "mlp_ratio": value(vision, "intermediate_size", 3072, "vision_config") / v_width},
        "text_cfg": {"context_length": value(text, "max_position_embeddings", 77, "text_config"),
                     "vocab_size": CLIP_VOCAB, "width": t_width,
                     "heads": value(text, "num_attention_heads", 8, "text_config"),
                     "layers": value(text, "num_hidden_layers", 12, "text_config"),
                     "mlp_ratio": value(text, "intermediate_size", 2048, "text_config") / t_width,
                     # transformers: the highest id for the old eos_token_id 2, else the first eos_token_id
                     **({} if eos == 2 else {"pool_type": "eos", "eos_id": int(eos)})},
    }


def pack_block(sd: dict, src: str, dst: str, out: dict) -> None:
    """One encoder layer of ``transformers`` (``src``) as an open_clip residual block (``dst``)."""
    attn = f"{src}.self_attn"
    out[f"{dst}.attn.in_proj_weight"] = torch.cat([sd.pop(f"{attn}.{p}_proj.weight") for p in "qkv"])
    out[f"{dst}.attn.in_proj_bias"] = torch.cat([sd.pop(f"{attn}.{p}_proj.bias") for p in "qkv"])
    pairs = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj"}
    for a, b in pairs.items():
        for leaf in ("weight", "bias"):
            out[f"{dst}.{b}.{leaf}"] = sd.pop(f"{src}.{a}.{leaf}")


def open_clip_state_dict(sd: dict, cfg: dict) -> dict:
    """A ``transformers`` CLIPModel state dict rewritten as open_clip's CLIP (every tensor used once)."""
    sd = dict(sd)
    sd.pop("text_model.embeddings.position_ids", None)
    sd.pop("vision_model.embeddings.position_ids", None)
    out = {"logit_scale": sd.pop("logit_scale").reshape(()),
           "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
           "ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
           "text_projection": sd.pop("text_projection.weight").T.contiguous(),
           "visual.class_embedding": sd.pop("vision_model.embeddings.class_embedding"),
           "visual.conv1.weight": sd.pop("vision_model.embeddings.patch_embedding.weight"),
           "visual.positional_embedding": sd.pop("vision_model.embeddings.position_embedding.weight"),
           "visual.ln_pre.weight": sd.pop("vision_model.pre_layrnorm.weight"),
           "visual.ln_pre.bias": sd.pop("vision_model.pre_layrnorm.bias"),
           "visual.ln_post.weight": sd.pop("vision_model.post_layernorm.weight"),
           "visual.ln_post.bias": sd.pop("vision_model.post_layernorm.bias"),
           "visual.proj": sd.pop("visual_projection.weight").T.contiguous()}
    for i in range(cfg["text_cfg"]["layers"]):
        pack_block(sd, f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}", out)
    for i in range(cfg["vision_cfg"]["layers"]):
        pack_block(sd, f"vision_model.encoder.layers.{i}", f"visual.transformer.resblocks.{i}", out)
    if sd:
        raise KeyError(f"unexpected {sorted(sd)[:3]}")
    return out


def processor_values(folder: Path, default_mean, default_std, default_resample: int):
    """(mean, std, interpolation) of the folder's ``preprocessor_config.json``, or None without one."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    data = read_json_mapping(path, "image processor configuration")
    resample = data.get("resample", default_resample)
    if not isinstance(resample, int) or resample not in RESAMPLE:
        raise VlpromptError(f"image processor configuration {path}: resample {resample!r} is not one of "
                            f"{sorted(RESAMPLE)} (bilinear, bicubic)")
    try:
        mean = tuple(float(v) for v in data.get("image_mean", default_mean))
        std = tuple(float(v) for v in data.get("image_std", default_std))
    except (TypeError, ValueError):
        raise VlpromptError(f"image processor configuration {path}: image_mean and image_std must be lists of "
                            "numbers") from None
    return mean, std, RESAMPLE[resample]


def preprocess_of(folder: Path, size: int) -> Preprocess:
    """The folder's ``preprocessor_config.json`` (CLIP's defaults without one): mean, std, the resize's resampling;
    CLIP's image processor resizes the shorter side and crops the centre."""
    values = processor_values(folder, DEFAULT_MEAN, DEFAULT_STD, 3)
    if values is None:
        return Preprocess(size=size, source=f"CLIP's defaults ({folder.name} has no preprocessor_config.json)")
    mean, std, interpolation = values
    return Preprocess(size=size, mean=mean, std=std, interpolation=interpolation, resize_mode="shortest",
                      source=f"processor config of {folder.name}")
