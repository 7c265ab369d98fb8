"""``ort`` profile: stacked routed experts -> ``com.microsoft.MoE`` (issue #20).

The samples' :class:`~effexport.samples._blocks.StackedExperts` run every expert on every token and
combine the selected outputs; torch.onnx lowers it to::

    gu   = Einsum("nd,ehd->neh", x, gate_up)          gate_up [E, 2H, D] an initializer
    h    = act(gu[..., :H]) * gu[..., H:]              SiLU (DeepSeek: gate clamped above, up clamped)
    out  = Einsum("neh,edh->ned", h, down)             down [E, D, H] an initializer
    comb = ScatterElements(0, idx, w, add, axis=1)     [N, E]: the routing weights at the chosen experts
    y    = Einsum("ned,ne->nd", out, comb)

ONNX Runtime's ``MoE`` (CPU and CUDA kernels alike) routes by itself: a softmax over ``router_probs``,
the top ``k`` of it, and with ``normalize_routing_weights=1`` each chosen expert's weight is its
softmax value over the sum of the chosen ones, i.e. ``exp(r_e) / sum_{top k} exp(r_j)``. None of the
routers here is that (Laguna: sigmoid scores, selection on biased scores; ZAYA: an MLP router, a softmax
with biased selection and a skip class; DeepSeek V4: sqrt-softplus, biased selection, ``route_scale``,
hash routing in the first layers). So the router stays as the model computes it, and only the expert
block is fused: ``router_probs = log(comb / max(comb))`` (zeros clamped to ``1e-30`` first), in fp32
and then cast to the model's dtype. ``comb`` has at most ``k`` non-zero entries per row (a scatter of
``k`` updates into zeros), so MoE's top ``k`` holds all of them and its normalised weights are
``comb_e / sum(comb)`` (each clamped zero adds ``1e-30`` relative to the row's largest weight); the
output is then multiplied by ``S = sum(comb)``, which is exactly ``sum_e comb_e expert_e(x)``. A row
of zeros (ZAYA's skip expert) gives ``k`` clamped entries of weight ``1/k`` each, times ``S = 0``. Duplicate
indices (a hash table with a repeated expert) are summed by the scatter, as in the model.

Conditions, all checked (else the block is left decomposed): the three Einsums with those equations
(any letters), the slices split the last axis at ``H`` exactly, SiLU gating (``g * sigmoid(g) * u``;
with ``min(g, L)`` and ``clip(u, -L, L)`` for DeepSeek's ``swiglu_limit``: MoE's ``swiglu_limit``
clamps the same way), ``comb`` a scatter-add into zeros of weights that are provably ``>= 0``
(:func:`non_negative`: the log needs it; a look-alike with signed weights stays decomposed), one
static ``k``, one dtype (fp32 / fp16 / bf16), the intermediate values read by nothing else.

Weights: MoE wants ``fc1 [E, 2H, D]`` and ``fc2 [E, D, H]`` (``[E, N, K]``), which are the samples' own
``gate_up`` and ``down``; ONNX Runtime's CPU kernel takes the fused gate/up only interleaved
(``swiglu_fusion=1``: rows ``g0, u0, g1, u1, ...``; ``2`` throws "CPU MoE only supports interleaved
SwiGLU format", measured with onnxruntime 1.32), and CUDA takes it too, so ``gate_up`` is interleaved
once at export into a new initializer (evaluated when the artifact is written). A weight without data
at lowering time (``--weights none``, a streamed build) is interleaved in the graph instead
(``Reshape -> Transpose -> Reshape`` of the initializer alone, which ONNX Runtime's constant folding
evaluates once when the session is created).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effexport.exporter.backends.onnx._build import single_use

__all__ = ["fuse_moe", "non_negative"]

_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_FLOATS = _DTYPES | {ir.DataType.DOUBLE}
TINY = 1e-30
"""The floor of the routing weights before the log (fp32 normal; ``exp(log(1e-30))`` is still > 0)."""

# ops whose output is >= 0 (or NaN) whatever their input
_ALWAYS = frozenset({"Sigmoid", "Softmax", "Sqrt", "Abs", "Relu", "Exp", "Softplus"})
# ops whose output is >= 0 when all their (data) inputs are
_ALL_INPUTS = frozenset({"Mul", "Div", "Add", "Min", "Concat", "Identity"})
# ops that move or select elements of their first input (the rest are shapes / indices)
_FIRST_INPUT = frozenset({"Cast", "Gather", "GatherElements", "GatherND", "Reshape", "Squeeze", "Unsqueeze",
                          "Expand", "Transpose", "Slice", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceMean",
                          "TopK", "Flatten", "Tile"})


def _constant(value: ir.Value) -> np.ndarray | None:
    """The data of a constant value; None for a computed value or a weight with no data now (a
    structure-only or streamed build)."""
    const = value.const_value
    if const is None or isinstance(const, ir.ExternalTensor):
        return None
    try:
        return const.numpy()
    except OSError:
        return None


def _canonical(equation: str) -> str:
    """An einsum equation with its letters renamed in order of first appearance (``nd,ehd->neh`` ->
    ``ab,cdb->acd``), so that two equations of one structure compare equal."""
    names: dict[str, str] = {}
    return "".join(names.setdefault(c, chr(ord("a") + len(names))) if c.isalpha() else c
                   for c in equation.replace(" ", ""))


_UP = _canonical("nd,ehd->neh")
_DOWN = _canonical("neh,edh->ned")
_COMBINE = _canonical("ned,ne->nd")


def non_negative(value: ir.Value | None, depth: int = 24) -> bool:
    """Whether every element of ``value`` is provably ``>= 0`` (or NaN) from how it is computed: a
    constant with no negative entry, an op that cannot produce a negative (sigmoid, softmax, sqrt, ...),
    products / quotients / sums of such values, moves and selections of one, a ``Where`` of two."""
    if value is None or depth <= 0:
        return False
    const = _constant(value)
    if const is not None:
        try:
            return bool(np.all(const.astype(np.float64) >= 0))
        except (TypeError, ValueError):
            return False
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    op = node.op_type
    if op in _ALWAYS:
        return True
    if op == "Max":
        return any(non_negative(v, depth - 1) for v in node.inputs)
    if op in _ALL_INPUTS:
        return all(non_negative(v, depth - 1) for v in node.inputs)
    if op in _FIRST_INPUT:
        if op == "TopK" and value is not node.outputs[0]:
            return False  # the indices (non-negative, but not weights)
        return non_negative(node.inputs[0], depth - 1)
    if op == "Where":
        return non_negative(node.inputs[1], depth - 1) and non_negative(node.inputs[2], depth - 1)
    return False


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = None if value is None else value.producer()
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _einsum(value: ir.Value | None, canonical: str) -> ir.Node | None:
    node = _producer(value, "Einsum")
    if node is None:
        return None
    equation = node.attributes.get_string("equation")
    return node if equation is not None and _canonical(equation) == canonical else None


def _static(value: ir.Value, rank: int) -> list[int] | None:
    """The shape of ``value`` if it has ``rank`` dims, each a number (else None)."""
    if value.shape is None or value.shape.rank() != rank or not all(isinstance(d, int) for d in value.shape):
        return None
    return list(value.shape)


def _zeros(value: ir.Value) -> bool:
    """Whether ``value`` is all zeros: a constant, or an ``Expand`` / ``ConstantOfShape`` of zero."""
    const = _constant(value)
    if const is not None:
        try:  # astype: bf16 arrays (ml_dtypes, kind "V") compare too
            return not np.any(const.astype(np.float64))
        except (TypeError, ValueError):
            return False
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Expand":
        return _zeros(node.inputs[0])
    if node.op_type == "ConstantOfShape":
        attr = node.attributes.get("value")
        return attr is None or not np.any(attr.as_tensor().numpy())
    return False


def _slice_range(node: ir.Node, width: int) -> tuple[int, int] | None:
    """``(start, end)`` of a ``Slice`` over the last axis of a ``[N, E, width]`` tensor with step 1,
    else None."""
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends, axes, steps = (None if v is None else _constant(v) for v in inputs[1:5])
    if starts is None or ends is None or axes is None or starts.size != 1 or ends.size != 1 or axes.size != 1:
        return None
    if int(axes.reshape(-1)[0]) not in (-1, 2):
        return None
    if inputs[4] is not None and (steps is None or steps.size != 1 or int(steps.reshape(-1)[0]) != 1):
        return None
    start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    start, end = (max(0, min(width, i + width if i < 0 else i)) for i in (start, end))
    return start, end


def _limit_of(value: ir.Value, lower: bool) -> tuple[ir.Value, float | None] | None:
    """``(x, L)`` for ``value = min(x, L)`` (``lower``: ``clip(x, -L, L)``) with a constant ``L``;
    ``(value, None)`` when ``value`` is not clamped; None when it is clamped some other way."""
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in ("Clip", "Min", "Max"):
        return value, None

    def scalar(v):
        c = None if v is None else _constant(v)
        return None if c is None or c.size != 1 else float(c.reshape(()).astype(np.float64))

    if node.op_type == "Clip":
        low = scalar(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        high = scalar(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if high is None or (low is not None) != lower or (lower and low != -high):
            return None
        return node.inputs[0], high
    if node.op_type == "Min" and len(node.inputs) == 2 and not lower:
        for i in (0, 1):
            high = scalar(node.inputs[1 - i])
            if high is not None:
                return node.inputs[i], high
        return None
    if lower and len(node.inputs) == 2:  # min(max(x, -L), L) or max(min(x, L), -L)
        outer = node
        for i in (0, 1):
            bound = scalar(outer.inputs[1 - i])
            inner = outer.inputs[i].producer() if bound is not None else None
            if inner is None or inner.op_type not in ("Min", "Max") or inner.op_type == outer.op_type:
                continue
            for j in (0, 1):
                other = scalar(inner.inputs[1 - j])
                if other is not None and {bound, other} == {-abs(bound), abs(bound)} and bound != 0:
                    if (outer.op_type == "Min") == (bound > 0):
                        return inner.inputs[j], abs(bound)
        return None
    return None


def _silu_gate(value: ir.Value) -> ir.Value | None:
    """``g`` where ``value = g * sigmoid(g)`` (either order), else None."""
    node = _producer(value, "Mul")
    if node is None:
        return None
    for i in (0, 1):
        sig = _producer(node.inputs[1 - i], "Sigmoid")
        if sig is not None and sig.inputs[0] is node.inputs[i]:
            return node.inputs[i]
    return None


class _Match:
    """One stacked-expert block, as matched."""

    def __init__(self, final: ir.Node, x: ir.Value, gate_up: ir.Value, down: ir.Value, comb: ir.Value,
                 k: int, limit: float | None):
        self.final, self.x, self.gate_up, self.down, self.comb = final, x, gate_up, down, comb
        self.k, self.limit = k, limit


def _match(final: ir.Node) -> _Match | str:
    """The block whose combining Einsum is ``final``, or why it is not one."""
    out, comb_t = final.inputs[0], final.inputs[1]
    down_node = _einsum(out, _DOWN)
    if down_node is None:
        return "the combined tensor is not the experts' down projection"
    h, down = down_node.inputs
    dtype = final.outputs[0].dtype
    if dtype not in _DTYPES or any(v is None or v.dtype != dtype for v in (out, comb_t, h, down)):
        return "not one fp32 / fp16 / bf16 dtype"
    if not down.is_initializer() or _static(down, 3) is None:
        return "the down projection is not a static [E, D, H] initializer"
    e, d, hidden = _static(down, 3)
    mul = _producer(h, "Mul")
    if mul is None:
        return "not a gated activation"
    found = None
    for i in (0, 1):
        gate_act, up = mul.inputs[i], mul.inputs[1 - i]
        gate = _silu_gate(gate_act)
        if gate is None:
            continue
        gate_limit = _limit_of(gate, lower=False)
        up_limit = _limit_of(up, lower=True)
        if gate_limit is None or up_limit is None or gate_limit[1] != up_limit[1]:
            continue
        found = gate_act, gate, gate_limit, up, up_limit
        break
    if found is None:
        return "not SiLU gating (with one swiglu limit on gate and up, if any)"
    gate_act, gate, (gate_raw, limit), up, (up_raw, _) = found
    slices = [_producer(gate_raw, "Slice"), _producer(up_raw, "Slice")]
    if None in slices or slices[0].inputs[0] is not slices[1].inputs[0]:
        return "gate and up are not slices of one tensor"
    gu = slices[0].inputs[0]
    up_node = _einsum(gu, _UP)
    if up_node is None:
        return "the sliced tensor is not the experts' gate/up projection"
    x, gate_up = up_node.inputs
    if x is None or x.dtype != dtype or gate_up.dtype != dtype or not gate_up.is_initializer() \
            or _static(gate_up, 3) != [e, 2 * hidden, d] or x.shape is None or x.shape.rank() != 2:
        return "gate_up is not a static [E, 2H, D] initializer of x's dtype, or x is not [N, D]"
    if _slice_range(slices[0], 2 * hidden) != (0, hidden) or _slice_range(slices[1], 2 * hidden) != (hidden, 2 * hidden):
        return "the slices do not split the last axis at H"
    clamped_up = [up] if up is not up_raw else []
    if not single_use(out, h, gate_act, up_raw, *clamped_up) or gu.is_graph_output() or len(gu.uses()) != 2 \
            or len(gate.uses()) != 2 or (gate is not gate_raw and not single_use(gate_raw)):
        return "an intermediate value is read elsewhere"
    comb = comb_t
    cast = _producer(comb, "Cast")
    if cast is not None:
        comb = cast.inputs[0]
    scatter = _producer(comb, "ScatterElements")
    if scatter is None or (scatter.attributes.get_string("reduction") or "none") != "add" \
            or scatter.attributes.get_int("axis", 0) not in (1, -1):
        return "the combine weights are not a scatter-add over the experts"
    zeros, idx, weights = scatter.inputs
    if comb.dtype not in _FLOATS or comb.shape is None or comb.shape.rank() != 2:
        return "the combine weights are not a float [N, E] tensor"
    if comb.shape[1] != e or idx.shape is None or idx.shape.rank() != 2 or not isinstance(idx.shape[1], int) \
            or not 0 < idx.shape[1] <= e:
        return "not E experts, or not a static k <= E"
    if not _zeros(zeros):
        return "the scatter does not start from zeros"
    if not non_negative(weights):
        return "the routing weights are not provably non-negative"
    return _Match(final, x, gate_up, down, comb_t, int(idx.shape[1]), limit)


def _interleaved(graph: ir.Graph, gate_up: ir.Value, hidden: int) -> ir.Value | list[ir.Node]:
    """``gate_up [E, 2H, D]`` with its gate and up rows interleaved (``g0, u0, g1, u1, ...``): a new
    initializer when the weight has data now (evaluated when written), else the nodes computing it."""
    e, _, d = gate_up.shape
    name = f"{gate_up.name}.swiglu_interleaved"
    if name in graph.initializers:
        return graph.initializers[name]
    if gate_up.const_value is not None and not isinstance(gate_up.const_value, ir.ExternalTensor):
        source = gate_up.const_value

        def interleave() -> ir.TensorProtocol:
            array = source.numpy().reshape(e, 2, hidden, d).transpose(0, 2, 1, 3).reshape(e, 2 * hidden, d)
            return ir.tensor(np.ascontiguousarray(array), dtype=gate_up.dtype, name=name)

        value = ir.Value(name=name, type=ir.TensorType(gate_up.dtype), shape=ir.Shape([e, 2 * hidden, d]),
                         const_value=ir.LazyTensor(interleave, gate_up.dtype, ir.Shape([e, 2 * hidden, d]), name=name))
        graph.register_initializer(value)
        return value
    return None


def _const_ints(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    if name not in graph.initializers:
        graph.register_initializer(ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(values)]),
                                            const_value=ir.tensor(np.array(values, np.int64), name=name)))
    return graph.initializers[name]


def _const_scalar(graph: ir.Graph, name: str, value: float) -> ir.Value:
    if name not in graph.initializers:
        graph.register_initializer(ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]),
                                            const_value=ir.tensor(np.array(value, np.float32), name=name)))
    return graph.initializers[name]


def _rewrite(graph: ir.Graph, m: _Match) -> None:
    dtype = m.final.outputs[0].dtype
    e, d, hidden = m.down.shape
    base = m.final.outputs[0].name or "moe"
    nodes: list[ir.Node] = []

    def add(op: str, inputs, attributes=None, dtype_=None, shape=None, domain="") -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes or {}, domain=domain, name=f"{base}.{op.lower()}{len(nodes)}",
                       num_outputs=1)
        node.outputs[0].name = f"{base}.moe_{op.lower()}{len(nodes)}"
        node.outputs[0].dtype, node.outputs[0].shape = dtype_, shape
        nodes.append(node)
        return node.outputs[0]

    n_dim = m.comb.shape[0]
    rows = ir.Shape([n_dim, e])
    column = ir.Shape([n_dim, 1])
    last = _const_ints(graph, "effexport.moe.last_axis", [-1])
    comb32 = m.comb if m.comb.dtype == ir.DataType.FLOAT else add("Cast", [m.comb], {"to": ir.DataType.FLOAT},
                                                                   ir.DataType.FLOAT, rows)
    floored = add("Max", [comb32, _const_scalar(graph, "effexport.moe.tiny", TINY)], None, ir.DataType.FLOAT, rows)
    top = add("ReduceMax", [floored, last], {"keepdims": 1}, ir.DataType.FLOAT, column)
    logits = add("Log", [add("Div", [floored, top], None, ir.DataType.FLOAT, rows)], None, ir.DataType.FLOAT, rows)
    if dtype != ir.DataType.FLOAT:
        logits = add("Cast", [logits], {"to": dtype}, dtype, rows)
    total = add("ReduceSum", [m.comb, last], {"keepdims": 1}, dtype, column)
    fc1 = _interleaved(graph, m.gate_up, hidden)
    if fc1 is None:  # no data now: interleave in the graph (constant-folded by ONNX Runtime at load)
        split = add("Reshape", [m.gate_up, _const_ints(graph, f"effexport.moe.split.{e}.{hidden}.{d}", [e, 2, hidden, d])],
                    None, dtype, ir.Shape([e, 2, hidden, d]))
        moved = add("Transpose", [split], {"perm": [0, 2, 1, 3]}, dtype, ir.Shape([e, hidden, 2, d]))
        fc1 = add("Reshape", [moved, _const_ints(graph, f"effexport.moe.fc1.{e}.{hidden}.{d}", [e, 2 * hidden, d])],
                  None, dtype, ir.Shape([e, 2 * hidden, d]))
    attributes = {"k": m.k, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 1,
                  "activation_alpha": 1.0, "activation_beta": 0.0}
    if m.limit is not None:
        attributes["swiglu_limit"] = float(m.limit)
    out_shape = m.final.outputs[0].shape
    moe = add("MoE", [m.x, logits, fc1, None, m.down], attributes, dtype, out_shape, domain="com.microsoft")
    result = add("Mul", [moe, total], None, dtype, out_shape)
    graph.insert_before(m.final, nodes)
    m.final.outputs[0].replace_all_uses_with(result)


def fuse_moe(model: ir.Model) -> int:
    """Replace every matching stacked-expert block of the main graph by ``com.microsoft.MoE`` (see the
    module docstring); returns how many. The dense nodes left without readers are removed by the
    caller's dead-node pass."""
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx") \
                or _canonical(node.attributes.get_string("equation") or "") != _COMBINE:
            continue
        match = _match(node)
        if isinstance(match, str) or node.outputs[0].is_graph_output():
            continue
        _rewrite(graph, match)
        count += 1
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
    return count
