"""``vlprompt export``: a learned classifier as a plain linear head, usable without vlprompt.

    logits = normalize(f) @ weight.T (+ bias)        f: the CLIP image tower's output for one image

For the methods whose classes are text prompts (CoOp, CPT, ProGrad, KgCoOp, dual-view MI), ``weight`` is the
(C, d) matrix of L2-normalised class text features times the backbone's logit scale, and there is no bias.
The linear probe is a head over the raw (unnormalised) features: its own ``weight`` and ``bias`` are exported
with ``normalize_features: false``. Classifiers that are not a linear function of the image feature are
refused: CoCoOp (each image shifts the context through a meta-network), Tip-Adapter(-F) (the cache term
``exp(-beta (1 - f K^T))``) and CLIP-Adapter (a ReLU MLP on the feature).

Written: ``head.safetensors`` (``weight``, and ``bias`` where there is one), ``head.json`` (class names, the
backbone and test transform it needs, the logit scale, the vlprompt version, a usage string) and with
``onnx=True`` ``model.onnx``: image tower + normalisation + head as one graph, input ``image`` (N, 3, H, W)
float32 preprocessed by the test transform, output ``logits`` (N, C). The graph is traced from open_clip's own
image tower in float32 with PyTorch's TorchScript-based exporter (``dynamo=False``: works without the
``onnxscript`` package and keeps a dynamic batch axis; with torch 2.13 the default ``dynamo=True`` needs
onnxscript).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VlpromptError

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
ONNX_NAME = "model.onnx"
HEAD_FORMAT = "vlprompt-linear-head"
HEAD_FORMAT_VERSION = 1
ONNX_OPSET = 17
INSTALL_HINT = "pip install vlprompt[export]"


@dataclass
class LinearHead:
    """logits = (normalize(f) if normalize else f) @ weight.T + bias."""

    weight: torch.Tensor  # (C, d) float32
    bias: Optional[torch.Tensor]  # (C,) or None
    normalize: bool
    logit_scale: Optional[float]  # folded into weight (text-prompt heads); None for a linear probe
    form: str  # in words, for head.json

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        if self.normalize:
            f = F.normalize(f, dim=-1)
        out = f @ self.weight.T
        return out + self.bias if self.bias is not None else out


def not_linear_reason(learner, method: str) -> Optional[str]:
    """Why the classifier of ``learner`` is not a fixed linear function of the image feature (None if it is)."""
    from ..methods.clip_adapter import ClipAdapter
    from ..methods.linear_probe import LinearProbe
    from ..methods.tip_adapter import TipAdapter
    from ..prompts.base import TextClassifier

    if learner.from_pixels:
        return (f"method '{method}' learns inside the image tower (prompt tokens or weight updates), so its classifier "
                "is not a head over the frozen image features; use `vlprompt predict` instead")
    if getattr(learner, "conditional", False):
        return (f"method '{method}' conditions its prompts on each image (a meta-network shifts the context per "
                "image), so its classifier is not one fixed linear head; use `vlprompt predict` instead")
    if isinstance(learner, TipAdapter):
        return (f"method '{method}' adds a cache term alpha * exp(-beta * (1 - f K^T)) L, which is not linear in "
                "the image feature; use `vlprompt predict` instead")
    if isinstance(learner, ClipAdapter):
        return (f"method '{method}' passes the image feature through a residual ReLU MLP before the cosine, "
                "which is not linear in it; use `vlprompt predict` instead")
    if isinstance(learner, LinearProbe) and type(learner).logits is LinearProbe.logits:
        return None
    if isinstance(learner, TextClassifier) and type(learner).logits is TextClassifier.logits:
        return None
    return (f"method '{method}': its classifier ({type(learner).__name__}) is not a known linear function of "
            "the image feature")


@torch.no_grad()
def linear_head(learner, method: str) -> LinearHead:
    """The exact linear form of ``learner``'s logits (one error line where there is none), checked against
    the learner itself on random features."""
    from ..methods.linear_probe import LinearProbe
    from ..engine.evaluate import class_logits

    why = not_linear_reason(learner, method)
    if why:
        raise VlpromptError(f"cannot export: {why}")
    if isinstance(learner, LinearProbe):
        head = LinearHead(learner.weight.detach().float().cpu().clone(), learner.bias.detach().float().cpu().clone(),
                          normalize=False, logit_scale=None,
                          form="logits = f @ weight.T + bias (a linear probe over the raw image features)")
    else:
        scale = float(learner.backbone.logit_scale)
        text = learner.text_features().detach().float().cpu()
        bias = learner.backbone.logit_bias  # SigLIP's, the same for every class
        head = LinearHead((scale * text).contiguous(), None if bias is None else torch.full((len(text),), bias),
                          normalize=True, logit_scale=scale,
                          form="logits = normalize(f) @ weight.T, weight = logit_scale * normalised class text "
                               "features" + ("" if bias is None else "; bias = the model's logit bias"))
    bb = learner.backbone
    probe = torch.randn(8, bb.embed_dim, generator=torch.Generator().manual_seed(0)).to(bb.device)
    want = class_logits(learner, probe).cpu()
    got = head.logits(probe.cpu())
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)) or not torch.allclose(got[finite], want[finite], rtol=1e-4,
                                                                           atol=1e-4):
        raise VlpromptError(f"cannot export method '{method}': the linear head does not reproduce its logits "
                            "(this is a bug in vlprompt; please report it)")
    return head


def backbone_record(bb) -> dict:
    """What a user needs to rebuild the image features the head expects."""
    src = bb.source
    return {"architecture": src.name, "pretrained": src.pretrained,
            "weights": Path(src.weights).name if src.weights else None, "weights_path": src.weights,
            "random_init_seed": src.random_init_seed if src.is_random else None, "quick_gelu": src.quick_gelu,
            "embed_dim": bb.embed_dim, "image_size": bb.image_size,
            "mean": list(bb.image_mean), "std": list(bb.image_std), "preprocess": bb.preprocess.record(),
            "open_clip": _open_clip_version()}


def _transform_record(pre) -> dict:
    """The test pre-processing the head's features come from, as steps a user can rebuild."""
    resize = {"shortest": {"resize_shorter_side": pre.size, "center_crop": pre.size},
              "squash": {"resize_to_square": pre.size},
              "longest": {"resize_longer_side": pre.size, "center_pad": pre.size}}[pre.resize_mode]
    return {**resize, "interpolation": pre.interpolation, "mean": list(pre.mean), "std": list(pre.std),
            "input": "RGB scaled to [0, 1]"}


def _open_clip_version() -> Optional[str]:
    try:
        import open_clip

        return open_clip.__version__
    except Exception:  # noqa: BLE001 - informational only
        return None


def _usage(head: LinearHead, onnx: bool) -> str:
    feats = ("f = normalize(image_features, dim=-1); " if head.normalize else "f = image_features; ")
    text = ("Preprocess: RGB, resize the shorter side to image_size (bicubic), centre-crop image_size, to [0, 1], "
            "normalise with mean/std. image_features = the backbone's image tower (open_clip encode_image, "
            f"float32, not normalised). {feats}logits = f @ weight.T" + (" + bias" if head.bias is not None else "")
            + " (head.safetensors); probabilities = softmax(logits); classnames[argmax] is the class.")
    if onnx:
        text += f" {ONNX_NAME}: the same from the preprocessed image tensor (input 'image', output 'logits')."
    return text


class ImageHead(nn.Module):
    """Image tower + normalisation + linear head: what ``model.onnx`` computes."""

    def __init__(self, visual: nn.Module, head: LinearHead):
        super().__init__()
        self.visual = visual
        self.normalize = head.normalize
        self.register_buffer("weight", head.weight.clone())
        self.has_bias = head.bias is not None
        self.register_buffer("bias", head.bias.clone() if head.bias is not None else torch.zeros(0))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f = self.visual(image)
        if isinstance(f, (tuple, list)):
            f = f[0]
        if self.normalize:
            f = F.normalize(f, dim=-1)
        out = f @ self.weight.T
        return out + self.bias if self.has_bias else out


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise VlpromptError(f"--onnx needs the onnx package: {INSTALL_HINT}") from None
    return onnx


def export_onnx(bb, head: LinearHead, out: Path) -> dict:
    """Write ``model.onnx`` (image tower in float32 + head) and check it with onnxruntime where installed."""
    onnx = _require_onnx()
    if bb.precision != "fp32" or bb.device.type != "cpu":
        raise VlpromptError("--onnx: the backbone must be loaded in fp32 on the CPU (vlprompt export does so)")
    module = ImageHead(bb.model.visual, head).eval()
    size = bb.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    path = out / ONNX_NAME
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        try:
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
        except Exception as exc:  # noqa: BLE001 - any exporter failure is one line
            raise VlpromptError(f"--onnx: torch.onnx.export failed for {bb.source.name}: "
                                f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from None
    onnx.checker.check_model(str(path))
    record = {"file": ONNX_NAME, "opset": ONNX_OPSET, "input": "image", "output": "logits",
              "input_shape": ["batch", 3, size, size], "exporter": f"torch {torch.__version__} (dynamo=False)"}
    try:
        import onnxruntime as ort
    except ImportError:
        record["checked"] = f"not checked (onnxruntime not installed: {INSTALL_HINT})"
        return record
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(["logits"], {"image": example.numpy()})[0])
    with torch.no_grad():
        want = head.logits(bb.encode_images(example).cpu())
    finite = torch.isfinite(want)
    diff = float((got[finite] - want[finite]).abs().max()) if finite.any() else 0.0
    record["checked"] = {"onnxruntime": ort.__version__, "max_abs_logit_diff": diff, "images": example.shape[0]}
    if not diff <= 1e-3 * max(1.0, float(want[finite].abs().max()) if finite.any() else 1.0):
        raise VlpromptError(f"--onnx: the exported graph's logits differ from vlprompt's by {diff:.3g}")
    return record


def export_head(opened, output, onnx: bool = False) -> Path:
    """Write the head of an `OpenedPrompt` (and with ``onnx`` the ONNX graph) into folder ``output``."""
    from safetensors.torch import save

    from .. import __version__
    from ..utils.io import atomic_write_bytes, atomic_write_text

    if onnx:
        _require_onnx()  # before any work
    learner, bb = opened.learner, opened.backbone
    head = linear_head(learner, opened.method)
    out = Path(output).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VlpromptError(f"cannot write the export folder {out}: {exc.strerror or exc}") from None
    tensors = {"weight": head.weight.contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.contiguous()
    onnx_record = export_onnx(bb, head, out) if onnx else None
    if not onnx and (out / ONNX_NAME).is_file():
        (out / ONNX_NAME).unlink()  # a graph of an earlier export would not match this head
    atomic_write_bytes(out / HEAD_WEIGHTS, save(tensors))
    config = {
        "format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "vlprompt_version": __version__,
        "method": opened.method, "prompt": str(opened.path),
        "classnames": list(learner.classnames), "num_classes": len(learner.classnames),
        "form": head.form, "normalize_features": head.normalize, "has_bias": head.bias is not None,
        "logit_scale": head.logit_scale, "weight_includes_logit_scale": head.logit_scale is not None,
        "weight_shape": list(head.weight.shape),
        "backbone": backbone_record(bb),
        "transform": _transform_record(bb.preprocess),
        "onnx": onnx_record,
        "usage": _usage(head, onnx),
    }
    atomic_write_text(out / HEAD_CONFIG, json.dumps(config, indent=2))
    return out
