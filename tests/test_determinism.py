"""Deterministic artifacts: two builds of one model with the same flags are byte-identical (every file
hashed), and ``effexport.json`` records the versions and the exact command.

Both builds run ``effexport gemma4-e2b:tiny -o out --no-check`` from two fresh directories (the same
command, so the recorded command is identical too): the first in the test process, the second in a
fresh interpreter with another ``PYTHONHASHSEED`` (string hashing, so set and dict-of-set orders,
differs between them: an artifact that depends on it differs between two users' runs). No file is excluded from the comparison: the
artifact holds no timestamps, temporary names or timings (``report.json["resources"]`` exists only
in structure-only builds).

ONNX target only: ``--target aoti`` packages are not byte-identical (a random archive id, and the
compile commands Inductor appends to the generated C++; see :mod:`effexport.exporter.backends.aoti.package`),
and a second AOTInductor compile costs ~2 minutes, so they are not built here.
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from effexport.exporter.build import versions
from effexport.exporter.cli import main

pytestmark = pytest.mark.slow  # two whole builds (capture + ONNX export), no parity
MODEL = "gemma4-e2b:tiny"
ARGV = [MODEL, "-o", "out", "--no-check"]


def _hashes(root) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    cwd = os.getcwd()
    os.chdir(first)
    try:
        assert main(list(ARGV)) == 0
    finally:
        os.chdir(cwd)
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # differs from this process's
    env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "effexport.exporter", *ARGV], cwd=second, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [str(first / "out"), str(second / "out")]


def test_two_builds_are_byte_identical(two_builds):
    first, second = (_hashes(out) for out in two_builds)
    assert sorted(first) == ["effexport.json", "model.onnx", "report.json"]
    differing = sorted(name for name in first if first[name] != second.get(name))
    assert differing == [] and first == second


def test_manifest_records_versions_command_and_source(two_builds):
    with open(os.path.join(two_builds[0], "effexport.json")) as f:
        manifest = json.load(f)
    assert manifest["command"] == ["effexport", *ARGV]
    assert manifest["versions"] == versions()
    assert all(manifest["versions"][k] for k in ("effexport", "torch", "onnx", "onnxruntime", "onnxscript"))
    assert manifest["source"] == {"kind": "sample", "name": MODEL, "weights": "random", "seed": 0}
    assert manifest["weights"] == "random"


def test_no_timings_in_the_artifact(two_builds):
    with open(os.path.join(two_builds[0], "report.json")) as f:
        report = json.load(f)
    assert "resources" not in report and "parity" not in report  # --no-check: no parity either
