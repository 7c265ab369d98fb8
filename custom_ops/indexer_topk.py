"""DeepSeek V4 lightning indexer: ReLU-weighted multi-head scores over compressed keys + causal top-k.

One functional ``torch.library.custom_op``, ``effexport::indexer_topk``, with an eager reference
(pure torch, any device: the oracle for every kernel and backend) and a fake kernel that works with
symbolic batch, sequence and entry counts.

Math (official ``inference/model.py::Indexer.forward``; spec section 4.3), for the query at
absolute position ``t = pos + s`` (``s`` in ``0..T-1``) and compressed key ``i``::

    I[t, i] = sum_h w[t, h] * ReLU(q[t, h] . k[i])            (fp32)
    visible(t, i)  <=>  ratio * (i + 1) <= t + 1               (only completed blocks)
    idx[t] = the ``topk`` visible i with the largest I[t, i], best first

Output slots past the number of visible entries (``min(topk, #visible)`` are real) hold ``-1``.
Ties are broken deterministically: among equal scores the lower entry index comes first (a stable
descending sort; the same rule as ONNX ``TopK``). The official ``torch.topk`` leaves tie order
unspecified, so the selected *set* can differ from it only on exactly tied scores.

Outside the op (stay in the graph or belong to other ops): the query projection ``cQ W^I_qb``,
RoPE on the last ``rope_dim`` dims of q and of the keys, the Hadamard rotation and FP4 simulation
of q and k, the weights projection ``x W_w`` and its scale ``head_dim^-1/2 * n_heads^-1/2`` (``w``
arrives scaled), the indexer's own compressor (``effexport::kv_compress`` produces ``k``), and the
official ``offset`` added to the indices to address its concatenated window + compressed cache
(here indices address ``k`` / ``comp`` directly, as :mod:`effexport.custom_ops.sparse_attention`
expects). No autograd is registered (the output is an integer selection).
"""
from __future__ import annotations

import torch

from effexport.custom_ops._checks import check_pos

__all__ = ["indexer_topk", "OPS"]


def _check(q, w, k_idx, pos, ratio: int, topk: int) -> None:
    """Shape checks shared by the eager and fake kernels."""
    if q.dim() != 4 or w.dim() != 3 or k_idx.dim() != 3:
        raise ValueError(f"indexer_topk: expected q [B, T, Hi, di], w [B, T, Hi], k_idx [B, N, di]; "
                         f"got {tuple(q.shape)}, {tuple(w.shape)}, {tuple(k_idx.shape)}")
    if tuple(w.shape) != tuple(q.shape[:3]):
        raise ValueError(f"indexer_topk: w {tuple(w.shape)} must equal q's [B, T, Hi] {tuple(q.shape[:3])}")
    if k_idx.shape[0] != q.shape[0] or k_idx.shape[2] != q.shape[3]:
        raise ValueError(f"indexer_topk: k_idx {tuple(k_idx.shape)} does not match q {tuple(q.shape)}")
    check_pos(pos, "indexer_topk")
    if ratio < 1 or topk < 1:
        raise ValueError(f"indexer_topk: need ratio >= 1 and topk >= 1, got {ratio}, {topk}")


@torch.library.custom_op("effexport::indexer_topk", mutates_args=())
def indexer_topk(q: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor, pos: torch.Tensor, *,
                 ratio: int, topk: int) -> torch.Tensor:
    """Select the ``topk`` best visible compressed entries per query.

    Args: ``q [B, T, Hi, di]`` indexer queries (RoPE'd, rotated); ``w [B, T, Hi]`` per-head weights
    (already scaled); ``k_idx [B, N, di]`` indexer keys, entry ``i`` pooling block ``i`` (unwritten
    slots past the visible ones may hold anything: they are never selected); ``pos`` 0-d int64, the
    position of the first query. Returns ``idx [B, T, topk]`` int64: entry indices into ``k_idx``
    best first (ties: lower index first), ``-1`` past the visible count.
    """
    _check(q, w, k_idx, pos, ratio, topk)
    bsz, seqlen, n = q.shape[0], q.shape[1], k_idx.shape[1]
    dev = q.device
    scores = torch.einsum("bthd,bnd->bthn", q.float(), k_idx.float()).relu()  # [B, T, Hi, N]
    scores = (scores * w.float().unsqueeze(-1)).sum(dim=2)  # [B, T, N]
    q_pos = pos.to(device=dev, dtype=torch.int64) + torch.arange(seqlen, device=dev)  # [T]
    visible = ratio * (torch.arange(n, device=dev) + 1) <= q_pos[:, None] + 1  # [T, N]
    if n < topk:  # pad with never-visible columns so the output keeps its static width
        scores = torch.cat([scores, scores.new_zeros(bsz, seqlen, topk - n)], dim=-1)
        visible = torch.cat([visible, visible.new_zeros(seqlen, topk - n)], dim=-1)
    scores = scores.masked_fill(~visible, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]  # [B, T, k]
    chosen = visible.expand(bsz, -1, -1).gather(-1, order)  # invisible sort last: only the tail
    return torch.where(chosen, order, -1)


@indexer_topk.register_fake
def _(q, w, k_idx, pos, *, ratio, topk):
    _check(q, w, k_idx, pos, ratio, topk)
    return q.new_empty((q.shape[0], q.shape[1], topk), dtype=torch.int64)


OPS = (torch.ops.effexport.indexer_topk.default,)
