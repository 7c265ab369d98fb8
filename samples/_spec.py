"""The contract every sample fills in for accounting: per-layer attention and cache layout.

A sample's config returns ``layer_specs(baseline=False)``: one :class:`LayerSpec` per decoder layer,
saying what kind of attention the layer runs, whose cache it reads, and which tensors it must keep
per batch element while decoding (:class:`CacheTensor`). ``effexport report`` turns these into bytes
at a context length, both cache policies, and decode FLOPs; the CachePlan built by the passes is
checked against the same numbers.

``baseline=True`` describes the same model with its savings turned off (no KV sharing, every
windowed layer attending the full context, no compression) -- what a generic exporter keeps.

Cache kinds (``CacheTensor.kind``):
    "full"        one entry per token, kept for the whole context
    "ring"        one entry per token of the last ``window`` tokens (full-length under the
                  full-length policy, where windowed layers keep every token)
    "compressed"  one entry per ``ratio`` tokens (only completed blocks)
    "state"       a fixed number of entries whatever the context (conv rings, compressor buffers)
"""
from __future__ import annotations

from dataclasses import dataclass, field

CACHE_KINDS = ("full", "ring", "compressed", "state")
ROLES = ("owner", "consumer", "independent")


@dataclass(frozen=True)
class CacheTensor:
    """One cache tensor of one layer, per batch element.

    ``elements`` is the number of scalars per entry (e.g. ``kv_heads * head_dim`` for K); an entry
    covers one token ("full"/"ring"), ``ratio`` tokens ("compressed"), or the tensor holds
    ``entries`` entries whatever the context ("state"). ``published_bytes`` is the bytes per entry
    in the storage format the model's authors ship (e.g. fp8 + bf16 rope dims), None if the same as
    the chosen cache dtype; ``fp32`` marks state kept in fp32 whatever the cache dtype.
    """

    name: str
    kind: str
    elements: int
    window: int | None = None
    ratio: int = 1
    entries: int = 0
    published_bytes: float | None = None
    fp32: bool = False

    def __post_init__(self):
        if self.kind not in CACHE_KINDS:
            raise ValueError(f"cache kind {self.kind!r} not in {CACHE_KINDS}")
        if self.kind == "ring" and not self.window:
            raise ValueError(f"ring cache {self.name!r} needs a window")
        if self.kind == "compressed" and self.ratio < 2:
            raise ValueError(f"compressed cache {self.name!r} needs ratio >= 2")

    def num_entries(self, context: int, policy: str = "ring") -> int:
        """Entries kept at ``context`` tokens; ``policy`` "full_length" keeps every token of rings."""
        if self.kind == "full":
            return context
        if self.kind == "ring":
            return context if policy == "full_length" else min(context, self.window)
        if self.kind == "compressed":
            return context // self.ratio
        return self.entries


@dataclass(frozen=True)
class LayerSpec:
    """Attention and cache layout of one decoder layer.

    type:   "full" | "sliding" | "cca" | "swa" | "csa" | "hca" (DeepSeek V4: swa = window only)
    role:   "owner" (keeps a cache other layers read), "consumer" (reads layer ``reads``'s cache,
            keeps none), "independent" (keeps its own cache, nobody else reads it)
    heads, qk_dim, v_dim: query heads and per-head dims, for attention FLOPs
    window: local window in keys (None: the whole context); ratio/topk: compression and CSA
            selection; indexer: (heads, dim) of the lightning indexer on CSA layers
    """

    index: int
    type: str
    role: str
    reads: int
    heads: int
    qk_dim: int
    v_dim: int
    cache: tuple[CacheTensor, ...] = field(default_factory=tuple)
    window: int | None = None
    ratio: int = 0
    topk: int | None = None
    indexer: tuple[int, int] | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} not in {ROLES}")
        if self.role == "consumer" and self.cache:
            raise ValueError(f"layer {self.index}: a consumer keeps no cache of its own")

    def attended_keys(self, context: int) -> int:
        """Keys one decode query at position ``context - 1`` attends over."""
        local = context if self.window is None else min(context, self.window)
        if self.ratio:
            entries = context // self.ratio
            return local + (entries if self.topk is None else min(self.topk, entries))
        if self.topk:  # top-k over raw tokens (DeepSeek V3.2 DSA)
            return min(local, self.topk)
        return local


def capture_new_tokens(specs: list[LayerSpec], minimum: int = 3) -> int:
    """New-token count ``T`` of the capture's example step: at least twice every compression ratio.

    A compressor's step completes ``(T + P mod r) // r`` blocks, a size derived from ``T`` and the
    past length ``P``; torch.export specialises a size that is 0 or 1 in its example (its contiguity
    checks single out size-1 dims), so an example step completing one block bakes "one block per
    step" into the graph: exact only where a step completes exactly one block (DeepSeek V4's CSA step
    at T = 3, P = 37 was; a prefill of 5 tokens or a decode step completing no block was wrong or
    failed). With ``T >= 2r`` every such count is >= 2 in the example and stays symbolic."""
    return max([minimum] + [2 * spec.ratio for spec in specs if spec.ratio])


def capture_length(specs: list[LayerSpec], minimum: int = 40, new_tokens: int = 3) -> int:
    """Length of the example token stream a capture of this layout needs (prompt + ``new_tokens``).

    ``torch.export`` resolves every size comparison a forward makes (``min(cache, W + T - 1)``, "fewer
    compressed entries than top-k?") at the example sizes and keeps only that branch, so the example
    prompt must already be past every threshold the model has: longer than each window, at least one
    compressed block at half its length (``capture.growing_dims`` compares the caches at L/2 and L),
    and more compressed entries than each top-k. On the meta device the length costs nothing. The
    prompt is at least ``minimum - 3`` tokens whatever ``new_tokens`` (:func:`capture_new_tokens`)."""
    prompt = minimum - 3
    for spec in specs:
        if spec.window is not None:
            prompt = max(prompt, spec.window + 2)
        if spec.ratio:
            prompt = max(prompt, 2 * spec.ratio + 2)
            if spec.topk is not None:
                prompt = max(prompt, spec.ratio * (spec.topk + 2))
    return prompt + new_tokens
