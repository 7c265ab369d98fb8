"""Triton prefill kernel (CUDA): many-query attention, causal / sliding-window / bidirectional,
block-sparse. Imports Triton.

One program computes ``BLOCK_M`` queries of one query head (FlashAttention-2 forward: online
softmax over ``BLOCK_N``-row K/V tiles, fp32 statistics and accumulator). The key rows it visits
are only those a query of its block can see, so a sliding-window layer costs ``T x W``, never
``T x S``, and no mask tensor exists anywhere:

* rows ``0 .. NPRE-1`` (optional) take their absolute positions from ``KPOS`` (a ring's slots:
  ``-1`` = never written); all of them are visited (``NPRE`` is at most one window);
* rows ``NPRE .. S-1`` hold consecutive positions ``k_base + (j - NPRE)``; the program visits
  ``[first visible, last visible]`` of its query block: ``(q_first - W, q_last]`` with a window,
  ``[q_first - (q_first mod C), q_last]`` chunked (``CHUNKED``, C = ``window``: a query sees its own
  chunk, ``q - k <= q mod C``), ``[0, q_last]`` causal, all rows when not causal.

Positions: query ``i`` sits at ``q_base + i`` and ``q_base = QADD (+ *POS when Q_DYN)``;
``k_base = KADD (+ *POS when K_DYN)``; ``POS`` is the ops' 0-d device position (read in the kernel:
no host sync). Sinks join the denominator as the initial running max / sum. Scores and softmax in
fp32; bf16/fp16 dots on the tensor cores with fp32 accumulation; fp32 inputs use IEEE fp32 dots; an
fp32 query over 16-bit K/V uses ``tf32x3`` (as the decode kernels).
"""
import triton
import triton.language as tl

from effexport.custom_ops._triton.kernels import NEG_BIG, softmax_tile


@triton.jit
def _prefill(Q, K, V, O, KPOS, POS, SINK,
             sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_t,
             T, S, NPRE, D, DV, H, G, QADD, KADD,
             scale, softcap, window,
             CAUSAL: tl.constexpr, Q_DYN: tl.constexpr, K_DYN: tl.constexpr,
             HAS_SINK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
             DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, CHUNKED: tl.constexpr = False):
    mblock = tl.program_id(0)
    bh = tl.program_id(1)
    h = (bh % H).to(tl.int64)
    b = (bh // H).to(tl.int64)
    kvh = h // G

    q_base = QADD
    k_base = KADD
    if Q_DYN:  # positions fit 32 bits (2**31 tokens); int32 keeps the loop bounds one type
        q_base += tl.load(POS).to(tl.int32)
    if K_DYN:
        k_base += tl.load(POS).to(tl.int32)

    offs_m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    q_pos = q_base + offs_m  # [BLOCK_M]
    kp_ = K + b * sk_b + kvh * sk_h
    vp_ = V + b * sv_b + kvh * sv_h

    if HAS_SINK:
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINK + h).to(tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0  # exp(sink - m_i) with m_i = sink
    else:
        m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    # visible rows of the consecutive part for this query block
    q_first = q_base + mblock * BLOCK_M
    q_last = q_base + tl.minimum(mblock * BLOCK_M + BLOCK_M, T) - 1
    lo = q_first * 0 + NPRE  # int32 tensors from the start: the window branch reassigns them
    hi = q_first * 0 + S
    if CAUSAL:
        hi = tl.minimum(hi, NPRE + (q_last - k_base) + 1)
        if CHUNKED:
            lo = tl.maximum(lo, NPRE + (q_first - q_first % window - k_base))
        elif window > 0:
            lo = tl.maximum(lo, NPRE + (q_first - window + 1 - k_base))
    # the ring part (rows with stored positions), then the consecutive part
    for part in tl.static_range(2):
        if part == 0:
            start = 0
            end = NPRE
        else:
            start = lo
            end = hi
        for n0 in range(start, end, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            in_rng = j < end
            k = tl.load(kp_ + j[:, None] * sk_s + offs_d[None, :],
                        mask=in_rng[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(vp_ + j[:, None] * sv_s + offs_dv[None, :],
                        mask=in_rng[:, None] & dv_ok[None, :], other=0.0)
            if part == 0:
                kp = tl.load(KPOS + j, mask=in_rng, other=-1)
                ok = in_rng & (kp >= 0)
            else:
                kp = k_base + (j - NPRE)
                ok = in_rng
            vis = ok[None, :] & m_ok[:, None]
            if CAUSAL:
                diff = q_pos[:, None] - kp[None, :]
                vis = vis & (diff >= 0)
                if CHUNKED:
                    vis = vis & (diff <= (q_pos % window)[:, None])
                elif window > 0:
                    vis = vis & (diff < window)
            m_i, l_i, acc = softmax_tile(q, k, v, vis, m_i, l_i, acc, scale, softcap,
                                         DOT_F32, DOT_PREC, HAS_SOFTCAP)

    out = acc / l_i[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
