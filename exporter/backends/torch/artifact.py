"""The ``torch`` target's artifact: the rewritten step program as a ``torch.export`` archive.

``DIR/program.pt2`` is ``torch.export.save`` of the step ``ExportedProgram`` -- the same dynamic-shape
re-export of the rewritten program that the ONNX and AOTInductor lowerings start from (batch, new
tokens and full-cache lengths dynamic) -- with its weights, saved from the CPU. Nothing is compiled at
build time: the program holds aten ops and ``effexport`` custom-op calls, and a loading process
compiles it for its own device (:mod:`.runtime`). ``effexport.json`` records, under ``"torch"``, the
file and the ``effexport`` op calls the program makes (a table a test or a reader can compare with
the rewrite's).

The archive refers to the ``effexport`` ops by name: a process that loads it must have imported
:mod:`effexport.custom_ops` first (:class:`~.runtime.TorchRuntime` does).
"""
from __future__ import annotations

import copy
import os
from collections import Counter

import torch

from effexport.exporter.errors import LowerError
from effexport.passes.cache_plan import CachePlan

PROGRAM_FILE = "program.pt2"


def op_calls(ep: torch.export.ExportedProgram) -> dict[str, int]:
    """``{"effexport::attention_ring": n, ...}``: the effexport ops the program calls, counted."""
    calls = Counter(str(n.target).rsplit(".", 1)[0].replace("effexport.", "effexport::", 1)
                    for n in ep.graph.nodes
                    if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                    and n.target.namespace == "effexport")
    return dict(sorted(calls.items()))


def save_program(program, plan: CachePlan, path: str) -> dict:
    """Save the rewritten ``program``'s step ExportedProgram at ``path`` (on the CPU); returns the
    manifest's ``"torch"`` entry. Nothing is left at ``path`` when it fails (:class:`LowerError`)."""
    from effexport.exporter.capture import fast_export_config
    from effexport.exporter.backends.exported import exported_step
    from effexport.exporter.backends.torch.engine import on_device

    ep = exported_step(program, plan)
    weights = [*ep.state_dict.values(), *ep.constants.values()]
    if any(isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta") for t in weights):
        # a structure-only program (--weights none) keeps its meta placeholders: saved without data
        ep = on_device(copy.deepcopy(ep), torch.device("cpu"))
    try:
        with fast_export_config():
            torch.export.save(ep, path)
    except Exception as exc:  # torch's archive writer raises many types
        if os.path.exists(path):
            os.unlink(path)
        raise LowerError(f"could not save the step program: {type(exc).__name__}: "
                         f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from exc
    return {"program": os.path.basename(path), "ops": op_calls(ep)}
