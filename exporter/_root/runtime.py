"""``effexport.runtime``: drive a built artifact (see :mod:`effexport.exporter.backends.onnx.runtime`).

``open_runtime(DIR)`` returns the runtime the artifact's target needs (ONNX Runtime, AOTInductor or
TensorRT); each has ``initial_caches`` / ``step`` / ``generate``. ``CudaGraphRuntime(DIR)`` replays
the decode steps of an ONNX artifact built with ``--kv-cache buffer`` from CUDA graphs."""
from effexport.exporter.backends.artifact import MANIFEST, StepResult, load_manifest
from effexport.exporter.backends.onnx.graph_runtime import CudaGraphRuntime
from effexport.exporter.backends.onnx.runtime import OrtRuntime
from effexport.exporter.backends.registry import open_runtime

__all__ = ["MANIFEST", "CudaGraphRuntime", "OrtRuntime", "StepResult", "load_manifest", "open_runtime"]
