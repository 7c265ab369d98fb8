"""DeepSeek V4 KV compressor (CSA / HCA): gated softmax pooling of ``r`` tokens into one KV entry.

Two functional ``torch.library.custom_op`` forms in the ``effexport`` namespace, with eager
references (pure torch, any device: the oracle for every kernel and backend) and fake kernels that
work with symbolic batch and sequence sizes:

``kv_compress``       prefill from position 0: every completed block of the sequence becomes an
                      entry; returns the entries and the running state for the next call.
``kv_compress_step``  decode (or chunked prefill) of ``T >= 1`` tokens at absolute position ``pos``
                      against a fixed-capacity entry buffer: entry ``i`` is written at slot ``i``
                      when block ``i`` completes. All output shapes are static.

Math (official ``inference/model.py::Compressor``; spec section 4.3). Per token ``j`` the caller
computes ``a_j = x_j W^c_kv`` and ``z_j = x_j W^c_gate`` (both ``[coff * c]``, the matmuls stay in the
graph). The op adds the learned position bias ``ape[j mod r]`` to ``z_j`` and pools per channel:

* HCA (``overlap=False``, coff 1, r = 128 in the real models): ``C_i = sum_{j in block i}
  softmax_j(z_j) * a_j`` over the r tokens of block ``i = [r*i, r*i + r)``.
* CSA (``overlap=True``, coff 2, r = 4): the softmax runs over 2r tokens: the current block through
  the second half of the projections (``a_j[c:]``, ``z_j[c:]``) and the previous block through the
  first half (``a_j[:c]``, ``z_j[:c]``); block -1 contributes logits -inf (weight 0).
* Then ``C_i = RMSNorm(C_i) * norm_weight`` (eps ``eps``) and interleaved-pair RoPE (complex
  convention of the official ``apply_rotary_emb``: dims ``(2k, 2k+1)`` rotate by
  ``(r*i) * inv_freq[k]``) on the last ``rope_dim`` dims, at position ``r*i`` (the block's first
  token). Entry ``i`` is visible to a query at position ``t`` iff ``r*(i+1) <= t+1``.

State (``[B, coff*r, coff*c]``, float32, like the official ``kv_state`` / ``score_state``): rows
``[-r:]`` hold the incomplete current block (row ``p mod r`` holds position ``p``; ``a`` and
``z + ape``), and with ``overlap`` rows ``[:r]`` hold the previous completed block. Rows not yet
filled are ``(a=0, z=-inf)``: :func:`empty_state` is the state before position 0, and the state
after any sequence of calls is exactly the state the prefill form returns for the same tokens.

Pooling, norm and RoPE run in fp32; entries take ``a``'s dtype (prefill) or ``comp_cache``'s dtype
(step), after the official rounding points (pooled and normed values are rounded to that dtype).

Outside the ops (stay in the graph, or belong to other ops): the ``W^c_kv`` / ``W^c_gate``
projections, the FP8 (main KV, non-rope dims, blocks of 64) or Hadamard + FP4 (indexer keys)
quantization simulation the official code applies to the entries afterwards, the YaRN frequency
table (passed in as ``inv_freq``), and the placement of entries after the window ring in the
official single ``kv_cache`` tensor. No autograd is registered (export / inference only).
"""
from __future__ import annotations

import torch

__all__ = ["kv_compress", "kv_compress_step", "empty_state", "rope_interleaved", "OPS"]


# ------------------------------------------------------------------------------------ validation
def _check(a, z, ape, norm_weight, inv_freq, ratio: int, overlap: bool, rope_dim: int, what: str) -> int:
    """Shape checks shared by eager and fake kernels; returns the entry width ``c``."""
    coff = 2 if overlap else 1
    if ratio < 1:
        raise ValueError(f"{what}: ratio must be >= 1, got {ratio}")
    if a.dim() != 3 or z.shape != a.shape:
        raise ValueError(f"{what}: a and z must be [B, T, coff*c] of equal shape; got "
                         f"{tuple(a.shape)} and {tuple(z.shape)}")
    width = a.shape[-1]
    if width % coff:
        raise ValueError(f"{what}: projection width {width} is not divisible by coff={coff}")
    c = width // coff
    if tuple(ape.shape) != (ratio, width):
        raise ValueError(f"{what}: ape must be [{ratio}, {width}], got {tuple(ape.shape)}")
    if tuple(norm_weight.shape) != (c,):
        raise ValueError(f"{what}: norm_weight must be [{c}], got {tuple(norm_weight.shape)}")
    if rope_dim < 0 or rope_dim % 2 or rope_dim > c or tuple(inv_freq.shape) != (rope_dim // 2,):
        raise ValueError(f"{what}: need an even rope_dim <= {c} and inv_freq [rope_dim/2]; got "
                         f"rope_dim={rope_dim}, inv_freq {tuple(inv_freq.shape)}")
    return c


def _check_step(a, comp_cache, state_a, state_z, pos, ratio: int, overlap: bool, c: int, what: str):
    coff = 2 if overlap else 1
    state_shape = (a.shape[0], coff * ratio, coff * c)
    if tuple(state_a.shape) != state_shape or tuple(state_z.shape) != state_shape:
        raise ValueError(f"{what}: states must be {list(state_shape)}; got {tuple(state_a.shape)} "
                         f"and {tuple(state_z.shape)}")
    if comp_cache.dim() != 3 or comp_cache.shape[0] != a.shape[0] or comp_cache.shape[2] != c:
        raise ValueError(f"{what}: comp_cache must be [B, N, {c}], got {tuple(comp_cache.shape)}")
    if pos.dim() != 0 or pos.dtype != torch.int64:
        raise ValueError(f"{what}: pos must be a 0-d int64 tensor, got shape {tuple(pos.shape)} "
                         f"dtype {pos.dtype}")


# -------------------------------------------------------------------------------- shared pieces
def rope_interleaved(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE on all dims of ``x [..., n, rd]`` (fp32 in, fp32 out): pair
    ``(x[2k], x[2k+1])`` is multiplied, as a complex number, by ``exp(i * positions[n] * inv_freq[k])``
    (the official ``apply_rotary_emb`` with ``freqs_cis = polar(1, outer(pos, inv_freq))``)."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # [n, rd/2]
    cos, sin = angles.cos(), angles.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]  # [..., n, rd/2] each
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def _pool(cur_a, cur_z, prev_a, prev_z, c: int) -> torch.Tensor:
    """Softmax pooling of blocks ``[B, n, r, coff*c]`` (fp32) -> ``[B, n, c]``; with ``prev_*``
    (CSA overlap) the previous blocks' first halves join the current blocks' second halves."""
    if prev_a is not None:
        cur_a = torch.cat([prev_a[..., :c], cur_a[..., c:]], dim=2)  # [B, n, 2r, c]
        cur_z = torch.cat([prev_z[..., :c], cur_z[..., c:]], dim=2)
    return (cur_a * torch.softmax(cur_z, dim=2)).sum(dim=2)  # [B, n, c]


def _finish(pooled, norm_weight, inv_freq, positions, eps: float, rope_dim: int, dtype):
    """RMSNorm with weight, then RoPE on the last ``rope_dim`` dims at ``positions [n]``; rounding
    to ``dtype`` where the official code does (after pooling, after the norm, after RoPE)."""
    y = pooled.to(dtype).float()  # [B, n, c]
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    y = (norm_weight.float() * y).to(dtype)
    if rope_dim == 0:
        return y
    rot = rope_interleaved(y[..., -rope_dim:].float(), positions, inv_freq).to(dtype)
    return torch.cat([y[..., :-rope_dim], rot], dim=-1)


def empty_state(batch: int, ratio: int, overlap: bool, c: int,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressor state before position 0: ``(state_a, state_z)`` of shape
    ``[batch, coff*ratio, coff*c]`` float32, ``a = 0`` and ``z = -inf``."""
    coff = 2 if overlap else 1
    shape = (batch, coff * ratio, coff * c)
    return (torch.zeros(shape, dtype=torch.float32, device=device),
            torch.full(shape, float("-inf"), dtype=torch.float32, device=device))


# ----------------------------------------------------------------------------------- prefill op
@torch.library.custom_op("effexport::kv_compress", mutates_args=())
def kv_compress(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                inv_freq: torch.Tensor, *, ratio: int, overlap: bool, eps: float,
                rope_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress a sequence that starts at position 0.

    Args: ``a``, ``z`` ``[B, T, coff*c]`` (``coff = 2`` if ``overlap`` else 1); ``ape [r, coff*c]``;
    ``norm_weight [c]``; ``inv_freq [rope_dim/2]``. Returns ``entries [B, T//r, c]`` (entry ``i``
    pools block ``i``; a trailing incomplete block emits nothing), and the states ``state_a``,
    ``state_z`` ``[B, coff*r, coff*c]`` float32 to continue with :func:`kv_compress_step` at
    ``pos = T``.
    """
    c = _check(a, z, ape, norm_weight, inv_freq, ratio, overlap, rope_dim, "kv_compress")
    bsz, seqlen, width = a.shape
    n, r = seqlen // ratio, ratio
    cut = n * r
    a32 = a.float()
    z32 = z.float() + ape.float()[torch.arange(seqlen, device=a.device) % r]  # [B, T, W]
    blk_a = a32[:, :cut].reshape(bsz, n, r, width)  # [B, n, r, W]
    blk_z = z32[:, :cut].reshape(bsz, n, r, width)
    prev_a = prev_z = None
    if overlap:  # block i-1 of every block i; block -1 is (0, -inf)
        prev_a = torch.cat([torch.zeros_like(blk_a[:, :1]), blk_a[:, :-1]], dim=1)
        prev_z = torch.cat([torch.full_like(blk_z[:, :1], float("-inf")), blk_z[:, :-1]], dim=1)
    pooled = _pool(blk_a, blk_z, prev_a, prev_z, c)  # [B, n, c]
    positions = torch.arange(n, device=a.device) * r
    entries = _finish(pooled, norm_weight, inv_freq, positions, eps, rope_dim, a.dtype)

    state_a, state_z = empty_state(bsz, r, overlap, c, a.device)
    rem = seqlen - cut
    cur = state_a.shape[1] - r  # first row of the current block
    state_a[:, cur:cur + rem] = a32[:, cut:]
    state_z[:, cur:cur + rem] = z32[:, cut:]
    if overlap and n > 0:
        state_a[:, :r] = a32[:, cut - r:cut]
        state_z[:, :r] = z32[:, cut - r:cut]
    return entries, state_a, state_z


@kv_compress.register_fake
def _(a, z, ape, norm_weight, inv_freq, *, ratio, overlap, eps, rope_dim):
    c = _check(a, z, ape, norm_weight, inv_freq, ratio, overlap, rope_dim, "kv_compress")
    coff = 2 if overlap else 1
    bsz, seqlen = a.shape[0], a.shape[1]
    state = (bsz, coff * ratio, coff * c)
    return (a.new_empty((bsz, seqlen // ratio, c)), a.new_empty(state, dtype=torch.float32),
            a.new_empty(state, dtype=torch.float32))


# -------------------------------------------------------------------------------------- step op
@torch.library.custom_op("effexport::kv_compress_step", mutates_args=())
def kv_compress_step(a: torch.Tensor, z: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                     inv_freq: torch.Tensor, comp_cache: torch.Tensor, state_a: torch.Tensor,
                     state_z: torch.Tensor, pos: torch.Tensor, *, ratio: int, overlap: bool,
                     eps: float, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed ``T >= 1`` tokens at absolute positions ``pos .. pos+T-1`` to the compressor.

    Args: ``a``, ``z`` ``[B, T, coff*c]``, ``ape``, ``norm_weight``, ``inv_freq`` as in
    :func:`kv_compress`; ``comp_cache [B, N, c]`` the entry buffer (``N = max_context // r``);
    ``state_a``, ``state_z`` ``[B, coff*r, coff*c]`` the state after position ``pos - 1``
    (:func:`empty_state` at ``pos = 0``); ``pos`` 0-d int64. Returns ``(comp_cache_new,
    state_a_new, state_z_new)`` with the shapes and dtypes of the inputs: every block ``i`` that
    completes within the call is pooled and written at slot ``i`` (slots ``>= N`` are dropped),
    every other slot is copied unchanged.

    Data-independent shapes: the new tokens are laid after the state's current block in a buffer
    of ``r * (T//r + 2)`` rows by an index gather, so the kernel needs no ``pos``-dependent size.
    """
    c = _check(a, z, ape, norm_weight, inv_freq, ratio, overlap, rope_dim, "kv_compress_step")
    _check_step(a, comp_cache, state_a, state_z, pos, ratio, overlap, c, "kv_compress_step")
    bsz, seqlen, width = a.shape
    r, dev = ratio, a.device
    p0 = pos.to(device=dev, dtype=torch.int64)
    m = p0 % r  # tokens of the current block already in the state
    blk0 = (p0 - m) // r  # global index of the current block
    z32 = z.float() + ape.float()[(p0 + torch.arange(seqlen, device=dev)) % r]  # [B, T, W]

    # buffer row j holds position r*blk0 + j: state rows j < m, then the T new tokens, then padding
    nblk = seqlen // r + 2
    j = torch.arange(nblk * r, device=dev)
    from_state = j < m
    valid = from_state | (j - m < seqlen)
    src = torch.where(from_state, j, r + j - m).clamp(max=r + seqlen - 1)  # [nblk*r]
    cur_a = torch.cat([state_a[:, -r:].float(), a.float()], dim=1).index_select(1, src)
    cur_z = torch.cat([state_z[:, -r:].float(), z32], dim=1).index_select(1, src)
    buf_a = torch.where(valid[:, None], cur_a, 0.0)  # [B, nblk*r, W]
    buf_z = torch.where(valid[:, None], cur_z, float("-inf"))
    if overlap:  # prepend the previous block: ext block k+1 = buffer block k
        buf_a = torch.cat([state_a[:, :r].float(), buf_a], dim=1)  # [B, (nblk+1)*r, W]
        buf_z = torch.cat([state_z[:, :r].float(), buf_z], dim=1)
    blocks_a = buf_a.reshape(bsz, -1, r, width)
    blocks_z = buf_z.reshape(bsz, -1, r, width)
    if overlap:
        pooled = _pool(blocks_a[:, 1:], blocks_z[:, 1:], blocks_a[:, :-1], blocks_z[:, :-1], c)
    else:
        pooled = _pool(blocks_a, blocks_z, None, None, c)  # [B, nblk, c]
    blk = blk0 + torch.arange(nblk, device=dev)  # global block index of each buffer block
    complete = (blk + 1) * r <= p0 + seqlen  # [nblk]
    entries = _finish(pooled, norm_weight, inv_freq, blk * r, eps, rope_dim, comp_cache.dtype)

    # slot s takes buffer block s - blk0 when that block completed in this call
    k = torch.arange(comp_cache.shape[1], device=dev) - blk0  # [N]
    kc = k.clamp(0, nblk - 1)
    write = (k >= 0) & (k < nblk) & complete[kc]
    cache_new = torch.where(write[None, :, None], entries.index_select(1, kc), comp_cache)

    # new state: buffer rows from the last (incomplete) block on, unfilled rows reset to (0, -inf)
    done = (m + seqlen) // r  # blocks completed in this call
    rows = done * r + torch.arange(state_a.shape[1], device=dev)  # in buf (with the prev block)
    filled = torch.arange(state_a.shape[1], device=dev) < state_a.shape[1] - r + (m + seqlen) % r
    new_a = torch.where(filled[:, None], buf_a.index_select(1, rows), 0.0)
    new_z = torch.where(filled[:, None], buf_z.index_select(1, rows), float("-inf"))
    return cache_new, new_a.to(state_a.dtype), new_z.to(state_z.dtype)


@kv_compress_step.register_fake
def _(a, z, ape, norm_weight, inv_freq, comp_cache, state_a, state_z, pos, *, ratio, overlap, eps,
      rope_dim):
    c = _check(a, z, ape, norm_weight, inv_freq, ratio, overlap, rope_dim, "kv_compress_step")
    _check_step(a, comp_cache, state_a, state_z, pos, ratio, overlap, c, "kv_compress_step")
    return (torch.empty_like(comp_cache), torch.empty_like(state_a), torch.empty_like(state_z))


OPS = (torch.ops.effexport.kv_compress.default, torch.ops.effexport.kv_compress_step.default)
