"""vlprompt speed and memory benchmark (printed figures, never asserted).

    bash benchmarks/run.sh                      # set up .venv, then every section below
    .venv/bin/python benchmarks/bench.py --sections text,precision --classes 10,100

Every speed figure is a ratio against a reference measured in the same process, alternating the two so
that this machine's drifting speed affects both alike (DESIGN.md, Performance):

- machine:   matmul throughput (2048^3) in fp32 and bf16; "floor %" figures use the highest throughput
             seen in the process (measured again before each row: the machine's speed drifts).
- text:      one text-side CoOp training step (ViT-B/16 text tower, unified context M=16, class at the end:
             text features, logits for a batch of 32 image features, cross-entropy, backward, SGD step) with
             vlprompt's fast encoder against the straightforward 77-token step of the official code, at 10 /
             100 / 1000 classes in fp32 and bf16: seconds, speedup, achieved GFLOP/s, fraction of the floor
             (the floor is the work the fast path cannot avoid, see `fast_step_flops`, at this process's
             matmul peak), peak memory, max logit difference and gradient relative error to the reference.
- image:     image-tower throughput (ViT-B/16, batch 32) of vlprompt's encoder against open_clip's
             encode_image in fp32 and bf16: images/s, speedup, GFLOP/s, fraction of the matmul peak.
- precision: how far bf16 moves image+text logits and predictions from fp32 (same random weights).
- methods:   step time of every training method as a ratio of CoOp's (feature-bank mode: the step is the
             text pass plus the method's loss; image features are stored).
- cocoop:    one CoCoOp training step (per-image prompts for every class; batch 1 as its recipe) and its
             test evaluation (16 images), vlprompt's fast path against the 77-token construction, fp32 and
             bf16: seconds, images/s, speedups, max logit difference.
- fits:      fit time of the fitted baselines: the linear probe's C search, Tip-Adapter's alpha/beta search.
- shared:    the tiny CoOp run alone and beside one and two busy processes, with vlprompt's thread choice,
             every core (torch's default) and --threads auto.
- e2e:       a full 16-shot Caltech-101 CoOp run (paper recipe: 200 epochs, 10,000 steps) with ViT-B/16
             in feature-bank mode, then its test evaluation; wall time split into feature extraction,
             training and evaluation. Needs the Caltech-101 images (VLPROMPT_DATA, see README).

The backbone is randomly initialised: cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED.*")

import vlprompt as vp  # noqa: E402
from vlprompt.text import reference_encode  # noqa: E402

ARCH = "ViT-B-16"
WORDS = ("dog cat face leopard motorbike accordion airplane anchor ant barrel bass beaver brain buddha butterfly "
         "camera cannon car side ceiling fan cellphone chair chandelier cougar body crab crayfish crocodile "
         "cup dalmatian dollar bill dolphin dragonfly electric guitar elephant emu euphonium ewer ferry "
         "flamingo garfield gerenuk gramophone grand piano hawksbill headphone hedgehog helicopter ibis "
         "inline skate joshua tree kangaroo ketch lamp laptop llama lobster lotus mandolin mayfly menorah "
         "metronome minaret nautilus octopus okapi pagoda panda pigeon pizza platypus pyramid revolver "
         "rhino rooster saxophone schooner scissors scorpion sea horse snoopy soccer ball stapler "
         "starfish stegosaurus stop sign strawberry sunflower tick trilobite umbrella watch water lilly "
         "wheelchair wild cat windsor chair wrench yin yang").split()


def class_names(n: int) -> list[str]:
    """``n`` distinct names of one to three words (about 2 BPE tokens on average, like the benchmarks')."""
    names, i = [], 0
    while len(names) < n:
        k = 1 + i % 3
        name = " ".join(WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(k))
        if i >= len(WORDS):
            name += f" {i // len(WORDS)}"
        if name not in names:
            names.append(name)
        i += 1
    return names


# ---------------------------------------------------------------------------------------------------
# measuring helpers


def peak_rss_reset() -> None:
    """Reset this process's peak resident memory (Linux: writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def memory_probe(n_cls: int, precision: str, reference: bool) -> dict:
    """Peak memory of one text-side step, measured in a fresh process (this one's peak holds every
    earlier measurement): the process peak, and the step's peak over the memory held before it."""
    import subprocess

    cmd = [sys.executable, __file__, "--memory-probe", f"{n_cls},{precision},{int(reference)}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"peak_gb": float("nan"), "step_gb": float("nan"), "error": res.stderr.strip()[-300:]}


def _memory_probe_child(spec: str) -> None:
    n_cls, precision, reference = spec.split(",")
    bb = vp.load_backbone(ARCH, pretrained=None, precision=precision)
    torch.manual_seed(0)
    learner = vp.CoOp(bb, class_names(int(n_cls)), n_ctx=16)
    feats, labels = torch.randn(32, bb.embed_dim), torch.randint(0, int(n_cls), (32,))
    opt = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9)
    # Measured cold: a warm-up step would leave its freed memory in the allocator, hiding the step's peak.
    peak_rss_reset()
    before = rss_kb("VmRSS")
    _text_step(learner, feats, labels, opt, bool(int(reference)))
    peak = rss_kb("VmHWM")
    print(json.dumps({"peak_gb": peak / 2**20, "step_gb": max(peak - before, 0) / 2**20}))


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def best_peak(out: dict, precision: str) -> float:
    """The highest 2048^3 matmul throughput seen in this process for ``precision``, measured once more now.
    This machine's speed drifts by up to 1.7x, and the highest figure gives the most conservative
    fraction of the floor."""
    seen = out.setdefault("matmul_peaks_seen", {}).setdefault(precision, [])
    seen.append(matmul_peak({"fp32": torch.float32, "bf16": torch.bfloat16}[precision]))
    first = out.get("machine", {}).get("matmul_gflops", {}).get(precision)
    return max(seen + ([first] if first else []))


def alternate(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, calls interleaved (one warm-up call each)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------------
# FLOP counts (multiply-add = 2 FLOPs; backward computes input gradients only: the weights are frozen)


def _layer_flops(tokens: int, keys_per_token: float, width: int, mlp: int) -> float:
    """Forward + input-gradient backward FLOPs of one transformer layer over ``tokens`` queries."""
    linear = 2 * tokens * (4 * width * width + 2 * width * mlp)  # qkv + out + mlp
    attention = 4 * tokens * keys_per_token * width  # scores + weighted sum
    return 2 * linear + 3 * attention  # backward: dX of each linear; dQ, dK, dV of attention


def reference_step_flops(n_cls: int, bb) -> float:
    """The official step: every class padded to the full context, every layer, full causal attention."""
    length, width, layers = bb.context_length, bb.ctx_dim, len(bb.text.blocks)
    mlp = bb.text.blocks[0].mlp.c_fc.out_features
    return layers * _layer_flops(n_cls * length, length, width, mlp)


def fast_step_flops(learner) -> float:
    """The floor: SOS + context once, each class's own tokens (name, '.', EOT) against the shared prefix;
    in the last layer keys/values for every token but queries, projection and MLP only at the EOT rows."""
    bb = learner.backbone
    width, layers = bb.ctx_dim, len(bb.text.blocks)
    mlp = bb.text.blocks[0].mlp.c_fc.out_features
    p = 1 + learner.n_ctx
    own = (learner.eot_idx - learner.n_ctx).tolist()  # tokens per class after the prefix
    tokens = p + sum(own)
    keys = p * (p + 1) / 2 + sum(s * p + s * (s + 1) / 2 for s in own)  # causal keys seen, summed
    full = (layers - 1) * _layer_flops(tokens, keys / tokens, width, mlp)
    kv_last = 2 * 2 * tokens * 2 * width * width  # keys and values of the last layer, fwd + bwd
    rows_last = _layer_flops(len(own), (keys / tokens), width, mlp) - 2 * 2 * len(own) * 2 * width * width
    return full + kv_last + rows_last


# ---------------------------------------------------------------------------------------------------
# sections


def section_machine(out: dict) -> None:
    torch.manual_seed(0)
    out["machine"] = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                      "torch": torch.__version__,
                      "matmul_gflops": {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}}
    m = out["machine"]
    print(f"machine: {m['threads']} threads; 2048^3 matmul fp32 {m['matmul_gflops']['fp32']:.0f} GFLOP/s, "
          f"bf16 {m['matmul_gflops']['bf16']:.0f} GFLOP/s")


def _text_step(learner, image_feats, labels, opt, reference: bool, chunk: int = 0):
    """One text-side CoOp step. ``chunk``: the reference in class chunks (same work, bounded memory)."""
    opt.zero_grad(set_to_none=True)
    if not reference:
        loss = F.cross_entropy(learner(image_feats), labels)
        loss.backward()
    elif not chunk:
        text = F.normalize(reference_encode(learner.backbone, learner.prompt_embeddings(), learner.eot_idx), dim=-1)
        loss = F.cross_entropy(learner.logits(image_feats, text), labels)
        loss.backward()
    else:  # each chunk: 77-token forward + backward of its own classes (the CE coupling is negligible work)
        prompts = learner.prompt_embeddings
        for start in range(0, learner.n_cls, chunk):
            rows = slice(start, start + chunk)
            text = F.normalize(reference_encode(learner.backbone, prompts()[rows], learner.eot_idx[rows]), dim=-1)
            logits = learner.logits(image_feats, text)
            F.cross_entropy(logits, labels % logits.shape[1]).backward()
    opt.step()


def section_text(out: dict, classes: list[int], repeats: int, chunk_above: int) -> None:
    rows = []
    print("\ntext-side training step, ViT-B/16 text tower, M=16 unified context, class at the end, batch 32")
    print(f"{'classes':>7} {'prec':>5} {'ref s':>8} {'fast s':>8} {'speedup':>8} {'vs fp32':>8} {'GFLOP/s':>8} "
          f"{'floor %':>8} {'peak GB':>8} {'+GB':>6} {'ref +GB':>8} {'logit diff':>10} {'grad err':>9}")
    fp32_ref: dict = {}
    for precision in ("fp32", "bf16"):
        bb = vp.load_backbone(ARCH, pretrained=None, precision=precision)
        for n_cls in classes:
            torch.manual_seed(0)
            learner = vp.CoOp(bb, class_names(n_cls), n_ctx=16)
            feats = torch.randn(32, bb.embed_dim)
            labels = torch.randint(0, n_cls, (32,))
            opt = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
            chunk = 100 if n_cls > chunk_above else 0
            # Exactness of this very configuration: logits and the gradient of the same loss.
            with torch.no_grad():
                ref_text = F.normalize(reference_encode(bb, learner.prompt_embeddings(), learner.eot_idx)
                                       if not chunk else torch.cat([
                                           reference_encode(bb, learner.prompt_embeddings()[i:i + chunk],
                                                            learner.eot_idx[i:i + chunk])
                                           for i in range(0, n_cls, chunk)]), dim=-1)
            fast_logits = learner(feats)
            logit_diff = (fast_logits - learner.logits(feats, ref_text)).abs().max().item()
            grad_err = float("nan")
            if not chunk:
                g_fast = torch.autograd.grad(F.cross_entropy(fast_logits, labels), learner.ctx)[0]
                ref_w = F.normalize(reference_encode(bb, learner.prompt_embeddings(), learner.eot_idx), dim=-1)
                g_ref = torch.autograd.grad(F.cross_entropy(learner.logits(feats, ref_w), labels), learner.ctx)[0]
                grad_err = ((g_fast - g_ref).norm() / g_ref.norm()).item()
            n_rep = repeats if n_cls <= 100 else max(1, repeats // 2)
            t = alternate({"ref": lambda: _text_step(learner, feats, labels, opt, True, chunk),
                           "fast": lambda: _text_step(learner, feats, labels, opt, False)}, n_rep)
            mem = memory_probe(n_cls, precision, reference=False)
            peak_gb, step_gb = mem["peak_gb"], mem["step_gb"]
            ref_gb = memory_probe(n_cls, precision, reference=True)["step_gb"] if not chunk else float("nan")
            flops = fast_step_flops(learner)
            gflops = flops / t["fast"] / 1e9
            if precision == "fp32":
                fp32_ref[n_cls] = t["ref"]
            vs_fp32 = fp32_ref.get(n_cls, float("nan")) / t["fast"]
            row = {"classes": n_cls, "precision": precision, "ref_s": t["ref"], "fast_s": t["fast"],
                   "speedup": t["ref"] / t["fast"], "speedup_vs_fp32_ref": vs_fp32, "floor_gflop": flops / 1e9,
                   "ref_gflop": reference_step_flops(n_cls, bb) / 1e9, "achieved_gflops": gflops,
                   "fraction_of_floor": gflops / best_peak(out, precision), "peak_gb": peak_gb, "step_gb": step_gb,
                   "ref_step_gb": ref_gb, "max_logit_diff": logit_diff, "grad_rel_err": grad_err,
                   "reference_chunked": bool(chunk)}
            rows.append(row)
            note = " (ref in chunks of 100)" if chunk else ""
            print(f"{n_cls:>7} {precision:>5} {t['ref']:8.3f} {t['fast']:8.3f} {row['speedup']:7.1f}x {vs_fp32:7.1f}x "
                  f"{gflops:8.0f} "
                  f"{100 * row['fraction_of_floor']:7.0f}% {peak_gb:8.2f} {step_gb:6.2f} {ref_gb:8.2f} "
                  f"{logit_diff:10.2e} {grad_err:9.2e}{note}", flush=True)
        del bb
    out["text"] = rows
    print("speedup: against the 77-token reference in the same precision; vs fp32: against the fp32 reference. "
          "floor %: floor FLOPs at the highest 2048^3 matmul throughput this process has seen, over the fast "
          "step's time. peak GB: a "
          "fresh process running the fast step (model included); +GB: the fast step's own peak; ref +GB: the "
          "77-token step's own peak. logit diff / grad err: fast against the reference, same precision.")


def image_forward_flops(bb, shortcut: bool) -> float:
    """Forward FLOPs of one image through a ViT tower (patch embedding, every layer's projections, MLP and
    attention); with the class-token shortcut the last layer computes keys/values for every token but the
    rest for the class token only."""
    vis = bb.model.visual
    width, layers = vis.conv1.out_channels, len(vis.transformer.resblocks)
    mlp = vis.transformer.resblocks[0].mlp.c_fc.out_features
    patches = vis.grid_size[0] * vis.grid_size[1]
    n = patches + 1
    embed = 2 * patches * width * vis.conv1.weight[0].numel()
    layer = 2 * n * (4 * width * width + 2 * width * mlp) + 4 * n * n * width
    last = layer if not shortcut else 2 * n * 2 * width * width + 2 * (2 * width * width + 2 * width * mlp) + 4 * n * width
    return embed + (layers - 1) * layer + last


def section_image(out: dict, batch: int, repeats: int) -> None:
    """Image-tower throughput: vlprompt's encoder (class-token shortcut + fused attention for ViTs) against
    open_clip's own forward, alternated in one process, and how far apart their features are."""
    print(f"\nimage tower, {ARCH}, batch {batch}: vlprompt's encoder against open_clip's encode_image "
          "(GELU: the open_clip architecture; QuickGELU: the OpenAI weights' activation)")
    print(f"{'prec':>5} {'activation':>10} {'open_clip img/s':>16} {'vlprompt img/s':>15} {'speedup':>8} "
          f"{'GFLOP/s':>8} {'floor %':>8} {'rel diff':>9}")
    rows = []
    for precision, quick_gelu in (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)):
        bb = vp.load_backbone(ARCH, pretrained=None, precision=precision, quick_gelu=quick_gelu)
        x = torch.randn(batch, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))

        def reference(bb=bb, x=x):
            with torch.inference_mode():
                return bb.model.encode_image(x.to(bb.dtype)).float()

        def fast(bb=bb, x=x):
            return bb.encode_images(x)

        diff = ((fast() - reference()).abs().max() / reference().abs().max()).item()
        t = alternate({"ref": reference, "fast": fast}, repeats)
        flops = image_forward_flops(bb, bb.fast_image_unsupported is None)
        row = {"precision": precision, "quick_gelu": quick_gelu, "ref_img_s": batch / t["ref"],
               "fast_img_s": batch / t["fast"], "speedup": t["ref"] / t["fast"],
               "gflops": batch * flops / t["fast"] / 1e9, "rel_diff": diff, "gflop_per_image": flops / 1e9}
        row["floor_pct"] = 100 * row["gflops"] / best_peak(out, precision)
        rows.append(row)
        print(f"{precision:>5} {'QuickGELU' if quick_gelu else 'GELU':>10} {row['ref_img_s']:16.2f} "
              f"{row['fast_img_s']:15.2f} {row['speedup']:7.2f}x {row['gflops']:8.0f} {row['floor_pct']:7.0f}% "
              f"{diff:9.1e}", flush=True)
    out["image"] = rows


def _test_subset(n: int):
    root = os.environ.get("VLPROMPT_DATA", str(Path.home() / ".cache" / "vlprompt-data"))
    if not (Path(root) / "caltech-101").is_dir():
        return None, None
    ds = vp.load_dataset("caltech101", root, shots=1)
    step = max(1, len(ds.test) // n)
    return ds, ds.test[::step][:n]


def section_precision(out: dict, n_images: int) -> None:
    from vlprompt.data import test_transform
    from vlprompt.engine.features import encode_items

    ds, items = _test_subset(n_images)
    print(f"\nbf16 against fp32 (same random {ARCH} weights)")
    res = {}
    torch.manual_seed(0)
    logits, text = {}, {}
    names = ds.classnames if ds else class_names(100)
    for precision in ("fp32", "bf16"):
        bb = vp.load_backbone(ARCH, pretrained=None, precision=precision)
        torch.manual_seed(0)
        learner = vp.CoOp(bb, names, n_ctx=16)
        with torch.no_grad():
            text[precision] = learner.text_features()
            if items:
                feats, labels = encode_items(bb, items, test_transform(bb.image_size), 50, progress=False)
            else:
                feats, labels = torch.randn(n_images, bb.embed_dim, generator=torch.Generator().manual_seed(1)), None
            logits[precision] = learner.logits(feats, text[precision])
    d_text = (text["fp32"] - text["bf16"]).abs().max().item()
    d_logit = (logits["fp32"] - logits["bf16"]).abs().max().item()
    agree = (logits["fp32"].argmax(1) == logits["bf16"].argmax(1)).float().mean().item()
    res = {"images": len(items) if items else n_images, "real_images": bool(items), "max_text_feature_diff": d_text,
           "max_logit_diff": d_logit, "top1_agreement": agree}
    if items:
        for precision in ("fp32", "bf16"):
            res[f"accuracy_{precision}"] = 100 * (logits[precision].argmax(1) == labels).float().mean().item()
    out["precision"] = res
    print(f"  {res['images']} {'Caltech-101 test images' if items else 'random image features'}: max |text "
          f"feature diff| {d_text:.2e}, max |logit diff| {d_logit:.3f} (logit scale 100), top-1 agreement "
          f"{100 * agree:.1f}%" + (f", accuracy fp32 {res['accuracy_fp32']:.2f}% vs bf16 {res['accuracy_bf16']:.2f}%"
                                   " (random weights: only the difference means anything)" if items else ""))


def section_methods(out: dict, n_cls: int, repeats: int) -> None:
    from vlprompt.engine.trainer import TrainBatch
    from vlprompt.methods import METHODS
    from vlprompt.methods.base import method_config

    ds, _ = _test_subset(1)
    bb = vp.load_backbone(ARCH, pretrained=None, precision="bf16")
    print(f"\nmethod step time in feature-bank mode, {ARCH} bf16, {n_cls} classes, batch 32 (ratio to CoOp)")
    steps, rows = {}, []
    for name, method in METHODS.items():
        if not method.trains or method.needs.fitted:  # fitted methods: the fits section
            continue
        cfg = vp.RunConfig(method=name, backbone=ARCH, pretrained="random", precision="bf16", progress=False)
        try:
            torch.manual_seed(0)
            config = method_config(method, cfg, ds)
            learner = method.build(bb, class_names(n_cls), config)
            objective = method.objective(learner, config)
            views = objective.view_transforms(bb)
            gen = torch.Generator().manual_seed(0)
            batch = TrainBatch({v: torch.randn(32, bb.embed_dim, generator=gen) for v in views},
                               torch.arange(32) % n_cls, torch.arange(32))
            opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.002, momentum=0.9)

            def step(learner=learner, objective=objective, batch=batch, opt=opt):
                opt.zero_grad(set_to_none=True)
                objective.loss(learner, batch)[0].backward()
                opt.step()

            steps[name] = step
        except Exception as exc:  # a method that needs more than a synthetic batch is reported, not hidden
            rows.append({"method": name, "error": str(exc).splitlines()[0]})
    times = alternate(steps, repeats)
    for name, sec in times.items():
        rows.append({"method": name, "step_s": sec, "ratio_to_coop": sec / times["coop"]})
    for row in rows:
        if "error" in row:
            print(f"  {row['method']:<14} n/a: {row['error']}")
        else:
            print(f"  {row['method']:<14} {row['step_s']:7.3f} s  {row['ratio_to_coop']:5.2f}x CoOp")
    out["methods"] = rows


def _cocoop_reference(learner, feats):
    """CoCoOp's official construction: every image's full 77-token prompts for all classes."""
    f = F.normalize(feats.float(), dim=-1)
    pi = learner.meta_net(f)
    rows = []
    for b in range(f.shape[0]):
        ctx = (learner.ctx + pi[b]).unsqueeze(0).expand(len(learner.classnames), -1, -1)
        g = reference_encode(learner.backbone, torch.cat([learner.token_prefix, ctx, learner.token_suffix], 1),
                             learner.eot_idx)
        rows.append(learner.backbone.logit_scale * F.normalize(g, dim=-1) @ f[b])
    return torch.stack(rows)


def section_cocoop(out: dict, n_cls: int, batch: int, test_images: int, repeats: int) -> None:
    from vlprompt.methods.cocoop import CoCoOp

    rows = []
    for precision in ("fp32", "bf16"):
        bb = vp.load_backbone(ARCH, pretrained=None, precision=precision)
        torch.manual_seed(0)
        learner = CoCoOp(bb, class_names(n_cls))
        gen = torch.Generator().manual_seed(0)
        feats = torch.randn(batch, bb.embed_dim, generator=gen)
        test = torch.randn(test_images, bb.embed_dim, generator=gen)
        y = torch.arange(batch) % n_cls

        def step(fn):
            learner.zero_grad(set_to_none=True)
            F.cross_entropy(fn(learner, feats), y).backward()

        def evaluate(fn):
            with torch.no_grad():
                fn(learner, test)

        fast, ref = (lambda m, x: m(x)), _cocoop_reference
        t = alternate({"fast": lambda: step(fast), "ref": lambda: step(ref)}, repeats)
        e = alternate({"fast": lambda: evaluate(fast), "ref": lambda: evaluate(ref)}, repeats)
        with torch.no_grad():
            diff = float((fast(learner, feats) - ref(learner, feats)).abs().max())
        row = {"precision": precision, "classes": n_cls, "batch": batch, "step_fast_s": t["fast"],
               "step_ref_s": t["ref"], "step_speedup": t["ref"] / t["fast"], "test_images": test_images,
               "eval_fast_img_s": test_images / e["fast"], "eval_ref_img_s": test_images / e["ref"],
               "eval_speedup": e["ref"] / e["fast"], "max_logit_diff": diff}
        rows.append(row)
        print(f"cocoop {precision}: step (batch {batch}, {n_cls} classes) {t['fast']:.3f} s vs {t['ref']:.3f} s "
              f"77-token = {row['step_speedup']:.1f}x; test {row['eval_fast_img_s']:.1f} vs "
              f"{row['eval_ref_img_s']:.2f} img/s = {row['eval_speedup']:.1f}x; max logit diff {diff:.1e}")
    out["cocoop"] = rows


def section_fits(out: dict, n_cls: int, shots: int) -> None:
    """Fit time of the methods that are fitted rather than trained, on random features of the size of a
    ``shots``-shot training set (lpclip's 23 L-BFGS fits; Tip-Adapter's 4000-pair search)."""
    import torch.nn.functional as F2

    from vlprompt.methods.linear_probe import fit_logistic, search_c
    from vlprompt.methods.tip_adapter import search_alpha_beta

    d = 512
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_cls * shots, d, generator=gen).numpy()
    y = (torch.arange(n_cls * shots) % n_cls).numpy()
    vx, vy = x[: n_cls * 4], y[: n_cls * 4]
    t = time.perf_counter()
    search_c(lambda c: float((fit_logistic(x, y, c, 1000).predict(vx) == vy).mean()), 8)
    probe_s = time.perf_counter() - t
    keys = F2.normalize(torch.from_numpy(x), dim=-1)
    values = F2.one_hot(torch.from_numpy(y), n_cls).float()
    text = F2.normalize(torch.randn(n_cls, d, generator=gen), dim=-1)
    t = time.perf_counter()
    search_alpha_beta(torch.from_numpy(vx), torch.from_numpy(vy), text, keys, values, 12, 5, 3.0, 1.0)
    tip_s = time.perf_counter() - t
    print(f"fits, {n_cls} classes x {shots} shots, d={d}: linear probe C search {probe_s:.1f} s; "
          f"Tip-Adapter alpha/beta search {tip_s:.1f} s")
    out["fits"] = {"classes": n_cls, "shots": shots, "linear_probe_s": probe_s, "tip_adapter_search_s": tip_s}


def section_checkpoint(out: dict, n_cls: int, epochs: int) -> None:
    """What checkpoints cost: the same feature-bank CoOp run (cheapest steps: the worst case for the ratio) with
    a checkpoint at every epoch end (the default) and at every step, against none, in one process."""
    from vlprompt.data import make_synthetic_dataset
    from vlprompt.engine.checkpoint import Checkpointer
    from vlprompt.engine.trainer import FeatureBank, TrainSettings, train_prompt
    from vlprompt.methods import get_method
    from vlprompt.methods.base import method_config

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = vp.load_backbone(ARCH, precision="bf16")
        root = make_synthetic_dataset(str(Path(tmp) / "d"), n_train_per_class=2, n_test_per_class=1, seed=0)
        ds = vp.load_dataset(root, shots=2)
        names = class_names(n_cls)
        method = get_method("coop")
        cfg = vp.RunConfig(dataset=root, backbone=ARCH, pretrained="random", epochs=epochs, batch_size=4,
                           progress=False)
        settings = TrainSettings.from_config(cfg, epochs)
        objective = method.objective(None, method_config(method, cfg, ds))
        source = FeatureBank(bb, ds.train, objective.view_transforms(bb), settings, False, bank_views=2)
        # the text side trains n_cls prompts; the synthetic images' labels (8 classes) index the first of them
        times, size = {}, 0
        for label, every, save in (("none", 0, False), ("epoch", 0, True), ("step", 1, True), ("none2", 0, False)):
            torch.manual_seed(0)
            learner = method.build(bb, names, method_config(method, cfg, ds))
            ckpt = Checkpointer(Path(tmp) / label, {"bench": label}, every, resume=False) if save else None
            t = time.perf_counter()
            history = train_prompt(learner, objective, source, len(ds.train), settings, progress=False,
                                   checkpoint=ckpt)
            times[label] = (time.perf_counter() - t) / history["steps"]
            if ckpt is not None:
                size = ckpt.path.stat().st_size
        steps_per_epoch = history["steps"] // epochs
    base = min(times["none"], times["none2"])
    res = {"classes": n_cls, "steps_per_epoch": steps_per_epoch, "step_s": base, "checkpoint_bytes": size,
           "epoch_checkpoints_ratio": times["epoch"] / base, "step_checkpoints_ratio": times["step"] / base,
           "save_s": (times["step"] - base)}
    out["checkpoint"] = res
    print(f"\ncheckpoints, CoOp feature bank, {ARCH} bf16, {n_cls} classes ({steps_per_epoch} steps/epoch): step "
          f"{base * 1e3:.1f} ms; every epoch x{res['epoch_checkpoints_ratio']:.3f}, every step "
          f"x{res['step_checkpoints_ratio']:.3f} (one save about {res['save_s'] * 1e3:.1f} ms, {size / 1e3:.0f} kB)")


def section_e2e(out: dict, bank_views: int, precision: str, epochs: int | None) -> None:
    root = os.environ.get("VLPROMPT_DATA", str(Path.home() / ".cache" / "vlprompt-data"))
    if not (Path(root) / "caltech-101").is_dir():
        print("\ne2e: skipped (no Caltech-101 images; run scripts/unpack_data.sh or set VLPROMPT_DATA)")
        return
    print(f"\nend to end: 16-shot Caltech-101 CoOp, {ARCH} (random weights) {precision}, feature bank "
          f"({bank_views} views), {'paper recipe' if epochs is None else f'{epochs} epochs'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = vp.RunConfig(dataset="caltech101", root=root, backbone=ARCH, pretrained="random", shots=16, seed=1,
                           precision=precision, train_mode="feature_bank", bank_views=bank_views, epochs=epochs,
                           feature_cache=False, output=str(Path(tmp) / "run"), progress=True)
        t = time.perf_counter()
        m = vp.run(cfg)
        wall = time.perf_counter() - t
    tm = m["timings"]
    res = {"wall_s": wall, "steps": m["train"]["steps"], "bank_views": bank_views, "precision": precision,
           "load_s": tm["load_dataset_s"] + tm["load_backbone_s"], "feature_bank_s": tm.get("feature_bank_s", 0.0),
           "train_s": tm["train_s"], "encode_test_s": tm["encode_test_s"], "evaluate_s": tm["evaluate_s"],
           "n_train": m["data"]["n_train"], "n_test": m["data"]["n_test"]}
    res["train_step_s"] = res["train_s"] / max(res["steps"], 1)
    per_view = res["feature_bank_s"] / bank_views
    res["projected_wall_s_by_views"] = {k: wall + (k - bank_views) * per_view for k in (1, 2, 4, 10)}
    out["e2e"] = res
    print(f"  wall {wall / 60:.1f} min = load {res['load_s']:.0f} s + feature bank {res['feature_bank_s']:.0f} s "
          f"({res['n_train']} images x {bank_views} views) + training {res['train_s']:.0f} s ({res['steps']} steps, "
          f"{res['train_step_s']:.3f} s/step) + test encoding {res['encode_test_s']:.0f} s ({res['n_test']} images) "
          f"+ evaluation {res['evaluate_s']:.1f} s")
    print("  the bank costs the same for every view (" + f"{per_view:.0f} s per view); the same run with K views: "
          + ", ".join(f"K={k} {v / 60:.1f} min" for k, v in res["projected_wall_s_by_views"].items()))


# Two kinds of busy neighbour: a single-threaded CPU loop, and another training (a matmul loop on torch's
# default threads, one per core).
BUSY = {"python loop": "while True:\n    pass\n",
        "torch, every core": "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"}


def section_shared(out: dict, epochs: int, repeats: int) -> None:
    """A run on a shared machine: the tiny CoOp run (exact mode, tiny ViT, generated images) alone, and beside
    one and two busy processes of each kind in `BUSY`, with vlprompt's default choice (one thread for this
    small model), torch's default (every core) and ``--threads auto`` (the free cores), alternated in one
    process. Each figure is also given over the quiet run with vlprompt's choice."""
    import subprocess

    from vlprompt.data import make_synthetic_dataset

    modes = {"chosen": None, "all cores": str(os.cpu_count() or 1), "auto": "auto"}
    res: dict = {"epochs": epochs, "cores": os.cpu_count(), "seconds": {}, "threads_used": {}}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = make_synthetic_dataset(str(Path(tmp) / "d"), n_train_per_class=4, n_test_per_class=5, seed=0)

        def one_run(threads, i):
            cfg = vp.RunConfig(dataset=root, backbone="vlprompt-tiny-ViT", pretrained="random", shots=4, seed=1,
                               epochs=epochs, threads=threads, feature_cache=False, progress=False,
                               output=str(Path(tmp) / f"r{i}"))
            t = time.perf_counter()
            m = vp.run(cfg)
            return time.perf_counter() - t, m["execution"]["threads"]["threads"]

        one_run("1", "warm")
        loads = [("quiet", 0)] + [(kind, n) for kind in BUSY for n in (1, 2)]
        for kind, busy in loads:
            procs = [subprocess.Popen([sys.executable, "-c", BUSY[kind]]) for _ in range(busy)]
            try:
                time.sleep(1.0 if busy else 0.0)
                times = {m: [] for m in modes}
                used = {}
                for r in range(repeats):
                    for mode, threads in modes.items():
                        seconds, used[mode] = one_run(threads, f"{kind}-{busy}-{mode}-{r}")
                        times[mode].append(seconds)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            label = "alone" if not busy else f"{busy} x {kind}"
            res["seconds"][label] = {m: statistics.median(v) for m, v in times.items()}
            res["threads_used"][label] = used
    quiet = res["seconds"]["alone"]["chosen"]
    print(f"\nshared machine: the tiny CoOp run ({epochs} epochs, exact mode), median of {repeats}; "
          f"x = over the quiet run with vlprompt's choice ({quiet:.2f} s)")
    print(f"  {'beside':<26}" + "".join(f"{m:>22}" for m in modes))
    for label, row in res["seconds"].items():
        cells = "".join(f"{row[m]:>9.2f} s x{row[m] / quiet:<5.2f}({res['threads_used'][label][m]}t)"
                        for m in modes)
        print(f"  {label:<26}{cells}")
    out["shared"] = res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections",
                    default="machine,text,image,precision,methods,cocoop,fits,checkpoint,shared,e2e")
    ap.add_argument("--cocoop-batch", type=int, default=1, help="images per CoCoOp step (its recipe: 1)")
    ap.add_argument("--classes", default="10,100,1000", help="class counts for the text section")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-above", type=int, default=200,
                    help="run the 77-token reference in chunks of 100 classes above this many (memory)")
    ap.add_argument("--precision-images", type=int, default=200)
    ap.add_argument("--method-classes", type=int, default=100)
    ap.add_argument("--bank-views", type=int, default=vp.RunConfig.bank_views)
    ap.add_argument("--e2e-precision", default="bf16")
    ap.add_argument("--e2e-epochs", type=int, default=None, help="default: the paper recipe (200)")
    ap.add_argument("--shared-epochs", type=int, default=100, help="epochs of the tiny run in the shared section")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one step in a fresh process
    args = ap.parse_args(argv)
    vp.keep_freed_memory()  # as the command line does: every figure is of the configuration users run
    if args.memory_probe:
        _memory_probe_child(args.memory_probe)
        return 0
    sections = args.sections.split(",")
    out: dict = {}
    if "machine" in sections:
        section_machine(out)
    if "text" in sections:
        section_text(out, [int(c) for c in args.classes.split(",")], args.repeats, args.chunk_above)
    if "image" in sections:
        section_image(out, 32, args.repeats)
    if "precision" in sections:
        section_precision(out, args.precision_images)
    if "methods" in sections:
        section_methods(out, args.method_classes, args.repeats)
    if "cocoop" in sections:
        section_cocoop(out, args.method_classes, args.cocoop_batch, 16, args.repeats)
    if "fits" in sections:
        section_fits(out, args.method_classes, 16)
    if "checkpoint" in sections:
        section_checkpoint(out, args.method_classes, 5)
    if "shared" in sections:
        section_shared(out, args.shared_epochs, args.repeats)
    if "e2e" in sections:
        section_e2e(out, args.bank_views, args.e2e_precision, args.e2e_epochs)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
