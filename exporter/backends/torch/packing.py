"""The torch engine's packed projections: the ``aten.linear`` calls that read one input with
constant weights of one dtype and width -- a layer's Q / K / V projections, its gate / up pair --
become one ``linear`` over the weights concatenated along the output features, split back by
``aten.split_with_sizes`` (views: no copy).

Why: a decode step multiplies one row per sequence, so each projection is a matrix-vector product
whose time is its weight bytes over the memory bandwidth -- when the GEMM is large enough to reach
the bandwidth. cuBLAS's kernels for one-row products of a small weight do not: on an H100 a Gemma 4
E2B K or V projection (1536 -> 256, 0.8 MB) takes ~4.5 us of kernel for ~0.3 us of bytes, ~100 such
launches a step (BENCHMARKS run 33a). One GEMM over Q, K and V reads the same bytes in one launch
wide enough for the bandwidth; Inductor folds the split into the consumers' fused kernels (the views
are read in place), so the packed form adds no kernel.

This rewrites the engine's own copy of the step graph at load time, like :mod:`.inplace` -- not the
artifact: ``program.pt2`` stays the backend-neutral step with one weight per projection (what the
checkpoint names and the ONNX lowering reads; ONNX Runtime has no view to split into, so there the
packed form costs a ``Split`` kernel per group).

Memory: the packed weights are new tensors. The engine's graph copy shares the caller's weights
(:func:`~.engine._graph_copy`), so while the caller keeps its program the packed projections' bytes
are held twice; an engine that owns its program (``TorchRuntime``, an ``ExportedProgram``) drops the
originals, whose attributes are deleted from its module.

Numerics: each output column is the same dot product, but the GEMM kernel chosen for the wider
product may reduce in another order, so results can differ by the rounding of the output dtype.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from effexport.passes._graph import attr

__all__ = ["pack_projections"]

LINEAR = torch.ops.aten.linear.default


def _weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The 2-d tensor behind a ``get_attr`` node, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = attr(gm, node.target)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) and value.dim() == 2 else None


def _groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """The ``linear(x, W)`` calls (no bias, ``W`` a ``get_attr`` read by nothing else) per input
    ``x`` and weight (dtype, device, in-features), in graph order; groups of two or more."""
    readers: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers[node.target] = readers.get(node.target, 0) + len(node.users)
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not LINEAR or node.kwargs:
            continue
        if len(node.args) != 2 and not (len(node.args) == 3 and node.args[2] is None):
            continue
        x, w = node.args[:2]
        weight = _weight(gm, w)
        if weight is None or readers.get(w.target) != 1:
            continue
        groups.setdefault((x, weight.dtype, weight.device, weight.shape[1]), []).append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def pack_projections(gm: fx.GraphModule) -> int:
    """Pack ``gm``'s projections in place (the module docstring); returns how many ``linear`` calls
    were removed (a group of ``n`` removes ``n - 1``)."""
    removed = 0
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for k, nodes in enumerate(_groups(gm)):
        weights = [_weight(gm, node.args[1]) for node in nodes]
        name = f"_packed_projection_{k}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, torch.cat(weights, dim=0).detach(), persistent=False)
        first = min(nodes, key=order.__getitem__)
        sizes = [int(w.shape[0]) for w in weights]
        with gm.graph.inserting_before(first):
            packed = gm.graph.get_attr(name)
            out = gm.graph.call_function(LINEAR, (first.args[0], packed))
            parts = gm.graph.call_function(torch.ops.aten.split_with_sizes.default, (out, sizes, -1))
            items = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
        for node, item in zip(nodes, items):
            if "val" in node.meta:
                item.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(item)
            attr = node.args[1]
            gm.graph.erase_node(node)
            gm.graph.erase_node(attr)
            _delete(gm, attr.target)
        removed += len(nodes) - 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed


def _delete(gm: fx.GraphModule, target: str) -> None:
    """Drop the attribute ``target`` (dotted) from ``gm``'s module tree."""
    *path, leaf = target.split(".")
    delattr(gm.get_submodule(".".join(path)) if path else gm, leaf)
