"""Manifold-constrained hyper-connections (mHC, DeepSeek V4): pre / post mixing, Sinkhorn, head collapse.

The residual stream is widened to ``n`` streams ``X [B, T, n, d]`` (``n = hc_mult = 4`` in V4). Around every
sub-layer ``F`` (attention, FFN) the official V4 inference code (``Block.hc_pre`` / ``Block.hc_post`` and the
``hc_split_sinkhorn`` kernel; spec ``architectures.md`` section 4.4, the ground truth here) computes::

    u, post, comb = mhc_pre(X, fn, base, scale)        # collapse n streams -> one sub-layer input
    X'            = mhc_post(X, F(norm(u)), post, comb) # X'_j = post_j F + sum_i comb[i, j] X_i

and before the final norm the head collapses the streams with ``mhc_head``. The residual mixing matrix
``comb`` is projected onto the doubly-stochastic matrices by a fixed number of Sinkhorn-Knopp iterations;
``sinkhorn`` exposes that projection as its own op so that a backend keeps it one node (the ONNX backend's
function body unrolls the ``iters`` steps, ``exporter/backends/onnx/functions.py``: no ``Loop``, which
ONNX Runtime's CUDA graphs refuse). Every op here is one opaque node in an exported graph.

Ops (namespace ``effexport``; all functional: nothing is mutated, no output aliases an input):

* ``sinkhorn(logits [..., n, n], *, iters, eps) -> [..., n, n]``
* ``mhc_pre(X [B, T, n, d], fn [2n + n*n, n*d], base [2n + n*n], scale [3], *, iters=20, eps=1e-6,
  norm_eps=1e-6) -> (u [B, T, d], post [B, T, n], comb [B, T, n, n])``
* ``mhc_post(X [B, T, n, d], f [B, T, d], post [B, T, n], comb [B, T, n, n]) -> X' [B, T, n, d]``
* ``mhc_head(X [B, T, n, d], fn [n, n*d], base [n], scale [1], *, eps=1e-6, norm_eps=1e-6) -> u [B, T, d]``

Precision: all arithmetic runs in fp32 whatever the input dtypes (X is usually bf16, the mHC parameters
fp32 as in the checkpoint). ``u`` comes back in X's dtype and ``X'`` in the sub-layer output's dtype (the
official code's choices; in the model both are the residual stream's dtype); the mixing coefficients
``post`` and ``comb`` stay fp32, as in the official code. Every token is independent, so a decode step
is the same op with ``T = 1``.

Fast kernels: :func:`effexport.custom_ops.enable_triton` registers Triton CUDA kernels for ``sinkhorn``
(one launch for every token's matrix) and ``mhc_pre`` (the projection GEMM plus one fused launch,
instead of ~140 eager launches; ``custom_ops/_triton/mhc.py``); ``mhc_post`` and ``mhc_head`` stay
eager (a few launches each). The functions here are the reference and run on CPU.

Not covered: autograd (these are inference ops; no backward is registered), the expand step
``X_0 = repeat(embed(ids), n)`` (plain ``repeat``, nothing to fuse), TileLang kernels, and
the HF ``modular_deepseek_v4`` variant at ``02356fe`` (sigmoid post without x2, sigmoid Sinkhorn start,
untransposed ``comb``), which is not the official math.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["OPS", "mhc_head", "mhc_post", "mhc_pre", "sinkhorn"]


# ------------------------------------------------------------------------------------ shared math
def _check_iters(iters: int) -> None:
    if iters < 1:
        raise ValueError(f"sinkhorn needs iters >= 1 (the softmax start counts as the first), got {iters}")


def _sinkhorn_fp32(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Official ``hc_split_sinkhorn`` projection on fp32 ``logits [..., n, n]``: row softmax + eps, column
    normalisation, then ``iters - 1`` x (row, column) normalisation; the last step normalises columns."""
    m = torch.softmax(logits, dim=-1) + eps                        # [..., n, n] rows sum to 1 + n*eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)                    # column normalise
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)                # row normalise
        m = m / (m.sum(dim=-2, keepdim=True) + eps)                # column normalise
    return m


def _mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """``mu = (vec(X) fn^T) * rsqrt(mean(vec(X)^2) + norm_eps)`` in fp32: ``[B, T, n, d] -> [B, T, rows]``."""
    xf = x.float().flatten(2)                                      # [B, T, n*d]
    rho = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + norm_eps)  # [B, T, 1]
    return F.linear(xf, fn.float()) * rho                          # [B, T, rows]


def _check_x(x: torch.Tensor, op: str) -> tuple[int, int]:
    if x.dim() != 4:
        raise ValueError(f"{op}: X must be [B, T, n, d], got shape {tuple(x.shape)}")
    return x.shape[2], x.shape[3]


def _check_params(op: str, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                  rows: int, cols: int, n_scale: int) -> None:
    if tuple(fn.shape) != (rows, cols):
        raise ValueError(f"{op}: fn must be [{rows}, {cols}], got {tuple(fn.shape)}")
    if tuple(base.shape) != (rows,):
        raise ValueError(f"{op}: base must be [{rows}], got {tuple(base.shape)}")
    if tuple(scale.shape) != (n_scale,):
        raise ValueError(f"{op}: scale must be [{n_scale}], got {tuple(scale.shape)}")


def _check_square(logits: torch.Tensor) -> None:
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn: logits must be [..., n, n], got shape {tuple(logits.shape)}")


# -------------------------------------------------------------------------------------- sinkhorn
@torch.library.custom_op("effexport::sinkhorn", mutates_args=())
def sinkhorn(logits: torch.Tensor, *, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp projection of ``logits [..., n, n]`` towards the doubly-stochastic matrices.

    ``M = rowsoftmax(logits) + eps; M = M / (colsum(M) + eps)``, then ``iters - 1`` times
    ``M = M / (rowsum(M) + eps); M = M / (colsum(M) + eps)`` (``iters`` counts the softmax start, as
    ``hc_sinkhorn_iters`` does in V4). Columns are normalised last, so they sum to 1 up to ``eps``; rows
    converge to 1. Computed in fp32, returned in ``logits``' dtype. ``iters >= 1``.
    """
    _check_square(logits)
    _check_iters(iters)
    return _sinkhorn_fp32(logits.float(), iters, eps).to(logits.dtype)


@sinkhorn.register_fake
def _(logits: torch.Tensor, *, iters: int, eps: float) -> torch.Tensor:
    _check_square(logits)
    _check_iters(iters)
    return logits.new_empty(logits.shape)


# --------------------------------------------------------------------------------------- mhc_pre
@torch.library.custom_op("effexport::mhc_pre", mutates_args=())
def mhc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *,
            iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC before a sub-layer: mixing coefficients from the streams, and the collapsed sub-layer input.

    Shapes: ``x [B, T, n, d]``, ``fn [2n + n*n, n*d]``, ``base [2n + n*n]``, ``scale [3]`` ->
    ``u [B, T, d]`` (x's dtype), ``post [B, T, n]`` (fp32), ``comb [B, T, n, n]`` (fp32). Per token::

        rho  = rsqrt(mean(vec(X)^2) + norm_eps);   mu = (vec(X) fn^T) * rho
        pre  = sigmoid(mu[:n] * scale0 + base[:n]) + eps
        post = 2 * sigmoid(mu[n:2n] * scale1 + base[n:2n])
        comb = sinkhorn((mu[2n:] * scale2 + base[2n:]).view(n, n), iters, eps)
        u    = sum_i pre_i X_i

    All in fp32 (official ``Block.hc_pre`` with ``hc_split_sinkhorn``).
    """
    n, d = _check_x(x, "mhc_pre")
    _check_params("mhc_pre", fn, base, scale, 2 * n + n * n, n * d, 3)
    _check_iters(iters)
    mu = _mixes(x, fn, norm_eps)                                   # [B, T, 2n + n*n]
    s, b = scale.float(), base.float()
    pre = torch.sigmoid(mu[..., :n] * s[0] + b[:n]) + eps          # [B, T, n]
    post = 2 * torch.sigmoid(mu[..., n:2 * n] * s[1] + b[n:2 * n])  # [B, T, n]
    logits = (mu[..., 2 * n:] * s[2] + b[2 * n:]).unflatten(-1, (n, n))  # [B, T, n, n]
    comb = _sinkhorn_fp32(logits, iters, eps)                      # [B, T, n, n]
    u = (pre.unsqueeze(-1) * x.float()).sum(dim=2)                 # [B, T, d]
    return u.to(x.dtype), post, comb


@mhc_pre.register_fake
def _(x, fn, base, scale, *, iters=20, eps=1e-6, norm_eps=1e-6):
    n, d = _check_x(x, "mhc_pre")
    _check_params("mhc_pre", fn, base, scale, 2 * n + n * n, n * d, 3)
    _check_iters(iters)
    b, t = x.shape[0], x.shape[1]
    return (x.new_empty((b, t, d)),
            x.new_empty((b, t, n), dtype=torch.float32),
            x.new_empty((b, t, n, n), dtype=torch.float32))


# -------------------------------------------------------------------------------------- mhc_post
def _check_post(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> None:
    n, d = _check_x(x, "mhc_post")
    b, t = x.shape[0], x.shape[1]
    for name, got, want in (("f", f.shape, (b, t, d)), ("post", post.shape, (b, t, n)),
                            ("comb", comb.shape, (b, t, n, n))):
        if len(got) != len(want) or any(g != w for g, w in zip(got, want)):
            raise ValueError(f"mhc_post: {name} must be {want}, got {tuple(got)}")


@torch.library.custom_op("effexport::mhc_post", mutates_args=())
def mhc_post(x: torch.Tensor, f: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC after a sub-layer: expand its output back onto the streams and mix the residual streams.

    Shapes: ``x [B, T, n, d]`` (the residual streams that entered ``mhc_pre``), ``f [B, T, d]`` (the
    sub-layer output), ``post [B, T, n]``, ``comb [B, T, n, n]`` -> ``X' [B, T, n, d]`` in f's dtype
    (official ``y.type_as(f)``; in the model x and f share one dtype)::

        X'_j = post_j * f + sum_i comb[i, j] * X_i        # H^res = comb^T, as in official ``hc_post``

    Computed in fp32.
    """
    _check_post(x, f, post, comb)
    mixed = torch.einsum("btij,btid->btjd", comb.float(), x.float())  # [B, T, n, d]
    y = post.float().unsqueeze(-1) * f.float().unsqueeze(-2) + mixed  # [B, T, n, d]
    return y.to(f.dtype)


@mhc_post.register_fake
def _(x, f, post, comb):
    _check_post(x, f, post, comb)
    return x.new_empty(x.shape, dtype=f.dtype)


# -------------------------------------------------------------------------------------- mhc_head
@torch.library.custom_op("effexport::mhc_head", mutates_args=())
def mhc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *,
             eps: float = 1e-6, norm_eps: float = 1e-6) -> torch.Tensor:
    """mHC collapse before the final norm (official ``ParallelHead.hc_head``; also the MTP heads).

    Shapes: ``x [B, T, n, d]``, ``fn [n, n*d]``, ``base [n]``, ``scale [1]`` -> ``u [B, T, d]`` in x's
    dtype. Per token, in fp32::

        mu = (vec(X) fn^T) * rsqrt(mean(vec(X)^2) + norm_eps)
        pre = sigmoid(mu * scale + base) + eps;   u = sum_i pre_i X_i
    """
    n, d = _check_x(x, "mhc_head")
    _check_params("mhc_head", fn, base, scale, n, n * d, 1)
    mu = _mixes(x, fn, norm_eps)                                   # [B, T, n]
    pre = torch.sigmoid(mu * scale.float() + base.float()) + eps   # [B, T, n]
    u = (pre.unsqueeze(-1) * x.float()).sum(dim=2)                 # [B, T, d]
    return u.to(x.dtype)


@mhc_head.register_fake
def _(x, fn, base, scale, *, eps=1e-6, norm_eps=1e-6):
    n, d = _check_x(x, "mhc_head")
    _check_params("mhc_head", fn, base, scale, n, n * d, 1)
    return x.new_empty((x.shape[0], x.shape[1], d))


OPS = (
    torch.ops.effexport.sinkhorn.default,
    torch.ops.effexport.mhc_pre.default,
    torch.ops.effexport.mhc_post.default,
    torch.ops.effexport.mhc_head.default,
)
