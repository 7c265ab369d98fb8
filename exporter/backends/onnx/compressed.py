"""ONNX lowering of the DeepSeek V4 compressed-attention ops: ``kv_compress``,
``kv_compress_step``, ``indexer_topk``, ``sparse_attention`` and ``sparse_attention_ring``.

One translation per op serves both profiles (``ort`` and ``standard``): none has a contrib or
standard equivalent. Every call becomes one ``effexport::<op>`` node carrying the op's keyword
parameters as attributes (``ratio``, ``overlap``, ``eps``, ``rope_dim`` / ``topk`` / ``scale``,
``window``), whose body is a model-local function of ai.onnx opset-18 ops (:mod:`._local`), so stock
ONNX Runtime runs them on any execution provider. Each body follows its eager reference (the parity
oracle) step by step:

* ``kv_compress``: ``Reshape`` to ``[B, n, r, coff*c]`` blocks + ``Softmax`` over ``r`` (overlap:
  ``Concat`` of the previous block's first half and the current block's second half), RMSNorm,
  interleaved RoPE at position ``r*i``; the returned state is one ``Gather`` of rows (pad row
  ``(0, -inf)`` where the state has no token).
* ``kv_compress_step``: the eager op's fixed-layout buffer (``r * (T//r + 2)`` rows by ``Gather``),
  pooling of every buffer block, and the entry buffer written with ``Where`` at slot ``i`` when
  block ``i`` completes in the call: all output shapes equal the input shapes.
* ``indexer_topk``: ``MatMul`` + ``Relu`` + weighted head sum, invisible entries to ``-inf``,
  ``TopK`` (ties toward the lower index, the op's rule), slots past the visible count to ``-1``.
* ``sparse_attention(_ring)``: window logits over the raw entries, compressed logits over the
  ``GatherND``-selected entries (CSA) or every visible entry (HCA), and the per-head sink as an
  extra softmax column that is dropped before the value product (denominator only).

Masks are computed in the graph from ``pos`` and shapes, never baked as dense constants; pooling,
norms, RoPE, logits and softmax run in fp32 as in the eager ops.

Not covered: a ``comp`` buffer with zero entries in a CSA ``sparse_attention`` (the eager op
skips it; the ``GatherND`` here needs ``N >= 1``, which every real entry buffer has), and the
quantization simulation the models apply outside the ops.
"""
from __future__ import annotations

import math

import onnx_ir as ir
import torch
from onnxscript import opset18 as op

from effexport.exporter.backends.onnx import _build as b
from effexport.exporter.backends.onnx._local import call, declare

__all__ = ["TRANSLATIONS", "kv_compress", "kv_compress_step", "indexer_topk", "sparse_attention",
           "sparse_attention_ring"]

_NEG_INF = -math.inf
_BIG = 2 ** 62


def _slice(x, start, end, axis: int):
    """``x[start:end]`` along ``axis`` with int bounds."""
    return op.Slice(x, b.ints([start]), b.ints([end]), b.ints([axis]))


def _round_to(x, dtype):
    """Round fp32 ``x`` through ``dtype`` (the eager op's ``.to(dtype).float()``)."""
    return x if dtype in (None, ir.DataType.FLOAT) else b.to_float(op.Cast(x, to=dtype))


# ----------------------------------------------------------------------------- shared pieces
def _pool(cur_a, cur_z, prev_a, prev_z, c: int):
    """Softmax pooling of fp32 blocks ``[B, n, r, coff*c]`` -> ``[B, n, c]`` (eager ``_pool``)."""
    if prev_a is not None:
        cur_a = op.Concat(_slice(prev_a, 0, c, 3), _slice(cur_a, c, _BIG, 3), axis=2)  # [B, n, 2r, c]
        cur_z = op.Concat(_slice(prev_z, 0, c, 3), _slice(cur_z, c, _BIG, 3), axis=2)
    return op.ReduceSum(op.Mul(cur_a, op.Softmax(cur_z, axis=2)), b.ints([2]), keepdims=0)


def _rope_interleaved(x, positions, inv_freq, rope_dim: int):
    """Interleaved-pair RoPE of fp32 ``x [B, n, rd]`` at int64 ``positions [n]``."""
    half = rope_dim // 2
    angles = op.Mul(op.Unsqueeze(op.Cast(positions, to=ir.DataType.FLOAT), b.ints([1])),
                    op.Unsqueeze(b.to_float(inv_freq), b.ints([0])))  # [n, rd/2]
    cos, sin = op.Cos(angles), op.Sin(angles)
    pairs = op.Reshape(x, b.ints([0, 0, half, 2]))
    x0 = op.Squeeze(_slice(pairs, 0, 1, 3), b.ints([3]))  # [B, n, rd/2]
    x1 = op.Squeeze(_slice(pairs, 1, 2, 3), b.ints([3]))
    y0 = op.Sub(op.Mul(x0, cos), op.Mul(x1, sin))
    y1 = op.Add(op.Mul(x0, sin), op.Mul(x1, cos))
    stacked = op.Concat(op.Unsqueeze(y0, b.ints([-1])), op.Unsqueeze(y1, b.ints([-1])), axis=-1)
    return op.Reshape(stacked, b.ints([0, 0, rope_dim]))


def _finish(pooled, norm_weight, inv_freq, positions, eps: float, rope_dim: int, dtype):
    """RMSNorm * weight, then RoPE on the last ``rope_dim`` dims, with the eager rounding points;
    returns ``[B, n, c]`` in ``dtype``."""
    y = _round_to(pooled, dtype)
    rms = op.Sqrt(op.Add(op.ReduceMean(op.Mul(y, y), b.ints([-1]), keepdims=1), b.f32c(eps)))
    y = op.Mul(y, op.Reciprocal(rms))
    y = b.cast_like(op.Mul(b.to_float(norm_weight), y), dtype)
    if rope_dim == 0:
        return y
    rot = _rope_interleaved(b.to_float(_slice(y, -rope_dim, _BIG, 2)), positions, inv_freq, rope_dim)
    return op.Concat(_slice(y, 0, -rope_dim, 2), b.cast_like(rot, dtype), axis=-1)


def _with_ape(z, ape, positions, ratio: int):
    """``z + ape[positions mod r]`` in fp32 (``positions [T]`` int64)."""
    return op.Add(b.to_float(z), op.Gather(b.to_float(ape), op.Mod(positions, b.i64(ratio)), axis=0))


# -------------------------------------------------------------------------------- kv_compress
def _kv_compress(a, z, ape, norm_weight, inv_freq, *, ratio: int, overlap: bool, eps: float,
                rope_dim: int):
    """``effexport::kv_compress`` -> ``(entries [B, T//r, c], state_a, state_z)``."""
    r, width = ratio, b.static_dim(ape, 1, "kv_compress ape")
    coff = 2 if overlap else 1
    c = width // coff
    t_len = b.dim(a, 1)
    n = op.Div(t_len, b.i64(r))
    cut = op.Mul(n, b.i64(r))
    a32 = b.to_float(a)
    z32 = _with_ape(z, ape, b.arange(b.i64(0), t_len), r)  # [B, T, W]
    shape = op.Concat(op.Shape(a, start=0, end=1), op.Reshape(n, b.ints([1])), b.ints([r, width]), axis=0)
    cut1 = op.Reshape(cut, b.ints([1]))
    blk_a = op.Reshape(op.Slice(a32, b.ints([0]), cut1, b.ints([1])), shape)  # [B, n, r, W]
    blk_z = op.Reshape(op.Slice(z32, b.ints([0]), cut1, b.ints([1])), shape)
    prev_a = prev_z = None
    if overlap:  # block i-1 of every block i; block -1 is (0, -inf)
        first = op.Concat(op.Shape(a, start=0, end=1), b.ints([1, r, width]), axis=0)
        n1 = op.Reshape(n, b.ints([1]))  # [(0, -inf) | blocks][:n]: also right for n = 0
        prev_a = op.Slice(op.Concat(op.Expand(b.f32c(0.0), first), blk_a, axis=1), b.ints([0]), n1, b.ints([1]))
        prev_z = op.Slice(op.Concat(op.Expand(b.f32c(_NEG_INF), first), blk_z, axis=1), b.ints([0]), n1,
                          b.ints([1]))
    pooled = _pool(blk_a, blk_z, prev_a, prev_z, c)  # [B, n, c]
    positions = op.Mul(b.arange(b.i64(0), n), b.i64(r))
    entries = _finish(pooled, norm_weight, inv_freq, positions, eps, rope_dim, a.dtype)

    # state row j: current block rows (from coff*r - r) hold tokens cut.., overlap rows [:r] hold
    # the last completed block; anything else is the pad row T = (0, -inf)
    rows = coff * r
    j = op.Range(b.i64(0), b.i64(rows), b.i64(1))
    cur_src = op.Add(cut, op.Sub(j, b.i64(rows - r)))
    src = op.Where(op.And(op.GreaterOrEqual(j, b.i64(rows - r)), op.Less(cur_src, t_len)), cur_src, t_len)
    if overlap:
        prev_src = op.Add(op.Sub(cut, b.i64(r)), j)
        take_prev = op.And(op.Less(j, b.i64(r)), op.Greater(n, b.i64(0)))
        src = op.Where(take_prev, prev_src, src)
    pad = op.Concat(op.Shape(a, start=0, end=1), b.ints([1, width]), axis=0)
    state_a = op.Gather(op.Concat(a32, op.Expand(b.f32c(0.0), pad), axis=1), src, axis=1)
    state_z = op.Gather(op.Concat(z32, op.Expand(b.f32c(_NEG_INF), pad), axis=1), src, axis=1)
    return entries, state_a, state_z


def _kv_compress_step(a, z, ape, norm_weight, inv_freq, comp_cache, state_a, state_z, pos, *,
                     ratio: int, overlap: bool, eps: float, rope_dim: int):
    """``effexport::kv_compress_step`` -> ``(comp_cache', state_a', state_z')`` (static shapes)."""
    r, width = ratio, b.static_dim(ape, 1, "kv_compress_step ape")
    c = width // (2 if overlap else 1)
    rows = b.static_dim(state_a, 1, "kv_compress_step state_a")
    t_len = b.host_dim(a, 1)  # read by host and CUDA nodes alike: not an alias of Shape's output
    m = op.Mod(pos, b.i64(r))  # tokens of the current block already in the state
    blk0 = op.Div(op.Sub(pos, m), b.i64(r))
    z32 = _with_ape(z, ape, b.positions(pos, t_len), r)

    # buffer row j holds position r*blk0 + j: state rows j < m, then the T new tokens, then padding
    nblk = op.Add(op.Div(t_len, b.i64(r)), b.i64(2))
    j = op.Range(b.i64(0), op.Mul(nblk, b.i64(r)), b.i64(1))
    from_state = op.Less(j, m)
    valid = op.Or(from_state, op.Less(op.Sub(j, m), b.on_device(t_len)))
    src = op.Where(from_state, j, op.Sub(op.Add(j, b.i64(r)), m))
    src = op.Min(src, b.on_device(op.Sub(op.Add(t_len, b.i64(r)), b.i64(1))))
    cur_a = op.Gather(op.Concat(_slice(b.to_float(state_a), -r, _BIG, 1), b.to_float(a), axis=1), src, axis=1)
    cur_z = op.Gather(op.Concat(_slice(b.to_float(state_z), -r, _BIG, 1), z32, axis=1), src, axis=1)
    valid_rows = op.Unsqueeze(valid, b.ints([1]))
    buf_a = op.Where(valid_rows, cur_a, b.f32c(0.0))  # [B, nblk*r, W]
    buf_z = op.Where(valid_rows, cur_z, b.f32c(_NEG_INF))
    if overlap:  # prepend the previous block: ext block k+1 = buffer block k
        buf_a = op.Concat(_slice(b.to_float(state_a), 0, r, 1), buf_a, axis=1)
        buf_z = op.Concat(_slice(b.to_float(state_z), 0, r, 1), buf_z, axis=1)
    blocks_a = op.Reshape(buf_a, b.ints([0, -1, r, width]))
    blocks_z = op.Reshape(buf_z, b.ints([0, -1, r, width]))
    if overlap:
        pooled = _pool(_slice(blocks_a, 1, _BIG, 1), _slice(blocks_z, 1, _BIG, 1),
                       _slice(blocks_a, 0, -1, 1), _slice(blocks_z, 0, -1, 1), c)
    else:
        pooled = _pool(blocks_a, blocks_z, None, None, c)  # [B, nblk, c]
    blk = b.positions(blk0, nblk)  # global block index of each buffer block
    complete = op.LessOrEqual(op.Mul(op.Add(blk, b.i64(1)), b.i64(r)), b.plus(pos, t_len))  # [nblk]
    entries = _finish(pooled, norm_weight, inv_freq, op.Mul(blk, b.i64(r)), eps, rope_dim,
                      comp_cache.dtype)

    # slot s takes buffer block s - blk0 when that block completed in this call
    k = op.Sub(op.Range(b.i64(0), b.host_dim(comp_cache, 1), b.i64(1)), blk0)  # [N]
    last_blk = b.on_device(op.Sub(nblk, b.i64(1)))
    kc = op.Max(op.Min(k, last_blk), b.i64(0))
    write = op.And(op.And(op.GreaterOrEqual(k, b.i64(0)), op.LessOrEqual(k, last_blk)), op.Gather(complete, kc, axis=0))
    cache_new = op.Where(op.Unsqueeze(write, b.ints([0, 2])), op.Gather(entries, kc, axis=1), comp_cache)

    # new state: buffer rows from the last (incomplete) block on, unfilled rows reset to (0, -inf)
    m_end = b.plus(m, t_len)
    done = op.Div(m_end, b.i64(r))
    row = op.Range(b.i64(0), b.i64(rows), b.i64(1))
    filled = op.Unsqueeze(op.Less(row, op.Add(b.i64(rows - r), op.Mod(m_end, b.i64(r)))),
                          b.ints([1]))
    take = op.Add(op.Mul(done, b.i64(r)), row)
    new_a = op.Where(filled, op.Gather(buf_a, take, axis=1), b.f32c(0.0))
    new_z = op.Where(filled, op.Gather(buf_z, take, axis=1), b.f32c(_NEG_INF))
    return cache_new, b.cast_like(new_a, state_a.dtype), b.cast_like(new_z, state_z.dtype)


# ------------------------------------------------------------------------------- indexer_topk
def _indexer_topk(q, w, k_idx, pos, *, ratio: int, topk: int):
    """``effexport::indexer_topk`` -> ``idx [B, T, topk]`` int64 (TopK; -1 past the visible)."""
    keys = op.Unsqueeze(op.Transpose(b.to_float(k_idx), perm=[0, 2, 1]), b.ints([1]))  # [B, 1, di, N]
    scores = op.Relu(op.MatMul(b.to_float(q), keys))  # [B, T, Hi, N]
    scores = op.ReduceSum(op.Mul(scores, op.Unsqueeze(b.to_float(w), b.ints([-1]))), b.ints([2]),
                          keepdims=0)  # [B, T, N]
    n, t_len = b.dim(k_idx, 1), b.dim(q, 1)
    q_pos = b.positions(pos, t_len)  # [T]
    entry_end = op.Mul(op.Range(b.i64(1), op.Add(n, b.i64(1)), b.i64(1)), b.i64(ratio))  # r*(i+1)
    visible = op.LessOrEqual(op.Unsqueeze(entry_end, b.ints([0])),
                             op.Unsqueeze(op.Add(q_pos, b.i64(1)), b.ints([1])))  # [T, N]
    # pad with never-visible columns so TopK always has >= topk candidates
    pad = op.Reshape(op.Max(op.Sub(b.i64(topk), n), b.i64(0)), b.ints([1]))
    pad_shape = op.Concat(op.Shape(scores, start=0, end=2), pad, axis=0)
    scores = op.Concat(scores, op.Expand(b.f32c(_NEG_INF), pad_shape), axis=-1)
    never = op.Expand(op.Cast(b.i64(0), to=ir.DataType.BOOL),
                      op.Concat(op.Shape(visible, start=0, end=1), pad, axis=0))  # [T, pad]
    visible = op.Concat(visible, never, axis=-1)
    masked = op.Where(op.Unsqueeze(visible, b.ints([0])), scores, b.f32c(_NEG_INF))
    _, order = op.TopK(masked, b.ints([topk]), axis=-1, largest=1, sorted=1)  # [B, T, topk]
    n_visible = op.ReduceSum(op.Cast(visible, to=ir.DataType.INT64), b.ints([-1]), keepdims=1)  # [T, 1]
    real = op.Less(op.Unsqueeze(op.Range(b.i64(0), b.i64(topk), b.i64(1)), b.ints([0])), n_visible)
    return op.Where(op.Unsqueeze(real, b.ints([0])), order, b.i64(-1))


# --------------------------------------------------------------------------- sparse attention
def _attend(q, kv, kv_pos, comp, idx, sink, q_pos, scale: float, window: int, ratio: int):
    """Window + compressed + sink attention (the eager ``_attend``) -> ``[B, T, H, D]``."""
    qf, kvf = b.to_float(q), b.to_float(kv)
    heads = b.static_dim(q, 2, "sparse_attention q")
    diff = op.Sub(op.Unsqueeze(q_pos, b.ints([1])), op.Unsqueeze(kv_pos, b.ints([0])))  # [T, S]
    win_ok = op.And(op.And(op.GreaterOrEqual(diff, b.i64(0)), op.Less(diff, b.i64(window))),
                    op.Unsqueeze(op.GreaterOrEqual(kv_pos, b.i64(0)), b.ints([0])))
    kv_t = op.Unsqueeze(op.Transpose(kvf, perm=[0, 2, 1]), b.ints([1]))  # [B, 1, D, S]
    scale_c = b.f32c(scale)
    logits = [op.Where(op.Unsqueeze(win_ok, b.ints([0, 2])), op.Mul(op.MatMul(qf, kv_t), scale_c),
                       b.f32c(_NEG_INF))]  # [B, T, H, S]
    values, gathered = kvf, None
    if ratio > 0:
        compf = b.to_float(comp)
        n = b.dim(comp, 1)
        if idx is None:  # HCA: every visible entry
            entry_end = op.Mul(op.Range(b.i64(1), op.Add(n, b.i64(1)), b.i64(1)), b.i64(ratio))
            visible = op.LessOrEqual(op.Unsqueeze(entry_end, b.ints([0])),
                                     op.Unsqueeze(op.Add(q_pos, b.i64(1)), b.ints([1])))  # [T, N]
            comp_t = op.Unsqueeze(op.Transpose(compf, perm=[0, 2, 1]), b.ints([1]))  # [B, 1, D, N]
            logits.append(op.Where(op.Unsqueeze(visible, b.ints([0, 2])),
                                   op.Mul(op.MatMul(qf, comp_t), scale_c), b.f32c(_NEG_INF)))
            values = op.Concat(kvf, compf, axis=1)  # [B, S+N, D]
        else:  # CSA: the selected entries, gathered per query
            # the entry count (a shape, on the host) meets the device indices on the device: ONNX
            # Runtime would otherwise copy it there (a Memcpy node: no CUDA graph)
            n_dev, last = b.on_device(n), b.on_device(op.Sub(n, b.i64(1)))
            ok = op.And(op.And(op.GreaterOrEqual(idx, b.i64(0)), op.Less(idx, n_dev)),
                        op.LessOrEqual(op.Mul(op.Add(idx, b.i64(1)), b.i64(ratio)),
                                       op.Unsqueeze(op.Add(q_pos, b.i64(1)), b.ints([0, 2]))))  # [B, T, K]
            safe = op.Max(op.Min(idx, last), b.i64(0))
            gathered = op.GatherND(compf, op.Unsqueeze(safe, b.ints([-1])), batch_dims=1)  # [B, T, K, D]
            comp_logits = op.MatMul(qf, op.Transpose(gathered, perm=[0, 1, 3, 2]))  # [B, T, H, K]
            logits.append(op.Where(op.Unsqueeze(ok, b.ints([2])), op.Mul(comp_logits, scale_c),
                                   b.f32c(_NEG_INF)))
    sink_col = op.Expand(op.Reshape(b.to_float(sink), b.ints([1, 1, heads, 1])),
                         op.Concat(op.Shape(q, start=0, end=3), b.ints([1]), axis=0))
    probs = op.Softmax(op.Concat(*logits, sink_col, axis=-1), axis=-1)  # [B, T, H, S(+N|K)+1]
    n_values = op.Shape(values, start=1, end=2)  # [1]
    out = op.MatMul(op.Slice(probs, b.ints([0]), n_values, b.ints([3])), op.Unsqueeze(values, b.ints([1])))
    if gathered is not None:
        probs_c = op.Slice(probs, n_values, b.ints([-1]), b.ints([3]))  # [B, T, H, K]
        out = op.Add(out, op.MatMul(probs_c, gathered))
    return b.cast_like(out, q.dtype)


def _sparse_attention(q, kv, comp, idx, sink, pos, *, scale: float, window: int, ratio: int):
    """``effexport::sparse_attention``: raw entries as a sequence ending at ``pos + T - 1``."""
    t_len, s_len = b.dim(q, 1), b.dim(kv, 1)
    q_pos = b.positions(pos, t_len)
    kv_pos = b.positions(b.plus(pos, op.Sub(t_len, s_len)), s_len)
    return _attend(q, kv, kv_pos, comp, idx, sink, q_pos, scale, window, ratio)


def _sparse_attention_ring(q, kv_ring, comp, idx, sink, pos, *, scale: float, window: int, ratio: int):
    """``effexport::sparse_attention_ring``: slot ``s`` holds the newest position ``== s mod W``."""
    slots = b.static_dim(kv_ring, 1, "sparse_attention_ring kv_ring")
    t_len = b.dim(q, 1)
    last = b.plus(pos, op.Sub(t_len, b.i64(1)))
    kv_pos = op.Sub(last, op.Mod(op.Sub(last, op.Range(b.i64(0), b.i64(slots), b.i64(1))), b.i64(slots)))
    return _attend(q, kv_ring, kv_pos, comp, idx, sink, b.positions(pos, t_len), scale, window, ratio)


# ------------------------------------------------------------------------- nodes and schemas
_SCHEMAS = {  # name: (body, inputs, outputs, attributes, optional inputs)
    "kv_compress": (_kv_compress, ("a", "z", "ape", "norm_weight", "inv_freq"),
                    ("entries", "new_state_a", "new_state_z"),
                    (("ratio", int), ("overlap", int), ("eps", float), ("rope_dim", int)), ()),
    "kv_compress_step": (_kv_compress_step, ("a", "z", "ape", "norm_weight", "inv_freq", "comp_cache", "state_a",
                                             "state_z", "pos"), ("new_comp_cache", "new_state_a", "new_state_z"),
                         (("ratio", int), ("overlap", int), ("eps", float), ("rope_dim", int)), ()),
    "indexer_topk": (_indexer_topk, ("q", "w", "k_idx", "pos"), ("idx",), (("ratio", int), ("topk", int)), ()),
    "sparse_attention": (_sparse_attention, ("q", "kv", "comp", "idx", "sink", "pos"), ("out",),
                         (("scale", float), ("window", int), ("ratio", int)), ("idx",)),
    "sparse_attention_ring": (_sparse_attention_ring, ("q", "kv_ring", "comp", "idx", "sink", "pos"), ("out",),
                              (("scale", float), ("window", int), ("ratio", int)), ("idx",)),
}
for _name, (_, _inputs, _outputs, _attrs, _optional) in _SCHEMAS.items():
    declare(_name, _inputs, _outputs, _attrs, optional=_optional, doc=f"DeepSeek V4 effexport::{_name}.")


def _node(name: str, *args, **params):
    """One ``effexport::<name>`` node; ``params`` are both its attributes and the body's arguments."""
    return call(name, _SCHEMAS[name][0], args, params, params)


def kv_compress(a, z, ape, norm_weight, inv_freq, *, ratio: int, overlap: bool, eps: float, rope_dim: int):
    """``effexport::kv_compress`` -> one node; outputs ``(entries [B, T//r, c], state_a, state_z)``."""
    return _node("kv_compress", a, z, ape, norm_weight, inv_freq, ratio=ratio, overlap=overlap, eps=eps,
                 rope_dim=rope_dim)


def kv_compress_step(a, z, ape, norm_weight, inv_freq, comp_cache, state_a, state_z, pos, *, ratio: int,
                     overlap: bool, eps: float, rope_dim: int):
    """``effexport::kv_compress_step`` -> one node; outputs keep the cache and state shapes."""
    return _node("kv_compress_step", a, z, ape, norm_weight, inv_freq, comp_cache, state_a, state_z, pos,
                 ratio=ratio, overlap=overlap, eps=eps, rope_dim=rope_dim)


def indexer_topk(q, w, k_idx, pos, *, ratio: int, topk: int):
    """``effexport::indexer_topk`` -> one node; output ``idx [B, T, topk]`` int64."""
    return _node("indexer_topk", q, w, k_idx, pos, ratio=ratio, topk=topk)


def sparse_attention(q, kv, comp, idx, sink, pos, *, scale: float, window: int, ratio: int):
    """``effexport::sparse_attention`` -> one node (``idx`` None: HCA / window only)."""
    return _node("sparse_attention", q, kv, comp, idx, sink, pos, scale=scale, window=window, ratio=ratio)


def sparse_attention_ring(q, kv_ring, comp, idx, sink, pos, *, scale: float, window: int, ratio: int):
    """``effexport::sparse_attention_ring`` -> one node (``idx`` None: HCA / window only)."""
    return _node("sparse_attention_ring", q, kv_ring, comp, idx, sink, pos, scale=scale, window=window,
                 ratio=ratio)


def _table():
    import effexport.custom_ops.indexer_topk  # noqa: F401  (registers the ops)
    import effexport.custom_ops.kv_compress  # noqa: F401
    import effexport.custom_ops.sparse_attention  # noqa: F401

    ops = torch.ops.effexport
    return {ops.kv_compress.default: kv_compress, ops.kv_compress_step.default: kv_compress_step,
            ops.indexer_topk.default: indexer_topk, ops.sparse_attention.default: sparse_attention,
            ops.sparse_attention_ring.default: sparse_attention_ring}


TRANSLATIONS = _table()
"""{OpOverload: translation} (the same in every profile)."""
