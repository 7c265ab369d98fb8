"""Typed errors by stage, each with the exit code the CLI returns (a contract, see DESIGN.md).

User mistakes raise a subclass of :class:`EffexportError`: the CLI prints its one-line message (the
problem and the fix) and exits with ``exit_code``, without a traceback. Anything else is an internal
error and keeps its traceback.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_PARITY = 1
EXIT_USAGE = 2
EXIT_PIPELINE = 3
EXIT_BACKEND_MISSING = 4
EXIT_OUTPUT = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class EffexportError(Exception):
    """Base of all user-facing errors; ``stage`` names where it happened."""

    exit_code = EXIT_PIPELINE
    stage = "effexport"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


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


class RewriteError(EffexportError):
    """A pass could not rewrite the graph: exit 3."""

    stage = "rewrite"


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
