"""Parity tolerances as configuration: per-dtype defaults, overridden per output.

A tolerance is the largest max relative error an output may have against eager (relative to the
step's largest eager magnitude, :mod:`effexport.exporter.verify.parity`). Defaults by the artifact's dtype:
fp32 1e-4, bf16 / fp16 2e-2. Overrides are ``KEY=VALUE`` pairs whose KEY is

* an output, ``logits/prefill`` or ``logits/decode`` (the check's outputs, :data:`OUTPUTS`);
* an output group, ``logits`` (every ``logits/...`` output);
* a dtype, ``fp32`` / ``bf16`` / ``fp16`` (that dtype's default for every output).

The most specific key wins (output, then group, then dtype, then the built-in default). Overrides
come from, lowest precedence first: ``pyproject.toml``'s ``[tool.effexport.tolerance]`` table (the
nearest ``pyproject.toml`` with a ``[tool.effexport]`` table, from the current directory upward), the
pytest plugin's ini option ``effexport_tolerance`` (one ``KEY=VALUE`` a line), then the command line
(``effexport check --tolerance KEY=VALUE``, ``pytest --effexport-tolerance KEY=VALUE``, repeatable);
a later source replaces an earlier one's value of the same key. Every resolved value and where it
came from is recorded in the check's results (``--json``, ``--junit``, the plugin's test items).

A half-precision check keeps its own rule (:func:`~.parity.check_parity_half`): the resolved value
is its floor, raised to 1.5 x eager-in-the-dtype's own error when that is larger.

Importing this module imports no torch (the pytest plugin reads the configuration at collection).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from effexport.exporter.errors import UsageError

DEFAULTS = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}
"""The built-in tolerance of each artifact dtype (``parity.TOLERANCE`` is this table)."""
OUTPUTS = ("logits/prefill", "logits/decode")
"""The outputs a parity check compares (one JUnit testcase / plugin item each, plus the greedy tokens)."""
GROUPS = tuple(sorted({o.split("/")[0] for o in OUTPUTS}))
PYPROJECT = "pyproject.toml"


def _keys() -> str:
    return ", ".join(OUTPUTS + GROUPS + tuple(DEFAULTS))


def parse_value(key: str, value, where: str) -> float:
    """A tolerance value: a positive finite number (``2e-4``), else a one-line UsageError naming ``where``."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise UsageError(f"{where}: tolerance {key}={str(value)[:40]!r} is not a positive number; "
                         f"give e.g. {key}=2e-4")
    return number


def check_key(key: str, where: str) -> str:
    """``key`` when it names an output, an output group or a dtype, else a one-line UsageError."""
    if key not in OUTPUTS and key not in GROUPS and key not in DEFAULTS:
        raise UsageError(f"{where}: unknown tolerance key {key[:60]!r}; keys are {_keys()}")
    return key


def parse_pairs(pairs, where: str) -> dict[str, float]:
    """``["logits=2e-4", "bf16=3e-2"]`` -> ``{"logits": 2e-4, "bf16": 3e-2}`` (blank lines skipped)."""
    out = {}
    for pair in pairs or ():
        pair = pair.strip()
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"{where}: {pair[:60]!r} is not KEY=VALUE; give e.g. logits=2e-4 (keys: {_keys()})")
        key = check_key(key.strip(), where)
        out[key] = parse_value(key, value.strip(), where)
    return out


def find_pyproject(start: str | None = None) -> str | None:
    """The nearest ``pyproject.toml`` holding a ``[tool.effexport`` table, from ``start`` (default the
    current directory) up to the filesystem root; None when there is none."""
    here = os.path.abspath(start or os.getcwd())
    while True:
        path = os.path.join(here, PYPROJECT)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    if "[tool.effexport" in f.read(1 << 20):
                        return path
            except OSError:
                pass
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def read_pyproject(path: str) -> dict[str, float]:
    """The ``[tool.effexport.tolerance]`` table of ``path`` (``{}`` when it has none)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UsageError(f"{path} has a [tool.effexport] table, and reading TOML on Python 3.10 needs "
                             "tomli: pip install tomli (or pass the tolerances with --tolerance)") from None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid TOML ({str(exc)[:120]}); fix the file") from None
    table = data.get("tool", {}).get("effexport", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [tool.effexport] is not a table")
    tol = table.get("tolerance", {})
    if not isinstance(tol, dict):
        raise UsageError(f"{path}: [tool.effexport] tolerance must be a table, e.g. "
                         "[tool.effexport.tolerance] logits = 2e-4")
    where = f"{path} [tool.effexport.tolerance]"
    return {check_key(str(k), where): parse_value(str(k), v, where) for k, v in tol.items()}


@dataclass
class Tolerances:
    """Overrides by key, each with where it came from (``{key: (value, source)}``)."""

    overrides: dict = field(default_factory=dict)

    def add(self, values: dict[str, float], source: str) -> Tolerances:
        """Layer ``values`` over the overrides so far (same key: the new one wins)."""
        self.overrides.update({k: (v, source) for k, v in values.items()})
        return self

    def resolve(self, name: str, dtype: str) -> tuple[float, str]:
        """(tolerance, source) of output ``name`` in an artifact of ``dtype``."""
        for key in (name, name.split("/")[0], dtype):
            if key in self.overrides:
                value, source = self.overrides[key]
                return value, f"{source} ({key})"
        return DEFAULTS[dtype], f"default ({dtype})"

    def table(self, dtype: str, outputs=OUTPUTS) -> dict[str, float]:
        """``{output: tolerance}`` for an artifact of ``dtype``."""
        return {o: self.resolve(o, dtype)[0] for o in outputs}

    def sources(self, dtype: str, outputs=OUTPUTS) -> dict[str, str]:
        """``{output: where its tolerance came from}``."""
        return {o: self.resolve(o, dtype)[1] for o in outputs}


def load(cli=(), ini=(), start: str | None = None, cli_source: str = "--tolerance") -> Tolerances:
    """The tolerances in force: ``pyproject.toml`` (found from ``start`` upward), then the ini lines,
    then the command line's ``KEY=VALUE`` pairs."""
    tol = Tolerances()
    path = find_pyproject(start)
    if path:
        tol.add(read_pyproject(path), f"{path} [tool.effexport.tolerance]")
    tol.add(parse_pairs(ini, "ini option effexport_tolerance"), "ini effexport_tolerance")
    return tol.add(parse_pairs(cli, cli_source), cli_source)
