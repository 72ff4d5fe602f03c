"""Figures for `vlprompt report`: few-shot curves, base-to-new bars, cross-dataset and domain-generalisation bars.

Every figure is written twice, as PNG (``DPI`` = 150) and PDF, from the same list of result rows the tables use
(plain dicts, see `write_plots`). One set of figures per backbone:

    fewshot_<backbone>.png/.pdf         one panel per dataset plus "Average over N datasets" (CoOp's Figure 3)
    base2new_<backbone>.png/.pdf        three stacked panels (base, new, H), a bar group per dataset, a bar per method
    xd_<backbone>_<source>.png/.pdf     one panel, a bar group per evaluated dataset (source, targets, average)
    dg_<backbone>_<source>.png/.pdf     the same for domain generalisation

The figure size is fixed (never ``bbox_inches="tight"``), so a PNG is exactly ``figure_size(...) * DPI`` pixels;
`figure_size` documents the rule. matplotlib is imported inside the functions only, and the figures are drawn on
an Agg canvas of their own (no pyplot, no global backend switch), so ``import vlprompt`` stays light and nothing
here touches matplotlib's global state.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional

DPI = 150
RANDOM_NOTE = "(random weights: pipeline check only)"

# Few-shot grid: panels per row and the size of one panel, in inches.
FEWSHOT_MAX_COLS = 4
FEWSHOT_PANEL_W = 3.6
FEWSHOT_MIN_W = 6.0  # a lone panel still leaves room for the title and the legend
FEWSHOT_PANEL_H = 3.0
FEWSHOT_EXTRA_H = 1.3  # title, shared axis labels and the legend row below the panels
# Bar charts: inches per bar group, per bar in a group, and the fixed margins.
BAR_MIN_W = 6.5
BAR_MARGIN_W = 1.6
BAR_GROUP_W = 0.35
BAR_BAR_W = 0.16
BAR_PANEL_H = 2.6
BAR_EXTRA_H = 1.9  # title, legend row and the rotated dataset names under the bottom panel

_DISPLAY = {
    "caltech101": "Caltech101", "oxford_pets": "OxfordPets", "stanford_cars": "StanfordCars",
    "oxford_flowers": "Flowers102", "food101": "Food101", "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397",
    "dtd": "DTD", "eurosat": "EuroSAT", "ucf101": "UCF101", "imagenet": "ImageNet", "imagenet_v2": "ImageNetV2",
    "imagenet_sketch": "ImageNet-Sketch", "imagenet_a": "ImageNet-A", "imagenet_r": "ImageNet-R",
    "average": "Average",
}
_PROTOCOL_TITLE = {
    "fewshot": "Few-shot learning",
    "base2new": "Base-to-new generalisation",
    "xd": "Cross-dataset transfer",
    "dg": "Domain generalisation",
}
_METRIC_LABEL = {"base": "Base", "new": "New", "h": "H (harmonic mean)"}
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p"]


# ----------------------------------------------------------------------------------------------------------------
# Public helpers
# ----------------------------------------------------------------------------------------------------------------


def figure_size(kind: str, n_panels: int = 1, n_groups: int = 1, n_bars: int = 1) -> tuple[float, float]:
    """The figure size in inches; a PNG is this times `DPI` pixels (Agg truncates to whole pixels).

    - ``"fewshot"``: ``n_panels`` panels (datasets plus the average) in ``cols = min(n_panels, 4)`` columns and
      ``rows = ceil(n_panels / cols)`` rows: ``(max(6.0, 3.6 * cols), 3.0 * rows + 1.3)``.
    - ``"base2new"`` (``n_panels`` = 3 stacked panels), ``"xd"`` and ``"dg"`` (``n_panels`` = 1): ``n_groups`` bar
      groups (datasets) of ``n_bars`` bars (methods):
      ``(max(6.5, 1.6 + n_groups * (0.35 + 0.16 * n_bars)), 2.6 * n_panels + 1.9)``.
    """
    n_panels = max(1, int(n_panels))
    if kind == "fewshot":
        cols = min(n_panels, FEWSHOT_MAX_COLS)
        rows = math.ceil(n_panels / cols)
        return (max(FEWSHOT_MIN_W, FEWSHOT_PANEL_W * cols), FEWSHOT_PANEL_H * rows + FEWSHOT_EXTRA_H)
    if kind in ("base2new", "xd", "dg"):
        width = max(BAR_MIN_W, BAR_MARGIN_W + max(1, n_groups) * (BAR_GROUP_W + BAR_BAR_W * max(1, n_bars)))
        return (width, BAR_PANEL_H * n_panels + BAR_EXTRA_H)
    raise ValueError(f"unknown figure kind {kind!r}")


def sanitize_name(name: str) -> str:
    """A file-name-safe form: "/" and every character outside [A-Za-z0-9_.-] become "-" ("ViT-B/16" -> "ViT-B-16")."""
    out = re.sub(r"[^A-Za-z0-9_.-]", "-", str(name)).strip(".")
    return out or "unnamed"


def is_zeroshot(row: dict) -> bool:
    """Zero-shot methods are those whose registered name starts with "zeroshot"."""
    return str(row.get("method_type") or "").startswith("zeroshot")


def figure_title(protocol: str, backbone: str, rows: Iterable[dict], source: Optional[str] = None) -> str:
    """The title of one figure; a second line `RANDOM_NOTE` when any of the plotted ``rows`` is on random weights."""
    title = _PROTOCOL_TITLE.get(protocol, protocol)
    if source is not None and protocol in ("xd", "dg"):
        title += f" from {display_name(source)}"
    title += f", {backbone}"
    if any(bool(r.get("random")) for r in rows):
        title += f"\n{RANDOM_NOTE}"  # a line of its own, so a long title still fits the figure's width
    return title


def display_name(dataset: str) -> str:
    return _DISPLAY.get(dataset, dataset)


def make_figures(rows: list[dict]) -> list[tuple[str, Any]]:
    """Build every figure (without saving): ``[(file_stem, matplotlib.figure.Figure), ...]``, in a fixed order."""
    rows = [r for r in rows if _value(r.get("mean")) is not None]
    figures: list[tuple[str, Any]] = []
    colours = _colour_map(rows) if rows else {}  # one colour and marker per method in every figure
    for backbone in _ordered(r.get("backbone") or "unknown" for r in rows):
        mine = [r for r in rows if (r.get("backbone") or "unknown") == backbone]
        safe = sanitize_name(backbone)
        fs = [r for r in mine if r.get("protocol") == "fewshot" and r.get("metric", "top1") == "top1"]
        if fs:
            figures.append((f"fewshot_{safe}", _fewshot_figure(fs, backbone, colours)))
        b2n = [r for r in mine if r.get("protocol") == "base2new" and r.get("metric") in _METRIC_LABEL]
        if b2n:
            figures.append((f"base2new_{safe}", _base2new_figure(b2n, backbone, colours)))
        for protocol in ("xd", "dg"):
            prot = [r for r in mine if r.get("protocol") == protocol and r.get("metric", "top1") == "top1"]
            for source in _ordered(r.get("source") or "unknown" for r in prot):
                sel = [r for r in prot if (r.get("source") or "unknown") == source]
                fig = _transfer_figure(sel, protocol, backbone, source, colours)
                figures.append((f"{protocol}_{safe}_{sanitize_name(source)}", fig))
    return figures


def write_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Write every figure for ``rows`` into ``out_dir`` as PNG (dpi 150) and PDF; return the paths written.

    ``rows`` are the report's result rows: dicts with protocol ("fewshot" | "base2new" | "xd" | "dg"), dataset
    (or "average"), source, method (the label), method_type (registered name; "zeroshot*" = zero-shot), backbone,
    shots, metric ("top1", or "base" | "new" | "h" for base2new), mean, std (or None), n and random. Rows without
    a mean are skipped; a protocol with nothing to plot gives no file. The list holds, per figure, the PNG then
    the PDF.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for stem, fig in make_figures(rows):
        try:
            for ext in ("png", "pdf"):
                path = out_dir / f"{stem}.{ext}"
                # Fixed size on purpose: no bbox_inches="tight", so the PNG is figure_size * DPI pixels.
                fig.savefig(path, dpi=DPI, format=ext, metadata=_metadata(ext))
                written.append(path)
        finally:
            fig.clear()
    return written


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------


def _new_figure(size: tuple[float, float]):
    # The Agg backend, chosen per figure by attaching its canvas: no pyplot, no matplotlib.use(), no global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fewshot_figure(rows: list[dict], backbone: str, colours: dict[str, Any]):
    datasets = _datasets_average_last(rows)
    n_real = len([d for d in datasets if d != "average"])
    n = len(datasets)
    cols = min(n, FEWSHOT_MAX_COLS)
    nrows = math.ceil(n / cols)
    from matplotlib.lines import Line2D

    fig = _new_figure(figure_size("fewshot", n))
    axes = fig.subplots(nrows, cols, squeeze=False)

    shots = sorted({int(r.get("shots") or 0) for r in rows if int(r.get("shots") or 0) > 0})
    smallest = shots[0] if shots else 1
    zero_x = math.log2(smallest) - 1.0  # one octave left of the smallest shot count

    def xpos(k: int) -> float:
        return math.log2(k) if k > 0 else zero_x

    tick_x = [zero_x] + [math.log2(k) for k in shots]
    tick_labels = ["0"] + [str(k) for k in shots]
    labels = _series_labels(rows)
    handles: dict[str, Any] = {}

    for i, dataset in enumerate(datasets):
        ax = axes[i // cols][i % cols]
        if dataset == "average":
            ax.set_title(f"Average over {n_real} dataset{'s' if n_real != 1 else ''}", fontsize=10)
        else:
            ax.set_title(display_name(dataset), fontsize=10)
        here = [r for r in rows if r.get("dataset") == dataset]
        for label in _ordered(labels[id(r)] for r in here):
            pts = sorted(_last_by(r for r in here if labels[id(r)] == label), key=lambda r: int(r.get("shots") or 0))
            colour, marker = colours[_method_key(pts[0])]
            if all(is_zeroshot(r) for r in pts):
                y = _value(pts[-1]["mean"])
                ax.axhline(y, color=colour, linestyle="--", linewidth=1.2, zorder=1)
                ax.errorbar([zero_x], [y], yerr=_yerr([pts[-1]]), color=colour, marker=marker, markersize=7,
                            linestyle="none", capsize=3, zorder=3, label=label)
                h = Line2D([], [], color=colour, marker=marker, markersize=7, linestyle="--", linewidth=1.2)
            else:
                xs = [xpos(int(r.get("shots") or 0)) for r in pts]
                ys = [_value(r["mean"]) for r in pts]
                h = ax.errorbar(xs, ys, yerr=_yerr(pts), color=colour, marker=marker, markersize=5,
                                linewidth=1.6, capsize=3, zorder=2, label=label)
            handles.setdefault(label, h)
        ax.set_xticks(tick_x, tick_labels)
        ax.set_xlim(zero_x - 0.5, tick_x[-1] + 0.5)
        ax.margins(y=0.1)
        ax.grid(True, linestyle=":", linewidth=0.6, alpha=0.7)
        ax.tick_params(labelsize=8)
        if i + cols >= n:  # lowest panel of its column (an axis label of its own, so the legend row stays free)
            ax.set_xlabel("Labelled examples per class", fontsize=9)
        if i % cols == 0:
            ax.set_ylabel("Top-1 accuracy (%)", fontsize=9)
    for j in range(n, nrows * cols):
        axes[j // cols][j % cols].set_visible(False)

    fig.suptitle(figure_title("fewshot", backbone, rows), fontsize=12)
    _legend(fig, handles)
    return fig


def _base2new_figure(rows: list[dict], backbone: str, colours: dict[str, Any]):
    datasets = _datasets_average_last(rows)
    labels = _series_labels(rows)
    methods = _ordered(labels[id(r)] for r in rows)
    fig = _new_figure(figure_size("base2new", 3, len(datasets), len(methods)))
    axes = fig.subplots(3, 1, sharex=True, squeeze=False)[:, 0]
    handles: dict[str, Any] = {}
    for ax, metric in zip(axes, ("base", "new", "h")):
        sel = [r for r in rows if r.get("metric") == metric]
        _bars(ax, sel, datasets, methods, labels, colours, handles)
        ax.set_ylabel("Top-1 accuracy (%)", fontsize=9)
        ax.set_title(_METRIC_LABEL[metric], fontsize=10, loc="left")
    _dataset_ticks(axes[-1], datasets, source=None)
    fig.suptitle(figure_title("base2new", backbone, rows), fontsize=12)
    _legend(fig, handles)
    return fig


def _transfer_figure(rows: list[dict], protocol: str, backbone: str, source: str, colours: dict[str, Any]):
    targets = [d for d in _ordered(r.get("dataset") for r in rows) if d not in (source, "average")]
    present = {r.get("dataset") for r in rows}
    datasets = ([source] if source in present else []) + targets + (["average"] if "average" in present else [])
    labels = _series_labels(rows)
    methods = _ordered(labels[id(r)] for r in rows)
    fig = _new_figure(figure_size(protocol, 1, len(datasets), len(methods)))
    ax = fig.subplots(1, 1)
    handles: dict[str, Any] = {}
    _bars(ax, rows, datasets, methods, labels, colours, handles)
    # Separate the source (trained on) and the average (over targets) from the targets themselves.
    if source in present and len(datasets) > 1:
        ax.axvline(0.5, color="0.5", linestyle=":", linewidth=1)
    if "average" in present and len(datasets) > 1:
        ax.axvline(len(datasets) - 1.5, color="0.5", linestyle=":", linewidth=1)
    ax.set_ylabel("Top-1 accuracy (%)", fontsize=9)
    _dataset_ticks(ax, datasets, source=source)
    fig.suptitle(figure_title(protocol, backbone, rows, source=source), fontsize=12)
    _legend(fig, handles)
    return fig


def _bars(ax, rows, datasets, methods, labels, colours, handles) -> None:
    n = max(1, len(methods))
    width = 0.8 / n
    lows, highs = [], []
    for j, label in enumerate(methods):
        xs, ys, errs = [], [], []
        colour = None
        for i, dataset in enumerate(datasets):
            hits = _last_by(r for r in rows if r.get("dataset") == dataset and labels[id(r)] == label)
            if not hits:
                continue
            r = hits[-1]
            colour = colours[_method_key(r)][0]
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(_value(r["mean"]))
            errs.append(_value(r.get("std")) or 0.0)
        if not xs:
            continue
        h = ax.bar(xs, ys, width=width * 0.92, color=colour, label=label, zorder=2)
        handles.setdefault(label, h)
        with_std = [(x, y, e) for x, y, e in zip(xs, ys, errs) if e > 0]  # no caps where std is unknown
        if with_std:
            ax.errorbar([t[0] for t in with_std], [t[1] for t in with_std], yerr=[t[2] for t in with_std],
                        fmt="none", ecolor="0.2", elinewidth=0.8, capsize=1.5, zorder=3)
        lows.extend(ys)
        highs.extend(y + e for y, e in zip(ys, errs))
    ax.set_xlim(-0.6, len(datasets) - 0.4)
    if lows:
        # Bars start at 0: a truncated axis would overstate the gaps between methods (the tables give digits).
        bottom = min(0.0, min(lows))
        top = min(100.0, max(highs) + 0.08 * (max(highs) - bottom) + 1.0)
        if top <= bottom:
            top = bottom + 10.0
        ax.set_ylim(bottom, top)
    ax.grid(True, axis="y", linestyle=":", linewidth=0.6, alpha=0.7, zorder=0)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=8)


def _dataset_ticks(ax, datasets: list[str], source: Optional[str]) -> None:
    names = []
    for d in datasets:
        name = display_name(d)
        if source is not None and d == source:
            name += " (source)"
        elif d == "average" and source is not None:
            name = "Average (targets)"
        names.append(name)
    ax.set_xticks(range(len(datasets)), names, rotation=30, ha="right", rotation_mode="anchor", fontsize=8)


def _legend(fig, handles: dict[str, Any]) -> None:
    """One legend for the figure, in a row of its own below the panels (outside them, so it hides no data)."""
    if not handles:
        return
    # As many entries a row as fit the figure's width (about 0.07 in a character at 9 pt, plus the key).
    longest = max(len(k) for k in handles)
    width = fig.get_size_inches()[0]
    ncol = max(1, min(len(handles), 8, int((width - 0.4) // (0.75 + 0.075 * longest))))
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", ncol=ncol,
               fontsize=9, frameon=False)


# ----------------------------------------------------------------------------------------------------------------
# Row helpers
# ----------------------------------------------------------------------------------------------------------------


def _value(x) -> Optional[float]:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _yerr(rows: list[dict]):
    errs = [_value(r.get("std")) for r in rows]
    if not any(e for e in errs):
        return None
    return [e or 0.0 for e in errs]


def _ordered(items: Iterable) -> list:
    seen: dict = {}
    for x in items:
        seen.setdefault(x, None)
    return list(seen)


def _datasets_average_last(rows: list[dict]) -> list[str]:
    names = _ordered(r.get("dataset") for r in rows)
    return [d for d in names if d != "average"] + (["average"] if "average" in names else [])


def _last_by(rows: Iterable[dict]) -> list[dict]:
    """One row per shot count (the last one given wins), in first-seen order."""
    by: dict[int, dict] = {}
    for r in rows:
        by[int(r.get("shots") or 0)] = r
    return list(by.values())


def _method_key(row: dict) -> str:
    return str(row.get("method") or row.get("method_type") or "?")


def _series_labels(rows: list[dict]) -> dict[int, str]:
    """Legend label per row (keyed by id): the method, plus "(k shots)" where a bar chart's method has several."""
    shots_of: dict[str, set] = {}
    for r in rows:
        shots_of.setdefault(_method_key(r), set()).add(int(r.get("shots") or 0))
    out = {}
    for r in rows:
        key = _method_key(r)
        if r.get("protocol") != "fewshot" and len(shots_of[key]) > 1:
            out[id(r)] = f"{key} ({int(r.get('shots') or 0)} shots)"
        else:
            out[id(r)] = key
    return out


def _colour_map(rows: list[dict]) -> dict[str, tuple]:
    """A (colour, marker) per method, the same in every figure: zero-shot methods first."""
    import matplotlib

    keys = _ordered([_method_key(r) for r in rows if is_zeroshot(r)] + [_method_key(r) for r in rows])
    cmap = matplotlib.colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {k: (cmap(i % cmap.N), _MARKERS[i % len(_MARKERS)]) for i, k in enumerate(keys)}


def _metadata(ext: str) -> dict:
    # No creation date in the PDF, so the same rows give the same bytes.
    if ext == "pdf":
        return {"Creator": "vlprompt report", "CreationDate": None}
    return {"Software": "vlprompt report"}
