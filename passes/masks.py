"""Classify attention masks by evaluating the mask sub-graph at probe lengths.

The mask node's ancestors are copied into a small graph and run on zero-filled inputs whose
symbolic sizes are set to probe values (query rows ``t``, past length ``p``). Queries are the last
``t`` of the ``S`` key positions. Each evaluated ``[t, S]`` visibility matrix is compared with the
candidate patterns; a kind is accepted only if it explains *every* probe:

    full         every key visible
    causal       key j visible to query i iff j <= i
    sliding(W)   causal and i - W < j (W keys including self, the HF convention)
    chunked(C)   causal and i // C == j // C
    unknown      anything else (the site is left alone, with the reason)

A mask that is windowed only for some lengths therefore classifies as unknown. Probes reach
``S = 2^20 + 3`` keys with few query rows, so windows up to a million tokens are told from causal.
Masks that read module buffers are evaluated with the buffer's values (not on the meta device)
or else reported as unknown. A mask that reads the *values* of a step input, not only its sizes (a
padding mask from ``input_ids != pad_id``, a mask read from a cache's contents), is unknown: its
pattern depends on the tokens, so no probe of positions alone can classify it (zero-filled probes
took a padding mask with a pad id other than 0 for causal).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from effexport.passes._graph import aten, concrete_shape, extract, free_symbols, is_call, meta_val

# ops that read only the sizes / dtype of their first argument, never its values
SHAPE_ONLY = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default,
              aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
              aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
              aten._assert_tensor_metadata.default}

# (query rows t, extra past length p): S = t + p when the mask is [T, P + T]
PROBES = ((1, 0), (2, 0), (5, 0), (17, 0), (3, 5), (1, 40), (7, 100), (2, 1000), (1, 3000),
          (3, 70000), (1, 1 << 20), (4, (1 << 20) - 1))
SQUARE_LIMIT = 2048  # when rows and keys share one symbol, probe up to this size


@dataclass(frozen=True)
class MaskKind:
    """The classification of one mask: kind, its window or chunk size, and why."""

    kind: str
    window: int = 0
    chunk: int = 0
    reason: str = ""


def _visibility(value: torch.Tensor, mode: str) -> torch.Tensor:
    while value.dim() > 2:
        value = value[0]
    if mode == "additive":
        return value > -1e30
    value = value.bool()
    return ~value if mode == "hidden" else value


def _patterns(t: int, s: int):
    q = torch.arange(s - t, s)[:, None]
    k = torch.arange(s)[None, :]
    return q, k, k <= q


def _probe_values(syms_rows: set, syms_cols: set, square: bool):
    """Symbol values per probe: query-row symbols -> t, other key-column symbols -> p (every other
    symbol, e.g. batch, is 1)."""
    for t, p in PROBES:
        if square:
            size = t + p
            if size > SQUARE_LIMIT:
                continue
            yield {s: size for s in syms_rows | syms_cols}
        else:
            env = {s: t for s in syms_rows}
            env.update({s: p for s in syms_cols - syms_rows})
            yield env


class MaskClassifier:
    """Evaluates and classifies mask nodes of one graph (results cached per node)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.cache: dict[tuple, MaskKind] = {}

    def classify(self, mask: fx.Node | None, mode: str, causal_flag: bool = False,
                 q: fx.Node | None = None, k: fx.Node | None = None) -> MaskKind:
        """Classify ``mask`` (None = no mask; ``causal_flag`` = SDPA is_causal)."""
        if mask is None:
            if not causal_flag:
                return MaskKind("full", reason="no mask")
            same = meta_val(q) is not None and meta_val(q).shape[-2] == meta_val(k).shape[-2]
            if same:
                return MaskKind("causal", reason="SDPA is_causal with as many queries as keys")
            return MaskKind("unknown", reason="SDPA is_causal with a cache is top-left aligned, not causal")
        key = (mask, mode)
        if key not in self.cache:
            self.cache[key] = self._classify(mask, mode)
        return self.cache[key]

    def _classify(self, mask: fx.Node, mode: str) -> MaskKind:
        val = meta_val(mask)
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            return MaskKind("unknown", reason="mask has no known 2-D+ shape")
        read = values_read(mask)
        if read:
            return MaskKind("unknown", reason=f"mask reads the values of {', '.join(read)} (a padding mask "
                                              "from token ids?), not only sizes: its pattern depends on the data")
        sub, placeholders = extract(self.gm, [mask])
        for node in sub.graph.nodes:  # evaluate on the CPU even when the model lives on meta / CUDA
            if isinstance(node.kwargs.get("device"), torch.device):
                node.kwargs = {**node.kwargs, "device": torch.device("cpu")}
        sub.recompile()
        if any(n.op == "get_attr" and getattr(self.gm, str(n.target), torch.empty(0, device="meta")).is_meta
               for n in sub.graph.nodes if n.op == "get_attr"):
            return MaskKind("unknown", reason="mask reads a module buffer on the meta device")
        rows, cols = val.shape[-2], val.shape[-1]
        syms_rows, syms_cols = free_symbols(rows), free_symbols(cols)
        if not syms_rows | syms_cols:
            return MaskKind("unknown", reason="mask has a static shape (a baked constant): cannot tell its kind at other lengths")
        square = str(rows) == str(cols)
        verdicts = []
        for env in _probe_values(syms_rows, syms_cols, square):
            try:
                vis = self._evaluate(sub, placeholders, env, mode)
            except Exception as exc:  # noqa: BLE001 - any failure means we cannot classify
                return MaskKind("unknown", reason=f"mask sub-graph failed to evaluate: {type(exc).__name__}: {exc}")
            if vis.dim() != 2 or vis.shape[0] > vis.shape[1]:
                return MaskKind("unknown", reason=f"mask of shape {tuple(vis.shape)} is not [queries, keys]")
            verdicts.append(vis)
        return _decide(verdicts)

    def _evaluate(self, sub, placeholders, env, mode):
        args = []
        for ph in placeholders:  # zero-stride zeros: shapes of any size at no memory cost
            v = meta_val(ph)
            args.append(torch.zeros((), dtype=v.dtype).expand(concrete_shape(v, env)))
        with torch.no_grad():
            (value,) = sub(*args)
        return _visibility(value, mode)


def values_read(node: fx.Node) -> list[str]:
    """Names of the graph inputs whose values (not only sizes) ``node`` is computed from: the walk
    up from ``node`` does not enter the first argument of a :data:`SHAPE_ONLY` op."""
    seen, found, stack = set(), [], [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.append(n.name)
            continue
        inputs = n.all_input_nodes
        if is_call(n, *SHAPE_ONLY) and n.args and isinstance(n.args[0], fx.Node):
            inputs = [i for i in inputs if i is not n.args[0]]
        stack.extend(inputs)
    return sorted(found)


def _decide(probes: list[torch.Tensor]) -> MaskKind:
    if all(bool(v.all()) for v in probes):
        return MaskKind("full", reason=f"all keys visible at {len(probes)} probe lengths")
    causal_ok, windows, chunks = True, set(), set()
    for vis in probes:
        t, s = vis.shape
        q, k, causal = _patterns(t, s)
        if not torch.equal(vis, causal):
            causal_ok = False
            windows.add(int(vis[-1].sum()))
            chunks.add(int(vis.sum(-1).max()))
    if causal_ok:
        return MaskKind("causal", reason=f"causal at {len(probes)} probe lengths up to {max(v.shape[1] for v in probes)} keys")
    for w in sorted(windows):
        if w >= 1 and all(_sliding(v, w) for v in probes):
            return MaskKind("sliding", window=w, reason=f"sliding window of {w} keys at {len(probes)} probe lengths")
    for c in sorted(chunks):
        if c >= 1 and all(_chunked(v, c) for v in probes):
            return MaskKind("chunked", chunk=c, reason=f"chunked attention with chunks of {c}")
    return MaskKind("unknown", reason="visibility is neither full, causal, one sliding window nor chunked "
                                      "at every probe length")


def _sliding(vis: torch.Tensor, w: int) -> bool:
    q, k, causal = _patterns(*vis.shape)
    return torch.equal(vis, causal & (q - k < w))


def _chunked(vis: torch.Tensor, c: int) -> bool:
    q, k, causal = _patterns(*vis.shape)
    return torch.equal(vis, causal & (q // c == k // c))
