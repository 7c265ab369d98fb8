"""An independently written Gemma-4-style decoder, for testing that the passes do not depend on the
reference sample's code (``samples/gemma4.py``, ``samples/_blocks.py``).

Written from spec section 1 (architectures.md 1.3-1.5), deliberately *differently* from the sample:

* module names: ``stack.{i}.mixer.{wq,wk,wv,wo}``, ``qn/kn`` norms, ``ffn``; cache keys
  ``"{i}.key"`` / ``"{i}.value"`` (full length, ``[B, Hkv, S, d]``) for every non-consumer layer;
* attention: the scale is multiplied into q *before* ``q @ k^T`` (not applied to the scores), GQA by
  HF's ``repeat_kv`` (``expand(...).reshape(...)`` of a 5-d view; the new axis by ``unsqueeze(2)``, or
  with ``hf_indexing=True`` by HF's verbatim ``k[:, :, None, :, :]``), no fp32 casts;
* masks are additive float biases ``[1, 1, T, S]`` built from position differences: the sliding one
  with ``torch.where(..., 0, -inf)``, the global one as ``future_bool * finfo.min``; with
  ``mask_casts=True`` both also go through an explicit ``.to(dtype)`` as HF mask code does;
* an attention-logit softcap ``c * tanh(s / c)`` on the layers listed in ``softcap_layers``
  (Gemma 4 E-models have none; Gemma 2/3 and the 31B-style ones do) -- consumers included;
* the scale is ``head_dim ** -0.5`` (Gemma 4 uses 1.0 with QK-norm), so the pass must fold a
  non-trivial constant out of q;
* KV sharing by the HF rule (spec 1.3): layer ``i >= first_shared`` of kind t reads the last layer
  of kind t before ``first_shared``; the consumer gets the producer's *cache-concatenated* K/V of
  this step. Like the official JAX code, consumers still *compute* their own K/V projections and
  then discard them: those projections are dead in the captured graph and must be removed.

Also as in Gemma 4: QK-norm with a learned scale, weightless V-norm, rotate-half RoPE (default on
local layers, ``proportional`` with a zero frequency tail on global layers), sandwich norms, a GeGLU
MLP, a scaled tied embedding and a final logit softcap. The start position of a call is the length
of ``past["0.key"]``.

Not covered: per-layer embeddings (PLE), ``layer_scalar``, double-wide MLPs, vision/audio towers,
K=V global layers. They do not touch attention recognition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOCAL, GLOBAL = "local", "global"


@dataclass(frozen=True)
class AltConfig:
    """Hyper-parameters of :class:`AltGemma`; the defaults are the CPU-sized test model.

    With the defaults: kinds ``L L L G L L L G``, ``first_shared`` 5, so local consumers 5, 6 read
    layer 4 and the global consumer 7 reads layer 3 (the topology where layer ``f-1`` is local)."""

    vocab: int = 96
    width: int = 48
    ffn: int = 96
    heads: int = 4
    kinds: tuple[str, ...] = (LOCAL, LOCAL, LOCAL, GLOBAL, LOCAL, LOCAL, LOCAL, GLOBAL)
    local_kv_heads: int = 2
    global_kv_heads: int = 1
    local_head_dim: int = 12
    global_head_dim: int = 24
    window: int = 6
    first_shared: int = 5
    softcap_layers: tuple[int, ...] = (1, 3, 7)
    attn_softcap: float = 4.0
    final_softcap: float = 30.0
    local_theta: float = 10_000.0
    global_theta: float = 1_000_000.0
    global_rope_fraction: float = 0.25
    eps: float = 1e-6
    hf_indexing: bool = False  # GQA axis by ``x[:, :, None, :, :]`` (HF verbatim) or ``unsqueeze(2)``
    mask_casts: bool = False   # explicit ``.to(dtype)`` in the mask code (HF style) or none

    def producer_of(self, layer: int) -> int:
        """The layer whose K/V ``layer`` attends (itself unless it is a consumer; HF rule)."""
        if layer < self.first_shared or self.first_shared <= 0:
            return layer
        earlier = self.kinds[:self.first_shared]
        kind = self.kinds[layer]
        return max(i for i, k in enumerate(earlier) if k == kind)

    def consumers(self) -> dict[int, int]:
        """``{consumer layer: producer layer}``."""
        return {i: self.producer_of(i) for i in range(len(self.kinds)) if self.producer_of(i) != i}


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim."""
    y = x * (x.square().mean(dim=-1, keepdim=True) + eps).rsqrt()
    return y if weight is None else y * weight


class Norm(nn.Module):
    """RMSNorm with a multiplicative scale (Gemma 4: ``* w``, not ``* (1 + w)``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return _rms(x, self.scale, self.eps)


def rope_frequencies(head_dim: int, theta: float, fraction: float = 1.0) -> torch.Tensor:
    """``[head_dim / 2]`` angular frequencies. ``fraction < 1`` is Gemma 4's *proportional* RoPE:
    the exponent still runs over the full head dim, and only the first ``int(fraction*d//2)``
    frequencies are non-zero (the rest rotate by 0, i.e. pass through)."""
    half = head_dim // 2
    live = int(fraction * head_dim // 2)
    exponents = torch.arange(half, dtype=torch.float64) * 2.0 / head_dim
    freqs = theta ** -exponents
    freqs[live:] = 0.0
    return freqs.float()


def rotate(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x [B, h, T, d]`` at ``positions [T]``."""
    half = x.shape[-1] // 2
    angles = positions.float()[:, None] * freqs[None, :]  # [T, d/2]
    cos, sin = angles.cos(), angles.sin()
    lo, hi = x[..., :half], x[..., half:]
    return torch.cat((lo * cos - hi * sin, hi * cos + lo * sin), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int, indexing: bool = False) -> torch.Tensor:
    """HF's GQA expansion ``[B, Hkv, S, d] -> [B, Hkv * n_rep, S, d]`` by expand + reshape.

    ``indexing=True`` inserts the new axis exactly as HF's ``repeat_kv`` does, ``x[:, :, None, :, :]``
    (captured as a full ``slice`` on dim 0 then ``unsqueeze``); ``False`` uses ``x.unsqueeze(2)``."""
    b, hkv, s, d = x.shape
    if n_rep == 1:
        return x
    wide = x[:, :, None, :, :] if indexing else x.unsqueeze(2)  # [B, Hkv, 1, S, d]
    return wide.expand(b, hkv, n_rep, s, d).reshape(b, hkv * n_rep, s, d)


class Mixer(nn.Module):
    """The attention of one layer. ``forward`` returns ``(y, (K, V))`` with this step's full-length,
    cache-concatenated K/V, or ``(y, None)`` for a consumer (which reads ``borrowed``)."""

    def __init__(self, cfg: AltConfig, layer: int):
        super().__init__()
        self.kind = cfg.kinds[layer]
        self.heads = cfg.heads
        self.kv_heads = cfg.local_kv_heads if self.kind == LOCAL else cfg.global_kv_heads
        self.dim = cfg.local_head_dim if self.kind == LOCAL else cfg.global_head_dim
        self.softcap = cfg.attn_softcap if layer in cfg.softcap_layers else None
        self.borrows = cfg.producer_of(layer) != layer
        self.eps, self.hf_indexing = cfg.eps, cfg.hf_indexing
        self.wq = nn.Linear(cfg.width, self.heads * self.dim, bias=False)
        self.wk = nn.Linear(cfg.width, self.kv_heads * self.dim, bias=False)  # dead in consumers
        self.wv = nn.Linear(cfg.width, self.kv_heads * self.dim, bias=False)
        self.wo = nn.Linear(self.heads * self.dim, cfg.width, bias=False)
        self.qn = Norm(self.dim, cfg.eps)
        self.kn = Norm(self.dim, cfg.eps)
        fraction = 1.0 if self.kind == LOCAL else cfg.global_rope_fraction
        theta = cfg.local_theta if self.kind == LOCAL else cfg.global_theta
        self.register_buffer("freqs", rope_frequencies(self.dim, theta, fraction), persistent=False)

    def split(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``[B, T, n*d] -> [B, n, T, d]``."""
        b, t, _ = x.shape
        return x.reshape(b, t, n, self.dim).permute(0, 2, 1, 3)

    def forward(self, x, positions, bias, cached=None, borrowed=None):
        """x ``[B, T, E]``, positions ``[T]``, bias ``[1, 1, T, S]``; ``cached``: this layer's past
        ``(K, V)`` ``[B, Hkv, S-T, d]``; ``borrowed``: the producer's ``(K, V)`` ``[B, Hkv, S, d]``."""
        q = rotate(self.qn(self.split(self.wq(x), self.heads)), positions, self.freqs)  # [B, H, T, d]
        k = rotate(self.kn(self.split(self.wk(x), self.kv_heads)), positions, self.freqs)
        v = _rms(self.split(self.wv(x), self.kv_heads), None, self.eps)  # [B, Hkv, T, d]
        if self.borrows:
            k, v = borrowed  # the own K/V above are discarded (dead), as in the JAX reference
        elif cached is not None:
            k, v = torch.cat((cached[0], k), dim=-2), torch.cat((cached[1], v), dim=-2)
        n_rep = self.heads // self.kv_heads
        scores = (q * self.dim ** -0.5) @ repeat_kv(k, n_rep, self.hf_indexing).transpose(-2, -1)  # [B, H, T, S]
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        probs = F.softmax(scores + bias, dim=-1)
        out = probs @ repeat_kv(v, n_rep, self.hf_indexing)  # [B, H, T, d]
        b, _, t, _ = out.shape
        y = self.wo(out.permute(0, 2, 1, 3).reshape(b, t, self.heads * self.dim))
        return y, (None if self.borrows else (k, v))


class Block(nn.Module):
    """Sandwich-norm decoder block with a GeGLU feed-forward."""

    def __init__(self, cfg: AltConfig, layer: int):
        super().__init__()
        self.mixer = Mixer(cfg, layer)
        self.pre_mix, self.post_mix = Norm(cfg.width, cfg.eps), Norm(cfg.width, cfg.eps)
        self.pre_ffn, self.post_ffn = Norm(cfg.width, cfg.eps), Norm(cfg.width, cfg.eps)
        self.ffn_in = nn.Linear(cfg.width, 2 * cfg.ffn, bias=False)  # gate and up, fused
        self.ffn_out = nn.Linear(cfg.ffn, cfg.width, bias=False)

    def forward(self, x, positions, bias, cached=None, borrowed=None):
        a, kv = self.mixer(self.pre_mix(x), positions, bias, cached, borrowed)
        x = x + self.post_mix(a)
        gate, up = self.ffn_in(self.pre_ffn(x)).chunk(2, dim=-1)
        x = x + self.post_ffn(self.ffn_out(F.gelu(gate, approximate="tanh") * up))
        return x, kv


def local_bias(rel: torch.Tensor, window: int, dtype: torch.dtype, cast: bool = False) -> torch.Tensor:
    """Additive sliding-window bias from ``rel = key_pos - query_pos`` ``[T, S]``: 0 where
    ``-window < rel <= 0``, -inf elsewhere. ``cast``: finish with an explicit ``.to(dtype)``."""
    keep = (rel <= 0) & (rel > -window)
    bias = torch.where(keep, 0.0, float("-inf"))
    return bias.to(dtype) if cast else bias


def global_bias(rel: torch.Tensor, dtype: torch.dtype, cast: bool = False) -> torch.Tensor:
    """Additive causal bias: ``finfo.min`` on future keys, 0 elsewhere, as ``future * finfo.min``
    (bool times float promotes; ``cast``: convert the bool with an explicit ``.to(dtype)`` first)."""
    future = rel > 0
    return (future.to(dtype) if cast else future) * torch.finfo(dtype).min


class AltGemma(nn.Module):
    """``forward(input_ids [B, T], past=None) -> (logits [B, T, V], present)``; ``present`` holds
    ``"{i}.key"`` / ``"{i}.value"`` ``[B, Hkv, S, d]`` for every layer that is not a consumer."""

    def __init__(self, cfg: AltConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.stack = nn.ModuleList(Block(cfg, i) for i in range(len(cfg.kinds)))
        self.final = Norm(cfg.width, cfg.eps)

    def forward(self, input_ids: torch.Tensor, past: dict[str, torch.Tensor] | None = None):
        cfg = self.cfg
        t = input_ids.shape[1]
        start = 0 if past is None else past["0.key"].shape[-2]
        positions = torch.arange(start, start + t, device=input_ids.device)  # [T]
        keys = torch.arange(start + t, device=input_ids.device)  # [S]
        rel = keys[None, :] - positions[:, None]  # [T, S]
        dtype = self.embed.weight.dtype
        biases = {LOCAL: local_bias(rel, cfg.window, dtype, cfg.mask_casts)[None, None],  # [1, 1, T, S]
                  GLOBAL: global_bias(rel, dtype, cfg.mask_casts)[None, None]}
        x = self.embed(input_ids) * math.sqrt(cfg.width)
        present: dict[str, torch.Tensor] = {}
        produced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, block in enumerate(self.stack):
            source = cfg.producer_of(i)
            cached = None
            if past is not None and source == i:
                cached = (past[f"{i}.key"], past[f"{i}.value"])
            borrowed = produced[source] if source != i else None  # [B, Hkv, S, d] pair
            x, kv = block(x, positions, biases[cfg.kinds[i]], cached, borrowed)
            if kv is not None:
                produced[i] = kv
                present[f"{i}.key"], present[f"{i}.value"] = kv
        logits = self.final(x) @ self.embed.weight.t()  # [B, T, V], tied
        logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits, present


def build(cfg: AltConfig | None = None, seed: int = 0) -> AltGemma:
    """An fp32 :class:`AltGemma` in eval mode with deterministic random weights: embedding
    ``N(0, 1/width)``, norm scales ``1 + 0.1 N(0, 1)`` (off the trivial init, so a bug in any of them
    changes the output), PyTorch's default Linear init. The global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AltGemma(cfg or AltConfig())
        with torch.no_grad():
            model.embed.weight.normal_(0.0, model.cfg.width ** -0.5)
            for name, p in model.named_parameters():
                if name.endswith(".scale"):
                    p.normal_(1.0, 0.1)
    return model.eval()
