"""Load a CLIP-like backbone through open_clip.

Four sources, chosen explicitly by the caller:
- ``pretrained="openai"`` (or any open_clip tag): downloads through open_clip when a hub is reachable;
- ``weights="file"``: an OpenAI ``.pt`` archive (TorchScript), an open_clip checkpoint, or a plain state
  dict in ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``;
- ``name="path/to/arch.json"``: a custom architecture description (tests use tiny ones);
- neither: random initialisation from a fixed seed, with a loud warning that accuracy is meaningless.

No weights file can run code when read: safetensors files are read by safetensors, pickled state dicts by
``torch.load(weights_only=True)`` (tensors and plain values only), TorchScript archives by a restricted reader
(`torchscript_reader`), never by ``torch.jit.load``. Files open_clip downloads for a tag go through the same.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import socket
import threading
import warnings
import zipfile
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from ..errors import VlpromptError
from ..utils.hardware import check_precision, resolve_precision
from ..utils.progress import logger as vlprompt_logger
from .backbone import Backbone, BackboneSource
from .hf_checkpoint import load_hf_checkpoint
from .hf_clip import is_hf_folder
from .preprocess import Preprocess, model_image_size, resolve_preprocess
from .torchscript_reader import read_torchscript_state_dict

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
RANDOM_WARNING = (
    "backbone {name} is RANDOMLY INITIALISED (no pretrained weights). "
    "Accuracies from it are meaningless except as a smoke test or a speed measurement."
)


HUB_HOST = ("huggingface.co", 443)
log = vlprompt_logger.getChild("backbones")  # "vlprompt.backbones": see vlprompt.utils.progress
_OPEN_CLIP_PATCH = threading.Lock()  # see _open_clip_reads_safely


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the model hub answers at all (open_clip's pretrained tags download from it)."""
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_unless_reachable():
    """With no hub, switch huggingface_hub to offline mode: cached weights still load, and a missing
    file fails at once instead of after a minute of retries."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield False
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = old or not hub_reachable()
    try:
        yield constants.HF_HUB_OFFLINE
    finally:
        constants.HF_HUB_OFFLINE = old


def builtin_config_dir() -> Path:
    """Folder of the architecture JSONs shipped with vlprompt (tiny models for demos and tests)."""
    return Path(str(resources.files("vlprompt.backbones") / "configs"))


def _open_clip():
    try:
        import open_clip  # noqa: WPS433 - heavy import kept lazy
    except Exception as exc:  # torchvision of the wrong build fails here
        raise VlpromptError(f"cannot import open_clip ({exc}); run scripts/setup.sh") from None
    return open_clip


def _resolve_arch(name: str) -> tuple[str, Optional[dict]]:
    """Return (architecture name, model config) for a built-in name, a shipped tiny name or a JSON path."""
    oc = _open_clip()
    path = Path(name)
    if name.endswith(".json"):
        if not path.is_file():
            raise VlpromptError(f"architecture file not found: {name}")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise VlpromptError(f"architecture file {name} is not valid JSON: {exc}") from None
        if isinstance(cfg, dict) and isinstance(cfg.get("model_cfg"), dict):  # open_clip_config.json's layout
            cfg = {**cfg["model_cfg"], **({"preprocess_cfg": cfg["preprocess_cfg"]}
                                          if isinstance(cfg.get("preprocess_cfg"), dict) else {})}
        if not isinstance(cfg, dict):
            raise VlpromptError(f"architecture file {name}: expected a mapping")
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in cfg:
                raise VlpromptError(f"architecture file {name}: missing field '{key}'")
        return path.stem, cfg
    shipped = builtin_config_dir() / f"{name}.json"
    if shipped.is_file():
        return name, json.loads(shipped.read_text())
    arch = name.replace("/", "-")
    cfg = oc.get_model_config(arch)
    if cfg is None:
        known = ", ".join(sorted(m for m in oc.list_models() if not m.startswith("coca")))[:400]
        raise VlpromptError(f"unknown backbone '{name}': not an open_clip architecture ({known} ...) "
                            "nor an architecture .json file")
    return arch, cfg


def _build_from_cfg(arch: str, cfg: dict, quick_gelu: bool):
    oc = _open_clip()
    cfg = json.loads(json.dumps(cfg))  # private copy
    if "hf_model_name" in cfg.get("text_cfg", {}):
        raise VlpromptError(f"backbone {arch}: Hugging Face text towers are not supported (need a CLIP BPE tower)")
    custom_text = cfg.pop("custom_text", False)
    cfg.pop("multimodal_cfg", None)
    cfg.pop("preprocess_cfg", None)  # the images' preparation, not the model's (`preprocess`)
    cfg["quick_gelu"] = bool(quick_gelu or cfg.get("quick_gelu", False))
    cls = oc.CustomTextCLIP if custom_text else oc.CLIP
    return cls(**cfg)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding a constants.pkl; plain torch.save zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


def _read_state_dict(path: Path) -> tuple[dict, bool]:
    """(state dict, came from a TorchScript archive). OpenAI's released .pt files are TorchScript: their tensors
    are read by our restricted reader, never by torch.jit.load; other .pt/.pth/.bin/.ckpt files by torch.load with
    weights_only=True (tensors and plain values only); .safetensors by safetensors."""
    if path.stat().st_size == 0:
        raise VlpromptError(f"weights file {path} is empty (0 bytes)")
    if _is_torchscript(path):
        return read_torchscript_state_dict(path), True
    if path.suffix != ".safetensors" and not _safe_torch_load():
        raise VlpromptError(f"weights file {path} is a pickle, and torch {torch.__version__} cannot read pickles "
                            "without the risk of running code (fixed in torch 2.6); upgrade torch, or use a "
                            ".safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error says it all
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _weights_file_error(path, exc) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise VlpromptError(f"weights file {path} holds no state dict")
    bad = next((k for k, v in sd.items() if not torch.is_tensor(v)), None)
    if bad is not None:
        raise VlpromptError(f"weights file {path} is not a state dict of tensors: '{bad}' holds a "
                            f"{type(sd[bad]).__name__}")
    if next(iter(sd)).startswith("module."):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, False


def _safe_torch_load() -> bool:
    """Whether torch.load(weights_only=True) is safe: before torch 2.6 a crafted file could still run code
    through it (CVE-2025-32434)."""
    found = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return found is not None and (int(found.group(1)), int(found.group(2))) >= (2, 6)


def _weights_file_error(path: Path, exc: Exception) -> VlpromptError:
    """One line for a weights file torch.load or safetensors refused. torch's own text for a refused pickle
    suggests loading it with weights_only=False; vlprompt never does that, so it says what it found instead."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text) if isinstance(exc, pickle.UnpicklingError) else None
    if found:
        return VlpromptError(f"weights file {path} is a pickle naming the global '{found.group(1)}'; vlprompt reads "
                             "only tensors and plain values from weights files and does not load it, because "
                             "loading it could run code")
    if isinstance(exc, pickle.UnpicklingError):  # garbage, or a pickle in a form torch's safe reader refuses
        return VlpromptError(f"cannot read weights file {path}: not a file of tensors that can be read without "
                             "running code")
    first = text.splitlines()[0][:200] if text.strip() else ""
    if isinstance(exc, (RuntimeError, OSError)) and first and "weights_only" not in first:
        return VlpromptError(f"cannot read weights file {path}: {first}")
    return VlpromptError(f"cannot read weights file {path}: not a PyTorch or safetensors weights file "
                         f"({type(exc).__name__})")


@contextlib.contextmanager
def _open_clip_reads_safely(oc):
    """open_clip reads a pretrained tag's downloaded file (or a ``pretrained`` file path) with its
    ``factory.load_state_dict``: torch.load with weights_only=True, but on a TypeError again with torch's default,
    which unpickles anything on torch < 2.6 or with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set. While a model is
    created, that function is ours: the file goes through `_read_state_dict` (TorchScript without
    torch.jit.load). A lock keeps two threads from swapping it at once."""
    with _OPEN_CLIP_PATCH:
        original = oc.factory.load_state_dict
        oc.factory.load_state_dict = _state_dict_for_open_clip
        try:
            yield
        finally:
            oc.factory.load_state_dict = original


def _state_dict_for_open_clip(checkpoint_path, device="cpu", weights_only=True) -> dict:
    """What open_clip's ``load_state_dict`` returns, read by vlprompt's readers."""
    sd, is_jit = _read_state_dict(Path(checkpoint_path))
    if is_jit:  # OpenAI's archives carry these as buffers; open_clip drops them too
        for key in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(key, None)
    return sd


def _load_state(model, sd: dict, path: Path, arch: str) -> None:
    """Load a state dict strictly, turning every mismatch into one line naming the key."""
    for key in ("input_resolution", "context_length", "vocab_size"):
        sd.pop(key, None)
    # Causal masks are rebuilt by the architecture; TorchScript archives may carry them as buffers.
    sd = {k: v for k, v in sd.items() if not k.endswith("attn_mask")}
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = _open_clip().model.convert_to_custom_text_state_dict(sd)
    own = model.state_dict()
    for key, value in sd.items():
        if key in own and own[key].shape != value.shape:
            raise VlpromptError(
                f"weights file {path} does not fit backbone {arch}: '{key}' has shape "
                f"{tuple(value.shape)}, the architecture expects {tuple(own[key].shape)}"
            )
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if k != "logit_bias"]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise VlpromptError(f"weights file {path} does not fit backbone {arch}: {what}")


# A folder holds a Hugging Face tokenizer when it has one of these (a hub snapshot of an open_clip SigLIP keeps them
# beside open_clip_model.safetensors).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def _tokenizer(arch: str, cfg: dict, beside: Optional[Path] = None):
    """CLIP's BPE, or the Hugging Face tokenizer the architecture names (SigLIP's, SigLIP 2's) as open_clip wraps it:
    from the folder of the weights file (``beside``) when the tokenizer's files are there, else from the local cache
    or a local folder named in the architecture, or from a hub when one is reachable."""
    oc = _open_clip()
    text = cfg["text_cfg"]
    ctx_len = text.get("context_length", 77)
    name = text.get("hf_tokenizer_name")
    if not name:
        return oc.tokenizer.SimpleTokenizer(context_length=ctx_len)
    if beside is not None and any((beside / f).is_file() for f in TOKENIZER_FILES):
        name = str(beside)
    try:
        with _offline_unless_reachable() as offline, contextlib.redirect_stderr(io.StringIO()):
            return oc.tokenizer.HFTokenizer(name, context_length=ctx_len, **(text.get("tokenizer_kwargs") or {}))
    except ImportError:
        raise VlpromptError(f"backbone {arch}: its tokenizer '{name}' needs transformers: pip install "
                            '"vlprompt[hf]"') from None
    except Exception as exc:
        why = ("it is not in the local Hugging Face cache and no hub is reachable" if offline
               else (str(exc) or type(exc).__name__).splitlines()[0][:160])
        raise VlpromptError(f"backbone {arch}: cannot load its tokenizer '{name}': {why} (put the tokenizer's files "
                            "beside the weights file, or name a local tokenizer folder in an architecture file's "
                            "text_cfg.hf_tokenizer_name)") from None


def load_backbone(name: str = "ViT-B-16", pretrained: Optional[str] = None, weights: Optional[str] = None,
                  precision: str = "fp32", device: str = "cpu", quick_gelu: Optional[bool] = None,
                  random_init_seed: int = 0, cache_dir: Optional[str] = None) -> Backbone:
    """Build a frozen backbone.

    ``name``: an open_clip architecture (``"RN50"``, ``"ViT-B-16"``, ``"ViT-B/16"`` ...), a shipped tiny
    architecture (``"vlprompt-tiny-ViT"``, ``"vlprompt-tiny-RN"``) or a path to an architecture JSON.
    ``pretrained``: an open_clip pretrained tag, fetched from a hub. ``weights``: a local weights file
    (takes precedence). With neither, the model is randomly initialised from ``random_init_seed`` so that
    separate processes build identical random models.
    ``precision``: "fp32", "bf16", "fp16" (frozen weights cast once; fp16 on a GPU only) or "auto" (bf16 where this
    machine runs it faster). ``quick_gelu``: defaults to True for OpenAI weights (the OpenAI models use QuickGELU), else to the
    architecture's own setting.
    """
    check_precision(precision, device)
    precision = resolve_precision(precision, device)
    if pretrained is not None and str(pretrained).lower() in ("", "none", "random"):
        pretrained = None
    check_backbone(name, weights)
    if name == HF or name.startswith(HF + ":"):
        return _load_hf(name, weights, precision, device, cache_dir)
    arch, cfg = _resolve_arch(name)
    if weights is not None:
        path = Path(weights).expanduser()
        tokenizer = _tokenizer(arch, cfg, beside=path.parent)  # before reading the weights: a missing one is one line
        sd, is_jit = _read_state_dict(path)
        if quick_gelu is None:
            # OpenAI's archives (TorchScript) come from QuickGELU models.
            used_quick = True if is_jit else bool(cfg.get("quick_gelu", False))
            why = ("an OpenAI TorchScript archive" if is_jit else
                   f"architecture {name}'s own setting; a plain state dict does not say which activation it was "
                   "trained with")
        else:
            used_quick = bool(quick_gelu)
            why = f"quick_gelu={used_quick} asked"
            if not used_quick and cfg.get("quick_gelu", False):
                why += f", but architecture {name} sets QuickGELU itself"
        model = _build_from_cfg(arch, cfg, quick_gelu=used_quick)
        _load_state(model, sd, path, arch)
        source = BackboneSource(name=name, weights=str(path.resolve()), quick_gelu=used_quick)
        # A tag given with the file names the images' preparation (its weights are the file's).
        bb = Backbone(model, tokenizer, source, precision=precision, device=device,
                      preprocess=_preprocess(arch, cfg, model, pretrained))
        hint = "" if bb.activation == "quickgelu" else (
            "; OpenAI weights need QuickGELU: use an architecture name ending in -quickgelu (e.g. "
            "ViT-B-16-quickgelu)")
        log.info(f"backbone {name}: weights {path.name} run with activation {bb.activation} ({why}){hint}")
        return bb
    if pretrained is not None:
        oc = _open_clip()
        used_quick = pretrained == "openai" if quick_gelu is None else quick_gelu
        try:
            with _offline_unless_reachable() as offline, contextlib.redirect_stderr(io.StringIO()), \
                    _open_clip_reads_safely(oc):
                model = oc.create_model(arch, pretrained=pretrained, force_quick_gelu=used_quick,
                                        cache_dir=cache_dir)
        except VlpromptError:
            raise  # our reader's line about the downloaded or named file
        except Exception as exc:
            if offline:
                why = f"no model hub is reachable and '{pretrained}' weights for {arch} are not in the local cache"
            else:
                why = f"cannot load pretrained '{pretrained}' for {arch}: {(str(exc) or type(exc).__name__).splitlines()[0][:160]}"
            raise VlpromptError(f"{why}; pass a local weights file with --weights FILE, or --pretrained random "
                                "for a random model") from None
        source = BackboneSource(name=name, pretrained=pretrained, quick_gelu=used_quick)
    else:
        used_quick = bool(quick_gelu) if quick_gelu is not None else bool(cfg.get("quick_gelu", False))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_init_seed)
            model = _build_from_cfg(arch, cfg, quick_gelu=used_quick)
        msg = RANDOM_WARNING.format(name=name)
        warnings.warn(msg, stacklevel=2)
        source = BackboneSource(name=name, random_init_seed=random_init_seed, quick_gelu=used_quick)
    return Backbone(model, _tokenizer(arch, cfg), source, precision=precision, device=device,
                    preprocess=_preprocess(arch, cfg, model, pretrained))


HF = "hf"  # the backbone name of a Hugging Face checkpoint folder (its architecture is in its config.json)


def _load_hf(name: str, weights: Optional[str], precision: str, device: str,
             cache_dir: Optional[str] = None) -> Backbone:
    """A ``transformers`` CLIPModel or SiglipModel folder (`hf_checkpoint`): ``--backbone hf --weights DIR``, or
    ``--backbone hf:DIR`` / ``hf:<hub id>`` (fetched when a hub is reachable, else from the local Hugging Face
    cache)."""
    given = name  # hf:<ref> names its checkpoint: recorded as given, so that a saved prompt finds it again
    if name.startswith(HF + ":"):
        weights = _hf_checkpoint(name[len(HF) + 1:], cache_dir)
    model, cfg, pre = load_hf_checkpoint(weights, _read_state_dict)
    folder = None if given != HF else str(Path(weights).expanduser().resolve())
    source = BackboneSource(name=given, weights=folder, quick_gelu=cfg["quick_gelu"])
    bb = Backbone(model, _tokenizer(HF, cfg), source, precision=precision, device=device, preprocess=pre)
    kind = "SigLIP" if cfg.get("custom_text") else "CLIP"
    log.info(f"backbone {HF}: {Path(weights).name} (transformers {kind}, activation {bb.activation}, preprocessing "
             f"from {pre.source})")
    return bb


def check_backbone(name: str, weights: Optional[str] = None) -> None:
    """What loading the backbone would refuse first, found without building it (an unknown architecture, a weights
    file or checkpoint folder that is not there or does not go with the name): one line. A study driver calls it
    for the runs its workers will load."""
    hf_folder = weights is not None and is_hf_folder(weights)
    if name.startswith(HF + ":"):
        if weights is not None:
            raise VlpromptError(f"backbone {name} names its checkpoint itself: give no --weights with it")
        return
    if name == HF and not hf_folder:
        raise VlpromptError(f"backbone {HF}: give a Hugging Face checkpoint folder (config.json + model.safetensors) "
                            f"with --weights DIR" + (f"; {weights} is not one" if weights else ""))
    if name == HF:
        return
    if hf_folder:
        raise VlpromptError(f"weights {weights} is a Hugging Face checkpoint folder: use --backbone {HF} (its "
                            "architecture comes from its config.json)")
    _resolve_arch(name)
    if weights is not None and not Path(weights).expanduser().is_file():
        raise VlpromptError(f"weights file not found: {weights}")


# What a checkpoint folder is read from: configuration, weights, processor, and a SigLIP tokenizer's data files
# (read by transformers without remote code).
HF_FILES = ["config.json", "model.safetensors", "preprocessor_config.json", *TOKENIZER_FILES, "special_tokens_map.json"]


def _hf_checkpoint(ref: str, cache_dir: Optional[str]) -> str:
    """The local folder of ``hf:<ref>``: a folder as given, else a hub id's files (`HF_FILES`)."""
    if Path(ref).expanduser().is_dir():
        return ref
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise VlpromptError(f"backbone hf:{ref}: fetching from a hub needs huggingface_hub") from None
    try:
        with _offline_unless_reachable() as offline:
            return snapshot_download(repo_id=ref, cache_dir=cache_dir, allow_patterns=HF_FILES)
    except Exception as exc:
        why = ("no model hub is reachable and it is not in the local Hugging Face cache" if offline
               else (str(exc) or type(exc).__name__).splitlines()[0][:160])
        raise VlpromptError(f"backbone hf:{ref}: not a local folder, and cannot fetch it: {why}; give a local "
                            "checkpoint folder with --backbone hf --weights DIR") from None


def _preprocess(arch: str, cfg: dict, model, tag: Optional[str]) -> Preprocess:
    return resolve_preprocess(arch, cfg, model_image_size(model), tag)


def resolve_weights_env() -> Optional[str]:
    """A local weights file named by VLPROMPT_WEIGHTS, if it exists."""
    path = os.environ.get("VLPROMPT_WEIGHTS")
    return path if path and os.path.isfile(path) else None
