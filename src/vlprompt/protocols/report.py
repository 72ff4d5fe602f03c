"""Reports: the tables (and figures) a paper needs, computed from run folders, never from logs.

`aggregate` turns records (`store.collect`) into rows, one per (protocol, dataset, method, backbone, shots,
metric), each with mean, std and n over seeds, the published number where one matches, and the difference.
The std is the population standard deviation (ddof = 0), as CoOp's ``parse_test_res.py`` computes it.

- few-shot: top-1 per dataset and shots; zero-shot methods at shots 0; an ``average`` row over datasets.
- base-to-new: ``base`` and ``new`` per dataset over seeds; ``h`` = H(mean base, mean new) per dataset; the
  ``average`` row has mean base, mean new over datasets and H of those (SPEC 6.2, 8.14).
- xd / dg: top-1 on the source and each target; ``average`` over the targets (the source excluded).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

from . import dg, xd
from .published import lookup
from .store import RunRecord, collect

FORMATS = ("md", "csv", "latex", "json")
STD_NOTE = "std: population standard deviation over seeds (ddof=0, as CoOp's parse_test_res.py)"
RANDOM_MARK = "†"
RANDOM_NOTE = f"{RANDOM_MARK}: computed on RANDOM weights (pipeline check only; not comparable with papers)"
ROW_KEYS = ("protocol", "dataset", "source", "method", "method_type", "backbone", "shots", "metric", "mean",
            "std", "n", "random", "published", "published_source", "diff")


def harmonic_mean(b: float, n: float) -> float:
    """H = 2BN / (B + N) (SPEC 6.2); 0 when both are 0."""
    return 0.0 if b + n == 0 else 2.0 * b * n / (b + n)


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def benchmark_datasets(protocol: str, source: str) -> set[str]:
    """The datasets a published average is taken over: the 11 CoOp datasets (few-shot, base-to-new), the 10
    other ones (xd), the 4 ImageNet variants (dg)."""
    if protocol == "dg":
        return set(dg.TARGETS)
    return set(xd.COOP_DATASETS) - ({source} if protocol == "xd" else set())


def _row(protocol, dataset, source, method, method_type, backbone, shots, metric, mean, std, n, random,
         config, averaged: Optional[set] = None) -> dict:
    """One result row; the published number is attached where one matches (for an ``average`` row, only when
    ``averaged``, the datasets it averages, is the benchmark's own set)."""
    row = dict(protocol=protocol, dataset=dataset, source=source, method=method, method_type=method_type,
               backbone=backbone, shots=shots, metric=metric, mean=mean, std=std, n=n, random=random,
               published=None, published_source=None, diff=None)
    if dataset == "average" and averaged != benchmark_datasets(protocol, source):
        return row
    hits = lookup(protocol, dataset, method_type, backbone, shots, metric, config)
    if hits:
        row.update(published=hits[0].value, published_source=f"{hits[0].source} [{hits[0].confidence}]",
                   diff=mean - hits[0].value)
    return row


def aggregate(records: Iterable[RunRecord]) -> list[dict]:
    records = list(records)
    rows: list[dict] = []
    rows += _fewshot_rows([r for r in records if r.protocol == "fewshot"])
    rows += _base2new_rows([r for r in records if r.protocol == "base2new"])
    for protocol in ("xd", "dg"):
        rows += _transfer_rows(protocol, [r for r in records if r.protocol == protocol])
    return rows


def _groups(records, key) -> dict:
    out: dict = defaultdict(list)
    for r in records:
        out[key(r)].append(r)
    return out


def _fewshot_rows(records: list[RunRecord]) -> list[dict]:
    rows = []
    per = _groups(records, lambda r: (r.backbone, r.method, r.method_type, r.shots, r.dataset))
    for (bb, method, mtype, shots, ds), group in sorted(per.items(), key=lambda kv: _order(kv[0])):
        mean, std = mean_std([r.top1 for r in group])
        rows.append(_row("fewshot", ds, ds, method, mtype, bb, shots, "top1", mean, std, len(group),
                         any(r.random for r in group), group[0].config))
    config = _config_of(records)
    for (bb, method, mtype, shots), group in _groups(rows, lambda x: (x["backbone"], x["method"], x["method_type"],
                                                                     x["shots"])).items():
        if len(group) > 1:
            rows.append(_row("fewshot", "average", "average", method, mtype, bb, shots, "top1",
                             sum(x["mean"] for x in group) / len(group), None, len(group),
                             any(x["random"] for x in group), config[(bb, method)],
                             averaged={x["dataset"] for x in group}))
    return rows


def _config_of(records: list[RunRecord]) -> dict:
    """(backbone, method) -> the configuration of one of its runs (published numbers match on it)."""
    return {(r.backbone, r.method): r.config for r in records}


def _base2new_rows(records: list[RunRecord]) -> list[dict]:
    rows, per_ds = [], []
    per = _groups(records, lambda r: (r.backbone, r.method, r.method_type, r.shots, r.dataset))
    for (bb, method, mtype, shots, ds), group in sorted(per.items(), key=lambda kv: _order(kv[0])):
        base = [r.top1 for r in group if r.split == "base"]
        new = [r.top1 for r in group if r.split == "new"]
        rnd, cfg = any(r.random for r in group), group[0].config
        for metric, values in (("base", base), ("new", new)):
            if values:
                mean, std = mean_std(values)
                rows.append(_row("base2new", ds, ds, method, mtype, bb, shots, metric, mean, std, len(values),
                                 rnd, cfg))
        if base and new:
            b, n = mean_std(base)[0], mean_std(new)[0]
            rows.append(_row("base2new", ds, ds, method, mtype, bb, shots, "h", harmonic_mean(b, n), None,
                             min(len(base), len(new)), rnd, cfg))
            per_ds.append((bb, method, mtype, shots, b, n, rnd, cfg, ds))
    for (bb, method, mtype, shots), group in _groups(per_ds, lambda x: x[:4]).items():
        if len(group) < 2:
            continue
        b = sum(x[4] for x in group) / len(group)
        n = sum(x[5] for x in group) / len(group)
        rnd, cfg = any(x[6] for x in group), group[0][7]
        for metric, value in (("base", b), ("new", n), ("h", harmonic_mean(b, n))):
            rows.append(_row("base2new", "average", "average", method, mtype, bb, shots, metric, value, None,
                             len(group), rnd, cfg, averaged={x[8] for x in group}))
    return rows


def _transfer_rows(protocol: str, records: list[RunRecord]) -> list[dict]:
    rows = []
    per = _groups(records, lambda r: (r.backbone, r.source, r.method, r.method_type, r.shots, r.dataset))
    for (bb, src, method, mtype, shots, ds), group in sorted(per.items(), key=lambda kv: _order(kv[0])):
        mean, std = mean_std([r.top1 for r in group])
        rows.append(_row(protocol, ds, src, method, mtype, bb, shots, "top1", mean, std, len(group),
                         any(r.random for r in group), group[0].config))
    targets = [x for x in rows if x["dataset"] != x["source"]]
    config = _config_of(records)
    for (bb, src, method, mtype, shots), group in _groups(
            targets, lambda x: (x["backbone"], x["source"], x["method"], x["method_type"], x["shots"])).items():
        rows.append(_row(protocol, "average", src, method, mtype, bb, shots, "top1",
                         sum(x["mean"] for x in group) / len(group), None, len(group),
                         any(x["random"] for x in group), config[(bb, method)],
                         averaged={x["dataset"] for x in group}))
    return rows


def _order(key):
    return tuple("" if v is None else (f"{v:09d}" if isinstance(v, int) else str(v)) for v in key)


# -- tables ---------------------------------------------------------------------------------------------------

def _num(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


def cell(row: Optional[dict], with_published: bool = True) -> str:
    """``mean ± std`` (std over seeds when there are several), the random mark, and the published number
    with our difference to it."""
    if row is None:
        return "–"
    text = _num(row["mean"])
    if row["std"] is not None and row["n"] > 1:
        text += f" ± {row['std']:.2f}"
    if row["random"]:
        text += RANDOM_MARK
    if with_published and row["published"] is not None:
        text += f" (paper {row['published']:.2f}, {row['diff']:+.2f})"
    return text


def tables(rows: list[dict]) -> list[dict]:
    """Each table as ``{"title", "header", "body" (list of cell lists), "notes"}``, in the layouts the papers
    use: few-shot dataset x method x shots; base-to-new B / N / H per dataset and method (CoCoOp Table 1);
    xd / dg one row per method with the source, each target and the average (CoCoOp Tables 2-3)."""
    out = []
    index = {(r["protocol"], r["backbone"], r["source"], r["dataset"], r["method"], r["shots"], r["metric"]): r
             for r in rows}

    def notes(selected):
        sources = sorted({r["published_source"] for r in selected if r["published_source"]})
        return ([STD_NOTE] + ([RANDOM_NOTE] if any(r["random"] for r in selected) else [])
                + [f"paper: {s}" for s in sources])

    for bb in _unique(r["backbone"] for r in rows if r["protocol"] == "fewshot"):
        sel = [r for r in rows if r["protocol"] == "fewshot" and r["backbone"] == bb]
        shots = sorted({r["shots"] for r in sel})
        body = []
        for ds in _datasets(sel):
            for method in _methods([r for r in sel if r["dataset"] == ds]):
                body.append([ds, method] + [cell(index.get(("fewshot", bb, ds, ds, method, k, "top1")))
                                            for k in shots])
        header = ["dataset", "method"] + [("zero-shot" if k == 0 else f"{k} shot{'s' if k > 1 else ''}")
                                          for k in shots]
        out.append({"title": f"Few-shot top-1 % ({bb})", "header": header, "body": body, "notes": notes(sel)})

    for bb in _unique(r["backbone"] for r in rows if r["protocol"] == "base2new"):
        sel = [r for r in rows if r["protocol"] == "base2new" and r["backbone"] == bb]
        body = []
        for ds in _datasets(sel):
            for method in _methods([r for r in sel if r["dataset"] == ds]):
                shots = next(r["shots"] for r in sel if r["dataset"] == ds and r["method"] == method)
                body.append([ds, method] + [cell(index.get(("base2new", bb, ds, ds, method, shots, m)))
                                            for m in ("base", "new", "h")])
        out.append({"title": f"Base-to-new top-1 % ({bb}; H from seed-averaged base and new)",
                    "header": ["dataset", "method", "base", "new", "H"], "body": body, "notes": notes(sel)})

    for protocol, name in (("xd", "Cross-dataset"), ("dg", "Domain generalisation")):
        sel_all = [r for r in rows if r["protocol"] == protocol]
        for bb, src in _unique((r["backbone"], r["source"]) for r in sel_all):
            sel = [r for r in sel_all if r["backbone"] == bb and r["source"] == src]
            targets = [d for d in _datasets(sel) if d not in (src, "average")]
            cols = [src] + targets + ["average"]
            body = []
            for method in _methods(sel):
                shots = next(r["shots"] for r in sel if r["method"] == method)
                body.append([method] + [cell(index.get((protocol, bb, src, d, method, shots, "top1"))) for d in cols])
            out.append({"title": f"{name} top-1 % ({bb}; trained on {src}, average over the targets)",
                        "header": ["method", f"{src} (source)"] + targets + ["average"], "body": body,
                        "notes": notes(sel)})
    return out


def _methods(rows) -> list[str]:
    """Method labels in table order: zero-shot baselines first, then the others as they come."""
    labels = _unique(r["method"] for r in rows)
    zs = {r["method"] for r in rows if str(r["method_type"]).startswith("zeroshot")}
    return [m for m in labels if m in zs] + [m for m in labels if m not in zs]


def _unique(values) -> list:
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def _datasets(rows) -> list[str]:
    names = _unique(r["dataset"] for r in rows)
    return [d for d in names if d != "average"] + (["average"] if "average" in names else [])


def to_markdown(rows: list[dict]) -> str:
    parts = []
    for t in tables(rows):
        parts.append(f"### {t['title']}\n")
        parts.append("| " + " | ".join(t["header"]) + " |")
        parts.append("|" + "|".join("---" for _ in t["header"]) + "|")
        parts += ["| " + " | ".join(line) + " |" for line in t["body"]]
        parts += [""] + [f"- {n}" for n in t["notes"]] + [""]
    return "\n".join(parts) if parts else "(no finished runs)\n"


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), (RANDOM_MARK, r"$^\dagger$")):
        text = text.replace(a, b)
    return text


def to_latex(rows: list[dict]) -> str:
    """One booktabs ``tabular`` per table (needs ``\\usepackage{booktabs}``)."""
    parts = []
    for t in tables(rows):
        parts.append(f"% {t['title']}")
        parts.append("\\begin{tabular}{" + "l" * 2 + "r" * (len(t["header"]) - 2) + "}")
        parts.append("\\toprule")
        parts.append(" & ".join(_tex(h) for h in t["header"]) + " \\\\")
        parts.append("\\midrule")
        parts += [" & ".join(_tex(c) for c in line) + " \\\\" for line in t["body"]]
        parts.append("\\bottomrule")
        parts.append("\\end{tabular}")
        parts += [f"% {n}" for n in t["notes"]] + [""]
    return "\n".join(parts)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ROW_KEYS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r[k] is None else r[k]) for k in ROW_KEYS})
    return buf.getvalue()


def to_json(rows: list[dict]) -> str:
    import json

    return json.dumps([{k: r[k] for k in ROW_KEYS} | {"std_kind": "population"} for r in rows], indent=1) + "\n"


RENDER = {"md": to_markdown, "csv": to_csv, "latex": to_latex, "json": to_json}


def write_report(folder: str | Path, plots: bool = True) -> tuple[list[dict], Path]:
    """Rows of every finished run under ``folder``, and ``folder/report/`` with the tables in every format,
    the figures (PNG and PDF) and a self-contained ``index.html``."""
    from ..utils.io import atomic_write_text
    from .html import table_html, write_html

    rows = aggregate(collect(folder))
    out = Path(folder) / "report"
    out.mkdir(parents=True, exist_ok=True)
    for fmt, ext in (("md", "md"), ("csv", "csv"), ("latex", "tex"), ("json", "json")):
        atomic_write_text(out / f"tables.{ext}", RENDER[fmt](rows))
    images = []
    if plots:
        from .plots import write_plots

        zeroshot_first = sorted(rows, key=lambda r: not str(r["method_type"]).startswith("zeroshot"))  # as tables
        images = [p for p in write_plots(zeroshot_first, out) if p.suffix == ".png"]
    sections = [(t["title"], table_html(t["header"], t["body"], caption="; ".join(t["notes"])))
                for t in tables(rows)]
    write_html(out, f"vlprompt report: {Path(folder).resolve().name}", sections, images)
    return rows, out
