"""Backends: the rewritten step program lowered into an artifact directory, and the runtimes that
drive one.

* :mod:`.onnx`: ONNX lowering (profiles ``ort``, ``standard``, ``tensorrt``), the ONNX Runtime
  runtime (``effexport.runtime``) and structure-only lowering of meta-device weights.
* :mod:`.tensorrt`: torch-tensorrt converters and plugins, the engine build, the engine runtime.
* :mod:`.aoti`: the AOTInductor package and its runtime.
"""
