"""Deterministic artifacts: two builds of one model with the same flags are byte-identical (every file
hashed), and ``effexport.json`` records the versions and the exact command.

Both builds run ``effexport gemma4-e2b:tiny -o out --no-check`` from two fresh directories (the same
command, so the recorded command is identical too); no file is excluded from the comparison: the
artifact holds no timestamps, temporary names or timings (``report.json["resources"]`` exists only
in structure-only builds).

ONNX target only: ``--target aoti`` packages are not byte-identical (a random archive id, and the
compile commands Inductor appends to the generated C++; see :mod:`effexport.exporter.aoti.package`),
and a second AOTInductor compile costs ~2 minutes, so they are not built here.
"""
import hashlib
import json
import os

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
    outs = []
    cwd = os.getcwd()
    for run in ("first", "second"):
        os.chdir(tmp_path_factory.mktemp(run))
        try:
            assert main(list(ARGV)) == 0
            outs.append(os.path.abspath("out"))
        finally:
            os.chdir(cwd)
    return outs


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
