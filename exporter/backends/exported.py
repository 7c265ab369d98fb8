"""The backend-neutral re-export of the rewritten step program: ``torch.export`` of the step
GraphModule with dynamic batch, new-token count and full-cache lengths (:func:`exported_step`).

The ONNX lowering translates this program (:mod:`.onnx.export`) and AOTInductor compiles it
(:mod:`.aoti.package`); it is cached per GraphModule and example batch, so that lowering one program
in several profiles or backends traces it once.
"""
from __future__ import annotations

import weakref

import torch

from effexport.exporter.capture import fast_export_config
from effexport.exporter.errors import LowerError, root_cause
from effexport.exporter.progress import phase
from effexport.passes._graph import example_past, meta_val
from effexport.passes.cache_plan import CachePlan
from effexport.passes.program import StepProgram

__all__ = ["exported_step", "example_inputs", "EXAMPLE_NEW_TOKENS", "EXAMPLE_PAST"]

EXAMPLE_NEW_TOKENS, EXAMPLE_PAST = 3, 5  # example sizes: distinct, > 1, so nothing specialises


def example_inputs(plan: CachePlan, batch: int, vocab: int = 2, past: int = EXAMPLE_PAST,
                   device: torch.device | str = "cpu", new: int = EXAMPLE_NEW_TOKENS) -> tuple[torch.Tensor, ...]:
    """Example step inputs: ``new`` tokens (default ``EXAMPLE_NEW_TOKENS``) after ``past`` cached ones,
    on ``device`` (``meta`` for a structure-only program, whose graph builds its index tensors there)."""
    ids = torch.randint(0, vocab, (batch, new)).to(device)
    caches = [torch.zeros(e.concrete_shape(batch, past), dtype=getattr(torch, e.dtype), device=device)
              for e in plan.entries]
    return (ids, torch.tensor(past, dtype=torch.int64), *caches)


def _dynamic_shapes(plan: CachePlan, one_token: bool = False) -> tuple:
    batch = torch.export.Dim("batch")
    seq = None if one_token else torch.export.Dim.AUTO  # None: the example's 1, static
    caches = []
    for e in plan.entries:
        dims = {0: batch}
        if "seq" in e.shape:
            dims[e.shape.index("seq")] = torch.export.Dim.AUTO
        caches.append(dims)
    return ({0: batch} if seq is None else {0: batch, 1: seq}, None, *caches)


def _device(gm: torch.fx.GraphModule) -> torch.device:
    """Where the step graph runs: its inputs' recorded device (``meta`` for a structure-only capture),
    unless they are meta and every weight is real (a sharded streamed build's rank, its weights read
    after a capture on meta), else its weights' device, else the CPU."""
    first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    val = meta_val(first) if first is not None else None
    weights = [*gm.parameters(), *gm.buffers()]
    if isinstance(val, torch.Tensor) and not (val.device.type == "meta" and weights
                                              and not any(t.is_meta for t in weights)):
        return val.device
    tensor = next(iter(weights), None)
    return tensor.device if tensor is not None else torch.device("cpu")


_EXPORTED: "weakref.WeakKeyDictionary[torch.fx.GraphModule, dict]" = weakref.WeakKeyDictionary()


def exported_step(program: StepProgram, plan: CachePlan, example_batch: int = 2, one_token: bool = False):
    """``torch.export`` of the step graph (dynamic batch, seq and full-cache lengths), cached per
    GraphModule, batch and ``one_token`` so that exporting one program in several profiles traces it
    once. ``one_token``: the new-token count is static 1 (the ONNX decode graph, :mod:`.onnx.export`)."""
    cache = _EXPORTED.setdefault(program.gm, {})
    key = (example_batch, one_token)
    if key not in cache:
        # at the capture's example past length: the passes kept that example's branches (graph.example_past)
        args = example_inputs(plan, example_batch, past=example_past(program.gm, EXAMPLE_PAST),
                              device=_device(program.gm), new=1 if one_token else EXAMPLE_NEW_TOKENS)
        phase(f"lower: torch.export of the rewritten step graph{' (one token)' if one_token else ''}")
        try:
            with fast_export_config():
                cache[key] = torch.export.export(
                    program.gm, args, dynamic_shapes=_dynamic_shapes(plan, one_token), strict=False)
        except Exception as exc:  # torch.export raises many types
            raise LowerError(f"re-exporting the step graph failed: {root_cause(exc)}") from exc
    return cache[key]
