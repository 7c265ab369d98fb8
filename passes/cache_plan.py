"""The CachePlan: one entry per cache tensor of the rewritten decode step, one role per layer.

Built by the last pass from what the rewrite decided. It drives the step graph's inputs and outputs
(``past.{layer}.{name}`` in, ``present.{layer}.{name}`` out), the runtime's cache allocation and
the memory check (bytes of all cache inputs at a context length equal the plan's analytic sum).

Entry kinds: "full" (grows by one entry per token, concatenated), "buffer" (a full cache in a
fixed buffer of ``max_context`` rows, row = position, written in place by the runtime), "ring" (W
slots, slot = position mod W), "chunk" (chunked attention's chunk-local cache: C slots, slot =
position mod C, ``window`` = C; the entries of earlier chunks are masked, so it is the ring layout
with a chunk mask), "compressed" (one entry per ``ratio`` tokens, in a fixed buffer of ``max_context // ratio``
slots), "state" (fixed size whatever the context). Consumer layers own no entry.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from effexport.passes.sites import layer_index


@dataclass(frozen=True)
class CacheEntry:
    """One cache tensor: its I/O name, owning layer, kind, shape template and dtype.

    ``shape`` holds ints and the strings "batch" and "seq" (the growing dim of a full cache)."""

    name: str
    layer: int | None
    kind: str
    shape: tuple
    dtype: str
    window: int = 0
    ratio: int = 0
    fill: float = 0.0  # a state's prefill value (the model's own empty state, capture.initial_fills)

    def concrete_shape(self, batch: int, length: int) -> list[int]:
        """Shape at ``length`` cached tokens (``length`` is ignored by ring and state entries)."""
        return [batch if d == "batch" else length if d == "seq" else int(d) for d in self.shape]

    def nbytes(self, batch: int, context: int) -> int:
        """Bytes this entry occupies with ``context`` tokens cached."""
        numel = 1
        for d in self.concrete_shape(batch, context):
            numel *= d
        return numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def empty(self, batch: int, device="cpu") -> torch.Tensor:
        """The initial (prefill) value: zero-length full caches, zero-filled rings, states filled with
        ``fill`` (zeros unless the model's own prefill starts the state elsewhere, e.g. -inf scores)."""
        return torch.full(self.concrete_shape(batch, 0), float(self.fill), dtype=getattr(torch, self.dtype),
                          device=device)


@dataclass(frozen=True)
class LayerRole:
    """How one attention layer uses caches."""

    layer: int
    role: str            # owner | consumer | independent
    reads: int           # the layer whose cache it reads (itself unless consumer)
    kind: str            # full | ring | chunk | none (left alone) | plain (no cache in graph)
    window: int = 0


def buffer_capacity(entries) -> int | None:
    """The positions a step with these cache entries can hold: the rows of its smallest fixed-size
    full cache (``buffer``), or None when no such cache bounds them."""
    return min((e.concrete_shape(1, 0)[2] for e in entries if e.kind == "buffer"), default=None)


@dataclass
class CachePlan:
    """Every cache entry of the step graph, and each attention layer's role."""

    entries: list[CacheEntry] = field(default_factory=list)
    layers: list[LayerRole] = field(default_factory=list)

    def entry(self, name: str) -> CacheEntry:
        return next(e for e in self.entries if e.name == name)

    def nbytes(self, batch: int, context: int) -> int:
        """Bytes of all cache inputs of the decode step at ``context`` cached tokens."""
        return sum(e.nbytes(batch, context) for e in self.entries)

    def empty_caches(self, batch: int, device="cpu") -> list[torch.Tensor]:
        """Initial cache tensors, in entry order (the step graph's cache-input order)."""
        return [e.empty(batch, device) for e in self.entries]

    def to_json(self) -> dict:
        entries = [{k: v for k, v in asdict(e).items() if k != "fill" or v} for e in self.entries]  # fill 0: left out
        return {"entries": entries, "layers": [asdict(l) for l in self.layers]}


def stateful_layers(program) -> dict[int, list[str]]:
    """Layers whose caches are all fixed-size states (no input of theirs grows with the sequence):
    ``{layer: [cache names]}`` -- linear-attention / state-space layers (e.g. a gated delta net's
    conv window and recurrent state), exported as plain graph with their states as cache entries."""
    layers: dict[int, list[str]] = {}
    growing = set()
    for name in program.inputs:
        layer = layer_index(name[len("past."):]) if name.startswith("past.") else None
        if layer is None:
            continue
        layers.setdefault(layer, []).append(name[len("past."):])
        if program.seq_dims.get(name) is not None:
            growing.add(layer)
    return {layer: names for layer, names in layers.items() if layer not in growing}
