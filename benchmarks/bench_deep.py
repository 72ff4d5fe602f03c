"""Deep-prompt (IVLP) speed and memory benchmark (printed figures, never asserted).

    .venv/bin/python benchmarks/bench_deep.py                  # every section
    .venv/bin/python benchmarks/bench_deep.py --sections step --classes 100

Each speed figure is a ratio against a reference measured in the same process, the two alternated (see
bench.py). The backbone is a randomly initialised ViT-B/16 (cost does not depend on the weights).

- step:   one whole IVLP training step (2+2 context, depth 12 in both towers, the MaPLe paper's recipe) at
          100 classes and batch 4: text features of every class, the prompted image tower on the batch,
          cross-entropy, backward, SGD step. vlprompt (shared-prefix text path with the deep rows in the
          prefix, class-token last layer in the image tower) against the straightforward computation (every
          class's 77-token prompt through every text block with the rows replaced, then the prompted image
          tower block by block through open_clip's own blocks), fp32 and bf16; and the text side alone.
- image:  the prompted image tower's forward + backward (batch 4 and 32) in GFLOP/s and as a fraction of
          this machine's matmul peak.
- eval:   test images per second through a prompted learner against the frozen tower (batch 100).
- memory: peak memory of one step at batch 4 and 32 (a fresh process each).
- coupled: a MaPLe step (2 prompts, depth 9) and a PromptSRC step (4 + 4, depth 9, its losses with the frozen
          model as teacher) at 100 classes, batch 4, against the straightforward computation (77-token text per
          class, the prompted image tower through open_clip's blocks and, for PromptSRC, a separate frozen image
          forward through open_clip as the official code keeps a second model), fp32 and bf16.
- tcp:    one TCP text forward + backward (text features of every class, cross-entropy on a fixed batch of image
          features, backward to the context and the meta-net) at 100 classes, class rows at block 8: the
          straightforward computation (every class's 77 tokens through open_clip's blocks) against the
          truncated path (each class computed in full up to its EOT) and the shared-prefix path (SOS + context
          computed once below block 8), fp32 and bf16.
- lora:   one CLIP-LoRA training step (rank 2 on q, k, v of every block of both towers, dropout 0.25, AdamW) at
          100 classes and batch 32: vlprompt (the updates as arguments of the fast paths: truncated text, class-token
          last image layer) against the straightforward computation (every class's 77 tokens and every image token
          through every block, q, k and v as separate projections each with its own update, as the official code
          rebuilds the attention), fp32 and bf16; and the text side alone (image features fixed), exact (every class
          cut at its end token) and with prefix_masks=shared (the template's words as a shared prefix).
- methods_memory: peak memory of one step of MaPLe and PromptSRC (batch 4), TCP and CLIP-LoRA (batch 32) at 100
          classes, vlprompt and the straightforward computation (a fresh process each).
- artifacts: the saved prompt of each deep method at its base-to-new recipe on ViT-B/16 (100 classes): trainable
          parameters and the size of prompt.safetensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED.*")

import vlprompt as vp  # noqa: E402
from bench import (ARCH, _layer_flops, alternate, best_peak, class_names,  # noqa: E402
                   matmul_peak, peak_rss_reset, rss_kb)
from vlprompt.methods import METHODS  # noqa: E402
from vlprompt.methods.base import MethodConfig, PromptLayout, parse_options  # noqa: E402
from vlprompt.text import reference_encode  # noqa: E402
from vlprompt.text.fast import encode_truncated  # noqa: E402


def ivlp(bb, n_cls: int):
    method = METHODS["ivlp"]
    options = parse_options("ivlp", method.Options, {})  # 2 + 2 context, depth 12 / 12
    torch.manual_seed(0)
    return method.build(bb, class_names(n_cls), MethodConfig("ivlp", options, PromptLayout(), "", "", 4, 1,
                                                             "exact", 0))


# ---------------------------------------------------------------------------------------------------
# The straightforward computation (what the official code does, in open_clip's batch-first layout)

def reference_text(learner):
    bb = learner.backbone
    names = [n.replace("_", " ") for n in learner.classnames]
    tokens = bb.tokenize([f"{learner.phrase} {n}." for n in names])
    emb = bb.text.token_embedding(tokens).float()
    c, n = len(names), learner.n_text
    emb = torch.cat([emb[:, :1], learner._round(learner.ctx).expand(c, -1, -1), emb[:, 1 + n:]], dim=1)
    deep = [None] + [learner._round(p) for p in learner.text_deep]
    return F.normalize(reference_encode(bb, emb, bb.eot_index(tokens), deep), dim=-1)


def reference_image(learner, images):
    bb = learner.backbone
    v = bb.model.visual
    x = v.conv1(images.to(bb.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    b = x.shape[0]
    x = torch.cat([v.class_embedding.to(x.dtype).expand(b, 1, -1), x], dim=1) + v.positional_embedding.to(x.dtype)
    prompts = learner.vision_prompts()
    n = prompts[0].shape[0]
    x = v.ln_pre(torch.cat([x, prompts[0].to(x.dtype).expand(b, -1, -1)], dim=1))
    for i, block in enumerate(v.transformer.resblocks):
        if 0 < i < len(prompts):
            x = torch.cat([x[:, :-n], prompts[i].to(x.dtype).expand(b, -1, -1)], dim=1)
        x = block(x)
    return (v.ln_post(x[:, 0]) @ v.proj).float()


def make_step(learner, images, labels, opt, reference: bool, text_only: bool = False):
    """One training step; ``text_only``: the image side is a fixed feature batch (the text side alone)."""
    frozen = learner.backbone.encode_images(images).clone() if text_only else None

    def step():
        opt.zero_grad(set_to_none=True)
        if reference:
            text = reference_text(learner)
            img = frozen if text_only else reference_image(learner, images)
        else:
            text = learner.text_features()
            img = frozen if text_only else learner.image_features(images)
        loss = F.cross_entropy(learner.logits(img, text), labels)
        loss.backward()
        opt.step()
    return step


def section_step(out: dict, n_cls: int, batch: int, repeats: int) -> None:
    print(f"\nIVLP step, {ARCH}, {n_cls} classes, batch {batch} (2+2 context, depth 12/12): vlprompt against the "
          "straightforward computation")
    print(f"{'prec':>5} {'what':>6} {'ref s':>8} {'vlprompt s':>11} {'speedup':>8}")
    rows = []
    for precision in ("fp32", "bf16"):
        bb = vp.load_backbone(ARCH, pretrained=None, precision=precision)
        learner = ivlp(bb, n_cls)
        images = torch.randn(batch, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))
        labels = torch.randint(0, n_cls, (batch,), generator=torch.Generator().manual_seed(1))
        opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=1e-9, momentum=0.9)
        for what, text_only in (("whole", False), ("text", True)):
            t = alternate({"ref": make_step(learner, images, labels, opt, True, text_only),
                           "fast": make_step(learner, images, labels, opt, False, text_only)}, repeats)
            row = {"precision": precision, "what": what, "ref_s": t["ref"], "fast_s": t["fast"],
                   "speedup": t["ref"] / t["fast"], "classes": n_cls, "batch": batch}
            rows.append(row)
            print(f"{precision:>5} {what:>6} {t['ref']:8.3f} {t['fast']:11.3f} {row['speedup']:7.2f}x", flush=True)
    out["step"] = rows


def prompted_image_flops(bb, n_prompts: int) -> float:
    """Forward + input-gradient backward FLOPs of one image through the prompted ViT (class-token last layer)."""
    vis = bb.model.visual
    width, layers = vis.conv1.out_channels, len(vis.transformer.resblocks)
    mlp = vis.transformer.resblocks[0].mlp.c_fc.out_features
    n = vis.grid_size[0] * vis.grid_size[1] + 1 + n_prompts
    full = (layers - 1) * _layer_flops(n, n, width, mlp)
    last = 2 * 2 * n * 2 * width * width + _layer_flops(1, n, width, mlp) - 2 * 2 * 2 * width * width
    return full + last  # the patch embedding has no gradient to compute (the prompts enter after it)


def section_image(out: dict, repeats: int) -> None:
    print(f"\nprompted image tower, {ARCH}: forward + backward to the prompts (2 tokens, depth 12)")
    print(f"{'prec':>5} {'batch':>6} {'s':>8} {'img/s':>8} {'GFLOP/s':>8} {'floor %':>8}")
    rows = []
    for precision in ("fp32", "bf16"):
        bb = vp.load_backbone(ARCH, pretrained=None, precision=precision)
        learner = ivlp(bb, 10)
        for batch in (4, 32):
            images = torch.randn(batch, 3, bb.image_size, bb.image_size)

            def fwd_bwd(images=images):
                learner.image_features(images).sum().backward()

            t = alternate({"fb": fwd_bwd}, repeats)["fb"]
            gflops = batch * prompted_image_flops(bb, learner.n_vision) / t / 1e9
            row = {"precision": precision, "batch": batch, "s": t, "img_s": batch / t, "gflops": gflops,
                   "floor_pct": 100 * gflops / best_peak(out, precision)}
            rows.append(row)
            print(f"{precision:>5} {batch:6d} {t:8.3f} {batch / t:8.1f} {gflops:8.0f} {row['floor_pct']:7.0f}%",
                  flush=True)
    out["image"] = rows


def section_eval(out: dict, repeats: int) -> None:
    print(f"\nevaluation from images, {ARCH}, batch 100: a prompted learner against the frozen tower")
    print(f"{'prec':>5} {'frozen img/s':>13} {'prompted img/s':>15} {'ratio':>7}")
    rows = []
    for precision in ("fp32", "bf16"):
        bb = vp.load_backbone(ARCH, pretrained=None, precision=precision)
        learner = ivlp(bb, 100)
        images = torch.randn(100, 3, bb.image_size, bb.image_size)
        with torch.inference_mode():
            text = learner.text_features()

        def frozen():
            with torch.inference_mode():
                learner.logits(bb.encode_images(images), text)

        def prompted():
            with torch.inference_mode():
                learner.logits(learner.image_features(images), text)

        t = alternate({"frozen": frozen, "prompted": prompted}, repeats)
        row = {"precision": precision, "frozen_img_s": 100 / t["frozen"], "prompted_img_s": 100 / t["prompted"],
               "ratio": t["frozen"] / t["prompted"]}
        rows.append(row)
        print(f"{precision:>5} {row['frozen_img_s']:13.1f} {row['prompted_img_s']:15.1f} {row['ratio']:7.2f}",
              flush=True)
    out["eval"] = rows


def _memory_child(spec: str) -> None:
    precision, batch, reference = spec.split(",")
    bb = vp.load_backbone(ARCH, pretrained=None, precision=precision)
    learner = ivlp(bb, 100)
    images = torch.randn(int(batch), 3, bb.image_size, bb.image_size)
    labels = torch.randint(0, 100, (int(batch),))
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=1e-9, momentum=0.9)
    peak_rss_reset()
    before = rss_kb("VmRSS")
    make_step(learner, images, labels, opt, bool(int(reference)))()
    peak = rss_kb("VmHWM")
    print(json.dumps({"peak_gb": peak / 2**20, "step_gb": max(peak - before, 0) / 2**20}))


def section_memory(out: dict) -> None:
    print(f"\npeak memory of one IVLP step, {ARCH}, 100 classes (fresh process each; GB)")
    print(f"{'prec':>5} {'batch':>6} {'ref step':>9} {'vlprompt step':>14} {'vlprompt peak':>14}")
    rows = []
    for precision in ("fp32", "bf16"):
        for batch in (4, 32):
            got = {}
            for reference in (1, 0):
                res = subprocess.run([sys.executable, __file__, "--memory-child", f"{precision},{batch},{reference}"],
                                     capture_output=True, text=True)
                try:
                    got[reference] = json.loads(res.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    got[reference] = {"peak_gb": float("nan"), "step_gb": float("nan")}
            row = {"precision": precision, "batch": batch, "ref_step_gb": got[1]["step_gb"],
                   "step_gb": got[0]["step_gb"], "peak_gb": got[0]["peak_gb"]}
            rows.append(row)
            print(f"{precision:>5} {batch:6d} {row['ref_step_gb']:9.2f} {row['step_gb']:14.2f} {row['peak_gb']:14.2f}",
                  flush=True)
    out["memory"] = rows


def build(bb, method_name: str, n_cls: int):
    method = METHODS[method_name]
    torch.manual_seed(0)
    config = MethodConfig(method_name, parse_options(method_name, method.Options, {}), PromptLayout(), "a photo of a {}.",
                          "")
    learner = method.create(bb, class_names(n_cls), config)
    return learner, method.objective(learner, config)


def coupled_step(learner, objective, images, labels, opt, reference: bool, promptsrc: bool):
    from vlprompt.engine.trainer import TrainBatch

    bb = learner.backbone
    batch = TrainBatch({}, labels, torch.arange(len(labels)), {"weak": images}, lambda x: bb.encode_images(x).clone())

    def step():
        opt.zero_grad(set_to_none=True)
        if not reference:
            loss = objective.loss(learner, batch)[0]
        else:
            txt = reference_text(learner)
            img = F.normalize(reference_image(learner, images), dim=-1)
            logits = bb.logit_scale * img @ txt.T
            loss = F.cross_entropy(logits, labels)
            if promptsrc:  # the official code's second, frozen image model
                with torch.no_grad():
                    frozen = F.normalize(bb.model.encode_image(images.to(bb.dtype)).float(), dim=-1)
                teacher = objective.text_teacher
                zs = (bb.logit_scale * frozen @ teacher.T).log_softmax(-1)
                kl = F.kl_div(logits.log_softmax(-1), zs, reduction="sum", log_target=True) / logits.numel()
                loss = loss + 25 * (txt - teacher).abs().mean() + 10 * (img - frozen).abs().mean() + kl
        loss.backward()
        opt.step()
    return step


def section_coupled(out: dict, n_cls: int, batch: int, repeats: int) -> None:
    print(f"\nMaPLe and PromptSRC steps, {ARCH}, {n_cls} classes, batch {batch}: vlprompt against the straightforward "
          "computation")
    print(f"{'method':>10} {'prec':>5} {'ref s':>8} {'vlprompt s':>11} {'speedup':>8}")
    rows = []
    for precision in ("fp32", "bf16"):
        bb = vp.load_backbone(ARCH, pretrained=None, precision=precision)
        images = torch.randn(batch, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))
        labels = torch.randint(0, n_cls, (batch,), generator=torch.Generator().manual_seed(1))
        for name in ("maple", "promptsrc"):
            learner, objective = build(bb, name, n_cls)
            opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=1e-9, momentum=0.9)
            src = name == "promptsrc"
            t = alternate({"ref": coupled_step(learner, objective, images, labels, opt, True, src),
                           "fast": coupled_step(learner, objective, images, labels, opt, False, src)}, repeats)
            row = {"method": name, "precision": precision, "ref_s": t["ref"], "fast_s": t["fast"],
                   "speedup": t["ref"] / t["fast"]}
            rows.append(row)
            print(f"{name:>10} {precision:>5} {t['ref']:8.3f} {t['fast']:11.3f} {row['speedup']:7.2f}x", flush=True)
    out["coupled"] = rows


def tcp_prompts(learner):
    """(C, 77, D) TCP prompt embeddings: SOS, the context, each class's own tokens."""
    c = len(learner.classnames)
    return torch.cat([learner.token_prefix, learner.ctx.expand(c, -1, -1), learner.token_suffix], dim=1)


def tcp_reference_text(learner):
    """TCP's text features the straightforward way (as the official code): every class's 77 tokens through
    open_clip's blocks, its context rows replaced by its class rows at the input of block ``class_layer``."""
    bb, tower = learner.backbone, learner.backbone.text
    n, layer = learner.options.n_ctx, learner.options.class_layer
    x = tcp_prompts(learner).to(bb.dtype) + tower.positional_embedding.to(bb.dtype)
    rows = learner.class_tokens().to(bb.dtype)
    mask = tower.attn_mask.to(bb.dtype)
    for i, block in enumerate(tower.blocks):
        if i == layer:
            x = torch.cat([x[:, :1], rows, x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=mask) if tower.batch_first else block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    x = tower.ln_final(x[torch.arange(x.shape[0]), learner.eot_idx])
    return F.normalize(tower.project(x).float(), dim=-1)


def tcp_truncated_text(learner):
    """Every class computed in full up to its EOT, the class rows inserted at ``class_layer``."""
    rows = (learner.options.class_layer, learner.class_tokens())
    return F.normalize(encode_truncated(learner.backbone, tcp_prompts(learner), learner.eot_idx, class_rows=rows),
                       dim=-1)


def section_tcp(out: dict, n_cls: int, repeats: int) -> None:
    print(f"\nTCP text forward + backward, {ARCH}, {n_cls} classes (4 context rows, class rows at block 8): the "
          "straightforward computation against the truncated and shared-prefix paths")
    print(f"{'prec':>5} {'ref s':>8} {'trunc s':>8} {'prefix s':>9} {'ref/trunc':>10} {'ref/prefix':>11} "
          f"{'max diff':>9}")
    rows = []
    for precision in ("fp32", "bf16"):
        bb = vp.load_backbone(ARCH, pretrained=None, precision=precision)
        learner, _ = build(bb, "tcp", n_cls)
        feats = torch.randn(32, bb.embed_dim, generator=torch.Generator().manual_seed(0))
        labels = torch.randint(0, n_cls, (32,), generator=torch.Generator().manual_seed(1))

        def step(text_fn):
            def run():
                learner.zero_grad(set_to_none=True)
                F.cross_entropy(learner.logits(feats, text_fn(learner)), labels).backward()
            return run

        paths = {"ref": tcp_reference_text, "trunc": tcp_truncated_text, "prefix": type(learner).text_features}
        with torch.no_grad():  # the three compute the same features
            ref = tcp_reference_text(learner)
            diff = max(float((paths[k](learner) - ref).abs().max()) for k in ("trunc", "prefix"))
        t = alternate({k: step(fn) for k, fn in paths.items()}, repeats)
        row = {"precision": precision, "classes": n_cls, "ref_s": t["ref"], "trunc_s": t["trunc"],
               "prefix_s": t["prefix"], "ref_over_trunc": t["ref"] / t["trunc"],
               "ref_over_prefix": t["ref"] / t["prefix"], "max_feature_diff": diff}
        rows.append(row)
        print(f"{precision:>5} {t['ref']:8.3f} {t['trunc']:8.3f} {t['prefix']:9.3f} {row['ref_over_trunc']:9.2f}x "
              f"{row['ref_over_prefix']:10.2f}x {diff:9.1e}", flush=True)
    out["tcp"] = rows


def lora_reference_blocks(blocks, lora, x: torch.Tensor, mask) -> torch.Tensor:
    """Batch-first tokens through ``blocks`` as the official CLIP-LoRA attention computes them: q, k and v as
    separate projections of the block's normalised input, each plus its own low-rank update with its own dropout
    (in training), then attention, the output projection and the MLP."""
    for i, block in enumerate(blocks):
        h = block.ln_1(x)
        w, b, heads = block.attn.in_proj_weight, block.attn.in_proj_bias, block.attn.num_heads
        d = h.shape[-1]
        qkv = []
        for slot in range(3):
            y = F.linear(h, w[slot * d:(slot + 1) * d], b[slot * d:(slot + 1) * d])
            if i in lora.blocks and slot in lora.slots:
                j, s = lora.blocks.index(i), lora.slots.index(slot)
                drop = F.dropout(h, lora.dropout, lora.training)
                y = y + lora.scale * F.linear(F.linear(drop, lora.a[j, s].to(h.dtype)), lora.b[j, s].to(h.dtype))
            qkv.append(y.unflatten(-1, (heads, -1)).transpose(1, 2))
        out = F.scaled_dot_product_attention(*qkv, attn_mask=mask).transpose(1, 2).flatten(2)
        x = x + block.ls_1(block.attn.out_proj(out))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x


def lora_reference_text(learner) -> torch.Tensor:
    bb = learner.backbone
    tokens = bb.tokenize([learner.options.text_template.format(n.replace("_", " ")) for n in learner.classnames])
    x = bb.text.token_embedding(tokens).to(bb.dtype) + bb.text.positional_embedding.to(bb.dtype)
    x = lora_reference_blocks(bb.text.blocks, learner.text_lora, x, bb.text.attn_mask.to(bb.dtype))
    x = bb.text.ln_final(x[torch.arange(x.shape[0]), bb.eot_index(tokens)])
    return F.normalize(bb.text.project(x).float(), dim=-1)


def lora_reference_image(learner, images: torch.Tensor) -> torch.Tensor:
    bb = learner.backbone
    v = bb.model.visual
    x = v.conv1(images.to(bb.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding.to(x.dtype)
    x = lora_reference_blocks(v.transformer.resblocks, learner.vision_lora, v.ln_pre(x), None)
    return (v.ln_post(x[:, 0]) @ v.proj).float()


def lora_step(learner, images, labels, opt, reference: bool, text_only: bool = False):
    frozen = learner.backbone.encode_images(images).clone() if text_only else None

    def step():
        opt.zero_grad(set_to_none=True)
        if reference:
            text = lora_reference_text(learner)
            img = frozen if text_only else lora_reference_image(learner, images)
        else:
            text = learner.text_features()
            img = frozen if text_only else learner.image_features(images)
        F.cross_entropy(learner.logits(img, text), labels).backward()
        opt.step()
    return step


def section_lora(out: dict, n_cls: int, batch: int, repeats: int) -> None:
    print(f"\nCLIP-LoRA step, {ARCH}, {n_cls} classes, batch {batch} (rank 2, q/k/v, both towers, dropout 0.25): "
          "vlprompt against the straightforward computation")
    print(f"{'prec':>5} {'what':>11} {'ref s':>8} {'vlprompt s':>11} {'speedup':>8}")
    rows = []
    for precision in ("fp32", "bf16"):
        bb = vp.load_backbone(ARCH, pretrained=None, precision=precision)
        learner, _ = build(bb, "clip_lora", n_cls)
        learner.train()
        images = torch.randn(batch, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))
        labels = torch.randint(0, n_cls, (batch,), generator=torch.Generator().manual_seed(1))
        opt = torch.optim.AdamW(list(learner.parameters()), lr=1e-9)
        exact = learner.options
        for what, text_only in (("whole", False), ("text", True), ("text-shared", True)):
            # text-shared: prefix_masks=shared, the template's words as a shared prefix (one mask for every class)
            learner.options = dataclasses.replace(exact, prefix_masks="shared" if what == "text-shared" else "per_class")
            t = alternate({"ref": lora_step(learner, images, labels, opt, True, text_only),
                           "fast": lora_step(learner, images, labels, opt, False, text_only)}, repeats)
            row = {"precision": precision, "what": what, "ref_s": t["ref"], "fast_s": t["fast"],
                   "speedup": t["ref"] / t["fast"], "classes": n_cls, "batch": batch}
            rows.append(row)
            print(f"{precision:>5} {what:>11} {t['ref']:8.3f} {t['fast']:11.3f} {row['speedup']:7.2f}x", flush=True)
        learner.options = exact
    out["lora"] = rows


def _method_memory_child(spec: str) -> None:
    name, precision, batch, reference = spec.split(",")
    batch, reference = int(batch), bool(int(reference))
    bb = vp.load_backbone(ARCH, pretrained=None, precision=precision)
    learner, objective = build(bb, name, 100)
    images = torch.randn(batch, 3, bb.image_size, bb.image_size)
    labels = torch.randint(0, 100, (batch,))
    params = [p for p in learner.parameters() if p.requires_grad]
    if name == "clip_lora":
        learner.train()
        step = lora_step(learner, images, labels, torch.optim.AdamW(params, lr=1e-9), reference)
    elif name == "tcp":
        feats = bb.encode_images(images).clone()
        opt = torch.optim.Adam(params, lr=1e-9)

        def step():
            opt.zero_grad(set_to_none=True)
            text = tcp_reference_text(learner) if reference else learner.text_features()
            F.cross_entropy(learner.logits(feats, text), labels).backward()
            opt.step()
    else:
        step = coupled_step(learner, objective, images, labels, torch.optim.SGD(params, lr=1e-9, momentum=0.9),
                            reference, name == "promptsrc")
    peak_rss_reset()
    before = rss_kb("VmRSS")
    step()
    print(json.dumps({"peak_gb": rss_kb("VmHWM") / 2**20, "step_gb": max(rss_kb("VmHWM") - before, 0) / 2**20}))


def section_methods_memory(out: dict) -> None:
    print(f"\npeak memory of one step per method, {ARCH}, 100 classes (fresh process each; GB)")
    print(f"{'method':>10} {'prec':>5} {'batch':>6} {'ref step':>9} {'vlprompt step':>14} {'vlprompt peak':>14}")
    rows = []
    for name, batch in (("maple", 4), ("promptsrc", 4), ("tcp", 32), ("clip_lora", 32)):
        for precision in ("fp32", "bf16"):
            got = {}
            for reference in (1, 0):
                res = subprocess.run([sys.executable, __file__, "--method-memory-child",
                                      f"{name},{precision},{batch},{reference}"], capture_output=True, text=True)
                try:
                    got[reference] = json.loads(res.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    got[reference] = {"peak_gb": float("nan"), "step_gb": float("nan")}
            row = {"method": name, "precision": precision, "batch": batch, "ref_step_gb": got[1]["step_gb"],
                   "step_gb": got[0]["step_gb"], "peak_gb": got[0]["peak_gb"]}
            rows.append(row)
            print(f"{name:>10} {precision:>5} {batch:6d} {row['ref_step_gb']:9.2f} {row['step_gb']:14.2f} "
                  f"{row['peak_gb']:14.2f}", flush=True)
    out["methods_memory"] = rows


def section_artifacts(out: dict) -> None:
    import tempfile

    print(f"\nsaved prompts, {ARCH}, 100 classes, base-to-new recipe options")
    print(f"{'method':>14} {'parameters':>11} {'kB':>9}")
    bb = vp.load_backbone(ARCH, pretrained=None, precision="fp32")
    rows = []
    for name in ("ivlp", "deep_language", "vpt_deep", "maple", "promptsrc", "tcp", "clip_lora"):
        learner, _ = build(bb, name, 100)
        with tempfile.TemporaryDirectory() as tmp:
            folder = learner.save_pretrained(Path(tmp) / "prompt")
            size = (folder / "prompt.safetensors").stat().st_size
        params = sum(p.numel() for p in learner.parameters() if p.requires_grad)
        rows.append({"method": name, "parameters": params, "kB": size / 1024})
        print(f"{name:>14} {params:11,d} {size / 1024:9.1f}", flush=True)
    out["artifacts"] = rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="step,image,eval,memory,coupled,tcp,lora,methods_memory,artifacts")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--lora-batch", type=int, default=32)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--method-memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        _memory_child(args.memory_child)
        return 0
    if args.method_memory_child:
        _method_memory_child(args.method_memory_child)
        return 0
    out = {"machine": {"threads": torch.get_num_threads(), "matmul_gflops": {
        "fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}}}
    print(f"threads {out['machine']['threads']}; matmul GFLOP/s fp32 {out['machine']['matmul_gflops']['fp32']:.0f}, "
          f"bf16 {out['machine']['matmul_gflops']['bf16']:.0f}")
    sections = args.sections.split(",")
    t0 = time.perf_counter()
    if "step" in sections:
        section_step(out, args.classes, args.batch, args.repeats)
    if "image" in sections:
        section_image(out, args.repeats)
    if "eval" in sections:
        section_eval(out, args.repeats)
    if "memory" in sections:
        section_memory(out)
    if "coupled" in sections:
        section_coupled(out, args.classes, args.batch, args.repeats)
    if "tcp" in sections:
        section_tcp(out, args.classes, args.repeats)
    if "lora" in sections:
        section_lora(out, args.classes, args.lora_batch, args.repeats)
    if "methods_memory" in sections:
        section_methods_memory(out)
    if "artifacts" in sections:
        section_artifacts(out)
    print(f"\n{time.perf_counter() - t0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
