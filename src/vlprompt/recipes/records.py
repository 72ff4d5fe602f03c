"""Deviations as structured records: how a run differs from its reference (its recipe cell, the official code,
a paper), one record per difference, and the one function that renders a record to words.

A record is ``{"key", "value", "reference", "source", "detail", "words"}``:

- ``key``: what differs: a RunConfig key (``epochs``, ``batch_size``), a method option
  (``method_options.weight``), or a named fact that is not a setting (``backbone.random``, ``prompt_precision``,
  ``train_mode``, ``recipe``, ``cpt.reconstruction``, ``data``, ...);
- ``value``: what this run used (a plain JSON value; a mapping for a group of reconstructed values);
- ``reference``: what the reference uses (None where the reference has no value, e.g. an unpublished detail);
- ``source``: where the reference comes from, in words (``kgcoop recipe``, ``official code``, ``our
  reconstruction``);
- ``detail``: optional words for people (why it matters, what controls it);
- ``words``: `render` of the above, written beside the fields in metrics.json for people; programs read the
  fields. Run folders of earlier versions hold plain strings: `as_records` and `words_of` accept both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

FIELDS = ("key", "value", "reference", "source", "detail")


@dataclass(frozen=True)
class Deviation:
    key: str
    value: Any = None
    reference: Any = None
    source: str = ""
    detail: str = ""

    @property
    def words(self) -> str:
        return render(self)

    def to_dict(self) -> dict:
        return {"key": self.key, "value": self.value, "reference": self.reference, "source": self.source,
                "detail": self.detail or None, "words": render(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "Deviation":
        return cls(str(data.get("key") or "note"), data.get("value"), data.get("reference"),
                   str(data.get("source") or ""), str(data.get("detail") or ""))


def _text(value: Any) -> str:
    """A value as people read it: true/false, none, lists comma-separated, mappings as k=v."""
    if value is True or value is False:
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return str(value)


def render(d: Deviation) -> str:
    """``key=value (source: reference): detail``, leaving out what a record does not have; e.g.
    ``epochs=2 (kgcoop recipe: 100)``, ``train_mode=feature_bank (paper: exact): 10 augmented views ...``."""
    text = d.key if d.value is None else f"{d.key}={_text(d.value)}"
    if d.reference is not None:
        text += f" ({d.source}: {_text(d.reference)})" if d.source else f" (reference: {_text(d.reference)})"
    elif d.source:
        text += f" ({d.source})"
    return f"{text}: {d.detail}" if d.detail else text


def as_record(item: Any, key: str = "note") -> Deviation:
    """A `Deviation` from a record, its dict form, or the plain words earlier versions (and methods that still
    say them in words) give: those become ``Deviation(key, detail=words)``."""
    if isinstance(item, Deviation):
        return item
    if isinstance(item, dict):
        return Deviation.from_dict(item)
    return Deviation(key, detail=str(item))


def as_records(items: Optional[Iterable], key: str = "note") -> list[dict]:
    """The dict form (with ``words``) of every item, as metrics.json holds them; plain words get ``key``."""
    return [as_record(item, key).to_dict() for item in items or ()]


def words_of(item: Any) -> str:
    """The words of one recorded deviation: a record's rendering, or an earlier version's plain string."""
    if isinstance(item, str):
        return item
    return render(as_record(item))
