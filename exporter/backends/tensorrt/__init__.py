"""TensorRT backend: torch-tensorrt converters / plugins for every effexport op, engine build from the
``tensorrt`` ONNX profile, and a runtime that drives an engine like :mod:`effexport.runtime` drives
ONNX Runtime.

* :mod:`.specs`: which route each op takes (TensorRT layers or a plugin) and the plugin interfaces,
  as data (checked by the coverage test without TensorRT).
* :mod:`.converters`: ``dynamo_tensorrt_converter`` registrations (layers for attention, generated
  plugin converters for the rest).
* :mod:`.plugins`: the plugins, registered with ``tensorrt.plugin`` from the ops' kernels, the fake
  kernels as shape functions.
* :mod:`.engine`: optimization profiles (min/opt/max batch and context) and the engine build with
  the TensorRT ONNX parser.
* :mod:`.runtime`: :class:`~.runtime.TrtRuntime` (prefill, decode, caches by the CachePlan).

Importing this package (or :mod:`.specs`, :mod:`.engine`'s pure functions) never imports tensorrt or
torch_tensorrt: they load inside the functions that need them.

Verified here (no TensorRT on any machine of this project): the route table and plugin interfaces,
the optimization profiles, the ``tensorrt`` ONNX profile (lint + ONNX Runtime parity). Unverified:
everything that calls TensorRT (converters, plugins, engine build, runtime).
"""
