"""DeepSeek V4 (Flash, Pro): mHC hyper-connections + hybrid sliding-window / CSA / HCA attention.

Follows spec section 4 (4.2-4.9); the official inference code (``inference/model.py`` of the V4-Pro
HF repo, verbatim copy ``Nicooo-Wang/DeepSeek-V4-Pro-code@0ec3a03``) is the ground truth for the math.
The file is ~750 lines because the reusable reference pieces (mHC, compressor, indexer, sparse
attention) live here once, next to the model that uses them, so op tests import exactly this math.

Reusable pieces (the oracles for ``effexport::mhc_*``, ``kv_compress``, ``indexer_topk``,
``sparse_attention``):
    sinkhorn(logits, iters, eps) -> comb                                   (spec 4.4)
    hc_pre(X, fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6) -> (u, post, comb)
    hc_post(X, out, post, comb) -> X'
    hc_head(X, fn, base, scale, eps=1e-6, norm_eps=1e-6) -> u
    rope_interleaved(x, positions, inv_freq, inverse=False)               (complex pairs, last dims)
    compressed_visible(q_pos, n, ratio) -> bool [T, n]                   (r(i+1) <= t+1)
    Compressor (full-sequence ``forward`` and incremental ``step``)     (spec 4.3)
    Indexer, indexer_topk(scores, k)                                     (lightning indexer)
    sparse_attention_reference(q, kv, comp, idx, sink, ...)              (window + compressed + sink)

Covered: q low-rank + per-head weightless RMS norm, single K=V 512-d latent, interleaved RoPE on the
last ``rope_head_dim`` dims (theta 1e4 on window-only layers, ``compress_rope_theta`` + YaRN on
compressed layers), 128-token window on every layer, CSA (ratio 4, overlapping compressor + lightning
indexer top-k) and HCA (ratio 128, all visible entries), learned per-head sink logit, inverse RoPE on
the output rope slice, grouped low-rank output projection, MoE (sqrt-softplus scores, noaux bias for
selection only, renormalised, ``route_scale``, shared expert, ``swiglu_limit`` on routed and shared
experts, the first ``n_hash_layers`` routed through a fixed ``tid2eid`` int64 buffer), mHC with
Sinkhorn (official kernel math, not the HF ``02356fe`` variant).

Not DeepSeek's: ``plain_residual=True`` (``config.without_mhc()``, hc_mult 1) replaces every mHC by a
plain pre-norm residual (``x + f(norm(x))``, no hc parameters, no hc head) -- the single-stream baseline
that mHC's cost is measured against (``bench/torch_engine.py``'s ``/nomhc`` cases).

Not covered: FP8/FP4 simulation is OFF -- the quantise-dequantise calls of the official forward
(``act_quant`` on the kv nope dims and compressed entries, ``fp4_act_quant`` on indexer q/keys) are
not modelled, so this is the bf16/fp32 math of the QAT model. The MTP head is not part of the
inference forward and is not built; parameter counts exclude it (``config.param_counts(
include_mtp=True)`` adds it for reference), consistent with the spec 4.2 recount (Flash 284.3 B /
13.8 B active without MTP). Tensor parallelism and the official fixed-size ring caches are not here.

Decode cache (``present``; keys ``"{layer}.{name}"``, B batch, S tokens so far, D = head_dim,
c = coff * D with coff = 2 on CSA layers (overlapping compressor) and 1 on HCA layers, r = ratio):
    kv                [B, S, D]        every token's RoPE'd K=V latent (naive full length; attention
                                       reads only the last ``window_size``). Every layer. The start
                                       position of a call is ``past["0.kv"].shape[1]``.
    comp              [B, S // r, D]   compressed entries so far (compressed layers)
    comp_kv_state     [B, coff*r, c]   fp32 projected kv of the open block (CSA: slots [0, r) hold
                                       the previous complete block, [r, 2r) the open one), zeros
    comp_score_state  [B, coff*r, c]   fp32 gate scores (+ ape) of the same slots, -inf when empty
    index_k           [B, S // 4, Di]  lightning-indexer keys (CSA layers; Di = index_head_dim)
    index_kv_state, index_score_state  [B, 8, 2*Di] the indexer compressor's state (CSA layers)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from effexport.samples._blocks import (GatedMLP, RMSNorm, StackedExperts, attention_mask, count_params,
                                       inv_freq_default, inv_freq_yarn, rms_norm)
from effexport.samples._spec import CacheTensor, LayerSpec

REPORT_ONLY = ("deepseek-v3.2",)
BASELINE_DESCRIPTION = ("every layer full causal attention keeping every token's uncompressed K=V entry "
                        "(no sliding window, no CSA/HCA compression, no lightning indexer or top-k "
                        "selection); V3.2: dense MLA without the DSA indexer")


# ----------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DeepSeekV4Config:
    """DeepSeek V4 hyper-parameters (field names follow the official ``ModelArgs``).

    ``compress_ratios`` has one entry per decoder layer (the MTP layer's trailing 0 is left out):
    0 = sliding window only ("swa"), ``csa_ratio`` = overlapping compressor + indexer ("csa"),
    anything else = non-overlapping compressor, all entries visible ("hca")."""

    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4,)
    csa_ratio: int = 4
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    n_hash_layers: int = 3
    n_mtp_layers: int = 1
    hc_mult: int = 4
    plain_residual: bool = False  # not DeepSeek's: a single-stream pre-norm residual in place of mHC (hc_mult 1)
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576

    def __post_init__(self):
        if len(self.compress_ratios) != self.n_layers:
            raise ValueError(f"compress_ratios has {len(self.compress_ratios)} entries for {self.n_layers} layers")
        if self.plain_residual and self.hc_mult != 1:
            raise ValueError(f"plain_residual has one residual stream: hc_mult must be 1, not {self.hc_mult}")

    def without_mhc(self) -> "DeepSeekV4Config":
        """The same model with a plain single-stream residual (``x + f(norm(x))`` per sub-layer, no
        hyper-connection parameters or hc head): the baseline that mHC's cost is measured against."""
        return replace(self, hc_mult=1, plain_residual=True)

    def layer_type(self, i: int) -> str:
        """"swa" (window only), "csa" (ratio ``csa_ratio``, indexer) or "hca"."""
        r = self.compress_ratios[i]
        return "swa" if r == 0 else ("csa" if r == self.csa_ratio else "hca")

    @property
    def kv_published_bytes(self) -> int:
        """Main KV entry as shipped: nope dims FP8 (1 B) + rope dims BF16 (2 B) = 576 B at 448/64."""
        return (self.head_dim - self.rope_head_dim) + 2 * self.rope_head_dim

    def layer_specs(self, baseline: bool = False) -> list[LayerSpec]:
        """Per-layer attention and cache layout (see the module docstring for the tensors)."""
        h, d, w = self.n_heads, self.head_dim, self.window_size
        specs = []
        for i, r in enumerate(self.compress_ratios):
            if baseline:
                specs.append(LayerSpec(i, "full", "independent", i, h, d, d, cache=(
                    CacheTensor("kv", "full", d, published_bytes=self.kv_published_bytes),)))
                continue
            kind, coff = self.layer_type(i), 2 if r == self.csa_ratio else 1
            cache = [CacheTensor("kv", "ring", d, window=w, published_bytes=self.kv_published_bytes)]
            if r:
                cache += [CacheTensor("comp", "compressed", d, ratio=r, published_bytes=self.kv_published_bytes),
                          CacheTensor("comp_kv_state", "state", coff * d, entries=coff * r, fp32=True),
                          CacheTensor("comp_score_state", "state", coff * d, entries=coff * r, fp32=True)]
            if kind == "csa":
                di = self.index_head_dim
                cache += [CacheTensor("index_k", "compressed", di, ratio=r, published_bytes=di / 2),  # fp4
                          CacheTensor("index_kv_state", "state", 2 * di, entries=2 * r, fp32=True),
                          CacheTensor("index_score_state", "state", 2 * di, entries=2 * r, fp32=True)]
            specs.append(LayerSpec(i, kind, "independent", i, h, d, d, cache=tuple(cache), window=w, ratio=r,
                                   topk=self.index_topk if kind == "csa" else None,
                                   indexer=(self.index_n_heads, self.index_head_dim) if kind == "csa" else None))
        return specs

    def _block_params(self, ratio: int, hash_layer: bool) -> tuple[int, int]:
        """(total, inactive routed-expert) parameters of one block."""
        dm, h, d, q = self.dim, self.n_heads, self.head_dim, self.q_lora_rank
        attn = dm * q + q + q * h * d + dm * d + d + h * d * self.o_lora_rank + self.o_groups * self.o_lora_rank * dm + h
        if ratio:
            coff = 2 if ratio == self.csa_ratio else 1
            attn += ratio * coff * d + 2 * dm * coff * d + d
        if ratio == self.csa_ratio:
            di, hi = self.index_head_dim, self.index_n_heads
            attn += q * hi * di + dm * hi + ratio * 2 * di + 2 * dm * 2 * di + di
        mix = (2 + self.hc_mult) * self.hc_mult
        hc = 2 * dm + (0 if self.plain_residual else 2 * (mix * self.hc_mult * dm + mix + 3))
        expert = 3 * dm * self.moe_inter_dim
        e = self.n_routed_experts
        moe = e * dm + (0 if hash_layer else e) + e * expert + self.n_shared_experts * expert
        return attn + hc + moe, (e - self.n_activated_experts) * expert

    def param_counts(self, include_mtp: bool = False) -> dict[str, int]:
        """Analytic ``{"total", "effective", "active"}`` (equals ``Model.param_counts()``); MTP excluded
        unless ``include_mtp`` (one more block with ratio 0, e/h projections, 3 norms, its hc head)."""
        dm, n = self.dim, self.hc_mult
        head = 0 if self.plain_residual else n * n * dm + n + 1
        total = 2 * self.vocab_size * dm + dm + head
        inactive = 0
        for i, r in enumerate(self.compress_ratios):
            t, off = self._block_params(r, i < self.n_hash_layers)
            total, inactive = total + t, inactive + off
        if include_mtp:
            for _ in range(self.n_mtp_layers):
                t, off = self._block_params(0, False)
                total += t + 2 * dm * dm + 3 * dm + head
                inactive += off
        return {"total": total, "effective": total, "active": total - inactive}


@dataclass(frozen=True)
class DeepSeekV32Config:
    """DeepSeek V3.2 (671 B, MLA + DSA lightning indexer over raw tokens): REPORT-ONLY, for the KV
    and parameter comparison of spec 4.5; there is no model for it here."""

    vocab_size: int = 129280
    dim: int = 7168
    n_layers: int = 61
    n_dense_layers: int = 3
    inter_dim: int = 18432
    n_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    moe_inter_dim: int = 2048
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    score_func: str = "sigmoid"
    route_scale: float = 2.5
    kv_published_bytes: int = 656     # FlashMLA FP8: 512 fp8 + 4 fp32 scales + 64 bf16
    index_published_bytes: int = 132  # 128 fp8 + 1 fp32 scale
    max_position_embeddings: int = 163840

    def layer_specs(self, baseline: bool = False) -> list[LayerSpec]:
        """MLA in absorbed MQA form (576-d keys, 512-d values) + indexer keys; baseline drops the
        indexer (dense MLA). ``topk`` marks the DSA selection."""
        kv_dim = self.kv_lora_rank + self.qk_rope_head_dim
        specs = []
        for i in range(self.n_layers):
            cache = [CacheTensor("kv", "full", kv_dim, published_bytes=self.kv_published_bytes)]
            if not baseline:
                cache.append(CacheTensor("index_k", "full", self.index_head_dim,
                                         published_bytes=self.index_published_bytes))
            specs.append(LayerSpec(i, "full", "independent", i, self.n_heads, kv_dim, self.kv_lora_rank,
                                   cache=tuple(cache), topk=None if baseline else self.index_topk,
                                   indexer=None if baseline else (self.index_n_heads, self.index_head_dim)))
        return specs

    def param_counts(self) -> dict[str, int]:
        """Analytic parameter counts (no MTP), from the V3.2-Exp ``model.py`` module layout."""
        dm, h, q, c, rd = self.dim, self.n_heads, self.q_lora_rank, self.kv_lora_rank, self.qk_rope_head_dim
        attn = (dm * q + q + q * h * (self.qk_nope_head_dim + rd) + dm * (c + rd) + c
                + c * h * (self.qk_nope_head_dim + self.v_head_dim) + h * self.v_head_dim * dm)
        attn += q * self.index_n_heads * self.index_head_dim + dm * self.index_head_dim + 2 * self.index_head_dim \
            + dm * self.index_n_heads
        expert = 3 * dm * self.moe_inter_dim
        e = self.n_routed_experts
        total = 2 * self.vocab_size * dm + dm
        inactive = 0
        for i in range(self.n_layers):
            total += attn + 2 * dm
            if i < self.n_dense_layers:
                total += 3 * dm * self.inter_dim
            else:
                total += e * dm + e + (e + self.n_shared_experts) * expert
                inactive += (e - self.n_activated_experts) * expert
        return {"total": total, "effective": total, "active": total - inactive}


_FLASH = DeepSeekV4Config()
PRESETS: dict[str, object] = {
    "deepseek-v4-flash": _FLASH,
    "deepseek-v4-pro": DeepSeekV4Config(
        dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16,
        compress_ratios=(128, 128) + (4, 128) * 29 + (4,), index_topk=1024, n_routed_experts=384,
        moe_inter_dim=3072, route_scale=2.5),
    "deepseek-v3.2": DeepSeekV32Config(),
    # spec 4.9 CPU-friendly variant (HCA ratio 128 -> 16); vocab chosen small
    "deepseek-v4-flash:tiny": DeepSeekV4Config(
        vocab_size=256, dim=64, n_layers=6, n_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=32,
        o_groups=2, o_lora_rank=16, window_size=8, compress_ratios=(0, 0, 4, 16, 4, 16), index_n_heads=2,
        index_head_dim=16, index_topk=4, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=32,
        n_hash_layers=1, max_position_embeddings=4096),
    # the Pro layer pattern (HCA first two layers) at the same tiny size
    "deepseek-v4-pro:tiny": DeepSeekV4Config(
        vocab_size=256, dim=64, n_layers=5, n_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=32,
        o_groups=2, o_lora_rank=16, window_size=8, compress_ratios=(16, 16, 4, 16, 4), index_n_heads=2,
        index_head_dim=16, index_topk=4, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=32,
        route_scale=2.5, n_hash_layers=1, max_position_embeddings=4096),
}


# ------------------------------------------------------------------------------------------- mHC
def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """``sinkhorn(logits [..., n, n], iters, eps) -> comb [..., n, n]`` (fp32), official kernel math:
    row softmax + eps, divide by column sums (+eps), then ``iters - 1`` times rows then columns."""
    m = logits.float().softmax(-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


def _hc_mixes(X: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """``vec(X) fn^T * rsqrt(mean(vec(X)^2) + eps)`` in fp32: X [..., n, d], fn [m, n*d] -> [..., m]."""
    xf = X.flatten(-2).float()  # [..., n*d]
    return F.linear(xf, fn.float()) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)


def hc_pre(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int = 20,
           eps: float = 1e-6, norm_eps: float = 1e-6):
    """``hc_pre(X [..., n, d], fn [(2+n)n, n*d], base [(2+n)n], scale [3], iters, eps, norm_eps)
    -> (u [..., d] in X's dtype, post [..., n], comb [..., n, n])`` (spec 4.4): pre = sigmoid + eps,
    post = 2 sigmoid, comb = Sinkhorn of the last n*n mixes; ``u = sum_i pre_i X_i``."""
    n = X.shape[-2]
    mix = _hc_mixes(X, fn, norm_eps)  # [..., (2+n)n]
    b, s = base.float(), scale.float()
    pre = torch.sigmoid(mix[..., :n] * s[0] + b[:n]) + eps
    post = 2 * torch.sigmoid(mix[..., n:2 * n] * s[1] + b[n:2 * n])
    comb = sinkhorn((mix[..., 2 * n:] * s[2] + b[2 * n:]).unflatten(-1, (n, n)), iters, eps)
    u = (pre.unsqueeze(-1) * X.float()).sum(-2)  # [..., d]
    return u.to(X.dtype), post, comb


def hc_post(X: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """``hc_post(X [..., n, d], out [..., d], post [..., n], comb [..., n, n]) -> X' [..., n, d]`` with
    ``X'_j = post_j out + sum_i comb[i, j] X_i`` (H^res = comb^T), in out's dtype."""
    mixed = torch.einsum("...ij,...id->...jd", comb.float(), X.float())
    return (post.float().unsqueeze(-1) * out.float().unsqueeze(-2) + mixed).to(out.dtype)


def hc_head(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
            norm_eps: float = 1e-6) -> torch.Tensor:
    """``hc_head(X [..., n, d], fn [n, n*d], base [n], scale [1]) -> u [..., d]``: the final collapse,
    ``pre = sigmoid(mix * scale + base) + eps``, ``u = sum_i pre_i X_i``."""
    pre = torch.sigmoid(_hc_mixes(X, fn, norm_eps) * scale.float() + base.float()) + eps
    return (pre.unsqueeze(-1) * X.float()).sum(-2).to(X.dtype)


# ------------------------------------------------------------------------------------------ RoPE
def rope_interleaved(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                     inverse: bool = False) -> torch.Tensor:
    """Rotate the LAST ``2 * len(inv_freq)`` dims of ``x [B, T, rd]`` or ``x [B, T, H, rd]`` as
    adjacent (real, imag) pairs (the official complex convention); ``inverse`` de-rotates."""
    rd = 2 * inv_freq.shape[0]
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(x.device, torch.float32)  # [T, rd/2]
    cos, sin = ang.cos(), (-ang.sin() if inverse else ang.sin())
    if x.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    pairs = x[..., -rd:].float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rot = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([x[..., :-rd], rot], dim=-1)


def layer_inv_freq(config: DeepSeekV4Config, layer: int) -> torch.Tensor:
    """Window-only layers: plain RoPE theta ``rope_theta``; compressed layers: ``compress_rope_theta``
    with YaRN (no mscale). Same table for q, kv, compressed entries and the indexer of the layer."""
    rd = config.rope_head_dim
    if config.compress_ratios[layer] == 0 or config.original_seq_len <= 0:
        theta = config.rope_theta if config.compress_ratios[layer] == 0 else config.compress_rope_theta
        return inv_freq_default(rd, theta)
    return inv_freq_yarn(rd, config.compress_rope_theta, config.rope_factor, config.original_seq_len,
                         config.beta_fast, config.beta_slow)


def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Sylvester Hadamard matrix scaled by ``n^-1/2`` (orthogonal, symmetric); ``x @ H`` equals the
    official ``hadamard_transform(x, scale=n**-0.5)``."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h * n ** -0.5).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------ compressor
def compressed_visible(q_pos: torch.Tensor, n: int, ratio: int) -> torch.Tensor:
    """Bool ``[T, n]``: compressed entry i is visible to the query at position t iff r(i+1) <= t+1."""
    i = torch.arange(n, device=q_pos.device)
    return ratio * (i[None, :] + 1) <= q_pos[:, None] + 1


class Compressor(nn.Module):
    """Learned softmax pooling of ``ratio`` tokens into one entry (spec 4.3).

    ``Compressor(dim, head_dim, rope_head_dim, ratio, rotate=False, eps=1e-6)``; overlapping (coff 2,
    window 2r, stride r) iff ``ratio == 4`` like the official code, else non-overlapping (coff 1).
    Parameters: ``wkv``/``wgate`` [coff*head_dim, dim], ``ape`` [ratio, coff*head_dim], ``norm``.
      forward(x [B, T, dim], inv_freq) -> entries [B, T // r, head_dim]         (full sequence from 0)
      step(x [B, T, dim], start_pos, state | None, inv_freq) -> (entries [B, n_new, head_dim],
           (kv_state, score_state) each fp32 [B, coff*r, coff*head_dim])         (incremental)
    Entry i = RMSNorm_w(sum_j softmax_j(z_j) a_j) with RoPE at position r*i; ``rotate`` applies the
    Hadamard rotation (indexer keys). Pooling runs in fp32."""

    def __init__(self, dim: int, head_dim: int, rope_head_dim: int, ratio: int, rotate: bool = False,
                 eps: float = 1e-6):
        super().__init__()
        self.ratio, self.head_dim, self.rope_head_dim, self.rotate = ratio, head_dim, rope_head_dim, rotate
        self.overlap = ratio == 4
        self.coff = 2 if self.overlap else 1
        self.ape = nn.Parameter(torch.zeros(ratio, self.coff * head_dim))
        self.wkv = nn.Linear(dim, self.coff * head_dim, bias=False)
        self.wgate = nn.Linear(dim, self.coff * head_dim, bias=False)
        self.norm = RMSNorm(head_dim, eps)

    def project(self, x: torch.Tensor, start_pos: int):
        """fp32 ``a = x Wkv``, ``z = x Wgate + ape[pos % r]``, each [B, T, coff*head_dim]."""
        pos = torch.arange(start_pos, start_pos + x.shape[1], device=x.device)
        a = F.linear(x.float(), self.wkv.weight.float())
        z = F.linear(x.float(), self.wgate.weight.float()) + self.ape.float()[pos % self.ratio]
        return a, z

    def _pool(self, a_blocks: torch.Tensor, z_blocks: torch.Tensor) -> torch.Tensor:
        """[B, 1 + n, r, c] (overlap: block 0 = the previous block) or [B, n, r, c] -> [B, n, head_dim]."""
        d = self.head_dim
        if self.overlap:  # window = previous block's first half + current block's second half
            a = torch.cat([a_blocks[:, :-1, :, :d], a_blocks[:, 1:, :, d:]], dim=2)  # [B, n, 2r, d]
            z = torch.cat([z_blocks[:, :-1, :, :d], z_blocks[:, 1:, :, d:]], dim=2)
        else:
            a, z = a_blocks, z_blocks
        return (a * z.softmax(dim=2)).sum(dim=2)  # [B, n, d]

    def _finish(self, pooled: torch.Tensor, first_block: int, inv_freq: torch.Tensor, dtype) -> torch.Tensor:
        pos = self.ratio * torch.arange(first_block, first_block + pooled.shape[1], device=pooled.device)
        out = rope_interleaved(self.norm(pooled.to(dtype)), pos, inv_freq)
        if self.rotate:
            out = out @ hadamard_matrix(self.head_dim, out.dtype, out.device)
        return out

    def forward(self, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Full-sequence form: the entries of every complete block of ``x`` (positions 0..T-1)."""
        b, t, _ = x.shape
        n, r = t // self.ratio, self.ratio
        a, z = self.project(x[:, : n * r], 0)
        a, z = a.view(b, n, r, -1), z.view(b, n, r, -1)
        if self.overlap:  # block -1 contributes nothing: zeros / -inf scores
            a = torch.cat([a.new_zeros(b, 1, r, a.shape[-1]), a], 1)
            z = torch.cat([z.new_full((b, 1, r, z.shape[-1]), float("-inf")), z], 1)
        return self._finish(self._pool(a, z), 0, inv_freq, x.dtype)

    def empty_state(self, batch: int, device=None):
        """Zero kv / -inf score state, each fp32 [B, coff*r, coff*head_dim]."""
        shape = (batch, self.coff * self.ratio, self.coff * self.head_dim)
        return (torch.zeros(shape, device=device), torch.full(shape, float("-inf"), device=device))

    def step(self, x: torch.Tensor, start_pos: int, state, inv_freq: torch.Tensor):
        """Incremental form: tokens at ``start_pos..start_pos+T-1`` extend the open block; returns the
        entries of the blocks they complete and the new state (see the class docstring)."""
        b, t, _ = x.shape
        r, p = self.ratio, start_pos % self.ratio
        off = r if self.overlap else 0
        kv_state, score_state = state if state is not None else self.empty_state(b, x.device)
        a, z = self.project(x, start_pos)
        a = torch.cat([kv_state[:, : off + p], a], 1)  # [B, off + p + T, c], starts at a block boundary
        z = torch.cat([score_state[:, : off + p], z], 1)
        n_new = (p + t) // r
        pad = off + (n_new + 1) * r - a.shape[1]  # >= 1: always one open (maybe empty) block at the end
        a = F.pad(a, (0, 0, 0, pad))
        z = F.pad(z, (0, 0, 0, pad), value=float("-inf"))
        new_state = (a[:, -self.coff * r:], z[:, -self.coff * r:])
        a_blocks, z_blocks = a.unflatten(1, (-1, r)), z.unflatten(1, (-1, r))  # [B, off/r + n_new + 1, r, c]
        nb = n_new + (1 if self.overlap else 0)
        entries = self._pool(a_blocks[:, :nb], z_blocks[:, :nb])
        return self._finish(entries, start_pos // r, inv_freq, x.dtype), new_state


# --------------------------------------------------------------------------------------- indexer
def indexer_topk(scores: torch.Tensor, visible: torch.Tensor, topk: int) -> torch.Tensor:
    """``indexer_topk(scores [B, T, N], visible bool [T, N], topk) -> idx int64 [B, T, min(topk, N)]``:
    the highest-scoring VISIBLE entries, -1 where fewer than k are visible. Stable descending sort:
    among equal scores the lower index wins (deterministic ties: ``topk`` of exported backends may order ties
    differently, a stable sort does not)."""
    k = min(topk, scores.shape[-1])
    masked = scores.float().masked_fill(~visible, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :k]  # [B, T, k]
    ok = torch.gather(visible.expand_as(masked), -1, order)
    return torch.where(ok, order, torch.full_like(order, -1))


class Indexer(nn.Module):
    """Lightning indexer of a CSA layer: ``Indexer(dim, q_lora_rank, n_heads, head_dim, rope_head_dim,
    topk, ratio=4, eps)`` with ``wq_b``, ``weights_proj`` and its own rotating ``compressor``.

    ``forward(x [B, T, dim], qr [B, T, q_lora], positions [T], keys [B, N, head_dim], inv_freq)
    -> (scores [B, T, N] fp32, idx [B, T, min(topk, N)])`` with
    ``I_{t,i} = sum_h w_h ReLU(q_h . K_i)``, ``w = (x W_w) * head_dim^-1/2 * n_heads^-1/2`` and
    ``q = Hadamard(RoPE(qr W_qb))``; ``idx`` from :func:`indexer_topk` over visible entries."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_head_dim: int, topk: int,
                 ratio: int = 4, eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.ratio = n_heads, head_dim, topk, ratio
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)
        self.compressor = Compressor(dim, head_dim, rope_head_dim, ratio, rotate=True, eps=eps)

    def forward(self, x, qr, positions, keys, inv_freq):
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))  # [B, T, Hi, Di]
        q = rope_interleaved(q, positions, inv_freq) @ hadamard_matrix(self.head_dim, q.dtype, q.device)
        w = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)  # [B, T, Hi]
        dots = torch.einsum("bthd,bnd->bthn", q.float(), keys.float())  # [B, T, Hi, N]
        scores = (dots.relu() * w.unsqueeze(-1)).sum(2)  # [B, T, N]
        visible = compressed_visible(positions, keys.shape[1], self.ratio)
        return scores, indexer_topk(scores, visible, self.topk)


# ------------------------------------------------------------------------------ sparse attention
def sparse_attention_reference(q: torch.Tensor, kv: torch.Tensor, comp: torch.Tensor | None,
                               idx: torch.Tensor | None, sink: torch.Tensor | None, q_pos: torch.Tensor,
                               kv_pos: torch.Tensor, window: int, ratio: int, scale: float) -> torch.Tensor:
    """``sparse_attention_reference(q [B, T, H, D], kv [B, S, D], comp [B, N, D] | None,
    idx [B, T, K] | None, sink [H] | None, q_pos [T], kv_pos [S], window, ratio, scale) -> o [B, T, H, D]``.

    Keys = the window ``{kv_s : q - window < s <= q}`` plus compressed entries: the selected ``idx``
    (CSA; -1 = none) or, with ``idx=None``, every entry visible by r(i+1) <= t+1 (HCA). K = V (one
    shared latent). ``softmax`` over all keys with ``exp(sink_h)`` added to the denominator only.
    fp32 math, output in q's dtype (no RoPE de-rotation here)."""
    qf = q.float()
    logits = [torch.einsum("bthd,bsd->bths", qf, kv.float()) * scale]  # [B, T, H, S]
    logits[0] = logits[0].masked_fill(~attention_mask(q_pos, kv_pos, window)[:, None], float("-inf"))
    if comp is not None and idx is None:
        lc = torch.einsum("bthd,bnd->bthn", qf, comp.float()) * scale  # [B, T, H, N]
        logits.append(lc.masked_fill(~compressed_visible(q_pos, comp.shape[1], ratio)[:, None], float("-inf")))
    elif comp is not None:
        b, t, k = idx.shape
        gathered = comp.float()[torch.arange(b, device=q.device)[:, None, None], idx.clamp(min=0)]  # [B, T, K, D]
        lc = torch.einsum("bthd,btkd->bthk", qf, gathered) * scale
        logits.append(lc.masked_fill((idx < 0)[:, :, None], float("-inf")))
    scores = torch.cat(logits, dim=-1)  # [B, T, H, S + N|K]
    if sink is not None:
        sink_col = sink.float().view(1, 1, -1, 1).expand(*scores.shape[:3], 1)
        probs = torch.cat([scores, sink_col], -1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    s = kv.shape[1]
    out = torch.einsum("bths,bsd->bthd", probs[..., :s], kv.float())
    if comp is not None and idx is None:
        out = out + torch.einsum("bthn,bnd->bthd", probs[..., s:], comp.float())
    elif comp is not None:
        out = out + torch.einsum("bthk,btkd->bthd", probs[..., s:], gathered)
    return out.to(q.dtype)


# ------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """One V4 attention layer: window (+ compressed entries, + indexer on CSA layers) with sink.

    ``forward(x [B, T, dim], positions [T], start_pos, cache dict | None) -> (y [B, T, dim], cache)``;
    the cache dict uses the layer-local names of the module docstring."""

    def __init__(self, config: DeepSeekV4Config, layer: int):
        super().__init__()
        c = config
        self.config, self.layer = c, layer
        self.ratio, self.kind = c.compress_ratios[layer], c.layer_type(layer)
        self.n_heads, self.head_dim, self.rd, self.eps = c.n_heads, c.head_dim, c.rope_head_dim, c.norm_eps
        self.attn_sink = nn.Parameter(torch.zeros(c.n_heads))
        self.wq_a = nn.Linear(c.dim, c.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps)
        self.wq_b = nn.Linear(c.q_lora_rank, c.n_heads * c.head_dim, bias=False)
        self.wkv = nn.Linear(c.dim, c.head_dim, bias=False)
        self.kv_norm = RMSNorm(c.head_dim, c.norm_eps)
        # grouped low-rank output: per group (H/g * D) -> o_lora, stored [g * o_lora, H/g * D]
        self.wo_a = nn.Linear(c.n_heads * c.head_dim // c.o_groups, c.o_groups * c.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(c.o_groups * c.o_lora_rank, c.dim, bias=False)
        self.compressor = Compressor(c.dim, c.head_dim, c.rope_head_dim, self.ratio, eps=c.norm_eps) if self.ratio else None
        self.indexer = Indexer(c.dim, c.q_lora_rank, c.index_n_heads, c.index_head_dim, c.rope_head_dim, c.index_topk,
                               self.ratio, c.norm_eps) if self.kind == "csa" else None

    def forward(self, x, positions, start_pos: int, cache: dict | None):
        b, t, _ = x.shape
        c, out = self.config, {}
        inv_freq = layer_inv_freq(c, self.layer)
        qr = self.q_norm(self.wq_a(x))  # [B, T, q_lora]
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))  # [B, T, H, D]
        q = rms_norm(q, None, self.eps)  # per-head, no weight
        q = rope_interleaved(q, positions, inv_freq)
        kv = rope_interleaved(self.kv_norm(self.wkv(x)), positions, inv_freq)  # [B, T, D], K = V
        out["kv"] = kv if cache is None else torch.cat([cache["kv"], kv], 1)  # [B, S, D]
        n_win = min(out["kv"].shape[1], c.window_size + t - 1)  # only the last W(+T-1) are ever read
        kv_win = out["kv"][:, -n_win:]
        kv_pos = torch.arange(start_pos + t - n_win, start_pos + t, device=x.device)
        comp = idx = None
        if self.compressor is not None:
            state = None if cache is None else (cache["comp_kv_state"], cache["comp_score_state"])
            new, (out["comp_kv_state"], out["comp_score_state"]) = self.compressor.step(x, start_pos, state, inv_freq)
            comp = out["comp"] = new if cache is None else torch.cat([cache["comp"], new], 1)  # [B, S//r, D]
        if self.indexer is not None:
            state = None if cache is None else (cache["index_kv_state"], cache["index_score_state"])
            new, (out["index_kv_state"], out["index_score_state"]) = self.indexer.compressor.step(
                x, start_pos, state, inv_freq)
            keys = out["index_k"] = new if cache is None else torch.cat([cache["index_k"], new], 1)
            _, idx = self.indexer(x, qr, positions, keys, inv_freq)  # [B, T, K]
        o = sparse_attention_reference(q, kv_win, comp, idx, self.attn_sink, positions, kv_pos,
                                       c.window_size, self.ratio, self.head_dim ** -0.5)  # [B, T, H, D]
        o = rope_interleaved(o, positions, inv_freq, inverse=True)  # de-rotate the rope slice
        o = o.reshape(b, t, c.o_groups, -1)  # [B, T, g, H/g * D]
        wo_a = self.wo_a.weight.view(c.o_groups, c.o_lora_rank, -1)  # [g, o_lora, H/g * D]
        o = torch.einsum("btgd,grd->btgr", o, wo_a)  # [B, T, g, o_lora]
        return self.wo_b(o.flatten(2)), out


# ------------------------------------------------------------------------------------------- MoE
class Gate(nn.Module):
    """Router: sqrt-softplus (or sigmoid) scores; selection by scores + ``bias`` (noaux) or, on hash
    layers, by the fixed ``tid2eid [V, k]`` int64 table; weights = unbiased scores of the selected
    experts, renormalised, times ``route_scale``. ``forward(x [N, D], ids [N]) -> (weights, idx)``."""

    def __init__(self, config: DeepSeekV4Config, layer: int):
        super().__init__()
        c = config
        self.topk, self.score_func, self.route_scale = c.n_activated_experts, c.score_func, c.route_scale
        self.hash = layer < c.n_hash_layers
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.dim))  # init by Model
        if self.hash:  # k distinct experts per token id (filled by Model; random ops on meta are slow)
            self.register_buffer("tid2eid", torch.zeros(c.vocab_size, c.n_activated_experts, dtype=torch.int64))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(c.n_routed_experts))

    def forward(self, x, ids):
        scores = F.linear(x.float(), self.weight.float())  # [N, E]
        if self.score_func == "sqrtsoftplus":
            scores = F.softplus(scores).sqrt()
        elif self.score_func == "sigmoid":
            scores = scores.sigmoid()
        else:
            raise ValueError(f"unsupported score_func {self.score_func!r}")
        if self.hash:
            idx = self.tid2eid[ids]  # [N, k]
        else:
            idx = (scores + self.bias.float()).topk(self.topk, dim=-1).indices
        weights = scores.gather(1, idx)
        return weights / weights.sum(-1, keepdim=True) * self.route_scale, idx


class MoE(nn.Module):
    """Routed experts (stacked, ``swiglu_limit``) + ``n_shared_experts`` shared expert(s)."""

    def __init__(self, config: DeepSeekV4Config, layer: int):
        super().__init__()
        c = config
        self.gate = Gate(c, layer)
        self.experts = StackedExperts(c.n_routed_experts, c.dim, c.moe_inter_dim, "silu", c.swiglu_limit)
        self.shared_experts = GatedMLP(c.dim, c.n_shared_experts * c.moe_inter_dim, "silu", c.swiglu_limit)

    def forward(self, x, ids):
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # [N, D]
        weights, idx = self.gate(xf, ids.reshape(-1))
        y = self.experts(xf, idx, weights.to(x.dtype)) + self.shared_experts(xf)
        return y.view(shape)


# ----------------------------------------------------------------------------------------- model
class Block(nn.Module):
    """mHC-wrapped attention and MoE sub-layers, each with its own fp32 ``fn``/``base``/``scale``."""

    def __init__(self, config: DeepSeekV4Config, layer: int):
        super().__init__()
        c = config
        self.config = c
        self.attn, self.ffn = Attention(c, layer), MoE(c, layer)
        self.attn_norm, self.ffn_norm = RMSNorm(c.dim, c.norm_eps), RMSNorm(c.dim, c.norm_eps)
        if c.plain_residual:
            return
        mix, hc_dim = (2 + c.hc_mult) * c.hc_mult, c.hc_mult * c.dim
        for sub in ("attn", "ffn"):
            setattr(self, f"hc_{sub}_fn", nn.Parameter(torch.empty(mix, hc_dim)))  # init by Model
            setattr(self, f"hc_{sub}_base", nn.Parameter(torch.zeros(mix)))
            setattr(self, f"hc_{sub}_scale", nn.Parameter(torch.ones(3)))

    def _hc(self, sub: str, X):
        c = self.config
        return hc_pre(X, getattr(self, f"hc_{sub}_fn"), getattr(self, f"hc_{sub}_base"),
                      getattr(self, f"hc_{sub}_scale"), c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps)

    def forward(self, X, ids, positions, start_pos: int, cache):
        if self.config.plain_residual:  # X [B, T, dim]
            o, cache = self.attn(self.attn_norm(X), positions, start_pos, cache)
            X = X + o
            return X + self.ffn(self.ffn_norm(X), ids), cache
        u, post, comb = self._hc("attn", X)  # X [B, T, n, dim] -> u [B, T, dim]
        o, cache = self.attn(self.attn_norm(u), positions, start_pos, cache)
        X = hc_post(X, o, post, comb)
        u, post, comb = self._hc("ffn", X)
        X = hc_post(X, self.ffn(self.ffn_norm(u), ids), post, comb)
        return X, cache


class Model(nn.Module):
    """DeepSeek V4: embed -> repeat to ``hc_mult`` streams -> blocks -> hc head -> RMSNorm -> logits.

    ``forward(input_ids [B, T], past=None) -> (logits [B, T, V] fp32, present)``; see the module
    docstring for the cache. Report-only configs (V3.2) are refused."""

    def __init__(self, config: DeepSeekV4Config):
        super().__init__()
        if not isinstance(config, DeepSeekV4Config):
            raise TypeError(f"{type(config).__name__} is report-only (layer_specs / param_counts); "
                            "no DeepSeek V4 model can be built from it")
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.dim, _weight=torch.empty(c.vocab_size, c.dim))  # init below
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if not c.plain_residual:
            self._hc_head_params()
        if not self.embed.weight.is_meta:
            self._init_nontrivial()

    def _hc_head_params(self):
        c = self.config
        self.hc_head_fn = nn.Parameter(torch.empty(c.hc_mult, c.hc_mult * c.dim))
        self.hc_head_base = nn.Parameter(torch.zeros(c.hc_mult))
        self.hc_head_scale = nn.Parameter(torch.ones(1))

    @torch.no_grad()
    def _init_nontrivial(self):
        """Random init under the global seed (skipped on meta, where random ops are slow): embedding
        N(0, 1), router and mHC ``fn`` N(0, fan_in^-1/2), ``tid2eid`` k distinct experts per token.
        Norms, sinks, biases, ape and mHC scalars move off their trivial init (so a bug in any of
        them changes the output), and indexer heads are paired with opposite query signs (head h + H/2
        = -head h; the per-head weights w_h still differ): every entry then gets one positive ReLU term, so indexer scores are distinct (no exact-zero ties,
        whose order a backend's top-k may choose differently)."""
        self.embed.weight.normal_()
        for name, p in self.named_parameters():
            if name.endswith("gate.weight"):
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
            elif name.endswith("_fn"):  # mixes ~N(0, 0.5^2): Sinkhorn converges to 1e-5 in 20 iterations
                p.copy_(0.5 * torch.randn_like(p) * p.shape[1] ** -0.5)
        for m in self.modules():
            if isinstance(m, Gate) and m.hash:
                m.tid2eid.copy_(torch.rand(m.tid2eid.shape[0], m.weight.shape[0], device=m.weight.device).argsort(-1)[:, : m.topk])
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(p, nn.Parameter) and (name.endswith("norm.weight") or leaf.endswith("_scale")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif leaf in ("attn_sink", "ape", "bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif leaf.endswith("_base"):
                p.copy_(0.2 * torch.randn_like(p))
        for m in self.modules():
            if isinstance(m, Indexer):
                w = m.wq_b.weight.view(m.n_heads, m.head_dim, -1)
                half = m.n_heads // 2
                w[half: 2 * half] = -w[:half]  # q_{h+H/2} = -q_h: exactly one ReLU term is positive

    def forward(self, input_ids: torch.Tensor, past: dict[str, torch.Tensor] | None = None):
        b, t = input_ids.shape
        start = 0 if past is None else past["0.kv"].shape[1]
        positions = torch.arange(start, start + t, device=input_ids.device)
        X = self.embed(input_ids)  # [B, T, dim]
        if not self.config.plain_residual:
            X = X.unsqueeze(2).repeat(1, 1, self.config.hc_mult, 1)  # [B, T, n, dim]
        present = {}
        for i, layer in enumerate(self.layers):
            cache = None if past is None else {k.split(".", 1)[1]: v for k, v in past.items()
                                                if k.split(".", 1)[0] == str(i)}
            X, cache = layer(X, input_ids, positions, start, cache)
            present.update({f"{i}.{k}": v for k, v in cache.items()})
        c = self.config
        u = X if c.plain_residual else hc_head(X, self.hc_head_fn, self.hc_head_base, self.hc_head_scale,
                                               c.hc_eps, c.norm_eps)
        return F.linear(self.norm(u).float(), self.head.weight.float()), present  # [B, T, V]

    def param_counts(self) -> dict[str, int]:
        """Total = effective (no PLE); active = total minus the unselected routed experts per layer.
        MTP is not built, so not counted. Works on the meta device."""
        total = count_params(self)
        c = self.config
        inactive = sum((c.n_routed_experts - c.n_activated_experts) * layer.ffn.experts.expert_params()
                       for layer in self.layers)
        return {"total": total, "effective": total, "active": total - inactive}


def example_inputs(config: DeepSeekV4Config, batch: int = 2, seq_len: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Random token ids [B, T]; default T covers several blocks of the largest ratio, past the window,
    and is not a multiple of any ratio."""
    if seq_len is None:
        seq_len = 3 * max(max(config.compress_ratios), config.window_size) + 5
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen)
