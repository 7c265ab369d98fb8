"""``Einsum`` nodes left after the lowering and the fusions. ONNX does not type bf16 ``Einsum``
(its ``T`` has no ``bfloat16``; ONNX Runtime refuses to load such a model: "Type 'tensor(bfloat16)'
... of operator (Einsum) is invalid"), so a bf16 build keeps its products in bf16 where it can:

* ``...g d, g r d -> ...g r`` (a per-group projection: DeepSeek V4's grouped output projection
  ``btgd,grd->btgr``) becomes ``Transpose -> MatMul -> Transpose`` over ``[G, ..., D] x [G, 1, D, R]``
  (one batched GEMM per group; the weight's transpose is a constant ONNX Runtime folds at load) in
  every dtype, so a bf16 graph and its fp32 twin keep one structure;
* any other bf16 ``Einsum`` runs in fp32 between casts.

Run on every profile's graph after the lowering and the ``ort`` fusions (:func:`einsums`: the stacked
experts' einsums become ``MoE`` first).
"""
from __future__ import annotations

import onnx_ir as ir

__all__ = ["einsums"]

BF16, FLOAT = ir.DataType.BFLOAT16, ir.DataType.FLOAT


def _grouped(equation: str) -> int | None:
    """The rank of ``x`` if ``equation`` is ``<lead> g d, g r d -> <lead> g r`` (any letters), else None."""
    try:
        lhs, out = equation.replace(" ", "").split("->")
        x, w = lhs.split(",")
    except ValueError:
        return None
    if len(x) < 2 or len(w) != 3 or "." in equation:
        return None
    g, d = x[-2], x[-1]
    r = w[1]
    if w != g + r + d or out != x[:-1] + r or len(set(x + r)) != len(x) + 1:
        return None
    return len(x)


def _node(graph_nodes: list, op: str, inputs, attributes, dtype, name: str) -> ir.Value:
    node = ir.node(op, inputs, attributes=attributes, name=f"{name}.{op.lower()}{len(graph_nodes)}", num_outputs=1)
    node.outputs[0].name = f"{name}.{op.lower()}{len(graph_nodes)}"
    node.outputs[0].dtype = dtype
    graph_nodes.append(node)
    return node.outputs[0]


def _rewrite(graph: ir.Graph, node: ir.Node) -> None:
    x, w = node.inputs
    out = node.outputs[0]
    name = out.name or "einsum"
    nodes: list[ir.Node] = []
    rank = _grouped(node.attributes.get_string("equation") or "")
    if rank is not None and x.dtype == w.dtype:  # [lead..., G, D] x [G, R, D]: one batched GEMM per group
        lead, t = list(range(rank - 2)), x.dtype
        xt = _node(nodes, "Transpose", [x], {"perm": [rank - 2, *lead, rank - 1]}, t, name)  # [G, lead, D]
        wt = _node(nodes, "Transpose", [w], {"perm": [0, 2, 1]}, t, name)  # [G, D, R]
        if rank > 3:  # [G, 1 (x rank-3), D, R]: broadcast over all but the last lead dim (MatMul's rows)
            axes = ir.Value(name=f"{name}.axes", const_value=ir.tensor(list(range(1, rank - 2)), dtype=ir.DataType.INT64))
            graph.register_initializer(axes)
            wt = _node(nodes, "Unsqueeze", [wt, axes], {}, t, name)
        y = _node(nodes, "MatMul", [xt, wt], {}, t, name)  # [G, lead, R]
        result = _node(nodes, "Transpose", [y], {"perm": [*range(1, rank - 1), 0, rank - 1]}, t, name)
    elif not any(v is not None and v.dtype == BF16 for v in node.inputs):
        return
    else:  # fp32 between casts
        wide = [_node(nodes, "Cast", [v], {"to": FLOAT}, FLOAT, name) for v in node.inputs]
        y = _node(nodes, "Einsum", wide, {"equation": node.attributes.get_string("equation")}, FLOAT, name)
        result = _node(nodes, "Cast", [y], {"to": BF16}, BF16, name)
    result.shape = out.shape
    graph.insert_before(node, nodes)
    out.replace_all_uses_with(result)
    if out.is_graph_output():
        graph.outputs[graph.outputs.index(out)] = result
    graph.remove(node, safe=True)


def einsums(model: ir.Model) -> int:
    """Rewrite the main graph's grouped-projection ``Einsum`` nodes and every other bf16 one (see the
    module docstring); returns how many."""
    graph = model.graph
    found = [n for n in graph if n.op_type == "Einsum" and n.domain in ("", "ai.onnx") and len(n.inputs) == 2
             and (_grouped(n.attributes.get_string("equation") or "") is not None
                  or any(v is not None and v.dtype == BF16 for v in n.inputs))]
    for node in found:
        _rewrite(graph, node)
    return len(found)
