"""ONNX lowering of the attention ops (``effexport::attention``, ``attention_cache``,
``attention_ring``, ``attention_read``) for the ``ort`` and ``standard`` profiles.

``ort`` (ONNX Runtime contrib ops):

* ``attention`` (causal), ``attention_cache`` and ``attention_read`` over a full cache become one
  ``com.microsoft::GroupQueryAttention``: the keys are split into a "past" (positions ``< pos``)
  and the "new" rows, ``seqlens_k = total - 1``, ``total_sequence_length = total``, a window W as
  ``local_window_size = W`` (measured on the CPU EP of ORT 1.30 and 1.32: ``local_window_size = L``
  lets a query see L keys including itself, the ops' convention), softcap as its attribute, sinks
  as ``head_sink``. GQA needs ``d == dv``, a non-zero scale, ``d`` a multiple of 8 and ``d <= 256``
  (above, ORT's CUDA kernel is slow: :data:`GQA_MAX_HEAD_DIM`); otherwise, and for bidirectional attention, the
  decomposition below is used.
* ``attention_ring`` (sliding) where GQA takes the head size (unless :data:`WINDOW_CACHE_ENV` is
  ``0``): one GroupQueryAttention with ``sliding_window_cache = 1`` over a W-row cache in GQA's windowed layout (newest positions in
  order from row 0: :func:`attend_gqa_window`), which ``attention_read(ring=True)`` then reads by
  that layout's positions. Chunked rings (``chunked=True``: the mask ``q - k <= q mod C``) and other
  head sizes keep the eager op's ring (slot ``p mod W``) and the decomposition.
* ``attention_buffer`` (the fixed-capacity full cache) becomes one GroupQueryAttention in its
  shared-buffer form: ``past_key`` is the whole ``[B, Hkv, C, d]`` buffer, ``seqlens_k = pos + T - 1``
  and ``total_sequence_length = pos + T`` come from ``pos``, and ``present_key`` has the buffer's
  shape, so a runtime that binds past and present to one device buffer gets the new rows written in
  place (ORT compares the two pointers); unbound, ORT copies the first ``pos`` rows into a new
  present. Heads GQA does not take use a ``Gather`` write over ``[buffer | new]`` and the
  decomposition over rows ``0..pos+T-1``.

``standard`` (ai.onnx only): ``Attention`` (opset 23) with a boolean ``attn_mask`` computed from
positions when there is neither a softcap (ONNX applies the mask before the softcap, which would
let masked keys back in) nor sinks (no such input); otherwise MatMul/Softmax in fp32.

Both profiles compute masks in the graph from ``pos`` and shapes (never a dense constant) and
write a ring with a ``Gather`` over ``[ring | new]`` (slot ``p mod W`` takes the newest position),
the eager reference's own formula, so ``T > W`` chunks are exact too.

Known ORT limitation: the CPU GroupQueryAttention rejects ``T > 1`` new tokens on a non-empty
past at batch > 1 ("batch_size must be 1 when sequence_length > 1 and past context is given"), so
with the ``ort`` profile a chunked prefill runs at batch 1; prefill from an empty cache and
one-token decode run at any batch.

Not covered: padding masks or per-row lengths (the ops do not have them), GQA's quantized-cache
features. GQA's rotary and Q / K norm inputs are not emitted here: the step fusions move a rotation
and (CUDA only) the per-head norms into the attention afterwards (:mod:`.ort_rotary`, :mod:`.ort_cuda`).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import NamedTuple

import numpy as np
import onnx_ir as ir
import onnxscript
from onnxscript import opset18 as op
from onnxscript import opset23 as op23

from effexport.exporter.backends.onnx import _build as b
from effexport.exporter.backends.onnx._schemas import MSFT_DOMAIN, ensure_gqa_schema, ensure_mha_schema
from effexport.exporter.backends.onnx.profiles import PROFILES

__all__ = ["TRANSLATIONS", "attend_decomposed", "attend_mha_prefix", "one_token_graph", "slot_rings"]

ensure_gqa_schema()
ensure_mha_schema()
msft = onnxscript.values.Opset(MSFT_DOMAIN, 1)


# ------------------------------------------------------------------------------- computations
class Dims(NamedTuple):
    """Static sizes of one attention call, read from the op's graph inputs (intermediate values
    carry no shapes while a translation is being recorded)."""

    heads: int
    kv_heads: int
    d: int
    dv: int

    @staticmethod
    def of(q, k, v) -> "Dims":
        return Dims(b.static_dim(q, 1, "attention"), b.static_dim(k, 1, "attention"),
                    b.static_dim(q, 3, "attention"), b.static_dim(v, 3, "attention"))


def attend_decomposed(q, k, v, mask, sinks, scale: float, softcap: float, dims: Dims):
    """``softmax(cap(q k^T * scale) + mask [, sink]) v`` with GQA by head grouping.

    q ``[B, H, T, d]``, k ``[B, Hkv, S, d]``, v ``[B, Hkv, S, dv]``, mask bool ``[T, S]`` or None,
    sinks ``[H]`` or None -> ``[B, H, T, dv]`` in q's dtype.

    The ``G = H / Hkv`` query heads of a KV head are one matrix ``[B, Hkv, G*T, d]``, so each product
    is one batched GEMM of ``B*Hkv`` matrices with ``G*T`` rows that reads K and V once (a broadcast
    over G instead makes ONNX Runtime's CUDA MatMul run ``B*H`` single-row GEMVs). The products run
    in q's dtype: fp32 in fp32 builds; in bf16 / fp16 builds the half-precision GEMM (fp32
    accumulation in cuBLAS and ORT's CPU kernels) with its scores rounded to q's dtype -- what
    Hugging Face's eager attention computes -- instead of upcasting K and V, which multiplies the
    bytes the step moves by five. Scale, softcap, mask, sinks and softmax are fp32, except where
    there is nothing to compute but the mask and the softmax (:func:`_attend_plain`)."""
    heads, kv_heads, d, dv = dims
    groups = heads // kv_heads
    out_dtype = b.dtype_of(q)
    work = out_dtype if out_dtype is not None and out_dtype == b.dtype_of(k) == b.dtype_of(v) else b.FLOAT
    if work == b.FLOAT:  # fp32 builds; mixed (e.g. fp32 states beside bf16 queries) or unknown types
        q, k, v = b.to_float(q), b.to_float(k), b.to_float(v)
    qg = op.Reshape(q, b.ints([0, kv_heads, -1, d]))  # [B, Hkv, G*T, d]: row g*T + t
    scores = op.MatMul(qg, op.Transpose(k, perm=[0, 1, 3, 2]))  # [B, Hkv, G*T, S]
    if scale == 1.0 and softcap <= 0.0 and sinks is None:
        return _attend_plain(scores, v, mask, groups, heads, dv, work)
    scores = b.to_float(scores)
    if scale != 1.0:
        scores = op.Mul(scores, b.f32c(scale))
    if softcap > 0.0:
        scores = op.Mul(op.Tanh(op.Div(scores, b.f32c(softcap))), b.f32c(softcap))
    if mask is not None:  # [T, S] repeated for the G heads of the rows: [G*T, S], shared by every layer
        scores = op.Where(_grouped_mask(mask, groups, k), scores, b.f32c(-math.inf))
    if sinks is not None:  # head h = kv * G + g's sink on each of its T rows: [B, Hkv, G*T, 1]
        sink = op.Reshape(b.to_float(sinks), b.ints([1, kv_heads, groups, 1, 1]))
        sink = op.Expand(sink, op.Concat(b.ints([1, kv_heads, groups]), op.Shape(q, start=2, end=3), b.ints([1]),
                                         axis=0))
        sink = op.Expand(op.Reshape(sink, b.ints([1, kv_heads, -1, 1])),
                         op.Concat(op.Shape(scores, end=3), b.ints([1]), axis=0))
        probs = op.Softmax(op.Concat(scores, sink, axis=-1), axis=-1)
        probs = op.Slice(probs, b.ints([0]), b.ints([-1]), b.ints([-1]))  # the sink's column goes
    else:
        probs = op.Softmax(scores, axis=-1)
    out = op.MatMul(b.cast_like(probs, work), v)  # [B, Hkv, G*T, dv]
    out = op.Reshape(out, b.ints([0, heads, -1, dv]))
    return out if out_dtype in (None, work) else op.Cast(out, to=out_dtype)


def _grouped_mask(mask, groups: int, k):
    """The ``[T, S]`` mask repeated for the ``G`` query heads of each KV head: ``[G*T, S]`` (the rows of
    the grouped scores); one value every layer with these sizes shares."""
    if groups == 1:
        return mask
    return op.Reshape(op.Expand(op.Unsqueeze(mask, b.ints([0])), b.ints([groups, 1, 1])),
                      op.Concat(b.ints([-1]), op.Shape(k, start=2, end=3), axis=0))


def _attend_plain(scores, v, mask, groups: int, heads: int, dv: int, work):
    """The tail of :func:`attend_decomposed` where there is nothing to compute but the mask and the
    softmax (scale 1, no softcap, no sinks: Gemma 4), in the products' dtype ``work``: the mask as an
    additive ``0 / -inf`` bias (one value every layer shares, made once), ``Softmax`` on the scores
    and its output straight into the second product -- MatMul, Add, Softmax, MatMul, in fp32 and in
    half-precision builds alike (so a bf16 graph has its fp32 twin's structure). The same numbers as
    masking with ``Where`` and a softmax in fp32: the scores are already rounded to ``work`` by the
    product, adding 0 or -inf rounds nothing, and ONNX Runtime's half-precision softmax accumulates
    in fp32 and rounds its output once, as a Cast back of the fp32 softmax did. In half precision
    that is two Casts fewer per layer and half the bytes of scores; an additive mask because ONNX
    Runtime's CUDA ``Where`` has no bf16 kernel (int32 / int64 / float / float16 only, onnxruntime
    1.31 ``cuda/tensor/where.cc``)."""
    if mask is not None:
        bias = b.cast_like(op.Where(mask, b.f32c(0.0), b.f32c(-math.inf)), work)
        scores = op.Add(scores, _grouped_mask(bias, groups, v))
    out = op.MatMul(op.Softmax(scores, axis=-1), v)  # [B, Hkv, G*T, dv]
    return op.Reshape(out, b.ints([0, heads, -1, dv]))


def _attend_standard(q, k, v, mask, sinks, scale: float, softcap: float, dims: Dims):
    """ai.onnx ``Attention`` (opset 23) where it is exact, else :func:`attend_decomposed`."""
    if sinks is not None or softcap > 0.0:
        return attend_decomposed(q, k, v, mask, sinks, scale, softcap, dims)
    outputs = op23.Attention(q, k, v, mask, scale=float(scale))  # (Y, present_k, present_v, qk)
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


GQA_MAX_HEAD_DIM = 256
"""Largest head size the ``ort`` profile hands to GroupQueryAttention. ONNX Runtime's CUDA GQA runs
FlashAttention only up to head size 256; above it falls back to its cutlass memory-efficient kernel
plus an ``Ungroup`` of the KV heads, measured on the H200 (ORT 1.31.1, Gemma 4 E2B's head size 512,
bf16, B=1): 21.4 ms for the 7 full-layer calls at 32K context (3 ms to read 64 MB: ~21 GB/s) + 2.3 ms
``Ungroup``, 24 of the step's 30 ms of GPU time (BENCHMARKS.md, run 9). The decomposition (bf16
products, fp32 softmax, one batched GEMM per KV head) reads the same cache at bandwidth. Run 27
measured every candidate ORT offers for head size 512 on one decode token (``bench/ort_attention.py``):
GroupQueryAttention and ONNX ``Attention`` (opset 24, ``nonpad_kv_seqlen``) 10-30x the decomposition,
``MultiHeadAttention`` over the buffer 5-13% faster than it (a candidate not taken yet)."""


GQA_HEAD_DIM_MULTIPLE = 8
"""ONNX Runtime's GroupQueryAttention refuses other head sizes at run time ("head_size must be a
multiple of 8"): those take the decomposition."""


def _gqa_fits(dims: Dims, scale: float) -> bool:
    return (dims.d == dims.dv and scale != 0.0 and dims.d <= GQA_MAX_HEAD_DIM
            and dims.d % GQA_HEAD_DIM_MULTIPLE == 0)


def _heads_last(x):
    """``[B, H, T, d] -> [B, T, H*d]`` (GQA's layout)."""
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), b.ints([0, 0, -1]))


def attend_gqa(q, k_past, v_past, k_new, v_new, sinks, scale: float, window: int, softcap: float,
               dims: Dims, lengths=None):
    """``com.microsoft::GroupQueryAttention`` of the new queries over ``[past | new]``.

    q ``[B, H, T, d]``, k/v_past ``[B, Hkv, P, d]`` (positions ``0..P-1``), k/v_new ``[B, Hkv, T, d]``
    -> ``(out [B, H, T, d], k_present, v_present)`` with ``present = cat(past, new)``. ``lengths``
    (``seqlens_k``, ``total_sequence_length``) default to ``P + T``; a shared buffer passes them from
    ``pos`` (:func:`_gqa_lengths`), and its present then has the buffer's shape."""
    heads, kv_heads, _, dv = dims
    if lengths is None:
        lengths = _gqa_lengths(b.dim(k_past, 2), b.dim(q, 2), q)
    out, k_present, v_present = msft.GroupQueryAttention(
        _heads_last(q), _heads_last(k_new), _heads_last(v_new), k_past, v_past, *lengths,
        head_sink=sinks, num_heads=heads, kv_num_heads=kv_heads, scale=float(scale),
        softcap=float(softcap), local_window_size=window if window > 0 else -1)
    out = op.Transpose(op.Reshape(out, b.ints([0, 0, heads, dv])), perm=[0, 2, 1, 3])
    return out, k_present, v_present


def _gqa_lengths(past_len, t_len, batch_of):
    """GQA's ``seqlens_k`` (``[B]`` int32, ``P + T - 1``) and ``total_sequence_length`` (0-d int32,
    ``P + T``) for a past of ``past_len`` rows and ``t_len`` new ones (both 0-d int64 from shapes;
    batch from ``batch_of``'s dim 0). ``seqlens_k`` is read on the device: :func:`~._build.on_device`."""
    total = op.Add(past_len, t_len)  # on the host: total_sequence_length is a CPU input of GQA
    return _seqlens(b.on_device(op.Sub(total, b.i64(1))), batch_of), op.Cast(total, to=6)


def _seqlens(last, batch_of):
    """``[B]`` int32 copies of the device scalar ``last`` (GQA's ``seqlens_k``)."""
    return op.Cast(op.Expand(op.Reshape(last, b.ints([1])), op.Shape(batch_of, start=0, end=1)), to=6)


def _buffer_lengths(pos, t_len, capacity: int | None, batch_of):
    """GQA's lengths over a shared buffer of ``capacity`` rows (or a windowed cache of that many) for
    queries at ``pos..pos+T-1``.

    ``seqlens_k = pos + T - 1`` is computed on the device from ``pos``. ``total_sequence_length``
    is read on the host and tells ORT a prompt from a decode step: a one-token step gets the
    capacity (an upper bound, constant, so a captured CUDA graph stays valid whatever ``pos``),
    a chunk gets ``pos + T`` (``pos + T == T`` marks the first prompt, which ORT runs batched).
    ``capacity`` None (a windowed cache in an artifact whose positions nothing bounds: no CUDA graph
    replays it) passes ``pos + T`` for every step. That ``pos`` is the step's host copy:
    :mod:`.host_positions` points it at ``pos_host``.

    Where ``T`` is static 1 (a graph of one-token steps), the total is an int32 initializer, computed
    by no node. Computed from ``pos_host`` and constants only, its nodes would run on the GPU: ONNX
    Runtime's CUDA EP keeps a node on the host only where it reads the host output of another node
    (``GetCpuPreferredNodes``: ``Shape`` starts such chains; a graph input does not), so it copied
    ``pos_host`` to the device, computed the total there and copied it back by a ``MemcpyToHost``
    node in front of GroupQueryAttention's host input, which the kernel read wrong (the one-op test
    graph's 1.50: the new row not written at ``pos``, other rows overwritten). With ``T`` dynamic the
    chain reads ``T`` from a ``Shape`` and stays on the host (:func:`.cuda_kernels.memcpy_edges`
    simulates that partitioning; tests/test_kv_buffer.py checks both forms with it)."""
    seqlens = _seqlens(b.plus(pos, op.Sub(t_len, b.i64(1))), batch_of)
    if b.known_dim(batch_of, 2) == 1:
        bound = WINDOW_TOTAL_UNBOUNDED if capacity is None else capacity
        return seqlens, op.Constant(value=ir.tensor(np.array(bound, dtype=np.int32)))
    if capacity is None:
        return seqlens, op.Cast(op.Add(pos, t_len), to=6)
    total = op.Where(op.Equal(t_len, b.i64(1)), b.i64(capacity), op.Add(pos, t_len))
    return seqlens, op.Cast(total, to=6)


def _split_at(x, cut):
    """``x[:, :, :cut]`` and ``x[:, :, cut:]`` (``cut`` a 1-d int64 of one element)."""
    return (op.Slice(x, b.ints([0]), cut, b.ints([2])),
            op.Slice(x, cut, b.ints([2 ** 62]), b.ints([2])))


_ONE_TOKEN = contextvars.ContextVar("effexport_one_token_graph", default=False)


@contextlib.contextmanager
def one_token_graph():
    """Lower the translations inside the block for the one-token decode graph
    (``export.export_steps(decode_path=...)``): prefix reads become MultiHeadAttention
    (:func:`_one_token_mha`). Other lowerings keep the general forms even where T happens to be 1."""
    token = _ONE_TOKEN.set(True)
    try:
        yield
    finally:
        _ONE_TOKEN.reset(token)


def _one_token_mha(profile: str, q, k, v, sinks, scale: float, softcap: float, dims: Dims) -> bool:
    """Whether a read of a cache whose valid rows are a prefix lowers to one MultiHeadAttention
    (:func:`attend_mha_prefix`): the ``ort`` profile, the decode graph (:func:`one_token_graph`, with
    ``T`` static 1), no sinks or softcap (MHA has neither), a non-zero scale (MHA reads 0 as
    ``1/sqrt(d)``), ``d == dv`` and one dtype for q, k and v."""
    dtype = b.dtype_of(q)
    return (PROFILES[profile].gqa and _ONE_TOKEN.get() and b.known_dim(q, 2) == 1 and sinks is None
            and softcap == 0.0
            and scale != 0.0 and dims.d == dims.dv and dtype is not None and dtype == b.dtype_of(k) == b.dtype_of(v))


def attend_mha_prefix(q, k, v, count, scale: float, dims: Dims):
    """One query token per row over the first ``count`` rows of a cache, one
    ``com.microsoft::MultiHeadAttention``: the measured recipe of ``bench/ort_attention.py``
    (``consumer_mha_window`` over a window, ``mha`` over a buffer; 2-4x less GPU time than the
    decomposition for a KV-sharing consumer, one node instead of ~10).

    q ``[B, H, 1, d]``, k / v ``[B, Hkv, S, d]`` (BNSH: the cache itself, no copy), ``count`` a 0-d
    int64 on the device (``<= S``; the same for every batch row: the rows share ``pos``) ->
    ``[B, H, 1, d]``. MHA has no KV-head grouping, so the ``G = H / Hkv`` query heads of a KV head are
    its query sequence (``query [B, G, Hkv*d]``, ``num_heads = Hkv``, not causal); rows ``>= count``
    are hidden by ``key_padding_mask = count`` per batch row (int32 ``[B]``: right padding). Exact for
    one new token only: a chunk's earlier queries would see its later keys."""
    heads, kv_heads, d, dv = dims
    groups = heads // kv_heads
    if kv_heads == 1:
        query = op.Reshape(q, b.ints([0, heads, d]))  # [B, H, 1, d] is [B, G, 1*d]
    else:
        query = op.Reshape(op.Transpose(op.Reshape(q, b.ints([0, kv_heads, groups, d])), perm=[0, 2, 1, 3]),
                           b.ints([0, groups, kv_heads * d]))
    padding = _seqlens(count, q)  # int32 [B]
    out = msft.MultiHeadAttention(query, k, v, None, padding, num_heads=kv_heads, scale=float(scale),
                                  unidirectional=0)  # [B, G, Hkv*dv]
    if kv_heads == 1:
        return op.Reshape(out, b.ints([0, heads, 1, dv]))
    out = op.Transpose(op.Reshape(out, b.ints([0, groups, kv_heads, dv])), perm=[0, 2, 1, 3])
    return op.Reshape(out, b.ints([0, heads, 1, dv]))


def _positions_causal(q, k):
    """Query positions ``S-T..S-1`` and key positions ``0..S-1`` of a causal prefill."""
    s_len, t_len = b.dim(k, 2), b.dim(q, 2)
    k_pos = b.arange(b.i64(0), s_len)
    return b.arange(op.Sub(s_len, t_len), t_len), k_pos


# --------------------------------------------------------------------------------- attention
def _attention(q, k, v, sinks, scale, causal, window, softcap, profile):
    dims = Dims.of(q, k, v)
    if not causal:
        attend = _attend_standard if PROFILES[profile].attention23 else attend_decomposed
        return attend(q, k, v, None, sinks, scale, softcap, dims)
    if PROFILES[profile].gqa and _gqa_fits(dims, scale):
        k_past, k_new = _split_at(k, op.Sub(op.Shape(k, start=2, end=3), op.Shape(q, start=2, end=3)))
        v_past, v_new = _split_at(v, op.Sub(op.Shape(v, start=2, end=3), op.Shape(q, start=2, end=3)))
        return attend_gqa(q, k_past, v_past, k_new, v_new, sinks, scale, window, softcap, dims)[0]
    q_pos, k_pos = _positions_causal(q, k)
    attend = _attend_standard if PROFILES[profile].attention23 else attend_decomposed
    return attend(q, k, v, b.visible(q_pos, k_pos, window), sinks, scale, softcap, dims)


def attention_ort(q, k, v, sinks=None, scale: float = 1.0, causal: bool = True, window: int = 0,
                  softcap: float = 0.0):
    """``effexport::attention``, ``ort`` profile."""
    return _attention(q, k, v, sinks, scale, causal, window, softcap, "ort")


def attention_standard(q, k, v, sinks=None, scale: float = 1.0, causal: bool = True, window: int = 0,
                       softcap: float = 0.0):
    """``effexport::attention``, ``standard`` profile."""
    return _attention(q, k, v, sinks, scale, causal, window, softcap, "standard")


# --------------------------------------------------------------------------- attention_cache
def _attention_cache(q, k_new, v_new, k_past, v_past, sinks, scale, window, softcap, profile):
    dims = Dims.of(q, k_new, v_new)
    if PROFILES[profile].gqa and _gqa_fits(dims, scale):
        return attend_gqa(q, k_past, v_past, k_new, v_new, sinks, scale, window, softcap, dims)
    k_present = op.Concat(k_past, k_new, axis=2)
    v_present = op.Concat(v_past, v_new, axis=2)
    q_pos, k_pos = _positions_causal(q, k_present)
    attend = _attend_standard if PROFILES[profile].attention23 else attend_decomposed
    out = attend(q, k_present, v_present, b.visible(q_pos, k_pos, window), sinks, scale, softcap, dims)
    return out, k_present, v_present


def attention_cache_ort(q, k_new, v_new, k_past, v_past, sinks=None, scale: float = 1.0,
                        window: int = 0, softcap: float = 0.0):
    """``effexport::attention_cache``, ``ort`` profile (GQA with past/present)."""
    return _attention_cache(q, k_new, v_new, k_past, v_past, sinks, scale, window, softcap, "ort")


def attention_cache_standard(q, k_new, v_new, k_past, v_past, sinks=None, scale: float = 1.0,
                             window: int = 0, softcap: float = 0.0):
    """``effexport::attention_cache``, ``standard`` profile (Concat + Attention-23)."""
    return _attention_cache(q, k_new, v_new, k_past, v_past, sinks, scale, window, softcap, "standard")


# ---------------------------------------------------------------------------- attention_ring
_SLOT_RINGS = contextvars.ContextVar("effexport_slot_rings", default=frozenset())


@contextlib.contextmanager
def slot_rings(names):
    """Lower the sliding rings named ``names`` (the graph input names of their K/V caches) as the eager
    op's slot ring (``p mod W``, written by a ``Gather``) even in the ``ort`` profile: the rings
    KV-sharing consumers read. GroupQueryAttention's windowed cache would be updated in place by the
    producer layer before its consumers read the old rows."""
    token = _SLOT_RINGS.set(frozenset(names))
    try:
        yield
    finally:
        _SLOT_RINGS.reset(token)


WINDOW_CACHE_ENV = "EFFEXPORT_ORT_WINDOW_CACHE"
"""Unset or ``1``: the sliding rings GroupQueryAttention takes are its windowed cache
(``sliding_window_cache``: :func:`attend_gqa_window`); ``0``: every ring is the eager op's slot ring
(``p mod W``: the decomposition, or a one-token MultiHeadAttention). Run 38 found the windowed cache
wrong on ONNX Runtime 1.31.1's CUDA EP once the window was full and made the slot ring the default;
run 39 found why -- a one-token step's ``total_sequence_length`` was W, below ``pos + 1``
(:func:`_window_total`) -- and, with the bound fixed, the windowed cache agrees with eager bf16 there
(tiny Gemma 3 / Laguna, head sizes 16 and 256: decode 1.0e-2..2.5e-2, as the slot ring) and is the
faster and smaller step (Gemma 3 1B on an H100: 649 nodes against 1,075, 3.05 against 3.20 ms at 4K
B1), so it is the default again (BENCHMARKS.md runs 38-39)."""


WINDOW_TOTAL_ENV = "EFFEXPORT_ORT_WINDOW_TOTAL"
"""``window`` passes the window W as a one-token windowed step's ``total_sequence_length`` (the
lowering until run 39, kept for A/B runs on the GPU); unset, the step passes the artifact's maximum
context (:func:`max_context`): see :func:`_window_total`."""

_MAX_CONTEXT = contextvars.ContextVar("effexport_max_context", default=None)


@contextlib.contextmanager
def max_context(tokens: int | None):
    """Lower inside the block for an artifact that runs at most ``tokens`` positions (the build's
    ``max_context``; None: not known)."""
    token = _MAX_CONTEXT.set(tokens)
    try:
        yield
    finally:
        _MAX_CONTEXT.reset(token)


WINDOW_TOTAL_UNBOUNDED = 1 << 20
"""A static one-token graph's windowed ``total_sequence_length`` where no fixed-size cache bounds the
positions (no such graph is built today: decode graphs come with ``--kv-cache buffer``)."""


def _window_total(window: int) -> int | None:
    """``total_sequence_length`` of a one-token step over a W-row windowed cache: an upper bound of the
    step's real total ``pos + 1``, constant so that a captured CUDA graph stays valid -- the
    positions the artifact's fixed-size caches hold (:func:`max_context`; the runtimes refuse steps
    past it), as onnxruntime-genai passes its ``max_length``; never less than W. None where nothing
    bounds the positions (growing full caches, which no CUDA graph replays): the step then passes its
    real total ``pos + T``. ONNX Runtime 1.31.1's CUDA kernel computes wrong once ``pos + 1`` passes
    the value given (W until run 39: BENCHMARKS.md run 38's windowed-cache failures, from the first
    step past the window); its CPU kernel reads the rows from ``seqlens_k`` either way."""
    if os.environ.get(WINDOW_TOTAL_ENV) == "window":
        return window
    tokens = _MAX_CONTEXT.get()
    return max(window, tokens) if tokens else None


def _window_cache(profile: str, dims: Dims, cache, chunked: bool = False) -> bool:
    """The ``ort`` profile holds a sliding ring (``cache``: its K value) in GroupQueryAttention's
    windowed layout (``sliding_window_cache``) wherever GQA takes the head size, unless
    :func:`slot_rings` names it, or :data:`WINDOW_CACHE_ENV` is ``0``: see :func:`attend_gqa_window`."""
    return (os.environ.get(WINDOW_CACHE_ENV, "1") != "0" and PROFILES[profile].gqa and not chunked and getattr(cache, "name", None) not in _SLOT_RINGS.get()
            and dims.d == dims.dv and dims.d <= GQA_MAX_HEAD_DIM and dims.d % GQA_HEAD_DIM_MULTIPLE == 0)


def attend_gqa_window(q, k_new, v_new, k_win, v_win, pos, sinks, scale: float, window: int, softcap: float,
                      dims: Dims):
    """Sliding-window attention over a W-row window cache, one ``GroupQueryAttention`` with
    ``sliding_window_cache = 1`` that also writes the cache.

    The window layout (GQA's, not the eager op's ring): after a step ending at position ``e``, rows
    ``0..L-1`` hold positions ``e-L+1..e`` in order, ``L = min(e + 1, W)``; later rows are unspecified.
    Both layouts start as zeros, and only this profile's nodes read the cache, so the artifact is
    self-consistent (KV-sharing consumers of a ring run the same lowering over the producer's past).
    ``seqlens_k = pos + T - 1`` on the device; ``total_sequence_length`` is an upper bound of the
    positions for a one-token step (:func:`_window_total`: a constant keeps a captured CUDA graph
    valid) and ``pos + T`` for a chunk (:mod:`.host_positions` reads it from ``pos_host``)."""
    if scale == 0.0:
        raise ValueError("attention_ring: scale 0 (GroupQueryAttention reads it as 1/sqrt(d))")
    heads, kv_heads, _, dv = dims
    seqlens, total = _buffer_lengths(pos, b.dim(q, 2), _window_total(window), q)
    out, k_present, v_present = msft.GroupQueryAttention(
        _heads_last(q), _heads_last(k_new), _heads_last(v_new), k_win, v_win, seqlens, total,
        head_sink=sinks, num_heads=heads, kv_num_heads=kv_heads, scale=float(scale), softcap=float(softcap),
        local_window_size=window, sliding_window_cache=1)
    out = op.Transpose(op.Reshape(out, b.ints([0, 0, heads, dv])), perm=[0, 2, 1, 3])
    return out, k_present, v_present


def _window_positions(end, slots: int):
    """Position held by each row of a window cache after a step ending at ``end`` (0-d, device):
    ``e - L + 1 + r`` for rows ``r < L = min(e + 1, W)``, -1 (never filled) for the others."""
    row = op.Range(b.i64(0), b.i64(slots), b.i64(1))
    filled = op.Min(op.Add(end, b.i64(1)), b.i64(slots))
    return op.Where(op.Less(row, filled), op.Add(op.Sub(op.Add(end, b.i64(1)), filled), row), b.i64(-1))


def _attention_ring(q, k_new, v_new, k_ring, v_ring, pos, sinks, scale, window, softcap, profile,
                    chunked=False):
    dims = Dims.of(q, k_new, v_new)
    slots = b.static_dim(k_ring, 2, "attention_ring")
    if slots != window:
        raise ValueError(f"attention_ring: ring of {slots} slots for window {window}")
    if _window_cache(profile, dims, k_ring, chunked):
        return attend_gqa_window(q, k_new, v_new, k_ring, v_ring, pos, sinks, scale, window, softcap, dims)
    t_len = b.dim(q, 2)
    keys = op.Concat(k_ring, k_new, axis=2)  # [B, Hkv, W+T, d]
    values = op.Concat(v_ring, v_new, axis=2)
    # slot s takes the newest position p <= pos+T-1 with p mod W == s: new row W+p-pos if p >= pos
    last_pos = b.ring_positions(b.plus(pos, op.Sub(t_len, b.i64(1))), slots)
    slot = op.Range(b.i64(0), b.i64(slots), b.i64(1))
    src = op.Where(op.GreaterOrEqual(last_pos, pos), op.Add(op.Sub(last_pos, pos), b.i64(slots)), slot)
    k_present, v_present = op.Gather(keys, src, axis=2), op.Gather(values, src, axis=2)
    if not chunked and _one_token_mha(profile, q, k_new, v_new, sinks, scale, softcap, dims):
        # one token at pos: the written ring holds positions max(0, pos-W+1)..pos in slots
        # 0..min(pos+1, W)-1 (slot p mod W), every one of them inside the window
        return attend_mha_prefix(q, k_present, v_present, _ring_filled(pos, slots), scale, dims), k_present, v_present
    old_pos = b.ring_positions(op.Sub(pos, b.i64(1)), slots)  # [W]
    new_pos = b.positions(pos, t_len)  # [T]
    k_pos = op.Concat(old_pos, new_pos, axis=0)  # [W+T]
    mask = b.visible(new_pos, k_pos, window, op.GreaterOrEqual(k_pos, b.i64(0)), chunked)
    attend = _attend_standard if PROFILES[profile].attention23 else attend_decomposed
    out = attend(q, keys, values, mask, sinks, scale, softcap, dims)
    return out, k_present, v_present


def _ring_filled(pos, slots: int):
    """Rows of a W-slot ring (slot layout ``p mod W``, or GQA's window layout) that hold a position
    after a one-token step at ``pos``: ``min(pos + 1, W)``, a prefix in either layout (slot ``s``
    holds ``s`` while ``pos < W``)."""
    return op.Min(op.Add(pos, b.i64(1)), b.i64(slots))


def attention_ring_ort(q, k_new, v_new, k_ring, v_ring, pos, sinks=None, scale: float = 1.0,
                       window: int = 1, softcap: float = 0.0, chunked: bool = False):
    """``effexport::attention_ring``, ``ort`` profile (decomposed; ring write by Gather)."""
    return _attention_ring(q, k_new, v_new, k_ring, v_ring, pos, sinks, scale, window, softcap, "ort",
                           chunked)


def attention_ring_standard(q, k_new, v_new, k_ring, v_ring, pos, sinks=None, scale: float = 1.0,
                            window: int = 1, softcap: float = 0.0, chunked: bool = False):
    """``effexport::attention_ring``, ``standard`` profile (Attention-23; ring write by Gather)."""
    return _attention_ring(q, k_new, v_new, k_ring, v_ring, pos, sinks, scale, window, softcap,
                           "standard", chunked)


# ---------------------------------------------------------------------------- attention_read
def _attention_read(q, k_cache, v_cache, pos, sinks, scale, window, softcap, ring, profile):
    dims = Dims.of(q, k_cache, v_cache)
    t_len = b.dim(q, 2)
    q_pos = b.positions(pos, t_len)
    attend = _attend_standard if PROFILES[profile].attention23 else attend_decomposed
    one_token = _one_token_mha(profile, q, k_cache, v_cache, sinks, scale, softcap, dims)
    if ring:
        slots = b.static_dim(k_cache, 2, "attention_read")
        window_layout = _window_cache(profile, dims, k_cache)
        if one_token and window == slots and not window_layout:
            # the producer's slot ring as it left it (zeros where never written): rows 0..min(pos+1, W)-1,
            # all inside the window (GQA's window layout leaves unfilled rows unspecified: not here)
            return attend_mha_prefix(q, k_cache, v_cache, _ring_filled(pos, slots), scale, dims)
        end = b.plus(pos, op.Sub(t_len, b.i64(1)))
        k_pos = _window_positions(end, slots) if window_layout else b.ring_positions(end, slots)
        filled = op.GreaterOrEqual(k_pos, b.i64(0))
        if window_layout:  # GQA leaves unfilled rows unspecified: no NaN may reach P x V
            v_cache = op.Where(op.Reshape(filled, b.ints([1, 1, -1, 1])), v_cache, op.CastLike(b.f32c(0.0), v_cache))
        mask = b.visible(q_pos, k_pos, window, filled)
        return attend(q, k_cache, v_cache, mask, sinks, scale, softcap, dims)
    if PROFILES[profile].gqa and _gqa_fits(dims, scale) and b.known_dim(k_cache, 2) is None:
        # a growing cache (the producer's present): rows 0..pos+T-1 exactly; past = all but the last T
        cut = op.Sub(op.Shape(k_cache, start=2, end=3), op.Shape(q, start=2, end=3))
        k_past, k_new = _split_at(k_cache, cut)
        v_past, v_new = _split_at(v_cache, cut)
        return attend_gqa(q, k_past, v_past, k_new, v_new, sinks, scale, window, softcap, dims)[0]
    if one_token and window == 0 and b.known_dim(k_cache, 2) is not None:
        # the producer's written buffer: rows 0..pos hold positions 0..pos
        return attend_mha_prefix(q, k_cache, v_cache, op.Add(pos, b.i64(1)), scale, dims)
    # a fixed buffer reads every row: the causal mask hides rows past pos + T - 1
    k_pos = op.Range(b.i64(0), b.dim(k_cache, 2), b.i64(1))
    return attend(q, k_cache, v_cache, b.visible(q_pos, k_pos, window), sinks, scale, softcap, dims)


def attention_read_ort(q, k_cache, v_cache, pos, sinks=None, scale: float = 1.0, window: int = 0,
                       softcap: float = 0.0, ring: bool = False):
    """``effexport::attention_read``, ``ort`` profile (GQA over a full cache; ring decomposed)."""
    return _attention_read(q, k_cache, v_cache, pos, sinks, scale, window, softcap, ring, "ort")


def attention_read_standard(q, k_cache, v_cache, pos, sinks=None, scale: float = 1.0,
                            window: int = 0, softcap: float = 0.0, ring: bool = False):
    """``effexport::attention_read``, ``standard`` profile."""
    return _attention_read(q, k_cache, v_cache, pos, sinks, scale, window, softcap, ring, "standard")


# -------------------------------------------------------------------------- attention_buffer
def _buffer_written(buf, new, pos, t_len):
    """``buf`` with rows ``pos..pos+T-1`` replaced by ``new``: one ``ScatterND`` at indices
    ``(b, h, pos + t)``. A runtime that binds the present to the past's memory (full buffers in
    :class:`~.graph_runtime.CudaGraphRuntime`) gets the rows written in place: ONNX Runtime's CUDA
    ScatterND copies its input only when the output is other memory."""
    target = op.Concat(op.Shape(new, end=3), b.ints([1]), axis=0)  # [B, Hkv, T, 1]
    batch = op.Reshape(op.Range(b.i64(0), b.dim(new, 0), b.i64(1)), b.ints([-1, 1, 1, 1]))
    head = op.Reshape(op.Range(b.i64(0), b.dim(new, 1), b.i64(1)), b.ints([1, -1, 1, 1]))
    row = op.Reshape(b.positions(pos, t_len), b.ints([1, 1, -1, 1]))
    index = op.Concat(op.Expand(batch, target), op.Expand(head, target), op.Expand(row, target), axis=-1)
    return op.ScatterND(buf, index, new)


def _attention_buffer(q, k_new, v_new, k_buf, v_buf, pos, sinks, scale, window, softcap, profile):
    dims = Dims.of(q, k_new, v_new)
    t_len = b.dim(q, 2)
    capacity = b.static_dim(k_buf, 2, "attention_buffer")
    if PROFILES[profile].gqa and _gqa_fits(dims, scale):
        return attend_gqa(q, k_buf, v_buf, k_new, v_new, sinks, scale, window, softcap, dims,
                          lengths=_buffer_lengths(pos, t_len, capacity, q))
    k_out, v_out = _buffer_written(k_buf, k_new, pos, t_len), _buffer_written(v_buf, v_new, pos, t_len)
    if window == 0 and _one_token_mha(profile, q, k_new, v_new, sinks, scale, softcap, dims):
        return attend_mha_prefix(q, k_out, v_out, op.Add(pos, b.i64(1)), scale, dims), k_out, v_out
    # every row is read (fixed shapes): the causal mask hides rows past pos + T - 1
    q_pos, k_pos = b.positions(pos, t_len), op.Range(b.i64(0), b.i64(capacity), b.i64(1))
    attend = _attend_standard if PROFILES[profile].attention23 else attend_decomposed
    return attend(q, k_out, v_out, b.visible(q_pos, k_pos, window), sinks, scale, softcap, dims), k_out, v_out


def attention_buffer_ort(q, k_new, v_new, k_buf, v_buf, pos, sinks=None, scale: float = 1.0,
                         window: int = 0, softcap: float = 0.0):
    """``effexport::attention_buffer``, ``ort`` profile (GQA over the shared buffer)."""
    return _attention_buffer(q, k_new, v_new, k_buf, v_buf, pos, sinks, scale, window, softcap, "ort")


def attention_buffer_standard(q, k_new, v_new, k_buf, v_buf, pos, sinks=None, scale: float = 1.0,
                              window: int = 0, softcap: float = 0.0):
    """``effexport::attention_buffer``, ``standard`` profile (Gather write + Attention-23)."""
    return _attention_buffer(q, k_new, v_new, k_buf, v_buf, pos, sinks, scale, window, softcap, "standard")


def _table():
    import torch

    import effexport.custom_ops.attention  # noqa: F401  (registers the ops)
    ops = torch.ops.effexport
    return {
        "ort": {ops.attention.default: attention_ort, ops.attention_cache.default: attention_cache_ort,
                ops.attention_ring.default: attention_ring_ort,
                ops.attention_read.default: attention_read_ort,
                ops.attention_buffer.default: attention_buffer_ort},
        "standard": {ops.attention.default: attention_standard,
                     ops.attention_cache.default: attention_cache_standard,
                     ops.attention_ring.default: attention_ring_standard,
                     ops.attention_read.default: attention_read_standard,
                     ops.attention_buffer.default: attention_buffer_standard},
    }


TRANSLATIONS = _table()
"""profile -> {OpOverload: translation function}."""
