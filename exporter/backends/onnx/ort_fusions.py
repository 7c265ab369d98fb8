"""Fusions for the ``ort`` profile: RMSNorm -> ``SimplifiedLayerNormalization``, tanh-GELU ->
``com.microsoft.FastGelu``, exact (erf) GELU -> ``com.microsoft.Gelu``. ONNX Runtime runs each node as at least one kernel launch; on CUDA a
decode step of a real-size model is launch-bound (BENCHMARKS.md, runs 5-10), so fewer nodes is faster.
On gemma4-e2b:tiny the two rules remove about a third of the step graph's nodes
(tests/test_ort_fusions.py counts them).

Why not ``onnxscript.rewriter.ort_fusions``: its RMSNorm rule absorbs the ``Cast`` to fp32 that
bf16 models (Gemma 4, Laguna) put before the norm and emits ``SimplifiedLayerNormalization(x: bf16,
scale: fp32) -> fp32``, which ONNX Runtime refuses to load ("Type parameter (T) ... bound to different
types"; measured with onnxscript 0.7.2 / onnxruntime 1.32), and its tanh-GELU rule compares the
constants at fp32 precision, so a bf16 graph (0.044715 stored as 0.044677734375) never matches.

Both rules here keep the model's arithmetic: the norm is fused only where it is computed in fp32 or
fp64 (the casts around it stay; ``SimplifiedLayerNormalization`` then computes exactly the fp32
expression, up to summation order), and ``FastGelu`` computes the same tanh formula in fp32
internally (for a bf16 input that is one rounding instead of seven: closer to eager PyTorch, whose
``gelu(approximate="tanh")`` also computes in fp32). ``FastGelu`` and ``Gelu`` have ONNX Runtime CPU
kernels for fp32 and fp16 and CUDA kernels for fp32, fp16 and bf16 (``Gelu``'s bf16 CUDA kernel since
ORT 1.21; ``bench/gelu_kernel_probe.py`` checks a GPU's) (bf16 ``Mul`` has no CPU kernel either, so a
bf16 ``ort`` model is a GPU model in any case).
"""
from __future__ import annotations

import math
import os

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (CommonSubexpressionEliminationPass, IdentityEliminationPass,
                                   RemoveUnusedNodesPass)
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import (collapse_slice_rule, no_op_transpose_rule, reshape_reshape_rule,
                                              transpose_transpose_rule)

from effexport.exporter.backends.onnx import _build as b
from effexport.exporter.backends.onnx._schemas import ensure_fusion_schemas
from effexport.exporter.backends.onnx.ort_cuda import _norm_node, _norm_weight, qk_norm_into_attention
from effexport.exporter.backends.onnx.ort_moe import fuse_moe
from effexport.exporter.backends.onnx.ort_pack import pack_qkv_into_attention
from effexport.exporter.backends.onnx.ort_rotary import fuse_rotary, rotary_in_half, rotary_into_attention

ensure_fusion_schemas()  # onnx.checker must know the ops the rules emit

_NORM_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE})
_HALF_DTYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_SKIP_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_GELU_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_GELU_CONSTANTS = {"three": 3.0, "cubic": 0.044715, "sqrt_2_over_pi": math.sqrt(2.0 / math.pi), "one": 1.0,
                   "half": 0.5}
_ERF_GELU_CONSTANTS = {"sqrt_2": math.sqrt(2.0), "one": 1.0, "half": 0.5}


def _scalar(value: ir.Value | None) -> float | None:
    """The single number a constant value holds (any float / int dtype), else None."""
    const = None if value is None else value.const_value
    if const is None:
        return None
    try:
        array = const.numpy()
    except OSError:  # a structure-only build's weight: a reference to data that does not exist
        return None
    if array.size != 1:
        return None
    return float(array.reshape(()).astype("float64"))


def _close(value: float | None, expected: float, rel: float) -> bool:
    return value is not None and abs(value - expected) <= rel * abs(expected)


def _normalized(op, x, two, axes, eps):
    """``x * reciprocal(sqrt(mean(x^2, -1) + eps))``, the part every RMS-norm pattern shares."""
    mean_square = op.ReduceMean(op.Pow(x, two), axes, _outputs=["mean_square"])
    return op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean_square, eps))))


def _check_norm(x, two, axes, eps, mean_square, scale=None) -> pattern.MatchResult:
    """The conditions of an RMS norm the fused op computes the same: fp32/fp64 arithmetic (the scale,
    if any, in the same dtype), a square, a constant epsilon, the mean over the last axis with the
    axis kept."""
    result = pattern.MatchResult()
    keepdims = mean_square.producer().attributes.get("keepdims")
    if keepdims is not None and keepdims.as_int() != 1:
        return result.fail("the mean drops the reduced axis")
    if x.dtype not in _NORM_DTYPES or (scale is not None and scale.dtype != x.dtype):
        return result.fail("the norm is not computed in fp32 / fp64 (or the scale has another dtype)")
    if _scalar(two) != 2.0 or _scalar(eps) is None:
        return result.fail("not x^2, or epsilon is not a constant")
    rank = x.shape.rank() if x.shape is not None else None
    axis = _scalar(axes)
    if axis is None or not (axis == -1 or (rank is not None and axis == rank - 1)):
        return result.fail("the mean is not over the last axis")
    return result


class _RmsNorm(pattern.RewriteRuleClassBase):
    """``x * reciprocal(sqrt(mean(x^2, -1) + eps)) * scale`` with x in fp32/fp64 ->
    ``SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=eps, stash_type=1)``."""

    def __init__(self, name: str, scale_first: bool):
        super().__init__(name)
        self.scale_first = scale_first

    def pattern(self, op, x, two, axes, eps, scale):
        normalized = _normalized(op, x, two, axes, eps)
        return op.Mul(scale, normalized) if self.scale_first else op.Mul(normalized, scale)

    def check(self, context, x, two, axes, eps, scale, mean_square, **_) -> pattern.MatchResult:
        return _check_norm(x, two, axes, eps, mean_square, scale)

    def rewrite(self, op, x, eps, scale, **_):
        # ONNX Runtime registers SimplifiedLayerNormalization in the default domain (a contrib op)
        return op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=_scalar(eps), stash_type=1)


class _RmsNormNoScale(pattern.RewriteRuleClassBase):
    """``x * reciprocal(sqrt(mean(x^2, -1) + eps))`` without a scale (Gemma 4's value norm) ->
    ``SimplifiedLayerNormalization(x, ones)``. Applied after :class:`_RmsNorm`, so a norm with a
    scale is fused whole."""

    def pattern(self, op, x, two, axes, eps):
        return _normalized(op, x, two, axes, eps)

    def check(self, context, x, two, axes, eps, mean_square, **_) -> pattern.MatchResult:
        result = _check_norm(x, two, axes, eps, mean_square)
        if result and not (x.shape is not None and x.shape.rank() and isinstance(x.shape[-1], int)):
            return result.fail("the normalized dim is not static (the ones scale needs its size)")
        return result

    def rewrite(self, op, x, eps, **_):
        ones = op.Constant(value=ir.tensor(np.ones(x.shape[-1], dtype=x.dtype.numpy())))
        return op.SimplifiedLayerNormalization(x, ones, axis=-1, epsilon=_scalar(eps), stash_type=1)


def _check_gelu(x, constants: dict, expected: dict) -> pattern.MatchResult:
    """A GELU pattern's input is a float type and its constants are the formula's, at bf16 precision."""
    result = pattern.MatchResult()
    if x.dtype not in _GELU_DTYPES:
        return result.fail("not a float16 / bfloat16 / float32 input")
    for name, value in expected.items():
        if not _close(_scalar(constants[name]), value, rel=1e-2):
            return result.fail(f"constant {name} is not {value}")
    return result


class _TanhGelu(pattern.RewriteRuleClassBase):
    """``x * (0.5 * (tanh(sqrt(2/pi) * (x + 0.044715 * x^3)) + 1))`` -> ``FastGelu(x)``; the
    constants are compared at bf16 precision (the model's dtype stores them)."""

    def pattern(self, op, x, three, cubic, sqrt_2_over_pi, one, half):
        inner = op.Mul(sqrt_2_over_pi, op.Add(x, op.Mul(cubic, op.Pow(x, three))))
        return op.Mul(x, op.Mul(half, op.Add(op.Tanh(inner), one)))

    def check(self, context, x, **constants) -> pattern.MatchResult:
        return _check_gelu(x, constants, _GELU_CONSTANTS)

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain="com.microsoft")


class _ErfGelu(pattern.RewriteRuleClassBase):
    """``x * (0.5 * (erf(x / sqrt(2)) + 1))`` (the exact GELU, as the exporter decomposes
    ``gelu(approximate="none")``: five nodes) -> ``com.microsoft.Gelu(x)``, which computes the same
    formula in fp32 inside (a bf16 input: one rounding instead of five, as eager PyTorch's own
    ``gelu``); constants compared at bf16 precision."""

    def pattern(self, op, x, sqrt_2, one, half):
        return op.Mul(x, op.Mul(half, op.Add(op.Erf(op.Div(x, sqrt_2)), one)))

    def check(self, context, x, **constants) -> pattern.MatchResult:
        return _check_gelu(x, constants, _ERF_GELU_CONSTANTS)

    def rewrite(self, op, x, **_):
        return op.Gelu(x, _domain="com.microsoft")


class _HalfNorm(pattern.RewriteRuleClassBase):
    """``Cast(SimplifiedLayerNormalization(Cast(x -> fp32), scale) -> T)`` with ``x`` in fp16 / bf16 and a
    constant fp32 scale -> ``SimplifiedLayerNormalization(x, scale as T)``: the kernel reads T, computes
    in fp32 (``stash_type`` 1) and writes T, so the two casts (two kernels, two copies of the activation)
    go. The scale is rounded to T once (Gemma's ``1 + w`` becomes a bf16 number: a relative change of
    at most 2^-9 per channel, the same rounding the output gets anyway); ONNX Runtime's CUDA kernel takes
    a half-precision input only with the scale and output in the same type."""

    def pattern(self, op, x, scale):
        wide = op.Cast(x, _outputs=["wide"])
        normed = op.SimplifiedLayerNormalization(wide, scale, _allow_other_attributes=True,
                                                 _outputs=["normed"])
        return op.Cast(normed, _outputs=["narrow"])

    def check(self, context, x, scale, wide, normed, narrow, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype not in _HALF_DTYPES or wide.dtype != ir.DataType.FLOAT or narrow.dtype != x.dtype:
            return result.fail("not a half-precision value normalized in fp32 and cast back")
        if scale.dtype != ir.DataType.FLOAT or b.constant(scale) is None:
            return result.fail("the scale is not a constant fp32 tensor")
        if _reads_inv_std(normed.producer()):
            return result.fail("inv_std_var is read")
        return result

    def rewrite(self, op, x, scale, normed, narrow, **_):
        norm = normed.producer()
        out = op.SimplifiedLayerNormalization(x, b.converted(scale, x.dtype), axis=norm.attributes.get_int("axis", -1),
                                              epsilon=norm.attributes.get_float("epsilon", 1e-5), stash_type=1)
        out.dtype, out.shape = narrow.dtype, narrow.shape  # later rules check shapes
        return out


class _ScaledNorm(pattern.RewriteRuleClassBase):
    """``SimplifiedLayerNormalization(x, s) * w`` with constant 1-D ``s`` and ``w`` of the norm's size
    and dtype -> ``SimplifiedLayerNormalization(x, s * w)``. A half-precision Llama-style norm casts
    the normalized value back before multiplying by its weight (``w * x.to(bf16)``), so after
    :class:`_HalfNorm` the weight is a separate ``Mul`` that the fp32 graph never had (there the
    first round fuses the weight into the norm). One rounding instead of two."""

    def pattern(self, op, x, s, w):
        normed = op.SimplifiedLayerNormalization(x, s, _allow_other_attributes=True, _outputs=["normed"])
        return op.Mul(normed, w, _outputs=["scaled"])

    def check(self, context, x, s, w, normed, scaled, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        sv, wv = b.constant(s), b.constant(w)
        if sv is None or wv is None or sv.ndim != 1 or wv.shape != sv.shape or s.dtype != w.dtype:
            return result.fail("the scale and the weight are not constant vectors of one size and dtype")
        norm = normed.producer()
        if norm.attributes.get_int("axis", -1) != -1 or _reads_inv_std(norm):
            return result.fail("not a plain norm over the last axis")
        if scaled.dtype is not None and scaled.dtype != s.dtype:
            return result.fail("the product has another dtype")
        return result

    def rewrite(self, op, x, s, w, normed, scaled, **_):
        norm = normed.producer()
        product = (b.constant(s).astype(np.float32) * b.constant(w).astype(np.float32)).astype(s.dtype.numpy())
        name = f"{w.name}.scaled"
        graph = w.graph
        if name not in graph.initializers:
            graph.register_initializer(ir.Value(name=name, type=ir.TensorType(s.dtype), shape=s.shape,
                                                const_value=ir.tensor(product, name=name)))
        out = op.SimplifiedLayerNormalization(x, graph.initializers[name], axis=-1,
                                              epsilon=norm.attributes.get_float("epsilon", 1e-5),
                                              stash_type=norm.attributes.get_int("stash_type", 1))
        out.dtype, out.shape = scaled.dtype or s.dtype, scaled.shape
        return out


class _SkipNorm(pattern.RewriteRuleClassBase):
    """``s = a + b; y = SimplifiedLayerNormalization(s, gamma)`` over the last axis (a residual add and
    the next RMS norm) -> ``com.microsoft.SkipSimplifiedLayerNormalization(a, b, gamma)``, whose fourth
    output is the sum ``s`` (the residual stream reads it on). Same dtype everywhere, ``a`` and ``b`` of
    one static-rank shape (no broadcasting), so the kernel adds exactly what ``Add`` added."""

    def pattern(self, op, a, b, gamma):
        total = op.Add(a, b, _outputs=["total"])  # both are outputs: the residual stream reads the sum on
        return op.SimplifiedLayerNormalization(total, gamma, _allow_other_attributes=True, _outputs=["normed"]), total

    def check(self, context, a, b, gamma, total, normed, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        norm = normed.producer()
        if not (a.dtype == b.dtype == gamma.dtype and normed.dtype in (None, a.dtype) and a.dtype in _SKIP_DTYPES):
            return result.fail("the add, the scale and the norm do not share one dtype")
        if a.shape is None or b.shape is None or a.shape.rank() not in (2, 3) or list(a.shape) != list(b.shape):
            return result.fail("the two addends do not have one known shape (rank 2 or 3)")
        axis = norm.attributes.get_int("axis", -1)
        if axis not in (-1, a.shape.rank() - 1) or gamma.shape is None or gamma.shape.rank() != 1:
            return result.fail("not a norm over the last axis with a 1-D scale")
        if _reads_inv_std(norm):
            return result.fail("inv_std_var is read")
        return result

    def rewrite(self, op, a, b, gamma, total, normed, **_):
        eps = normed.producer().attributes.get_float("epsilon", 1e-5)
        outputs = op.SkipSimplifiedLayerNormalization(a, b, gamma, epsilon=eps, _domain="com.microsoft",
                                                      _outputs=4)
        for out, like in ((outputs[0], normed), (outputs[3], total)):
            out.dtype, out.shape = a.dtype, like.shape or a.shape
        return outputs[0], outputs[3]


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    """Whether two values provably have one shape: the same rank, each dim the same number or the same
    named torch symbol."""
    if a.shape is None or b.shape is None or a.shape.rank() != b.shape.rank():
        return False
    for x, y in zip(a.shape, b.shape):
        if isinstance(x, int) or isinstance(y, int):
            if x != y:
                return False
        elif x.value is None or x.value != y.value:
            return False
    return True


class _NoOpReshape(pattern.RewriteRuleClassBase):
    """``Reshape(x, s)`` whose result provably has ``x``'s shape -> ``x``."""

    def pattern(self, op, x, s):
        return op.Reshape(x, s, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        return result if _same_shape(x, out) else result.fail("the reshapes change the shape")

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class _NoOpReshapes(_NoOpReshape):
    """``Reshape(Reshape(x, s1), s2)`` whose result has ``x``'s shape -> ``x`` (the torch view /
    unsafe_view chains around attention, once the transposes between them are gone)."""

    def pattern(self, op, x, s1, s2):
        return op.Reshape(op.Reshape(x, s1, _allow_other_attributes=True), s2, _allow_other_attributes=True,
                          _outputs=["out"])


class _ReshapeChain(pattern.RewriteRuleClassBase):
    """``Reshape(Reshape(x, s1), s2)`` -> ``Reshape(x, t)`` with ``t`` a constant written from the
    result's known shape (static sizes as they are, a symbolic size at the index ``x`` has it as 0, at
    most one other as -1), where ``s2`` is computed at run time (onnxscript's ``reshape_reshape_rule``
    takes the constant ones): e.g. an attention's ``[B, H, D]`` output viewed as ``[B, H, 1, D]`` and
    then as ``[B, 1, H*D]`` with the batch read from a shape."""

    def pattern(self, op, x, s1, s2):
        return op.Reshape(op.Reshape(x, s1, _allow_other_attributes=True), s2, _allow_other_attributes=True,
                          _outputs=["out"])

    def check(self, context, x, s2, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if s2.const_value is not None:
            return result.fail("a constant target: reshape_reshape_rule's")
        if _reshape_target(x, out) is None:
            return result.fail("the result's shape is not known well enough")
        return result

    def rewrite(self, op, x, out, **_):
        flat = op.Reshape(x, _shape_constant(out.graph, _reshape_target(x, out)))
        flat.dtype, flat.shape = out.dtype, out.shape
        return flat


def _shape_constant(graph: ir.Graph, target: list[int]) -> ir.Value:
    """An int64 initializer holding a Reshape target, one per distinct target (ONNX Runtime counts a
    ``Constant`` node as a node)."""
    name = "reshape_target_" + "_".join(str(t).replace("-", "m") for t in target)
    if name not in graph.initializers:
        graph.register_initializer(ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(target)]),
                                            const_value=ir.tensor(np.array(target, dtype=np.int64), name=name)))
    return graph.initializers[name]


def _reshape_target(x: ir.Value, out: ir.Value) -> list[int] | None:
    """A constant Reshape target taking ``x`` to ``out``'s shape, or None (:class:`_ReshapeChain`)."""
    if x.shape is None or out.shape is None:
        return None
    target = []
    for j, size in enumerate(out.shape):
        if isinstance(size, int):
            if size == 0:  # Reshape reads a 0 as "copy the input's size"
                return None
            target.append(size)
        elif size.value is None:
            return None
        else:
            same = j < x.shape.rank() and not isinstance(x.shape[j], int) and x.shape[j].value == size.value
            target.append(0 if same else -1)
    return target if target.count(-1) <= 1 else None


class _NormBeforeTranspose(pattern.RewriteRuleClassBase):
    """``SimplifiedLayerNormalization(Transpose(x, perm))`` over the last axis, with ``perm`` keeping
    the last axis -> ``Transpose(SimplifiedLayerNormalization(x), perm)``: the same numbers (each row
    of the last axis is normalized alone), and the transpose can then meet its inverse."""

    def pattern(self, op, x, scale):
        moved = op.Transpose(x, _allow_other_attributes=True, _outputs=["moved"])
        return op.SimplifiedLayerNormalization(moved, scale, _allow_other_attributes=True, _outputs=["normed"])

    def check(self, context, x, scale, moved, normed, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        perm = moved.producer().attributes.get_ints("perm")
        rank = x.shape.rank() if x.shape is not None else None
        if perm is None or rank is None or perm[-1] != rank - 1:
            return result.fail("the transpose moves the last axis (or is unknown)")
        if normed.producer().attributes.get_int("axis", -1) not in (-1, rank - 1):
            return result.fail("not a norm over the last axis")
        if _reads_inv_std(normed.producer()):
            return result.fail("inv_std_var is read")
        return result

    def rewrite(self, op, x, scale, moved, normed, **_):
        inner = _norm_like(op, normed.producer(), x, scale, normed.dtype, x.shape)
        out = op.Transpose(inner, perm=list(moved.producer().attributes.get_ints("perm")))
        out.dtype, out.shape = normed.dtype, normed.shape
        return out


_BNSH = [0, 2, 1, 3]


class _RotaryToBsd(pattern.RewriteRuleClassBase):
    """``Reshape(Transpose(RotaryEmbedding(Transpose(y, [0,2,1,3])), [0,2,1,3]), [B, T, H*D])`` with
    ``y`` of shape ``[B, T, H, D]`` -> ``RotaryEmbedding(Reshape(y, [B, T, H*D]), num_heads=H)``: the
    op's 3-D form reads the tokens-major layout attention wants, so both transposes go."""

    def pattern(self, op, y, pos, cos, sin, shape):
        heads_major = op.Transpose(y, _allow_other_attributes=True, _outputs=["heads_major"])
        rotated = op.RotaryEmbedding(heads_major, pos, cos, sin, _domain="com.microsoft",
                                     _allow_other_attributes=True, _outputs=["rotated"])
        back = op.Transpose(rotated, _allow_other_attributes=True, _outputs=["back"])
        return op.Reshape(back, shape, _allow_other_attributes=True, _outputs=["flat"])

    def check(self, context, y, heads_major, rotated, back, flat, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if list(heads_major.producer().attributes.get_ints("perm") or []) != _BNSH \
                or list(back.producer().attributes.get_ints("perm") or []) != _BNSH:
            return result.fail("not the [B, H, T, D] <-> [B, T, H, D] transposes")
        if y.shape is None or y.shape.rank() != 4 or not isinstance(y.shape[2], int) \
                or not isinstance(y.shape[3], int) or flat.shape is None or flat.shape.rank() != 3:
            return result.fail("not [B, T, H, D] with static H, D flattened to [B, T, H*D]")
        if flat.shape[2] != y.shape[2] * y.shape[3] or not all(
                _same_shape_dim(a, b) for a, b in zip(list(flat.shape)[:2], list(y.shape)[:2])):
            return result.fail("the reshape is not [B, T, H*D]")
        return result

    def rewrite(self, op, y, pos, cos, sin, shape, rotated, flat, **_):
        attrs = rotated.producer().attributes
        tokens_major = op.Reshape(y, shape)
        tokens_major.dtype, tokens_major.shape = flat.dtype, flat.shape
        out = op.RotaryEmbedding(tokens_major, pos, cos, sin, interleaved=attrs.get_int("interleaved", 0),
                                 num_heads=y.shape[2], _domain="com.microsoft")
        out.dtype, out.shape = flat.dtype, flat.shape
        return out


class _CastRotaryToBsd(_RotaryToBsd):
    """:class:`_RotaryToBsd` with the rotation in fp32 between two casts, as half-precision models
    compute it: ``Reshape(Transpose(Cast(RotaryEmbedding(Cast(Transpose(y))))))`` ->
    ``Cast(RotaryEmbedding(Cast(Reshape(y))))`` (casts and the 3-D op commute with the layout)."""

    def pattern(self, op, y, pos, cos, sin, shape):
        heads_major = op.Transpose(y, _allow_other_attributes=True, _outputs=["heads_major"])
        up = op.Cast(heads_major, _outputs=["up"])
        rotated = op.RotaryEmbedding(up, pos, cos, sin, _domain="com.microsoft",
                                     _allow_other_attributes=True, _outputs=["rotated"])
        down = op.Cast(rotated, _outputs=["down"])
        back = op.Transpose(down, _allow_other_attributes=True, _outputs=["back"])
        return op.Reshape(back, shape, _allow_other_attributes=True, _outputs=["flat"])

    def rewrite(self, op, y, pos, cos, sin, shape, up, rotated, down, flat, **_):
        tokens_major = op.Reshape(y, shape)
        tokens_major.dtype, tokens_major.shape = flat.dtype, flat.shape
        wide = op.Cast(tokens_major, to=up.producer().attributes.get_int("to"))
        wide.dtype, wide.shape = rotated.dtype, flat.shape
        attrs = rotated.producer().attributes
        out = op.RotaryEmbedding(wide, pos, cos, sin, interleaved=attrs.get_int("interleaved", 0),
                                 num_heads=y.shape[2], _domain="com.microsoft")
        out.dtype, out.shape = rotated.dtype, flat.shape
        narrow = op.Cast(out, to=down.producer().attributes.get_int("to"))
        narrow.dtype, narrow.shape = flat.dtype, flat.shape
        return narrow


def _rotary_pair(value: ir.Value) -> bool:
    """Whether ``value`` is either end of a ``Transpose -> RotaryEmbedding -> Transpose`` sandwich (a
    ``Cast`` allowed on each side of the rotation, and a norm over the last axis between the first
    transpose and the rotation -- the per-head Q / K norm of Gemma 3 / Qwen3, which
    :class:`_NormBeforeTranspose` moves above that transpose): the rotary layout rules take both
    transposes away. Without the norm case a one-KV-head key's transpose (Gemma 3 1B) became a
    Reshape before the norm moved, and its rotation, norm and projection stayed out of the attention."""
    def through_cast(v: ir.Value, forward: bool) -> list[ir.Node]:
        if forward:
            nodes = [n for n, _ in v.uses()]
            nodes += [m for n in nodes if n.op_type == "SimplifiedLayerNormalization" for m, _ in n.outputs[0].uses()]
            return nodes + [m for n in nodes if n.op_type == "Cast" for m, _ in n.outputs[0].uses()]
        node = v.producer()
        nodes = [node] if node is not None else []
        if node is not None and node.op_type == "Cast" and node.inputs[0] is not None \
                and node.inputs[0].producer() is not None:
            nodes.append(node.inputs[0].producer())
        return nodes

    for rotary in through_cast(value, True):  # value: the transpose into a rotation ...
        if rotary.op_type == "RotaryEmbedding" and any(
                n.op_type == "Transpose" for n in through_cast(rotary.outputs[0], True)):
            return True
    for rotary in through_cast(value, False):  # ... or the input of the transpose out of one
        if rotary.op_type == "RotaryEmbedding" and rotary.inputs[0] is not None and any(
                n.op_type == "Transpose" for n in through_cast(rotary.inputs[0], False)):
            return True
    return False


class _UnitAxesTranspose(pattern.RewriteRuleClassBase):
    """``Transpose(x, perm)`` that moves only axes of size 1 (the others keep their order: ``[B, 1, H,
    D] -> [B, H, 1, D]`` with one token, ``[B, T, 1, D] -> [B, 1, T, D]`` with one KV head) ->
    ``Reshape``: the same bytes in the same order, and ONNX Runtime runs a Reshape without a kernel.
    The reshape then meets its neighbours (collapsed, or dropped as a no-op). Left alone around a
    rotation between two transposes (the rotary layout rules take both away) and where the result's
    shape cannot be written as one Reshape target (two symbolic sizes that move)."""

    def pattern(self, op, x):
        return op.Transpose(x, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        perm = out.producer().attributes.get_ints("perm")
        if perm is None or x.shape is None or x.shape.rank() != len(perm):
            return result.fail("no perm or no rank")
        kept = [p for p in perm if x.shape[p] != 1]
        if kept != sorted(kept) or list(perm) == sorted(perm):
            return result.fail("moves an axis of size other than 1 (or moves nothing)")
        if _target(x, perm) is None:
            return result.fail("the result's shape needs two inferred sizes")
        if _rotary_pair(out) or _rotary_pair(x):
            return result.fail("a transpose around a rotation (the rotary layout rules take it)")
        return result

    def rewrite(self, op, x, out, **_):
        flat = op.Reshape(x, _shape_constant(out.graph, _target(x, list(out.producer().attributes.get_ints("perm")))))
        flat.dtype, flat.shape = out.dtype, ir.Shape([x.shape[p] for p in out.producer().attributes.get_ints("perm")])
        return flat


def _target(x: ir.Value, perm) -> list[int] | None:
    """The Reshape target giving ``x``'s shape permuted by ``perm``: static sizes as they are, a
    symbolic size that stays at its index as 0 (copy), at most one other as -1; None if impossible."""
    target = []
    for j, p in enumerate(perm):
        size = x.shape[p]
        if size == 0:  # Reshape reads a 0 as "copy the input's size"
            return None
        target.append(size if isinstance(size, int) else 0 if p == j else -1)
    return target if target.count(-1) <= 1 else None


class _NormOverUnitHeads(pattern.RewriteRuleClassBase):
    """``Reshape(SimplifiedLayerNormalization(Reshape(x, [.., H, D])), shape(x))`` over the last axis
    with ``x``'s last size already ``D`` (one head: ``H = 1``, e.g. Gemma 4's single KV head's norm) ->
    the norm of ``x`` itself: the same rows normalized, two nodes fewer."""

    def pattern(self, op, x, s1, scale, s2):
        heads = op.Reshape(x, s1, _allow_other_attributes=True, _outputs=["heads"])
        normed = op.SimplifiedLayerNormalization(heads, scale, _allow_other_attributes=True, _outputs=["normed"])
        return op.Reshape(normed, s2, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, heads, normed, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not _same_shape(x, out) or heads.shape is None or not isinstance(heads.shape[-1], int) \
                or x.shape[-1] != heads.shape[-1]:
            return result.fail("not a reshape pair around the norm that keeps the last axis")
        if normed.producer().attributes.get_int("axis", -1) not in (-1, heads.shape.rank() - 1):
            return result.fail("not a norm over the last axis")
        if _reads_inv_std(normed.producer()) or len(normed.uses()) != 1:
            return result.fail("the norm's outputs are read elsewhere")
        return result

    def rewrite(self, op, x, scale, normed, out, **_):
        return _norm_like(op, normed.producer(), x, scale, out.dtype, out.shape)


def _norm_like(op, norm: ir.Node, x, scale, dtype, shape):
    """A ``SimplifiedLayerNormalization`` of ``x`` over its last axis with ``norm``'s epsilon and
    stash type (the layout rules move or reshape norms; the arithmetic stays the same)."""
    out = op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=norm.attributes.get_float("epsilon", 1e-5),
                                          stash_type=norm.attributes.get_int("stash_type", 1))
    out.dtype, out.shape = dtype, shape
    return out


def _same_shape_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def _attention_output_shapes(model: ir.Model) -> None:
    """Give GroupQueryAttention outputs with no shape their query's (``[B, T, H*D]``) and
    MultiHeadAttention ones theirs (``[B, S, H*dv]``), so the reshapes after attention can be proven
    no-ops or written as one."""
    for node in model.graph:
        if node.op_type == "GroupQueryAttention" and node.outputs[0].shape is None \
                and node.inputs[0] is not None and node.inputs[0].shape is not None:
            node.outputs[0].shape = node.inputs[0].shape
        elif node.op_type == "MultiHeadAttention" and node.outputs[0].shape is None and len(node.inputs) > 2 \
                and all(v is not None and v.shape is not None for v in node.inputs[:3]) \
                and node.inputs[0].shape.rank() == 3 and node.inputs[2].shape.rank() == 4:
            # query [B, S, H*d], value heads-major [B, Hkv, L, dv] -> [B, S, H*dv]
            heads, dv = node.attributes.get_int("num_heads", 0), node.inputs[2].shape[3]
            if heads and isinstance(dv, int):
                node.outputs[0].shape = ir.Shape([*list(node.inputs[0].shape)[:2], heads * dv])


def _reads_inv_std(norm: ir.Node) -> bool:
    """Whether a norm node's optional ``inv_std_var`` output is read (a fused op would drop it)."""
    return len(norm.outputs) > 1 and bool(norm.outputs[1].uses())


def share_shape_reads(model: ir.Model) -> int:
    """Point every ``Shape`` node that reads dimensions another ``Shape`` node already read (the same
    sizes and the same torch symbols, e.g. ``[s1, 4, s70, 32]``) at that earlier node's output; returns
    how many were redirected. Each attention layer computes its positions and lengths from its own
    query's shape; once those reads are one value, common-subexpression elimination keeps one copy of
    the whole position arithmetic instead of one per layer. Equal symbols are equal sizes: torch.export
    proves it when it names them."""
    first: dict[tuple, ir.Value] = {}
    moved = 0
    for node in list(model.graph):  # topological: an earlier output is computed before any later use
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
            continue
        x = node.inputs[0]
        if x is None or x.shape is None or x.shape.rank() is None:
            continue
        rank = x.shape.rank()
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", rank)
        start, end = (max(0, min(rank, i + rank if i < 0 else i)) for i in (start, end))
        dims = list(x.shape)[start:end]
        if not dims or any(not isinstance(d, int) and d.value is None for d in dims):
            continue
        key = tuple(d if isinstance(d, int) else str(d.value) for d in dims)
        seen = first.setdefault(key, node.outputs[0])
        if seen is not node.outputs[0] and not node.outputs[0].is_graph_output():
            node.outputs[0].replace_all_uses_with(seen)
            moved += 1
    return moved


def _gathered_row(node: ir.Node) -> tuple[ir.Value, int, int] | None:
    """``(data, axis, index)`` of a ``Gather`` that picks one row (a constant 0-d index) along the
    second-to-last axis of a value whose last two sizes are static, else None."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    data, index = node.inputs
    shape = None if data is None else data.shape
    const = None if index is None else index.const_value
    if shape is None or const is None or shape.rank() is None or shape.rank() < 2:
        return None
    rank = shape.rank()
    axis = node.attributes.get_int("axis", 0)
    axis = axis + rank if axis < 0 else axis
    rows, width = shape[rank - 2], shape[rank - 1]
    try:
        picked = const.numpy()
    except OSError:  # a structure-only build's reference to data that does not exist
        return None
    if axis != rank - 2 or not isinstance(rows, int) or not isinstance(width, int) or picked.shape != ():
        return None
    index = int(picked)
    index = index + rows if index < 0 else index
    return (data, axis, index) if 0 <= index < rows else None


def gathers_as_split(model: ir.Model, at_least: int = 3) -> int:
    """Replace the ``Gather`` nodes that pick single rows ``x[..., i, :]`` of one value ``x [..., L, P]``
    (at least ``at_least`` distinct rows) by one ``Reshape`` to ``[..., L*P]`` and one ``Split`` of
    the last axis into ``L`` outputs of ``P`` (row ``i`` is output ``i``: the same values, no
    arithmetic). Gemma 4's per-layer inputs ``[B, T, layers, P]`` are read this way, one ``Gather``
    per decoder layer: 35 nodes become 2 at E2B size. Returns how many ``Gather`` nodes went."""
    groups: dict[int, list] = {}
    for node in model.graph:
        picked = _gathered_row(node)
        if picked is not None:
            groups.setdefault(id(picked[0]), []).append((node, *picked))
    removed = 0
    for items in groups.values():
        if len({index for *_, index in items}) < at_least:
            continue
        data, rank = items[0][1], items[0][1].shape.rank()
        rows, width = data.shape[rank - 2], data.shape[rank - 1]
        shape = ir.Value(name=f"{data.name}.rows_shape", const_value=ir.tensor(
            np.array([0] * (rank - 2) + [rows * width], dtype=np.int64), name=f"{data.name}.rows_shape"))
        model.graph.register_initializer(shape)
        flat = ir.Node("", "Reshape", [data, shape], name=f"{data.name}.rows_flat", num_outputs=1)
        split = ir.Node("", "Split", [flat.outputs[0]], name=f"{data.name}.rows", num_outputs=rows,
                        attributes=[ir.AttrInt64("axis", rank - 2), ir.AttrInt64("num_outputs", rows)])
        first = min((node for node, *_ in items), key=lambda n: list(model.graph).index(n))
        model.graph.insert_before(first, [flat, split])
        flat.outputs[0].dtype = data.dtype
        for out in split.outputs:
            out.dtype = data.dtype
            out.shape = ir.Shape(list(data.shape)[:rank - 2] + [width])
        for node, _, _, index in items:
            node.outputs[0].replace_all_uses_with(split.outputs[index])
            if node.outputs[0].is_graph_output():  # keep a graph output's name: an Identity of the row
                continue
            model.graph.remove(node, safe=True)
            removed += 1
    return removed


STEP_RULES = pattern.RewriteRuleSet([_HalfNorm.rule(), transpose_transpose_rule, no_op_transpose_rule,
                                     reshape_reshape_rule, collapse_slice_rule])
SCALE_RULES = pattern.RewriteRuleSet([_ScaledNorm.rule()], commute=True)
SKIP_RULES = pattern.RewriteRuleSet([_SkipNorm.rule()], commute=True)
_UNIT_AXES_TRANSPOSE = _UnitAxesTranspose.rule()
_LAYOUT = [_NormBeforeTranspose.rule(), transpose_transpose_rule, no_op_transpose_rule, _RotaryToBsd.rule(),
           _CastRotaryToBsd.rule(), _UNIT_AXES_TRANSPOSE, _NormOverUnitHeads.rule(), _NoOpReshapes.rule(),
           _NoOpReshape.rule(), reshape_reshape_rule, _ReshapeChain.rule()]
LAYOUT_RULES = pattern.RewriteRuleSet(_LAYOUT)
LAYOUT_RULES_KEEPING_TRANSPOSES = pattern.RewriteRuleSet([r for r in _LAYOUT if r is not _UNIT_AXES_TRANSPOSE])
"""The layout rules but :class:`_UnitAxesTranspose`: a streamed build's first round (its norm scales are
nodes until the weights are read, so the norms are not fused yet and cannot move above a transpose),
which leaves the unit-axis transposes for the second round. Turned into reshapes in the first round, a
one-KV-head key's transpose could no longer meet its rotation once the norm between them was fused
(Gemma 3 1B, BENCHMARKS.md run 39)."""


def fuse_step_for_ort(model: ir.Model, max_positions: int | None = None, unit_transposes: bool = True) -> int:
    """The second round of ``ort`` fusions, after the attention lowering (:func:`fuse_for_ort` and the
    host-position split ran): half-precision norms without their casts (and a Llama-style weight
    multiplied after the cast folded into the norm's scale), residual adds into
    ``SkipSimplifiedLayerNormalization``, rotate-half RoPE as ``RotaryEmbedding`` where
    ``max_positions`` bounds the positions (:mod:`.ort_rotary`), one copy of the per-layer shape and
    position arithmetic (:func:`share_shape_reads` + common-subexpression elimination), stacked routed
    experts as ``MoE`` (:mod:`.ort_moe`), then the
    layout rules until none applies (norms below transposes, transpose pairs, no-op reshapes, the
    rotation in the tokens-major layout), then the rotations into GroupQueryAttention (``do_rotary``)
    and the remaining half-precision rotations without their fp32 casts (:mod:`.ort_rotary`), a
    half-precision attention's per-head Q / K norms into it (CUDA only: :mod:`.ort_cuda`), and last its
    query / key / value projections as one packed GEMM where nothing stands between them and it
    (:mod:`.ort_pack`). Returns how many rewrites were made (shape reads included). ``unit_transposes``
    False keeps transposes of unit axes as transposes (:data:`LAYOUT_RULES_KEEPING_TRANSPOSES`)."""
    _attention_output_shapes(model)
    count = fuse_moe(model)
    count += STEP_RULES.apply_to_model(model) + SCALE_RULES.apply_to_model(model) + SKIP_RULES.apply_to_model(model)
    count += fuse_rotary(model, max_positions) + gathers_as_split(model)
    made = 1
    rules = LAYOUT_RULES if unit_transposes else LAYOUT_RULES_KEEPING_TRANSPOSES
    for _ in range(8):  # each round lets the next meet
        made = rules.apply_to_model(model) + share_shape_reads(model)
        # the collapsed pairs' Identity nodes, duplicates and dead nodes hide the next match
        ir.passes.Sequential(IdentityEliminationPass(), CommonSubexpressionEliminationPass(),
                             RemoveUnusedNodesPass())(model)
        count += made
        if not made:
            break
    count += rotary_into_attention(model) + rotary_in_half(model) + qk_norm_into_attention(model)
    count += pack_qkv_into_attention(model)
    if any(node.domain == "com.microsoft" for node in model.graph):
        model.opset_imports.setdefault("com.microsoft", 1)
    return count


RULES = (pattern.RewriteRuleSet([_RmsNorm.rule("rms_norm", scale_first=False),
                                 _RmsNorm.rule("rms_norm_scale_first", scale_first=True),
                                 _TanhGelu.rule(), _ErfGelu.rule()], commute=True),
         pattern.RewriteRuleSet([_RmsNormNoScale.rule()], commute=True))


def fuse_for_ort(model: ir.Model) -> int:
    """Apply the fusions in place; returns how many were made. Adds the ``com.microsoft`` opset
    import when a ``FastGelu`` was made. Only the main graph is fused in practice: the rules check
    dtypes, and the values inside the model-local function bodies carry none (a tanh GELU written
    inside a function was tried: no match)."""
    count = sum(rules.apply_to_model(model) for rules in RULES)
    if count:  # the fused patterns' constants (exponents, epsilons) are initializers nobody reads now
        RemoveUnusedNodesPass()(model)
    if any(node.domain == "com.microsoft" for node in model.graph):
        model.opset_imports.setdefault("com.microsoft", 1)
    return count


ZERO_SKIP_ENV = "EFFEXPORT_ORT_ZERO_SKIP"
"""``0`` builds the decode graph without :func:`zero_skip_norms` (a comparison, or an ONNX Runtime whose
skip-norm kernel refuses a skip broadcast over the batch)."""
INLINE = "effexport.inline"
"""Key of an initializer's ``meta`` (not serialized): a small constant a fusion made that stays in the
model file when the weights are written as external data (``export._to_data_file``), so the decode
graph still references the general graph's data file only."""


def _constant_scale(w: ir.Value | None, h: int, dtype: ir.DataType) -> bool:
    """``w`` is a constant ``[h]`` of ``dtype``: an initializer (:func:`.ort_cuda._norm_weight`) or a
    ``Constant`` node's output (the ones scale :class:`_RmsNormNoScale` gives a norm without one, which
    :class:`_HalfNorm` turns into an initializer in a half-precision graph: both are taken, so a bf16
    graph and its fp32 twin get the same nodes)."""
    if _norm_weight(w, h, dtype):
        return True
    node = None if w is None else w.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return False
    attr = node.attributes.get("value")
    tensor = attr.as_tensor() if attr is not None and attr.type == ir.AttributeType.TENSOR else None
    return tensor is not None and list(tensor.shape) == [h] and tensor.dtype == dtype


def _one_token_norm(node: ir.Node) -> int | None:
    """``H`` of a plain ``SimplifiedLayerNormalization(x, gamma)`` over the last axis of ``x [B, 1, H]``
    (the token dim the static 1, ``H`` static, ``B`` anything) in a dtype the skip norm takes, with
    ``stash_type`` 1 (or none), its inverse std unread (:func:`.ort_cuda._norm_node`) and no graph
    output, and ``gamma`` a constant ``[H]`` of ``x``'s dtype; else None."""
    if not _norm_node(node, (-1, 2)) or node.attributes.get_int("stash_type", 1) != 1 or len(node.inputs) != 2 \
            or any(v.is_graph_output() for v in node.outputs[1:]):
        return None
    x, gamma = node.inputs
    if x is None or x.dtype not in _SKIP_DTYPES or x.shape is None or x.shape.rank() != 3:
        return None
    tokens, h = x.shape[1], x.shape[2]
    if not (isinstance(tokens, int) and tokens == 1 and isinstance(h, int)):
        return None
    return h if _constant_scale(gamma, h, x.dtype) else None


def _zero_skip(graph: ir.Graph, h: int, dtype: ir.DataType) -> ir.Value:
    """The all-zero ``[1, 1, h]`` initializer of ``dtype``, one per (``h``, ``dtype``), kept inline
    (:data:`INLINE`)."""
    name = f"ort.zero_skip.{h}.{dtype.name.lower()}"
    if name not in graph.initializers:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape([1, 1, h]),
                         const_value=ir.tensor(np.zeros((1, 1, h), dtype=dtype.numpy()), name=name))
        value.meta[INLINE] = True
        graph.register_initializer(value)
    return graph.initializers[name]


def zero_skip_norms(model: ir.Model) -> int:
    """Run every plain per-row RMS norm of a one-token graph through ONNX Runtime's skip-norm kernel:
    ``SimplifiedLayerNormalization(x [B, 1, H], gamma)`` -> ``com.microsoft.SkipSimplifiedLayerNormalization(x,
    zeros [1, 1, H], gamma)`` with the same epsilon (conditions: :func:`_one_token_norm`); its output is
    the norm's (same name, same readers). Returns how many norms were replaced; none with
    :data:`ZERO_SKIP_ENV` set to ``0``.

    Why: the skip-norm kernel is the cheaper launch. Measured on an NVIDIA H100 with onnxruntime-gpu
    1.31.1 (``bench/ort_kernel_floor.py``: a chain of identical nodes replayed from a CUDA graph, bf16,
    activations ``[1, 1, 1536]``): ``SimplifiedLayerNormalization`` 3.16 us per node,
    ``SkipSimplifiedLayerNormalization`` with an all-zero skip 1.99 us per node, the same result. Gemma 4
    E2B's decode graph runs ~185 plain norms per step (~0.6 ms of a ~5.2 ms step).

    Only for the one-token decode graph (:func:`.export.export_steps`, after the other ``ort``
    fusions): the op's schema takes a skip of ``(1, S, H)`` broadcast over the batch, so one constant
    ``[1, 1, H]`` matches an input ``[B, 1, H]`` at any batch; the general graph's token count is
    dynamic, and no constant skip matches it. Adding zero changes nothing: ONNX Runtime's CPU EP
    (1.32, fp32) gives the plain norm's numbers up to summation order (relative 8e-7 at ``H`` = 1536,
    batch 1 to 33; bf16 equal), so the fp32 graph a CPU checks runs it too, and the pass applies in
    every dtype: a half-precision decode graph and its fp32 twin keep one structure. The node has one
    output: ORT's kernels write the sum output only where the node names it (ORT's schema makes outputs
    1-3 optional, as does the subset ``_schemas.py`` declares for ``onnx.checker``). ORT's CUDA EP with
    ``enable_skip_layer_norm_strict_mode`` refuses a skip of another shape than the input's (batch > 1):
    build with :data:`ZERO_SKIP_ENV` ``0`` for such a session."""
    if os.environ.get(ZERO_SKIP_ENV, "1") == "0":
        return 0
    graph, count = model.graph, 0
    for node in list(graph):
        h = _one_token_norm(node)
        if h is None:
            continue
        x, gamma = node.inputs
        fused = ir.Node("com.microsoft", "SkipSimplifiedLayerNormalization", [x, _zero_skip(graph, h, x.dtype), gamma],
                        attributes=[ir.AttrFloat32("epsilon", node.attributes.get_float("epsilon", 1e-5))],
                        name=node.name, num_outputs=1)  # epsilon always: the op's default is 1e-12, the norm's 1e-5
        ir.convenience.replace_nodes_and_values(graph, node, [node], [fused], node.outputs[:1], fused.outputs)
        count += 1
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
    return count
