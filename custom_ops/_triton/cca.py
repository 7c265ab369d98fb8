"""Triton CCA decode kernel (CUDA): ``effexport::cca`` steps (2), (3), (5), (6) for one new token,
fused. Imports Triton.

One program per (batch, conv group), a group being one query head (``g < Hq``) or one key head
(``g >= Hq``) of ``d`` channels. It reads the group's pre-conv columns (``P`` from the conv state,
the new token's ``concat(q~, k~)``), runs the depthwise conv (``K0`` taps) to the ``K1`` columns the
grouped conv needs, then the grouped conv as one ``[d, d*K1]`` matrix-vector product (its weights
are the bulk of the bytes), adds the q-k mean residual, L2-normalizes to ``sqrt(d)`` (key heads:
times the temperature), applies rotate-half RoPE to the first ``rot`` dims, and writes the head's
q or k row plus its channels of the shifted conv state. The output rows are computed in three
parts -- ``[0, rot/2)``, ``[rot/2, rot)``, ``[rot, d)`` -- so rotate-half pairs part one with part two
without moving registers. Everything runs in fp32 and is rounded once to the output dtype (the eager
reference rounds after each step in bf16: differences are of bf16 rounding size).
"""
import triton
import triton.language as tl


@triton.jit
def _rows(W1, B1, g, rows, rows_ok, offs_ik, ik_ok, out0, D, K1, HAS_B1: tl.constexpr):
    """Grouped conv outputs ``rows`` of group ``g``: ``W1[g*D + rows, :] @ out0`` (+ bias)."""
    out_ch = g * D + rows
    w = tl.load(W1 + out_ch.to(tl.int64)[:, None] * (D * K1) + offs_ik[None, :],
                mask=rows_ok[:, None] & ik_ok[None, :], other=0.0).to(tl.float32)
    y = tl.sum(w * out0[None, :], 1)
    if HAS_B1:
        y += tl.load(B1 + out_ch, mask=rows_ok, other=0.0).to(tl.float32)
    return y


@triton.jit
def _residual(X, x_base, rows, rows_ok, is_q, g, HQ, G, D):
    """The q-k mean residual at ``rows`` of group ``g``: ``(q~[h] + k~[h//G]) / 2`` for a query
    head, ``mean_{h in j} (q~[h] + k~[j]) / 2`` for key head ``j``."""
    if is_q:
        qh = tl.load(X + x_base + g * D + rows, mask=rows_ok, other=0.0).to(tl.float32)
        kh = tl.load(X + x_base + (HQ + g // G) * D + rows, mask=rows_ok, other=0.0).to(tl.float32)
        r = (qh + kh) * 0.5
    else:
        j = g - HQ
        acc = tl.load(X + x_base + g * D + rows, mask=rows_ok, other=0.0).to(tl.float32) * G
        for h in range(0, G):
            acc += tl.load(X + x_base + (j * G + h) * D + rows, mask=rows_ok, other=0.0).to(tl.float32)
        r = acc * (0.5 / G)
    return r


@triton.jit
def _cca_decode(X, STATE, W0, B0, W1, B1, TEMP, COS, SIN, Q_OUT, K_OUT, STATE_OUT,
                sx_b, ss_b, ss_c, sso_b, sso_c, sq_b, sq_h, sk_b, sk_h,
                HQ, G, D, K0, K1, P, ROT, eps,
                HAS_B0: tl.constexpr, HAS_B1: tl.constexpr,
                BLOCK_IK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    is_q = g < HQ
    is_k = g >= HQ
    x_base = b * sx_b

    # ---- depthwise conv: out0[i*K1 + k] = b0[c] + sum_k0 w0[c, k0] * cin[c, k + k0], c = g*D + i,
    #      cin[c, t] = state[c, t] for t < P, the new token's x[c] at t == P
    offs_ik = tl.arange(0, BLOCK_IK)
    ik_ok = offs_ik < D * K1
    ch = g * D + offs_ik // K1
    col = offs_ik % K1
    out0 = tl.zeros([BLOCK_IK], tl.float32)
    if HAS_B0:
        out0 += tl.load(B0 + ch, mask=ik_ok, other=0.0).to(tl.float32)
    for k0 in range(0, K0):
        t = col + k0
        from_state = t < P
        cin = tl.load(STATE + b * ss_b + ch * ss_c + t, mask=ik_ok & from_state, other=0.0).to(tl.float32)
        cin += tl.load(X + x_base + ch, mask=ik_ok & (t == P), other=0.0).to(tl.float32)
        out0 += tl.load(W0 + ch * K0 + k0, mask=ik_ok, other=0.0).to(tl.float32) * cin

    # ---- grouped conv + residual, in three row parts: [0, rot/2), [rot/2, rot), [rot, d)
    half = ROT // 2
    ra = tl.arange(0, BLOCK_R)
    ra_ok = ra < half
    rb = half + ra
    rc = ROT + tl.arange(0, BLOCK_C)
    rc_ok = rc < D
    ya = _rows(W1, B1, g, ra, ra_ok, offs_ik, ik_ok, out0, D, K1, HAS_B1) + _residual(X, x_base, ra, ra_ok, is_q, g, HQ, G, D)
    yb = _rows(W1, B1, g, rb, ra_ok, offs_ik, ik_ok, out0, D, K1, HAS_B1) + _residual(X, x_base, rb, ra_ok, is_q, g, HQ, G, D)
    yc = _rows(W1, B1, g, rc, rc_ok, offs_ik, ik_ok, out0, D, K1, HAS_B1) + _residual(X, x_base, rc, rc_ok, is_q, g, HQ, G, D)

    # ---- L2 norm to sqrt(d) (clamped at eps), key heads times their temperature
    norm = tl.sqrt(tl.sum(ya * ya, 0) + tl.sum(yb * yb, 0) + tl.sum(yc * yc, 0))
    scale = tl.sqrt(D.to(tl.float32)) / tl.maximum(norm, eps)
    if is_k:
        scale *= tl.load(TEMP + (g - HQ)).to(tl.float32)
    ya *= scale
    yb *= scale
    yc *= scale

    # ---- rotate-half RoPE on [0, rot): a' = a cos - b sin, b' = b cos + a sin
    cos_a = tl.load(COS + ra, mask=ra_ok, other=1.0).to(tl.float32)
    sin_a = tl.load(SIN + ra, mask=ra_ok, other=0.0).to(tl.float32)
    cos_b = tl.load(COS + rb, mask=ra_ok, other=1.0).to(tl.float32)
    sin_b = tl.load(SIN + rb, mask=ra_ok, other=0.0).to(tl.float32)
    oa = ya * cos_a - yb * sin_a
    ob = yb * cos_b + ya * sin_b

    q_row = Q_OUT + b * sq_b + g * sq_h
    k_row = K_OUT + b * sk_b + (g - HQ) * sk_h
    tl.store(q_row + ra, oa.to(Q_OUT.dtype.element_ty), mask=ra_ok & is_q)
    tl.store(q_row + rb, ob.to(Q_OUT.dtype.element_ty), mask=ra_ok & is_q)
    tl.store(q_row + rc, yc.to(Q_OUT.dtype.element_ty), mask=rc_ok & is_q)
    tl.store(k_row + ra, oa.to(K_OUT.dtype.element_ty), mask=ra_ok & is_k)
    tl.store(k_row + rb, ob.to(K_OUT.dtype.element_ty), mask=ra_ok & is_k)
    tl.store(k_row + rc, yc.to(K_OUT.dtype.element_ty), mask=rc_ok & is_k)

    # ---- the shifted conv state of this group's channels: state'[c, t] = cin[c, t + 1]
    offs_c = g * D + tl.arange(0, BLOCK_D)
    c_ok = offs_c < (g + 1) * D
    offs_t = tl.arange(0, BLOCK_P)
    t_ok = offs_t < P
    src_state = (offs_t + 1) < P
    keep = tl.load(STATE + b * ss_b + offs_c[:, None] * ss_c + (offs_t + 1)[None, :],
                   mask=c_ok[:, None] & (t_ok & src_state)[None, :], other=0.0)
    new = tl.load(X + x_base + offs_c, mask=c_ok, other=0.0)
    val = tl.where(src_state[None, :], keep, new[:, None])
    tl.store(STATE_OUT + b * sso_b + offs_c[:, None] * sso_c + offs_t[None, :], val,
             mask=c_ok[:, None] & t_ok[None, :])
