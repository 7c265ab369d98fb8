"""Triton split-K decode kernels (CUDA) for the effexport attention ops. Imports Triton.

``_partial`` reduces one chunk of a per-(batch, KV head) *virtual sequence* of rows for a block of
query heads (GQA: the heads of one KV head share every K/V tile, read once) and, for the ops that
return a new cache, writes each tile it read into the output cache in the same pass (one read of
the old cache instead of a ``cat`` plus an attention read). ``_combine`` merges the chunks with the
per-head sink. The mode (a constexpr, :mod:`.plan`) says where row ``j`` comes from and which
absolute position it holds:

CACHE       rows ``0..P-1`` past, row ``P`` the new token; position ``j``; copy to ``present[j]``.
RING        rows ``0..W-1`` ring slots, row ``W`` the new token at ``pos``; slot s holds
            ``pos - W + ((s - pos) mod W)``; copy every slot but ``pos mod W``, which gets the new row.
            With ``CHUNKED`` (chunked attention, C = W) a row is visible iff it lies in the query's
            chunk, ``pos - p <= pos mod W``, instead of the window ``pos - p < W``.
READ        rows of another layer's full cache, position ``j``; only ``[pos-W+1, pos]`` is visited.
READ_RING   another layer's ring already holding ``pos``: slot s holds ``pos-S+1+((s-pos-1) mod S)``.
BUFFER      in-place full cache (``attention_buffer_inplace``): rows ``0..pos-1`` of the fixed-capacity
            buffer, row ``pos`` the new token (read from the new K/V, never from the buffer, so no
            program reads what another writes). The new row is stored at ``pos`` (the only row
            written) by the last split of head block 0 after its loop, from its own one-row load:
            the K/V tiles stay dot-only operands, so the loop is the read-only kernel's (``READ``),
            software-pipelined through swizzled shared memory. ``STORE_IN_LOOP`` (the first design,
            kept for the bench) stores the row from the tile of the program holding it instead: a
            non-dot use of every tile, which makes Triton stage the tiles unswizzled (bank-conflicted
            ``ldmatrix`` at d 512) and adds a shared->register copy and a predicated store per tile.
            S1 = the buffer's rows; rows past ``min(pos, S1 - 1)`` are not visited.
SPARSE_*    DeepSeek V4: W raw ring slots (``pos - ((pos - s) mod W)``), then the compressed entries
            (HCA: every visible one; CSA: ``comp[idx[k]]``); K = V (one tensor), one KV head.

Scores and the softmax run in fp32; q.k uses the tensor cores in bf16/fp16 (exact products, fp32
accumulation) and IEEE fp32 for fp32 inputs; p.v casts p to the value dtype for bf16/fp16. An fp32
query over a bf16/fp16 cache (what the rewritten graphs pass: the samples upcast q for the score
matmul) uses ``DOT_PREC="tf32x3"``: fp32 split into two tf32 terms on the tensor cores; the cache
values are exact in tf32, so this keeps ~fp32 accuracy (IEEE fp32 dots ran ~30x slower).
"""
import triton
import triton.language as tl

from effexport.custom_ops._triton import plan

# Triton reads globals only as constexpr
CACHE, RING, READ = tl.constexpr(plan.CACHE), tl.constexpr(plan.RING), tl.constexpr(plan.READ)
READ_RING, SPARSE_HCA = tl.constexpr(plan.READ_RING), tl.constexpr(plan.SPARSE_HCA)
SPARSE_CSA, BUFFER = tl.constexpr(plan.SPARSE_CSA), tl.constexpr(plan.BUFFER)
NEG_BIG = tl.constexpr(-1.0e30)  # running max of an empty chunk: exp(NEG_BIG - m) == 0, never NaN


@triton.jit
def softmax_tile(q, k, v, vis, m_i, l_i, acc, scale, softcap, DOT_F32: tl.constexpr,
                 DOT_PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """One K/V tile of the online softmax (shared with the prefill kernel): scores ``q k^T * scale``
    (softcapped), masked by ``vis`` (broadcast to [rows of q, rows of k]); returns the updated running
    max ``m_i``, denominator ``l_i`` and fp32 accumulator ``acc``."""
    if DOT_F32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=DOT_PREC)
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    if HAS_SOFTCAP:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_F32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=DOT_PREC)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _partial(Q, K1, V1, K2, V2, IDX, POS, KO, VO, M_OUT, L_OUT, ACC_OUT,
             sq_b, sq_h, sk1_b, sk1_h, sk1_s, sv1_b, sv1_h, sv1_s,
             sk2_b, sk2_h, sk2_s, sv2_b, sv2_h, sv2_s, sidx_b,
             sko_b, sko_h, sko_s, svo_b, svo_h, svo_s,
             S1, S2, NCOMP, D, DV, G, HKV, NUM_GB, SPLITS, GP,
             scale, softcap, window, ratio, chunk,
             MODE: tl.constexpr, COPY: tl.constexpr, KV_SAME: tl.constexpr,
             DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
             BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, CHUNKED: tl.constexpr = False, DYN_CHUNK: tl.constexpr = False,
             STORE_IN_LOOP: tl.constexpr = False, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the combine grid may be scheduled now (it waits for us)
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    split = tl.program_id(1)
    gb = pid % NUM_GB
    bh = pid // NUM_GB
    kvh = (bh % HKV).to(tl.int64)  # 64-bit offsets: a cache may exceed 2**31 elements
    b = (bh // HKV).to(tl.int64)

    if MODE == CACHE:
        q_pos = S1
    else:
        q_pos = tl.load(POS)
    # static rows [0, S1 + S2); dynamic window of rows worth visiting [base, hi)
    base = q_pos * 0
    hi = q_pos * 0 + S1 + S2
    if MODE == READ or MODE == BUFFER:
        hi = tl.minimum(hi, q_pos + 1)
        if window > 0:
            base = tl.maximum(base, q_pos - window + 1)
    if MODE == SPARSE_HCA:
        hi = tl.minimum(hi, S1 + (q_pos + 1) // ratio)
    if DYN_CHUNK:  # the rows that are there, cut into SPLITS chunks of whole blocks
        chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - base, 1), SPLITS), BLOCK_N) * BLOCK_N
    start = base + split * chunk
    end = tl.minimum(start + chunk, hi)

    offs_g = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    heads = kvh * G + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    k1 = K1 + b * sk1_b + kvh * sk1_h
    v1 = V1 + b * sv1_b + kvh * sv1_h
    k2 = K2 + b * sk2_b + kvh * sk2_h
    v2 = V2 + b * sv2_b + kvh * sv2_h
    if MODE == RING:
        new_slot = q_pos % S1

    m_i = tl.full([BLOCK_G], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        in_rng = j < end
        first = j < S1
        # ---- where each row lives (primary source, or the secondary row j - S1)
        if MODE == SPARSE_CSA:
            ci = tl.load(IDX + b * sidx_b + (j - S1), mask=in_rng & (j >= S1), other=-1)
            row2 = tl.minimum(tl.maximum(ci, 0), NCOMP - 1)
        elif MODE == BUFFER:
            first = j < q_pos  # the buffer's rows; row pos is the new token
            row2 = j - q_pos
        else:
            row2 = j - S1
        row1 = tl.where(first, j, 0)
        row2 = tl.where(first, 0, row2)
        k_rows = tl.where(first[:, None], k1 + row1[:, None] * sk1_s, k2 + row2[:, None] * sk2_s)
        k = tl.load(k_rows + offs_d[None, :], mask=in_rng[:, None] & d_ok[None, :], other=0.0)
        if KV_SAME:
            v = k
        else:
            v_rows = tl.where(first[:, None], v1 + row1[:, None] * sv1_s, v2 + row2[:, None] * sv2_s)
            v = tl.load(v_rows + offs_dv[None, :], mask=in_rng[:, None] & dv_ok[None, :], other=0.0)
        # ---- absolute position of each row, and whether the query sees it
        if MODE == CACHE:
            vis = in_rng
            if window > 0:
                vis = vis & (q_pos - j < window)
        elif MODE == RING:
            kp = q_pos - S1 + ((j - q_pos) % S1 + S1) % S1
            kp = tl.where(first, kp, q_pos)
            if CHUNKED:
                vis = in_rng & (kp >= 0) & (q_pos - kp <= q_pos % window)
            else:
                vis = in_rng & (kp >= 0) & (q_pos - kp < window)
        elif MODE == READ or MODE == BUFFER:
            vis = in_rng & (j <= q_pos)
            if window > 0:
                vis = vis & (q_pos - j < window)
        elif MODE == READ_RING:
            kp = q_pos - S1 + 1 + ((j - q_pos - 1) % S1 + S1) % S1
            vis = in_rng & (kp >= 0) & (q_pos - kp < window)
        else:  # SPARSE_HCA / SPARSE_CSA
            kp = q_pos - ((q_pos - j) % S1 + S1) % S1
            vis_raw = (kp >= 0) & (q_pos - kp < window)
            if MODE == SPARSE_HCA:
                vis_comp = ratio * (j - S1 + 1) <= q_pos + 1
            else:
                vis_comp = (ci >= 0) & (ci < NCOMP) & (ratio * (ci + 1) <= q_pos + 1)
            vis = in_rng & tl.where(first, vis_raw, vis_comp)
        # ---- copy the tile into the returned cache (head block 0 only: one write per row)
        if COPY and (MODE != BUFFER or STORE_IN_LOOP):
            if MODE == CACHE:
                dest = j
                dest_ok = in_rng & (gb == 0)
            elif MODE == BUFFER:  # in place: only the new token's row
                dest = j
                dest_ok = in_rng & (gb == 0) & (j == q_pos)
            else:  # RING: old slots stay except the new token's slot, which gets row S1
                dest = tl.where(first, j, new_slot)
                dest_ok = in_rng & (gb == 0) & ((j != new_slot) | (j >= S1))
            tl.store(KO + b * sko_b + kvh * sko_h + dest[:, None] * sko_s + offs_d[None, :], k,
                     mask=dest_ok[:, None] & d_ok[None, :])
            tl.store(VO + b * svo_b + kvh * svo_h + dest[:, None] * svo_s + offs_dv[None, :], v,
                     mask=dest_ok[:, None] & dv_ok[None, :])
        # ---- online softmax over this tile
        m_i, l_i, acc = softmax_tile(q, k, v, vis[None, :], m_i, l_i, acc, scale, softcap,
                                     DOT_F32, DOT_PREC, HAS_SOFTCAP)

    if COPY and MODE == BUFFER and not STORE_IN_LOOP:
        # the new row, once per (batch, KV head): the last split has the fewest rows (the tail of
        # [base, pos], or none); nothing in this launch reads buffer row pos, so any order is exact
        if (gb == 0) & (split == SPLITS - 1):
            new_ok = q_pos < S1  # a pos past the buffer (unchecked under capture) writes nothing
            tl.store(KO + b * sko_b + kvh * sko_h + q_pos * sko_s + offs_d,
                     tl.load(k2 + offs_d, mask=d_ok, other=0.0), mask=d_ok & new_ok)
            tl.store(VO + b * svo_b + kvh * svo_h + q_pos * svo_s + offs_dv,
                     tl.load(v2 + offs_dv, mask=dv_ok, other=0.0), mask=dv_ok & new_ok)

    row = (bh * SPLITS + split) * GP + offs_g
    tl.store(M_OUT + row, m_i, mask=g_ok)
    tl.store(L_OUT + row, l_i, mask=g_ok)
    tl.store(ACC_OUT + row[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _combine(M_IN, L_IN, ACC_IN, SINK, O, so_b, so_h, G, HKV, SPLITS, GP, DV,
             HAS_SINK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
             SLICE_DV: tl.constexpr, ONE_PASS: tl.constexpr = False, PDL: tl.constexpr = False):
    """Merge the SPLITS partials of one head (a SLICE_DV-wide slice of its output) with the sink.
    ``ONE_PASS`` (SPLITS <= BLOCK_S): every partial loaded at once, the max / denominator / sum
    from those registers -- one round of global loads instead of two per BLOCK_S splits (B=1 at
    32K-128K: 256 splits, 8 rounds of dependent loads before); the same arithmetic in the same order
    as the loop with one block, so the same bits. ``PDL``: launched as a programmatic dependent of
    the partial kernel; waits for it (all its partials written and visible) before any load."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)  # (b * HKV + kvh) * G + g; axis 1: a SLICE_DV-wide slice of the output
    g = pid % G
    bh = pid // G
    kvh = bh % HKV
    b = (bh // HKV).to(tl.int64)
    h = kvh * G + g
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.program_id(1) * SLICE_DV + tl.arange(0, SLICE_DV)
    if HAS_SINK:
        sink = tl.load(SINK + h).to(tl.float32)
    else:
        sink = float("-inf")
    if ONE_PASS:
        ok = offs_s < SPLITS
        rows = (bh * SPLITS + offs_s) * GP + g
        m = tl.load(M_IN + rows, mask=ok, other=float("-inf"))
        lsum = tl.load(L_IN + rows, mask=ok, other=0.0)
        a = tl.load(ACC_IN + rows[:, None] * BLOCK_DV + offs_dv[None, :], mask=ok[:, None], other=0.0)
        m_max = tl.max(tl.maximum(sink + tl.zeros([BLOCK_S], tl.float32), m), 0)
        w = tl.exp(m - m_max)
        den = tl.exp(sink - m_max) + tl.sum(w * lsum, 0)
        num = tl.sum(w[:, None] * a, 0)
    else:
        m_all = sink + tl.zeros([BLOCK_S], tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            sp = s0 + offs_s
            m = tl.load(M_IN + (bh * SPLITS + sp) * GP + g, mask=sp < SPLITS, other=float("-inf"))
            m_all = tl.maximum(m_all, m)
        m_max = tl.max(m_all, 0)
        den = tl.exp(sink - m_max)
        num = tl.zeros([SLICE_DV], tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            sp = s0 + offs_s
            ok = sp < SPLITS
            rows = (bh * SPLITS + sp) * GP + g
            w = tl.exp(tl.load(M_IN + rows, mask=ok, other=float("-inf")) - m_max)
            den += tl.sum(w * tl.load(L_IN + rows, mask=ok, other=0.0), 0)
            a = tl.load(ACC_IN + rows[:, None] * BLOCK_DV + offs_dv[None, :], mask=ok[:, None], other=0.0)
            num += tl.sum(w[:, None] * a, 0)
    out = num / den
    tl.store(O + b * so_b + h * so_h + offs_dv, out.to(O.dtype.element_ty), mask=offs_dv < DV)
