"""torch-tensorrt (dynamo) converters for every effexport op, registered against the ``OpOverload``.

:func:`register_converters` (lazy: imports tensorrt / torch_tensorrt) registers with
``torch_tensorrt.dynamo.conversion.dynamo_tensorrt_converter(op, supports_dynamic_shapes=True)``:

* the attention ops (route ``layers``): TensorRT network layers -- matrix multiplies for
  ``q k^T`` and ``p v`` with GQA by head grouping (a shuffle to ``[B, Hkv, G, T, d]``, no K/V
  copies), softcap as ``tanh``, a boolean mask computed from positions (fill layers for
  ``pos + arange``, elementwise compares, select to ``-inf``), sinks as an extra softmax column,
  softmax in fp32; rings keep W slots: scores are ``[T, W + T]`` and the new ring is one gather of
  ``[ring | new]`` rows (slot ``p mod W`` takes the newest position), the ONNX lowering's formula;
* every other op (route ``plugin``): one plugin layer (``ctx.net.add_plugin`` of the
  ``tensorrt.plugin`` op :mod:`.plugins` registers), absent optional inputs as a zero-size
  placeholder with ``has_<arg> = 0``.

Arguments are bound by schema name (:func:`bind`), never by position. Unverified: needs
torch-tensorrt and TensorRT (not installable on this project's machines).
"""
from __future__ import annotations

import math

import numpy as np

from effexport.exporter.backends.tensorrt.specs import PLUGIN_NAMESPACE, plugin_specs, route_table

__all__ = ["bind", "register_converters"]


def bind(op, args: tuple, kwargs: dict) -> dict:
    """``{argument name: value}`` of an FX call of ``op`` (defaults filled in)."""
    out = {}
    for i, arg in enumerate(op._schema.arguments):
        if arg.name in kwargs:
            out[arg.name] = kwargs[arg.name]
        elif not arg.kwarg_only and i < len(args):
            out[arg.name] = args[i]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            raise TypeError(f"{op}: missing argument {arg.name}")
    return out


# ---------------------------------------------------------------------------- layer helpers
class _Net:
    """Thin helpers over ``ctx.net`` (an ``INetworkDefinition``) for one converter call."""

    def __init__(self, ctx, name: str):
        import tensorrt as trt

        self.trt, self.net, self.name, self.n = trt, ctx.net, name, 0

    def _named(self, layer):
        self.n += 1
        layer.name = f"{self.name}/{self.n}"
        return layer.get_output(0)

    def const(self, value, dtype=np.float32, rank: int = 0):
        arr = np.asarray(value, dtype=dtype).reshape((1,) * rank if np.ndim(value) == 0 else np.shape(value))
        return self._named(self.net.add_constant(arr.shape, self.trt.Weights(np.ascontiguousarray(arr))))

    def ew(self, a, b, op: str):
        return self._named(self.net.add_elementwise(a, b, getattr(self.trt.ElementWiseOperation, op)))

    def cast(self, x, dtype):
        return self._named(self.net.add_cast(x, dtype))

    def reshape(self, x, dims=None, shape_tensor=None):
        layer = self.net.add_shuffle(x)
        if shape_tensor is not None:
            layer.set_input(1, shape_tensor)
        else:
            layer.reshape_dims = tuple(dims)
        return self._named(layer)

    def transpose(self, x, perm):
        layer = self.net.add_shuffle(x)
        layer.first_transpose = tuple(perm)
        return self._named(layer)

    def dim(self, x, axis: int):
        """``x.shape[axis]`` as a 1-element int64 tensor."""
        shape = self._named(self.net.add_shape(x))  # int64 in TensorRT 10
        return self._named(self.net.add_gather(shape, self.const([axis], np.int32), 0))

    def arange(self, start, length):
        """``start + [0, length)`` (int64; ``start`` 1-element, ``length`` 1-element)."""
        fill = self.net.add_fill((0,), self.trt.FillOperation.LINSPACE, self.trt.int64)
        fill.set_input(0, length)
        fill.set_input(1, self.reshape(start, ()))
        fill.set_input(2, self.const(1, np.int64))
        return self._named(fill)

    def matmul(self, a, b, transpose_b: bool = False):
        mo = self.trt.MatrixOperation
        return self._named(self.net.add_matrix_multiply(a, mo.NONE, b, mo.TRANSPOSE if transpose_b else mo.NONE))

    def select(self, cond, a, b):
        return self._named(self.net.add_select(cond, a, b))

    def concat(self, tensors, axis: int):
        layer = self.net.add_concatenation(list(tensors))
        layer.axis = axis
        return self._named(layer)

    def softmax(self, x, axis: int, rank: int):
        layer = self.net.add_softmax(x)
        layer.axes = 1 << (axis % rank)
        return self._named(layer)

    def gather(self, x, index, axis: int):
        return self._named(self.net.add_gather(x, index, axis))


def _visible(nb: _Net, q_pos, k_pos, window: int, k_valid=None, chunked: bool = False):
    """Boolean ``[T, S]``: causal, windowed to W keys including self (``chunked``: to the query's
    chunk of W positions, ``diff <= q mod W``), restricted to ``k_valid``."""
    diff = nb.ew(nb.reshape(q_pos, (-1, 1)), nb.reshape(k_pos, (1, -1)), "SUB")
    zero = nb.const(0, np.int64, 2)
    mask = nb.ew(nb.ew(diff, zero, "GREATER"), nb.ew(diff, zero, "EQUAL"), "OR")
    if window > 0 and chunked:  # q mod W = q - (q // W) * W (positions are >= 0)
        w = nb.const([window], np.int64)
        offset = nb.ew(q_pos, nb.ew(nb.ew(q_pos, w, "FLOOR_DIV"), w, "PROD"), "SUB")
        mask = nb.ew(mask, nb.ew(nb.ew(diff, nb.reshape(offset, (-1, 1)), "LESS"),
                                 nb.ew(diff, nb.reshape(offset, (-1, 1)), "EQUAL"), "OR"), "AND")
    elif window > 0:
        mask = nb.ew(mask, nb.ew(diff, nb.const(window, np.int64, 2), "LESS"), "AND")
    if k_valid is not None:
        mask = nb.ew(mask, nb.reshape(k_valid, (1, -1)), "AND")
    return mask


def _attend(nb: _Net, q, k, v, mask, sinks, scale: float, softcap: float, heads: int, kv_heads: int, d: int,
            dv: int):
    """``softmax(cap(q k^T scale) masked [, sink]) v`` in fp32 with GQA by head grouping."""
    trt, groups = nb.trt, heads // kv_heads
    q32, k32, v32 = (nb.cast(x, trt.float32) for x in (q, k, v))
    qg = nb.reshape(q32, (0, kv_heads, groups, -1, d))
    scores = nb.matmul(qg, nb.reshape(k32, (0, kv_heads, 1, -1, d)), transpose_b=True)  # [B, Hkv, G, T, S]
    scores = nb.ew(scores, nb.const(scale, rank=5), "PROD")
    if softcap > 0.0:
        capped = nb._named(nb.net.add_activation(nb.ew(scores, nb.const(softcap, rank=5), "DIV"),
                                                 trt.ActivationType.TANH))
        scores = nb.ew(capped, nb.const(softcap, rank=5), "PROD")
    if mask is not None:
        mask_shape = nb.concat([nb.const([1, 1, 1], np.int64), nb._named(nb.net.add_shape(mask))], 0)
        scores = nb.select(nb.reshape(mask, shape_tensor=mask_shape), scores, nb.const(-math.inf, rank=5))
    if sinks is not None:
        sink = nb.reshape(nb.cast(sinks, trt.float32), (1, kv_heads, groups, 1, 1))
        ones = nb.ew(nb.ew(nb._named(nb.net.add_reduce(scores, trt.ReduceOperation.MAX, 1 << 4, True)),
                           nb.const(0.0, rank=5), "PROD"), sink, "SUM")  # sink broadcast to [B, Hkv, G, T, 1]
        probs = nb.softmax(nb.concat([scores, ones], 4), 4, 5)
        length = nb.dim(scores, 4)
        layer = nb.net.add_slice(probs, (0, 0, 0, 0, 0), (1, 1, 1, 1, 1), (1, 1, 1, 1, 1))
        layer.set_input(2, nb.concat([nb._named(nb.net.add_slice(nb._named(nb.net.add_shape(probs)), (0,), (4,), (1,))),
                                      length], 0))
        probs = nb._named(layer)
    else:
        probs = nb.softmax(scores, 4, 5)
    out = nb.matmul(probs, nb.reshape(v32, (0, kv_heads, 1, -1, dv)))  # [B, Hkv, G, T, dv]
    return nb.cast(nb.reshape(out, (0, heads, -1, dv)), q.dtype)


def _dims(q, k, v):
    return q.shape[1], k.shape[1], q.shape[3], v.shape[3]


def _ring_positions(nb: _Net, last, slots: int):
    """``last - (W-1) + ((s - last - 1) mod W)`` for every slot (negative = never written)."""
    slot = nb.const(np.arange(slots), np.int64)
    wrapped = nb.ew(nb.ew(nb.ew(slot, last, "SUB"), nb.const([1], np.int64), "SUB"),
                    nb.const([slots], np.int64), "FLOOR_DIV")
    wrapped = nb.ew(nb.ew(nb.ew(slot, last, "SUB"), nb.const([1], np.int64), "SUB"),
                    nb.ew(wrapped, nb.const([slots], np.int64), "PROD"), "SUB")  # Python-style mod
    return nb.ew(nb.ew(last, nb.const([slots - 1], np.int64), "SUB"), wrapped, "SUM")


# -------------------------------------------------------------------------------- converters
def _attention(nb, a):
    q, k, v = a["q"], a["k"], a["v"]
    heads, kv_heads, d, dv = _dims(q, k, v)
    mask = None
    if a["causal"]:
        s_len, t_len = nb.dim(k, 2), nb.dim(q, 2)
        mask = _visible(nb, nb.arange(nb.ew(s_len, t_len, "SUB"), t_len), nb.arange(nb.const([0], np.int64), s_len),
                        a["window"])
    return _attend(nb, q, k, v, mask, a["sinks"], a["scale"], a["softcap"], heads, kv_heads, d, dv)


def _attention_cache(nb, a):
    q = a["q"]
    keys, values = nb.concat([a["k_past"], a["k_new"]], 2), nb.concat([a["v_past"], a["v_new"]], 2)
    heads, kv_heads, d, dv = _dims(q, keys, values)
    s_len, t_len = nb.dim(keys, 2), nb.dim(q, 2)
    mask = _visible(nb, nb.arange(nb.ew(s_len, t_len, "SUB"), t_len), nb.arange(nb.const([0], np.int64), s_len),
                    a["window"])
    return _attend(nb, q, keys, values, mask, a["sinks"], a["scale"], a["softcap"], heads, kv_heads, d, dv), keys, values


def _attention_ring(nb, a):
    q, window = a["q"], a["window"]
    pos = nb.reshape(a["pos"], (1,))
    keys, values = nb.concat([a["k_ring"], a["k_new"]], 2), nb.concat([a["v_ring"], a["v_new"]], 2)
    heads, kv_heads, d, dv = _dims(q, a["k_new"], a["v_new"])
    t_len, one = nb.dim(q, 2), nb.const([1], np.int64)
    new_pos = nb.arange(pos, t_len)
    k_pos = nb.concat([_ring_positions(nb, nb.ew(pos, one, "SUB"), window), new_pos], 0)
    mask = _visible(nb, new_pos, k_pos, window, nb.ew(nb.ew(k_pos, nb.const([0], np.int64), "GREATER"),
                                                     nb.ew(k_pos, nb.const([0], np.int64), "EQUAL"), "OR"),
                    a.get("chunked", False))
    out = _attend(nb, q, keys, values, mask, a["sinks"], a["scale"], a["softcap"], heads, kv_heads, d, dv)
    last = _ring_positions(nb, nb.ew(nb.ew(pos, t_len, "SUM"), one, "SUB"), window)
    fresh = nb.ew(nb.ew(last, pos, "GREATER"), nb.ew(last, pos, "EQUAL"), "OR")
    src = nb.select(fresh, nb.ew(nb.ew(last, pos, "SUB"), nb.const([window], np.int64), "SUM"),
                    nb.const(np.arange(window), np.int64))
    return out, nb.gather(keys, src, 2), nb.gather(values, src, 2)


def _attention_read(nb, a):
    q, k, v, window = a["q"], a["k_cache"], a["v_cache"], a["window"]
    heads, kv_heads, d, dv = _dims(q, k, v)
    pos, t_len = nb.reshape(a["pos"], (1,)), nb.dim(q, 2)
    q_pos, valid = nb.arange(pos, t_len), None
    if a["ring"]:
        last = nb.ew(nb.ew(pos, t_len, "SUM"), nb.const([1], np.int64), "SUB")
        k_pos = _ring_positions(nb, last, k.shape[2])
        valid = nb.ew(nb.ew(k_pos, nb.const([0], np.int64), "GREATER"), nb.ew(k_pos, nb.const([0], np.int64), "EQUAL"),
                      "OR")
    else:
        k_pos = nb.arange(nb.const([0], np.int64), nb.dim(k, 2))
    mask = _visible(nb, q_pos, k_pos, window, valid)
    return _attend(nb, q, k, v, mask, a["sinks"], a["scale"], a["softcap"], heads, kv_heads, d, dv)


def _attention_buffer(nb, a):
    """Rows ``pos..pos+T-1`` written by a gather over ``[buffer | new]``, then causal attention over
    the whole buffer (rows past ``pos+T-1`` are masked as the future)."""
    q, window = a["q"], a["window"]
    pos, t_len = nb.reshape(a["pos"], (1,)), nb.dim(q, 2)
    capacity = a["k_buf"].shape[2]
    row = nb.const(np.arange(capacity), np.int64)
    end = nb.ew(pos, t_len, "SUM")
    fresh = nb.ew(nb.ew(nb.ew(row, pos, "GREATER"), nb.ew(row, pos, "EQUAL"), "OR"), nb.ew(row, end, "LESS"), "AND")
    src = nb.select(fresh, nb.ew(nb.ew(row, pos, "SUB"), nb.const([capacity], np.int64), "SUM"), row)
    keys = nb.gather(nb.concat([a["k_buf"], a["k_new"]], 2), src, 2)
    values = nb.gather(nb.concat([a["v_buf"], a["v_new"]], 2), src, 2)
    heads, kv_heads, d, dv = _dims(q, keys, values)
    mask = _visible(nb, nb.arange(pos, t_len), row, window)
    return _attend(nb, q, keys, values, mask, a["sinks"], a["scale"], a["softcap"], heads, kv_heads, d, dv), keys, values


_LAYERS = {"attention": _attention, "attention_cache": _attention_cache, "attention_ring": _attention_ring,
           "attention_read": _attention_read, "attention_buffer": _attention_buffer}
"""Layer converters by op name (route ``layers`` in :data:`.specs.ROUTES`)."""


def _layer_converter(op, build):
    def convert(ctx, target, args, kwargs, name):
        return build(_Net(ctx, name), bind(op, args, kwargs))
    return convert


def _plugin_converter(spec):
    def convert(ctx, target, args, kwargs, name):
        import tensorrt.plugin as trtp
        from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor

        from effexport.exporter.backends.tensorrt.specs import placeholder

        values = bind(spec.op, args, kwargs)
        tensors = [get_trt_tensor(ctx, placeholder() if values[n] is None else values[n], f"{name}_{n}")
                   for n in spec.tensors]
        fields = {}
        for field, kind in spec.fields:
            if field.startswith("has_"):
                fields[field] = int(values[field[4:]] is not None)
            else:
                fields[field] = int(values[field]) if kind == "int32" else float(values[field])
        plugin = getattr(getattr(trtp.op, PLUGIN_NAMESPACE), spec.name)
        layer = ctx.net.add_plugin(plugin(*tensors, **fields))
        layer.name = f"[{target}]-[{name}]"
        outputs = tuple(layer.get_output(i) for i in range(spec.num_outputs))
        return outputs[0] if spec.num_outputs == 1 else outputs
    return convert


def register_converters() -> dict:
    """Register a converter for every effexport op with torch-tensorrt; returns ``{op: converter}``."""
    from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter

    from effexport.exporter.backends.tensorrt.plugins import register_plugins

    register_plugins()
    specs, done = plugin_specs(), {}
    for op, route in route_table().items():
        name = op._schema.name.split("::")[-1]
        convert = _layer_converter(op, _LAYERS[name]) if route == "layers" else _plugin_converter(specs[op])
        done[op] = dynamo_tensorrt_converter(op, supports_dynamic_shapes=True)(convert)
    return done
