"""Typed errors by stage, each with the exit code the CLI returns (the codes, the base class and
:class:`RewriteError` are defined in :mod:`effexport.passes.errors`, below the passes, and re-exported here).

User mistakes raise a subclass of :class:`EffexportError`: the CLI prints its one-line message (the
problem and the fix, :func:`one_line`) and exits with ``exit_code``, without a traceback. Anything
else is a bug: the CLI exits ``EXIT_BUG`` (70) and saves the traceback to a log file
(:func:`save_traceback`). SIGTERM and SIGHUP raise :class:`Terminated` during a command
(:func:`termination_signals`), so they unwind and clean up like Ctrl-C and exit 128 + the signal.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
import traceback

from effexport.passes.errors import (EXIT_BACKEND_MISSING, EXIT_BUG, EXIT_INTERRUPTED, EXIT_OK, EXIT_OUTPUT,  # noqa: F401
                                     EXIT_PARITY, EXIT_PIPELINE, EXIT_USAGE, EffexportError, RewriteError)

MAX_MESSAGE = 600  # characters of one error line; longer ones (echoed inputs) are cut in the middle
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class UsageError(EffexportError):
    """Bad flags, unknown model, bad context length: exit 2."""

    exit_code = EXIT_USAGE
    stage = "usage"


class LoadError(EffexportError):
    """The model input could not be loaded: exit 2."""

    exit_code = EXIT_USAGE
    stage = "load"


class CaptureError(EffexportError):
    """torch.export failed: exit 3."""

    stage = "capture"


class LowerError(EffexportError):
    """A backend could not lower the rewritten graph: exit 3."""

    stage = "lower"


class ParityError(EffexportError):
    """The artifact does not match eager within tolerance: exit 1."""

    exit_code = EXIT_PARITY
    stage = "parity"


class BackendMissingError(EffexportError):
    """A backend's dependency is not installed: exit 4."""

    exit_code = EXIT_BACKEND_MISSING
    stage = "backend"


class OutputError(EffexportError):
    """The artifact could not be written (disk full, permissions): exit 5; nothing is left behind."""

    exit_code = EXIT_OUTPUT
    stage = "output"


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` as one printable line: ANSI escapes removed, whitespace runs (newlines) collapsed,
    cut in the middle to ``limit`` characters (a pasted 5,000-character value stays readable)."""
    text = " ".join(_ANSI.sub("", text).split())
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]}"


def root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost exception ``exc`` was raised from (torch.onnx wraps the
    real cause, e.g. a missing translation, in generic "failed to convert" errors), ANSI-free."""
    seen = {id(exc)}
    while True:
        inner = exc.__cause__ or exc.__context__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        exc = inner
    lines = [line for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {one_line(lines[0], 300) if lines else '(no message)'}"


class Terminated(BaseException):
    """SIGTERM / SIGHUP arrived: unwinds like KeyboardInterrupt (``finally`` blocks clean up)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


_TERMINATION = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)


def _raise_terminated(signum, frame):  # noqa: ARG001 (signal handler signature)
    for sig in _TERMINATION:  # a second signal must not interrupt the clean-up this one starts
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)



@contextlib.contextmanager
def termination_signals():
    """While the body runs, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread; a signal
    whose handler is not the default (``nohup`` ignores SIGHUP, an embedding program has its own)
    is left alone. Handlers are restored afterwards."""
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _TERMINATION:
            if signal.getsignal(sig) == signal.SIG_DFL:
                saved[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def save_traceback(exc: BaseException) -> str:
    """Write ``exc``'s traceback to a new ``effexport-bug-*.log`` in the temporary directory; its path."""
    fd, path = tempfile.mkstemp(prefix="effexport-bug-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return path
