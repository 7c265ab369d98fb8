"""``effexport.runtime``: drive a built artifact (see :mod:`effexport.exporter.runtime`)."""
from effexport.exporter.runtime import MANIFEST, OrtRuntime, StepResult, load_manifest

__all__ = ["MANIFEST", "OrtRuntime", "StepResult", "load_manifest"]
