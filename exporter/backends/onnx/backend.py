"""``--target onnx``: the step program lowered to ``model.onnx`` in the chosen profile, run by ONNX
Runtime (:class:`~.runtime.OrtRuntime`)."""
from __future__ import annotations

import os

from effexport.exporter.backends.base import Backend, Lowered, onnx_summary
from effexport.exporter.errors import BackendMissingError

STEP_FILE = "model.onnx"


def check() -> None:
    """onnx and onnxruntime are importable."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise BackendMissingError(f"the onnx target needs {exc.name}: pip install onnx onnxruntime onnxscript") from None


def stage(opts) -> str:
    return f"lower to ONNX (profile {opts.profile})"


def lower(program, plan, directory: str, opts) -> Lowered:
    from effexport.exporter.backends.onnx.export import export_step

    model_proto = export_step(program, plan, os.path.join(directory, STEP_FILE), profile=opts.profile)
    return Lowered({"step": STEP_FILE}, opts.profile, model_proto, onnx_summary(model_proto), "ONNX Runtime CPU")


def open_runtime(artifact_dir: str):
    from effexport.exporter.backends.onnx.runtime import OrtRuntime

    return OrtRuntime(artifact_dir)


BACKEND = Backend("onnx", "ONNX model for ONNX Runtime (profiles: ort, standard)", "ONNX Runtime",
                  check, stage, lower, open_runtime)
