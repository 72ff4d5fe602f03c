"""The named cells of the recipe table, under their earlier name (``vp.PRESETS``): kept so that code written
against it still works. The recipes themselves live in `vlprompt.recipes` (``recipes.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .recipes import NO_PRESET, check_preset, default_cell, named, table

__all__ = ["NO_PRESET", "PRESETS", "Preset", "check_preset", "method_recipe", "resolve_preset"]


@dataclass(frozen=True)
class Preset:
    name: str
    values: dict = field(default_factory=dict)  # RunConfig keys -> values
    source: str = ""  # where the values come from, in words


def _preset(cell) -> Preset:
    return Preset(cell.id, dict(cell.values), cell.source)


PRESETS: dict[str, Preset] = {c.name: _preset(c) for c in table() if c.name}


def resolve_preset(name: Optional[str], method: str, protocol: str = "fewshot") -> Optional[Preset]:
    """The cell a run of ``method`` uses as a `Preset`: the one named, else the method's own; None for
    ``none``."""
    check_preset(name)
    if name == NO_PRESET:
        return None
    cell = named(name) if name else default_cell(method, protocol)
    return _preset(cell) if cell is not None else None


def method_recipe(method: str, protocol: str = "fewshot") -> Optional[Preset]:
    """The cell of ``method`` for ``protocol`` when the method has one of its own, else None."""
    cell = default_cell(method, protocol)
    return _preset(cell) if cell is not None and cell.method == method else None
