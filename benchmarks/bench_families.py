"""One row per CLIP family whose text tower takes the causal fast path (printed figures, never asserted): a CoOp text
step (text features of every class, logits for 32 image features, cross-entropy, backward, SGD step) with vlprompt's
fast encoder against the straightforward computation at the tower's full context length (77 tokens; PE-Core's 32),
at the family's full-size open_clip configuration with random weights, fp32, the two alternated in one process.

    .venv/bin/python benchmarks/bench_families.py [--classes 100] [--repeats 3]

Every family listed here is causal and pooled at its end-of-text token, so the fast path is exact on each (tested in
tests/test_families.py); towers that are not (SigLIP, SigLIP 2, the small MobileCLIP text towers) are refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED.*")

import vlprompt as vp  # noqa: E402
from bench import _text_step, alternate, class_names  # noqa: E402

FAMILIES = {"CLIP / MetaCLIP (ViT-B-16-quickgelu)": "ViT-B-16-quickgelu", "EVA02 (EVA02-B-16)": "EVA02-B-16",
            "PE-Core (PE-Core-B-16)": "PE-Core-B-16", "MobileCLIP (MobileCLIP-B)": "MobileCLIP-B"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    names = class_names(args.classes)
    print(f"CoOp text step, {args.classes} classes, batch 32, fp32, {torch.get_num_threads()} thread(s)")
    print(f"{'family':>38} {'width x layers':>15} {'context':>8} {'fast s':>8} {'reference s':>12} {'speed-up':>9}")
    for label, arch in FAMILIES.items():
        bb = vp.load_backbone(arch, pretrained="random")
        torch.manual_seed(0)
        learner = vp.CoOp(bb, names, n_ctx=16)
        opt = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9)
        feats = F.normalize(torch.randn(32, bb.embed_dim), dim=-1)
        labels = torch.randint(0, args.classes, (32,))
        t = alternate({"fast": lambda: _text_step(learner, feats, labels, opt, reference=False),
                       "reference": lambda: _text_step(learner, feats, labels, opt, reference=True)}, args.repeats)
        shape = f"{bb.text.width} x {len(bb.text.blocks)}"
        print(f"{label:>38} {shape:>15} {bb.context_length:>8} {t['fast']:8.3f} {t['reference']:12.3f} "
              f"{t['reference'] / t['fast']:8.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
