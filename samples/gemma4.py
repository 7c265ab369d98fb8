"""Gemma 4 E2B / E4B text model (spec section 1): cross-layer KV sharing, per-layer embeddings (PLE).

Covered (spec 1.2-1.11): the 4:1 (E2B) / 5:1 (E4B) sliding:full layer schedule; KV sharing by the
general HF rule (a shared layer of type t reads the *last earlier non-shared layer of type t*; the
JAX ``f-1``/``f-2`` shortcut is deliberately not used); 256-dim sliding / 512-dim full heads;
default RoPE (theta 1e4) on sliding layers and ``proportional`` RoPE (theta 1e6, 64 of 256
frequencies non-zero) on full layers; QK-norm with a learned scale, weightless v-norm, attention
scaling 1.0; GeGLU (``gelu_tanh``) MLP, double width in KV-shared layers when
``use_double_wide_mlp``; PLE (1.6) and its per-layer gate/projection (1.5); ``layer_scalar``;
tied embeddings; final logit softcap 30.

Embedding scale: ``x0 = E_main[ids] * embed_scale`` with ``embed_scale = sqrt(hidden_size)`` held as
a buffer and cast to the weight dtype in the forward, exactly as HF does. In fp32 it is the exact
square root; after ``model.to(torch.bfloat16)`` the buffer is bf16, so ``sqrt(1536) = 39.19``
becomes 39.25 and ``sqrt(2560) = 50.60`` becomes 50.5 (the parity trap of spec 1.6). RoPE
frequency tables, in contrast, are kept in fp32 whatever the weight dtype.

KV sharing in the eager model: a consumer layer has no ``k_proj``/``v_proj``/``k_norm``/``v_norm``
modules at all. Within one forward, each producer's attention returns its cache-concatenated,
full-length ``(K, V)``; the model loop hands that pair to every consumer of the same layer type
(the explicit form of HF's ``shared_kv_states`` side channel). Consumers compute their own Q, RoPE,
mask (sliding consumers: sliding mask) and ``o_proj``, and never touch the cache.

Decode cache (``present`` / ``past``), one pair per non-consumer layer ``i`` (owner or independent):
    ``"{i}.k"``  ``[B, Hkv, S, d_i]``  keys after k_norm and RoPE, for all ``S`` tokens seen so far
    ``"{i}.v"``  ``[B, Hkv, S, d_i]``  values after the weightless v_norm
where ``d_i`` is ``head_dim`` (sliding) or ``global_head_dim`` (full). Every non-consumer layer keeps
the full length, sliding layers included (their consumers read it); the ring-buffer layout of
:meth:`Gemma4Config.layer_specs` is what the effexport passes build later. The start position of a
call is ``past["0.k"].shape[2]`` (layer 0 never shares).

Not covered: the vision/audio towers, the K=V global-attention variant and MoE of the 31B/26B
siblings, untied LM heads, bidirectional attention, and Gemma 3n (AltUp, LAuReL, activation
sparsity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effexport.samples._blocks import (GatedMLP, RMSNorm, apply_rope, attention_mask, count_params,
                                       eager_attention, inv_freq_default, inv_freq_proportional,
                                       rope_cos_sin)
from effexport.samples._spec import CacheTensor, LayerSpec

SLIDING, FULL = "sliding_attention", "full_attention"

BASELINE_DESCRIPTION = (
    "Gemma 4 without its KV savings: no cross-layer KV sharing (every layer computes and caches its "
    "own K/V with its own heads and head dim) and every sliding layer attends, and caches, the full "
    "context.")


def layer_pattern(pattern: tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    """Repeat ``pattern`` (HF layer-type names) to ``num_layers`` entries."""
    return tuple(pattern[i % len(pattern)] for i in range(num_layers))


@dataclass(frozen=True)
class Gemma4Config:
    """Gemma 4 text-model config (field names as HF ``Gemma4TextConfig``; rope dict flattened)."""

    name: str
    vocab_size: int = 262144
    hidden_size: int = 1536
    intermediate_size: int = 6144
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    num_global_key_value_heads: int | None = None  # None: full layers use num_key_value_heads
    head_dim: int = 256                            # sliding layers
    global_head_dim: int = 512                     # full layers
    sliding_window: int = 512
    layer_types: tuple[str, ...] = layer_pattern((SLIDING,) * 4 + (FULL,), 35)
    num_kv_shared_layers: int = 20
    use_double_wide_mlp: bool = True
    hidden_size_per_layer_input: int = 256
    vocab_size_per_layer_input: int = 262144
    sliding_rope_type: str = "default"
    sliding_rope_theta: float = 10_000.0
    full_rope_type: str = "proportional"
    full_rope_theta: float = 1_000_000.0
    full_partial_rotary_factor: float = 0.25
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = None
    attention_scaling: float = 1.0                # QK-norm replaces 1/sqrt(d)
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_tanh"           # HF "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"{self.name}: {len(self.layer_types)} layer types for "
                             f"{self.num_hidden_layers} layers")
        if set(self.layer_types) - {SLIDING, FULL}:
            raise ValueError(f"{self.name}: layer types must be {SLIDING!r} or {FULL!r}")
        if not self.tie_word_embeddings:
            raise ValueError(f"{self.name}: every Gemma 4 E-model ties its embeddings; untied heads "
                             "are not part of this sample")
        for kind in (self.sliding_rope_type, self.full_rope_type):
            if kind not in ("default", "proportional"):
                raise ValueError(f"{self.name}: unknown rope type {kind!r}")
        self.kv_roles()  # raises if a shared layer has no producer of its type

    # ------------------------------------------------------------------------------ per layer type
    def head_dim_of(self, layer_type: str) -> int:
        """Per-head dim of a layer type: ``head_dim`` (sliding) or ``global_head_dim`` (full)."""
        return self.head_dim if layer_type == SLIDING else self.global_head_dim

    def kv_heads_of(self, layer_type: str) -> int:
        """KV heads of a layer type (``num_global_key_value_heads`` on full layers when set)."""
        if layer_type == FULL and self.num_global_key_value_heads is not None:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def rope_inv_freq(self, layer_type: str) -> torch.Tensor:
        """RoPE inverse frequencies ``[head_dim_of(type) // 2]`` (float64, CPU) of a layer type."""
        dim = self.head_dim_of(layer_type)
        kind, theta = ((self.sliding_rope_type, self.sliding_rope_theta) if layer_type == SLIDING
                       else (self.full_rope_type, self.full_rope_theta))
        with torch.device("cpu"):
            if kind == "proportional":
                return inv_freq_proportional(dim, theta, self.full_partial_rotary_factor)
            return inv_freq_default(dim, theta)

    def mlp_width(self, layer: int) -> int:
        """MLP hidden width of ``layer``: doubled in KV-shared layers when ``use_double_wide_mlp``."""
        shared = self.kv_roles()[layer][0] == "consumer"
        return self.intermediate_size * (2 if shared and self.use_double_wide_mlp else 1)

    # ------------------------------------------------------------------------------- KV sharing
    @property
    def first_kv_shared_layer(self) -> int:
        """``f = L - num_kv_shared_layers``: layers ``>= f`` read another layer's K/V (if f > 0)."""
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_roles(self) -> tuple[tuple[str, int], ...]:
        """Per layer ``(role, reads)``: "consumer" reading layer ``reads``, "owner" (read by some
        consumer; ``reads`` = itself) or "independent". The HF rule: a layer ``i >= f > 0`` of
        type t reads the last layer of type t with index ``< f``."""
        f = self.first_kv_shared_layer
        prev = self.layer_types[:max(f, 0)]
        reads = []
        for i, t in enumerate(self.layer_types):
            if i >= f > 0:
                if t not in prev:
                    raise ValueError(f"{self.name}: shared layer {i} ({t}) has no earlier {t} layer")
                reads.append(len(prev) - 1 - prev[::-1].index(t))
            else:
                reads.append(i)
        owners = {r for i, r in enumerate(reads) if r != i}
        return tuple(("consumer" if r != i else "owner" if i in owners else "independent", r)
                     for i, r in enumerate(reads))

    # ------------------------------------------------------------------------------- accounting
    def layer_specs(self, baseline: bool = False) -> list[LayerSpec]:
        """Per-layer attention and cache layout (see ``samples/_spec.py``).

        Sliding owners/independents keep ring(``sliding_window``) K and V caches, full layers full
        caches, ``Hkv * d`` elements per entry each; consumers keep none. ``baseline=True``: every
        layer full attention over the whole context with its own full-length K/V cache."""
        specs = []
        for i, (t, (role, reads)) in enumerate(zip(self.layer_types, self.kv_roles())):
            d, hkv = self.head_dim_of(t), self.kv_heads_of(t)
            sliding = t == SLIDING and not baseline
            if baseline:
                role, reads = "independent", i
            if role == "consumer":
                cache = ()
            elif sliding:
                cache = tuple(CacheTensor(n, "ring", hkv * d, window=self.sliding_window) for n in "kv")
            else:
                cache = tuple(CacheTensor(n, "full", hkv * d) for n in "kv")
            specs.append(LayerSpec(index=i, type="sliding" if sliding else "full", role=role,
                                   reads=reads, heads=self.num_attention_heads, qk_dim=d, v_dim=d,
                                   cache=cache, window=self.sliding_window if sliding else None))
        return specs


_E2B = Gemma4Config(name="gemma4-e2b")
_E4B = Gemma4Config(
    name="gemma4-e4b", hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
    num_key_value_heads=2, layer_types=layer_pattern((SLIDING,) * 5 + (FULL,), 42),
    num_kv_shared_layers=18, use_double_wide_mlp=False)
_TINY = dict(vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64, intermediate_size=128,
             num_attention_heads=4, num_key_value_heads=1, head_dim=16, global_head_dim=32,
             sliding_window=8, hidden_size_per_layer_input=8)

PRESETS: dict[str, Gemma4Config] = {
    "gemma4-e2b": _E2B,
    "gemma4-e4b": _E4B,
    # spec 1.11: first shared layer 5, producers S <- 3, F <- 4 (E2B topology class)
    "gemma4-e2b:tiny": Gemma4Config(
        name="gemma4-e2b:tiny", num_hidden_layers=10, num_kv_shared_layers=5,
        layer_types=layer_pattern((SLIDING,) * 4 + (FULL,), 10), use_double_wide_mlp=True, **_TINY),
    # spec 1.11 E4B-style: 5:1, 2 KV heads, f = 6, S consumers <- 4, F consumer 11 <- 5
    "gemma4-e4b:tiny": Gemma4Config(
        name="gemma4-e4b:tiny", num_hidden_layers=12, num_kv_shared_layers=6,
        layer_types=layer_pattern((SLIDING,) * 5 + (FULL,), 12), use_double_wide_mlp=False,
        **{**_TINY, "num_key_value_heads": 2}),
    # spec 1.11 odd topology: f = 6 and layer f-1 = 5 is *sliding*: S consumers <- 5, F 9 <- 4
    "gemma4-odd:tiny": Gemma4Config(
        name="gemma4-odd:tiny", num_hidden_layers=10, num_kv_shared_layers=4,
        layer_types=layer_pattern((SLIDING,) * 4 + (FULL,), 10), use_double_wide_mlp=True, **_TINY),
}


# ---------------------------------------------------------------------------------------- modules
class Gemma4Attention(nn.Module):
    """One attention layer. Non-consumers own ``k_proj``/``v_proj``/``k_norm``/``v_norm`` and return
    their full-length ``(K, V)``; a consumer has none of them and attends the ``shared_kv`` pair."""

    def __init__(self, config: Gemma4Config, layer: int):
        super().__init__()
        self.layer_type = config.layer_types[layer]
        self.is_consumer = config.kv_roles()[layer][0] == "consumer"
        self.heads, self.kv_heads = config.num_attention_heads, config.kv_heads_of(self.layer_type)
        self.head_dim = config.head_dim_of(self.layer_type)
        self.scaling, self.softcap = config.attention_scaling, config.attn_logit_softcapping
        e, eps = config.hidden_size, config.rms_norm_eps
        self.q_proj = nn.Linear(e, self.heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        if not self.is_consumer:
            self.k_proj = nn.Linear(e, self.kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(e, self.kv_heads * self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, eps)
            self.v_norm = RMSNorm(self.head_dim, eps, with_scale=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, e, bias=False)

    def forward(self, x, cos, sin, mask, past_kv=None, shared_kv=None):
        """x ``[B, T, E]``, cos/sin ``[T, d]``, mask bool ``[T, S]``; ``past_kv``: this layer's cached
        ``(K, V)`` ``[B, Hkv, S-T, d]``; ``shared_kv``: the producer's ``(K, V)`` ``[B, Hkv, S, d]``
        (consumers only). Returns ``(y [B, T, E], (K, V) [B, Hkv, S, d] or None for consumers)``."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)).transpose(1, 2)
        q = apply_rope(q, cos, sin)  # [B, H, T, d]
        if self.is_consumer:
            k, v = shared_kv  # [B, Hkv, S, d]: producer's cache-concatenated K/V of this step
        else:
            k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
            v = self.v_norm(self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
            k = apply_rope(k, cos, sin)  # [B, Hkv, T, d]; v is not rotated
            if past_kv is not None:
                k = torch.cat([past_kv[0], k], dim=2)  # [B, Hkv, S, d]
                v = torch.cat([past_kv[1], v], dim=2)
        o = eager_attention(q, k, v, mask, scale=self.scaling, softcap=self.softcap)  # [B, H, T, d]
        y = self.o_proj(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        return y, (None if self.is_consumer else (k, v))


class Gemma4DecoderLayer(nn.Module):
    """Sandwich-norm block with GeGLU MLP, the PLE gate/projection and ``layer_scalar`` (spec 1.5)."""

    def __init__(self, config: Gemma4Config, layer: int):
        super().__init__()
        e, p, eps = config.hidden_size, config.hidden_size_per_layer_input, config.rms_norm_eps
        self.layer_type = config.layer_types[layer]
        self.input_layernorm = RMSNorm(e, eps)
        self.self_attn = Gemma4Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(e, eps)
        self.pre_feedforward_layernorm = RMSNorm(e, eps)
        self.mlp = GatedMLP(e, config.mlp_width(layer), act=config.hidden_activation)
        self.post_feedforward_layernorm = RMSNorm(e, eps)
        self.per_layer_input_gate = nn.Linear(e, p, bias=False)
        self.per_layer_projection = nn.Linear(p, e, bias=False)
        self.post_per_layer_input_norm = RMSNorm(e, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x, per_layer_input, cos, sin, mask, past_kv=None, shared_kv=None):
        """x ``[B, T, E]``, per_layer_input ``[B, T, P]``; returns ``(out [B, T, E], (K, V) | None)``."""
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv, shared_kv)
        h = x + self.post_attention_layernorm(a)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        g = F.gelu(self.per_layer_input_gate(h), approximate="tanh")  # [B, T, P]
        h = h + self.post_per_layer_input_norm(self.per_layer_projection(g * per_layer_input))
        return h * self.layer_scalar, kv


class Model(nn.Module):
    """Gemma 4 E-model text tower: ``forward(input_ids [B, T], past=None) -> (logits [B, T, V],
    present)``; ``present`` holds ``"{i}.k"``/``"{i}.v"`` for every non-consumer layer ``i``."""

    def __init__(self, config: Gemma4Config):
        super().__init__()
        self.config = config
        e, n, p = config.hidden_size, config.num_hidden_layers, config.hidden_size_per_layer_input
        self.roles = config.kv_roles()
        # explicit weights: nn.Embedding's own normal_ init costs seconds on the meta device
        self.embed_tokens = nn.Embedding(config.vocab_size, e, _weight=torch.empty(config.vocab_size, e))
        self.embed_tokens_per_layer = nn.Embedding(
            config.vocab_size_per_layer_input, n * p,
            _weight=torch.empty(config.vocab_size_per_layer_input, n * p))
        self.per_layer_model_projection = nn.Linear(e, n * p, bias=False)
        self.per_layer_projection_norm = RMSNorm(p, config.rms_norm_eps)
        self.layers = nn.ModuleList(Gemma4DecoderLayer(config, i) for i in range(n))
        self.norm = RMSNorm(e, config.rms_norm_eps)
        self.register_buffer("embed_scale", torch.tensor(math.sqrt(e)), persistent=False)
        self.register_buffer("per_layer_embed_scale", torch.tensor(math.sqrt(p)), persistent=False)
        self._set_rope_tables(torch.empty(0).device)  # the current default device (meta builds)
        if not self.embed_tokens.weight.is_meta:
            self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Main embedding N(0, 1/E) (so ``x0 = E[ids] * sqrt(E)`` is O(1), as in trained Gemma: with
        N(0, 1) the tied head makes every random model repeat its input token), PLE table N(0, 1);
        norm weights and layer scalars 1 + 0.1 N(0, 1), off their trivial init so that a bug in any
        of them changes the output. q_norm/k_norm weights are further scaled by ``d^-1/4``: with
        scaling 1.0 the logits ``q.k`` then have the usual ``1/sqrt(d)`` temperature at init, instead
        of attention so sharp that fp32 rounding is amplified ~3x."""
        self.embed_tokens.weight.normal_(0.0, self.config.hidden_size ** -0.5)
        self.embed_tokens_per_layer.weight.normal_()
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            if name.endswith("norm.weight") or name.endswith("layer_scalar"):
                t.normal_(1.0, 0.1)
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                t.mul_(t.numel() ** -0.25)

    def _set_rope_tables(self, device: torch.device) -> None:
        for t, tag in ((SLIDING, "sliding"), (FULL, "full")):  # [d/2] fp32, non-persistent
            self.register_buffer(f"inv_freq_{tag}", self.config.rope_inv_freq(t).float().to(device),
                                 persistent=False)

    def _apply(self, fn, recurse=True):
        """Keep the RoPE frequency tables exact fp32 when the weights are cast (``.to(bf16)``)."""
        super()._apply(fn, recurse)
        self._set_rope_tables(self.inv_freq_sliding.device)
        return self

    def embed_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spec 1.6: ``(x0 [B, T, E], per_layer_inputs [B, T, L, P])``."""
        cfg = self.config
        b, t = input_ids.shape
        w = self.embed_tokens.weight
        x0 = self.embed_tokens(input_ids) * self.embed_scale.to(w.dtype)  # [B, T, E]
        in_range = (input_ids >= 0) & (input_ids < cfg.vocab_size_per_layer_input)
        ple_ids = torch.where(in_range, input_ids, torch.zeros_like(input_ids))
        tok = self.embed_tokens_per_layer(ple_ids) * self.per_layer_embed_scale.to(w.dtype)
        tok = tok.view(b, t, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)  # [B, T, L, P]
        ctx = self.per_layer_model_projection(x0) * cfg.hidden_size ** -0.5  # [B, T, L*P]
        ctx = self.per_layer_projection_norm(ctx.view_as(tok))  # norm over P
        return x0, (ctx + tok) * 2.0 ** -0.5

    def forward(self, input_ids: torch.Tensor, past: dict[str, torch.Tensor] | None = None):
        """Run ``input_ids [B, T]`` after the tokens cached in ``past`` (None: from position 0)."""
        cfg = self.config
        start = 0 if past is None else past["0.k"].shape[2]
        dev = input_ids.device
        q_pos = torch.arange(start, start + input_ids.shape[1], device=dev)  # [T]
        k_pos = torch.arange(start + input_ids.shape[1], device=dev)  # [S]
        masks = {SLIDING: attention_mask(q_pos, k_pos, cfg.sliding_window),  # [T, S]
                 FULL: attention_mask(q_pos, k_pos)}
        rope = {SLIDING: rope_cos_sin(q_pos, self.inv_freq_sliding),  # cos/sin [T, d]
                FULL: rope_cos_sin(q_pos, self.inv_freq_full)}
        h, per_layer = self.embed_inputs(input_ids)
        present, shared = {}, {}
        for i, layer in enumerate(self.layers):
            role, reads = self.roles[i]
            t = layer.layer_type
            past_kv = None if past is None or role == "consumer" else (past[f"{i}.k"], past[f"{i}.v"])
            shared_kv = shared[reads] if role == "consumer" else None
            h, kv = layer(h, per_layer[:, :, i], *rope[t], masks[t], past_kv, shared_kv)
            if role != "consumer":
                present[f"{i}.k"], present[f"{i}.v"] = kv
            if role == "owner":
                shared[i] = kv
        logits = F.linear(self.norm(h), self.embed_tokens.weight)  # [B, T, V], tied head
        if cfg.final_logit_softcapping is not None:
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits, present

    def param_counts(self) -> dict[str, int]:
        """``total``; ``effective`` = total without the PLE table; ``active`` = effective (dense)."""
        total = count_params(self)
        effective = total - self.embed_tokens_per_layer.weight.numel()
        return {"total": total, "effective": effective, "active": effective}


def example_inputs(config: Gemma4Config, batch: int = 2, seq_len: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Random token ids ``[batch, seq_len]`` (default ``2 * sliding_window + 3``, past the window)."""
    seq_len = 2 * config.sliding_window + 3 if seq_len is None else seq_len
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen)
