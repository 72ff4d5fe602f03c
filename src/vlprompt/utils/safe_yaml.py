"""YAML from files a user gives (configs, study files, run records), parsed with bounded resources.

``yaml.safe_load`` builds no arbitrary objects, but anchors and aliases let a 1 kB file describe a tree of
billions of nodes ("billion laughs"): PyYAML shares the aliased objects, and the first code that walks or
copies the result (a dataclass copy, a hash of the configuration) expands it. Here the file's size is
bounded, the composed node graph is measured with aliases counted as the copies they stand for, and a
file that would expand past `MAX_NODES` (or refers to itself) is refused before anything is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import VlpromptError

MAX_BYTES = 4 * 1024 * 1024  # far above any hand-written config or study file
MAX_NODES = 200_000  # nodes after alias expansion (a full study file has a few hundred)
MAX_DEPTH = 64


def _expanded_size(root: yaml.Node, where: str) -> int:
    """The number of nodes ``root`` stands for with every alias expanded (each shared node counted once per
    reference, computed once per node), refusing cycles, deep nesting and more than `MAX_NODES`."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise VlpromptError(f"{where}: an alias refers to the node that contains it (a self-referencing "
                                f"structure) at line {node.start_mark.line + 1}")
        if depth > MAX_DEPTH:
            raise VlpromptError(f"{where}: nested more than {MAX_DEPTH} levels deep (line {node.start_mark.line + 1})")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
            _no_duplicate_keys(node, where)
        else:
            children = []
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_NODES:
                raise VlpromptError(f"{where}: its anchors and aliases expand to more than {MAX_NODES:,} values "
                                    "(refused: a file that small cannot need that many)")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(root, 0)


def _no_duplicate_keys(node: yaml.MappingNode, where: str) -> None:
    """PyYAML keeps the last of two equal keys without a word: in a config that silently drops a setting."""
    seen: set = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            if key.value in seen:
                raise VlpromptError(f"{where}: key {key.value[:60]!r} is given twice in one mapping "
                                    f"(line {key.start_mark.line + 1})")
            seen.add(key.value)


def load_yaml_text(text: str, where: str) -> Any:
    """Parse ``text`` (from ``where``, named in errors) with the bounds above; one line for any problem."""
    if len(text) > MAX_BYTES:
        raise VlpromptError(f"{where}: {len(text):,} characters, more than the {MAX_BYTES:,} a YAML file may have")
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _expanded_size(node, where)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise VlpromptError(f"{where} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise VlpromptError(f"{where}: nested too deeply to read") from None


def load_yaml_file(path: str | Path, what: str = "file") -> Any:
    """Read and parse a YAML file: not found, too large, not UTF-8 and not YAML are each one line."""
    p = Path(path)
    where = f"{what} {path}"
    if not p.is_file():
        raise VlpromptError(f"{what} not found: {path}")
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise VlpromptError(f"{where}: {size:,} bytes, more than the {MAX_BYTES:,} a YAML file may have")
        raw = p.read_bytes()
    except OSError as exc:
        raise VlpromptError(f"cannot read {where}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VlpromptError(f"{where} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None
    return load_yaml_text(text, where)
