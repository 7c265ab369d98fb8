"""Triton decode kernels registered for CUDA on the effexport attention ops (opt-in).

``effexport.custom_ops.enable_triton()`` imports Triton and registers a CUDA kernel
(``torch.library.register_kernel(op, "cuda", ...)``) on

* ``attention_cache``, ``attention_ring``, ``attention_read`` (full and ring), and
* ``sparse_attention_ring`` (DeepSeek V4 CSA top-k / HCA all-entries + window + sink).

Each registered kernel takes the fast path for one query token (decode, T == 1) with bf16 / fp16 /
fp32 tensors on one CUDA device and head dims <= 512 (bf16, fp32, and an fp32 query over bf16
caches -- what the rewritten sample graphs pass -- are tested on an H200; fp16 takes the bf16 path,
untested); every other call (prefill chunks, T > 1, other dtypes) runs the
op's eager reference, which stays the oracle. Semantics are the ops' docstrings'; the caches returned by ``attention_cache`` / ``attention_ring`` are written by the
same pass that reads them. Importing this package does not import Triton; :func:`register` does.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Optional

import torch

from effexport.custom_ops import attention as _attn
from effexport.custom_ops import sparse_attention as _sparse
from effexport.custom_ops._checks import check_pos
from effexport.custom_ops._triton import plan as _plan

__all__ = ["register", "registered"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_REGISTERED = False
_MIXED_PREC = ["tf32x3"]  # dot precision for fp32 queries over bf16/fp16 caches (see _launch)


def registered() -> bool:
    return _REGISTERED


def register() -> None:
    """Import Triton and register the CUDA kernels (idempotent). Raises RuntimeError naming the fix
    when Triton is missing."""
    global _REGISTERED
    if _REGISTERED:
        return
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("effexport Triton kernels need triton (pip install triton; CUDA only)")
    from effexport.custom_ops._triton import kernels  # noqa: F401  (compiles nothing yet)
    for op_def, fn in ((_attn.attention_cache, _cache_cuda), (_attn.attention_ring, _ring_cuda),
                       (_attn.attention_read, _read_cuda),
                       (_sparse.sparse_attention_ring, _sparse_ring_cuda)):
        op_def.register_kernel("cuda")(fn)
    _REGISTERED = True


# --------------------------------------------------------------------------------------- launch
def _fast(q: torch.Tensor, *tensors: Optional[torch.Tensor]) -> bool:
    """One query token, supported dtypes, one CUDA device, head dims within the kernel's limit."""
    present = [t for t in tensors if t is not None]
    return (q.dim() == 4 and all(t.is_cuda and t.device == q.device for t in present)
            and all(t.dtype in _DTYPES for t in [q] + [t for t in present if t.is_floating_point()])
            and max(t.shape[-1] for t in [q] + present if t.is_floating_point() and t.dim() >= 3)
            <= _plan.CONFIG["max_head_dim"])


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides4(t: Optional[torch.Tensor]) -> tuple[int, int, int]:
    """(batch, head, row) strides of a [B, H, S, d] tensor (heads stride 0 for [B, S, d])."""
    if t.dim() == 4:
        return t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), 0, t.stride(1)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch(mode: int, q, k1, v1, k2, v2, *, kv_heads: int, groups: int, q_strides, out,
            out_strides, span: int, scale: float, softcap: float, window: int, sinks=None,
            pos=None, idx=None, ratio: int = 1, ncomp: int = 0, k_out=None, v_out=None):
    """Run the partial + combine kernels: ``out`` receives the attention output; ``k_out`` /
    ``v_out`` (when given) the copied cache."""
    from effexport.custom_ops._triton import kernels

    batch = q.shape[0]
    d, dv = k1.shape[-1], v1.shape[-1]
    s1 = k1.shape[-2]
    s2 = 0 if k2 is None else k2.shape[-2] if idx is None else idx.shape[-1]
    sm_count = _sm_count(q.device)
    kv_same = v1 is k1 and (v2 is k2 or k2 is None)
    p = _plan.plan(groups, batch * kv_heads, span, d, dv, sm_count, k1.element_size(), kv_same,
                   copy=k_out is not None)
    gp = p.num_gb * p.block_g
    rows = batch * kv_heads * p.splits * gp
    m_buf = torch.empty(rows, device=q.device, dtype=torch.float32)
    l_buf = torch.empty_like(m_buf)
    acc = torch.empty(rows, p.block_dv, device=q.device, dtype=torch.float32)
    k2 = k1 if k2 is None else k2
    v2 = v1 if v2 is None else v2
    ko = k1 if k_out is None else k_out
    vo = v1 if v_out is None else v_out
    pos_t = q if pos is None else pos.to(q.device)  # dummy pointer when unused (CACHE mode)
    idx_t = q if idx is None else idx
    dot_f32 = not (q.dtype == k1.dtype and q.dtype in (torch.bfloat16, torch.float16))
    # fp32 query over a 16-bit cache: 3-pass tf32 on the tensor cores (~fp32 accuracy); IEEE fp32
    # FMA dots when the cache itself is fp32 (the fp32 tolerance needs its full mantissa)
    prec = _MIXED_PREC[0] if dot_f32 and k1.element_size() == 2 and v1.element_size() == 2 else "ieee"

    def partial(prec):
        kernels._partial[(batch * kv_heads * p.num_gb, p.splits)](
            q, k1, v1, k2, v2, idx_t, pos_t, ko, vo, m_buf, l_buf, acc,
            q_strides[0], q_strides[1], *_strides4(k1), *_strides4(v1), *_strides4(k2), *_strides4(v2),
            idx_t.stride(0) if idx is not None else 0, *_strides4(ko), *_strides4(vo),
            s1, s2, ncomp, d, dv, groups, kv_heads, p.num_gb, p.splits, gp,
            float(scale), float(softcap) if softcap > 0 else 1.0, int(window), int(ratio), p.chunk,
            MODE=mode, COPY=k_out is not None, KV_SAME=kv_same, DOT_F32=dot_f32, DOT_PREC=prec,
            HAS_SOFTCAP=softcap > 0, BLOCK_G=p.block_g, BLOCK_N=p.block_n, BLOCK_D=p.block_d,
            BLOCK_DV=p.block_dv, num_warps=p.num_warps, num_stages=p.num_stages)
    try:
        partial(prec)
    except Exception as exc:  # noqa: BLE001  (a Triton without tf32x3 for this shape: IEEE, slower)
        if prec == "ieee":
            raise
        warnings.warn(f"effexport Triton kernels: tf32x3 dots failed to compile ({type(exc).__name__}); "
                      "using IEEE fp32 dots for fp32 queries over 16-bit caches (slower)")
        _MIXED_PREC[0] = "ieee"
        partial("ieee")
    # combine grid: one program per (head, DV slice); narrower slices when there are few heads
    # (B=1: 8 heads) so the partials are reduced by >= 2 programs per SM
    slice_dv = min(p.block_dv, 64)
    while slice_dv > 16 and batch * kv_heads * groups * (p.block_dv // slice_dv) < 2 * sm_count:
        slice_dv //= 2
    kernels._combine[(batch * kv_heads * groups, p.block_dv // slice_dv)](
        m_buf, l_buf, acc, q if sinks is None else sinks, out, out_strides[0], out_strides[1],
        groups, kv_heads, p.splits, gp, dv, HAS_SINK=sinks is not None,
        BLOCK_S=min(64, _plan.next_pow2(max(p.splits, 16))),
        BLOCK_DV=p.block_dv, SLICE_DV=slice_dv, num_warps=4)
    return p


def _dense(mode: int, q, k1, v1, k2, v2, sinks, *, scale, softcap, window, span, pos=None,
           k_out=None, v_out=None) -> torch.Tensor:
    """Attention ops' layout: q ``[B, H, 1, d]``, caches ``[B, Hkv, S, d]`` -> out ``[B, H, 1, dv]``."""
    out = q.new_empty(q.shape[0], q.shape[1], 1, v1.shape[-1])
    kv_heads = k1.shape[1]
    _launch(mode, q, k1, v1, k2, v2, kv_heads=kv_heads, groups=q.shape[1] // kv_heads,
            q_strides=(q.stride(0), q.stride(1)), out=out, out_strides=(out.stride(0), out.stride(1)),
            span=span, scale=scale, softcap=softcap, window=window, sinks=sinks, pos=pos,
            k_out=k_out, v_out=v_out)
    return out


# ----------------------------------------------------------------------------- op kernels (cuda)
def _cache_cuda(q, k_new, v_new, k_past, v_past, sinks=None, *, scale, window=0, softcap=0.0):
    if q.shape[2] != 1 or not _fast(q, k_new, v_new, k_past, v_past, sinks):
        return _attn.attention_cache._init_fn(q, k_new, v_new, k_past, v_past, sinks, scale=scale,
                                              window=window, softcap=softcap)
    _attn._check_qkv(q, k_new, v_new, sinks, "attention_cache")
    _attn._check_qkv(q, k_past, v_past, None, "attention_cache (past)")
    _attn._check_new(q, k_new, k_past, v_new, v_past, "attention_cache")
    _attn._check_window(window, softcap, "attention_cache")
    q, k_new, v_new = (_last_contiguous(t) for t in (q, k_new, v_new))
    k_past, v_past = _last_contiguous(k_past), _last_contiguous(v_past)
    b, hkv, p, d = k_past.shape
    k_present = k_past.new_empty(b, hkv, p + 1, d)
    v_present = v_past.new_empty(b, hkv, p + 1, v_past.shape[-1])
    out = _dense(_plan.CACHE, q, k_past, v_past, k_new, v_new, sinks, scale=scale, softcap=softcap,
                 window=window, span=p + 1, k_out=k_present, v_out=v_present)
    return out, k_present, v_present


def _ring_cuda(q, k_new, v_new, k_ring, v_ring, pos, sinks=None, *, scale, window, softcap=0.0):
    if q.shape[2] != 1 or not _fast(q, k_new, v_new, k_ring, v_ring, sinks):
        return _attn.attention_ring._init_fn(q, k_new, v_new, k_ring, v_ring, pos, sinks,
                                             scale=scale, window=window, softcap=softcap)
    _attn._check_qkv(q, k_new, v_new, sinks, "attention_ring")
    _attn._check_qkv(q, k_ring, v_ring, None, "attention_ring (ring)")
    _attn._check_new(q, k_new, k_ring, v_new, v_ring, "attention_ring")
    check_pos(pos, "attention_ring")
    _attn._check_window(window, softcap, "attention_ring")
    slots = k_ring.shape[2]
    if window == 0 or slots != window:
        raise ValueError(f"attention_ring: the ring must have exactly window={window} > 0 slots, "
                         f"got {slots}")
    q, k_new, v_new = (_last_contiguous(t) for t in (q, k_new, v_new))
    k_ring, v_ring = _last_contiguous(k_ring), _last_contiguous(v_ring)
    k_out, v_out = torch.empty_like(k_ring), torch.empty_like(v_ring)
    out = _dense(_plan.RING, q, k_ring, v_ring, k_new, v_new, sinks, scale=scale, softcap=softcap,
                 window=window, span=slots + 1, pos=pos, k_out=k_out, v_out=v_out)
    return out, k_out, v_out


def _read_cuda(q, k_cache, v_cache, pos, sinks=None, *, scale, window=0, softcap=0.0, ring=False):
    s_len = k_cache.shape[2]
    if q.shape[2] != 1 or not _fast(q, k_cache, v_cache, sinks) or (ring and not 0 < window <= s_len):
        return _attn.attention_read._init_fn(q, k_cache, v_cache, pos, sinks, scale=scale,
                                             window=window, softcap=softcap, ring=ring)
    _attn._check_qkv(q, k_cache, v_cache, sinks, "attention_read")
    check_pos(pos, "attention_read")
    _attn._check_window(window, softcap, "attention_read")
    q, k_cache, v_cache = (_last_contiguous(t) for t in (q, k_cache, v_cache))
    span = s_len if ring or window == 0 else min(s_len, window)
    return _dense(_plan.READ_RING if ring else _plan.READ, q, k_cache, v_cache, None, None, sinks,
                  scale=scale, softcap=softcap, window=window, span=span, pos=pos)


def _sparse_ring_cuda(q, kv_ring, comp, idx, sink, pos, *, scale, window, ratio):
    fast = (q.dim() == 4 and q.shape[1] == 1 and _fast(q, kv_ring, comp, idx, sink)
            and kv_ring.dtype == comp.dtype)
    if not fast:
        return _sparse.sparse_attention_ring._init_fn(q, kv_ring, comp, idx, sink, pos, scale=scale,
                                                      window=window, ratio=ratio)
    _sparse._check(q, kv_ring, comp, idx, sink, pos, window, ratio, "sparse_attention_ring")
    if kv_ring.shape[1] < window:
        raise ValueError(f"sparse_attention_ring: a ring of {kv_ring.shape[1]} slots cannot serve 1 "
                         f"queries with window {window} (needs W >= window + T - 1)")
    q, kv_ring, comp = (_last_contiguous(t) for t in (q, kv_ring, comp))
    ncomp = comp.shape[1]
    use_comp = ratio > 0 and ncomp > 0
    csa = use_comp and idx is not None
    if csa:
        idx = idx.contiguous()
    out = torch.empty_like(q)  # [B, 1, H, D]
    mode = _plan.SPARSE_CSA if csa else _plan.SPARSE_HCA
    k2 = comp if use_comp else None
    span = kv_ring.shape[1] + (0 if not use_comp else idx.shape[-1] if csa else ncomp)
    _launch(mode, q, kv_ring, kv_ring, k2, k2, kv_heads=1, groups=q.shape[2],
            q_strides=(q.stride(0), q.stride(2)), out=out, out_strides=(out.stride(0), out.stride(2)),
            span=span, scale=scale, softcap=0.0, window=window, sinks=sink, pos=pos,
            idx=idx if csa else None, ratio=ratio if use_comp else 1, ncomp=ncomp)
    return out
