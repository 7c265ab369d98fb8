"""``--target tensorrt``: the step program in the ``tensorrt`` ONNX profile, linted and parsed into a
TensorRT engine (:mod:`.engine`), run by :class:`~.runtime.TrtRuntime`."""
from __future__ import annotations

import importlib.util

import torch

from effexport.exporter.backends.base import Backend, Lowered, onnx_summary
from effexport.exporter.errors import BackendMissingError


def check() -> None:
    """tensorrt is importable and torch sees a CUDA device."""
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendMissingError("TensorRT is not installed: pip install 'effexport[tensorrt]' "
                                  "(NVIDIA GPU machines only)")
    if not torch.cuda.is_available():
        raise BackendMissingError("the tensorrt target needs an NVIDIA GPU, and torch sees no CUDA device")


def stage(opts) -> str:  # noqa: ARG001 (the Backend interface)
    return "lower to ONNX (profile tensorrt) and build the TensorRT engine"


def lower(program, plan, directory: str, opts) -> Lowered:
    from effexport.exporter.backends.tensorrt.engine import lower_to_engine

    model_proto, files = lower_to_engine(program, plan, directory, opts.max_context)
    return Lowered(files, "tensorrt", model_proto, onnx_summary(model_proto), "TensorRT")


def open_runtime(artifact_dir: str):
    check()
    from effexport.exporter.backends.tensorrt.runtime import TrtRuntime

    return TrtRuntime(artifact_dir)


BACKEND = Backend("tensorrt", "TensorRT engine (needs: pip install 'effexport[tensorrt]')", "TensorRT",
                  check, stage, lower, open_runtime)
