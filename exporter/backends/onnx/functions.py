"""Lowering of the mHC ops as ``effexport``-domain nodes whose bodies are model-local ONNX functions.

Every call is one ``effexport::<op>`` node carrying the op's static parameters (``iters``, ``eps``,
``norm_eps``) as attributes; the matching schema is registered in ``onnx.defs`` on import, and the
body reaches ``model.functions`` when :func:`._local.attach` runs after the export (torch.onnx would
otherwise inline it, see :mod:`._local`). Bodies compute in fp32 and cast back, as the eager ops do.

**Sinkhorn is unrolled, no control flow.** ONNX Runtime inlines function bodies at load, and its
CUDA EP refuses CUDA-graph capture of a session holding a ``Loop`` / ``Scan`` / ``If`` ("the model
has control flow nodes", issue #20). A function body cannot be unrolled on an attribute, so
``sinkhorn`` and ``mhc_pre`` are recorded bodies (:func:`._local.call`) unrolled in Python for the
call's ``iters``: one body per distinct ``(iters, eps, norm_eps, input dtypes)``, told apart by
the function ``overload`` (ONNX IR >= 10; DeepSeek V4 has one ``mhc_pre`` body per dtype, shared by
every layer), and still one readable node per call site. The schedule is the eager op's
(:func:`effexport.custom_ops.mhc._sinkhorn_fp32`) in the same arithmetic order, so fp32 agrees to
rounding: ``M = Softmax(L, -1) + eps; M = M / (ReduceSum(M, -2) + eps)``, then ``iters - 1`` times
the row (-1) and column (-2) normalisation, each ``ReduceSum, Add eps, Div`` (3 nodes); the ``eps``
and axes constants are made once per body, ahead of the chain. A Sinkhorn of ``iters`` is
``2 + 3 + 6 (iters - 1)`` nodes plus 3 constants (119 + 3 at V4's ``iters = 20``). Measured on
deepseek-v4-flash:tiny (ort, fp32): one ``mhc_pre`` body is 168 nodes (17 of them ``Constant``; a
bf16 build adds the input / output ``Cast`` s), where the ``Loop`` form had 64 plus a 9-node loop
body; after ONNX-style inlining (``onnx.inliner``, what ORT does at load) the 6-layer step graph
has 5,017 nodes, against 3,769 plus 12 ``Loop`` s with 108 subgraph nodes.

Every profile unrolls, ``standard`` included: ONNX Runtime runs that profile too (on the CUDA EP
as well, where the same capture refusal would hit), TensorRT imports the same bodies (a ``Loop``
becomes a loop layer there; unrolled, plain reduce and elementwise layers), and even uncaptured ORT
runs a ``Loop`` body iteration by iteration from the host, its optimisers not seeing across the
body's boundary. The ``Loop`` form only saved size: ~110 nodes per body (stored once per distinct
``iters``), i.e. per ``mhc_pre`` call once a runtime inlines it (two calls per layer). One lowering
for every profile keeps the translation table profile-free (:mod:`.translations`).

``mhc_post`` and ``mhc_head`` have no iteration: they stay generic onnxscript ``@script``
functions (:func:`._local.call_script`, one body without overload for every call site).

Covered: ``sinkhorn``, ``mhc_pre``, ``mhc_post``, ``mhc_head`` (mHC, DeepSeek V4). Not covered here:
``cca`` (:mod:`.cca`) and the DeepSeek compressor / indexer / sparse attention (:mod:`.compressed`).
"""
from __future__ import annotations

import onnxscript
from onnxscript import FLOAT, script
from onnxscript import opset18 as op

from effexport.exporter.backends.onnx import _build as b
from effexport.exporter.backends.onnx._local import call, call_script
from effexport.exporter.backends.onnx._schemas import EFFEXPORT_DOMAIN, ensure_schema

__all__ = ["TRANSLATIONS", "FUNCTIONS"]

effexport = onnxscript.values.Opset(EFFEXPORT_DOMAIN, 1)


# ------------------------------------------------------------------------------------- mHC
def _normalise(m, axes, e):
    """``M / (ReduceSum(M, axes, keepdims) + eps)``: one Sinkhorn half-step, 3 nodes."""
    return op.Div(m, op.Add(op.ReduceSum(m, axes, keepdims=1), e))


def _sinkhorn_fp32(logits, iters: int, eps: float):
    """Row softmax + eps, column normalise, then ``iters - 1`` x (row, column), unrolled (fp32 in and out)."""
    e, rows, cols = b.f32c(eps), b.ints([-1]), b.ints([-2])  # hoisted: made once, read by every step
    m = _normalise(op.Add(op.Softmax(logits, axis=-1), e), cols, e)
    for _ in range(iters - 1):
        m = _normalise(_normalise(m, rows, e), cols, e)
    return m


def _sinkhorn_body(logits, *, iters: int, eps: float):
    return b.back_like(_sinkhorn_fp32(b.to_float(logits), iters, eps), logits)


def _mhc_pre_body(x, fn, base, scale, *, iters: int, eps: float, norm_eps: float):
    """mu = (vec(X) fn^T) rsqrt(mean(vec(X)^2) + norm_eps); pre/post/comb from mu; u = sum pre X."""
    n = b.static_dim(x, 2, "mhc_pre streams")
    xf = b.to_float(x)  # [B, T, n, d]
    flat = op.Reshape(xf, b.ints([0, 0, -1]))  # [B, T, n*d]
    last = b.ints([-1])
    ms = op.ReduceMean(op.Mul(flat, flat), last, keepdims=1)
    rho = op.Reciprocal(op.Sqrt(op.Add(ms, b.f32c(norm_eps))))
    mu = op.Mul(op.MatMul(flat, op.Transpose(b.to_float(fn), perm=[1, 0])), rho)  # [B, T, 2n + n*n]
    s, bf = b.to_float(scale), b.to_float(base)
    ends = [b.ints([k]) for k in (0, n, 2 * n, 2 * n + n * n)]  # pre | post | comb logits along mu's rows
    pre, post, logits = (op.Add(op.Mul(op.Slice(mu, ends[i], ends[i + 1], last), op.Gather(s, b.i64(i))),
                                op.Slice(bf, ends[i], ends[i + 1], ends[0])) for i in range(3))
    pre = op.Add(op.Sigmoid(pre), b.f32c(eps))  # [B, T, n]
    post = op.Mul(op.Sigmoid(post), b.f32c(2.0))  # [B, T, n]
    comb = _sinkhorn_fp32(op.Reshape(logits, b.ints([0, 0, n, n])), iters, eps)  # [B, T, n, n]
    u = op.ReduceSum(op.Mul(op.Unsqueeze(pre, last), xf), b.ints([2]), keepdims=0)  # [B, T, d]
    return b.back_like(u, x), post, comb


@script(effexport, default_opset=op)
def mhc_post(x, f, post, comb) -> FLOAT:
    """X'_j = post_j f + sum_i comb[i, j] X_i in fp32, in f's dtype."""
    xf = op.Cast(x, to=FLOAT.dtype)
    mixed = op.MatMul(op.Transpose(op.Cast(comb, to=FLOAT.dtype), perm=[0, 1, 3, 2]), xf)  # [B, T, n, d]
    expand = op.Mul(op.Unsqueeze(op.Cast(post, to=FLOAT.dtype), op.Constant(value_ints=[-1])),
                    op.Unsqueeze(op.Cast(f, to=FLOAT.dtype), op.Constant(value_ints=[-2])))
    return op.CastLike(op.Add(expand, mixed), f)


@script(effexport, default_opset=op)
def mhc_head(x, fn, base, scale, eps: float, norm_eps: float) -> FLOAT:
    """u = sum_i (sigmoid(mu scale + base) + eps)_i X_i with mu as in mhc_pre, in x's dtype."""
    xf = op.Cast(x, to=FLOAT.dtype)
    flat = op.Reshape(xf, op.Constant(value_ints=[0, 0, -1]))
    ms = op.ReduceMean(op.Mul(flat, flat), op.Constant(value_ints=[-1]), keepdims=1)
    rho = op.Reciprocal(op.Sqrt(op.Add(ms, op.Constant(value_float=norm_eps))))
    mu = op.Mul(op.MatMul(flat, op.Transpose(op.Cast(fn, to=FLOAT.dtype), perm=[1, 0])), rho)
    pre = op.Add(op.Sigmoid(op.Add(op.Mul(mu, op.Cast(scale, to=FLOAT.dtype)), op.Cast(base, to=FLOAT.dtype))),
                 op.Constant(value_float=eps))
    u = op.ReduceSum(op.Mul(op.Unsqueeze(pre, op.Constant(value_ints=[-1])), xf),
                     op.Constant(value_ints=[2]), keepdims=0)
    return op.CastLike(u, x)


# ------------------------------------------------------------------------------ translations
def _sinkhorn(logits, iters: int = 20, eps: float = 1e-6):
    """``effexport::sinkhorn`` -> one node, its body unrolled for ``iters`` (one overload per distinct body)."""
    params = dict(iters=iters, eps=eps)
    return call("sinkhorn", _sinkhorn_body, [logits], params, params)


def _mhc_pre(x, fn, base, scale, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    """``effexport::mhc_pre`` -> one node, its body unrolled for ``iters`` (one overload per distinct body)."""
    params = dict(iters=iters, eps=eps, norm_eps=norm_eps)
    return call("mhc_pre", _mhc_pre_body, [x, fn, base, scale], params, params)


def _mhc_post(x, f, post, comb):
    """``effexport::mhc_post`` -> one node, body the ``effexport.mhc_post`` function."""
    return call_script(mhc_post, [x, f, post, comb], {})


def _mhc_head(x, fn, base, scale, eps: float = 1e-6, norm_eps: float = 1e-6):
    """``effexport::mhc_head`` -> one node, body the ``effexport.mhc_head`` function."""
    return call_script(mhc_head, [x, fn, base, scale], dict(eps=eps, norm_eps=norm_eps))


_ANY_FLOAT = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
_F32 = "tensor(float)"


def _register_schemas() -> None:
    """``effexport`` domain schemas matching the functions' signatures (``onnx.defs``)."""
    from effexport.exporter.backends.onnx._schemas import make_schema

    t = [("T", _ANY_FLOAT), ("P", _ANY_FLOAT)]
    ensure_schema(make_schema("sinkhorn", EFFEXPORT_DOMAIN, [("logits", "T", False)], [("out", "T")],
                              [("iters", int), ("eps", float)], [("T", _ANY_FLOAT)],
                              doc="Sinkhorn-Knopp projection (effexport::sinkhorn)."))
    ensure_schema(make_schema("mhc_pre", EFFEXPORT_DOMAIN,
                              [("x", "T", False), ("fn", "P", False), ("base", "P", False), ("scale", "P", False)],
                              [("u", "T"), ("post", _F32), ("comb", _F32)],
                              [("iters", int), ("eps", float), ("norm_eps", float)], t,
                              doc="mHC pre-mixing (effexport::mhc_pre)."))
    ensure_schema(make_schema("mhc_post", EFFEXPORT_DOMAIN,
                              [("x", "T", False), ("f", "U", False), ("post", "P", False), ("comb", "P", False)],
                              [("out", "U")], [], t + [("U", _ANY_FLOAT)],
                              doc="mHC post-mixing (effexport::mhc_post)."))
    ensure_schema(make_schema("mhc_head", EFFEXPORT_DOMAIN,
                              [("x", "T", False), ("fn", "P", False), ("base", "P", False), ("scale", "P", False)],
                              [("u", "T")], [("eps", float), ("norm_eps", float)], t,
                              doc="mHC head collapse (effexport::mhc_head)."))


def _table():
    import torch

    import effexport.custom_ops.mhc  # noqa: F401  (registers the ops)

    ops = torch.ops.effexport
    return {ops.sinkhorn.default: _sinkhorn, ops.mhc_pre.default: _mhc_pre,
            ops.mhc_post.default: _mhc_post, ops.mhc_head.default: _mhc_head}


_register_schemas()
TRANSLATIONS = _table()
"""{OpOverload: translation} (the same in every profile)."""
FUNCTIONS = (mhc_post, mhc_head)
"""The generic onnxscript functions whose bodies travel in exported models (``sinkhorn`` and
``mhc_pre`` bodies are recorded per distinct ``iters``, see the module docstring)."""
