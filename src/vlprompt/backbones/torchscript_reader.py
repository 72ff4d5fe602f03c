"""The parameters and buffers of a TorchScript archive (OpenAI's released CLIP ``.pt`` files), read without
``torch.jit.load`` and without running anything the archive holds.

A TorchScript archive is a zip: ``<name>/data.pkl`` pickles the module tree (one object per module, its
attributes in its state), ``<name>/data/<key>`` holds the raw bytes of each tensor storage, and
``<name>/code/__torch__/...py`` is the modules' TorchScript code, where each class declares which of its
attributes are parameters and buffers (``__parameters__ = [...]``, ``__buffers__ = [...]``).

``data.pkl`` is read by a restricted unpickler: it can name only the globals in ``ALLOWED`` (tensor rebuilding,
storage types, OrderedDict, TorchScript's list and type-tag helpers, all replaced by inert functions of ours) and
TorchScript classes (``__torch__.*``), which become `ScriptObject` stand-ins that only record their state.
Any other global is refused. The code files are read as text: the two declaration lines of each class are
parsed with ``ast.literal_eval`` (a literal list of strings), nothing is executed.

The result equals ``torch.jit.load(path).state_dict()``: per module its parameters, then its buffers (in
attribute order, None skipped), then its submodules, with dotted names.
"""

from __future__ import annotations

import ast
import collections
import io
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import VlpromptError

STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
CLASS_LINE = re.compile(r"^class (\w+)\((\w*)\):\s*$")
DECLARATION_LINE = re.compile(r"^\s+(__parameters__|__buffers__) = (\[.*\])\s*$")


class ForbiddenGlobal(pickle.UnpicklingError):
    """data.pkl names a global outside the allowed list."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class ScriptObject:
    """Stands in for an object of a TorchScript class (``__torch__.*``): records the state the pickle gives it
    and does nothing else."""

    qualified_name = ""
    state = None  # the pickle creates objects without calling __init__

    def __setstate__(self, state) -> None:
        self.state = state


@dataclass(frozen=True)
class StorageType:
    """What a ``torch <X>Storage`` global stands for in data.pkl: the element type of a storage."""

    dtype: torch.dtype


@dataclass
class Storage:
    """One storage's elements, read from ``data/<key>``."""

    elements: torch.Tensor  # 1-D, of the storage's dtype


@dataclass
class ClassDeclaration:
    is_module: bool
    parameters: list = field(default_factory=list)
    buffers: list = field(default_factory=list)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """A tensor viewing ``storage`` (what ``torch._utils._rebuild_tensor_v2`` does), after checking every argument
    and that the view stays inside the storage."""
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage record")
    if not (_is_index(storage_offset) and _index_tuple(size) and _index_tuple(stride) and len(size) == len(stride)):
        raise pickle.UnpicklingError("a tensor with a malformed offset, size or stride")
    if not isinstance(requires_grad, bool):
        raise pickle.UnpicklingError("a tensor with a malformed requires_grad")
    n = storage.elements.numel()
    if all(size):  # a tensor with elements: its last element must lie inside the storage
        last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= n:
            raise pickle.UnpicklingError(f"a tensor reaching element {last} of a storage of {n}")
    elif storage_offset > n:
        raise pickle.UnpicklingError("a tensor starting beyond its storage")
    return torch.empty(0, dtype=storage.elements.dtype).set_(
        storage.elements.untyped_storage(), storage_offset, tuple(size), tuple(stride))


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _index_tuple(value) -> bool:
    return isinstance(value, tuple) and all(_is_index(v) for v in value)


def _typed_list(data):
    """TorchScript's ``build_intlist`` & co.: the list itself."""
    if not isinstance(data, list):
        raise pickle.UnpicklingError("a typed list that is not a list")
    return data


def _restore_type_tag(value, type_str):
    """TorchScript's ``restore_type_tag``: the value itself (the tag only matters to TorchScript)."""
    return value


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _typed_list,
    ("torch.jit._pickle", "build_doublelist"): _typed_list,
    ("torch.jit._pickle", "build_boollist"): _typed_list,
    ("torch.jit._pickle", "build_tensorlist"): _typed_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    **{("torch", name): StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles data.pkl of a TorchScript archive: only ``ALLOWED`` globals and ``__torch__`` classes."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, Storage] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "__torch__" or module.startswith("__torch__."):
            return self._script_class(f"{module}.{name}")
        raise ForbiddenGlobal(f"{module}.{name}")

    def _script_class(self, qualified_name: str) -> type:
        if qualified_name not in self.classes:
            self.classes[qualified_name] = type("ScriptObject", (ScriptObject,), {"qualified_name": qualified_name})
        return self.classes[qualified_name]

    def persistent_load(self, pid):
        """A storage: ``("storage", <X>Storage, key, location, numel)``; its bytes are ``data/<key>``."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and re.fullmatch(r"\w+", pid[2]) and _is_index(pid[4])):
            raise pickle.UnpicklingError(f"an unknown persistent id {str(pid)[:80]}")
        key, dtype, numel = pid[2], pid[1].dtype, pid[4]
        if key not in self.storages:
            self.storages[key] = Storage(self._read_storage(key, dtype, numel))
        return self.storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        name = f"{self.prefix}/data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise pickle.UnpicklingError(f"a storage {name} that is not in the archive") from None
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if info.file_size != nbytes:
            raise pickle.UnpicklingError(f"storage {name} holds {info.file_size} bytes, not {nbytes}")
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(bytearray(self.archive.read(name)), dtype=dtype)


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict ``torch.jit.load(path).state_dict()`` would give, read safely (see the module notes).
    A file that is not such an archive, or whose data.pkl names another global, is one error line."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive, path)
            _check_byte_order(archive, prefix, path)
            declarations = read_declarations(archive, prefix)
            root = RestrictedUnpickler(archive.read(f"{prefix}/data.pkl"), archive, prefix).load()
    except ForbiddenGlobal as exc:
        raise VlpromptError(f"TorchScript weights {path}: data.pkl names the global '{exc.name}', which vlprompt "
                            "does not load, because loading it could run code (it reads only tensors and module "
                            "attributes from such archives)") from None
    except VlpromptError:
        raise
    except Exception as exc:  # a damaged zip or pickle: many exception types, none of them run anything
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise VlpromptError(f"cannot read TorchScript weights {path}: {first}") from None
    out: dict[str, torch.Tensor] = {}
    try:
        _collect_module(root, "", declarations, out, path, ancestors=())
    except RecursionError:
        raise VlpromptError(f"cannot read TorchScript weights {path}: its modules nest too deeply") from None
    return out


def _archive_prefix(archive: zipfile.ZipFile, path: Path) -> str:
    pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pickles) != 1:
        raise VlpromptError(f"cannot read TorchScript weights {path}: expected one <name>/data.pkl in the archive, "
                            f"found {len(pickles)}")
    return pickles[0].split("/")[0]


def _check_byte_order(archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
    name = f"{prefix}/byteorder"
    if name in archive.namelist() and archive.read(name).strip() not in (b"little", b""):
        raise VlpromptError(f"cannot read TorchScript weights {path}: its tensors are big-endian")


def read_declarations(archive: zipfile.ZipFile, prefix: str) -> dict[str, ClassDeclaration]:
    """Every class of the archive's code files by qualified name (``__torch__.a.b.Name``), with the
    ``__parameters__`` and ``__buffers__`` it declares, read from the text."""
    out: dict[str, ClassDeclaration] = {}
    code = f"{prefix}/code/"
    for name in archive.namelist():
        if not (name.startswith(code + "__torch__") and name.endswith(".py")):
            continue
        module = name[len(code):-len(".py")].replace("/", ".")
        current = None
        for line in archive.read(name).decode("utf-8").splitlines():
            match = CLASS_LINE.match(line)
            if match:
                current = out.setdefault(f"{module}.{match.group(1)}", ClassDeclaration(match.group(2) == "Module"))
                continue
            match = DECLARATION_LINE.match(line)
            if match and current is not None:
                names = ast.literal_eval(match.group(2))
                if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                    raise ValueError(f"{name}: {match.group(1)} is not a list of names")
                setattr(current, match.group(1).strip("_"), names)
    return out


def _collect_module(obj, prefix: str, declarations: dict, out: dict, path: Path, ancestors: tuple) -> None:
    """``obj``'s parameters, then its buffers, then each submodule's, as ``nn.Module.state_dict`` orders them."""
    where = prefix.rstrip(".") or "the root module"
    declared = declarations.get(obj.qualified_name) if isinstance(obj, ScriptObject) else None
    if declared is None or not declared.is_module or not isinstance(obj.state, dict) \
            or not all(isinstance(k, str) for k in obj.state):
        what = obj.qualified_name if isinstance(obj, ScriptObject) else type(obj).__name__
        raise VlpromptError(f"cannot read TorchScript weights {path}: {where} ({what}) is not a module the "
                            "archive's code declares")
    if any(obj is a for a in ancestors):
        raise VlpromptError(f"cannot read TorchScript weights {path}: module {where} contains itself")
    attributes = obj.state
    for kind in (declared.parameters, declared.buffers):
        for name, value in attributes.items():
            if name in kind and value is not None:
                if not isinstance(value, torch.Tensor):
                    raise VlpromptError(f"cannot read TorchScript weights {path}: '{prefix}{name}' is declared a "
                                        f"parameter or buffer but holds a {type(value).__name__}")
                out[prefix + name] = value
    for name, value in attributes.items():
        if isinstance(value, ScriptObject) and getattr(declarations.get(value.qualified_name), "is_module", False):
            _collect_module(value, f"{prefix}{name}.", declarations, out, path, (*ancestors, obj))
