"""Image paths read from list files (split JSON, CSV, FGVC lists) must stay inside the dataset folder.

A split file or CSV may come from someone else; without this check an entry such as
``../../home/me/.ssh/id_rsa`` or ``/etc/shadow`` would be opened and decoded, and ``vlprompt datasets``
would tell whether it exists.

The check is lexical: the entry joined onto the folder it is relative to, normalised with
``os.path.normpath``, must lie under that folder. Absolute entries and ``..`` escapes are refused
without touching the file system, so a refusal says nothing about the outside file. Symbolic links
inside the folder are followed as usual: linking ``images`` to a larger disk is a common layout, and
whoever can make links in the dataset folder already decides what it holds (``os.path.realpath``
would refuse that layout).

Readers record each outside entry as an ``OutsideEntry`` instead of raising, so that ``load_dataset``
can refuse the dataset and ``check_dataset`` can list them. Users whose lists legitimately point
elsewhere set ``VLPROMPT_ALLOW_OUTSIDE_ROOT=1`` (or pass ``allow_outside_root=True``).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

from vlprompt.errors import VlpromptError

ALLOW_ENV = "VLPROMPT_ALLOW_OUTSIDE_ROOT"
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")
MAX_VALUE_CHARS = 120  # values quoted in messages are cut so that one bad entry stays one line


class OutsideEntry(NamedTuple):
    """One list entry whose path leaves the dataset folder."""

    message: str  # names the file, the entry and the value; never whether the target exists
    path: str  # the path the entry resolves to, used (and stat-ed) only when outside paths are allowed


def brief(value) -> str:
    """``repr(value)``, cut to ``MAX_VALUE_CHARS`` characters."""
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


def folder_prefix(folder: str) -> str:
    """The absolute, normalised ``folder`` with one trailing separator (what inside paths start with)."""
    return os.path.join(os.path.abspath(folder), "")


def leaves_folder(prefix: str, rel: str) -> bool:
    """Whether ``rel`` joined onto the folder ``prefix`` (from ``folder_prefix``) names no path under it."""
    if os.path.isabs(rel):
        return True
    if ".." not in rel:  # no parent step: plain concatenation stays under the folder (fast for 100k entries)
        return False
    return not os.path.normpath(prefix + rel).startswith(prefix)


def outside_message(where: str, rel: str, prefix: str) -> str:
    return f"{where}: path {brief(rel)} is outside the dataset folder {prefix.rstrip(os.sep) or os.sep}"


def check_path_text(where: str, rel) -> None:
    """A path value must be a non-empty string without NUL characters (which no file system accepts)."""
    if not isinstance(rel, str) or not rel.strip():
        raise VlpromptError(f"{where}: path must be a non-empty string, got {brief(rel)}")
    if "\x00" in rel:
        raise VlpromptError(f"{where}: path {brief(rel)} contains a NUL character")


def outside_allowed(explicit: bool = False) -> bool:
    """True when the caller passes ``explicit=True`` or the environment sets ``VLPROMPT_ALLOW_OUTSIDE_ROOT=1``."""
    if explicit:
        return True
    value = os.environ.get(ALLOW_ENV, "").strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise VlpromptError(
        f"environment variable {ALLOW_ENV}={brief(os.environ[ALLOW_ENV])}: expected 1 (read dataset "
        "entries outside the dataset folder) or 0"
    )


def refusal(name: str, outside: Sequence[OutsideEntry]) -> str:
    """The one-line error for a dataset with entries outside its folder."""
    count = f" (first of {len(outside)} such entries)" if len(outside) > 1 else ""
    return (
        f"{outside[0].message}{count}; dataset {name} may only list files inside its folder: fix the "
        f"entry, or set {ALLOW_ENV}=1 if it is meant to point elsewhere"
    )
