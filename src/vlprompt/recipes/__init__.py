"""Recipes as data: the recipe table (`table`, ``recipes.yaml``), the one merge that resolves a run's values
(`resolve`), the reference a run is compared against (`reference`), and deviations as records (`records`)."""

from .records import Deviation, as_record, as_records, render, words_of
from .table import (ANY, NO_PRESET, PROTOCOLS, RECIPE_KEYS, Cell, Reference, cells_of, check_preset, default_cell,
                    infer_protocol, named, names, parse_table, reference, resolve, select, table)

__all__ = ["ANY", "Cell", "Deviation", "NO_PRESET", "PROTOCOLS", "RECIPE_KEYS", "Reference", "as_record",
           "as_records", "cells_of", "check_preset", "default_cell", "infer_protocol", "named", "names",
           "parse_table", "reference", "render", "resolve", "select", "table", "words_of"]
