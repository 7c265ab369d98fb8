"""Fusions for the ``ort`` profile: RMSNorm -> ``SimplifiedLayerNormalization``, tanh-GELU ->
``com.microsoft.FastGelu``. ONNX Runtime runs each node as at least one kernel launch; on CUDA a
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
``gelu(approximate="tanh")`` also computes in fp32). ``FastGelu`` has ONNX Runtime CPU kernels for
fp32 and fp16 and CUDA kernels for fp32, fp16 and bf16 (bf16 ``Mul`` has no CPU kernel either, so a
bf16 ``ort`` model is a GPU model in any case).
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import pattern

from effexport.exporter.backends.onnx._schemas import ensure_fusion_schemas

ensure_fusion_schemas()  # onnx.checker must know the ops the rules emit

_NORM_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE})
_GELU_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_GELU_CONSTANTS = {"three": 3.0, "cubic": 0.044715, "sqrt_2_over_pi": math.sqrt(2.0 / math.pi), "one": 1.0,
                   "half": 0.5}


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


class _TanhGelu(pattern.RewriteRuleClassBase):
    """``x * (0.5 * (tanh(sqrt(2/pi) * (x + 0.044715 * x^3)) + 1))`` -> ``FastGelu(x)``; the
    constants are compared at bf16 precision (the model's dtype stores them)."""

    def pattern(self, op, x, three, cubic, sqrt_2_over_pi, one, half):
        inner = op.Mul(sqrt_2_over_pi, op.Add(x, op.Mul(cubic, op.Pow(x, three))))
        return op.Mul(x, op.Mul(half, op.Add(op.Tanh(inner), one)))

    def check(self, context, x, **constants) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype not in _GELU_DTYPES:
            return result.fail("not a float16 / bfloat16 / float32 input")
        for name, expected in _GELU_CONSTANTS.items():
            if not _close(_scalar(constants[name]), expected, rel=1e-2):
                return result.fail(f"constant {name} is not {expected}")
        return result

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain="com.microsoft")


RULES = (pattern.RewriteRuleSet([_RmsNorm.rule("rms_norm", scale_first=False),
                                 _RmsNorm.rule("rms_norm_scale_first", scale_first=True),
                                 _TanhGelu.rule()], commute=True),
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
