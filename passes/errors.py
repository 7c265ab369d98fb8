"""The exit codes (a contract: README's exit-code section), the base of every user-facing error and
the error a pass raises. They live here, below the passes, so that no pass imports the exporter;
``effexport.exporter.errors`` adds the other stages' errors and the CLI's signal and traceback
handling.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_PARITY = 1
EXIT_USAGE = 2
EXIT_PIPELINE = 3
EXIT_BACKEND_MISSING = 4
EXIT_OUTPUT = 5
EXIT_BUG = 70  # EX_SOFTWARE: an uncaught exception, never 1 (that means parity failed)
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


class RewriteError(EffexportError):
    """A pass could not rewrite the graph: exit 3."""

    stage = "rewrite"
