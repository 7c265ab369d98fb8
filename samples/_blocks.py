"""Blocks shared by the reference samples: norms, RoPE variants, masks, eager attention, MLPs, MoE.

Plain eager PyTorch, written the way a model author writes it (no effexport ops here): the samples
are what a user's model looks like, and the FX passes must recognise them from their structure.
Shapes: ``B`` batch, ``T`` query length, ``S`` key length, ``H`` query heads, ``Hkv`` KV heads,
``d`` head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------- norms
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x * (mean(x^2) + eps)^-1/2 * weight`` computed in fp32, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a multiplicative learned scale (init 1), or no scale at all (``with_scale=False``)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


# ------------------------------------------------------------------------------------------ RoPE
# frequency tables are computed on the CPU in fp64 whatever the default device (meta included)
def inv_freq_default(rot_dim: int, theta: float) -> torch.Tensor:
    """Standard RoPE frequencies over ``rot_dim`` rotated dims: ``theta^(-2i/rot_dim)``."""
    return 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64, device="cpu") / rot_dim)


def inv_freq_proportional(head_dim: int, theta: float, partial: float) -> torch.Tensor:
    """Gemma 4 ``proportional`` RoPE: the exponent runs over the full head_dim, and only the first
    ``int(partial * head_dim // 2)`` frequencies are non-zero (zero tail = identity pairs)."""
    angles = int(partial * head_dim // 2)
    inv = 1.0 / theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float64, device="cpu") / head_dim)
    return torch.cat([inv, torch.zeros(head_dim // 2 - angles, dtype=torch.float64, device="cpu")])


def inv_freq_yarn(rot_dim: int, theta: float, factor: float, original_max: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """YaRN frequencies (HF ``_compute_yarn_parameters`` without the attention factor)."""
    pos_freqs = theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64, device="cpu") / rot_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (rot_dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rot_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0):
    """cos/sin tables ``[..., T, rot_dim]`` for rotate-half RoPE (``cat(freqs, freqs)``), fp32."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` dims of ``x [B, H, T, d]``; the rest passes
    through (partial RoPE). ``cos/sin``: ``[B, T, rot]`` or ``[T, rot]``."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = (x_rot.float() * cos + rotate_half(x_rot.float()) * sin).to(x.dtype)
    return torch.cat([x_rot, x_pass], dim=-1) if x_pass.shape[-1] else x_rot


# ----------------------------------------------------------------------------------------- masks
def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean ``[..., T, S]`` mask, True = visible: causal, and with ``window`` W the key j is
    visible to query i iff ``i - W < j <= i`` (W keys including self, the HF convention)."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    visible = diff >= 0
    if window is not None:
        visible = visible & (diff < window)
    return visible


# ------------------------------------------------------------------------------------- attention
def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float, softcap: float | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Decomposed attention: ``softmax(q k^T * scale [softcap] + mask [, sink]) v`` with GQA.

    q ``[B, H, T, d]``, k ``[B, Hkv, S, d]``, v ``[B, Hkv, S, dv]``, mask bool broadcastable to
    ``[B, H, T, S]``; ``sinks [H]`` is a per-head logit added to the softmax denominator only.
    Returns ``[B, H, T, dv]`` in q's dtype (softmax in fp32)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # [B, H, S, d]
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, T, S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def sdpa_attention(q, k, v, mask, scale):
    """The same as :func:`eager_attention` without softcap/sinks, through torch SDPA (GQA by expand)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ------------------------------------------------------------------------------------------ MLPs
class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; ``act`` "silu" (SwiGLU) or "gelu_tanh" (GeGLU); optional
    DeepSeek ``swiglu_limit`` (gate clamped above, up clamped to [-limit, limit])."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", limit: float | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act, self.limit = act, limit

    def forward(self, x):
        return self.down_proj(gated_act(self.gate_proj(x), self.up_proj(x), self.act, self.limit))


def gated_act(gate, up, act: str, limit: float | None = None):
    """The gated activation shared by dense MLPs and stacked experts."""
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    if act == "silu":
        return F.silu(gate) * up
    if act == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {act!r}")


class StackedExperts(nn.Module):
    """``E`` gated-MLP experts stored as stacked weights ``[E, ...]`` (export-friendly, like HF's
    ``batched_mm`` experts). ``forward(x [N, D], idx [N, k], weight [N, k]) -> [N, D]``.

    Every expert runs on every token and the selected outputs are combined: exact, simple to
    capture, and cheap at tiny sizes (real-size presets are built on the meta device)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, act: str = "silu",
                 limit: float | None = None):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.act, self.limit, self.hidden = act, limit, hidden
        if not self.gate_up.is_meta:  # init on meta would load torch's meta kernels for nothing
            nn.init.normal_(self.gate_up, std=dim ** -0.5)
            nn.init.normal_(self.down, std=hidden ** -0.5)

    def forward(self, x, idx, weight):
        gu = torch.einsum("nd,ehd->neh", x, self.gate_up)  # [N, E, 2*hidden]
        h = gated_act(gu[..., : self.hidden], gu[..., self.hidden:], self.act, self.limit)
        out = torch.einsum("neh,edh->ned", h, self.down)  # [N, E, D]
        combine = torch.zeros(x.shape[0], self.gate_up.shape[0], dtype=weight.dtype, device=x.device)
        combine = combine.scatter_add(1, idx, weight)  # [N, E]
        return torch.einsum("ned,ne->nd", out, combine.to(out.dtype))

    def expert_params(self) -> int:
        """Parameters of one expert."""
        return (self.gate_up[0].numel() + self.down[0].numel())


def embedding(num: int, dim: int, std: float = 1.0) -> nn.Embedding:
    """``nn.Embedding`` with normal(0, std) weights (nn's default for std=1), created without
    nn's own init on the meta device, which would load torch's meta kernels for seconds."""
    weight = torch.empty(num, dim)
    if not weight.is_meta:
        nn.init.normal_(weight, std=std)
    return nn.Embedding(num, dim, _weight=weight)


def init_weights(module: nn.Module, std: float = 0.02, seed: int | None = 0) -> None:
    """Deterministic random init for samples (no checkpoints here): normal(std) for Linear and
    Embedding weights, zeros for biases; norms stay at their constructor values."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d)):
            if m.weight.is_meta:
                continue
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()


def count_params(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
