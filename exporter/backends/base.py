"""The interface every backend has (:class:`Backend`) and what its lowering returns (:class:`Lowered`).

A backend is one value: it says whether it can run here, lowers a rewritten step program and its
CachePlan into an artifact directory, and opens a runtime over an artifact it wrote. The registry
(:mod:`.registry`) lists them; the build and the CLI know a target only through it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Lowered:
    """What a backend wrote into the artifact directory."""

    files: dict[str, str]  # the manifest's "files": role ("step", "weights", ...) -> file name
    profile: str | None  # the ONNX profile of the step model (None: the step model is no ONNX)
    model_proto: Any  # the ONNX ModelProto of the step model (None: no ONNX)
    summary: str  # the lowering stage's closing note (opset and IR, or the package and its device)
    runs_on: str  # what the parity check runs the artifact on, for its progress line
    manifest: dict = field(default_factory=dict)  # further keys the backend records in effexport.json


@dataclass(frozen=True)
class Backend:
    """One ``--target``.

    ``check()`` raises ``BackendMissingError`` (exit 4) when the backend cannot build or run here;
    ``stage(opts)`` is the lowering stage's progress line; ``lower(program, plan, directory, opts)``
    writes the step model into ``directory`` and returns :class:`Lowered`; ``open_runtime(directory)``
    returns a runtime (``initial_caches`` / ``step`` / ``generate``) over an artifact of this target."""

    name: str
    description: str  # one line for 'effexport list' and --help
    runtime_name: str  # what loads the step model, for error messages
    check: Callable[[], None]
    stage: Callable[[Any], str]
    lower: Callable[[Any, Any, str, Any], Lowered]
    open_runtime: Callable[[str], Any]


def onnx_opset(model_proto) -> int:
    """The default-domain opset of an ONNX model."""
    return next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))


def onnx_inputs(model_proto) -> list[str] | None:
    """The step model's input names (an ``ort`` build may add ``pos_host``), None without a model."""
    return None if model_proto is None else [v.name for v in model_proto.graph.input]


def onnx_summary(model_proto) -> str:
    """The lowering note of an ONNX step model: its opset and IR version."""
    return f"opset {onnx_opset(model_proto)}, IR {model_proto.ir_version}"
