"""Triton kernels registered for CUDA on the effexport attention ops (opt-in).

``effexport.custom_ops.enable_triton()`` imports Triton and registers a CUDA kernel
(``torch.library.register_kernel(op, "cuda", ...)``) on

* ``attention`` (prefill), ``attention_cache``, ``attention_ring``, ``attention_read`` (full and
  ring), ``attention_buffer_inplace`` (the fixed-capacity full cache updated in place: one decode
  token writes its row from the pass that reads rows ``0..pos``, split over the GPU at any ``pos``)
  and the functional ``attention_buffer`` (a copy of the buffers, then the in-place kernel), and
* ``sparse_attention_ring`` (DeepSeek V4 CSA top-k / HCA all-entries + window + sink), and
* ``cca`` (ZAYA1 compressed convolutional attention's q/k/v, :mod:`.cca`: one fused kernel for a
  decode token; T > 1 runs the reference), and
* ``sinkhorn`` and ``mhc_pre`` (DeepSeek V4 mHC, :mod:`.mhc`: the Sinkhorn of every token's ``n x n``
  matrix in one launch; ``mhc_pre`` is the projection GEMM plus one fused kernel for the RMS factor,
  the sigmoids, the Sinkhorn and the collapsed ``u``). Any token count; ``n <= 32``, d >= 1.

One query token (decode, T == 1) takes the split-K decode kernels (:mod:`.kernels`); more than one
(prefill, chunked prefill) takes the block-sparse prefill kernel (:mod:`.prefill`: a sliding-window
layer visits only the K/V tiles inside each query block's window, and no ``T x S`` mask is built).
Both need bf16 / fp16 / fp32 tensors on one CUDA device and head dims <= 512 (bf16, fp32, and an fp32
query over bf16 caches -- what the rewritten sample graphs passed before run 4 -- are tested on an
H200; fp16 takes the bf16 path, untested); other calls (other dtypes, ``attention_read(ring=True)``
with T > 1, which the reference refuses) run the op's eager reference, which stays the oracle.
``attention_ring(chunked=True)`` (chunked attention, a chunk-local cache of C slots) takes the same
two kernels with the chunk mask (``CHUNKED``). Semantics are the ops' docstrings'; the caches returned by ``attention_cache`` / ``attention_ring``
for one token are written by the same pass that reads them (for T > 1: ``torch.cat`` / the ring's
``index_select``, as the reference). Importing this package does not import Triton; :func:`register`
does.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Optional

import torch

from effexport.custom_ops import attention as _attn
from effexport.custom_ops import cca as _cca
from effexport.custom_ops import mhc as _mhc
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
    from effexport.custom_ops._triton import cca, kernels, mhc, prefill  # noqa: F401  (compiles nothing yet)
    for op_def, fn in ((_attn.attention, _attention_cuda), (_cca.cca, _cca_cuda),
                       (_mhc.sinkhorn, _sinkhorn_cuda), (_mhc.mhc_pre, _mhc_pre_cuda),
                       (_attn.attention_cache, _cache_cuda), (_attn.attention_ring, _ring_cuda),
                       (_attn.attention_read, _read_cuda), (_attn.attention_buffer, _buffer_cuda),
                       (_attn.attention_buffer_inplace, _buffer_inplace_cuda),
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
            pos=None, idx=None, ratio: int = 1, ncomp: int = 0, k_out=None, v_out=None,
            chunked: bool = False):
    """Run the partial + combine kernels: ``out`` receives the attention output; ``k_out`` /
    ``v_out`` (when given) the copied cache; ``chunked``: RING's chunk mask instead of the window."""
    from effexport.custom_ops._triton import kernels

    batch = q.shape[0]
    d, dv = k1.shape[-1], v1.shape[-1]
    s1 = k1.shape[-2]
    # BUFFER: the new row is row pos of the buffer's S1 rows, not a row past them
    s2 = 0 if k2 is None or mode == _plan.BUFFER else k2.shape[-2] if idx is None else idx.shape[-1]
    sm_count = _sm_count(q.device)
    kv_same = v1 is k1 and (v2 is k2 or k2 is None)
    # BUFFER writes one row in place: it is planned as the read-only kernel it otherwise is
    p = _plan.plan(groups, batch * kv_heads, span, d, dv, sm_count, k1.element_size(), kv_same,
                   copy=k_out is not None and mode != _plan.BUFFER)
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

    store = _plan.CONFIG["buffer_store"]
    if store not in _plan.BUFFER_STORES:
        raise ValueError(f"plan.CONFIG['buffer_store'] must be one of {_plan.BUFFER_STORES}, got {store!r}")
    store_in_loop = mode == _plan.BUFFER and store == "loop"
    pdl = bool(_plan.CONFIG["pdl"])
    pdl_launch = {"launch_pdl": True} if pdl else {}  # the dependent (combine) launch's attribute

    def partial(prec):
        kernels._partial[(batch * kv_heads * p.num_gb, p.splits)](
            q, k1, v1, k2, v2, idx_t, pos_t, ko, vo, m_buf, l_buf, acc,
            q_strides[0], q_strides[1], *_strides4(k1), *_strides4(v1), *_strides4(k2), *_strides4(v2),
            idx_t.stride(0) if idx is not None else 0, *_strides4(ko), *_strides4(vo),
            s1, s2, ncomp, d, dv, groups, kv_heads, p.num_gb, p.splits, gp,
            float(scale), float(softcap) if softcap > 0 else 1.0, int(window), int(ratio), p.chunk,
            MODE=mode, COPY=k_out is not None, KV_SAME=kv_same, DOT_F32=dot_f32, DOT_PREC=prec,
            HAS_SOFTCAP=softcap > 0, BLOCK_G=p.block_g, BLOCK_N=p.block_n, BLOCK_D=p.block_d,
            BLOCK_DV=p.block_dv, CHUNKED=chunked, DYN_CHUNK=mode in _plan.DYNAMIC and _plan.CONFIG["dynamic_chunk"],
            STORE_IN_LOOP=store_in_loop, PDL=pdl, num_warps=p.num_warps, num_stages=p.num_stages)
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
    # every split in one block when the [splits, slice] tile stays <= 4096 fp32 (32 registers a
    # thread): one round of loads (ONE_PASS); else blocks of 64 splits, two rounds per block
    block_s = _plan.next_pow2(max(p.splits, 16))
    one_pass = _plan.CONFIG["combine_one_pass"] and block_s * slice_dv <= 4096
    kernels._combine[(batch * kv_heads * groups, p.block_dv // slice_dv)](
        m_buf, l_buf, acc, q if sinks is None else sinks, out, out_strides[0], out_strides[1],
        groups, kv_heads, p.splits, gp, dv, HAS_SINK=sinks is not None,
        BLOCK_S=block_s if one_pass else min(64, block_s),
        BLOCK_DV=p.block_dv, SLICE_DV=slice_dv, ONE_PASS=one_pass, PDL=pdl, num_warps=4, **pdl_launch)
    return p


def _dense(mode: int, q, k1, v1, k2, v2, sinks, *, scale, softcap, window, span, pos=None,
           k_out=None, v_out=None, chunked: bool = False) -> torch.Tensor:
    """Attention ops' layout: q ``[B, H, 1, d]``, caches ``[B, Hkv, S, d]`` -> out ``[B, H, 1, dv]``."""
    out = q.new_empty(q.shape[0], q.shape[1], 1, v1.shape[-1])
    kv_heads = k1.shape[1]
    _launch(mode, q, k1, v1, k2, v2, kv_heads=kv_heads, groups=q.shape[1] // kv_heads,
            q_strides=(q.stride(0), q.stride(1)), out=out, out_strides=(out.stride(0), out.stride(1)),
            span=span, scale=scale, softcap=softcap, window=window, sinks=sinks, pos=pos,
            k_out=k_out, v_out=v_out, chunked=chunked)
    return out


def _prefill(q, k, v, sinks, *, scale: float, softcap: float, window: int, causal: bool,
             qadd: int = 0, kadd: int = 0, pos=None, q_dyn: bool = False, k_dyn: bool = False,
             kpos=None, chunked: bool = False) -> torch.Tensor:
    """Many-query attention (:mod:`.prefill`): q ``[B, H, T, d]`` over k / v ``[B, Hkv, S, d|dv]``
    -> out ``[B, H, T, dv]`` (q's dtype). Query i is at position ``qadd (+ pos) + i``; key rows
    ``j < len(kpos)`` at ``kpos[j]`` (< 0: empty slot), the others at ``kadd (+ pos) + j - len(kpos)``."""
    from effexport.custom_ops._triton import prefill

    q, k, v = (_last_contiguous(t) for t in (q, k, v))
    batch, heads, t_len, d = q.shape
    kv_heads, s_len, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = q.new_empty(batch, heads, t_len, dv)
    if t_len == 0 or batch * heads == 0:
        return out
    block_d, block_dv = max(16, _plan.next_pow2(d)), max(16, _plan.next_pow2(dv))
    widest = max(block_d, block_dv)
    block_m = 64 if widest <= 256 else 32
    block_n = 64 if widest <= 128 else 32
    tile_bytes = block_n * (block_d + block_dv) * k.element_size()
    num_stages = 2 if 2 * tile_bytes <= _plan.CONFIG["smem_budget"] else 1
    dot_f32 = not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float16))
    prec = _MIXED_PREC[0] if dot_f32 and k.element_size() == 2 and v.element_size() == 2 else "ieee"
    pos_t = q if pos is None else pos.to(q.device)  # dummy pointers when unused
    kpos_t = q if kpos is None else kpos
    grid = (-(-t_len // block_m), batch * heads)
    prefill._prefill[grid](
        q, k, v, out, kpos_t, pos_t, q if sinks is None else sinks,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        t_len, s_len, 0 if kpos is None else kpos.shape[0], d, dv, heads, heads // kv_heads,
        int(qadd), int(kadd), float(scale), float(softcap) if softcap > 0 else 1.0, int(window),
        CAUSAL=causal, Q_DYN=q_dyn, K_DYN=k_dyn, HAS_SINK=sinks is not None,
        HAS_SOFTCAP=softcap > 0, DOT_F32=dot_f32, DOT_PREC=prec, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, CHUNKED=chunked,
        num_warps=4 if widest <= 128 else 8, num_stages=num_stages)
    return out


# ----------------------------------------------------------------------------- op kernels (cuda)
def _attention_cuda(q, k, v, sinks=None, *, scale, causal=True, window=0, softcap=0.0):
    if not _fast(q, k, v, sinks) or (not causal and window != 0) or (causal and q.shape[2] > k.shape[2]):
        return _attn.attention._init_fn(q, k, v, sinks, scale=scale, causal=causal, window=window,
                                        softcap=softcap)  # raises the reference's errors
    _attn._check_qkv(q, k, v, sinks, "attention")
    _attn._check_window(window, softcap, "attention")
    return _prefill(q, k, v, sinks, scale=scale, softcap=softcap, window=window, causal=causal,
                    qadd=k.shape[2] - q.shape[2])


def _cache_cuda(q, k_new, v_new, k_past, v_past, sinks=None, *, scale, window=0, softcap=0.0):
    if not _fast(q, k_new, v_new, k_past, v_past, sinks):
        return _attn.attention_cache._init_fn(q, k_new, v_new, k_past, v_past, sinks, scale=scale,
                                              window=window, softcap=softcap)
    _attn._check_qkv(q, k_new, v_new, sinks, "attention_cache")
    _attn._check_qkv(q, k_past, v_past, None, "attention_cache (past)")
    _attn._check_new(q, k_new, k_past, v_new, v_past, "attention_cache")
    _attn._check_window(window, softcap, "attention_cache")
    if q.shape[2] != 1:  # prefill (and T == 0, an empty call)
        k_present, v_present = torch.cat([k_past, k_new], 2), torch.cat([v_past, v_new], 2)
        out = _prefill(q, k_present, v_present, sinks, scale=scale, softcap=softcap, window=window,
                       causal=True, qadd=k_past.shape[2])
        return out, k_present, v_present
    q, k_new, v_new = (_last_contiguous(t) for t in (q, k_new, v_new))
    k_past, v_past = _last_contiguous(k_past), _last_contiguous(v_past)
    b, hkv, p, d = k_past.shape
    k_present = k_past.new_empty(b, hkv, p + 1, d)
    v_present = v_past.new_empty(b, hkv, p + 1, v_past.shape[-1])
    out = _dense(_plan.CACHE, q, k_past, v_past, k_new, v_new, sinks, scale=scale, softcap=softcap,
                 window=window, span=p + 1, k_out=k_present, v_out=v_present)
    return out, k_present, v_present


def _ring_cuda(q, k_new, v_new, k_ring, v_ring, pos, sinks=None, *, scale, window, softcap=0.0,
               chunked=False):
    if not _fast(q, k_new, v_new, k_ring, v_ring, sinks):
        return _attn.attention_ring._init_fn(q, k_new, v_new, k_ring, v_ring, pos, sinks,
                                             scale=scale, window=window, softcap=softcap,
                                             chunked=chunked)
    _attn._check_qkv(q, k_new, v_new, sinks, "attention_ring")
    _attn._check_qkv(q, k_ring, v_ring, None, "attention_ring (ring)")
    _attn._check_new(q, k_new, k_ring, v_new, v_ring, "attention_ring")
    check_pos(pos, "attention_ring")
    _attn._check_window(window, softcap, "attention_ring")
    slots = k_ring.shape[2]
    if window == 0 or slots != window:
        raise ValueError(f"attention_ring: the ring must have exactly window={window} > 0 slots, "
                         f"got {slots}")
    if q.shape[2] != 1:  # [old ring slots (stored positions), new tokens at pos..]: the reference's keys
        pos = pos.to(q.device)
        keys, values = torch.cat([k_ring, k_new], 2), torch.cat([v_ring, v_new], 2)
        out = _prefill(q, keys, values, sinks, scale=scale, softcap=softcap, window=window,
                       causal=True, pos=pos, q_dyn=True, k_dyn=True,
                       kpos=_attn._ring_positions(pos - 1, slots, q.device), chunked=chunked)
        return (out, *_attn._ring_written(keys, values, pos, slots, q.shape[2]))
    q, k_new, v_new = (_last_contiguous(t) for t in (q, k_new, v_new))
    k_ring, v_ring = _last_contiguous(k_ring), _last_contiguous(v_ring)
    k_out, v_out = torch.empty_like(k_ring), torch.empty_like(v_ring)
    out = _dense(_plan.RING, q, k_ring, v_ring, k_new, v_new, sinks, scale=scale, softcap=softcap,
                 window=window, span=slots + 1, pos=pos, k_out=k_out, v_out=v_out, chunked=chunked)
    return out, k_out, v_out


def _read_cuda(q, k_cache, v_cache, pos, sinks=None, *, scale, window=0, softcap=0.0, ring=False):
    s_len = k_cache.shape[2]
    if (not _fast(q, k_cache, v_cache, sinks) or (ring and not 0 < window <= s_len)
            or (ring and q.shape[2] != 1)):
        return _attn.attention_read._init_fn(q, k_cache, v_cache, pos, sinks, scale=scale,
                                             window=window, softcap=softcap, ring=ring)
    _attn._check_qkv(q, k_cache, v_cache, sinks, "attention_read")
    check_pos(pos, "attention_read")
    _attn._check_window(window, softcap, "attention_read")
    if q.shape[2] != 1:  # full cache: entry j is position j, queries at pos..pos+T-1
        return _prefill(q, k_cache, v_cache, sinks, scale=scale, softcap=softcap, window=window,
                        causal=True, pos=pos, q_dyn=True)
    q, k_cache, v_cache = (_last_contiguous(t) for t in (q, k_cache, v_cache))
    span = s_len if ring or window == 0 else min(s_len, window)
    return _dense(_plan.READ_RING if ring else _plan.READ, q, k_cache, v_cache, None, None, sinks,
                  scale=scale, softcap=softcap, window=window, span=span, pos=pos)


def _buffer_inplace_cuda(q, k_new, v_new, k_buf, v_buf, pos, sinks=None, *, scale, window=0, softcap=0.0):
    """In place: one token writes its row from the pass that reads rows ``0..pos`` (``BUFFER``
    mode); T > 1 writes the rows (``index_copy_``) and runs the prefill kernel over the buffer.
    Buffers the kernels cannot address in place (last dim strided) run the reference."""
    if not _fast(q, k_new, v_new, k_buf, v_buf, sinks) or k_buf.stride(-1) != 1 or v_buf.stride(-1) != 1:
        return _attn.attention_buffer_inplace._init_fn(q, k_new, v_new, k_buf, v_buf, pos, sinks, scale=scale,
                                                       window=window, softcap=softcap)
    what = "attention_buffer_inplace"
    _attn._check_buffer(q, k_new, v_new, k_buf, v_buf, pos, sinks, what)
    _attn._check_window(window, softcap, what)
    t_len, capacity = q.shape[2], k_buf.shape[2]
    pos = pos.to(q.device)
    _attn._check_fits(pos, t_len, capacity, what)
    if t_len != 1:  # prefill (and T == 0, an empty call): rows written, then queries at pos..pos+T-1
        rows = pos + torch.arange(t_len, device=q.device)
        k_buf.index_copy_(2, rows, k_new)
        v_buf.index_copy_(2, rows, v_new)
        return _prefill(q, k_buf, v_buf, sinks, scale=scale, softcap=softcap, window=window,
                        causal=True, pos=pos, q_dyn=True)
    q, k_new, v_new = (_last_contiguous(t) for t in (q, k_new, v_new))
    span = capacity if window == 0 else min(capacity, window)
    return _dense(_plan.BUFFER, q, k_buf, v_buf, k_new, v_new, sinks, scale=scale, softcap=softcap,
                  window=window, span=span, pos=pos, k_out=k_buf, v_out=v_buf)


def _buffer_cuda(q, k_new, v_new, k_buf, v_buf, pos, sinks=None, *, scale, window=0, softcap=0.0):
    """The functional op: copies of the buffers (``clone``, at copy bandwidth), updated in place
    by :func:`_buffer_inplace_cuda` -- every row the reference returns, bit for bit."""
    if not _fast(q, k_new, v_new, k_buf, v_buf, sinks):
        return _attn.attention_buffer._init_fn(q, k_new, v_new, k_buf, v_buf, pos, sinks, scale=scale,
                                               window=window, softcap=softcap)
    _attn._check_buffer(q, k_new, v_new, k_buf, v_buf, pos, sinks, "attention_buffer")
    k_out = k_buf.clone(memory_format=torch.contiguous_format)
    v_out = v_buf.clone(memory_format=torch.contiguous_format)
    out = _buffer_inplace_cuda(q, k_new, v_new, k_out, v_out, pos, sinks, scale=scale, window=window,
                               softcap=softcap)
    return out, k_out, v_out


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


def _cca_cuda(q_down, k_down, v_cur, v_del_src, conv0_weight, conv1_weight, temperature, cos, sin,
              conv_state, shift_state, conv0_bias=None, conv1_bias=None):
    """One decode token (T == 1): the fused kernel (:mod:`.cca`) for q, k and the conv state; the
    value shift is two small copies. Other calls run the reference."""
    from effexport.custom_ops._triton import cca

    same = [q_down, k_down, v_cur, v_del_src, conv0_weight, conv1_weight, conv_state, shift_state] + [
        t for t in (conv0_bias, conv1_bias) if t is not None]  # one dtype; tables and temperature any float
    hq, hk, d, p = _cca._dims(q_down, temperature, conv1_weight, conv_state)
    fast = (q_down.dim() == 3 and q_down.shape[1] == 1 and cos.shape[0] == 1 and p >= 1
            and all(t.is_cuda and t.device == q_down.device for t in same + [temperature, cos, sin])
            and all(t.dtype == q_down.dtype for t in same)
            and all(t.dtype in _DTYPES for t in (q_down, temperature, cos, sin))
            and cos.shape[-1] % 2 == 0 and cos.shape[-1] <= d <= 512
            and conv0_weight.shape[-1] - 1 + conv1_weight.shape[-1] - 1 == p and hq % hk == 0)
    if not fast:
        return _cca.cca._init_fn(q_down, k_down, v_cur, v_del_src, conv0_weight, conv1_weight, temperature,
                                 cos, sin, conv_state, shift_state, conv0_bias, conv1_bias)
    b = q_down.shape[0]
    k0, k1, rot = conv0_weight.shape[-1], conv1_weight.shape[-1], cos.shape[-1]
    x = torch.cat([q_down[:, 0], k_down[:, 0]], dim=-1)  # [B, C]: the new token's pre-conv column
    state = conv_state.contiguous()
    q = q_down.new_empty(b, hq, 1, d)
    k = q_down.new_empty(b, hk, 1, d)
    state_out = torch.empty_like(state)
    cca._cca_decode[(b, hq + hk)](
        x, state, conv0_weight.contiguous(), x if conv0_bias is None else conv0_bias,
        conv1_weight.contiguous(), x if conv1_bias is None else conv1_bias, temperature,
        cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous(), q, k, state_out,
        x.stride(0), state.stride(0), state.stride(1), state_out.stride(0), state_out.stride(1),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        hq, hq // hk, d, k0, k1, p, rot, float(torch.finfo(q_down.dtype).eps),
        HAS_B0=conv0_bias is not None, HAS_B1=conv1_bias is not None,
        BLOCK_IK=max(16, _plan.next_pow2(d * k1)), BLOCK_R=max(16, _plan.next_pow2(max(rot // 2, 1))),
        BLOCK_C=max(16, _plan.next_pow2(max(d - rot, 1))), BLOCK_D=max(16, _plan.next_pow2(d)),
        BLOCK_P=max(2, _plan.next_pow2(p)), num_warps=4)
    # (4) value shift for one token: v = concat(v_cur, shift_state) as Hk heads of d
    v = torch.cat([v_cur[:, 0], shift_state], dim=-1).view(b, hk, 1, d)
    return q, k, v, state_out, v_del_src[:, -1].clone()


# ------------------------------------------------------------------------------------------- mHC
_MHC_MAX_N = 32  # streams: a token's [n, n] matrix in one program's registers


def _sinkhorn_cuda(logits, *, iters, eps):
    """All tokens' Sinkhorn in one launch (:mod:`.mhc`), after the reference's checks (its errors for
    bad shapes / iters). The reference runs for CPU tensors, other dtypes, ``n > 32`` and empty inputs."""
    from effexport.custom_ops._triton import mhc

    _mhc._check_square(logits)
    _mhc._check_iters(iters)
    n = logits.shape[-1]
    if not (logits.is_cuda and logits.dtype in _DTYPES and 1 <= n <= _MHC_MAX_N and logits.numel() > 0):
        return _mhc.sinkhorn._init_fn(logits, iters=iters, eps=eps)
    src = logits.contiguous()
    out = torch.empty_like(src)
    ntok = src.numel() // (n * n)
    block_n = max(2, _plan.next_pow2(n))
    block_t = max(1, min(64, 1024 // (block_n * block_n)))
    mhc._sinkhorn[(-(-ntok // block_t),)](src, out, ntok, n, iters, float(eps),
                                          BLOCK_T=block_t, BLOCK_N=block_n, num_warps=4)
    return out


def _mhc_pre_cuda(x, fn, base, scale, *, iters=20, eps=1e-6, norm_eps=1e-6):
    """``mhc_pre`` in two launches (three for a non-fp32 X: its fp32 copy): the cuBLAS projection
    ``vec(X) fn^T`` and the fused kernel (:mod:`.mhc`), after the reference's checks (its errors for
    bad shapes / iters). The reference runs for CPU tensors, tensors on several devices, other dtypes,
    ``n > 32`` and empty inputs."""
    from effexport.custom_ops._triton import mhc

    n, d = _mhc._check_x(x, "mhc_pre")
    _mhc._check_params("mhc_pre", fn, base, scale, 2 * n + n * n, n * d, 3)
    _mhc._check_iters(iters)
    params = (fn, base, scale)
    fast = (1 <= n <= _MHC_MAX_N and x.numel() > 0
            and all(t.is_cuda and t.device == x.device for t in (x,) + params)
            and all(t.dtype in _DTYPES for t in (x,) + params))
    if not fast:
        return _mhc.mhc_pre._init_fn(x, fn, base, scale, iters=iters, eps=eps, norm_eps=norm_eps)
    b, t = x.shape[0], x.shape[1]
    xf = x.reshape(b * t, n * d).float().contiguous()             # [N, n*d] fp32 (a copy for bf16)
    mu = torch.nn.functional.linear(xf, fn.float()).contiguous()  # [N, 2n + n*n]
    u = x.new_empty((b, t, d))
    post = x.new_empty((b, t, n), dtype=torch.float32)
    comb = x.new_empty((b, t, n, n), dtype=torch.float32)
    block_n = max(2, _plan.next_pow2(n))
    block_d = max(16, min(_plan.next_pow2(d), 4096 // block_n))
    mhc._mhc_pre[(b * t,)](xf, mu, base.contiguous(), scale.contiguous(), u, post, comb, n, d, iters,
                           float(eps), float(norm_eps), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    return u, post, comb
