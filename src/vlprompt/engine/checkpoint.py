"""Training checkpoints: everything that decides what a run does next, written atomically, so that a run
killed at any step resumes to exactly the prompt and metrics of an uninterrupted one (on CPU).

A checkpoint lives beside its run folder (``.<run>.checkpoint/checkpoint.pt``: the run folder itself is only
written when the run is complete) and holds the learner's state, the optimiser's, the epoch and step, the
history so far, the trainer's generator at the start of the epoch in progress (it decides the batch order,
the augmentation seeds and the feature bank's draws), the global Python / NumPy / torch random states and
those of the objective's own generators. It also holds the run's identity (its configuration without the
keys that never change a result): a checkpoint of another configuration is refused, naming the keys.
"""

from __future__ import annotations

import io
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import VlpromptError
from ..utils.faults import fault_point
from ..utils.io import atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1


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


def differing_keys(saved: dict, current: dict) -> list[str]:
    return sorted(k for k in set(saved) | set(current) if saved.get(k, "<unset>") != current.get(k, "<unset>"))


@dataclass
class Checkpointer:
    """Where a run's checkpoint goes and when it is written: at the end of every epoch, and every
    ``every`` steps when ``every`` > 0 (long epochs). ``identity`` is the run's result-deciding config."""

    folder: Path
    identity: dict
    every: int = 0
    resume: bool = True
    _loaded: Optional[dict] = None

    @property
    def path(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    def check_writable(self) -> None:
        """Fail before any work when the checkpoint cannot be written (read-only or missing output)."""
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
        if not self.resume or not self.path.exists():
            return None
        if self._loaded is not None:
            return self._loaded
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError) as exc:
            raise VlpromptError(f"checkpoint {self.path} cannot be read ({str(exc).splitlines()[0][:120]}); "
                                "remove it or pass --resume never") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise VlpromptError(f"checkpoint {self.path} is not a vlprompt checkpoint of format {FORMAT}; "
                                "remove it or pass --resume never")
        keys = differing_keys(state["identity"], self.identity)
        if keys:
            raise VlpromptError(f"checkpoint {self.path} is of another configuration (differs in: "
                                f"{', '.join(keys)}); pass --resume never to start over, or another --output")
        self._loaded = state
        return state

    def save(self, state: dict) -> None:
        """Write atomically: a kill or a full disk leaves the previous checkpoint as it was."""
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "identity": self.identity, **state}, buffer)
        try:
            fault_point("checkpoint")
            atomic_write_bytes(self.path, buffer.getvalue())
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
