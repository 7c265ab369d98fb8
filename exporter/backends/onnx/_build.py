"""Small ONNX building blocks shared by the translations (recorded through onnxscript's tracer).

Every helper takes and returns onnxscript symbolic values inside a ``torch.onnx`` translation
call. Integer helpers produce int64 tensors; ``positions`` and masks are computed in the graph
from shapes and the ``pos`` input, never baked as constants.
"""
from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript import opset18 as op

__all__ = ["ints", "i64", "f32c", "dim", "to_float", "dtype_of", "cast_like", "back_like", "static_dim", "arange",
           "visible", "ring_positions", "on_device", "positions", "plus", "known_dim", "host_dim"]

FLOAT = ir.DataType.FLOAT


def ints(values) -> object:
    """1-d int64 constant."""
    return op.Constant(value_ints=[int(v) for v in values])


def i64(value: int) -> object:
    """0-d int64 constant."""
    return op.Constant(value_int=int(value))


def f32c(value: float) -> object:
    """0-d float32 constant (``-inf`` allowed)."""
    return op.Constant(value_float=float(value))


def dim(x, axis: int) -> object:
    """``x.shape[axis]`` as a 0-d int64 tensor."""
    return op.Squeeze(op.Shape(x, start=axis, end=axis + 1 if axis != -1 else None), ints([0]))


def host_dim(x, axis: int) -> object:
    """``x.shape[axis]`` as a 0-d int64 tensor of its own (``Gather`` of the shape), where :func:`dim`
    squeezes it: for a count that CUDA nodes read on the host.

    ONNX Runtime runs ``Squeeze`` as an alias of its input, here the CUDA ``Shape`` kernel's host
    output. In a bf16 deepseek-v4-flash:tiny prefill (onnxruntime-gpu 1.31.1) a CUDA ``Range`` read
    such a 3-token count as 2, the value of a host scalar the CPU EP had computed since; with the
    memory planner's buffer reuse off it read 3: the count's buffer went to another value before its
    last reader. ``Gather`` writes a tensor of its own (``bench/ds_bf16_variants.py`` runs both forms
    on the GPU)."""
    return op.Gather(op.Shape(x), i64(axis), axis=0)


def known_dim(x, axis: int) -> int | None:
    """``x.shape[axis]`` when it is static at export time, else None."""
    size = x.shape[axis] if x.shape is not None and len(x.shape) > axis else None
    if isinstance(size, int):
        return size
    value = getattr(size, "value", None)
    return value if isinstance(value, int) else None


def static_dim(x, axis: int, what: str) -> int:
    """A dimension that must be static at export time (head counts and head sizes)."""
    size = known_dim(x, axis)
    if size is None:
        raise ValueError(f"{what}: dim {axis} of {x.name} must be static for ONNX lowering, "
                         f"got {x.shape[axis] if x.shape is not None else None}")
    return size


def to_float(x):
    """Cast to float32 unless it already is."""
    return x if x.dtype == FLOAT else op.Cast(x, to=FLOAT)


_SAME_TYPE = {"Concat": 0, "Slice": 0, "Gather": 0, "GatherElements": 0, "ScatterND": 0, "ScatterElements": 0,
              "Reshape": 0, "Transpose": 0, "Expand": 0, "Squeeze": 0, "Unsqueeze": 0, "Identity": 0,
              "Split": 0, "Where": 1}


def dtype_of(x):
    """``x``'s element type, or None. Outputs of data-movement nodes (``Concat``, ``Gather`` ...)
    often carry no type while a translation is recorded: their data input's type is taken."""
    for _ in range(64):
        if x is None or x.dtype is not None:
            break
        node = x.producer()
        if node is None or node.op_type not in _SAME_TYPE:
            return None
        x = node.inputs[_SAME_TYPE[node.op_type]]
    return None if x is None else x.dtype


def cast_like(x, dtype):
    """Cast float32 ``x`` back to ``dtype`` (an ``ir.DataType``) unless equal."""
    return x if dtype == FLOAT else op.Cast(x, to=dtype)


def back_like(x, like):
    """Float32 ``x`` back in ``like``'s dtype: :func:`cast_like` where that dtype is known while the
    translation is recorded, else ``CastLike`` (a value without a type yet)."""
    return cast_like(x, like.dtype) if like.dtype is not None else op.CastLike(x, like)


def on_device(x):
    """A 0-d int64 computed from shapes, as a value of the compute device: ``Range(x, x + 1)`` squeezed.

    ONNX Runtime runs shape arithmetic (``Shape`` -> ``Squeeze`` -> ``Add`` ...) on the CPU; where such
    a scalar feeds device arithmetic (a mask, a gather index, GroupQueryAttention's ``seqlens_k``) it
    inserts a Memcpy node, and a graph with a Memcpy node cannot be captured into a CUDA graph.
    ``Range`` reads its bounds on the host and writes its output on the device, so it carries the
    value across without a copy node."""
    return op.Squeeze(op.Range(x, op.Add(x, i64(1)), i64(1)), ints([0]))


def arange(start, length):
    """``start + [0, length)`` as int64 (``start``, ``length`` 0-d int64 computed from shapes)."""
    return op.Range(start, op.Add(start, length), i64(1))


def positions(start, length):
    """``start + [0, length)`` as int64 for a ``start`` computed from the step's ``pos`` input.

    ``pos`` is a device value (a runtime replaying a CUDA graph updates it in place), so nothing
    derived from it may be read on the host: ``Range``'s bounds are, its output is not. The range
    is built from the shape-derived ``length`` alone and shifted on the device."""
    return op.Add(op.Range(i64(0), length, i64(1)), start)


def plus(start, x):
    """``start + x`` for a ``start`` derived from ``pos`` (device) and an ``x`` computed from shapes
    (host): ``x`` crosses by :func:`on_device`, so ONNX Runtime inserts no copy node."""
    return op.Add(start, on_device(x))


def visible(q_pos, k_pos, window: int, k_valid=None, chunked: bool = False):
    """Boolean ``[T, S]`` mask, True = visible: causal, windowed to W keys including self when
    ``window > 0`` (with ``chunked``: to the query's chunk of W positions, ``diff <= q mod W``),
    restricted to ``k_valid [S]`` when given (the ops' ``_visible``)."""
    diff = op.Sub(op.Unsqueeze(q_pos, ints([1])), op.Unsqueeze(k_pos, ints([0])))  # [T, S]
    mask = op.GreaterOrEqual(diff, i64(0))
    if window > 0 and chunked:  # positions are >= 0: Mod's sign rule does not matter
        mask = op.And(mask, op.LessOrEqual(diff, op.Unsqueeze(op.Mod(q_pos, i64(window)), ints([1]))))
    elif window > 0:
        mask = op.And(mask, op.Less(diff, i64(window)))
    if k_valid is not None:
        mask = op.And(mask, op.Unsqueeze(k_valid, ints([0])))
    return mask


def ring_positions(last, slots: int):
    """Position held by each of ``slots`` ring slots when ``last`` (0-d) is the newest position
    written: ``last - (W-1) + ((s - last - 1) mod W)`` (negative = never filled)."""
    slot = op.Range(i64(0), i64(slots), i64(1))
    wrapped = op.Mod(op.Sub(op.Sub(slot, last), i64(1)), i64(slots))  # int Mod: divisor's sign
    return op.Add(op.Sub(last, i64(slots - 1)), wrapped)


NEG_INF = -math.inf


# ------------------------------------------------------------------ for the rewrites on the IR graph
def single_use(*values: ir.Value) -> bool:
    """Whether each value is read by exactly one node and is not a graph output (a rewrite may then
    drop the node computing it)."""
    return all(len(v.uses()) == 1 and not v.is_graph_output() for v in values)


def constant(value: ir.Value):
    """The numpy value of a constant (None: not a constant, or a structure-only build's weight with
    no data behind it)."""
    const = value.const_value
    if const is None:
        return None
    try:
        return const.numpy()
    except OSError:  # a structure-only build's weight: no data behind it
        return None


def converted(value: ir.Value, dtype: ir.DataType) -> ir.Value:
    """The constant ``value`` converted to ``dtype``, one initializer per (value, dtype) however many
    nodes read it."""
    graph, name = value.graph, f"{value.name}.{dtype.name.lower()}"
    if name not in graph.initializers:
        graph.register_initializer(ir.Value(name=name, type=ir.TensorType(dtype), shape=value.shape,
                                            const_value=ir.tensor(constant(value).astype(dtype.numpy()), name=name)))
    return graph.initializers[name]
