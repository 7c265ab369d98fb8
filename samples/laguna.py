"""Poolside Laguna XS.2 as plain eager PyTorch (spec section 2; HF ``LagunaForCausalLM``).

Covered:
    * per-layer query-head counts (``num_attention_heads_per_layer``: 48 on full, 64 on sliding
      layers at real size) with the KV-head count (8) and head_dim (128) fixed for every layer, so
      q/o/gate projections change shape per layer while K/V never do;
    * layer pattern ``[F, S, S, S] x 10``: sliding-window (512 keys incl. self) or global causal
      attention, from position-built masks (:func:`attention_mask`);
    * per-head RMSNorm on q and k before RoPE; two RoPE tables: full layers use partial RoPE
      (first 64 of 128 dims) with YaRN frequencies computed over the rotated dims
      (:func:`inv_freq_yarn`, attention_factor 1), sliding layers default full-width RoPE (θ 1e4);
    * the per-head softplus output gate between attention and ``o_proj``:
      ``y = o_proj(attn [B,T,H,d] * softplus(x W_g) [B,T,H,1])``;
    * sigmoid-routed MoE: top-k selection on ``sigmoid(logits) + e_score_correction_bias``,
      weights from the un-biased scores, renormalised, routed output scaled by 2.5, plus one shared
      SwiGLU expert; layer 0 is a dense SwiGLU MLP (intermediate 8192); untied embeddings.

Not covered: the attention-sink option (``swa_attention_sink_enabled``, off in XS.2 and rejected
here), router-weight-on-input (unsupported in HF too), FP8 KV storage (accounted for in
``layer_specs`` through ``published_bytes`` only), training details.

Decode cache (``present``, the naive layout a user would write; ring buffers come from the passes):
    ``"{i}.k"``  ``[B, Hkv, S, head_dim]``  keys of layer ``i`` after q/k-norm and RoPE, positions 0..S-1
    ``"{i}.v"``  ``[B, Hkv, S, head_dim]``  values of layer ``i``, positions 0..S-1
for every layer ``i`` (sliding layers too: they keep every token and mask to the window). The start
position of the next call is ``past["0.k"].shape[2]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effexport.samples._blocks import (embedding,
    GatedMLP, RMSNorm, StackedExperts, apply_rope, attention_mask, count_params, eager_attention,
    inv_freq_default, inv_freq_yarn, rope_cos_sin)
from effexport.samples._spec import CacheTensor, LayerSpec

FULL, SLIDING = "full_attention", "sliding_attention"

BASELINE_DESCRIPTION = (
    "every layer is full (global causal) attention keeping its own full-length K/V cache: the 30 "
    "sliding-window layers (window 512) no longer bound their cache to a 512-token ring")


@dataclass(frozen=True)
class RopeConfig:
    """RoPE of one layer type. ``rope_type`` "default" or "yarn"; ``partial_rotary_factor`` is the
    fraction of head_dim rotated (frequencies are computed over the rotated dims only)."""

    rope_type: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0


@dataclass(frozen=True)
class LagunaConfig:
    """Laguna hyper-parameters (field names follow HF ``LagunaConfig``; tuples keep it hashable)."""

    name: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    head_dim: int
    num_attention_heads: int
    num_attention_heads_per_layer: tuple[int, ...]
    num_key_value_heads: int
    layer_types: tuple[str, ...]
    sliding_window: int
    mlp_layer_types: tuple[str, ...]
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    moe_routed_scaling_factor: float
    rope_full: RopeConfig
    rope_sliding: RopeConfig
    max_position_embeddings: int
    moe_router_logit_softcapping: float = 0.0
    norm_topk_prob: bool = True
    gating: bool = True
    attention_bias: bool = False
    swa_attention_sink_enabled: bool = False
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    published_kv_bytes_per_element: float = 1.0  # the authors ship an FP8 KV cache

    def __post_init__(self):
        n = self.num_hidden_layers
        for field_name in ("num_attention_heads_per_layer", "layer_types", "mlp_layer_types"):
            if len(getattr(self, field_name)) != n:
                raise ValueError(f"{self.name}: len({field_name}) != num_hidden_layers ({n})")
        if set(self.layer_types) - {FULL, SLIDING}:
            raise ValueError(f"{self.name}: layer_types must be {FULL!r} or {SLIDING!r}")
        if set(self.mlp_layer_types) - {"dense", "sparse"}:
            raise ValueError(f"{self.name}: mlp_layer_types must be 'dense' or 'sparse'")
        if any(h % self.num_key_value_heads for h in self.num_attention_heads_per_layer):
            raise ValueError(f"{self.name}: every head count must be a multiple of the KV heads")
        if self.swa_attention_sink_enabled or self.tie_word_embeddings or self.hidden_act != "silu":
            raise ValueError(f"{self.name}: sinks, tied embeddings and non-silu are not modelled")

    def layer_specs(self, baseline: bool = False) -> list[LayerSpec]:
        """Per-layer attention and cache layout. Every layer is "independent" (no KV sharing); full
        layers keep full-length K and V (``Hkv * head_dim`` elements each per token), sliding layers
        a ring of ``sliding_window`` entries. ``baseline=True``: every layer full attention with a
        full-length cache (see :data:`BASELINE_DESCRIPTION`)."""
        kv = self.num_key_value_heads * self.head_dim
        published = kv * self.published_kv_bytes_per_element
        specs = []
        for i, (kind, heads) in enumerate(zip(self.layer_types, self.num_attention_heads_per_layer)):
            sliding = kind == SLIDING and not baseline
            window = self.sliding_window if sliding else None
            cache = tuple(
                CacheTensor(name, "ring" if sliding else "full", kv, window=window,
                            published_bytes=published) for name in ("k", "v"))
            specs.append(LayerSpec(index=i, type="sliding" if sliding else "full", role="independent",
                                   reads=i, heads=heads, qk_dim=self.head_dim, v_dim=self.head_dim,
                                   cache=cache, window=window))
        return specs


def rope_inv_freq(config: LagunaConfig, layer_type: str) -> torch.Tensor:
    """fp64 host (CPU) inverse frequencies ``[rot_dim // 2]`` of a layer type; ``rot_dim = head_dim * partial``
    (Laguna computes the exponent over the rotated dims, unlike Gemma 4's proportional RoPE)."""
    rope = config.rope_full if layer_type == FULL else config.rope_sliding
    rot_dim = int(config.head_dim * rope.partial_rotary_factor)
    # A host-side constant whatever the ambient device (a meta build must not run meta kernels
    # for it); ``rope_cos_sin`` moves it to the positions' device.
    with torch.device("cpu"):
        if rope.rope_type == "default":
            return inv_freq_default(rot_dim, rope.theta)
        if rope.rope_type == "yarn":
            return inv_freq_yarn(rot_dim, rope.theta, rope.factor,
                                 rope.original_max_position_embeddings, rope.beta_fast, rope.beta_slow)
    raise ValueError(f"unknown rope_type {rope.rope_type!r}")


def _pattern(unit: tuple, repeats: int) -> tuple:
    return tuple(unit) * repeats


_REAL_ROPE_FULL = RopeConfig("yarn", 500000.0, partial_rotary_factor=0.5, factor=32.0,
                             original_max_position_embeddings=4096, beta_fast=64.0, beta_slow=1.0)
_TINY_ROPE_FULL = RopeConfig("yarn", 500000.0, partial_rotary_factor=0.5, factor=4.0,
                             original_max_position_embeddings=64, beta_fast=64.0, beta_slow=1.0)
_ROPE_SLIDING = RopeConfig("default", 10000.0)

PRESETS: dict[str, LagunaConfig] = {
    "laguna-xs2": LagunaConfig(
        name="laguna-xs2", vocab_size=100352, hidden_size=2048, num_hidden_layers=40, head_dim=128,
        num_attention_heads=48, num_attention_heads_per_layer=_pattern((48, 64, 64, 64), 10),
        num_key_value_heads=8, layer_types=_pattern((FULL, SLIDING, SLIDING, SLIDING), 10),
        sliding_window=512, mlp_layer_types=("dense",) + ("sparse",) * 39, intermediate_size=8192,
        num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, moe_routed_scaling_factor=2.5,
        rope_full=_REAL_ROPE_FULL, rope_sliding=_ROPE_SLIDING, max_position_embeddings=131072),
    "laguna-xs2:tiny": LagunaConfig(
        name="laguna-xs2:tiny", vocab_size=256, hidden_size=64, num_hidden_layers=8, head_dim=16,
        num_attention_heads=4, num_attention_heads_per_layer=_pattern((4, 8, 8, 8), 2),
        num_key_value_heads=2, layer_types=_pattern((FULL, SLIDING, SLIDING, SLIDING), 2),
        sliding_window=8, mlp_layer_types=("dense",) + ("sparse",) * 7, intermediate_size=128,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, moe_routed_scaling_factor=2.5,
        rope_full=_TINY_ROPE_FULL, rope_sliding=_ROPE_SLIDING, max_position_embeddings=256),
}


class LagunaAttention(nn.Module):
    """GQA attention with per-layer query heads, QK-norm, per-type RoPE and a softplus head gate."""

    def __init__(self, config: LagunaConfig, layer_idx: int):
        super().__init__()
        self.num_heads = config.num_attention_heads_per_layer[layer_idx]
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.window = config.sliding_window if config.layer_types[layer_idx] == SLIDING else None
        self.gating = config.gating
        d, h, hkv, bias = config.hidden_size, self.num_heads, self.num_kv_heads, config.attention_bias
        self.q_proj = nn.Linear(d, h * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, hkv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, hkv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(h * self.head_dim, d, bias=bias)
        self.g_proj = nn.Linear(d, h, bias=False) if config.gating else None
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, q_pos, k_pos, past_k=None, past_v=None):
        """x ``[B, T, D]``, cos/sin ``[T, rot]``, q_pos ``[T]``, k_pos ``[S]``, past ``[B, Hkv, S-T, d]``
        -> (out ``[B, T, D]``, k ``[B, Hkv, S, d]``, v ``[B, Hkv, S, d]``)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H, T, d], [B, Hkv, T, d]
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)  # [B, Hkv, S, d]
            v = torch.cat([past_v, v], dim=2)
        mask = attention_mask(q_pos, k_pos, self.window)  # [T, S]
        o = eager_attention(q, k, v, mask, scale=self.head_dim ** -0.5).transpose(1, 2)  # [B, T, H, d]
        if self.gating:
            gate = F.softplus(self.g_proj(x).float()).to(o.dtype)  # [B, T, H]
            o = o * gate.unsqueeze(-1)  # [B, T, H, d]
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim)), k, v


class LagunaRouter(nn.Module):
    """Sigmoid router: select top-k on ``sigmoid(logits) + e_score_correction_bias``, weight by the
    un-biased scores of the selected experts (renormalised when ``norm_topk_prob``)."""

    def __init__(self, config: LagunaConfig):
        super().__init__()
        self.top_k, self.softcap = config.num_experts_per_tok, config.moe_router_logit_softcapping
        self.normalize = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts), requires_grad=False)
        if not self.weight.is_meta:  # init on meta would load torch's meta kernels for seconds
            nn.init.normal_(self.weight, std=config.hidden_size ** -0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[N, D]`` -> (weights ``[N, k]`` in x's dtype, expert indices ``[N, k]``)."""
        logits = F.linear(x, self.weight).float()  # [N, E]
        if self.softcap > 0.0:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        scores = torch.sigmoid(logits)  # [N, E]
        _, idx = torch.topk(scores + self.e_score_correction_bias.float(), self.top_k, dim=-1)
        weights = scores.gather(-1, idx)  # [N, k] un-biased
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), idx


class LagunaMoE(nn.Module):
    """``routed_scale * sum_k w_k SwiGLU_{idx_k}(x) + SwiGLU_shared(x)``."""

    def __init__(self, config: LagunaConfig):
        super().__init__()
        self.gate = LagunaRouter(config)
        self.experts = StackedExperts(config.num_experts, config.hidden_size,
                                      config.moe_intermediate_size)
        self.shared_experts = GatedMLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.routed_scaling_factor = config.moe_routed_scaling_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)  # [N, D]
        weights, idx = self.gate(flat)  # [N, k]
        routed = self.experts(flat, idx, weights) * self.routed_scaling_factor  # [N, D]
        return (routed + self.shared_experts(flat)).reshape(b, t, d)


class LagunaDecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, config: LagunaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LagunaAttention(config, layer_idx)
        sparse = config.mlp_layer_types[layer_idx] == "sparse"
        self.mlp = LagunaMoE(config) if sparse else GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, q_pos, k_pos, past_k=None, past_v=None):
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, q_pos, k_pos, past_k, past_v)
        h = x + attn  # [B, T, D]
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class Model(nn.Module):
    """Laguna causal LM: ``forward(input_ids [B, T], past) -> (logits [B, T, V], present)``; the
    cache layout is described in the module docstring."""

    def __init__(self, config: LagunaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LagunaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # fp64 RoPE frequencies kept as plain attributes (not buffers) so ``.to(bf16)`` never rounds
        # them; ``rope_cos_sin`` moves them to the positions' device in fp32.
        self.inv_freq = {kind: rope_inv_freq(config, kind) for kind in (FULL, SLIDING)}
        self._perturb_trivial_init()

    @torch.no_grad()
    def _perturb_trivial_init(self) -> None:
        """Move norm scales and router biases off their trivial init (1 / 0), so a bug in any of
        them changes the output. Uses the global torch RNG; a no-op on the meta device."""
        for module in self.modules():
            if isinstance(module, RMSNorm) and not module.weight.is_meta:
                module.weight.add_(0.1 * torch.randn_like(module.weight))
            if isinstance(module, LagunaRouter) and not module.weight.is_meta:
                module.e_score_correction_bias.normal_(0.0, 0.1)

    def forward(self, input_ids: torch.Tensor, past: dict[str, torch.Tensor] | None = None):
        """input_ids ``[B, T]`` int64; ``past`` the dict returned by a previous call (or None)."""
        start = 0 if past is None else past["0.k"].shape[2]
        t = input_ids.shape[1]
        q_pos = torch.arange(start, start + t, device=input_ids.device)  # [T]
        k_pos = torch.arange(0, start + t, device=input_ids.device)  # [S]
        rope_scale = {FULL: self.config.rope_full.attention_factor,
                      SLIDING: self.config.rope_sliding.attention_factor}
        tables = {kind: rope_cos_sin(q_pos, inv, rope_scale[kind])  # ([T, rot], [T, rot])
                  for kind, inv in self.inv_freq.items()}
        h = self.embed_tokens(input_ids)  # [B, T, D]
        present: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            cos, sin = tables[self.config.layer_types[i]]
            past_k = None if past is None else past[f"{i}.k"]
            past_v = None if past is None else past[f"{i}.v"]
            h, present[f"{i}.k"], present[f"{i}.v"] = layer(h, cos, sin, q_pos, k_pos, past_k, past_v)
        return self.lm_head(self.norm(h)), present  # [B, T, V]

    def param_counts(self) -> dict[str, int]:
        """``total`` parameters; ``effective`` = total (no per-layer embeddings); ``active`` = total
        minus the routed experts a token does not use (``num_experts - top_k`` per MoE layer)."""
        total = count_params(self)
        inactive = sum((self.config.num_experts - self.config.num_experts_per_tok)
                       * layer.mlp.experts.expert_params()
                       for layer in self.layers if isinstance(layer.mlp, LagunaMoE))
        return {"total": total, "effective": total, "active": total - inactive}


def example_inputs(config: LagunaConfig, batch: int = 2, seq_len: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Random token ids ``[batch, seq_len]``; the default length (``2 * sliding_window + 5``) runs
    past the sliding window twice."""
    seq_len = 2 * config.sliding_window + 5 if seq_len is None else seq_len
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen)
