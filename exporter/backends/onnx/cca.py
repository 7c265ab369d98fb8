"""ONNX lowering of ``effexport::cca`` (ZAYA1 compressed convolutional attention q/k/v).

One translation serves both profiles (``ort`` and ``standard``): there is no contrib or standard
CCA operator. Every call becomes one ``effexport::cca`` node (attributes ``num_heads``,
``kv_num_heads``, ``head_size``, ``conv_state_size``, ``rotary_dim``, read from the weights' and
states' static shapes) whose body, a model-local function of ai.onnx opset-18 ops (:mod:`._local`),
lets stock ONNX Runtime run it on any execution provider. The body mirrors
:func:`effexport.custom_ops.cca.cca_reference`:

* ``concat(conv_state, concat(q~, k~)^T)`` along time, then two ``Conv`` nodes: the depthwise one
  (``group = C``) and the grouped one (``group = Hq + Hk``). ``group`` is an ONNX attribute, so it
  is read from the weights' static shapes at translation time (the weights are initializers);
  the new conv state is the last ``P`` pre-conv columns (a ``Slice`` from ``T``);
* the q-k mean residuals (``Reshape`` to ``[B, T, Hk, G, d]``, ``ReduceMean`` over G);
* the value shift (``Concat`` of ``shift_state`` and ``v_del_src[:, :-1]``);
* QK L2-norm to ``sqrt(d)`` with the norm clamped at the dtype's eps, temperature on k;
* partial rotate-half RoPE from the ``cos`` / ``sin`` inputs (in fp32, cast back).

The query and key heads go through the norm and the rotation as one ``[B, T, Hq + Hk, d]`` tensor
(the conv output's channels are already in that order) and are split at the end: both ops work per
head, so the numbers are those of separate heads, with half the nodes (on a one-token GPU step each
node is a kernel launch: ZAYA1-8B runs this body 40 times a step).

Arithmetic runs in the inputs' dtype except RoPE (fp32), as the eager op does, and in bf16 the q-k
mean (fp32 between casts: ONNX Runtime's CUDA ``ReduceMean`` has no bf16 kernel).

Not covered: ``Conv`` without static weight shapes (weights fed as dynamic graph inputs whose
channel dims are unknown are refused with a clear error) and padding masks (the op has none).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import onnx_ir as ir
from onnxscript import opset18 as op

from effexport.exporter.backends.onnx import _build as b
from effexport.exporter.backends.onnx._local import call, declare

__all__ = ["TRANSLATIONS", "cca"]

_EPS = {"FLOAT": torch.finfo(torch.float32).eps, "FLOAT16": torch.finfo(torch.float16).eps,
        "BFLOAT16": torch.finfo(torch.bfloat16).eps, "DOUBLE": torch.finfo(torch.float64).eps}


def _l2_to_sqrt_d(x, d: int, eps: float):
    """``x * (sqrt(d) / max(||x||_2, eps))`` over the last axis (torch's ``scalar / t`` is
    ``reciprocal(t) * scalar``, reproduced here; the reciprocal as ``1 / t``, the same correctly
    rounded number: ONNX Runtime's CUDA ``Reciprocal`` has no bf16 kernel, its ``Div`` has)."""
    norm = op.Sqrt(op.ReduceSum(op.Mul(x, x), b.ints([-1]), keepdims=1))
    norm = op.Max(norm, op.CastLike(b.f32c(eps), x))
    return op.Mul(x, op.Mul(op.Div(op.CastLike(b.f32c(1.0), x), norm), op.CastLike(b.f32c(math.sqrt(d)), x)))


def _rope_rotate_half(x, cos, sin, rot: int, d: int):
    """Rotate-half RoPE on the first ``rot`` dims of ``x [B, H, T, d]``; cos/sin ``[T, rot]``."""
    half = rot // 2
    x_rot = b.to_float(op.Slice(x, b.ints([0]), b.ints([rot]), b.ints([-1])))
    x1 = op.Slice(x_rot, b.ints([0]), b.ints([half]), b.ints([-1]))
    x2 = op.Slice(x_rot, b.ints([half]), b.ints([rot]), b.ints([-1]))
    rotated = op.Concat(op.Neg(x2), x1, axis=-1)
    out = op.Add(op.Mul(x_rot, b.to_float(cos)), op.Mul(rotated, b.to_float(sin)))
    out = b.back_like(out, x)
    if rot == d:
        return out
    return op.Concat(out, op.Slice(x, b.ints([rot]), b.ints([d]), b.ints([-1])), axis=-1)


_INPUTS = ("q_down", "k_down", "v_cur", "v_del_src", "conv0_weight", "conv1_weight", "temperature", "cos",
           "sin", "conv_state", "shift_state", "conv0_bias", "conv1_bias")


def _dims(q_down, conv0_weight, conv1_weight, temperature, conv_state, cos) -> dict[str, int]:
    """The static parameters: ``C`` (conv0_weight), ``d`` (conv1_weight), ``Hk`` (temperature),
    ``P`` (conv_state), ``rot`` (cos), and ``Hq = C/d - Hk``. Batch and T stay dynamic."""
    channels = b.static_dim(conv0_weight, 0, "cca conv0_weight")
    d = b.static_dim(conv1_weight, 1, "cca conv1_weight")
    if channels % d:
        raise ValueError(f"cca: {channels} channels are not a multiple of the head size {d}")
    hk = b.static_dim(temperature, 0, "cca temperature")
    return dict(num_heads=channels // d - hk, kv_num_heads=hk, head_size=d,
                conv_state_size=b.static_dim(conv_state, 2, "cca conv_state"),
                rotary_dim=b.static_dim(cos, 1, "cca cos"))


def _cca_body(q_down, k_down, v_cur, v_del_src, conv0_weight, conv1_weight, temperature, cos, sin,
              conv_state, shift_state, conv0_bias=None, conv1_bias=None):
    """The body: two ``Conv`` nodes plus elementwise ops."""
    dims = _dims(q_down, conv0_weight, conv1_weight, temperature, conv_state, cos)
    hq, hk, d, p, rot = (dims[k] for k in ("num_heads", "kv_num_heads", "head_size", "conv_state_size",
                                           "rotary_dim"))
    channels, g = (hq + hk) * d, hq // hk
    eps = _EPS.get(getattr(q_down.dtype, "name", "FLOAT"), _EPS["FLOAT"])
    t_len = op.Shape(q_down, start=1, end=2)  # [1]

    # (2) q-k mean residuals
    q5 = op.Reshape(q_down, b.ints([0, 0, hk, g, d]))  # [B, T, Hk, G, d]
    k5 = op.Reshape(k_down, b.ints([0, 0, hk, 1, d]))  # [B, T, Hk, 1, d]
    r_q = op.Mul(op.Add(q5, k5), op.CastLike(b.f32c(0.5), q_down))
    if b.dtype_of(q_down) == ir.DataType.BFLOAT16:  # ONNX Runtime's CUDA ReduceMean has no bf16 kernel
        r_k = op.Cast(op.ReduceMean(op.Cast(r_q, to=ir.DataType.FLOAT), b.ints([3]), keepdims=0),
                      to=ir.DataType.BFLOAT16)  # [B, T, Hk, d]
    else:
        r_k = op.ReduceMean(r_q, b.ints([3]), keepdims=0)  # [B, T, Hk, d]
    r_q = op.Reshape(r_q, b.ints([0, 0, hq, d]))  # [B, T, Hq, d]

    # (3) causal depthwise + grouped convs over [conv_state | concat(q~, k~)^T]
    qk = op.Transpose(op.Concat(q_down, k_down, axis=-1), perm=[0, 2, 1])  # [B, C, T]
    c = op.Concat(conv_state, qk, axis=2)  # [B, C, P+T]
    new_conv_state = op.Slice(c, t_len, op.Add(t_len, b.ints([p])), b.ints([2]))  # [B, C, P]
    narrow = conv_state.dtype == ir.DataType.BFLOAT16  # ONNX Conv has no bf16 type: the convs run in fp32
    wide = (lambda x: x if x is None else op.Cast(x, to=ir.DataType.FLOAT)) if narrow else (lambda x: x)
    c = op.Conv(wide(c), wide(conv0_weight), wide(conv0_bias), group=channels)  # [B, C, P+T-(K0-1)]
    c = op.Conv(c, wide(conv1_weight), wide(conv1_bias), group=channels // d)  # [B, C, T]
    if narrow:
        c = op.Cast(c, to=ir.DataType.BFLOAT16)
    # query and key heads together from here: one L2 norm, one rotation, split at the end (each op
    # works per head, so the numbers are the separate heads'; half the kernels of the body's tail)
    c = op.Transpose(c, perm=[0, 2, 1])  # [B, T, C]
    qk = op.Add(op.Reshape(c, b.ints([0, 0, hq + hk, d])), op.Concat(r_q, r_k, axis=2))  # [B, T, Hq+Hk, d]

    # (4) value shift: token t's second half is v_del_src[t-1] (shift_state for t = 0)
    v_del = op.Concat(op.Unsqueeze(shift_state, b.ints([1])),
                      op.Slice(v_del_src, b.ints([0]), b.ints([-1]), b.ints([1])), axis=1)
    v = op.Reshape(op.Concat(v_cur, v_del, axis=-1), b.ints([0, 0, hk, d]))  # [B, T, Hk, d]
    new_shift_state = op.Squeeze(op.Slice(v_del_src, b.ints([-1]), b.ints([2 ** 62]), b.ints([1])),
                                 b.ints([1]))  # [B, Dv]

    # (5) QK L2-norm to sqrt(d), temperature on the key heads (the query heads' factor is 1: exact)
    # a cast constant, not an Expand: ONNX Runtime folds it (its CPU EP has no bf16 Expand to fold with)
    ones = op.CastLike(op.Constant(value=ir.tensor(np.ones(hq, dtype=np.float32))), temperature)
    gains = op.Concat(ones, temperature, axis=0)
    qk = op.Mul(_l2_to_sqrt_d(qk, d, eps), op.Reshape(gains, b.ints([1, 1, hq + hk, 1])))

    # (6) partial RoPE, heads first
    qk = _rope_rotate_half(op.Transpose(qk, perm=[0, 2, 1, 3]), cos, sin, rot, d)  # [B, Hq+Hk, T, d]
    q = op.Slice(qk, b.ints([0]), b.ints([hq]), b.ints([1]))  # [B, Hq, T, d]
    k = op.Slice(qk, b.ints([hq]), b.ints([hq + hk]), b.ints([1]))  # [B, Hk, T, d]
    v = op.Transpose(v, perm=[0, 2, 1, 3])  # [B, Hk, T, d]
    return q, k, v, new_conv_state, new_shift_state


def cca(q_down, k_down, v_cur, v_del_src, conv0_weight, conv1_weight, temperature, cos, sin,
        conv_state, shift_state, conv0_bias=None, conv1_bias=None):
    """``effexport::cca`` -> one ``effexport::cca`` node with its body (both profiles)."""
    args = (q_down, k_down, v_cur, v_del_src, conv0_weight, conv1_weight, temperature, cos, sin,
            conv_state, shift_state, conv0_bias, conv1_bias)
    return call("cca", _cca_body, args, _dims(q_down, conv0_weight, conv1_weight, temperature, conv_state, cos))


declare("cca", _INPUTS, ("q", "k", "v", "new_conv_state", "new_shift_state"),
        [(a, int) for a in ("num_heads", "kv_num_heads", "head_size", "conv_state_size", "rotary_dim")],
        optional=("conv0_bias", "conv1_bias"), doc="ZAYA1 compressed convolutional attention q/k/v (effexport::cca).")


def _table():
    import effexport.custom_ops.cca  # noqa: F401  (registers the op)

    return {torch.ops.effexport.cca.default: cca}


TRANSLATIONS = _table()
"""{OpOverload: translation} (the same in every profile)."""
