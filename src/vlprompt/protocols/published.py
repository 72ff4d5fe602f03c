"""The field's published reference numbers (papers, READMEs and logs of the official repositories), shipped as
``published.csv``; docs/protocols.md says where each group comes from.

One CSV row per published number: ``protocol`` (fewshot | base2new | xd | dg), ``dataset`` (a registry key
or ``average``), ``method``, ``backbone`` (open_clip name), ``shots`` (0 for zero-shot CLIP), ``metric``
(top1, or base / new / h for base2new), ``value`` (percent, as printed), ``config`` (``key=value;...``
naming the RunConfig settings (``method_options.NAME`` for a method option) that tell separately reported variants apart, empty when there is one
variant), ``source`` (a short citation) and ``confidence``: V (read in the official code, config, README or
an issue), R (from a paper's text or tables, not re-checked), R-low (R, of lower confidence: intermediate shot
counts read off a figure, or a paper's table as another project quotes it) or D (derived by arithmetic from V or R numbers).

    >>> lookup("dg", "imagenet", "coop", "ViT-B-16", 16, "top1", {"n_ctx": 16})[0].value
    71.92
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Mapping, Optional

PROTOCOL_METRICS = {"fewshot": ("top1",), "xd": ("top1",), "dg": ("top1",), "base2new": ("base", "new", "h")}


@dataclass(frozen=True)
class PublishedRow:
    protocol: str
    dataset: str
    method: str
    backbone: str
    shots: int
    metric: str
    value: float
    config: dict[str, str]  # RunConfig key -> value (as text); empty: the only variant reported
    source: str
    confidence: str

    def __hash__(self):  # config is a dict, so hash its items
        return hash((self.protocol, self.dataset, self.method, self.backbone, self.shots, self.metric,
                     self.value, tuple(sorted(self.config.items())), self.source, self.confidence))

    def matches(self, run_config: Optional[Mapping] = None) -> bool:
        """True when every config item of this row equals the run's value (compared as strings).

        A row without config matches any run; with ``run_config`` None only such rows match."""
        if not self.config:
            return True
        if run_config is None:
            return False
        return all(str(_setting(run_config, k)) == v for k, v in self.config.items())


def _setting(run_config: Mapping, key: str):
    """A run's value of ``key``; ``method_options.NAME`` reads the method's option (None when absent)."""
    if key.startswith("method_options."):
        return (run_config.get("method_options") or {}).get(key.partition(".")[2], _ABSENT)
    return run_config.get(key, _ABSENT)


_ABSENT = object()  # never equal to a row's text


def parse_config(text: str) -> dict[str, str]:
    """``"n_ctx=4;ctx_init=a photo of a"`` -> ``{"n_ctx": "4", "ctx_init": "a photo of a"}``."""
    items = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"published.csv: bad config item {part!r}")
        items[key.strip()] = value.strip()
    return items


@lru_cache(maxsize=1)
def _rows() -> tuple[PublishedRow, ...]:
    text = resources.files(__package__).joinpath("published.csv").read_text(encoding="utf-8")
    return tuple(
        PublishedRow(r["protocol"], r["dataset"], r["method"], r["backbone"], int(r["shots"]), r["metric"],
                     float(r["value"]), parse_config(r["config"]), r["source"], r["confidence"])
        for r in csv.DictReader(io.StringIO(text))
    )


def load_published() -> list[PublishedRow]:
    """All published rows, in file order (parsed once; a fresh list each call)."""
    return list(_rows())


def lookup(protocol: str, dataset: str, method: str, backbone: str, shots: int, metric: str,
           run_config: Optional[Mapping] = None) -> list[PublishedRow]:
    """The published rows for one cell whose config agrees with ``run_config`` (e.g. ``RunConfig.to_dict()``).

    Rows with an empty config match any run; when ``run_config`` is None only those match."""
    return [r for r in _rows()
            if (r.protocol, r.dataset, r.method, r.backbone, r.shots, r.metric)
            == (protocol, dataset, method, backbone, int(shots), metric) and r.matches(run_config)]
