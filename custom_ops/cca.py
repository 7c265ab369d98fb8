"""``effexport::cca``: the q/k/v of compressed convolutional attention (ZAYA1 CCA / CCGQA).

Covers spec section 3.3 steps (2)-(6) up to (not including) the attention itself: q-k mean
residuals, the causal depthwise + grouped convs over ``concat(q~, k~)`` with an explicit conv state,
the value shift with an explicit one-token state, QK L2-norm with the per-KV-head temperature, and
partial rotate-half RoPE. The down-projections (step 1: ``q~ = x W_q``, ``k~ = x W_k``,
``v_cur = x W_vc``, ``x W_vd``) stay ordinary matmuls in the graph; the attention and the
up-projection are done by the ``effexport::attention*`` ops.

One form serves prefill and decode: the op always prepends ``conv_state`` to the conv input and
``shift_state`` to the delayed values, so prefill is the call with zero states (``shift_state`` =
``0 W_vd``, i.e. zeros without a bias) and decode threads the returned states into the next call.
Any chunking of a sequence gives the same q/k/v as one call over the whole sequence.

Not covered: padding masks (spec step (0) zeroes pad tokens before the conv; callers must not feed
pads), autograd (no backward is registered), Triton/CUDA kernels (the eager reference runs on any
device and is the oracle for later kernels and backends).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cca", "cca_reference", "OPS"]


def _dims(q_down: Tensor, temperature: Tensor, conv1_weight: Tensor, conv_state: Tensor):
    """(Hq, Hk, d, P) from the argument shapes: ``d`` = in-channels per group of the grouped conv."""
    d = conv1_weight.shape[1]
    hk = temperature.shape[0]
    hq = q_down.shape[-1] // d
    return hq, hk, d, conv_state.shape[-1]


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` dims of ``x [B, H, T, d]`` (in fp32)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    x_rot = (x_rot * cos.float() + rotated * sin.float()).to(x.dtype)  # cos/sin broadcast over B, H
    return torch.cat([x_rot, x_pass], dim=-1)


def cca_reference(q_down: Tensor, k_down: Tensor, v_cur: Tensor, v_del_src: Tensor,
                  conv0_weight: Tensor, conv1_weight: Tensor, temperature: Tensor,
                  cos: Tensor, sin: Tensor, conv_state: Tensor, shift_state: Tensor,
                  conv0_bias: Optional[Tensor] = None, conv1_bias: Optional[Tensor] = None):
    """Pure-torch eager reference of :func:`cca` (same arguments and results); any device."""
    b, t, _ = q_down.shape
    hq, hk, d, p = _dims(q_down, temperature, conv1_weight, conv_state)
    g = hq // hk
    # (2) q-k mean residuals: r_q[h] = (q~[h] + k~[h//G]) / 2 ; r_k[g] = mean_{h in g} r_q[h]
    k_rep = k_down.view(b, t, hk, 1, d).expand(b, t, hk, g, d)
    r_q = (q_down.view(b, t, hk, g, d) + k_rep) * 0.5  # [B, T, Hk, G, d]
    r_k = r_q.mean(dim=3)  # [B, T, Hk, d]
    r_q = r_q.reshape(b, t, hq, d)
    # (3) causal convs over concat(q~, k~), channels-first, the state supplies P columns of context
    c = torch.cat([conv_state, torch.cat([q_down, k_down], dim=-1).transpose(1, 2)], dim=-1)  # [B, C, P+T]
    new_conv_state = c.narrow(-1, t, p).clone()  # [B, C, P]
    channels = c.shape[1]
    c = F.conv1d(c, conv0_weight, conv0_bias, groups=channels)  # depthwise: [B, C, P+T-(K0-1)]
    c = F.conv1d(c, conv1_weight, conv1_bias, groups=channels // d)  # grouped: [B, C, T]
    c = c.transpose(1, 2)  # [B, T, C]
    q = c[..., : hq * d].reshape(b, t, hq, d) + r_q
    k = c[..., hq * d:].reshape(b, t, hk, d) + r_k
    # (4) value shift: token t's second half is x[t-1] W_vd (the state for t = 0)
    v_del = torch.cat([shift_state.unsqueeze(1), v_del_src[:, :-1]], dim=1)  # [B, T, Hk*d/2]
    v = torch.cat([v_cur, v_del], dim=-1).view(b, t, hk, d)
    new_shift_state = v_del_src[:, -1].clone()  # [B, Hk*d/2]
    # (5) QK L2-norm to sqrt(d), temperature on k
    eps = torch.finfo(q.dtype).eps
    q = q * (d ** 0.5 / q.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
    k = k * (d ** 0.5 / k.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
    k = k * temperature[None, None, :, None]
    # (6) partial RoPE on the first rot dims, heads first
    q = _rope(q.transpose(1, 2), cos, sin)  # [B, Hq, T, d]
    k = _rope(k.transpose(1, 2), cos, sin)  # [B, Hk, T, d]
    v = v.transpose(1, 2).contiguous()  # [B, Hk, T, d]
    return q, k, v, new_conv_state, new_shift_state


@torch.library.custom_op("effexport::cca", mutates_args=())
def cca(q_down: Tensor, k_down: Tensor, v_cur: Tensor, v_del_src: Tensor,
        conv0_weight: Tensor, conv1_weight: Tensor, temperature: Tensor,
        cos: Tensor, sin: Tensor, conv_state: Tensor, shift_state: Tensor,
        conv0_bias: Optional[Tensor] = None, conv1_bias: Optional[Tensor] = None,
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Compressed convolutional attention q/k/v with explicit conv and value-shift state.

    Shapes (``C = (Hq+Hk)*d``, ``P = (K0-1)+(K1-1)``, ``Dv = Hk*d/2``, ``rot`` rotated dims, even):
        q_down ``[B, T, Hq*d]``, k_down ``[B, T, Hk*d]``: the down-projected ``q~ = x W_q``,
            ``k~ = x W_k`` of the T new tokens.
        v_cur ``[B, T, Dv]``: ``x W_vc``; v_del_src ``[B, T, Dv]``: ``x W_vd`` of the same tokens.
        conv0_weight ``[C, 1, K0]`` (depthwise, groups C), conv1_weight ``[C, d, K1]`` (grouped,
            groups ``Hq+Hk``; ``d`` is read from its dim 1), conv0_bias/conv1_bias ``[C]`` or None.
        temperature ``[Hk]``: learned key scale per KV head (``Hk`` is read from its length).
        cos, sin ``[T, rot]``: rotate-half tables (``cat(freqs, freqs)``) for the tokens' positions,
            shared over the batch; the op applies them to the first ``rot`` dims of every head.
        conv_state ``[B, C, P]``: pre-conv ``concat(q~, k~)`` of the P tokens before these
            (zeros before position 0); shift_state ``[B, Dv]``: ``x W_vd`` of the token before
            (zeros at position 0).
    Returns ``(q [B, Hq, T, d], k [B, Hk, T, d], v [B, Hk, T, d], conv_state' [B, C, P],
    shift_state' [B, Dv])``, all new tensors (no aliasing), in the inputs' dtype.

    Semantics: ``r_q[h] = (q~[h] + k~[h//G]) / 2``, ``r_k[g] = mean_{h in g} r_q[h]``;
    ``c = grouped(depthwise([conv_state | concat(q~, k~)^T]))``; ``q = c_q + r_q``, ``k = c_k + r_k``;
    ``v = concat(v_cur, [shift_state, v_del_src[:-1]])`` viewed as Hk heads of d;
    ``q <- q sqrt(d)/||q||``, ``k <- k sqrt(d)/||k|| * temperature`` (norm clamped at dtype eps);
    partial RoPE on q and k. ``conv_state'`` = the last P pre-conv columns, ``shift_state'`` =
    ``v_del_src[:, -1]``. Requires ``T >= 1``.
    """
    return cca_reference(q_down, k_down, v_cur, v_del_src, conv0_weight, conv1_weight, temperature,
                         cos, sin, conv_state, shift_state, conv0_bias, conv1_bias)


@cca.register_fake
def _cca_fake(q_down, k_down, v_cur, v_del_src, conv0_weight, conv1_weight, temperature, cos, sin,
              conv_state, shift_state, conv0_bias=None, conv1_bias=None):
    b, t, _ = q_down.shape
    hq, hk, d, _ = _dims(q_down, temperature, conv1_weight, conv_state)
    return (q_down.new_empty(b, hq, t, d), q_down.new_empty(b, hk, t, d),
            q_down.new_empty(b, hk, t, d), conv_state.new_empty(conv_state.shape),
            shift_state.new_empty(shift_state.shape))


OPS = (torch.ops.effexport.cca.default,)
