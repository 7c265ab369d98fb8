"""Packaging: map the top-level folders 1:1 under the ``effexport`` namespace.

``exporter/`` -> ``effexport.exporter``, ``passes/`` -> ``effexport.passes``, ... The package list is
computed by walking those folders, so a new sub-package is never left out of the wheel
(``tests/test_packaging.py`` builds the wheel and checks it). The namespace root itself
(``effexport/__init__.py``) lives in ``exporter/_root/``.
"""
import os

from setuptools import setup

TOP_LEVEL = ("exporter", "passes", "custom_ops", "samples")
ROOT_SOURCE = os.path.join("exporter", "_root")


def _packages():
    packages, package_dir = ["effexport"], {"effexport": ROOT_SOURCE}
    for top in TOP_LEVEL:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            if dirpath == ROOT_SOURCE or "__init__.py" not in filenames:
                continue
            name = "effexport." + dirpath.replace(os.sep, ".")
            packages.append(name)
            package_dir[name] = dirpath
    return packages, package_dir


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir)
