"""Rotary embeddings for the ``ort`` profile: ``x * cos + rotate_half(x) * sin`` ->
``com.microsoft.RotaryEmbedding(x, pos, cos_cache, sin_cache)``.

A Hugging Face model (and the samples) write RoPE as about seven nodes per query / key (two slices,
a negation, a concat, two products and a sum) plus the cos / sin tables computed from the positions
at every step; on a launch-bound GPU decode step each node is a kernel. ONNX Runtime's contrib
``RotaryEmbedding`` does it in one kernel from a ``[max_positions, head_dim / 2]`` table and the
first position (``position_ids`` of shape ``[1]``: position ``pos + s`` for token ``s``).

The tables are not derived from a matched formula: the cos / sin values the graph computes are
*evaluated* (ONNX Runtime CPU, the subgraph that computes them from ``pos`` and the tokens' count) for
all positions ``0 .. max_positions - 1`` at once, which gives exactly the numbers the graph would
compute (any RoPE variant, scaling or dtype the model uses), and are then checked twice:

* rotate-half layout: the second half of every row equals the first (else not fused);
* a function of the absolute position only: the values computed at two other (start, length)
  windows equal the table's rows there (else not fused).

Then, in a second pass (:func:`rotary_into_attention`), a rotation that only feeds a
GroupQueryAttention's query or key moves into the attention itself (``do_rotary = 1`` with the same
tables as ``cos_cache`` / ``sin_cache``): GQA rotates the new rows at their absolute positions
(``seqlens_k + 1 - T + s``, which the lowering makes ``pos + s``) before writing the cache, as the
separate op did, and the step loses three nodes per query / key (the reshape, the rotation, and in a
half-precision build the two casts). A rotation left outside attention in a half-precision build
(:func:`rotary_in_half`) drops its casts to fp32 and back and rotates in the build's dtype with the
tables rounded to it: onnxruntime-genai's models rotate so too, and the difference from rotating in
fp32 is about one rounding of the result (tests/test_ort_fusions.py bounds it).

Fused only with a known table length (``max_positions``: the rows of the artifact's fixed-size
caches, which the runtimes never step past), a 4-D ``[B, H, T, D]`` input with static ``H`` and
even ``D`` split in halves on the last axis.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import pattern

from effexport.exporter.backends.onnx._build import converted, single_use

POS = "pos"
INTO_ATTENTION_ENV = "EFFEXPORT_ORT_ROTARY_IN_ATTENTION"
"""``0`` keeps every rotation a separate ``RotaryEmbedding`` node (:func:`rotary_into_attention` moves
none): a comparison, or a workaround should a runtime's GroupQueryAttention rotate wrong."""
CHECK_WINDOWS = ((3, 2), (-7, 7))  # (start, length) windows the table is checked at; negative: from the end


def _int_list(value: ir.Value | None) -> list[int] | None:
    const = None if value is None else value.const_value
    if const is None:
        return None
    return [int(v) for v in np.asarray(const.numpy()).reshape(-1)]


def _ancestors(value: ir.Value) -> tuple[list[ir.Node], set[str]]:
    """The nodes computing ``value`` (topological order) and the graph inputs they read."""
    nodes, inputs, seen, stack = [], set(), set(), [value]
    while stack:
        v = stack.pop()
        node = v.producer()
        if node is None:
            if v.is_graph_input():
                inputs.add(v.name)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(i for i in node.inputs if i is not None)
    order = {id(n): i for i, n in enumerate(value.graph)}
    return sorted(nodes, key=lambda n: order[id(n)]), inputs


class _Tables:
    """Evaluates and checks cos / sin tables, once per (cos, sin) pair of values."""

    def __init__(self, graph: ir.Graph, max_positions: int):
        self.graph, self.max_positions, self.done = graph, max_positions, {}

    def get(self, cos: ir.Value, sin: ir.Value, head_dim: int):
        key = (id(cos), id(sin))
        if key not in self.done:
            self.done[key] = self._build(cos, sin, head_dim)
        return self.done[key]

    def _build(self, cos: ir.Value, sin: ir.Value, head_dim: int):
        nodes, inputs = _ancestors(cos)
        more, more_inputs = _ancestors(sin)
        names = {POS, "input_ids"}
        if not (inputs | more_inputs) <= names or POS not in inputs | more_inputs:
            return None
        if any(i is not None and i.name == "input_ids" and n.op_type != "Shape"
               for n in nodes + more for i in n.inputs):
            return None  # the tokens' values, not only their count, reach the tables
        evaluate = self._evaluator(nodes + [n for n in more if n not in nodes], (cos, sin))
        if evaluate is None:
            return None
        n = self.max_positions
        full = evaluate(0, n)
        one_row = full is not None and all(values.size == head_dim for values in full) and n > 1
        if one_row:
            # a graph of one-token steps (T static 1, the decode graph): the tables' subgraph computes
            # the row of ``pos`` only, so the table is that row at every position
            rows = [evaluate(start, 1) for start in range(n)]
            full = None if any(r is None for r in rows) else [np.stack([r[i].reshape(head_dim) for r in rows])
                                                              for i in range(len(rows[0]))]
        if full is None:
            return None
        tables = []
        for values in full:
            if values.shape[-1] != head_dim or values.size != n * head_dim:
                return None  # a table per batch row or per head: not one rotary table
            rows = values.reshape(n, head_dim)
            half = head_dim // 2
            if not np.array_equal(rows[:, :half], rows[:, half:]):
                return None
            tables.append(rows[:, :half])
        for start, length in CHECK_WINDOWS:
            start, length = start if start >= 0 else n + start, 1 if one_row else length
            part = evaluate(start, length)
            if part is None or any(not np.array_equal(p.reshape(length, head_dim)[:, :head_dim // 2],
                                                      t[start:start + length]) for p, t in zip(part, tables)):
                return None
        return [self._initializer(t, v) for t, v in zip(tables, (cos, sin))]

    def _evaluator(self, nodes: list[ir.Node], outputs: tuple[ir.Value, ir.Value]):
        """A function ``(start, length) -> [cos, sin]`` (fp32 numpy) running the nodes on ORT CPU."""
        import onnxruntime as ort

        inputs = [v for v in self.graph.inputs if v.name in (POS, "input_ids")]
        proto_nodes = [ir.serde.serialize_node(n) for n in nodes]
        wide = [onnx.helper.make_node("Cast", [v.name], [f"{v.name}.fp32"], to=onnx.TensorProto.FLOAT)
                for v in outputs]
        used = {i.name for n in nodes for i in n.inputs if i is not None}
        initializers = []
        try:
            for name, v in self.graph.initializers.items():
                if name in used and v.const_value is not None:
                    initializers.append(ir.serde.serialize_tensor(v.const_value))
                    initializers[-1].name = name
        except OSError:  # a structure-only build's weight: no data to evaluate the tables from
            return None
        graph = onnx.helper.make_graph(
            proto_nodes + wide, "rotary_tables",
            [onnx.helper.make_tensor_value_info(v.name, onnx.TensorProto.INT64, None) for v in inputs],
            [onnx.helper.make_tensor_value_info(f"{v.name}.fp32", onnx.TensorProto.FLOAT, None) for v in outputs],
            initializer=initializers)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in
                                                              self.graph.opset_imports.items()])
        model.ir_version = 10
        try:
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # an op the CPU provider lacks (a bf16 product...): not fused
            return None

        def run(start: int, length: int):
            feeds = {POS: np.array(start, dtype=np.int64),
                     "input_ids": np.random.default_rng(start).integers(0, 2 ** 15, (1, length), dtype=np.int64)}
            try:
                return session.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in inputs}})
            except Exception:
                return None
        return run

    def _initializer(self, table: np.ndarray, like: ir.Value) -> ir.Value:
        dtype = like.dtype
        name = f"rotary.{like.name}"
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(table.shape)),
                         const_value=ir.tensor(table.astype(dtype.numpy()), name=name))
        self.graph.register_initializer(value)
        return value


class _RotateHalf(pattern.RewriteRuleClassBase):
    """``x * cos + Concat(-x[..., D/2:], x[..., :D/2]) * sin`` over a ``[B, H, T, D]`` input."""

    def __init__(self, tables: _Tables):
        super().__init__("rotate_half")
        self.tables = tables

    def pattern(self, op, x, cos, sin, s1, e1, a1, st1, s2, e2, a2, st2):
        first = op.Slice(x, s1, e1, a1, st1)
        second = op.Slice(x, s2, e2, a2, st2)
        rotated = op.Concat(op.Neg(second), first, _outputs=["rotated"])
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, context, x, cos, sin, s1, e1, a1, st1, s2, e2, a2, st2, rotated, **_):
        result = _check_input(x, rotated)
        if not result:
            return result
        d = x.shape[3]
        if _int_list(a1) not in ([3], [-1]) or _int_list(a2) not in ([3], [-1]) \
                or _int_list(st1) != [1] or _int_list(st2) != [1]:
            return result.fail("not halves of the last axis")
        if _int_list(s1) != [0] or _int_list(e1) != [d // 2] or _int_list(s2) != [d // 2] \
                or (_int_list(e2) or [0])[0] < d:
            return result.fail("not the two halves of the head dim")
        return _check_tables(self.tables, x, cos, sin)

    def rewrite(self, op, x, cos, sin, **_):
        return _rotary(op, self.tables, x, cos, sin)


class _RotateHalfSplit(pattern.RewriteRuleClassBase):
    """The same with the halves taken by ``Split`` (``x.chunk(2, -1)``)."""

    def __init__(self, tables: _Tables):
        super().__init__("rotate_half_split")
        self.tables = tables

    def pattern(self, op, x, cos, sin):
        first, second = op.Split(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["first", "second"])
        rotated = op.Concat(op.Neg(second), first, _outputs=["rotated"])
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, context, x, cos, sin, first, rotated, **_):
        result = _check_input(x, rotated)
        if not result:
            return result
        split = first.producer()
        sizes = _int_list(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        halves = sizes == [x.shape[3] // 2] * 2 or (sizes is None and split.attributes.get_int("num_outputs", 0) == 2)
        if split.attributes.get_int("axis", 0) not in (-1, 3) or not halves:
            return result.fail("not the two halves of the head dim")
        return _check_tables(self.tables, x, cos, sin)

    def rewrite(self, op, x, cos, sin, **_):
        return _rotary(op, self.tables, x, cos, sin)


def _check_input(x: ir.Value, rotated: ir.Value) -> pattern.MatchResult:
    result = pattern.MatchResult()
    if x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape[1], int) \
            or not isinstance(x.shape[3], int) or x.shape[3] % 2:
        return result.fail("not a [B, H, T, D] input with static H and even D")
    if rotated.producer().attributes.get_int("axis", 0) not in (-1, 3):
        return result.fail("the halves are not joined on the last axis")
    return result


def _check_tables(tables: _Tables, x: ir.Value, cos: ir.Value, sin: ir.Value) -> pattern.MatchResult:
    result = pattern.MatchResult()
    for table in (cos, sin):
        shape = table.shape
        if table.dtype != x.dtype or shape is None or not (
                (shape.rank() == 4 and shape[1] == 1) or (shape.rank() == 3 and shape[0] == 1)):
            return result.fail("cos / sin are not [B, 1, T, D] / [1, T, D] tables in the input's dtype")
    if tables.get(cos, sin, x.shape[3]) is None:
        return result.fail("cos / sin are not a rotate-half table of the absolute position")
    return result


def _rotary(op, tables: _Tables, x: ir.Value, cos: ir.Value, sin: ir.Value) -> ir.Value:
    """``RotaryEmbedding(x, [pos], cos_cache, sin_cache)`` over the ``[B, H, T, D]`` input."""
    cos_cache, sin_cache = tables.get(cos, sin, x.shape[3])
    graph = x.graph
    start = graph.initializers.get("rotary.shape1")
    if start is None:
        start = ir.Value(name="rotary.shape1", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]),
                         const_value=ir.tensor(np.array([1], dtype=np.int64), name="rotary.shape1"))
        graph.register_initializer(start)
    pos = next(v for v in graph.inputs if v.name == POS)
    out = op.RotaryEmbedding(x, op.Reshape(pos, start), cos_cache, sin_cache, interleaved=0,
                             _domain="com.microsoft")
    out.dtype, out.shape = x.dtype, x.shape
    return out


def fuse_rotary(model: ir.Model, max_positions: int | None) -> int:
    """Rewrite rotate-half RoPE into ``RotaryEmbedding`` in place; returns how many were fused.
    ``max_positions=None`` (no fixed-size cache bounds the positions): nothing is fused."""
    if not max_positions or not any(v.name == POS for v in model.graph.inputs):
        return 0
    tables = _Tables(model.graph, max_positions)
    rules = pattern.RewriteRuleSet([_RotateHalf.rule(tables), _RotateHalfSplit.rule(tables)], commute=True)
    count = rules.apply_to_model(model)
    if count:
        RemoveUnusedNodesPass()(model)
        model.opset_imports.setdefault("com.microsoft", 1)
    return count


_F32 = ir.DataType.FLOAT


def _cast_to(node: ir.Node | None, dtype: ir.DataType) -> bool:
    return node is not None and node.op_type == "Cast" and node.domain in ("", "ai.onnx") \
        and node.attributes.get_int("to", -1) == dtype.value


def _is_start_position(value: ir.Value) -> bool:
    """``Reshape(pos, [1])``: the rotation starts at the step's first position."""
    node = value.producer()
    return node is not None and node.op_type == "Reshape" and node.inputs[0] is not None \
        and node.inputs[0].name == POS and node.inputs[0].is_graph_input()


class _Rotation(NamedTuple):
    x: ir.Value  # the rotated input (the value the rotation's fp32 cast read, if any)
    node: ir.Node  # the RotaryEmbedding
    up: ir.Node | None  # Cast x -> fp32 (half-precision builds)
    down: ir.Node | None  # Cast back to x's dtype


def _rotation(value: ir.Value) -> _Rotation | None:
    """``value = [Cast](RotaryEmbedding([Cast](x), Reshape(pos, [1]), cos, sin))`` with each link read
    only by the next, full-width (no ``rotary_embedding_dim``, unit ``scale``), casts both present
    (to fp32 and back to ``x``'s dtype) or both absent; else None."""
    node, down = value.producer(), None
    if _cast_to(node, value.dtype) and single_use(node.inputs[0]):
        down, node = node, node.inputs[0].producer()
    if node is None or node.op_type != "RotaryEmbedding" or node.domain != "com.microsoft" \
            or node.attributes.get_int("rotary_embedding_dim", 0) or node.attributes.get_float("scale", 1.0) != 1.0 \
            or not _is_start_position(node.inputs[1]):
        return None
    x, up = node.inputs[0], None
    if down is not None:
        up = x.producer()
        if not (_cast_to(up, _F32) and single_use(x) and up.inputs[0].dtype == value.dtype):
            return None
        x = up.inputs[0]
    elif x.dtype != value.dtype:
        return None
    return _Rotation(x, node, up, down)


def _table(table: ir.Value, dtype: ir.DataType) -> ir.Value:
    """``table`` (an initializer) in ``dtype``: itself, or its rounded copy (one per dtype)."""
    return table if table.dtype == dtype else converted(table, dtype)


def rotary_into_attention(model: ir.Model) -> int:
    """Move the rotations of a GroupQueryAttention's query and key into it (``do_rotary = 1``);
    returns how many attentions took theirs. Both must be :func:`_rotation` s over one pair of tables
    with the same ``interleaved``, the query over ``num_heads`` heads and the key over
    ``kv_num_heads`` (the 3-D form's ``num_heads``). Nothing moves with :data:`INTO_ATTENTION_ENV`
    set to ``0``."""
    if os.environ.get(INTO_ATTENTION_ENV, "1") == "0":
        return 0
    moved = 0
    for node in list(model.graph):
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" \
                or node.attributes.get_int("do_rotary", 0) or len(node.inputs) < 7 \
                or any(v is not None for v in node.inputs[7:10]):
            continue
        q, k = (_rotation(v) if v is not None else None for v in node.inputs[:2])
        if q is None or k is None or q.node.inputs[2:4] != k.node.inputs[2:4] \
                or q.x.dtype != k.x.dtype or node.inputs[0].dtype != q.x.dtype:
            continue
        attrs = [r.node.attributes for r in (q, k)]
        if attrs[0].get_int("interleaved", 0) != attrs[1].get_int("interleaved", 0) \
                or attrs[0].get_int("num_heads", 0) != node.attributes.get_int("num_heads", -1) \
                or attrs[1].get_int("num_heads", 0) != node.attributes.get_int("kv_num_heads", -1):
            continue
        cos, sin = (_table(t, q.x.dtype) for t in q.node.inputs[2:4])
        node.resize_inputs(max(len(node.inputs), 9))
        for i, value in ((0, q.x), (1, k.x), (7, cos), (8, sin)):
            node.replace_input_with(i, value)
        node.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 1)
        node.attributes["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", attrs[0].get_int("interleaved", 0))
        moved += 1
    if moved:
        RemoveUnusedNodesPass()(model)
    return moved


def rotary_in_half(model: ir.Model) -> int:
    """Drop the fp32 casts around each remaining half-precision rotation (:func:`_rotation` with
    casts): it rotates in the build's dtype with its tables rounded to it. Returns how many."""
    done = 0
    for node in list(model.graph):
        if node.op_type != "Cast" or node.outputs[0].dtype not in (ir.DataType.BFLOAT16, ir.DataType.FLOAT16):
            continue
        r = _rotation(node.outputs[0])
        if r is None or r.down is None:
            continue
        dtype = r.x.dtype
        r.node.replace_input_with(0, r.x)
        for i in (2, 3):
            r.node.replace_input_with(i, _table(r.node.inputs[i], dtype))
        r.node.outputs[0].dtype = dtype
        r.down.outputs[0].replace_all_uses_with(r.node.outputs[0], replace_graph_outputs=True)
        done += 1
    if done:
        RemoveUnusedNodesPass()(model)
    return done
