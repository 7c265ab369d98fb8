"""Small decoders the attention passes must *not* rewrite the careless way.

Every model has the samples' contract, ``forward(input_ids [B, T], past=None) -> (logits, present)``
with ``present["{i}.k"]`` / ``present["{i}.v"]`` ``[B, Hkv, S, d]`` (full length) for every layer with a cache and
the start position taken from ``past["0.k"]``. Layers are pre-norm attention blocks (no MLP); one
mask, chosen by name, is shared by all layers:

``causal``        plain causal, through SDPA with a boolean mask: no window, no sharing anywhere.
``length_gated``  sliding(W) only once the sequence is longer than ``gate`` keys, causal before;
                  written with tensor ops (``torch.where`` on ``key_pos[-1] >= gate``) so that export
                  keeps both branches. Not one kind at every length: it must stay ``unknown``.
``bidirectional`` no mask at all: every key, cached ones and later new ones, is visible (an
                  encoder-style model run with a cache); new tokens see each other both ways.
``python_if``     the ``length_gated`` window decided by a Python ``if`` on the key count: a capture
                  at fewer keys traces only the causal branch (the window must not be lost silently).
``chunked``       causal within blocks of ``chunk`` positions (Llama-4 style local attention).
``padding``       causal, and new keys whose token id is ``pad`` are hidden from other queries (a
                  padding mask read from the token values, ``[B, T, S]``; cached keys stay visible).
``alibi``         causal plus an ALiBi-style additive bias ``-slope_h * (q_pos - k_pos)`` on the
                  scores (one slope per head): a bias the attention ops have no argument for.

``twin_kv=True`` makes every layer reuse layer 0's K/V projection *modules* (tied weights) on the
same input (parallel blocks), so all layers hold equal K/V values computed by separate projections
into separate caches: equal values are not shared K/V. ``lookalike`` gives sequential layers past
layer 0 a K/V that resembles layer 0's without being it:

``tied_k``      layer 0's K projection *module* (tied weights) applied to the layer's own input: its
                own K, its own cache.
``other_proj``  K/V computed from layer 0's input (the same hidden state) through the layer's own
                projections: same source, other values, its own cache.
``biased_read`` layer 0's full K/V (its cache and new entries) read, plus a learned bias on K: no
                cache of its own, and not layer 0's K either (reading layer 0's cache as-is drops the
                bias).

Not covered: sinks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MASKS = ("causal", "length_gated", "python_if", "bidirectional", "chunked", "padding", "alibi")
LOOKALIKES = ("", "tied_k", "other_proj", "biased_read")


@dataclass(frozen=True)
class NegConfig:
    """Sizes and the mask of one negative model."""

    mask: str = "causal"
    layers: int = 2
    vocab: int = 40
    width: int = 16
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 8
    window: int = 5      # length_gated: the window once the gate is open
    gate: int = 64       # length_gated: windowed iff the sequence has more than ``gate`` keys
    chunk: int = 4       # chunked: block size
    pad: int = 0         # padding: the token id whose keys are hidden
    twin_kv: bool = False
    lookalike: str = ""  # a K/V that resembles layer 0's (see the module docstring)

    def __post_init__(self):
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.lookalike not in LOOKALIKES or (self.lookalike and self.twin_kv):
            raise ValueError(f"lookalike must be one of {LOOKALIKES} (not with twin_kv), got {self.lookalike!r}")


def visibility(cfg: NegConfig, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
    """Boolean ``[T, S]`` mask (True = visible) for ``cfg.mask``; None for ``bidirectional``."""
    if cfg.mask == "bidirectional":
        return None
    causal = k_pos[None, :] <= q_pos[:, None]
    if cfg.mask == "causal":
        return causal
    if cfg.mask in ("padding", "alibi"):  # padding: the token-value part is :func:`padding_keys`
        return causal
    if cfg.mask == "chunked":
        return causal & (k_pos[None, :] // cfg.chunk == q_pos[:, None] // cfg.chunk)
    windowed = causal & (q_pos[:, None] - k_pos[None, :] < cfg.window)
    if cfg.mask == "python_if":
        return windowed if k_pos.shape[0] > cfg.gate else causal
    long_enough = k_pos[-1:] >= cfg.gate  # [1]: a tensor, so both branches are captured
    return torch.where(long_enough, windowed, causal)


def padding_keys(cfg: NegConfig, input_ids: torch.Tensor, cached: int) -> torch.Tensor:
    """``[B, 1, S]``: False for the new keys whose token is ``cfg.pad`` (cached keys stay visible)."""
    new = input_ids != cfg.pad  # [B, T]
    old = torch.ones(new.shape[0], cached, dtype=torch.bool, device=new.device)  # [B, S - T]
    return torch.cat([old, new], dim=1)[:, None, :]


def alibi_bias(cfg: NegConfig, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """``[H, T, S]`` additive score bias ``-slope_h * (q_pos - k_pos)``, slopes ``2^(-8 h / H)``."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, cfg.heads + 1, device=q_pos.device) / cfg.heads)
    return -slopes[:, None, None] * (q_pos[:, None] - k_pos[None, :]).to(torch.float32)


class Attention(nn.Module):
    """One attention layer: SDPA for the ``causal`` model, decomposed ``matmul-softmax-matmul``
    with ``masked_fill(-inf)`` (or no mask) for the others. GQA by ``repeat_interleave``."""

    def __init__(self, cfg: NegConfig, kv_from: "Attention | None" = None, k_from: "Attention | None" = None):
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(cfg.width, cfg.heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.heads * cfg.head_dim, cfg.width, bias=False)
        if kv_from is None:
            self.k = nn.Linear(cfg.width, cfg.kv_heads * cfg.head_dim, bias=False)
            self.v = nn.Linear(cfg.width, cfg.kv_heads * cfg.head_dim, bias=False)
        else:  # the same modules (tied weights), called again: separate projections
            self.k, self.v = kv_from.k, kv_from.v
        if k_from is not None:  # lookalike tied_k: only K's module tied
            self.k = k_from.k
        # lookalike biased_read: the bias added to the K read from layer 0 (non-zero: it matters)
        self.k_bias = nn.Parameter(torch.randn(1, cfg.kv_heads, 1, cfg.head_dim)) if cfg.lookalike == "biased_read" else None

    def heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``[B, T, n*d] -> [B, n, T, d]``."""
        b, t, _ = x.shape
        return x.view(b, t, n, self.cfg.head_dim).transpose(1, 2)

    def forward(self, x, mask, cached=None, bias=None, kv_x=None, read=None):
        """x ``[B, T, E]``, mask bool ``[T, S]`` / ``[B, T, S]`` or None, ``cached`` (K, V)
        ``[B, Hkv, S-T, d]``, ``bias`` ``[H, T, S]`` added to the scores; ``kv_x`` the input of the K/V
        projections (default ``x``); ``read`` another layer's full (K, V), read instead (plus ``k_bias``)."""
        cfg = self.cfg
        q = self.heads(self.q(x), cfg.heads)
        kv_x = x if kv_x is None else kv_x
        if read is not None:
            k, v = read[0] + self.k_bias, read[1]
        else:
            k, v = self.heads(self.k(kv_x), cfg.kv_heads), self.heads(self.v(kv_x), cfg.kv_heads)
        if cached is not None:
            k, v = torch.cat([cached[0], k], dim=2), torch.cat([cached[1], v], dim=2)
        rep = cfg.heads // cfg.kv_heads
        kx, vx = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, S, d]
        scale = cfg.head_dim ** -0.5
        if cfg.mask == "causal":
            out = F.scaled_dot_product_attention(q, kx, vx, attn_mask=mask, scale=scale)
        else:
            scores = torch.matmul(q, kx.transpose(2, 3)) * scale  # [B, H, T, S]
            if bias is not None:
                scores = scores + bias
            if mask is not None:
                scores = scores.masked_fill(~(mask[:, None] if mask.dim() == 3 else mask), float("-inf"))
            out = torch.matmul(scores.softmax(dim=-1), vx)
        b, _, t, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


class NegModel(nn.Module):
    """A stack of pre-norm attention blocks (parallel, all reading the embedding, when ``twin_kv``)."""

    def __init__(self, cfg: NegConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        first = Attention(cfg)
        self.attn = nn.ModuleList([first] + [Attention(cfg, first if cfg.twin_kv else None,
                                                       first if cfg.lookalike == "tied_k" else None)
                                             for _ in range(cfg.layers - 1)])
        self.norms = nn.ModuleList(nn.RMSNorm(cfg.width, eps=1e-6) for _ in range(cfg.layers))
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, past: dict[str, torch.Tensor] | None = None):
        t = input_ids.shape[1]
        start = 0 if past is None else past["0.k"].shape[2]
        q_pos = torch.arange(start, start + t, device=input_ids.device)  # [T]
        k_pos = torch.arange(start + t, device=input_ids.device)  # [S]
        mask = visibility(self.cfg, q_pos, k_pos)
        if self.cfg.mask == "padding":  # a query always sees itself (no all-hidden row)
            mask = mask & (padding_keys(self.cfg, input_ids, start) | (k_pos[None, :] == q_pos[:, None]))
        bias = alibi_bias(self.cfg, q_pos, k_pos) if self.cfg.mask == "alibi" else None
        x = self.tok(input_ids)
        present = {}
        total = x
        look, first_in = self.cfg.lookalike, None
        for i, (norm, attn) in enumerate(zip(self.norms, self.attn)):
            h = norm(x)
            first_in = h if i == 0 else first_in
            if i and look == "biased_read":  # layer 0's full K/V plus a bias; no cache of its own
                y, _ = attn(h, mask, bias=bias, read=(present["0.k"], present["0.v"]))
                x = x + y
                continue
            cached = None if past is None else (past[f"{i}.k"], past[f"{i}.v"])
            kv_x = first_in if look == "other_proj" else None
            y, (present[f"{i}.k"], present[f"{i}.v"]) = attn(h, mask, cached, bias, kv_x)
            if self.cfg.twin_kv:
                total = total + y  # parallel: every layer reads the embedding
            else:
                x = x + y
        return self.head(total if self.cfg.twin_kv else x), present


def build(cfg: NegConfig, seed: int = 0) -> NegModel:
    """An fp32 :class:`NegModel` in eval mode with deterministic weights (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NegModel(cfg)
    return model.eval()
