"""``effexport.runtime``: drive a built artifact (see :mod:`effexport.exporter.runtime`).

``open_runtime(DIR)`` returns the runtime the artifact's target needs (ONNX Runtime, AOTInductor or
TensorRT); each has ``initial_caches`` / ``step`` / ``generate``. ``CudaGraphRuntime(DIR)`` replays
the decode steps of an ONNX artifact built with ``--kv-cache buffer`` from CUDA graphs."""
from effexport.exporter.build import open_runtime
from effexport.exporter.graph_runtime import CudaGraphRuntime
from effexport.exporter.runtime import MANIFEST, OrtRuntime, StepResult, load_manifest

__all__ = ["MANIFEST", "CudaGraphRuntime", "OrtRuntime", "StepResult", "load_manifest", "open_runtime"]
