"""Zyphra ZAYA1-8B: compressed convolutional attention (CCA / CCGQA) and a top-1 MoE with a skip expert.

Follows the spec (``architectures.md`` section 3), itself pinned to HF ``modular_zaya.py``:

* CCA (3.3 steps 1-6): down-projections ``q~ = x W_q`` (``Hq*d``) and ``k~ = x W_k`` (``Hk*d``);
  q-k mean residuals; a causal depthwise Conv1d (kernel ``K0``, groups = channels) followed by a
  grouped Conv1d (kernel ``K1``, groups ``Hq+Hk``) over ``concat(q~, k~)`` with ``P = (K0-1)+(K1-1)``
  columns of left context; value shift (``v = concat(x W_vc, x[t-1] W_vd)`` viewed as ``Hk`` heads);
  QK L2-norm to ``sqrt(d)`` with a learned per-KV-head temperature on k; partial RoPE (first
  ``partial_rotary_factor * d`` dims, ``theta`` 5e6); GQA attention (decomposed, causal mask built
  from positions) and the up-projection ``W_o``.
* Block: fp32 residual stream, ``ResScale(h, r) = (h + b_h) * s_h + (r + b_r) * s_r`` after attention
  and after the MoE, input scaling ``res0 = (emb + b_in) * s_in``, tied embeddings, eps 1e-5.
* MoE: MLP router with cross-layer router state (EDA: layer ``l > 0`` adds ``s * r_{l-1}`` to its
  down-projected router input), ``E + 1`` classes where the last is the skip expert (zero output),
  top-1 selection on ``softmax + balancing_biases``, weight ``p[idx]`` (not renormalised).

Decode cache (``present`` keys, per layer ``i``; ``C = (Hq+Hk)*d``, ``P = (K0-1)+(K1-1)``, ``S`` =
tokens seen so far):

* ``"{i}.k"``     ``[B, Hk, S, d]``  keys after conv, q-k residual, L2 norm * temperature and RoPE
* ``"{i}.v"``     ``[B, Hk, S, d]``  values; heads ``< Hk/2`` from the token itself, the rest from
  the previous token (value shift)
* ``"{i}.conv"``  ``[B, C, P]``      the last ``P`` columns of the pre-conv stream ``concat(q~, k~)``
  (channels-first; zeros stand for positions before 0), so decode continues the conv exactly
* ``"{i}.shift"`` ``[B, Hk*d/2]``    ``x[S-1] W_vd`` of the last token: the next token's delayed value

The start position of a call is ``past["0.k"].shape[2]``.

Not covered: padding masks (spec step (0), ``x * mask2d`` before the conv) -- inputs are assumed to
hold no padding; ``hybrid_sliding`` layers (declared possible in HF, unused by ZAYA1-8B); training
details (router aux losses, dropout).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effexport.samples._blocks import (embedding,
    RMSNorm, StackedExperts, apply_rope, attention_mask, count_params, eager_attention,
    inv_freq_default, rope_cos_sin,
)
from effexport.samples._spec import CacheTensor, LayerSpec

BASELINE_DESCRIPTION = (
    "standard multi-head attention at the hidden size: every layer keeps full-length K and V of "
    "hidden_size elements each per token (no q/k/v down-projection into the CCA latent, no GQA head "
    "sharing) and no conv or value-shift state")


@dataclass(frozen=True)
class Zaya1Config:
    """ZAYA1 hyper-parameters (HF ``ZayaConfig`` field names; defaults = ``Zyphra/ZAYA1-8B``)."""

    vocab_size: int = 262272
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 128
    cca_time0: int = 2
    cca_time1: int = 2
    layer_types: tuple[str, ...] = ("hybrid",) * 40
    rope_theta: float = 5_000_000.0
    partial_rotary_factor: float = 0.5
    num_experts: int = 16
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 2048
    router_hidden_size: int = 256
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    lm_head_bias: bool = False
    max_position_embeddings: int = 131072
    bos_token_id: int = 2
    eos_token_id: int = 106
    pad_token_id: int = 0

    def __post_init__(self):
        if self.num_experts_per_tok != 1:
            raise ValueError("ZAYA1 routes top-1 only (num_experts_per_tok=1)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if (self.num_key_value_heads * self.head_dim) % 2:
            raise ValueError("the value shift splits Hk*d in two halves: Hk*d must be even")
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) != {"hybrid"}:
            raise ValueError("only 'hybrid' (full causal CCA) layers are modelled, one per layer")

    @property
    def conv_padding(self) -> int:
        """``P = (K0-1) + (K1-1)``: pre-conv columns of left context the two convs need."""
        return (self.cca_time0 - 1) + (self.cca_time1 - 1)

    @property
    def conv_channels(self) -> int:
        """``C = (Hq + Hk) * d``: channels of ``concat(q~, k~)``."""
        return (self.num_attention_heads + self.num_key_value_heads) * self.head_dim

    @property
    def value_half(self) -> int:
        """Width of ``v_cur`` and ``v_del`` (``Hk*d/2``; ``d`` for ZAYA1's ``Hk = 2``)."""
        return self.num_key_value_heads * self.head_dim // 2

    @property
    def rotary_dim(self) -> int:
        """Dims rotated by the partial RoPE (64 of 128 at real size)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_specs(self, baseline: bool = False) -> list[LayerSpec]:
        """Per-layer accounting. Model: CCA layers, each independent, full-length K/V of ``Hk*d``
        elements each plus the conv state (``P`` entries of ``C``) and the shift state (1 entry of
        ``Hk*d/2``). Baseline: MHA at the hidden size (K, V of ``hidden_size`` each, no state)."""
        d, hk = self.head_dim, self.num_key_value_heads
        specs = []
        for i in range(self.num_hidden_layers):
            if baseline:
                cache = (CacheTensor("k", "full", self.hidden_size),
                         CacheTensor("v", "full", self.hidden_size))
                specs.append(LayerSpec(i, "full", "independent", i, self.hidden_size // d, d, d, cache))
                continue
            cache = (CacheTensor("k", "full", hk * d), CacheTensor("v", "full", hk * d),
                     CacheTensor("conv", "state", self.conv_channels, entries=self.conv_padding),
                     CacheTensor("shift", "state", self.value_half, entries=1))
            specs.append(LayerSpec(i, "cca", "independent", i, self.num_attention_heads, d, d, cache))
        return specs


PRESETS: dict[str, Zaya1Config] = {
    "zaya1-8b": Zaya1Config(),
    "zaya1-8b:tiny": Zaya1Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, layer_types=("hybrid",) * 4, num_experts=4,
        moe_intermediate_size=64, router_hidden_size=16),
}


# ------------------------------------------------------------------------------------- attention
class CCAProjection(nn.Module):
    """CCA q/k/v projection (HF ``ZayaCCAProjection``): down-projections, q-k mean residuals, the
    two causal convs and the value shift. Returns q/k/v before QK norm and RoPE."""

    def __init__(self, cfg: Zaya1Config):
        super().__init__()
        self.hq, self.hk, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.pad = cfg.conv_padding
        bias, hidden, c = cfg.attention_bias, cfg.hidden_size, cfg.conv_channels
        self.q_proj = nn.Linear(hidden, self.hq * self.d, bias=bias)
        self.k_proj = nn.Linear(hidden, self.hk * self.d, bias=bias)
        self.v_proj_current = nn.Linear(hidden, cfg.value_half, bias=bias)
        self.v_proj_delayed = nn.Linear(hidden, cfg.value_half, bias=bias)
        self.conv_qk_depthwise = nn.Conv1d(c, c, cfg.cca_time0, groups=c)
        self.conv_qk_grouped = nn.Conv1d(c, c, cfg.cca_time1, groups=self.hq + self.hk)

    def forward(self, x, conv_state=None, shift_state=None):
        """x ``[B, T, E]`` -> q ``[B, T, Hq, d]``, k ``[B, T, Hk, d]``, v ``[B, T, Hk, d]``, the new
        conv state ``[B, C, P]`` and shift state ``[B, Hk*d/2]``. ``None`` states = start of text."""
        b, t, _ = x.shape
        g = self.hq // self.hk
        q_lat = self.q_proj(x)  # [B, T, Hq*d]
        k_lat = self.k_proj(x)  # [B, T, Hk*d]
        # q-k mean residuals: r_q[h] = (q~[h] + k~[h//G]) / 2, r_k[g] = mean_{h in g} r_q[h]
        k_rep = k_lat.view(b, t, self.hk, 1, self.d).expand(b, t, self.hk, g, self.d)
        r_q = (q_lat.view(b, t, self.hk, g, self.d) + k_rep) * 0.5  # [B, T, Hk, G, d]
        r_k = r_q.mean(dim=3)  # [B, T, Hk, d]
        r_q = r_q.reshape(b, t, self.hq, self.d)

        c = torch.cat([q_lat, k_lat], dim=-1).transpose(1, 2)  # [B, C, T] channels-first
        if conv_state is None:
            c = F.pad(c, (self.pad, 0))  # [B, C, P + T], zeros before position 0
        else:
            c = torch.cat([conv_state, c], dim=-1)
        new_conv = c[..., c.shape[-1] - self.pad:]  # [B, C, P]
        c = self.conv_qk_grouped(self.conv_qk_depthwise(c)).transpose(1, 2)  # [B, T, C]
        q = c[..., : self.hq * self.d].reshape(b, t, self.hq, self.d) + r_q
        k = c[..., self.hq * self.d:].reshape(b, t, self.hk, self.d) + r_k

        v_cur = self.v_proj_current(x)  # [B, T, Hk*d/2]
        v_src = self.v_proj_delayed(x)  # [B, T, Hk*d/2]: x[t] W_vd, used by token t+1
        if shift_state is None:
            shift_state = self.v_proj_delayed(x.new_zeros(b, self.v_proj_delayed.in_features))
        v_del = torch.cat([shift_state.unsqueeze(1), v_src[:, :-1]], dim=1)  # [B, T, Hk*d/2]
        v = torch.cat([v_cur, v_del], dim=-1).view(b, t, self.hk, self.d)
        return q, k, v, new_conv, v_src[:, -1]


class QKNorm(nn.Module):
    """``q * sqrt(d)/||q||``, ``k * sqrt(d)/||k|| * temp[kv_head]`` (HF ``ZayaQKNorm``)."""

    def __init__(self, cfg: Zaya1Config):
        super().__init__()
        self.scale = cfg.head_dim ** 0.5
        self.temp = nn.Parameter(torch.zeros(cfg.num_key_value_heads))

    def forward(self, q, k):
        """q ``[B, T, Hq, d]``, k ``[B, T, Hk, d]`` -> the same shapes, normalised."""
        eps = torch.finfo(q.dtype).eps
        q = q * (self.scale / q.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        k = k * (self.scale / k.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        return q, k * self.temp[None, None, :, None]


class CCAttention(nn.Module):
    """CCA attention of one layer: :meth:`qkv` (everything before attention) + GQA + ``o_proj``."""

    def __init__(self, cfg: Zaya1Config):
        super().__init__()
        self.qkv_proj = CCAProjection(cfg)
        self.qk_norm = QKNorm(cfg)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                                bias=cfg.attention_bias)
        self.scaling = cfg.head_dim ** -0.5

    def qkv(self, x, cos, sin, conv_state=None, shift_state=None):
        """CCA steps (1)-(6) up to attention: x ``[B, T, E]``, cos/sin ``[T, rot]`` ->
        q ``[B, Hq, T, d]``, k ``[B, Hk, T, d]``, v ``[B, Hk, T, d]``, conv ``[B, C, P]``,
        shift ``[B, Hk*d/2]``. The oracle ``effexport::cca`` is checked against."""
        q, k, v, conv, shift = self.qkv_proj(x, conv_state, shift_state)
        q, k = self.qk_norm(q, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, conv, shift

    def forward(self, x, cos, sin, mask, past: dict | None):
        """One layer's attention; ``past`` holds this layer's ``k, v, conv, shift`` (or None)."""
        past = past or {}
        q, k, v, conv, shift = self.qkv(x, cos, sin, past.get("conv"), past.get("shift"))
        if "k" in past:
            k = torch.cat([past["k"], k], dim=2)  # [B, Hk, S, d]
            v = torch.cat([past["v"], v], dim=2)
        o = eager_attention(q, k, v, mask, self.scaling)  # [B, Hq, T, d]
        o = self.o_proj(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))  # [B, T, E]
        return o, {"k": k, "v": v, "conv": conv, "shift": shift}


# -------------------------------------------------------------------------------------- MoE + block
class ResScale(nn.Module):
    """``(h + b_h) * s_h + (r + b_r) * s_r`` (HF ``ZayaResidualScaling``); fp32 residual in and out."""

    def __init__(self, dim: int):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(dim))
        self.hidden_states_bias = nn.Parameter(torch.zeros(dim))
        self.residual_scale = nn.Parameter(torch.ones(dim))
        self.residual_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, h, residual):
        h = (h + self.hidden_states_bias) * self.hidden_states_scale
        return h + (residual + self.residual_bias) * self.residual_scale


class Router(nn.Module):
    """ZAYA MLP router with the EDA cross-layer state and the skip class (index ``E``)."""

    def __init__(self, cfg: Zaya1Config, layer: int):
        super().__init__()
        hr, classes = cfg.router_hidden_size, cfg.num_experts + 1
        self.num_experts = cfg.num_experts
        self.down_proj = nn.Linear(cfg.hidden_size, hr, bias=True)
        self.router_states_scale = nn.Parameter(torch.ones(hr)) if layer > 0 else None
        self.norm = RMSNorm(hr, eps=cfg.rms_norm_eps)
        self.fc1 = nn.Linear(hr, hr, bias=True)
        self.fc2 = nn.Linear(hr, hr, bias=True)
        self.out_proj = nn.Linear(hr, classes, bias=False)
        bias = torch.zeros(classes)
        bias[-1] = -1.0
        self.register_buffer("balancing_biases", bias)

    def forward(self, h, state=None):
        """h ``[N, E]``, state ``[N, Hr]`` from the previous layer -> (logits ``[N, E+1]``, expert
        index ``[N, 1]``, weight ``[N, 1]`` (0 for skip), this layer's state ``[N, Hr]``)."""
        r = self.down_proj(h)  # [N, Hr]
        if self.router_states_scale is not None and state is not None:
            r = r + state * self.router_states_scale
        logits = self.out_proj(F.gelu(self.fc2(F.gelu(self.fc1(self.norm(r))))))  # [N, E+1]
        probs = torch.softmax(logits, dim=-1)
        idx = torch.topk(probs.float() + self.balancing_biases.float(), 1, dim=-1).indices  # [N, 1]
        weight = torch.gather(probs, 1, idx)
        skip = idx == self.num_experts
        return logits, idx.masked_fill(skip, 0), weight.masked_fill(skip, 0.0), r


class MoE(nn.Module):
    """Top-1 MoE with the skip expert: ``experts(x)[idx] * p[idx]``, zero when skip is chosen."""

    def __init__(self, cfg: Zaya1Config, layer: int):
        super().__init__()
        self.gate = Router(cfg, layer)
        self.experts = StackedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def forward(self, x, state=None):
        """x ``[B, T, E]`` -> (out ``[B, T, E]``, router state ``[B*T, Hr]``)."""
        flat = x.reshape(-1, x.shape[-1])  # [N, E]
        _, idx, weight, state = self.gate(flat, state)
        return self.experts(flat, idx, weight).view_as(x), state


class DecoderLayer(nn.Module):
    """``res = ResScale(Attn(LN(res)), res); res = ResScale(MoE(LN(res)), res)``, res in fp32."""

    def __init__(self, cfg: Zaya1Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = CCAttention(cfg)
        self.post_attention_residual_scale = ResScale(cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MoE(cfg, layer)
        self.post_mlp_residual_scale = ResScale(cfg.hidden_size)

    def forward(self, res, router_state, cos, sin, mask, past):
        dtype = self.input_layernorm.weight.dtype
        a, present = self.self_attn(self.input_layernorm(res.to(dtype)), cos, sin, mask, past)
        res = self.post_attention_residual_scale(a, res)
        m, router_state = self.mlp(self.post_attention_layernorm(res.to(dtype)), router_state)
        return self.post_mlp_residual_scale(m, res), router_state, present


class Model(nn.Module):
    """ZAYA1 causal LM; see the module docstring for the cache layout."""

    def __init__(self, config: Zaya1Config):
        super().__init__()
        cfg = self.config = config
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq = inv_freq_default(cfg.rotary_dim, cfg.rope_theta).float()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if not self.embed_tokens.weight.is_meta:
            self._perturb()

    @torch.no_grad()
    def _perturb(self):
        """Move scales/biases off their trivial init (HF inits temp to 0, scales to 1, biases to 0,
        balancing biases to (0, ..., 0, -1)) so that a bug in any of them changes the output."""
        for name, p in self.named_parameters():
            if name.endswith(("scale", "norm.weight", "layernorm.weight", ".temp")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        for layer in self.layers:
            b = layer.mlp.gate.balancing_biases
            b.copy_(0.05 * torch.randn_like(b))  # the skip class is chosen for some tokens

    def forward(self, input_ids: torch.Tensor, past: dict[str, torch.Tensor] | None = None):
        """input_ids ``[B, T]`` -> (logits ``[B, T, V]``, present cache dict)."""
        b, t = input_ids.shape
        start = past["0.k"].shape[2] if past else 0
        pos = torch.arange(start, start + t, device=input_ids.device)  # [T]
        mask = attention_mask(pos, torch.arange(start + t, device=input_ids.device))  # [T, S]
        cos, sin = rope_cos_sin(pos, self.inv_freq)  # [T, rot]
        emb = self.embed_tokens(input_ids)  # [B, T, E]
        res = ((emb + self.input_hidden_states_bias) * self.input_hidden_states_scale).float()
        router_state, present = None, {}
        for i, layer in enumerate(self.layers):
            layer_past = None if past is None else {n: past[f"{i}.{n}"] for n in ("k", "v", "conv", "shift")}
            res, router_state, cache = layer(res, router_state, cos, sin, mask, layer_past)
            present.update({f"{i}.{n}": v for n, v in cache.items()})
        h = self.norm(res.to(self.norm.weight.dtype))
        return self.lm_head(h), present  # [B, T, V]

    def param_counts(self) -> dict[str, int]:
        """total (tied embeddings once), effective (= total: no PLE), active (top-1 routed expert
        per layer; the skip expert costs nothing, so this is the upper bound per token)."""
        total = count_params(self)
        cfg = self.config
        per_expert = self.layers[0].mlp.experts.expert_params()
        inactive = cfg.num_hidden_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
        return {"total": total, "effective": total, "active": total - inactive}


def example_inputs(config: Zaya1Config, batch: int = 2, seq_len: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Random token ids ``[B, T]`` (no padding tokens: padding masks are not modelled). The
    default length (16) is several times the conv's receptive field ``K0+K1-1``."""
    gen = torch.Generator().manual_seed(seed)
    seq_len = 16 if seq_len is None else seq_len
    return torch.randint(1, config.vocab_size, (batch, seq_len), generator=gen)
