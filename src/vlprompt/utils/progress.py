"""Progress and status lines, through the standard `logging` module; throttled so logs stay readable
without a terminal.

Everything vlprompt reports goes to the ``"vlprompt"`` logger (and its children, e.g.
``"vlprompt.backbones.loader"``) at INFO:

- library use: the logger is at INFO and carries one default handler that writes the bare message to
  stderr, so progress shows as before with no set-up. That handler stays silent as soon as any other handler
  would receive the line (one added to a ``vlprompt`` logger, or the root logger's after
  ``logging.basicConfig``), so nothing is printed twice. Silence: ``logging.getLogger("vlprompt")
  .setLevel(logging.WARNING)`` (or ``progress=False`` for progress alone); redirect: add a handler, or remove
  `DEFAULT_HANDLER`;
- command line: `configure_cli_logging` installs a plain ``%(message)s`` stderr handler instead.
"""

from __future__ import annotations

import logging
import sys
import time

LOGGER_NAME = "vlprompt"
logger = logging.getLogger(LOGGER_NAME)


class _StderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stderr`` is when a line is emitted (a captured or
    redirected stderr included), like `logging.lastResort`."""

    def __init__(self, level: int = logging.NOTSET):
        logging.Handler.__init__(self, level)  # no stream of its own: see `stream`
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # noqa: D102
        return sys.stderr


class _DefaultHandler(_StderrHandler):
    """Library default: writes only while no other handler would receive the record."""

    def handle(self, record: logging.LogRecord) -> bool:
        if _other_handlers(record.name, self):
            return False
        return super().handle(record)


def _other_handlers(name: str, own: logging.Handler) -> bool:
    """Whether a record of logger ``name`` reaches any handler besides ``own`` (the way `Logger.callHandlers`
    walks the hierarchy)."""
    current = logging.getLogger(name)
    while current is not None:
        if any(h is not own for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def _default_handler() -> logging.Handler:
    found = [h for h in logger.handlers if isinstance(h, _DefaultHandler)]  # kept across a module reload
    if found:
        return found[0]
    handler = _DefaultHandler()
    logger.addHandler(handler)
    return handler


DEFAULT_HANDLER = _default_handler()
if logger.level == logging.NOTSET:  # a level the user set before importing vlprompt is kept
    logger.setLevel(logging.INFO)


class _CliHandler(_StderrHandler):
    pass


def configure_cli_logging(quiet: bool = False) -> logging.Handler:
    """The command line's output: every vlprompt line on stderr as its bare message (warnings and errors
    only with ``quiet``). Idempotent: a second call (several commands in one process) reuses the handler."""
    handler = next((h for h in logger.handlers if isinstance(h, _CliHandler)), None)
    if handler is None:
        handler = _CliHandler()
        logger.addHandler(handler)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


class Progress:
    """``desc: done/total (pct%) seconds ETA 12 s`` lines at INFO, at most one every ``every_s`` seconds (and
    the last one, which has no ETA). The ETA assumes the rate so far holds for the rest."""

    def __init__(self, desc: str, total: int, enabled: bool = True, every_s: float = 5.0):
        self.desc, self.total, self.enabled, self.every_s = desc, total, enabled, every_s
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            elapsed = now - self.start
            pct = 100.0 * self.done / max(self.total, 1)
            msg = f"{self.desc}: {self.done}/{self.total} ({pct:.0f}%) {elapsed:.1f}s"
            if 0 < self.done < self.total:
                msg += f" ETA {self.eta_text(elapsed * (self.total - self.done) / self.done)}"
            logger.info(msg + (f" {extra}" if extra else ""))

    @staticmethod
    def eta_text(seconds: float) -> str:
        """``12 s``, ``7 min`` or ``1.5 h``: as precise as an estimate deserves."""
        if seconds < 100:
            return f"{seconds:.0f} s"
        if seconds < 6000:
            return f"{seconds / 60:.0f} min"
        return f"{seconds / 3600:.1f} h"


def say(msg: str, enabled: bool = True) -> None:
    """One status line at INFO (nothing when ``enabled`` is false)."""
    if enabled:
        logger.info(msg)
