"""``vlprompt interpret``: the nearest vocabulary words of every learned context vector.

As CoOp's ``interpret_prompt.py``: the Euclidean distance from each context vector to every row of the text
tower's token embedding, the ``top_k`` smallest, token ids decoded with the tokenizer. A class-specific context
is read per class; CoCoOp's is its static context (each image adds its own meta-network shift to it).
"""

from __future__ import annotations

import json
from typing import Optional

import torch

from ..errors import VlpromptError

FORMATS = ("table", "json")


def _nearest(rows: torch.Tensor, emb: torch.Tensor, k: int, margin: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, token ids) of the ``k`` nearest embedding rows of each row, nearest first. Candidates come
    from the fast matrix-product distances; the final distances are recomputed exactly from the differences
    (0 for a vector equal to a word's embedding), which also decides their order."""
    n = min(emb.shape[0], k + margin)
    cand = torch.cdist(rows, emb).topk(n, dim=-1, largest=False).indices  # (R, n)
    exact = (emb[cand] - rows[:, None, :]).pow(2).sum(-1).sqrt()  # (R, n, D) -> (R, n)
    values, order = exact.topk(k, dim=-1, largest=False, sorted=True)
    return values, cand.gather(1, order)


@torch.no_grad()
def nearest_words(learner, bb, top_k: int = 5) -> list[dict]:
    """One record per context vector (per class for a class-specific context): its ``top_k`` nearest
    vocabulary tokens, nearest first, with their Euclidean distances."""
    ctx = getattr(learner, "ctx", None)
    if not isinstance(ctx, torch.Tensor):
        method = getattr(learner, "method", type(learner).__name__)
        raise VlpromptError(f"method '{method}' has no learned context vectors to interpret (its classifier is "
                            f"{type(learner).__name__}); interpret reads a learned text context")
    if int(top_k) < 1:
        raise VlpromptError(f"--top-k: must be >= 1, got {top_k}")
    emb = bb.text.token_embedding.weight.detach().float().cpu()
    vectors = ctx.detach().float().cpu()
    per_class = vectors.dim() == 3
    rows = vectors.reshape(-1, vectors.shape[-1])
    k = min(int(top_k), emb.shape[0])
    parts = [_nearest(rows[i:i + 256], emb, k) for i in range(0, rows.shape[0], 256)]  # bounded memory
    values, index = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    n_ctx = vectors.shape[-2]
    out = []
    for r in range(rows.shape[0]):
        nearest = []
        for j in range(k):
            token_id = int(index[r, j])
            raw, word = bb.tokens.decode(token_id)  # CLIP's BPE or a Hugging Face tokenizer (SigLIP)
            nearest.append({"token_id": token_id, "token": raw, "word": word, "distance": float(values[r, j])})
        out.append({"class": learner.classnames[r // n_ctx] if per_class else None,
                    "position": r % n_ctx + 1, "norm": float(rows[r].norm()), "nearest": nearest})
    return out


def reading(learner, records: list[dict], cls: Optional[str] = None) -> str:
    """The prompt spelled with each context vector's nearest word, the class name where the layout puts it."""
    words = [r["nearest"][0]["word"] for r in records if r["class"] == cls]
    name = f"[{cls}]" if cls is not None else "[CLASS]"
    position = getattr(learner, "class_token_position", "end")
    if position == "front":
        parts = [name] + words
    elif position == "middle":
        half = len(words) // 2
        parts = words[:half] + [name] + words[half:]
    else:
        parts = words + [name]
    return " ".join(parts) + "."


def interpret(opened, top_k: int = 5) -> dict:
    """The JSON record of ``vlprompt interpret`` for an `OpenedPrompt`."""
    learner = opened.learner
    records = nearest_words(learner, opened.backbone, top_k)
    classes = list(dict.fromkeys(r["class"] for r in records))
    return {"prompt": str(opened.path), "method": opened.method, "backbone": opened.backbone.source.describe(),
            "n_ctx": int(learner.ctx.shape[-2]), "csc": learner.ctx.dim() == 3,
            "class_token_position": getattr(learner, "class_token_position", "end"),
            "ctx_init": getattr(learner, "ctx_init", None),
            "static_context_only": bool(getattr(learner, "conditional", False)),
            "readings": {("all" if c is None else c): reading(learner, records, c) for c in classes},
            "contexts": records}


def render(result: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result, indent=2) + "\n"
    if fmt != "table":
        raise VlpromptError(f"--format: '{fmt}' is not one of {list(FORMATS)}")
    lines = [f"{result['method']} prompt {result['prompt']}: {result['n_ctx']} context vectors"
             + (", one set per class" if result["csc"] else "")
             + (" (the static context; each image adds its meta-network shift)" if result["static_context_only"]
                else "")
             + "; nearest vocabulary words by Euclidean distance in the token-embedding space"]
    per_class = result["csc"]
    rows = [(["class"] if per_class else []) + ["ctx", "norm"]
            + [f"word {j + 1} (distance)" for j in range(len(result["contexts"][0]["nearest"]))]]
    for rec in result["contexts"]:
        rows.append(([rec["class"]] if per_class else []) + [str(rec["position"]), f"{rec['norm']:.3f}"]
                    + [f"{n['word'] or n['token']} ({n['distance']:.4f})" for n in rec["nearest"]])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip() for row in rows]
    for cls, text in result["readings"].items():
        lines.append(f"nearest-word reading{'' if cls == 'all' else f' ({cls})'}: {text}")
    return "\n".join(lines) + "\n"
