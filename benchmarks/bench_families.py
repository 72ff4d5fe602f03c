"""One row per CLIP family (printed figures, never asserted): a CoOp text step (text features of every class, logits
for 32 image features, cross-entropy, backward, SGD step) with vlprompt's text path against the straightforward
computation at the tower's full context length (77 tokens; PE-Core's 32; SigLIP's 64), at the family's full-size
open_clip configuration with random weights, fp32, the two alternated in one process.

    .venv/bin/python benchmarks/bench_families.py [--classes 100] [--repeats 3] [--families all|causal|bidirectional]

Causal towers pooled at their end-of-text token take the fast path (truncation and the shared prefix: exact, tested
in tests/test_families.py). Bidirectional towers (SigLIP, the small MobileCLIP towers) take the dense path, the only
exact one there: every class at full length, so its row measures what computing the blocks from their parts with the
fused attention kernel, and queries only at the pooled row in the last block, saves over open_clip's own blocks.
SigLIP's tokenizer needs a hub; the row uses a local one of its kind (tests/support.build_tokenizer), which changes
nothing in the tower's work (every prompt is 64 positions).
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
BIDIRECTIONAL = {"SigLIP (ViT-B-16-SigLIP)": "ViT-B-16-SigLIP", "MobileCLIP (MobileCLIP-S2)": "MobileCLIP-S2"}


def siglip_file(arch: str, folder: str) -> str:
    """``arch``'s full-size configuration with a local tokenizer of SigLIP's kind, as an architecture file."""
    import copy
    import json

    import open_clip

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from support import SIGLIP_WORDS, build_tokenizer

    cfg = copy.deepcopy(open_clip.get_model_config(arch))
    cfg["text_cfg"].update(vocab_size=3 + len(SIGLIP_WORDS), hf_tokenizer_name=build_tokenizer(f"{folder}/tokenizer"))
    path = f"{folder}/{arch}.json"
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--families", choices=["all", "causal", "bidirectional"], default="all")
    args = ap.parse_args(argv)
    import tempfile

    tmp = tempfile.mkdtemp(prefix="bench-families-")
    rows = {**(FAMILIES if args.families != "bidirectional" else {}),
            **(BIDIRECTIONAL if args.families != "causal" else {})}
    names = class_names(args.classes)
    print(f"CoOp text step, {args.classes} classes, batch 32, fp32, {torch.get_num_threads()} thread(s)")
    print(f"{'family':>38} {'width x layers':>15} {'context':>8} {'path':>6} {'vlprompt s':>11} {'reference s':>12} "
          f"{'speed-up':>9}")
    for label, arch in rows.items():
        bb = vp.load_backbone(siglip_file(arch, tmp) if "SigLIP" in arch else arch, pretrained="random")
        torch.manual_seed(0)
        learner = vp.CoOp(bb, names, n_ctx=16)
        opt = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9)
        feats = F.normalize(torch.randn(32, bb.embed_dim), dim=-1)
        labels = torch.randint(0, args.classes, (32,))
        t = alternate({"fast": lambda: _text_step(learner, feats, labels, opt, reference=False),
                       "reference": lambda: _text_step(learner, feats, labels, opt, reference=True)}, args.repeats)
        shape = f"{bb.text.width} x {len(bb.text.blocks)}"
        path = "fast" if bb.text.causal else "dense"
        print(f"{label:>38} {shape:>15} {bb.context_length:>8} {path:>6} {t['fast']:11.3f} {t['reference']:12.3f} "
              f"{t['reference'] / t['fast']:8.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
