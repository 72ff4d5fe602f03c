"""Reports: the tables (and figures) a paper needs, computed from run folders, never from logs.

`aggregate` turns records (`store.collect`) into rows, one per (protocol, dataset, method, backbone, shots,
metric), each with mean, std and n over seeds, the published number where one matches, and the difference.
The std is the population standard deviation (ddof = 0), as CoOp's ``parse_test_res.py`` computes it.

- few-shot: top-1 per dataset and shots; zero-shot methods at shots 0; an ``average`` row over datasets.
- base-to-new: ``base`` and ``new`` per dataset over seeds; ``h`` = H(mean base, mean new) per dataset; the
  ``average`` row has mean base, mean new over datasets and H of those (docs/protocols.md).
- xd / dg: top-1 on the source and each target; ``average`` over the targets (the source excluded).

`build_report` says what the rows were computed from (`account`): each row carries ``n_runs`` (the runs behind
it), ``n_expected`` (the runs the study planned for it: one per seed; None for loose run folders), ``marks``
(why a cell is empty or degenerate, `MARKS`) and ``note`` (the same in words, failed runs with their error).
A cell the tables show always has a row: an empty one (``mean`` None) says why it is empty. The report opens
with the study's settings (study.yaml, index.json, and what the runs recorded), its failed runs and its
warnings (broken run folders, also logged at WARNING). Methods come in the order of the study's
``study.yaml``; for loose run folders zero-shot methods first, then alphabetical.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from . import base2new, dg, fewshot, xd
from ..recipes.records import as_record, words_of
from .published import lookup
from .store import PlannedRun, Results, RunRecord, scan
from .units import dataset_label

FORMATS = ("md", "csv", "latex", "json")
STD_NOTE = "std: population standard deviation over seeds (ddof=0, as CoOp's parse_test_res.py)"
RANDOM_MARK = "†"
RANDOM_NOTE = f"{RANDOM_MARK}: computed on RANDOM weights (pipeline check only; not comparable with papers)"
COUNT_NOTE = "(k/n): the mean of k runs where the study planned n (one per seed); the marks say why"
NA_NOTE = "–: not applicable (a zero-shot method has no shots, a trained one no zero-shot column)"
# Why a cell is empty or degenerate: mark code (in rows' ``marks``) -> (the mark in tables, its legend line).
MARKS = {
    "does-not-transfer": ("[T]", "does not transfer: the method's head is over its training classes, so it has "
                                 "no accuracy on new classes or other datasets"),
    "failed": ("[F]", "failed: a run behind the cell failed (its error is under 'Failed runs')"),
    "missing": ("[M]", "missing: a run behind the cell has not finished (not run yet, pending, interrupted, or "
                       "no run folder)"),
    "broken": ("[B]", "broken run folder: a run's metrics.json or config.yaml cannot be read; it is left out "
                      "(under 'Warnings')"),
    "not-validated": ("[V]", "search kept its initial values: the fitted method selected no hyperparameters "
                             "on validation data (the note says why)"),
    "partial-average": ("[P]", "partial average: over fewer datasets than planned, or over cells with fewer "
                               "runs than planned"),
}
ROW_KEYS = ("protocol", "dataset", "source", "method", "method_type", "backbone", "shots", "metric", "mean",
            "std", "n", "random", "published", "published_source", "diff", "n_runs", "n_expected", "marks", "note")
_PROTOCOLS = {"fewshot": fewshot, "base2new": base2new, "xd": xd, "dg": dg}


def harmonic_mean(b: float, n: float) -> float:
    """H = 2BN / (B + N), the harmonic mean of base and new accuracy; 0 when both are 0."""
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
               published=None, published_source=None, diff=None, n_runs=None if dataset == "average" else n,
               n_expected=None, marks=[], note=None)
    if mean is None or (dataset == "average" and averaged != benchmark_datasets(protocol, source)):
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


# -- what the rows were computed from ----------------------------------------------------------------------------

def _key(row: dict) -> tuple:
    """A cell: (protocol, backbone, source, dataset, method, shots, metric)."""
    return (row["protocol"], row["backbone"], row["source"], row["dataset"], row["method"], row["shots"],
            row["metric"])


def _metric(protocol: str, split: str) -> str:
    return split if protocol == "base2new" else "top1"


def _record_key(r: RunRecord) -> tuple:
    return (r.protocol, r.backbone, r.source, r.dataset, r.method, r.shots, _metric(r.protocol, r.split))


def transfers(method_type: str) -> bool:
    """Whether a method's learned prompt can be rebuilt for other classes (a head over its own cannot); a
    method this vlprompt does not know is taken to transfer (nothing is claimed about it)."""
    from ..errors import VlpromptError
    from ..methods import get_method

    try:
        return bool(get_method(method_type).needs.transfers)
    except VlpromptError:
        return True


def _empty_row(key: tuple, method_type: str, random: bool) -> dict:
    protocol, backbone, source, dataset, method, shots, metric = key
    row = _row(protocol, dataset, source, method, method_type, backbone, shots, metric, None, None, 0, random,
               {}, averaged=set())
    row["n_runs"] = None if dataset == "average" else 0
    return row


def _mark(row: dict, mark: str, text: Optional[str] = None) -> None:
    """Add a mark (once) and a note to a row; notes are joined into ``row["note"]`` by `_finish`."""
    if mark not in row["marks"]:
        row["marks"].append(mark)
    if text:
        row.setdefault("_notes", []).append(text)


def _finish(row: dict) -> dict:
    notes = row.pop("_notes", [])
    row["note"] = "; ".join(dict.fromkeys(notes)) or None
    row["marks"] = [m for m in MARKS if m in row["marks"]]  # legend order
    return row


def account(rows: list[dict], results: Results) -> list[dict]:
    """``rows`` (`aggregate` of ``results.records``) with what each cell was computed from: the runs behind it
    and the runs planned for it, and a marked reason for every empty or degenerate cell, empty cells included
    as rows (``mean`` None). Returns the rows, the added ones after those given."""
    cells = {_key(r): r for r in rows}
    randoms = {r.backbone for r in results.records if r.random}
    _count_runs(cells, results.records)
    if results.is_study:
        _mark_planned(cells, results, randoms)
    _mark_no_transfer(cells, _study_targets(results), randoms)
    _fill_missing(cells, randoms)
    _derive_h(cells, randoms)
    _mark_averages(cells, randoms)
    return [_finish(r) for r in cells.values()]


def _count_runs(cells: dict, records: list[RunRecord]) -> None:
    by_cell: dict = defaultdict(list)
    for r in records:
        by_cell[_record_key(r)].append(r)
    for key, group in by_cell.items():
        row = cells.get(key)
        if row is None:
            continue  # `aggregate` made no row of these runs (none: it groups the same records)
        row["n_runs"] = len(group)
        kept = [r.not_validated for r in group if r.not_validated]
        if kept:
            _mark(row, "not-validated", f"search kept its initial values in {len(kept)} of {len(group)} runs "
                                        f"({'; '.join(dict.fromkeys(kept))})")


def _planned_backbone(results: Results):
    """The backbone a planned run uses: its own record's; else that of a finished run of the same method (a
    method's backbone is one setting); else the method's own setting in study.yaml; else the only backbone of
    the study's runs; else the study's setting, the method's recipe cell for the protocol or RunConfig's."""
    study = results.study or {}
    by_method = {str(m.get("label") or m.get("method")): m["overrides"]["backbone"]
                 for m in study.get("methods") or [] if isinstance(m, dict) and isinstance(m.get("overrides"), dict)
                 and m["overrides"].get("backbone")}
    by_method.update({p.record.method: p.record.backbone for p in results.planned if p.record is not None})
    seen = list(dict.fromkeys(r.backbone for r in results.records))
    settings = study.get("settings") if isinstance(study.get("settings"), dict) else {}
    fallback = (seen[0] if len(seen) == 1 else None) or settings.get("backbone")

    def backbone(p: PlannedRun) -> str:
        if p.record is not None:
            return p.record.backbone
        return str(by_method.get(p.role.get("method")) or fallback
                   or _recipe_backbone(p.role.get("method_type"), study.get("protocol"))).replace("/", "-")

    return backbone


def _recipe_backbone(method, protocol) -> str:
    """The backbone the recipe table gives ``method`` under ``protocol`` (RunConfig's default without a cell)."""
    from ..config import RunConfig
    from ..recipes import PROTOCOLS, default_cell

    cell = default_cell(str(method), protocol) if protocol in PROTOCOLS else None
    return str((cell.values if cell else {}).get("backbone") or RunConfig.backbone)


def _who(p: PlannedRun) -> str:
    seed = p.role.get("seed")
    return f"seed {seed}" if seed is not None else f"run {p.uid}"


def _mark_planned(cells: dict, results: Results, randoms: set) -> None:
    """Runs planned / done per cell, and the failed, pending and broken ones."""
    backbone = _planned_backbone(results)
    by_cell: dict = defaultdict(list)
    for p in results.planned:
        role = p.role
        if p.record is not None:
            by_cell[_record_key(p.record)].append(p)
        elif {"protocol", "dataset", "source", "method"} <= set(role):
            key = (role["protocol"], backbone(p), role["source"], role["dataset"], role["method"],
                   int(role.get("shots") or 0), _metric(role["protocol"], role.get("split") or "all"))
            by_cell[key].append(p)
    for key, group in by_cell.items():
        if key not in cells:
            cells[key] = _empty_row(key, group[0].role.get("method_type") or key[4], key[1] in randoms)
        row = cells[key]
        done = sum(1 for p in group if p.state == "done")
        row["n_runs"], row["n_expected"] = done, len(group)
        if 0 < done < len(group):
            row.setdefault("_notes", []).insert(0, f"mean of {done} of {len(group)} planned runs")
        for p in group:
            if p.state == "failed":
                _mark(row, "failed", f"{_who(p)} failed: {p.error}")
            elif p.state == "pending":
                _mark(row, "missing", f"{_who(p)} not run yet" + (f" ({p.error})" if p.error else ""))
            elif p.state == "broken":
                _mark(row, "broken", f"{_who(p)}: broken run folder ({p.error})")


def _study_targets(results: Results) -> list[str]:
    study = results.study or {}
    targets = study.get("targets") if isinstance(study.get("targets"), list) else []
    return [dataset_label(str(t)) for t in targets]


def _no_transfer_row(cells: dict, key: tuple, method_type: str, random: bool) -> None:
    row = cells.get(key)
    if row is None:
        row = cells[key] = _empty_row(key, method_type, random)
        row["n_runs"] = row["n_expected"] = None if key[3] == "average" else 0
    if row["mean"] is None:
        _mark(row, "does-not-transfer", f"{method_type} does not transfer: its head is over its training classes")


def _mark_no_transfer(cells: dict, study_targets: list[str], randoms: set) -> None:
    """Base-to-new ``new`` and H, and cross-dataset targets and average, of a method that cannot transfer."""
    for row in list(cells.values()):
        if row["dataset"] == "average" or transfers(row["method_type"]):
            continue
        protocol, bb, src, ds, method, shots, metric = _key(row)
        random = bb in randoms
        if protocol == "base2new" and metric == "base":
            for other in ("new", "h"):
                _no_transfer_row(cells, (protocol, bb, src, ds, method, shots, other), row["method_type"], random)
        elif protocol in ("xd", "dg") and ds == src:
            shown = [k[3] for k in cells if k[:3] == (protocol, bb, src) and k[3] not in (src, "average")]
            for target in list(dict.fromkeys(shown + [t for t in study_targets if t != src])) + ["average"]:
                _no_transfer_row(cells, (protocol, bb, src, target, method, shots, "top1"), row["method_type"],
                                 random)


def _fill_missing(cells: dict, randoms: set) -> None:
    """An empty row, marked missing, for every cell a table shows in a method's line that no run stands for:
    few-shot, the method's shot counts on each of its datasets; base-to-new, base and new; xd / dg, the source
    and every target of the table."""
    rows = [r for r in cells.values() if r["dataset"] != "average"]
    shots_of, datasets_of = defaultdict(set), defaultdict(set)
    for r in rows:
        shots_of[(r["protocol"], r["backbone"], r["method"])].add(r["shots"])
        datasets_of[(r["protocol"], r["backbone"], r["source"])].add(r["dataset"])
    wanted = []
    for r in rows:
        protocol, bb, src, ds, method, shots, metric = _key(r)
        if protocol == "fewshot":
            wanted += [(protocol, bb, src, ds, method, k, "top1") for k in shots_of[(protocol, bb, method)]]
        elif protocol == "base2new":
            wanted += [(protocol, bb, src, ds, method, shots, m) for m in ("base", "new")]
        else:
            wanted += [(protocol, bb, src, d, method, shots, "top1") for d in datasets_of[(protocol, bb, src)]]
    types = {r["method"]: r["method_type"] for r in rows}
    for key in wanted:
        if key not in cells:
            cells[key] = _empty_row(key, types[key[4]], key[1] in randoms)
            _mark(cells[key], "missing", "no run folder for this cell")


def _derive_h(cells: dict, randoms: set) -> None:
    """H from base and new: the fewer runs of the two, and the marks and notes of both."""
    for key in [k for k in cells if k[0] == "base2new" and k[6] == "base" and k[3] != "average"]:
        base, new = cells[key], cells.get(key[:6] + ("new",))
        h_key = key[:6] + ("h",)
        if new is None or "does-not-transfer" in new["marks"]:
            continue
        if h_key not in cells:
            cells[h_key] = _empty_row(h_key, base["method_type"], key[1] in randoms)
        h = cells[h_key]
        if base["n_runs"] is not None and new["n_runs"] is not None:
            h["n_runs"] = min(base["n_runs"], new["n_runs"])
        expected = [x["n_expected"] for x in (base, new) if x["n_expected"] is not None]
        h["n_expected"] = max(expected) if expected else None
        for side, row in (("base", base), ("new", new)):
            for mark in row["marks"]:
                _mark(h, mark)
            for note in row.get("_notes", []):
                h.setdefault("_notes", []).append(f"{side}: {note}")


def _mark_averages(cells: dict, randoms: set) -> None:
    """An average over fewer datasets than its table shows for the method, or over cells short of runs, is
    marked partial; one that could not be computed at all gets an empty, marked row."""
    groups: dict = defaultdict(list)
    for key, row in cells.items():
        protocol, bb, src, ds, method, shots, metric = key
        if ds == "average" or (protocol in ("xd", "dg") and ds == src) or not transfers(row["method_type"]):
            continue
        source = src if protocol in ("xd", "dg") else "average"
        groups[(protocol, bb, source, "average", method, shots, metric)].append(row)
    for avg_key, parts in groups.items():
        needed = 1 if avg_key[0] in ("xd", "dg") else 2  # `aggregate`'s rule for having an average at all
        if len(parts) < needed:
            continue
        have = [p for p in parts if _contributes(p, cells)]
        short = [p["dataset"] for p in parts
                 if p["marks"] and set(p["marks"]) & {"failed", "missing", "broken"} and p["mean"] is not None]
        avg = cells.get(avg_key)
        if avg is None:
            avg = cells[avg_key] = _empty_row(avg_key, parts[0]["method_type"], avg_key[1] in randoms)
            _mark(avg, "partial-average", f"not computed: {len(have)} of {len(parts)} datasets have results")
            continue
        left = sorted(p["dataset"] for p in parts if not _contributes(p, cells))
        if left:
            _mark(avg, "partial-average", f"over {len(parts) - len(left)} of {len(parts)} datasets (without "
                                          f"{', '.join(left)})")
        if short:
            _mark(avg, "partial-average", f"{', '.join(sorted(short))}: fewer runs than planned")


def _contributes(part: dict, cells: dict) -> bool:
    """Whether a dataset's cell is in its average (base-to-new base and new: only with the other one too)."""
    if part["mean"] is None:
        return False
    if part["protocol"] == "base2new" and part["metric"] in ("base", "new"):
        other = _key(part)[:6] + ("new" if part["metric"] == "base" else "base",)
        return cells.get(other, {}).get("mean") is not None
    return True


# -- the report's context: settings, failed runs, warnings, method order ------------------------------------------

@dataclass
class ReportContext:
    """What a report says besides its tables."""

    title: str
    settings: list[tuple[str, str]]  # (setting, value), in reading order
    failed: list[tuple[str, str]]  # (run, its one-line error from index.json)
    warnings: list[str]  # one line each (also logged at WARNING)
    method_order: list[str] = field(default_factory=list)  # method labels, in the order tables list them
    runs: dict = field(default_factory=dict)  # `run_counts`
    deviations: list = field(default_factory=list)  # `deviation_summary`


class ReportRows(list):
    """The rows of a report (a plain list of row dicts, as `aggregate` returns) with its `ReportContext`, so
    that every renderer given only the rows still says what they were computed from."""

    def __init__(self, rows: Iterable[dict] = (), context: Optional[ReportContext] = None):
        super().__init__(rows)
        self.context = context


def _study_methods(study: Optional[dict]) -> list[str]:
    """The method labels of a study.yaml, in the order the user gave them."""
    labels = []
    for m in (study or {}).get("methods") or []:
        if isinstance(m, str):
            labels.append(m)
        elif isinstance(m, dict) and (m.get("label") or m.get("method")):
            labels.append(str(m.get("label") or m.get("method")))
    return labels


def method_order(results: Results, rows: list[dict]) -> list[str]:
    """A study's methods in its study.yaml's order; any other method (loose run folders) after them, zero-shot
    methods first, then alphabetical."""
    given = _study_methods(results.study)
    zeroshot = {r["method"] for r in rows if str(r["method_type"]).startswith("zeroshot")}
    rest = sorted({r["method"] for r in rows} - set(given), key=lambda m: (m not in zeroshot, m))
    return given + rest


def _distinct(values: Iterable) -> str:
    shown = list(dict.fromkeys(str(v) for v in values if v is not None and v != ""))
    return ", ".join(shown) if shown else "–"


def _epochs(records: list[RunRecord], order: list[str]) -> str:
    """Training epochs per method as the runs record them (fitted methods say so; zero-shot ones and
    evaluations are left out)."""
    per: dict = defaultdict(list)
    for r in records:
        epochs = r.facts.get("epochs")
        if r.facts.get("fitted"):
            per[r.method].append(f"fitted, {epochs} epochs" if epochs else "fitted")
        elif epochs is not None:
            per[r.method].append(epochs)
    ranked = sorted(per, key=lambda m: order.index(m) if m in order else len(order))
    return "; ".join(f"{m} {_distinct(per[m])}" for m in ranked) or "–"


def _per_method(records: list[RunRecord], order: list[str], fact: str) -> str:
    """A recorded fact per method, e.g. the recipe cells: ``coop coop/base2new/any; kgcoop kgcoop``."""
    per: dict = defaultdict(list)
    for r in records:
        if r.facts.get(fact) is not None:
            per[r.method].append(r.facts[fact])
    ranked = sorted(per, key=lambda m: order.index(m) if m in order else len(order))
    return "; ".join(f"{m} {_distinct(per[m])}" for m in ranked) or "–"


def deviation_summary(records: list[RunRecord], order: list[str]) -> list[dict]:
    """Every distinct deviation the runs recorded (records rendered by `recipes.render`; plain words of earlier
    run folders as they are), with its key, the number of runs and the methods that recorded it."""
    seen: dict = {}
    for r in records:
        for d in r.facts.get("deviations") or []:
            words = words_of(d)
            entry = seen.setdefault(words, {"words": words, "key": as_record(d).key, "runs": 0, "methods": []})
            entry["runs"] += 1
            if r.method not in entry["methods"]:
                entry["methods"].append(r.method)
    rank = {m: i for i, m in enumerate(order)}
    return sorted(seen.values(), key=lambda e: (min(rank.get(m, len(order)) for m in e["methods"]), e["key"]))


def _deviation_keys(summary: list[dict]) -> str:
    runs: dict = {}
    for e in summary:
        runs[e["key"]] = runs.get(e["key"], 0) + e["runs"]
    return ", ".join(f"{k} ({n})" for k, n in runs.items()) or "–"


def _dates(records: list[RunRecord]) -> str:
    stamps = sorted(r.facts["finished"] for r in records if r.facts.get("finished") is not None)
    if not stamps:
        return "–"
    first, last = (s.strftime("%Y-%m-%d %H:%M UTC") for s in (stamps[0], stamps[-1]))
    return first if first == last else f"{first} to {last}"


def _run_counts(results: Results) -> str:
    if not results.is_study:
        return f"{len(results.records)} run folders read, {len(results.broken)} broken (left out)"
    counts = run_counts(results)
    return (f"{counts['planned']} planned: {counts['done']} done, {counts['failed']} failed, {counts['pending']} "
            f"pending (not run yet), {counts['broken']} broken (run folder unreadable)")


def run_counts(results: Results) -> dict:
    """Runs planned, done, failed, pending and broken (a folder of loose runs: planned is None)."""
    states = [p.state for p in results.planned]
    if not results.is_study:
        return {"planned": None, "done": len(results.records), "failed": 0, "pending": 0,
                "broken": len(results.broken)}
    return {"planned": len(states), **{s: states.count(s) for s in ("done", "failed", "pending", "broken")}}


def settings(results: Results, order: list[str]) -> list[tuple[str, str]]:
    """The study's settings (its study.yaml) and what its runs recorded (backbone, weights, precision, epochs,
    dates); for loose run folders only the latter."""
    study, records = results.study or {}, results.records
    out = [("folder", str(results.root.resolve())),
           ("computed from", "study.yaml, index.json and the run folders" if results.is_study
            else "loose run folders (no study): the settings below are what the runs record")]
    out.append(("protocol", str(study.get("protocol") or _distinct(r.protocol for r in records))))
    types = {r.method: r.method_type for r in records}
    types.update({str(m.get("label") or m["method"]): m["method"] for m in study.get("methods") or []
                  if isinstance(m, dict) and m.get("method")})
    out.append(("methods", ", ".join(m if types.get(m, m) == m else f"{m} ({types[m]})" for m in order) or "–"))
    if study.get("source"):
        out += [("source", str(study["source"])), ("targets", _distinct(study.get("targets") or []))]
    elif study:
        out.append(("datasets", _distinct(study.get("datasets") or [])))
    else:
        out.append(("datasets", _distinct(r.dataset for r in records)))
    if study:
        out += [("shots", _distinct(study.get("shots") or [])), ("seeds", _distinct(study.get("seeds") or []))]
        given = study.get("settings") if isinstance(study.get("settings"), dict) else {}
        out.append(("study settings", ", ".join(f"{k}={v}" for k, v in given.items()) or "–"))
    else:
        out += [("shots", _distinct(sorted({r.shots for r in records}))),
                ("seeds", _distinct(sorted({r.seed for r in records if r.seed is not None})))]
    out += [("backbone", _distinct(r.backbone for r in records)),
            ("backbone source", _distinct(r.facts.get("backbone_source") for r in records)),
            ("pretrained", _distinct(r.facts.get("pretrained") for r in records)),
            ("weights file", _distinct(r.facts.get("weights") for r in records)),
            ("precision", _distinct(r.facts.get("precision") for r in records)),
            ("epochs", _epochs(records, order)),
            ("recipe cells", _per_method(records, order, "recipe_cell")),
            ("deviations (runs)", _deviation_keys(deviation_summary(records, order))),
            ("runs finished", _dates(records)),
            ("runs", _run_counts(results)),
            ("vlprompt", _distinct(r.facts.get("vlprompt") for r in records))]
    return out


def _row_order(order: list[str]):
    protocols = list(_PROTOCOLS)
    metrics = ("top1", "base", "new", "h")

    def key(r: dict):
        return (protocols.index(r["protocol"]) if r["protocol"] in protocols else len(protocols), str(r["backbone"]),
                str(r["source"]) if r["protocol"] in ("xd", "dg") else "",
                order.index(r["method"]) if r["method"] in order else len(order), r["shots"],
                r["dataset"] == "average", str(r["dataset"]), metrics.index(r["metric"]) if r["metric"] in metrics
                else len(metrics))

    return key


def build_report(folder: str | Path) -> ReportRows:
    """The rows of every run under ``folder`` (`aggregate`), accounted for (`account`), in the order of the
    study's methods, with the report's context; each warning is logged at WARNING, one line each."""
    from ..utils.progress import logger

    results = scan(folder)
    for line in results.warnings:
        logger.warning(f"vlprompt: warning: report: {line}")
    rows = account(aggregate(results.records), results)
    order = method_order(results, rows)
    context = ReportContext(title=f"vlprompt report: {Path(folder).resolve().name}",
                            settings=settings(results, order),
                            failed=[(p.uid, p.error or "") for p in results.planned if p.state == "failed"],
                            warnings=list(results.warnings), method_order=order, runs=run_counts(results),
                            deviations=deviation_summary(results.records, order))
    return ReportRows(sorted(rows, key=_row_order(order)), context)


# -- tables ---------------------------------------------------------------------------------------------------

def _num(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


def cell(row: Optional[dict], with_published: bool = True) -> str:
    """``mean ± std`` (std over seeds when there are several), the random mark, ``(k/n)`` where k runs stand
    for the n the study planned, the marks that say why a cell is empty or degenerate (`MARKS`), and the
    published number with our difference to it. ``–`` alone: no such cell (not applicable)."""
    if row is None:
        return "–"
    if row["mean"] is None:
        text = "–"
    else:
        text = _num(row["mean"])
        if row["std"] is not None and row["n"] > 1:
            text += f" ± {row['std']:.2f}"
        if row["random"]:
            text += RANDOM_MARK
    if _short_of_runs(row):
        text += f" ({row['n_runs']}/{row['n_expected']})"
    for mark in row.get("marks") or []:
        text += " " + MARKS[mark][0]
    if with_published and row["published"] is not None and row["mean"] is not None:
        text += f" (paper {row['published']:.2f}, {row['diff']:+.2f})"
    return text


def _short_of_runs(row: dict) -> bool:
    n, expected = row.get("n_runs"), row.get("n_expected")
    return row["mean"] is not None and n is not None and bool(expected) and n < expected


def _context(rows, context: Optional[ReportContext]) -> Optional[ReportContext]:
    return context if context is not None else getattr(rows, "context", None)


def tables(rows: list[dict], context: Optional[ReportContext] = None) -> list[dict]:
    """Each table as ``{"title", "header", "body" (list of cell lists), "notes"}``, in the layouts the papers
    use: few-shot dataset x method x shots; base-to-new B / N / H per dataset and method (CoCoOp Table 1);
    xd / dg one row per method with the source, each target and the average (CoCoOp Tables 2-3). Methods in
    the context's order (zero-shot first, then as they come, without one)."""
    out = []
    context = _context(rows, context)
    order = context.method_order if context is not None else None
    index = {(r["protocol"], r["backbone"], r["source"], r["dataset"], r["method"], r["shots"], r["metric"]): r
             for r in rows}

    def notes(selected, body):
        sources = sorted({r["published_source"] for r in selected if r["published_source"]})
        used = {m for r in selected for m in r.get("marks") or []}
        return ([STD_NOTE] + ([RANDOM_NOTE] if any(r["random"] and r["mean"] is not None for r in selected) else [])
                + ([COUNT_NOTE] if any(_short_of_runs(r) for r in selected) else [])
                + [f"{symbol} {legend}" for m, (symbol, legend) in MARKS.items() if m in used]
                + ([NA_NOTE] if any(c == "–" for line in body for c in line) else [])
                + [f"paper: {s}" for s in sources])

    for bb in _unique(r["backbone"] for r in rows if r["protocol"] == "fewshot"):
        sel = [r for r in rows if r["protocol"] == "fewshot" and r["backbone"] == bb]
        shots = sorted({r["shots"] for r in sel})
        body = []
        for ds in _datasets(sel):
            for method in _methods([r for r in sel if r["dataset"] == ds], order):
                body.append([ds, method] + [cell(index.get(("fewshot", bb, ds, ds, method, k, "top1")))
                                            for k in shots])
        header = ["dataset", "method"] + [("zero-shot" if k == 0 else f"{k} shot{'s' if k > 1 else ''}")
                                          for k in shots]
        out.append({"title": f"Few-shot top-1 % ({bb})", "header": header, "body": body,
                    "notes": notes(sel, body)})

    for bb in _unique(r["backbone"] for r in rows if r["protocol"] == "base2new"):
        sel = [r for r in rows if r["protocol"] == "base2new" and r["backbone"] == bb]
        body = []
        for ds in _datasets(sel):
            for method in _methods([r for r in sel if r["dataset"] == ds], order):
                shots = next(r["shots"] for r in sel if r["dataset"] == ds and r["method"] == method)
                body.append([ds, method] + [cell(index.get(("base2new", bb, ds, ds, method, shots, m)))
                                            for m in ("base", "new", "h")])
        out.append({"title": f"Base-to-new top-1 % ({bb}; H from seed-averaged base and new)",
                    "header": ["dataset", "method", "base", "new", "H"], "body": body, "notes": notes(sel, body)})

    for protocol, name in (("xd", "Cross-dataset"), ("dg", "Domain generalisation")):
        sel_all = [r for r in rows if r["protocol"] == protocol]
        for bb, src in _unique((r["backbone"], r["source"]) for r in sel_all):
            sel = [r for r in sel_all if r["backbone"] == bb and r["source"] == src]
            targets = [d for d in _datasets(sel) if d not in (src, "average")]
            cols = [src] + targets + ["average"]
            body = []
            for method in _methods(sel, order):
                shots = next(r["shots"] for r in sel if r["method"] == method)
                body.append([method] + [cell(index.get((protocol, bb, src, d, method, shots, "top1"))) for d in cols])
            out.append({"title": f"{name} top-1 % ({bb}; trained on {src}, average over the targets)",
                        "header": ["method", f"{src} (source)"] + targets + ["average"], "body": body,
                        "notes": notes(sel, body)})
    return out


def _methods(rows, order: Optional[list[str]] = None) -> list[str]:
    """Method labels in table order: ``order`` where given (the study's), else zero-shot baselines first, then
    the others as they come."""
    labels = _unique(r["method"] for r in rows)
    if order is not None:
        return sorted(labels, key=lambda m: order.index(m) if m in order else len(order))
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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _md(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


def _deviation_line(entry: dict) -> str:
    return f"{entry['words']} ({entry['runs']} run{'s' if entry['runs'] != 1 else ''}: {', '.join(entry['methods'])})"


def _markdown_context(context: ReportContext) -> list[str]:
    parts = [f"## {context.title}", "", "### Settings", "", "| setting | value |", "|---|---|"]
    parts += [f"| {_md(k)} | {_md(v)} |" for k, v in context.settings]
    if context.failed:
        parts += ["", "### Failed runs", ""] + [f"- {_md(uid)}: {_md(err)}" for uid, err in context.failed]
    if context.warnings:
        parts += ["", "### Warnings", ""] + [f"- {_md(w)}" for w in context.warnings]
    if context.deviations:
        parts += ["", "### Deviations from the recipes", ""] + [f"- {_md(_deviation_line(e))}"
                                                                   for e in context.deviations]
    return parts + [""]


def to_markdown(rows: list[dict], context: Optional[ReportContext] = None) -> str:
    context = _context(rows, context)
    parts = _markdown_context(context) if context is not None else []
    found = tables(rows, context)
    for t in found:
        parts.append(f"### {t['title']}\n")
        parts.append("| " + " | ".join(_md(h) for h in t["header"]) + " |")
        parts.append("|" + "|".join("---" for _ in t["header"]) + "|")
        parts += ["| " + " | ".join(_md(c) for c in line) + " |" for line in t["body"]]
        parts += [""] + [f"- {n}" for n in t["notes"]] + [""]
    if not found:
        parts.append("(no finished runs)\n")
    return "\n".join(parts)


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), (RANDOM_MARK, r"$^\dagger$")):
        text = text.replace(a, b)
    return text


def to_latex(rows: list[dict], context: Optional[ReportContext] = None) -> str:
    """One booktabs ``tabular`` per table (needs ``\\usepackage{booktabs}``); the settings, failed runs and
    warnings as comments above them."""
    context = _context(rows, context)
    parts = []
    if context is not None:
        parts.append(f"% {_one_line(context.title)}")
        parts += [f"% {_one_line(k)}: {_one_line(v)}" for k, v in context.settings]
        parts += [f"% failed run {_one_line(uid)}: {_one_line(err)}" for uid, err in context.failed]
        parts += [f"% warning: {_one_line(w)}" for w in context.warnings]
        parts.append("")
    for t in tables(rows, context):
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


def _field(row: dict, key: str):
    value = row[key]
    if key == "marks":
        return " ".join(value)
    return "" if value is None else value


def to_csv(rows: list[dict]) -> str:
    """One line per row; ``marks`` space-separated, ``note`` as text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ROW_KEYS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _field(r, k) for k in ROW_KEYS})
    return buf.getvalue()


def to_json(rows: list[dict]) -> str:
    import json

    return json.dumps([{k: r[k] for k in ROW_KEYS} | {"std_kind": "population"} for r in rows], indent=1) + "\n"


def context_json(rows: list[dict], context: Optional[ReportContext] = None) -> str:
    """The report's context as JSON: settings, failed runs, warnings, the method order and the marks' legend."""
    import json

    context = _context(rows, context)
    data = {} if context is None else {
        "title": context.title, "settings": dict(context.settings),
        "failed": [{"run": uid, "error": err} for uid, err in context.failed], "warnings": context.warnings,
        "deviations": context.deviations,
        "method_order": context.method_order, "runs": context.runs}
    data["legend"] = {m: {"mark": symbol, "meaning": legend} for m, (symbol, legend) in MARKS.items()}
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


RENDER = {"md": to_markdown, "csv": to_csv, "latex": to_latex, "json": to_json}


def write_report(folder: str | Path, plots: bool = True) -> tuple[list[dict], Path]:
    """Rows of every run under ``folder`` (`build_report`), and ``folder/report/`` with the tables in every
    format (``report.json``: the settings, failed runs, warnings and legend), the figures (PNG and PDF) and a
    self-contained ``index.html``."""
    from ..utils.io import atomic_write_text
    from .html import list_html, table_html, write_html

    rows = build_report(folder)
    context = rows.context
    out = Path(folder) / "report"
    out.mkdir(parents=True, exist_ok=True)
    for fmt, ext in (("md", "md"), ("csv", "csv"), ("latex", "tex"), ("json", "json")):
        atomic_write_text(out / f"tables.{ext}", RENDER[fmt](rows))
    atomic_write_text(out / "report.json", context_json(rows))
    images = []
    if plots:
        from .plots import write_plots

        images = [p for p in write_plots(list(rows), out) if p.suffix == ".png"]  # methods in the tables' order
    sections = [("Settings", table_html(["setting", "value"], [list(kv) for kv in context.settings]))]
    if context.failed:
        sections.append(("Failed runs", table_html(["run", "error"], [list(f) for f in context.failed])))
    if context.warnings:
        sections.append(("Warnings", list_html(context.warnings)))
    if context.deviations:
        sections.append(("Deviations from the recipes", list_html([_deviation_line(e) for e in context.deviations])))
    sections += [(t["title"], table_html(t["header"], t["body"]) + "\n" + list_html(t["notes"], cls="notes"))
                 for t in tables(rows)]
    write_html(out, context.title, sections, images)
    return rows, out
