"""The registry of backends: the one place a ``--target`` name is known.

:data:`BACKENDS` maps each target to its :class:`~.base.Backend`; :func:`read_manifest` reads an
artifact's manifest and refuses a target no backend serves; :func:`open_runtime` opens the runtime
an artifact's target needs.
"""
from __future__ import annotations

import os

from effexport.exporter.backends.aoti import backend as aoti
from effexport.exporter.backends.artifact import MANIFEST, load_manifest
from effexport.exporter.backends.base import Backend
from effexport.exporter.backends.onnx import backend as onnx
from effexport.exporter.backends.tensorrt import backend as tensorrt
from effexport.exporter.backends.torch import backend as torch_backend
from effexport.exporter.errors import BackendMissingError, LoadError

BACKENDS: dict[str, Backend] = {b.name: b for b in (onnx.BACKEND, tensorrt.BACKEND, aoti.BACKEND, torch_backend.BACKEND)}


def target_status() -> dict[str, str | None]:
    """``{target: None if it can be built here, else the one-line reason}`` (``effexport list``)."""
    out = {}
    for name, backend in BACKENDS.items():
        try:
            backend.check()
            out[name] = None
        except BackendMissingError as exc:
            out[name] = exc.message
    return out


def read_manifest(artifact_dir: str) -> dict:
    """The artifact's manifest (:func:`~.artifact.load_manifest`), its target one of :data:`BACKENDS`."""
    manifest = load_manifest(artifact_dir)
    target = manifest["target"]
    if not isinstance(target, str) or target not in BACKENDS:
        raise LoadError(f"{os.path.join(artifact_dir, MANIFEST)} names an unknown target {str(target)[:40]!r} "
                        f"(targets: {', '.join(BACKENDS)}); rebuild the artifact with this effexport version")
    return manifest


def open_runtime(artifact_dir: str):
    """The runtime of a built artifact, chosen by its manifest's target."""
    return BACKENDS[read_manifest(artifact_dir)["target"]].open_runtime(artifact_dir)
