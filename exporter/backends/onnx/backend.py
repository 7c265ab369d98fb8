"""``--target onnx``: the step program lowered to ``model.onnx`` in the chosen profile (and, for
``ort`` with ``--kv-cache buffer``, its one-token decode graph ``decode.onnx``), run by ONNX Runtime
(:class:`~.runtime.OrtRuntime`)."""
from __future__ import annotations

import os

from effexport.exporter.backends.base import Backend, Lowered, onnx_summary
from effexport.exporter.errors import BackendMissingError

STEP_FILE = "model.onnx"
DECODE_FILE = "decode.onnx"
"""The one-token decode graph beside the step (``ort`` profile, ``--kv-cache buffer``)."""


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
    """``model.onnx``; with the ``ort`` profile and ``--kv-cache buffer`` also ``decode.onnx``, the
    step's one-token decode graph over the same caches and weights (:func:`.export.export_steps`),
    which the runtimes run one-token steps through."""
    from effexport.exporter.backends.onnx.export import export_steps

    from effexport.exporter.backends.onnx.weights import active_source

    # a streamed build (weights read from the checkpoint while written) and --data-file-size: external data
    external = True if active_source() is not None or getattr(opts, "data_file_bytes", None) else None
    decode = os.path.join(directory, DECODE_FILE) if wants_decode_graph(opts) and mha_candidates(plan) else None
    model_proto, decode_proto = export_steps(
        program, plan, os.path.join(directory, STEP_FILE), profile=opts.profile, external_data=external,
        data_file_bytes=getattr(opts, "data_file_bytes", None), decode_path=decode)
    files = {"step": STEP_FILE, **({"decode": DECODE_FILE} if decode_proto is not None else {})}
    summary = onnx_summary(model_proto)
    if decode_proto is not None:
        summary += (f"; {DECODE_FILE}: one-token decode graph, {len(decode_proto.graph.node)} nodes "
                    f"(step: {len(model_proto.graph.node)})")
    return Lowered(files, opts.profile, model_proto, summary, "ONNX Runtime CPU")


def mha_candidates(plan) -> bool:
    """Whether the one-token graph of ``plan``'s step can differ from the general one (so is worth a
    second lowering): a KV-sharing consumer layer, or a ``buffer`` cache whose head size
    GroupQueryAttention does not take (the decomposition there). A model with neither lowers the
    same nodes at T = 1 and gets no decode graph."""
    from effexport.exporter.backends.onnx.attention import GQA_HEAD_DIM_MULTIPLE, GQA_MAX_HEAD_DIM

    heads = [e.shape[-1] for e in plan.entries if e.kind == "buffer" and isinstance(e.shape[-1], int)]
    return any(layer.role == "consumer" for layer in plan.layers) or any(
        d > GQA_MAX_HEAD_DIM or d % GQA_HEAD_DIM_MULTIPLE for d in heads)


def wants_decode_graph(opts) -> bool:
    """A decode graph is written for the ``ort`` profile with fixed caches (``--kv-cache buffer``):
    the layout the CUDA-graph runtime replays, where one-token steps dominate."""
    return getattr(opts, "profile", None) == "ort" and getattr(opts, "kv_cache", None) == "buffer"


def open_runtime(artifact_dir: str):
    from effexport.exporter.backends.onnx.runtime import OrtRuntime

    return OrtRuntime(artifact_dir)


BACKEND = Backend("onnx", "ONNX model for ONNX Runtime (profiles: ort, standard)", "ONNX Runtime",
                  check, stage, lower, open_runtime)
