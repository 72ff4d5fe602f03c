"""A Hugging Face ``transformers`` checkpoint folder, whichever kind its ``config.json`` names: ``clip``
(`hf_clip`) or ``siglip`` (`hf_siglip`), read into an open_clip model with its preprocessing; anything else is one
line.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import VlpromptError
from .hf_clip import open_clip_config, open_clip_state_dict, preprocess_of, read_json_mapping, weights_file
from .hf_siglip import build_siglip, siglip_config, siglip_preprocess, siglip_state_dict


def load_hf_checkpoint(folder, read_state_dict) -> tuple:
    """(open_clip model, its configuration, preprocessing) of a ``transformers`` CLIPModel or SiglipModel folder
    (`hf_siglip`); ``read_state_dict``: the loader's safe reader of a weights file."""
    import open_clip

    folder = Path(folder).expanduser()
    config = read_json_mapping(folder / "config.json", "Hugging Face configuration")
    kind = config.get("model_type")
    if kind == "clip":
        cfg = open_clip_config(folder, config)
        convert, build, what = open_clip_state_dict, (lambda c: open_clip.CLIP(**c)), "CLIPModel"
        pre = preprocess_of(folder, int(cfg["vision_cfg"]["image_size"]))
    elif kind == "siglip":
        cfg = siglip_config(folder, config)
        convert, build, what = siglip_state_dict, build_siglip, "SiglipModel"
        pre = siglip_preprocess(folder, int(cfg["vision_cfg"]["image_size"]))
    else:
        more = (" (Siglip2Model's variable-resolution patches are not supported; open_clip's SigLIP 2 architectures "
                "are)" if kind == "siglip2" else "")
        raise VlpromptError(f"Hugging Face checkpoint {folder}: model_type {kind!r} is not 'clip' or 'siglip'{more}")
    path = weights_file(folder)
    sd, _ = read_state_dict(path)
    try:
        converted = convert(sd, cfg)
    except KeyError as exc:
        raise VlpromptError(f"weights file {path} is not a transformers {what} of its config.json: "
                            f"{str(exc).strip(chr(39))}") from None
    model = build(cfg)
    own = model.state_dict()
    for key, value in converted.items():
        if key not in own or own[key].shape != value.shape:
            raise VlpromptError(f"weights file {path} does not fit its config.json: '{key}' has shape "
                                f"{tuple(value.shape)}, the configuration gives "
                                f"{tuple(own[key].shape) if key in own else 'no such tensor'}")
    missing = set(own) - set(converted) - {"attn_mask"}
    if missing:
        raise VlpromptError(f"weights file {path} does not fit its config.json: missing {sorted(missing)[:3]}")
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    return model, cfg, pre
