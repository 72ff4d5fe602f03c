"""The recipe table (``recipes.yaml``, shipped with the package): each method's training recipe per protocol and,
where the official code differs by dataset, per dataset, as RunConfig values.

A cell is keyed by ``method`` (a method name or ``any``), ``protocol`` (fewshot, base2new, xd, dg or ``any``) and
``dataset`` (a registered dataset name or ``any``); it holds ``values`` (RunConfig keys, a method's own options
under ``method_options``), ``source`` (where the values come from, in words) and ``reconstructed`` (true where
no official configuration exists and the values are our choice). A cell may have a ``name``, which ``preset:
NAME`` selects; an ``alternative: true`` cell is used only when named. ``official`` holds facts of the official
code that are not settings (the precision it runs in), against which runs are compared.

How a run's values are resolved (`resolve`, the one merge): RunConfig defaults < the cell < the YAML file < the
command line (in a study: the cell < the study's settings < a method's overrides < what the unit decides). The
cell is the most specific match of (method, protocol, dataset): method first, then protocol, then dataset, so
``ivlp/base2new/any`` wins over ``ivlp/any/any``, which wins over ``any/base2new/any``. ``preset: NAME`` picks a
named cell instead, ``preset: none`` no cell. The run's protocol is its ``protocol`` setting, or else inferred:
base2new when ``subsample`` is base or new, fewshot otherwise. docs/recipes.md explains every cell.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Optional

from ..errors import VlpromptError

PROTOCOLS = ("fewshot", "base2new", "xd", "dg")
ANY = "any"
NO_PRESET = "none"
TABLE_FILE = "recipes.yaml"
TABLE_WHERE = "recipe table vlprompt/recipes/recipes.yaml"

# The RunConfig keys a cell may set: what a recipe decides. Where the data and weights live and how a run is
# carried out (device, precision, threads, caching) are not a recipe's business.
CELL_KEYS = ("backbone", "shots", "template", "n_ctx", "ctx_init", "ctx_init_rule", "csc", "class_token_position",
             "epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "warmup_lr", "method_options")
# The optimiser settings every run is compared on (RunConfig's defaults are CoOp's), besides what its cell sets.
RECIPE_KEYS = ("batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "warmup_lr")
# Facts of the official code that are not settings, and their value where a cell does not say.
OFFICIAL = {"precision": "fp16", "prompt_precision": "fp16"}
_CELL_FIELDS = ("method", "protocol", "dataset", "name", "alternative", "values", "source", "reconstructed",
                "official")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


@dataclass(frozen=True, eq=False)
class Cell:
    method: str
    protocol: str
    dataset: str
    values: dict
    source: str
    reconstructed: bool
    name: Optional[str] = None
    alternative: bool = False
    official: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The cell's name, or ``method/protocol/dataset``."""
        return self.name or f"{self.method}/{self.protocol}/{self.dataset}"

    @property
    def label(self) -> str:
        """How deviation records name this cell: ``kgcoop recipe``, ``coop base2new recipe``."""
        if self.name:
            return f"{self.name} recipe"
        parts = [p for p in (self.method, self.protocol) if p != ANY]
        return " ".join(parts + ["recipe"]) if parts else "recipe"

    @property
    def options(self) -> dict:
        return dict(self.values.get("method_options") or {})

    def key(self) -> dict:
        return {"method": self.method, "protocol": self.protocol, "dataset": self.dataset, "name": self.name}

    def describe(self) -> str:
        """The values as one line, e.g. ``backbone=ViT-B-16, n_ctx=4, weight=8.0``."""
        from .records import _text

        plain = {k: v for k, v in self.values.items() if k != "method_options"}
        return _text({**plain, **self.options}) or "RunConfig's defaults"


def _fail(where: str, text: str):
    raise VlpromptError(f"{where}: {text}")


def parse_table(data: Any, where: str = TABLE_WHERE) -> tuple[Cell, ...]:
    """The cells of a table as YAML holds it (``cells: [...]``), every key and value checked: one error line
    naming the cell and the key."""
    from ..config import RunConfig, check_plain_mapping, check_values
    from ..data.registry import DATASETS

    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        _fail(where, "expected a mapping with a list 'cells'")
    extra = sorted(str(k) for k in set(data) - {"cells", "version"})
    if extra:
        _fail(where, f"unknown key {extra[0]!r} (keys: cells, version)")
    cells, names, defaults = [], {}, {}
    for i, raw in enumerate(data["cells"]):
        at = f"{where}: cells[{i}]"
        if not isinstance(raw, dict):
            _fail(at, "expected a mapping")
        unknown = sorted(str(k) for k in set(raw) - set(_CELL_FIELDS))
        if unknown:
            _fail(at, f"unknown key {unknown[0]!r} (keys: {', '.join(_CELL_FIELDS)})")
        for key in ("method", "protocol", "dataset", "source"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                _fail(at, f"{key}: expected a non-empty string, got {raw.get(key)!r}")
        at = f"{where}: cell {raw['method']}/{raw['protocol']}/{raw['dataset']}"
        if raw["protocol"] not in (*PROTOCOLS, ANY):
            _fail(at, f"protocol: '{raw['protocol']}' is not one of {[*PROTOCOLS, ANY]}")
        if raw["dataset"] != ANY and raw["dataset"] not in DATASETS:
            _fail(at, f"dataset: '{raw['dataset']}' is not a registered dataset (or 'any')")
        if not isinstance(raw.get("reconstructed"), bool):
            _fail(at, f"reconstructed: expected true or false, got {raw.get('reconstructed')!r}")
        name = raw.get("name")
        if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name) or name == NO_PRESET):
            _fail(at, f"name: {name!r} is not a usable preset name")
        alternative = raw.get("alternative", False)
        if not isinstance(alternative, bool) or (alternative and not name):
            _fail(at, "alternative: true or false, and an alternative cell needs a name")
        values = raw.get("values") or {}
        if not isinstance(values, dict):
            _fail(at, "values: expected a mapping of settings")
        for key in values:
            if key not in RunConfig.keys():
                _fail(at, f"values: unknown key {key!r} (known: {', '.join(CELL_KEYS)})")
            if key not in CELL_KEYS:
                _fail(at, f"values: {key!r} is not a recipe setting (a cell may set: {', '.join(CELL_KEYS)})")
        values = check_values(values, f"{at}: values")
        if "method_options" in values:
            check_plain_mapping(values["method_options"], f"{at}: values: method_options")
        try:  # a cell's values must make a valid configuration on their own
            RunConfig(**{k: v for k, v in values.items() if k != "method_options"})
        except VlpromptError as exc:
            _fail(at, f"values: {exc}")
        official = raw.get("official") or {}
        if not isinstance(official, dict) or any(k not in OFFICIAL or not isinstance(v, str)
                                                 for k, v in official.items()):
            _fail(at, f"official: expected a mapping of {', '.join(OFFICIAL)} to names")
        cell = Cell(raw["method"], raw["protocol"], raw["dataset"], values, " ".join(raw["source"].split()),
                    raw["reconstructed"], name, alternative, dict(official))
        if name:
            if name in names:
                _fail(at, f"name: '{name}' is also the name of cell {names[name].id}")
            names[name] = cell
        if not alternative:
            slot = (cell.method, cell.protocol, cell.dataset)
            if slot in defaults:
                _fail(at, "a second cell for this method, protocol and dataset (mark one 'alternative: true' "
                          "with a name)")
            defaults[slot] = cell
        cells.append(cell)
    return tuple(cells)


@lru_cache(maxsize=1)
def table() -> tuple[Cell, ...]:
    """The shipped table, read and checked once."""
    from ..utils.safe_yaml import load_yaml_text

    text = resources.files(__package__).joinpath(TABLE_FILE).read_text(encoding="utf-8")
    return parse_table(load_yaml_text(text, TABLE_WHERE))


def infer_protocol(protocol: Optional[str], subsample: Optional[str] = "all") -> str:
    """A run's protocol: its ``protocol`` setting, else base2new for a base or new subsample, else fewshot."""
    if protocol:
        return protocol
    return "base2new" if subsample in ("base", "new") else "fewshot"


def dataset_key(dataset: Optional[str]) -> str:
    """The name a dataset matches cells by: its registry name; a folder matches only ``any`` cells."""
    from ..data.registry import DATASETS

    return dataset if dataset in DATASETS else ANY


def names() -> list[str]:
    return [c.name for c in table() if c.name]


def check_preset(name: Optional[str]) -> None:
    """``preset``: None (the matching cell), ``none`` (no cell), or a cell's name or id."""
    if name is not None and name != NO_PRESET:
        named(name)


def named(name: str) -> Cell:
    for cell in table():
        if name in (cell.name, cell.id):
            return cell
    raise VlpromptError(f"preset: unknown preset '{name}' (known: {', '.join(names())}, {NO_PRESET}; or a cell "
                        "METHOD/PROTOCOL/DATASET, see `vlprompt methods`)")


def default_cell(method: str, protocol: str, dataset: str = ANY) -> Optional[Cell]:
    """The most specific non-alternative cell for (method, protocol, dataset): method, then protocol, then
    dataset decide; None when no cell matches."""
    best, rank = None, None
    for cell in table():
        if cell.alternative or cell.method not in (method, ANY) or cell.protocol not in (protocol, ANY) \
                or cell.dataset not in (dataset, ANY):
            continue
        here = (cell.method != ANY, cell.protocol != ANY, cell.dataset != ANY)
        if rank is None or here > rank:
            best, rank = cell, here
    return best


def select(method: str, protocol: str, dataset: str, preset: Optional[str]) -> Optional[Cell]:
    """The cell a run's values come from: the named one, none for ``preset: none``, else the best match."""
    if preset == NO_PRESET:
        return None
    if preset:
        return named(preset)
    return default_cell(method, protocol, dataset_key(dataset))


def cells_of(method: str) -> list[tuple[str, Cell]]:
    """(protocol, cell) for every protocol, the cell a run of ``method`` gets on a dataset without a cell of
    its own; then the method's dataset-specific and alternative cells (protocol as the cell says)."""
    out = [(p, c) for p in PROTOCOLS if (c := default_cell(method, p)) is not None]
    out += [(c.protocol, c) for c in table() if c.method == method and (c.dataset != ANY or c.alternative)]
    return out


def _merge(layers) -> dict:
    values: dict = {}
    for layer in layers:
        layer = dict(layer or {})
        if "method_options" in layer:  # merged key by key: a later layer's option wins over an earlier one's
            layer["method_options"] = {**(values.get("method_options") or {}), **(layer["method_options"] or {})}
        values.update(layer)
    return values


def resolve(*layers: dict) -> dict:
    """RunConfig values from ``layers`` (lowest first) over the recipe cell they select: RunConfig defaults <
    the cell < layers[0] < layers[1] < ...; ``method_options`` merge key by key. The cell comes from the
    merged method, protocol, dataset and preset (`select`); a named cell chosen by default is recorded as the
    ``preset``. The cell's method options are checked against the method here (one line naming the cell)."""
    from ..config import RunConfig

    values = _merge(layers)
    defaults = {f: RunConfig.__dataclass_fields__[f].default for f in ("method", "dataset", "subsample")}
    method = str(values.get("method") or defaults["method"])
    preset = values.get("preset")
    check_preset(preset)
    cell = select(method, infer_protocol(values.get("protocol"), values.get("subsample") or defaults["subsample"]),
                  str(values.get("dataset") or defaults["dataset"]), preset)
    if cell is None:
        return values
    check_options(cell, method)
    merged = _merge([cell.values, values])
    if preset is None and cell.name:
        merged["preset"] = cell.name
    return merged


def check_options(cell: Cell, method: str) -> None:
    """The cell's method options are options of ``method`` with valid values (a method that is not registered
    is checked when it runs)."""
    if not cell.options:
        return
    from ..methods import METHODS
    from ..methods.base import parse_options

    m = METHODS.get(method)
    if m is None:
        return
    try:
        parse_options(m.name, m.Options, cell.options)
    except VlpromptError as exc:
        raise VlpromptError(f"recipe cell {cell.id}: {exc}") from None


@dataclass(frozen=True)
class Reference:
    """What a run is compared against: its recipe cell over RunConfig's defaults."""

    cell: Optional[Cell]
    protocol: str
    inferred: bool  # the protocol was inferred (no ``protocol`` setting)
    values: dict  # RunConfig key -> reference value, for every key compared (not epochs, not method options)

    @property
    def epochs(self) -> Optional[int]:
        """The cell's epochs; None: by shot count (CoOp's rule)."""
        return self.cell.values.get("epochs") if self.cell else None

    @property
    def options(self) -> dict:
        return self.cell.options if self.cell else {}

    @property
    def label(self) -> str:
        return self.cell.label if self.cell else "RunConfig defaults"

    @property
    def source(self) -> str:
        return self.cell.source if self.cell else "RunConfig's defaults (CoOp's few-shot recipe)"

    def official(self, fact: str) -> str:
        return (self.cell.official if self.cell else {}).get(fact, OFFICIAL[fact])

    def record(self) -> dict:
        """The cell as metrics.json records it (under ``recipe``)."""
        cell = self.cell
        return {"cell": cell.key() if cell else None, "cell_id": cell.id if cell else None,
                "protocol": self.protocol, "protocol_inferred": self.inferred, "source": self.source,
                "reconstructed": bool(cell and cell.reconstructed), "values": dict(cell.values) if cell else {}}


def reference(cfg, dataset: Optional[str] = None) -> Reference:
    """The reference of run configuration ``cfg``: the named cell (``preset``), else the best match for its
    method, protocol and dataset (``dataset`` overrides ``cfg.dataset``, e.g. a folder recognised as a registered
    dataset). With ``preset: none`` the run has no cell but is still compared against the one it would get."""
    from ..config import RunConfig

    protocol = infer_protocol(cfg.protocol, cfg.subsample)
    preset = None if cfg.preset == NO_PRESET else cfg.preset
    cell = select(cfg.method, protocol, dataset or cfg.dataset, preset)
    compared = dict.fromkeys(RECIPE_KEYS)
    if cell is not None:
        compared.update(dict.fromkeys(k for k in cell.values if k not in ("epochs", "method_options")))
    defaults = RunConfig.__dataclass_fields__
    values = {k: (cell.values[k] if cell is not None and k in cell.values else defaults[k].default)
              for k in compared}
    return Reference(cell, protocol, not cfg.protocol, values)
