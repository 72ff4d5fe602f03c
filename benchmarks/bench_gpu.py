"""The GPU path (printed figures, never asserted): run by `benchmarks/gpu.sh` on a machine with a CUDA GPU.

16-shot CoOp on 1,000 classes with a randomly initialised ViT-B/16 (cost does not depend on the weights) and
synthetic images of ImageNet's shape: 3 x 224 x 224 uint8 in pinned host memory, copied to the GPU without blocking
and normalised there, as a loader hands batches over. For each precision of the frozen towers (fp16, the official
code's; bf16; fp32), prompts always float32 master weights:

- text step: text features of the 1,000 classes, logits for 32 image features, cross-entropy, backward and SGD step,
  vlprompt's fast path (shared prefix, truncated at the last EOT) against the straightforward 77-token computation;
- image encoding: images/s of the frozen image tower at batch 256, vlprompt's class-token shortcut against
  open_clip's encode_image;
- one epoch: 16,000 images at batch 32 (500 steps) of the whole CoOp step (the batch's copy and normalisation, frozen
  image encoding, text features, loss, backward, SGD), measured over the whole epoch; the straightforward step over
  ``--ref-steps`` steps and projected to the epoch;
- the projected 16-shot ImageNet run: 50 epochs (CoOp's ImageNet recipe) plus encoding the 50,000 test images.

A smoke run on a CPU: ``--device cpu --arch vlprompt-tiny-ViT --classes 20 --precisions fp32,bf16``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED.*")

import vlprompt as vp  # noqa: E402
from bench import class_names  # noqa: E402
from vlprompt.text.encoder import reference_encode  # noqa: E402

IMAGENET_TEST = 50_000
IMAGENET_EPOCHS = 50  # CoOp's 16-shot ImageNet recipe


class Clock:
    """Wall seconds of GPU work: synchronised before and after."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, repeats: int) -> float:
        fn()  # warm-up (kernel selection, allocator)
        self.sync()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.sync()
        return (time.perf_counter() - t) / repeats


def peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def text_features(learner, reference: bool) -> torch.Tensor:
    if reference:
        return F.normalize(reference_encode(learner.backbone, learner.prompt_embeddings(), learner.eot_idx), dim=-1)
    return learner.text_features()


def make_step(learner, opt, feats_of, labels, reference: bool):
    """One CoOp step; ``feats_of()`` gives the batch's image features."""

    def step():
        logits = learner.logits(feats_of(), text_features(learner, reference))
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def pixel_batches(bb, device, batch: int, pool: int = 64):
    """A function giving the next batch of normalised images on ``device``: uint8 images from a pinned pool, copied
    without blocking and normalised there."""
    size = bb.image_size
    images = torch.randint(0, 256, (pool, 3, size, size), dtype=torch.uint8)
    if device.type == "cuda":
        images = images.pin_memory()
    mean = torch.tensor(bb.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(bb.image_std, device=device).view(1, 3, 1, 1)
    state = {"at": 0}

    def next_batch() -> torch.Tensor:
        at = state["at"]
        state["at"] = (at + batch) % (pool - batch + 1)
        x = images[at:at + batch].to(device, non_blocking=True)
        return (x.float().div_(255) - mean) / std

    return next_batch


def bench_precision(args, precision: str, device: torch.device, names: list) -> dict:
    clock = Clock(device)
    bb = vp.load_backbone(args.arch, pretrained="random", precision=precision, device=str(device))
    torch.manual_seed(0)
    learner = vp.CoOp(bb, names, n_ctx=16)
    opt = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9)
    n_cls, batch = len(names), args.batch
    labels = torch.randint(0, n_cls, (batch,), device=device)
    out = {}

    # text step
    feats = F.normalize(torch.randn(batch, bb.embed_dim, device=device), dim=-1)
    for kind, reference in (("fast", False), ("reference", True)):
        peak_reset(device)
        out[f"text_{kind}_s"] = clock.time(make_step(learner, opt, lambda: feats, labels, reference), args.text_steps)
        out[f"text_{kind}_gib"] = peak_gib(device)

    # image encoding
    images = pixel_batches(bb, device, args.image_batch)()
    out["image_fast_ips"] = args.image_batch / clock.time(lambda: bb.encode_images(images), args.image_steps)
    with torch.inference_mode():
        out["image_openclip_ips"] = args.image_batch / clock.time(
            lambda: bb.model.encode_image(images.to(bb.dtype)), args.image_steps)

    # one epoch of the whole step
    pixels = pixel_batches(bb, device, batch)
    steps = max(1, args.shots * n_cls // batch)

    def frozen_feats():
        return bb.encode_images(pixels()).clone()  # a normal tensor: inference-mode tensors cannot enter autograd

    step = make_step(learner, opt, frozen_feats, labels, reference=False)
    step()
    clock.sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    clock.sync()
    out["epoch_s"], out["epoch_steps"] = time.perf_counter() - t, steps
    ref_step = make_step(learner, opt, frozen_feats, labels, reference=True)
    out["epoch_reference_s"] = clock.time(ref_step, args.ref_steps) * steps
    test_s = IMAGENET_TEST / out["image_fast_ips"]
    out["imagenet_run_h"] = (IMAGENET_EPOCHS * out["epoch_s"] + test_s) / 3600
    out["imagenet_run_reference_h"] = (IMAGENET_EPOCHS * out["epoch_reference_s"] + test_s) / 3600
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precisions", default="fp16,bf16,fp32")
    ap.add_argument("--text-steps", dest="text_steps", type=int, default=10)
    ap.add_argument("--image-batch", dest="image_batch", type=int, default=256)
    ap.add_argument("--image-steps", dest="image_steps", type=int, default=10)
    ap.add_argument("--ref-steps", dest="ref_steps", type=int, default=10)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA GPU here (torch {torch.__version__}); nothing to measure", file=sys.stderr)
        return 1
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"GPU path: CoOp {args.shots}-shot, {args.classes} classes, {args.arch} (random weights), batch "
          f"{args.batch}, on {where}, torch {torch.__version__}", flush=True)
    names = class_names(args.classes)
    rows = {}
    for precision in args.precisions.split(","):
        r = rows[precision] = bench_precision(args, precision, device, names)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last precision's towers are gone: their cached blocks go too
        print(f"\n[{precision}]", flush=True)
        print(f"  text step       fast {r['text_fast_s'] * 1e3:8.1f} ms ({r['text_fast_gib']:.2f} GiB)   "
              f"77-token {r['text_reference_s'] * 1e3:8.1f} ms ({r['text_reference_gib']:.2f} GiB)   "
              f"{r['text_reference_s'] / r['text_fast_s']:.1f}x")
        print(f"  image encoding  fast {r['image_fast_ips']:8.0f} img/s   open_clip {r['image_openclip_ips']:8.0f} "
              f"img/s   {r['image_fast_ips'] / r['image_openclip_ips']:.2f}x")
        print(f"  one epoch       {r['epoch_steps']} steps {r['epoch_s']:8.1f} s   77-token (projected) "
              f"{r['epoch_reference_s']:8.1f} s   {r['epoch_reference_s'] / r['epoch_s']:.1f}x")
        print(f"  16-shot ImageNet run (projected: {IMAGENET_EPOCHS} epochs + {IMAGENET_TEST:,} test images) "
              f"{r['imagenet_run_h']:.2f} h   77-token {r['imagenet_run_reference_h']:.2f} h", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
