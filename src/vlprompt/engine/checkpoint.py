"""Training checkpoints: everything that decides what a run does next, written atomically, so that a run
killed at any step resumes to exactly the prompt and metrics of an uninterrupted one (on CPU).

A checkpoint lives beside its run folder (``.<run>.checkpoint/checkpoint.safetensors``: the run folder itself is
only written when the run is complete) and holds the learner's state, the optimiser's, the epoch and step, the
history so far, the trainer's generator at the start of the epoch in progress (it decides the batch order,
the augmentation seeds and the feature bank's draws), the global Python / NumPy / torch random states and
the objective's state (`Objective.state_dict`: by default its own generators' states; PromptSRC-like objectives
add e.g. a running average of the prompts). It also holds the run's identity (its configuration without the
keys that never change a result): a checkpoint of another configuration is refused, naming the keys.

The file is one safetensors file, never a pickle, so that reading it cannot run code: every tensor of the state
is a safetensors tensor, and the rest of the state is a JSON tree in the file's metadata that refers to the
tensors by name (see `encode_tree`). Reading constructs only what that tree describes: dicts, lists, tuples,
tensors, NumPy arrays of numbers, ints, floats, strings, booleans and None.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import VlpromptError
from ..utils.faults import fault_point
from ..utils.io import atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.safetensors"
OLD_CHECKPOINT_FILE = "checkpoint.pt"  # format 1: a pickle, never loaded (loading a pickle can run code)
FORMAT = 2
FORMAT_FIELD = "vlprompt_checkpoint_format"  # safetensors metadata: the format, as a string
STATE_FIELD = "vlprompt_checkpoint_state"  # safetensors metadata: the state tree, as JSON
# Every key the trainer reads back (plus the identity): a file without one of them is not a whole checkpoint.
REQUIRED_KEYS = ("identity", "learner", "optimizer", "generator", "epoch", "step_in_epoch", "history", "partial",
                 "random", "objective")
NUMPY_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                "float32", "float64")
EXACT_JSON_INT = 2**53  # larger ints are written as decimal strings: other JSON readers round them to floats
# What the "objective" entry holds: written as "objective_layout". 1: `Objective.state_dict()`. Files without the
# key were written before objectives had a state of their own: the entry is their generators' states only.
OBJECTIVE_LAYOUT = 1


class MalformedCheckpoint(ValueError):
    """The tree in a checkpoint's metadata is not one that `encode_tree` writes."""


# -- the state tree: JSON with tagged nodes -------------------------------------------------------------------
#
# A JSON object is a tagged node when one of its keys starts with "$" (it then has that one key only):
#   {"$tensor": name}                 a tensor stored in the file under ``name``
#   {"$tuple": [items]}               a tuple (random.setstate needs tuples)
#   {"$dict": [[key, value], ...]}    a dict with a key that is not a string, or a string key starting with "$"
#   {"$float": "inf" | "-inf" | "nan"}
#   {"$int": "decimal digits"}        an int beyond 2**53 (NumPy's PCG64 state is a 128-bit int)
#   {"$ndarray": {"dtype": name, "shape": [...], "values": [flat items]}}   a NumPy array of numbers
# Every other JSON value is itself: object (string keys), array (list), string, number, true/false, null.


def encode_tree(value, tensors: dict[str, torch.Tensor], where: str = "state"):
    """``value`` as a JSON-ready tree; every tensor in it is added to ``tensors`` under a fresh name."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if abs(value) <= EXACT_JSON_INT else {"$int": str(value)}
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized:  # safetensors stores dense tensors only
            raise TypeError(f"{where}: a {value.layout} tensor cannot be stored in a checkpoint (only dense ones)")
        name = f"tensor{len(tensors)}"
        tensors[name] = value.detach().to("cpu").clone().contiguous()  # own storage: safetensors refuses shared
        return {"$tensor": name}
    if isinstance(value, np.ndarray):
        if value.dtype.name not in NUMPY_DTYPES:
            raise TypeError(f"{where}: a NumPy array of {value.dtype} cannot be stored in a checkpoint")
        return {"$ndarray": {"dtype": value.dtype.name, "shape": list(value.shape),
                             "values": [encode_tree(v, tensors, where) for v in value.ravel().tolist()]}}
    if isinstance(value, tuple):
        return {"$tuple": [encode_tree(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_tree(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode_tree(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}
        return {"$dict": [[encode_tree(k, tensors, where), encode_tree(v, tensors, f"{where}[{k!r}]")]
                          for k, v in value.items()]}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a checkpoint")


def decode_tree(node, tensor: Callable[[str], torch.Tensor]):
    """The value a tree of `encode_tree` describes; ``tensor(name)`` gives a stored tensor. Anything else is a
    `MalformedCheckpoint`."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [decode_tree(v, tensor) for v in node]
    if not isinstance(node, dict):
        raise MalformedCheckpoint(f"unexpected JSON value {type(node).__name__}")
    tags = [k for k in node if k.startswith("$")]
    if not tags:
        return {k: decode_tree(v, tensor) for k, v in node.items()}
    if len(node) != 1:
        raise MalformedCheckpoint(f"a tagged node with other keys: {sorted(node)[:4]}")
    tag, body = tags[0], node[tags[0]]
    if tag == "$tensor" and isinstance(body, str):
        return tensor(body)
    if tag == "$tuple" and isinstance(body, list):
        return tuple(decode_tree(v, tensor) for v in body)
    if tag == "$dict" and isinstance(body, list):
        return _decode_pairs(body, tensor)
    if tag == "$float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if tag == "$int" and isinstance(body, str) and body.lstrip("-").isdigit() and len(body) <= 64:
        return int(body)
    if tag == "$ndarray" and isinstance(body, dict):
        return _decode_ndarray(body, tensor)
    raise MalformedCheckpoint(f"unknown or malformed node {tag!r}")


def _decode_pairs(pairs: list, tensor) -> dict:
    out = {}
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise MalformedCheckpoint("a $dict entry that is not a [key, value] pair")
        key = decode_tree(pair[0], tensor)
        if not isinstance(key, (str, int, float, bool, tuple)) or key is None:
            raise MalformedCheckpoint(f"a $dict key of type {type(key).__name__}")
        out[key] = decode_tree(pair[1], tensor)
    return out


def _decode_ndarray(body: dict, tensor) -> np.ndarray:
    dtype, shape, values = body.get("dtype"), body.get("shape"), body.get("values")
    if dtype not in NUMPY_DTYPES or not isinstance(shape, list) or not isinstance(values, list):
        raise MalformedCheckpoint("a malformed $ndarray")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape) \
            or math.prod(shape) != len(values):
        raise MalformedCheckpoint(f"an $ndarray of shape {shape} with {len(values)} values")
    items = [decode_tree(v, tensor) for v in values]
    if not all(isinstance(v, (bool, int, float)) for v in items):
        raise MalformedCheckpoint("an $ndarray with values that are not numbers")
    try:
        return np.array(items, dtype=np.dtype(dtype)).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise MalformedCheckpoint(f"an $ndarray of {dtype}: {exc}") from None


# -- the file -----------------------------------------------------------------------------------------------

def checkpoint_bytes(state: dict) -> bytes:
    """``state`` as the bytes of one safetensors file (tensors + the tree in the metadata)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    tree = encode_tree(state, tensors)
    return save(tensors, metadata={FORMAT_FIELD: str(FORMAT), STATE_FIELD: json.dumps(tree, allow_nan=False)})


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__


def _unusable(path: Path, why: str) -> VlpromptError:
    return VlpromptError(f"checkpoint {path} is not a vlprompt checkpoint of format {FORMAT} ({why}); "
                         "remove it or pass --resume never")


def read_checkpoint(path: str | Path) -> dict:
    """The state saved in the checkpoint file ``path`` (with ``format``). Read as safetensors and JSON only: a
    file that is anything else (a pickle, garbage, a cut-off write, another program's safetensors) is one error
    line, and nothing in it is ever run."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise VlpromptError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            stored = {name: f.get_tensor(name).clone() for name in f.keys()}  # clone: not views of the mapping
    except Exception as exc:  # safetensors' own errors: not a safetensors file, cut short, unreadable
        raise _unusable(path, f"not a readable safetensors file: {_first_line(exc)}") from None
    if FORMAT_FIELD not in meta or STATE_FIELD not in meta:
        raise _unusable(path, "a safetensors file without vlprompt's checkpoint metadata")
    if meta[FORMAT_FIELD] != str(FORMAT):
        raise _unusable(path, f"written in format {meta[FORMAT_FIELD][:20]!r}")

    def tensor(name: str) -> torch.Tensor:
        if name not in stored:
            raise MalformedCheckpoint(f"it refers to a tensor {name[:40]!r} that is not in the file")
        return stored[name]

    try:
        state = decode_tree(json.loads(meta[STATE_FIELD], parse_constant=_no_constant), tensor)
    except (ValueError, RecursionError) as exc:  # MalformedCheckpoint and JSON errors are ValueErrors
        raise _unusable(path, f"damaged: {str(exc)[:120]}") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise _unusable(path, f"damaged: missing {', '.join(missing)}")
    return {"format": FORMAT, **state}


def check_progress(state: dict, path: Path, epochs: int, per_epoch: int) -> None:
    """The plain fields of a read checkpoint, checked before the trainer uses them: the file is safe to read but
    may still be crafted or damaged, and a wrong type there would otherwise surface as a stack trace mid-run."""
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)

    part = state["partial"]
    problems = [
        (not (whole(state["epoch"]) and 0 <= state["epoch"] <= epochs), f"epoch {str(state['epoch'])[:20]}"),
        (not (whole(state["step_in_epoch"]) and 0 <= state["step_in_epoch"] <= per_epoch),
         f"step_in_epoch {str(state['step_in_epoch'])[:20]}"),
        (not (isinstance(state["history"], list) and all(isinstance(h, dict) for h in state["history"])),
         "history is not a list of epochs"),
        (part is not None and not (isinstance(part, dict) and isinstance(part.get("sums"), dict)
                                   and whole(part.get("correct")) and whole(part.get("seen"))),
         "partial epoch is malformed"),
        (not isinstance(state["learner"], dict) or not isinstance(state["optimizer"], dict)
         or not isinstance(state["random"], dict) or not isinstance(state["objective"], dict),
         "learner, optimizer, random or objective is not a mapping"),
        (not isinstance(state["generator"], torch.Tensor), "generator is not a tensor"),
        ("objective_layout" in state and not (whole(state["objective_layout"])
                                               and state["objective_layout"] == OBJECTIVE_LAYOUT),
         f"objective_layout {str(state.get('objective_layout'))[:20]}"),
    ]
    for bad, what in problems:
        if bad:
            raise _unusable(path, f"damaged: {what}")


def restore_failed(path: Path, exc: BaseException) -> VlpromptError:
    """One line for a checkpoint whose (well-typed) state torch or Python refuses to restore."""
    return _unusable(path, f"damaged: cannot restore its state: {_first_line(exc)}")


def _no_constant(name: str):
    raise MalformedCheckpoint(f"a bare JSON {name}")


def checkpoint_folder(run_folder: Path) -> Path:
    return run_folder.parent / f".{run_folder.name}.checkpoint"


def global_random_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_random_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generators_state(owner) -> dict:
    """The states of every torch / NumPy generator held as an attribute of ``owner`` (an objective): a
    method that draws random numbers from its own generators needs no checkpoint code of its own."""
    out = {}
    for name, value in vars(owner).items():
        if isinstance(value, torch.Generator):
            out[name] = ("torch", value.get_state())
        elif isinstance(value, np.random.Generator):
            out[name] = ("numpy", value.bit_generator.state)
    return out


def set_generators_state(owner, states: dict) -> None:
    for name, (kind, state) in states.items():
        target = getattr(owner, name)
        if kind == "torch":
            target.set_state(state)
        else:
            target.bit_generator.state = state


def objective_state(saved: dict) -> dict:
    """The `Objective.state_dict` saved in a read checkpoint, also from a file of the older layout, whose entry
    holds only the generators' states (what the default state keeps under ``"generators"``)."""
    if "objective_layout" in saved:
        return saved["objective"]
    return {"generators": saved["objective"]}


def differing_keys(saved: dict, current: dict) -> list[str]:
    return sorted(k for k in set(saved) | set(current) if saved.get(k, "<unset>") != current.get(k, "<unset>"))


@dataclass
class Checkpointer:
    """Where a run's checkpoint goes and when it is written: at the end of every epoch, and every
    ``every`` steps when ``every`` > 0 (long epochs). ``identity`` is the run's result-deciding config;
    ``legacy_identity`` the form an earlier version saved (a checkpoint written before an upgrade resumes)."""

    folder: Path
    identity: dict
    every: int = 0
    resume: bool = True
    legacy_identity: Optional[dict] = None
    lease: Optional[object] = None  # `lease.Lease`: checked before every write (a process that lost it stops)
    _loaded: Optional[dict] = None

    @property
    def path(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    def check_writable(self) -> None:
        """Fail before any work when the checkpoint cannot be written (read-only or missing output)."""
        if self.folder.is_symlink():  # planted: checkpoints would be written wherever it points
            raise VlpromptError(f"checkpoint folder {self.folder} is a symbolic link (not written through; remove it)")
        made = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
            if made:
                self.folder.rmdir()  # made again by the first save: a run that fails early leaves nothing
        except OSError as exc:
            raise VlpromptError(f"cannot write checkpoints to {self.folder}: {exc.strerror or exc}") from None

    def load(self) -> Optional[dict]:
        """The saved state to resume from, or None (no checkpoint, or ``resume`` off). A checkpoint that
        cannot be read is one error line; one of another configuration names the differing keys."""
        if not self.resume:
            return None
        old = self.folder / OLD_CHECKPOINT_FILE
        if old.exists():
            raise VlpromptError(f"checkpoint {old} is in the old pickle format, which vlprompt no longer loads "
                                "because loading it could run code; pass --resume never to start the run over")
        if not self.path.exists():
            return None
        if self._loaded is not None:
            return self._loaded
        state = read_checkpoint(self.path)
        if not isinstance(state["identity"], dict):
            raise _unusable(self.path, "damaged: its identity is not a mapping")
        current = self.identity
        if "identity_version" not in state["identity"] and self.legacy_identity is not None:
            current = self.legacy_identity  # written by an earlier version: compared in its own form
        keys = differing_keys(state["identity"], current)
        if keys:
            raise VlpromptError(f"checkpoint {self.path} is of another configuration (differs in: "
                                f"{', '.join(keys)}); pass --resume never to start over, or another --output")
        self._loaded = state
        return state

    def save(self, state: dict) -> None:
        """Write atomically: a kill or a full disk leaves the previous checkpoint as it was."""
        if self.lease is not None:
            self.lease.check("the checkpoint")
        data = checkpoint_bytes({"identity": self.identity, **state})
        try:
            fault_point("checkpoint")
            atomic_write_bytes(self.path, data)
        except OSError as exc:
            raise VlpromptError(f"cannot write the checkpoint {self.path}: {exc.strerror or exc} (the previous "
                                "checkpoint, if any, is intact)") from None

    def discard(self) -> None:
        self._loaded = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def keep_in(self, run_folder: Path) -> None:
        """Move the last checkpoint into the finished run folder (``--keep-checkpoints``)."""
        if self.path.exists():
            target = run_folder / "checkpoint"
            target.mkdir(exist_ok=True)
            shutil.move(str(self.path), target / CHECKPOINT_FILE)
        self.discard()
