"""Attention ops: GQA, causal / sliding-window / full masks, logit softcap, per-head sinks.

Four functional forms of one computation, each a ``torch.library.custom_op`` in the ``effexport``
namespace with an eager reference (pure torch, any device: the oracle for every kernel and backend)
and a ``register_fake`` that works with symbolic batch and sequence sizes:

``attention``        prefill: queries are the last T of S positions (or full/bidirectional).
``attention_cache``  decode with a growing cache: ``present = cat(past, new)`` along the sequence
                     (ONNX Runtime GroupQueryAttention's non-shared-buffer past/present layout).
``attention_ring``   decode (or prefill) for windowed layers with a ring cache of exactly W slots,
                     and for chunked layers (``chunked=True``) with a chunk-local cache of C slots.
``attention_read``   read-only consumer of another layer's cache (cross-layer KV sharing).
``attention_buffer`` decode with a full cache in a fixed-capacity buffer: the new rows are written
                     at ``pos`` (ONNX Runtime GroupQueryAttention's shared-buffer layout, where past
                     and present are one device buffer updated in place).

Layout and conventions shared by all four:

* ``q [B, H, T, d]``, ``k [B, Hkv, S, d]``, ``v [B, Hkv, S, dv]``; ``H % Hkv == 0`` (any GQA
  ratio; query head h reads KV head ``h // (H // Hkv)``, the ``repeat_interleave`` order). The head
  dims are whatever the call passes (``d`` and ``dv`` may differ).
* ``scale`` is explicit (``1/sqrt(d)`` is *not* assumed; Gemma 4 uses 1.0).
* ``window`` W counts the keys visible to a query *including itself* (HF convention): key j is
  visible to query i iff ``i - W < j <= i``. ``window=0`` means no window (plain causal).
* Chunked attention (Llama 4's ``attention_chunk_size`` C, ``attention_ring(chunked=True)`` with
  ``window`` = C): key j is visible to query i iff ``i - (i mod C) <= j <= i`` (same chunk, causal).
* ``softcap`` > 0 applies ``softcap * tanh(scores / softcap)`` to the scaled scores before masking.
* ``sinks [H]`` (optional) is a per-head logit that joins the softmax denominator only (gpt-oss):
  ``p_j = exp(s_j) / (exp(sink) + sum_j exp(s_j))``; it contributes no value.
* Scores and softmax run in fp32; the output has q's dtype. Caches keep the dtype of the inputs.
* ``pos`` is a 0-d int64 tensor, the absolute position of the first new token. All batch items
  share positions: left/right padding and per-row lengths are not supported (use batch 1 or
  equal-length rows).

Every op in :data:`OPS` is functional: caches are returned, never mutated in place, and no output
aliases an input. ``attention_buffer_inplace`` (:data:`INPLACE_OPS`, emitted by no pass) is
``attention_buffer`` writing the new rows into the caller's buffers instead of returning new ones.

Not covered here: padding masks, chunked attention without a cache (only ``attention_ring`` has the
chunked mode), dropout, autograd (no backward is
registered: these ops are for export and inference), and compressed or sparse attention (own ops).
"""
from typing import Optional

import torch

from effexport.custom_ops._checks import check_pos

__all__ = ["attention", "attention_cache", "attention_ring", "attention_read", "attention_buffer",
           "attention_buffer_inplace", "OPS", "INPLACE_OPS"]


# ------------------------------------------------------------------------------------ validation
def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               sinks: Optional[torch.Tensor], what: str) -> None:
    """Shape checks shared by the eager kernels and the fake kernels (static dims only, plus the
    batch / sequence equalities, which become export guards when symbolic)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{what}: q, k, v must be 4-d [B, H, T, d]; got {q.dim()}, {k.dim()}, {v.dim()}")
    heads, kv_heads = q.shape[1], k.shape[1]
    if v.shape[1] != kv_heads:
        raise ValueError(f"{what}: k has {kv_heads} heads but v has {v.shape[1]}")
    if heads % kv_heads != 0:
        raise ValueError(f"{what}: query heads {heads} are not a multiple of KV heads {kv_heads}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{what}: q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"{what}: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{what}: k has {k.shape[2]} positions but v has {v.shape[2]}")
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != heads):
        raise ValueError(f"{what}: sinks must have shape [{heads}], got {tuple(sinks.shape)}")


def _check_new(q: torch.Tensor, k_new: torch.Tensor, k_cache: torch.Tensor,
               v_new: torch.Tensor, v_cache: torch.Tensor, what: str) -> None:
    """The new K/V carry one token per query and share the cache's dtype (no silent promotion)."""
    if k_new.shape[2] != q.shape[2]:
        raise ValueError(f"{what}: {q.shape[2]} queries but {k_new.shape[2]} new K/V tokens")
    if k_new.dtype != k_cache.dtype or v_new.dtype != v_cache.dtype:
        raise ValueError(f"{what}: new K/V dtypes ({k_new.dtype}, {v_new.dtype}) differ from the "
                         f"cache's ({k_cache.dtype}, {v_cache.dtype})")


def _check_window(window: int, softcap: float, what: str) -> None:
    if window < 0:
        raise ValueError(f"{what}: window must be >= 0 (0 = no window), got {window}")
    if softcap < 0:
        raise ValueError(f"{what}: softcap must be >= 0 (0 = none), got {softcap}")


# -------------------------------------------------------------------------------- shared kernel
def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int,
             k_valid: Optional[torch.Tensor] = None, chunked: bool = False) -> torch.Tensor:
    """Boolean ``[T, S]`` mask, True = visible: causal, windowed to W keys including self when
    ``window > 0`` (with ``chunked``: to the query's own chunk of W positions, ``diff <= i mod W``),
    and restricted to ``k_valid [S]`` (filled ring slots) when given."""
    diff = q_pos[:, None] - k_pos[None, :]  # [T, S]
    visible = diff >= 0
    if window > 0 and chunked:
        visible = visible & (diff <= torch.remainder(q_pos, window)[:, None])
    elif window > 0:
        visible = visible & (diff < window)
    if k_valid is not None:
        visible = visible & k_valid[None, :]
    return visible


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
            sinks: Optional[torch.Tensor], scale: float, softcap: float) -> torch.Tensor:
    """``softmax(cap(q k^T * scale) + mask [, sink]) v`` with GQA by head grouping (no KV copy).

    q ``[B, H, T, d]``, k ``[B, Hkv, S, d]``, v ``[B, Hkv, S, dv]``, mask bool ``[T, S]`` or None.
    Returns a fresh ``[B, H, T, dv]`` tensor in q's dtype. A query row with every key masked and no
    sink is NaN (never produced by the ops' own masks: a query always sees itself)."""
    batch, heads, t_len, _ = q.shape
    kv_heads, s_len, dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = heads // kv_heads
    qg = q.float().reshape(batch, kv_heads, groups * t_len, q.shape[-1])  # [B, Hkv, G*T, d]
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [B, Hkv, G*T, S]
    scores = scores.view(batch, kv_heads, groups, t_len, s_len)  # [B, Hkv, G, T, S]
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask [T, S] broadcasts
    if sinks is not None:
        sink = sinks.float().view(1, kv_heads, groups, 1, 1).expand(batch, -1, -1, t_len, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :s_len]
    else:
        probs = torch.softmax(scores, dim=-1)  # [B, Hkv, G, T, S]
    out = torch.matmul(probs.reshape(batch, kv_heads, groups * t_len, s_len), v.float())
    return out.view(batch, heads, t_len, dv).to(q.dtype)  # [B, H, T, dv]


def _ring_positions(last: torch.Tensor, slots: int, device: torch.device) -> torch.Tensor:
    """Position held by each of ``slots`` ring slots when ``last`` (0-d) is the newest position
    written: slot s holds the largest p <= last with ``p mod slots == s`` (negative = never filled)."""
    slot = torch.arange(slots, device=device)
    return last - (slots - 1) + torch.remainder(slot - last - 1, slots)  # [W]


def _out_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


# ------------------------------------------------------------------------------------ attention
@torch.library.custom_op("effexport::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              sinks: Optional[torch.Tensor] = None, *, scale: float, causal: bool = True,
              window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Prefill attention over a whole (or trailing) sequence.

    q ``[B, H, T, d]``, k ``[B, Hkv, S, d]``, v ``[B, Hkv, S, dv]``, sinks ``[H]`` or None ->
    out ``[B, H, T, dv]`` (q's dtype). With ``causal=True`` (requires T <= S) the queries are the
    LAST T of the S key positions (query i sits at position ``S - T + i``), masked causally and, with
    ``window`` W > 0, to the W most recent keys including itself. ``causal=False`` is full
    bidirectional attention (any T; ``window`` must be 0)."""
    _check_qkv(q, k, v, sinks, "attention")
    _check_window(window, softcap, "attention")
    if not causal:
        if window != 0:
            raise ValueError("attention: causal=False (bidirectional) does not take a window")
        return _attend(q, k, v, None, sinks, scale, softcap)
    t_len, s_len = q.shape[2], k.shape[2]
    if t_len > s_len:
        raise ValueError(f"attention: causal queries must be the last T of S keys, got T={t_len} > S={s_len}")
    k_pos = torch.arange(s_len, device=q.device)
    mask = _visible(k_pos[s_len - t_len:], k_pos, window)  # [T, S]
    return _attend(q, k, v, mask, sinks, scale, softcap)


@attention.register_fake
def _(q, k, v, sinks=None, *, scale, causal=True, window=0, softcap=0.0):
    _check_qkv(q, k, v, sinks, "attention")
    return _out_like(q, v)


# ------------------------------------------------------------------------------ attention_cache
@torch.library.custom_op("effexport::attention_cache", mutates_args=())
def attention_cache(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    k_past: torch.Tensor, v_past: torch.Tensor,
                    sinks: Optional[torch.Tensor] = None, *, scale: float, window: int = 0,
                    softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode (or chunked prefill) step with a growing full-length cache.

    q ``[B, H, T, d]``, k_new/v_new ``[B, Hkv, T, d|dv]`` (the T new tokens, positions P..P+T-1),
    k_past/v_past ``[B, Hkv, P, d|dv]`` (positions 0..P-1; P may be 0) ->
    ``(out [B, H, T, dv], k_present [B, Hkv, P+T, d], v_present [B, Hkv, P+T, dv])`` with
    ``present = cat(past, new)`` along the sequence. ``out`` is causal (+ window) attention of the
    new queries over ``present``: exactly :func:`attention` on the whole sequence, restricted to
    the last T queries. The cache keeps every token, also for windowed layers (see
    :func:`attention_ring` for a W-slot cache)."""
    _check_qkv(q, k_new, v_new, sinks, "attention_cache")
    _check_qkv(q, k_past, v_past, None, "attention_cache (past)")
    _check_new(q, k_new, k_past, v_new, v_past, "attention_cache")
    _check_window(window, softcap, "attention_cache")
    k_present = torch.cat([k_past, k_new], dim=2)  # [B, Hkv, P+T, d]
    v_present = torch.cat([v_past, v_new], dim=2)  # [B, Hkv, P+T, dv]
    s_len, t_len = k_present.shape[2], q.shape[2]
    k_pos = torch.arange(s_len, device=q.device)
    mask = _visible(k_pos[s_len - t_len:], k_pos, window)  # [T, P+T]
    return _attend(q, k_present, v_present, mask, sinks, scale, softcap), k_present, v_present


@attention_cache.register_fake
def _(q, k_new, v_new, k_past, v_past, sinks=None, *, scale, window=0, softcap=0.0):
    _check_qkv(q, k_new, v_new, sinks, "attention_cache")
    _check_qkv(q, k_past, v_past, None, "attention_cache (past)")
    _check_new(q, k_new, k_past, v_new, v_past, "attention_cache")
    s_len = k_past.shape[2] + k_new.shape[2]
    k_present = k_new.new_empty(k_new.shape[0], k_new.shape[1], s_len, k_new.shape[3])
    v_present = v_new.new_empty(v_new.shape[0], v_new.shape[1], s_len, v_new.shape[3])
    return _out_like(q, v_new), k_present, v_present


# ------------------------------------------------------------------------------- attention_ring
@torch.library.custom_op("effexport::attention_ring", mutates_args=())
def attention_ring(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                   k_ring: torch.Tensor, v_ring: torch.Tensor, pos: torch.Tensor,
                   sinks: Optional[torch.Tensor] = None, *, scale: float, window: int,
                   softcap: float = 0.0,
                   chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sliding-window (or chunked) attention with a ring cache of exactly W = ``window`` slots.

    q ``[B, H, T, d]``, k_new/v_new ``[B, Hkv, T, d|dv]`` (new tokens at positions
    ``pos..pos+T-1``), k_ring/v_ring ``[B, Hkv, W, d|dv]``, pos 0-d int64 ->
    ``(out [B, H, T, dv], k_ring_new, v_ring_new)`` (ring shapes unchanged).

    Slot of position p is ``p mod W``; before the call slot s holds the latest position
    ``p < pos`` with ``p mod W == s``; slots whose position is negative were never filled and are
    masked. The queries attend over [old ring entries, new tokens] with the causal window mask
    (exact for every T: a query at ``pos + t`` needs keys ``> pos + t - W``, which are all either
    new or still in the ring), then the new tokens are written into their slots; with T > W only the
    last W survive. T >= 1 works for decode and for chunked prefill; a prefill of a whole prompt is
    a call with a zero ring and ``pos = 0`` (any T, also T > W).

    ``chunked=True``: chunked attention with chunks of C = W positions (Llama 4): a query at i sees
    ``i - (i mod C) .. i``, so the C slots are a chunk-local cache (slot = offset in the chunk, the
    entries of the previous chunk masked from the chunk's first token on). Exact for every T by the
    same argument: the keys a query needs are new or among the C latest positions before ``pos``."""
    _check_qkv(q, k_new, v_new, sinks, "attention_ring")
    _check_qkv(q, k_ring, v_ring, None, "attention_ring (ring)")
    _check_new(q, k_new, k_ring, v_new, v_ring, "attention_ring")
    check_pos(pos, "attention_ring")
    _check_window(window, softcap, "attention_ring")
    slots = k_ring.shape[2]
    if window == 0 or slots != window:
        raise ValueError(f"attention_ring: the ring must have exactly window={window} > 0 slots, "
                         f"got {slots}")
    t_len, device = q.shape[2], q.device
    pos = pos.to(device)
    old_pos = _ring_positions(pos - 1, slots, device)  # [W] positions in the ring before the write
    new_pos = pos + torch.arange(t_len, device=device)  # [T]
    keys = torch.cat([k_ring, k_new], dim=2)  # [B, Hkv, W+T, d]
    values = torch.cat([v_ring, v_new], dim=2)  # [B, Hkv, W+T, dv]
    k_pos = torch.cat([old_pos, new_pos])  # [W+T]
    mask = _visible(new_pos, k_pos, window, k_valid=k_pos >= 0, chunked=chunked)  # [T, W+T]
    out = _attend(q, keys, values, mask, sinks, scale, softcap)
    return (out, *_ring_written(keys, values, pos, slots, t_len))


def _ring_written(keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, slots: int,
                  t_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring after writing T new tokens at ``pos..pos+T-1``, from ``keys`` / ``values`` =
    ``cat(old ring, new)`` along the sequence. Slot s then holds the latest position <= pos+T-1 with
    ``p mod W == s``: a new token (index W + p - pos) when p >= pos, else its old entry (index s)."""
    last_pos = _ring_positions(pos + t_len - 1, slots, keys.device)  # [W]
    src = torch.where(last_pos >= pos, slots + last_pos - pos, torch.arange(slots, device=keys.device))
    return keys.index_select(2, src), values.index_select(2, src)


@attention_ring.register_fake
def _(q, k_new, v_new, k_ring, v_ring, pos, sinks=None, *, scale, window, softcap=0.0, chunked=False):
    _check_qkv(q, k_new, v_new, sinks, "attention_ring")
    _check_qkv(q, k_ring, v_ring, None, "attention_ring (ring)")
    _check_new(q, k_new, k_ring, v_new, v_ring, "attention_ring")
    check_pos(pos, "attention_ring")
    return _out_like(q, v_new), torch.empty_like(k_ring), torch.empty_like(v_ring)


# ------------------------------------------------------------------------------- attention_read
@torch.library.custom_op("effexport::attention_read", mutates_args=())
def attention_read(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   pos: torch.Tensor, sinks: Optional[torch.Tensor] = None, *, scale: float,
                   window: int = 0, softcap: float = 0.0, ring: bool = False) -> torch.Tensor:
    """Read-only attention over ANOTHER layer's cache (consumer side of cross-layer KV sharing).

    q ``[B, H, T, d]`` (queries at positions ``pos..pos+T-1``), k_cache/v_cache
    ``[B, Hkv, S, d|dv]`` written by the producer layer, which ran first, so the cache already
    holds the current tokens; pos 0-d int64 -> out ``[B, H, T, dv]``. No cache is returned.

    * ``ring=False`` (full cache): entry j is position j; S = pos+T (entries past ``pos+T-1``, e.g.
      an over-allocated buffer, are masked by causality). Exact for any T.
    * ``ring=True``: S slots, slot s holding the latest position ``<= pos+T-1`` with
      ``p mod S == s``; requires ``0 < window <= S``. Only exact for T == 1, and the eager kernel
      raises for T > 1: by the time the consumer runs, the producer has written all T new tokens,
      overwriting the T-1 oldest positions the earlier queries of the chunk still need. For a
      multi-token prefill, consumers should attend the producer's in-graph K/V with
      :func:`attention` instead."""
    _check_qkv(q, k_cache, v_cache, sinks, "attention_read")
    check_pos(pos, "attention_read")
    _check_window(window, softcap, "attention_read")
    t_len, s_len, device = q.shape[2], k_cache.shape[2], q.device
    pos = pos.to(device)
    if ring:
        if not 0 < window <= s_len:
            raise ValueError(f"attention_read: ring=True needs 0 < window <= ring slots ({s_len}), "
                             f"got window={window}")
        if t_len != 1:
            raise ValueError(
                f"attention_read: ring=True is only exact for one query token (got T={t_len}): the "
                "producer already overwrote the oldest ring slots with this chunk's tokens; attend "
                "the producer's K/V with effexport::attention for multi-token prefill")
        k_pos = _ring_positions(pos + t_len - 1, s_len, device)  # [S]
        mask = _visible(pos + torch.arange(t_len, device=device), k_pos, window, k_valid=k_pos >= 0)
    else:
        k_pos = torch.arange(s_len, device=device)
        mask = _visible(pos + torch.arange(t_len, device=device), k_pos, window)  # [T, S]
    return _attend(q, k_cache, v_cache, mask, sinks, scale, softcap)


@attention_read.register_fake
def _(q, k_cache, v_cache, pos, sinks=None, *, scale, window=0, softcap=0.0, ring=False):
    _check_qkv(q, k_cache, v_cache, sinks, "attention_read")
    check_pos(pos, "attention_read")
    if ring and isinstance(q.shape[2], int) and q.shape[2] != 1:
        raise ValueError(f"attention_read: ring=True is only exact for one query token (got T={q.shape[2]})")
    return _out_like(q, v_cache)


# ----------------------------------------------------------------------------- attention_buffer
def _check_buffer(q, k_new, v_new, k_buf, v_buf, pos, sinks, what: str) -> None:
    _check_qkv(q, k_new, v_new, sinks, what)
    _check_qkv(q, k_buf, v_buf, None, f"{what} (buffer)")
    _check_new(q, k_new, k_buf, v_new, v_buf, what)
    check_pos(pos, what)


def _check_fits(pos: torch.Tensor, t_len: int, capacity: int, what: str) -> None:
    """Rows ``pos..pos+T-1`` must lie in the buffer (read on the host, so not while a CUDA graph is
    being captured)."""
    if pos.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    if int(pos) + t_len > capacity:
        raise ValueError(f"{what}: positions {int(pos)}..{int(pos) + t_len - 1} do not fit the "
                         f"buffer's {capacity} rows (build with a larger max context)")


def _buffer_reference(q, k_new, v_new, k_buf, v_buf, pos, sinks, scale, window, softcap, what):
    """The eager reference of both buffer ops: ``(out, k_buf with the new rows, v_buf with them)``,
    the buffers new tensors (the inputs untouched)."""
    _check_buffer(q, k_new, v_new, k_buf, v_buf, pos, sinks, what)
    _check_window(window, softcap, what)
    t_len, capacity, device = q.shape[2], k_buf.shape[2], q.device
    pos = pos.to(device)
    _check_fits(pos, t_len, capacity, what)
    row = torch.arange(capacity, device=device)  # [C]
    fresh = (row >= pos) & (row < pos + t_len)
    src = torch.where(fresh, capacity + row - pos, row)  # row j <- new[j - pos] inside the new rows
    k_out = torch.cat([k_buf, k_new], dim=2).index_select(2, src)  # [B, Hkv, C, d]
    v_out = torch.cat([v_buf, v_new], dim=2).index_select(2, src)  # [B, Hkv, C, dv]
    mask = _visible(pos + torch.arange(t_len, device=device), row, window)  # [T, C]: later rows masked
    return _attend(q, k_out, v_out, mask, sinks, scale, softcap), k_out, v_out


@torch.library.custom_op("effexport::attention_buffer", mutates_args=())
def attention_buffer(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     k_buf: torch.Tensor, v_buf: torch.Tensor, pos: torch.Tensor,
                     sinks: Optional[torch.Tensor] = None, *, scale: float, window: int = 0,
                     softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode (or chunked prefill) step with a full cache held in a fixed-capacity buffer.

    q ``[B, H, T, d]``, k_new/v_new ``[B, Hkv, T, d|dv]`` (positions ``pos..pos+T-1``),
    k_buf/v_buf ``[B, Hkv, C, d|dv]`` (row j holds position j for ``j < pos``), pos 0-d int64 ->
    ``(out [B, H, T, dv], k_buf_new, v_buf_new)`` (buffer shapes unchanged) with the new rows
    written at ``pos..pos+T-1``; requires ``pos + T <= C``. ``out`` is causal (+ window)
    attention of the new queries over rows ``0..pos+T-1``: exactly :func:`attention_cache` with
    ``past = buf[:, :, :pos]``. Rows at or past ``pos + T`` are never read; this reference returns
    them unchanged, a backend that updates the buffer in place (ONNX Runtime's GroupQueryAttention
    with past and present bound to one buffer) leaves them unspecified."""
    return _buffer_reference(q, k_new, v_new, k_buf, v_buf, pos, sinks, scale, window, softcap,
                             "attention_buffer")


@attention_buffer.register_fake
def _(q, k_new, v_new, k_buf, v_buf, pos, sinks=None, *, scale, window=0, softcap=0.0):
    _check_buffer(q, k_new, v_new, k_buf, v_buf, pos, sinks, "attention_buffer")
    return _out_like(q, v_new), torch.empty_like(k_buf), torch.empty_like(v_buf)


@torch.library.custom_op("effexport::attention_buffer_inplace", mutates_args=("k_buf", "v_buf"))
def attention_buffer_inplace(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                             k_buf: torch.Tensor, v_buf: torch.Tensor, pos: torch.Tensor,
                             sinks: Optional[torch.Tensor] = None, *, scale: float, window: int = 0,
                             softcap: float = 0.0) -> torch.Tensor:
    """:func:`attention_buffer` updating the buffers in place: q ``[B, H, T, d]``, k_new/v_new
    ``[B, Hkv, T, d|dv]``, k_buf/v_buf ``[B, Hkv, C, d|dv]`` (mutated: rows ``pos..pos+T-1`` get
    the new K/V, the other rows are left as they are), pos 0-d int64 -> ``out [B, H, T, dv]``, the
    same output as :func:`attention_buffer`. A step then moves only the rows it reads (``0..pos``)
    and the rows it writes, not a copy of the whole buffer (the layout of ONNX Runtime's shared-buffer
    GroupQueryAttention and of Hugging Face's StaticCache). Not in :data:`OPS`: no pass emits it, so
    backends need not lower it; it is the in-place form a runtime (or a caller) uses on CUDA, where
    :func:`effexport.custom_ops.enable_triton` gives it a kernel that writes the new row from the
    same pass that reads the buffer. Requires ``pos + T <= C`` (checked on the host except while a
    CUDA graph is captured; the kernel never writes outside the buffer)."""
    out, k_out, v_out = _buffer_reference(q, k_new, v_new, k_buf, v_buf, pos, sinks, scale, window,
                                          softcap, "attention_buffer_inplace")
    k_buf.copy_(k_out)
    v_buf.copy_(v_out)
    return out


@attention_buffer_inplace.register_fake
def _(q, k_new, v_new, k_buf, v_buf, pos, sinks=None, *, scale, window=0, softcap=0.0):
    _check_buffer(q, k_new, v_new, k_buf, v_buf, pos, sinks, "attention_buffer_inplace")
    return _out_like(q, v_new)


OPS = (
    torch.ops.effexport.attention.default,
    torch.ops.effexport.attention_cache.default,
    torch.ops.effexport.attention_ring.default,
    torch.ops.effexport.attention_read.default,
    torch.ops.effexport.attention_buffer.default,
)
INPLACE_OPS = (torch.ops.effexport.attention_buffer_inplace.default,)
"""Ops that mutate their inputs: never emitted by a pass (not in :data:`OPS`, so no backend lowers
them); runtimes and callers use them where the buffers are theirs to update."""
