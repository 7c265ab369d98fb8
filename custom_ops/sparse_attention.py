"""DeepSeek V4 core attention: sliding window over raw KV + compressed entries (CSA / HCA) + sink.

Two functional ``torch.library.custom_op`` forms in the ``effexport`` namespace, with eager
references (pure torch, any device: the oracle for every kernel and backend) and fake kernels that
work with symbolic batch and sequence sizes:

``sparse_attention``       prefill (or chunked prefill): the raw entries arrive as a sequence.
``sparse_attention_ring``  decode: the raw entries live in a ring of W slots (slot ``p mod W``).

Math (official ``Attention.forward`` + ``sparse_attn`` kernel; spec section 4.3). One tensor is
both key and value (shared-KV MQA, one KV head for all H query heads). For the query at absolute
position ``t``, the attended set is

* window: the raw entries at positions ``t - window + 1 .. t`` (those that exist),
* compressed (``ratio >= 1``): with ``idx`` (CSA), the entries ``comp[idx[t, k]]`` for every ``k``
  with ``idx >= 0`` (and, for safety, ``idx < N`` and visible); without ``idx`` (HCA), every
  visible entry; entry ``i`` is visible iff ``ratio * (i + 1) <= t + 1``. ``ratio = 0``: window
  only (the pure sliding-window layers).

``o_h = sum_s exp(l_s) kv_s / (sum_s exp(l_s) + exp(sink_h))`` with ``l_s = scale * q_h . kv_s``:
the per-head sink logit joins the denominator only (it carries no value). Logits, softmax and the
weighted sum run in fp32; the output has q's dtype. An index repeated in ``idx`` is counted twice,
as in the official gather kernel (:func:`~effexport.custom_ops.indexer_topk.indexer_topk` never
repeats one). ``pos`` (0-d int64) is the position of the first query; all batch rows share positions.

Outside the ops (stay in the graph or belong to other ops): the q / kv projections, norms, RoPE
and FP8 simulation that produce ``q``, ``kv`` and ``comp``; the inverse RoPE of the output's last
``rope_dim`` dims (``o[..., -rd:] = RoPE^-1(o[..., -rd:], t)``: V carries K's rotation); the grouped
low-rank output projection (``wo_a`` per group, then ``wo_b``); writing the new raw entries into
the ring (the caller scatters them at ``p mod W`` before calling the ring form); the indexer
(``effexport::indexer_topk``) and the compressor (``effexport::kv_compress``). No autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from effexport.custom_ops._checks import check_pos

__all__ = ["sparse_attention", "sparse_attention_ring", "OPS"]


# ------------------------------------------------------------------------------------ validation
def _check(q, kv, comp, idx, sink, pos, window: int, ratio: int, what: str) -> None:
    """Shape checks shared by the eager and fake kernels."""
    if q.dim() != 4 or kv.dim() != 3 or comp.dim() != 3:
        raise ValueError(f"{what}: expected q [B, T, H, D], kv [B, S, D], comp [B, N, D]; got "
                         f"{tuple(q.shape)}, {tuple(kv.shape)}, {tuple(comp.shape)}")
    dim = q.shape[3]
    if kv.shape[2] != dim or comp.shape[2] != dim or kv.shape[0] != q.shape[0] or comp.shape[0] != q.shape[0]:
        raise ValueError(f"{what}: kv {tuple(kv.shape)} / comp {tuple(comp.shape)} do not match "
                         f"q {tuple(q.shape)} (batch and head dim)")
    if idx is not None and (idx.dim() != 3 or tuple(idx.shape[:2]) != tuple(q.shape[:2])
                            or idx.dtype != torch.int64):
        raise ValueError(f"{what}: idx must be int64 [B, T, K], got {tuple(idx.shape)} {idx.dtype}")
    if tuple(sink.shape) != (q.shape[2],):
        raise ValueError(f"{what}: sink must be [{q.shape[2]}], got {tuple(sink.shape)}")
    check_pos(pos, what)
    if window < 1 or ratio < 0:
        raise ValueError(f"{what}: need window >= 1 and ratio >= 0, got {window}, {ratio}")


# -------------------------------------------------------------------------------- shared kernel
def _attend(q, kv, kv_pos, comp, idx, sink, q_pos, scale: float, window: int, ratio: int):
    """Attention of ``q [B, T, H, D]`` over the raw entries ``kv [B, S, D]`` at positions
    ``kv_pos [S]`` (negative = empty) and the compressed entries ``comp [B, N, D]``."""
    bsz, seqlen, heads, _ = q.shape
    qf, kvf = q.float(), kv.float()
    diff = q_pos[:, None] - kv_pos[None, :]  # [T, S]
    win_ok = (diff >= 0) & (diff < window) & (kv_pos >= 0)[None, :]
    logits = [torch.einsum("bthd,bsd->bths", qf, kvf) * scale]  # [B, T, H, S]
    masks = [win_ok[None, :, None, :]]
    values = kvf  # [B, S, D]: one value set shared by every query
    n = comp.shape[1]
    gathered = None
    if ratio > 0 and n > 0:
        compf = comp.float()
        if idx is None:  # HCA: every visible entry
            visible = ratio * (torch.arange(n, device=q.device) + 1) <= q_pos[:, None] + 1  # [T, N]
            logits.append(torch.einsum("bthd,bnd->bthn", qf, compf) * scale)
            masks.append(visible[None, :, None, :])
            values = torch.cat([kvf, compf], dim=1)  # [B, S+N, D]
        else:  # CSA: the selected entries, gathered per query
            k = idx.shape[2]
            ok = (idx >= 0) & (idx < n) & (ratio * (idx + 1) <= q_pos[None, :, None] + 1)  # [B, T, K]
            safe = idx.clamp(0, n - 1)
            gathered = compf.unsqueeze(1).expand(bsz, seqlen, n, -1).gather(
                2, safe.unsqueeze(-1).expand(bsz, seqlen, k, compf.shape[-1]))  # [B, T, K, D]
            logits.append(torch.einsum("bthd,btkd->bthk", qf, gathered) * scale)
            masks.append(ok[:, :, None, :])
    sink_logit = sink.float().view(1, 1, heads, 1).expand(bsz, seqlen, heads, 1)
    scores = torch.cat([l.masked_fill(~mk, float("-inf")) for l, mk in zip(logits, masks)]
                       + [sink_logit], dim=-1)  # [B, T, H, S(+N|K)+1]; the sink keeps it finite
    probs = torch.softmax(scores, dim=-1)[..., :-1]  # drop the sink column: denominator only
    s = kv.shape[1]
    out = torch.einsum("bths,bsd->bthd", probs[..., :values.shape[1]], values)
    if gathered is not None:
        out = out + torch.einsum("bthk,btkd->bthd", probs[..., s:], gathered)
    return out.to(q.dtype)  # [B, T, H, D]


# ----------------------------------------------------------------------------------- prefill op
@torch.library.custom_op("effexport::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, kv: torch.Tensor, comp: torch.Tensor, idx: Optional[torch.Tensor],
                     sink: torch.Tensor, pos: torch.Tensor, *, scale: float, window: int,
                     ratio: int) -> torch.Tensor:
    """Window + compressed + sink attention with the raw entries as a sequence.

    Args: ``q [B, T, H, D]`` queries at positions ``pos .. pos+T-1``; ``kv [B, S, D]`` raw
    entries (K = V) whose last row is position ``pos+T-1`` (row ``s`` is position
    ``pos + T - S + s``; prefill: ``S = T``, ``pos = 0``; chunked prefill may prepend the previous
    ``window - 1`` rows; rows at negative positions are ignored); ``comp [B, N, D]`` compressed
    entries (entry ``i`` pools block ``i``; unwritten slots are never visible); ``idx [B, T, K]``
    int64 or None (see the module docstring); ``sink [H]``. Returns ``[B, T, H, D]``.
    """
    _check(q, kv, comp, idx, sink, pos, window, ratio, "sparse_attention")
    seqlen, dev = q.shape[1], q.device
    p0 = pos.to(device=dev, dtype=torch.int64)
    q_pos = p0 + torch.arange(seqlen, device=dev)  # [T]
    kv_pos = p0 + seqlen - kv.shape[1] + torch.arange(kv.shape[1], device=dev)  # [S]
    return _attend(q, kv, kv_pos, comp, idx, sink, q_pos, scale, window, ratio)


@sparse_attention.register_fake
def _(q, kv, comp, idx, sink, pos, *, scale, window, ratio):
    _check(q, kv, comp, idx, sink, pos, window, ratio, "sparse_attention")
    return torch.empty_like(q)


# -------------------------------------------------------------------------------------- ring op
@torch.library.custom_op("effexport::sparse_attention_ring", mutates_args=())
def sparse_attention_ring(q: torch.Tensor, kv_ring: torch.Tensor, comp: torch.Tensor,
                          idx: Optional[torch.Tensor], sink: torch.Tensor, pos: torch.Tensor, *,
                          scale: float, window: int, ratio: int) -> torch.Tensor:
    """Window + compressed + sink attention with the raw entries in a ring buffer.

    ``kv_ring [B, W, D]``: slot ``p mod W`` holds position ``p``, already including the ``T`` new
    tokens ``pos .. pos+T-1`` (slot ``s`` holds the latest position ``<= pos+T-1`` congruent to ``s``;
    positions < 0 are empty). Exact for any ``T`` with ``W >= window + T - 1`` (decode: ``T = 1``,
    ``W = window``, the official 128-slot ring); the eager kernel raises otherwise. Other arguments
    and the result as in :func:`sparse_attention`.
    """
    _check(q, kv_ring, comp, idx, sink, pos, window, ratio, "sparse_attention_ring")
    seqlen, slots, dev = q.shape[1], kv_ring.shape[1], q.device
    if slots < window + seqlen - 1:
        raise ValueError(f"sparse_attention_ring: a ring of {slots} slots cannot serve {seqlen} "
                         f"queries with window {window} (needs W >= window + T - 1)")
    p0 = pos.to(device=dev, dtype=torch.int64)
    q_pos = p0 + torch.arange(seqlen, device=dev)  # [T]
    last = p0 + seqlen - 1
    s = torch.arange(slots, device=dev)
    kv_pos = last - (last - s) % slots  # [W]: the position each slot holds (negative = empty)
    return _attend(q, kv_ring, kv_pos, comp, idx, sink, q_pos, scale, window, ratio)


@sparse_attention_ring.register_fake
def _(q, kv_ring, comp, idx, sink, pos, *, scale, window, ratio):
    _check(q, kv_ring, comp, idx, sink, pos, window, ratio, "sparse_attention_ring")
    return torch.empty_like(q)


OPS = (torch.ops.effexport.sparse_attention.default, torch.ops.effexport.sparse_attention_ring.default)
