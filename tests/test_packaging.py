"""The wheel maps every top-level folder 1:1 under ``effexport`` and ships every sub-package."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = ("exporter", "passes", "custom_ops", "samples")


class Wheel(set):
    """The wheel's file names, plus its entry_points.txt text."""

    def __init__(self, names, entry_points):
        super().__init__(names)
        self.entry_points = entry_points


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), ROOT], check=True, cwd=str(out))
    (wheel,) = [f for f in os.listdir(out) if f.endswith(".whl")]
    with zipfile.ZipFile(out / wheel) as zf:
        names = set(zf.namelist())
        (entry,) = [n for n in names if n.endswith("entry_points.txt")]
        return Wheel(names, zf.read(entry).decode())


def _source_modules():
    for top in TOP_LEVEL:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            rel = os.path.relpath(dirpath, ROOT)
            if rel == os.path.join("exporter", "_root"):
                continue
            if "__init__.py" in filenames:
                for f in filenames:
                    if f.endswith(".py"):
                        yield "effexport/" + os.path.join(rel, f).replace(os.sep, "/")


def test_every_module_is_in_the_wheel(wheel_names):
    expected = set(_source_modules())
    assert expected, "no sources found"
    missing = sorted(expected - wheel_names)
    assert not missing, f"modules missing from the wheel: {missing}"


def test_namespace_root_and_no_bare_packages(wheel_names):
    assert "effexport/__init__.py" in wheel_names
    bare = sorted(n for n in wheel_names if n.split("/")[0] in TOP_LEVEL + ("tests",))
    assert not bare, f"bare top-level packages in the wheel: {bare[:5]}"
    assert not any(n.startswith("effexport/tests/") for n in wheel_names)
    assert not any("/_root/" in n for n in wheel_names), "exporter/_root must ship as effexport/__init__.py only"


def test_console_script_declared(wheel_names):
    lines = [l.replace(" ", "") for l in wheel_names.entry_points.splitlines()]
    assert "effexport=effexport.exporter.cli:entry_point" in lines
