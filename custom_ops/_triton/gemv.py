"""A decode-shape projection ``y = x W^T`` (``x [M, K]`` with few rows, ``W [N, K]`` as ``nn.Linear``
stores it) as one Triton kernel: the candidate against cuBLAS for the weight GEMMs of a decode step,
which read every weight once for one to eight rows and are bound by their bytes (BENCHMARKS.md run
33a: cuBLAS's one-row kernels at 62% of the copy bandwidth over a Gemma 4 E2B step). Imports Triton.

Each program owns ``BLOCK_N`` rows of ``W`` (outputs ``n``) and walks ``K`` in ``BLOCK_K`` slices, so
every weight byte is read once, along its contiguous row, and ``x``'s slice (a few rows) comes from
the cache. ``DOT``: the slice products on the tensor cores (``x`` padded to 16 rows by masked loads;
needs ``BLOCK_N >= 16``); otherwise a broadcast multiply and a sum over the slice (any ``BLOCK_N``,
``M_PAD`` = the next power of two of ``M``). Accumulation in fp32, one store per output.
"""
import triton
import triton.language as tl


@triton.jit
def _gemv(X, W, Y, M, N, K, stride_xm, stride_wn, stride_ym,
          M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    kk = tl.arange(0, BLOCK_K)
    n_ok = n < N
    m_ok = m < M
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + kk < K
        w = tl.load(W + n[:, None] * stride_wn + (k0 + kk)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(X + m[:, None] * stride_xm + (k0 + kk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")  # fp32 inputs: no tf32
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)
    tl.store(Y + m[:, None] * stride_ym + n[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemv(x, w, block_n: int = 16, block_k: int = 128, dot: bool | None = None, num_warps: int = 4,
         num_stages: int = 3):
    """``x [M, K] @ w[N, K]^T`` -> ``[M, N]`` in ``x``'s dtype (both on one CUDA device, or on the CPU
    under ``TRITON_INTERPRET=1``; rows of ``x`` and ``w`` contiguous). ``dot`` None: the tensor-core
    path where ``block_n >= 16``."""
    import torch

    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv: x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("gemv: x's and w's rows must be contiguous")
    M, K = x.shape
    N = w.shape[0]
    dot = block_n >= 16 if dot is None else dot
    m_pad = max(16, triton.next_power_of_2(M)) if dot else triton.next_power_of_2(M)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _gemv[(triton.cdiv(N, block_n),)](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                                      M_PAD=m_pad, BLOCK_N=block_n, BLOCK_K=block_k, DOT=dot,
                                      num_warps=num_warps, num_stages=num_stages)
    return y
