"""Triton mHC kernels (CUDA): ``effexport::sinkhorn`` and the part of ``effexport::mhc_pre`` after the
projection GEMM, one launch each. Imports Triton.

The eager ops launch one small kernel per elementwise step: the 20-iteration Sinkhorn-Knopp on the
``n x n`` (n = 4) mixing matrix alone is ~80 launches, and ``mhc_pre`` ~110 in all, per call.
Here every token's matrix stays in registers with the ``iters`` loop inside the kernel
(:func:`sinkhorn_tile`), in the arithmetic order of the eager ``_sinkhorn_fp32``: row softmax + eps,
column normalisation, then ``iters - 1`` x (row, column) normalisation, each ``m / (sum + eps)``.

``_sinkhorn``: ``BLOCK_T`` tokens' ``[n, n]`` fp32 logits per program (a ``[BLOCK_T, BLOCK_N,
BLOCK_N]`` tile, padded rows / columns held at 0 so they add nothing to the sums).

``_mhc_pre``: one token per program, after ``mu = vec(X) fn^T`` (the GEMM stays cuBLAS): the RMS
factor ``rsqrt(mean(vec(X)^2) + norm_eps)`` (a pass over the token's ``n*d`` fp32 values in
``BLOCK_D`` slices), the pre / post sigmoids, the Sinkhorn of ``comb``, and ``u = sum_i pre_i X_i``
(a second pass over the slices); writes ``u`` (X's dtype), ``post`` and ``comb`` (fp32).
"""
import triton
import triton.language as tl

NEG_BIG = tl.constexpr(-1.0e30)  # padding's logit: the padded rows' softmax stays finite

@triton.jit
def sinkhorn_tile(x, valid, iters, eps, ROW: tl.constexpr, COL: tl.constexpr):
    """Sinkhorn of fp32 logits ``x`` whose matrices' rows lie along axis ``COL`` and columns along
    ``ROW`` (a row sum reduces axis ``ROW``); ``valid`` masks the padding (returned as 0)."""
    x = tl.where(valid, x, NEG_BIG)
    mx = tl.expand_dims(tl.max(x, ROW), ROW)
    e = tl.where(valid, tl.exp(x - mx), 0.0)
    m = e / tl.expand_dims(tl.sum(e, ROW), ROW)                    # row softmax (padded rows: 0 / 0)
    m = tl.where(valid, m + eps, 0.0)                              # ... now 0, and out of every sum
    m = m / (tl.expand_dims(tl.sum(m, COL), COL) + eps)            # column normalise
    for _ in range(1, iters):
        m = m / (tl.expand_dims(tl.sum(m, ROW), ROW) + eps)        # row normalise
        m = m / (tl.expand_dims(tl.sum(m, COL), COL) + eps)        # column normalise
    return m


@triton.jit
def _sinkhorn(L, OUT, NTOK, N, iters, eps, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_N)
    t3 = t[:, None, None]
    i3 = i[None, :, None]
    j3 = j[None, None, :]
    valid = (t3 < NTOK) & (i3 < N) & (j3 < N)
    offs = t3 * (N * N) + i3 * N + j3
    x = tl.load(L + offs, mask=valid, other=0.0).to(tl.float32)
    m = sinkhorn_tile(x, valid, iters, eps, 2, 1)
    tl.store(OUT + offs, m.to(OUT.dtype.element_ty), mask=valid)


@triton.jit
def _mhc_pre(X, MU, BASE, SCALE, U, POST, COMB, N, D, iters, eps, norm_eps,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    x_row = X + tok * (N * D)
    i = tl.arange(0, BLOCK_N)
    i_ok = i < N
    dd = tl.arange(0, BLOCK_D)

    # ---- rho = rsqrt(mean(vec(X)^2) + norm_eps)
    sq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ok = i_ok[:, None] & (d0 + dd < D)[None, :]
        xb = tl.load(x_row + i[:, None] * D + (d0 + dd)[None, :], mask=ok, other=0.0)
        sq += xb * xb
    rho = 1.0 / tl.sqrt(tl.sum(tl.sum(sq, 1), 0) / (N * D) + norm_eps)

    # ---- pre / post: mu = (vec(X) fn^T) * rho, then * scale + base
    mu_row = MU + tok * (2 * N + N * N)
    s0 = tl.load(SCALE).to(tl.float32)
    s1 = tl.load(SCALE + 1).to(tl.float32)
    s2 = tl.load(SCALE + 2).to(tl.float32)
    mu_pre = tl.load(mu_row + i, mask=i_ok, other=0.0) * rho
    mu_post = tl.load(mu_row + N + i, mask=i_ok, other=0.0) * rho
    pre = tl.sigmoid(mu_pre * s0 + tl.load(BASE + i, mask=i_ok, other=0.0).to(tl.float32)) + eps
    post = 2 * tl.sigmoid(mu_post * s1 + tl.load(BASE + N + i, mask=i_ok, other=0.0).to(tl.float32))
    tl.store(POST + tok * N + i, post, mask=i_ok)

    # ---- comb = sinkhorn((mu[2n:] * scale2 + base[2n:]).view(n, n))
    j = tl.arange(0, BLOCK_N)
    valid = i_ok[:, None] & (j < N)[None, :]
    ij = i[:, None] * N + j[None, :]
    logits = (tl.load(mu_row + 2 * N + ij, mask=valid, other=0.0) * rho * s2
              + tl.load(BASE + 2 * N + ij, mask=valid, other=0.0).to(tl.float32))
    comb = sinkhorn_tile(logits, valid, iters, eps, 1, 0)
    tl.store(COMB + tok * (N * N) + ij, comb, mask=valid)

    # ---- u = sum_i pre_i X_i
    pre = tl.where(i_ok, pre, 0.0)
    u_row = U + tok * D
    for d0 in range(0, D, BLOCK_D):
        d_ok = d0 + dd < D
        xb = tl.load(x_row + i[:, None] * D + (d0 + dd)[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        u = tl.sum(pre[:, None] * xb, 0)
        tl.store(u_row + d0 + dd, u.to(U.dtype.element_ty), mask=d_ok)
