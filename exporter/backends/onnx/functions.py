"""Lowering of the mHC ops as ``effexport``-domain nodes with generic ONNX function bodies.

Each body is an onnxscript ``@script`` function in the ``effexport`` domain (opset 1) whose static
parameters (``iters``, ``eps``, ``norm_eps``) are ONNX attributes, so one function serves every call
site; the matching ``effexport::<op>`` schema is registered in ``onnx.defs`` on import. Sinkhorn's
iterations are an ONNX ``Loop`` (trip count from the ``iters`` attribute), never unrolled.

The translations emit one ``effexport::<op>`` node per call through :func:`._local.call_script`;
the body reaches ``model.functions`` when :func:`._local.attach` runs after the export (torch.onnx
would otherwise inline it, see :mod:`._local`).

Covered: ``sinkhorn``, ``mhc_pre``, ``mhc_post``, ``mhc_head`` (mHC, DeepSeek V4). Not covered here:
``cca`` (:mod:`.cca`) and the DeepSeek compressor / indexer / sparse attention (:mod:`.compressed`),
whose bodies are recorded per call site. Bodies compute in fp32 and cast back, as the eager ops do.
"""
from __future__ import annotations

import onnxscript
from onnxscript import FLOAT, script
from onnxscript import opset18 as op

from effexport.exporter.backends.onnx._local import call_script
from effexport.exporter.backends.onnx._schemas import EFFEXPORT_DOMAIN, ensure_schema

__all__ = ["TRANSLATIONS", "FUNCTIONS"]

effexport = onnxscript.values.Opset(EFFEXPORT_DOMAIN, 1)


# ------------------------------------------------------------------------------------- mHC
@script(effexport, default_opset=op)
def sinkhorn(logits, iters: int, eps: float) -> FLOAT:
    """Row softmax + eps, column normalise, then ``iters - 1`` x (row, column) in fp32 (a Loop)."""
    m = op.Add(op.Softmax(op.Cast(logits, to=FLOAT.dtype), axis=-1), op.Constant(value_float=eps))
    e = op.Constant(value_float=eps)
    m = op.Div(m, op.Add(op.ReduceSum(m, op.Constant(value_ints=[-2]), keepdims=1), e))
    n_loop = op.Sub(op.Constant(value_int=iters), op.Constant(value_int=1))
    for _ in range(n_loop):
        m = op.Div(m, op.Add(op.ReduceSum(m, op.Constant(value_ints=[-1]), keepdims=1), e))
        m = op.Div(m, op.Add(op.ReduceSum(m, op.Constant(value_ints=[-2]), keepdims=1), e))
    return op.CastLike(m, logits)


@script(effexport, default_opset=op)
def mhc_pre(x, fn, base, scale, iters: int, eps: float,
            norm_eps: float) -> tuple[FLOAT, FLOAT, FLOAT]:
    """mu = (vec(X) fn^T) rsqrt(mean(vec(X)^2) + norm_eps); pre/post/comb from mu; u = sum pre X."""
    xf = op.Cast(x, to=FLOAT.dtype)  # [B, T, n, d]
    n = op.Shape(x, start=2, end=3)  # [1]
    flat = op.Reshape(xf, op.Constant(value_ints=[0, 0, -1]))  # [B, T, n*d]
    ms = op.ReduceMean(op.Mul(flat, flat), op.Constant(value_ints=[-1]), keepdims=1)
    rho = op.Reciprocal(op.Sqrt(op.Add(ms, op.Constant(value_float=norm_eps))))
    mu = op.Mul(op.MatMul(flat, op.Transpose(op.Cast(fn, to=FLOAT.dtype), perm=[1, 0])), rho)
    s = op.Cast(scale, to=FLOAT.dtype)
    bf = op.Cast(base, to=FLOAT.dtype)
    last = op.Constant(value_ints=[-1])
    zero = op.Constant(value_ints=[0])
    n2 = op.Add(n, n)
    big = op.Constant(value_ints=[9223372036854775807])
    s0 = op.Gather(s, op.Constant(value_int=0))
    s1 = op.Gather(s, op.Constant(value_int=1))
    s2 = op.Gather(s, op.Constant(value_int=2))
    pre = op.Add(op.Sigmoid(op.Add(op.Mul(op.Slice(mu, zero, n, last), s0), op.Slice(bf, zero, n, zero))),
                 op.Constant(value_float=eps))
    post_logit = op.Add(op.Mul(op.Slice(mu, n, n2, last), s1), op.Slice(bf, n, n2, zero))
    post = op.Mul(op.Sigmoid(post_logit), op.Constant(value_float=2.0))
    flat_logits = op.Add(op.Mul(op.Slice(mu, n2, big, last), s2), op.Slice(bf, n2, big, zero))
    logits = op.Reshape(flat_logits, op.Concat(op.Shape(mu, start=0, end=2), n, n, axis=0))
    e = op.Constant(value_float=eps)
    m = op.Add(op.Softmax(logits, axis=-1), e)
    m = op.Div(m, op.Add(op.ReduceSum(m, op.Constant(value_ints=[-2]), keepdims=1), e))
    n_loop = op.Sub(op.Constant(value_int=iters), op.Constant(value_int=1))
    for _ in range(n_loop):
        m = op.Div(m, op.Add(op.ReduceSum(m, op.Constant(value_ints=[-1]), keepdims=1), e))
        m = op.Div(m, op.Add(op.ReduceSum(m, op.Constant(value_ints=[-2]), keepdims=1), e))
    u = op.ReduceSum(op.Mul(op.Unsqueeze(pre, last), xf), op.Constant(value_ints=[2]), keepdims=0)
    return op.CastLike(u, x), post, m


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
    """``effexport::sinkhorn`` -> one node, body the ``effexport.sinkhorn`` function (a Loop inside)."""
    return call_script(sinkhorn, [logits], dict(iters=iters, eps=eps))


def _mhc_pre(x, fn, base, scale, iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    """``effexport::mhc_pre`` -> one node, body the ``effexport.mhc_pre`` function."""
    return call_script(mhc_pre, [x, fn, base, scale], dict(iters=iters, eps=eps, norm_eps=norm_eps))


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
FUNCTIONS = (sinkhorn, mhc_pre, mhc_post, mhc_head)
"""The onnxscript functions whose bodies travel in exported models."""
