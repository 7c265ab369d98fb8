"""Where the step's position is read: ``pos`` on the device, ``pos_host`` on the host.

A runtime that replays a captured CUDA graph (ONNX Runtime's ``enable_cuda_graph``) updates the
step's inputs in place in device memory and relaunches the recorded kernels: anything computed on
the host during the capture -- a ``Range`` bound, a ``Slice`` end -- keeps the value it had then.
So a graph meant for replay reads ``pos`` only on the device, and ONNX Runtime inserts no copy node
(a graph with one cannot be captured at all).

One host read is unavoidable: GroupQueryAttention's ``total_sequence_length`` is a CPU input, and
for a multi-token step ORT needs it exact (``pos + T``; ``T`` alone marks the first prompt). The
lowering computes it as ``Where(T == 1, capacity, pos + T)`` (:func:`.attention._buffer_lengths`):
constant for the one-token steps a CUDA graph replays, exact for the prompts that run uncaptured.
:func:`split_host_positions` gives those chains their own graph input, ``pos_host`` (the same
number, in host memory), so ``pos`` itself has device readers only. ``T`` comes from a ``Shape``,
which keeps the chain on the host under ONNX Runtime's CUDA partitioning. A graph of one-token steps
(``T`` static 1) gets the capacity as an initializer instead, and no ``pos_host`` (a chain from
``pos_host`` and constants alone would run on the GPU and reach the kernel through a Memcpy node).

:func:`host_reads` lists every other host read of ``pos``; a graph with none is ``device_positions``
in the manifest (the runtime's CUDA-graph mode requires it).
"""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

__all__ = ["POS", "POS_HOST", "HOST_INPUTS", "DEVICE_POSITIONS", "IN_PLACE", "split_host_positions", "host_reads"]

POS, POS_HOST = "pos", "pos_host"
DEVICE_POSITIONS = "effexport.device_positions"
"""Model metadata key: ``"true"`` when the step reads ``pos`` on the device only."""
IN_PLACE = "effexport.in_place"
"""Model metadata key: JSON list of the cache inputs to bind to their present's memory (GQA's windowed
caches; full ``buffer`` caches are bound so too)."""
MSFT = "com.microsoft"

HOST_INPUTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("", "Range"): (0, 1, 2), ("", "Slice"): (1, 2, 3, 4), ("", "Reshape"): (1,), ("", "Expand"): (1,),
    ("", "Tile"): (1,), ("", "ConstantOfShape"): (0,), ("", "Unsqueeze"): (1,), ("", "Squeeze"): (1,),
    ("", "TopK"): (1,), ("", "ReduceSum"): (1,), ("", "ReduceMean"): (1,), ("", "ReduceMax"): (1,),
    ("", "ReduceMin"): (1,), ("", "Pad"): (1, 2, 3), ("", "Split"): (1,), ("", "OneHot"): (1,),
    ("", "Resize"): (1, 2, 3), ("", "Trilu"): (1,), ("", "CumSum"): (1,), ("", "Upsample"): (1,),
    (MSFT, "GroupQueryAttention"): (6,),
}
"""Inputs ONNX Runtime's CUDA kernels read in host memory (shapes, axes, bounds; GQA's
``total_sequence_length``), by (domain, op type) -> input indices."""

_GQA_TOTAL = (MSFT, "GroupQueryAttention", 6)


_SHAPE_ONLY = frozenset({("", "Shape"), ("", "Size")})
"""Ops that read their input's shape, never its values."""


def _reads_pos(graph: ir.Graph, pos: ir.Value) -> set[ir.Value]:
    """Every value computed from ``pos``'s value (the graph is in topological order; a step's
    shapes never depend on a value, so ``Shape`` ends the chain)."""
    derived = {pos}
    for node in graph:
        if (node.domain, node.op_type) not in _SHAPE_ONLY and any(v in derived for v in node.inputs if v is not None):
            derived.update(node.outputs)
    return derived


def _host_slots(node: ir.Node):
    for i in HOST_INPUTS.get((node.domain, node.op_type), ()):
        if i < len(node.inputs) and node.inputs[i] is not None:
            yield i, node.inputs[i]


def host_reads(model: ir.Model) -> list[str]:
    """``"OpType input i"`` for every host-read input computed from ``pos`` (empty: ``pos`` is read
    on the device only)."""
    pos = next((v for v in model.graph.inputs if v.name == POS), None)
    if pos is None:
        return []
    derived = _reads_pos(model.graph, pos)
    return [f"{node.op_type} ({node.name}) input {i}" for node in model.graph
            for i, value in _host_slots(node) if value in derived]


def _clone_chain(graph: ir.Graph, target: ir.Value, derived: set[ir.Value], copies: dict) -> ir.Value:
    """A copy of the nodes computing ``target`` from ``pos``, reading ``pos_host`` instead; nodes
    are copied once (``copies`` maps original values to their copies) and inserted before ``user``."""
    if target in copies or target not in derived:
        return copies.get(target, target)
    node = target.producer()
    inputs = [None if v is None else _clone_chain(graph, v, derived, copies) for v in node.inputs]
    twin = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()),
                   num_outputs=len(node.outputs), version=node.version, name=f"{node.name}_host")
    for original, copy in zip(node.outputs, twin.outputs):
        copy.name, copy.type, copy.shape = f"{original.name}_host", original.type, original.shape
        copies[original] = copy
    graph.insert_before(node, twin)
    return copies[target]


def split_host_positions(model: ir.Model) -> bool:
    """Point GroupQueryAttention's ``total_sequence_length`` chains at a new ``pos_host`` input
    (after ``pos``), in place; returns whether the input was added (no GQA reads ``pos``: False)."""
    graph = model.graph
    pos = next((v for v in graph.inputs if v.name == POS), None)
    if pos is None:
        return False
    derived = _reads_pos(graph, pos)
    users = [n for n in graph if (n.domain, n.op_type) == _GQA_TOTAL[:2] and len(n.inputs) > 6
             and n.inputs[6] in derived]
    if not users:
        return False
    pos_host = ir.Value(name=POS_HOST, type=pos.type, shape=pos.shape)
    graph.inputs.insert(list(graph.inputs).index(pos) + 1, pos_host)
    copies = {pos: pos_host}
    for node in users:
        node.replace_input_with(6, _clone_chain(graph, node.inputs[6], derived, copies))
    RemoveUnusedNodesPass()(model)
    return True
