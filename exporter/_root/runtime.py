"""``effexport.runtime``: drive a built artifact (see :mod:`effexport.exporter.backends.onnx.runtime`).

``open_runtime(DIR)`` returns the runtime the artifact's target needs (ONNX Runtime, AOTInductor or
TensorRT); each has ``initial_caches`` / ``step`` / ``generate``."""
from effexport.exporter.build import open_runtime
from effexport.exporter.backends.onnx.runtime import MANIFEST, OrtRuntime, StepResult, load_manifest

__all__ = ["MANIFEST", "OrtRuntime", "StepResult", "load_manifest", "open_runtime"]
