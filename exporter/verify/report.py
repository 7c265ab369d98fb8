"""``effexport report``: analytic KV-cache bytes, parameters and decode FLOPs of a model.

Everything here is computed from the sample's ``layer_specs()`` (samples/_spec.py) and its
``param_counts()`` on the meta device -- no weights are allocated, so any preset reports in seconds.

Two cache policies are reported side by side:
    full_length  every layer keeps every token (windowed layers included)
    ring         windowed layers keep only their last W tokens
each for the model and for its baseline (the same model with KV sharing, windows and compression
turned off; the sample says in words what its baseline is).

Decode FLOPs per token at context N (2 FLOPs per multiply-add):
    weights    2 x active parameters
    attention  per layer 2 x heads x (qk_dim + v_dim) x keys attended by one query at N
    indexer    per indexed layer 2 x index_heads x index_dim x (N / ratio) (ratio 1: raw tokens, V3.2 DSA)
``fp8_equivalent`` weights each term by its published precision (bf16 x2, fp8 x1, fp4 x0.5; the
convention of DeepSeek's comparisons); attention cores always count as bf16.
"""
from __future__ import annotations

import importlib.util
import math
import os

from dataclasses import dataclass

from effexport.exporter.errors import BackendMissingError, UsageError
from effexport.samples import Sample
from effexport.samples._spec import LayerSpec

CACHE_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CACHE_DTYPES = (*CACHE_DTYPE_BYTES, "published")
POLICIES = ("full_length", "ring")

# published precision (bits) of the weights and of indexer work, per architecture family
_PUBLISHED_BITS = {
    "deepseek-v4": {"weights": 8, "indexer": 4},
    "deepseek-v3.2": {"weights": 8, "indexer": 8},
}
_DEFAULT_BITS = {"weights": 16, "indexer": 16}


def published_bits(model_name: str) -> dict[str, int]:
    """Published precision of weights and indexer work for a preset name (bf16 if not listed)."""
    base = model_name.split(":")[0]
    for prefix, bits in _PUBLISHED_BITS.items():
        if base.startswith(prefix):
            return bits
    return _DEFAULT_BITS


def tensor_bytes_per_entry(tensor, cache_dtype: str) -> float:
    """Bytes of one entry of a cache tensor in the chosen storage format."""
    if tensor.fp32:
        return 4.0 * tensor.elements
    if cache_dtype == "published":
        return tensor.published_bytes if tensor.published_bytes is not None else 2.0 * tensor.elements
    return float(CACHE_DTYPE_BYTES[cache_dtype] * tensor.elements)


def layer_bytes(layer: LayerSpec, context: int, cache_dtype: str, policy: str) -> float:
    """Cache bytes one layer keeps at ``context`` tokens, per batch element."""
    return sum(t.num_entries(context, policy) * tensor_bytes_per_entry(t, cache_dtype) for t in layer.cache)


def total_bytes(layers: list[LayerSpec], context: int, cache_dtype: str, policy: str) -> int:
    """Cache bytes of all layers (rounded to whole bytes; published formats can be fractional)."""
    return round(sum(layer_bytes(l, context, cache_dtype, policy) for l in layers))


def layer_cache_kind(layer: LayerSpec) -> str:
    """The kind that grows with context ("full" > "compressed" > "ring" > "state"), or "none"."""
    kinds = {t.kind for t in layer.cache}
    for kind in ("full", "compressed", "ring", "state"):
        if kind in kinds:
            return kind
    return "none"


@dataclass(frozen=True)
class Flops:
    """Decode FLOPs per token, split by term (raw counts)."""

    weights: float
    attention: float
    indexer: float

    @property
    def raw(self) -> float:
        return self.weights + self.attention + self.indexer

    def fp8_equivalent(self, bits: dict[str, int]) -> float:
        """Each term weighted by bits/8 (bf16 x2, fp8 x1, fp4 x0.5); attention counts as bf16."""
        return self.weights * bits["weights"] / 8 + self.attention * 2 + self.indexer * bits["indexer"] / 8


def decode_flops(layers: list[LayerSpec], active_params: int, context: int) -> Flops:
    """FLOPs for one generated token at position ``context`` (see the module docstring)."""
    attention = sum(2 * l.heads * (l.qk_dim + l.v_dim) * l.attended_keys(context) for l in layers)
    indexer = sum(2 * l.indexer[0] * l.indexer[1] * (context // max(l.ratio, 1)) for l in layers if l.indexer)
    return Flops(weights=2.0 * active_params, attention=float(attention), indexer=float(indexer))


def param_counts(sample: Sample) -> dict[str, int]:
    """Total / effective / active parameters, from the model built on the meta device (or from the
    config for report-only presets that have no model)."""
    if hasattr(sample.config, "param_counts"):
        counts = sample.config.param_counts()
    else:
        counts = sample.build("meta").param_counts()
    return {k: int(counts[k]) for k in ("total", "effective", "active")}


def max_context(sample: Sample) -> int | None:
    """The model's context limit, if its config states one."""
    for field in ("max_position_embeddings", "max_seq_len", "max_context"):
        value = getattr(sample.config, field, None)
        if value:
            return int(value)
    return None


def build_report(sample: Sample, context: int, cache_dtype: str = "bf16") -> dict:
    """The machine-readable report (`effexport report --json`); ``warnings`` lists what the numbers assume."""
    if cache_dtype not in CACHE_DTYPES:
        raise UsageError(f"unknown --cache-dtype {cache_dtype!r}; choose one of {', '.join(CACHE_DTYPES)}")
    if context < 1:
        raise UsageError(f"--context must be a positive number of tokens, got {context}")
    limit = max_context(sample)
    warnings = [f"--context {context:,} is beyond {sample.name}'s trained limit of {limit:,} tokens: the bytes "
                "and FLOPs are the arithmetic at that length"] if limit is not None and context > limit else []
    warnings += [f"layer type {t!r} is not known to the report: counted as full attention"
                 for t in getattr(sample.config, "unknown", ())]
    model_layers = sample.config.layer_specs()
    base_layers = sample.config.layer_specs(baseline=True)
    params = param_counts(sample)
    flops = decode_flops(model_layers, params["active"], context)
    return {
        "model": sample.name,
        "context": context,
        "warnings": warnings,
        "cache_dtype": cache_dtype,
        "kv_bytes": {policy: {"model": total_bytes(model_layers, context, cache_dtype, policy),
                              "baseline": total_bytes(base_layers, context, cache_dtype, policy)}
                     for policy in POLICIES},
        "baseline": sample.module.BASELINE_DESCRIPTION,
        "params": params,
        "flops_per_token": {"raw": round(flops.raw),
                            "fp8_equivalent": round(flops.fp8_equivalent(published_bits(sample.name))),
                            "weights": round(flops.weights), "attention": round(flops.attention),
                            "indexer": round(flops.indexer)},
        "layers": [{"index": l.index, "type": l.type, "role": l.role, "reads": l.reads,
                    "cache": layer_cache_kind(l),
                    "tensors": [t.name for t in l.cache],
                    "bytes": round(layer_bytes(l, context, cache_dtype, "ring")),
                    "bytes_full_length": round(layer_bytes(l, context, cache_dtype, "full_length"))}
                   for l in model_layers],
    }


# ------------------------------------------------------------------------------------ formatting
def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: float) -> str:
    """1.23e9 -> '1.23 B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def format_report(report: dict) -> str:
    """The human table: one row per layer, then totals under both policies."""
    lines = [f"{report['model']} at {report['context']:,} tokens, cache dtype {report['cache_dtype']}, per sequence",
             "",
             f"{'layer':>5}  {'type':<8} {'role':<11} {'reads':>5}  {'cache':<10} {'tensors':<28} {'bytes (ring)':>14} {'bytes (full)':>14}"]
    for l in report["layers"]:
        lines.append(f"{l['index']:>5}  {l['type']:<8} {l['role']:<11} {l['reads']:>5}  {l['cache']:<10} "
                     f"{','.join(l['tensors']) or '-':<28} {human_bytes(l['bytes']):>14} "
                     f"{human_bytes(l['bytes_full_length']):>14}")
    lines.append("")
    for policy, title in (("ring", "windowed layers keep W tokens"), ("full_length", "every layer keeps every token")):
        kv = report["kv_bytes"][policy]
        ratio = kv["model"] / kv["baseline"] if kv["baseline"] else float("nan")
        lines.append(f"KV cache, {policy} ({title}): {human_bytes(kv['model'])} vs baseline "
                     f"{human_bytes(kv['baseline'])} ({ratio:.1%})")
    lines.append(f"baseline: {report['baseline']}")
    p = report["params"]
    lines.append(f"parameters: total {human_count(p['total'])}, effective {human_count(p['effective'])}, "
                 f"active {human_count(p['active'])}")
    f = report["flops_per_token"]
    lines.append(f"decode FLOPs/token: raw {human_count(f['raw'])}FLOP (weights {human_count(f['weights'])}, "
                 f"attention {human_count(f['attention'])}, indexer {human_count(f['indexer'])}), "
                 f"fp8-equivalent {human_count(f['fp8_equivalent'])}FLOP")
    return "\n".join(lines)


PLOT_FORMATS = ("png", "svg", "pdf")


def plot_format(path: str) -> str:
    """The image format of a ``--plot`` path (its suffix; PNG when it has none); refuses (exit 2) an
    existing directory, a missing parent directory and an unknown suffix, and (exit 4) a missing
    matplotlib, before any work."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise UsageError(f"--plot {path!r} is a directory; pass a file name, e.g. --plot kv.png")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"--plot {path!r}: the directory {parent!r} does not exist; create it or pass another path")
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix and suffix not in PLOT_FORMATS:
        raise UsageError(f"--plot {path!r}: cannot draw a .{suffix} file; pass a name ending in "
                         f"{', '.join('.' + f for f in PLOT_FORMATS)} (no suffix: PNG)")
    if importlib.util.find_spec("matplotlib") is None:
        raise BackendMissingError("--plot needs matplotlib: pip install 'effexport[plot]'")
    return suffix or "png"


def plot_report(sample: Sample, cache_dtype: str, max_tokens: int, path: str, fmt: str = "png") -> None:
    """KV bytes vs context (log x) for model and baseline under both policies, written to ``path`` as
    ``fmt`` (:data:`PLOT_FORMATS`; the format never comes from ``path``, which may be a temporary name)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_layers, base_layers = sample.config.layer_specs(), sample.config.layer_specs(baseline=True)
    xs, n = [], 256
    while n < max_tokens:
        xs.append(n)
        n *= 2
    xs.append(max_tokens)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layers, label, style in ((model_layers, "model", "-"), (base_layers, "baseline", "--")):
        for policy in POLICIES:
            ys = [total_bytes(layers, x, cache_dtype, policy) / 2**30 for x in xs]
            ax.plot(xs, ys, style, label=f"{label}, {policy}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"KV cache per sequence (GiB, {cache_dtype})")
    ax.set_title(f"{sample.name}: KV cache vs context")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format=fmt, dpi=110, metadata={"Software": None} if fmt == "png" else None)
    plt.close(fig)


# --------------------------------------------------------------- stock torch.onnx.export comparison
STOCK_KEY = "stock_export"
"""``report.json`` key of :func:`stock_comparison` (built artifacts only)."""


def stock_caches(sample: Sample, context: int, batch: int = 1) -> list[dict]:
    """The cache tensors a stock ``torch.onnx.export(model, (input_ids,), kwargs={"past": past},
    dynamo=True)`` of the eager sample carries as graph inputs (no rewrite): the flattened ``past``
    of its ``forward(input_ids, past)``, named like the captured step's inputs (``past.{key}``), at
    ``context`` cached tokens (checked once against a real stock export of gemma4-e2b:tiny: the
    same 10 inputs, ``past_0_k`` ..., with these shapes). The shapes come from running that forward at ``context`` tokens on
    the meta device (shapes only, no memory): every cache of the sample's own layout, each
    growing at its own rate (full K/V per token, compressed entries per ``r`` tokens)."""
    import torch
    from torch.utils import _pytree as pytree

    from effexport.exporter.capture import path_key

    model = sample.build("meta")
    with torch.no_grad():
        _, past = model(torch.zeros(batch, context, dtype=torch.long, device="meta"))
    out = []
    for path, t in pytree.tree_flatten_with_path(past)[0]:
        out.append({"name": f"past.{path_key(path)}", "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                    "bytes": t.numel() * t.element_size()})
    return out


def stock_comparison(sample: Sample, plan, context: int, batch: int = 1) -> dict:
    """Cache inputs of the stock export of the eager sample vs the artifact's CachePlan at
    ``context`` tokens and ``batch`` sequences, both in the captured dtype: tensor lists, totals
    and ``ratio`` (stock / effexport). effexport's full caches grow with ``context``, rings and states
    do not, and a compressed-entry buffer is counted at ``context // r`` slots and a full cache's
    fixed buffer (``--kv-cache buffer``) at ``context`` rows (what an artifact built with
    ``--max-context`` = ``context`` holds; the built one holds ``max_context // r`` / ``max_context``). If the
    eager forward cannot run on the meta device, the dict says why under ``unavailable``."""
    try:
        stock = stock_caches(sample, context, batch)
    except Exception as exc:  # the meta forward of a model outside the samples' contract
        return {"context": context, "batch": batch, "unavailable": f"{type(exc).__name__}: {exc}"[:300]}
    import torch

    ours = []
    for e in plan.entries:
        shape = e.concrete_shape(batch, context)
        if e.kind == "compressed":  # the entry buffer of an artifact built for this context: context // r slots
            shape[1] = context // e.ratio
        elif e.kind == "buffer":  # a full cache's fixed buffer, as built for this context: context rows
            shape[2] = context
        itemsize = torch.empty((), dtype=getattr(torch, e.dtype)).element_size()
        ours.append({"name": f"past.{e.name}", "kind": e.kind, "shape": shape, "dtype": e.dtype,
                     "bytes": math.prod(shape) * itemsize})
    stock_bytes, our_bytes = sum(t["bytes"] for t in stock), sum(t["bytes"] for t in ours)
    return {"context": context, "batch": batch,
            "stock": {"what": "torch.onnx.export(dynamo=True) of the eager forward(input_ids, past=...), no rewrite",
                      "tensors": stock, "bytes": stock_bytes},
            "effexport": {"tensors": ours, "bytes": our_bytes},
            "ratio": stock_bytes / our_bytes if our_bytes else None}


def format_stock(comparison: dict) -> str:
    """One line: what the stock export would carry vs the artifact."""
    if "unavailable" in comparison:
        return f"no stock-export comparison: {comparison['unavailable']}"
    stock, ours = comparison["stock"], comparison["effexport"]
    ratio = f"{comparison['ratio']:.1f}x" if comparison["ratio"] else "n/a"
    return (f"cache at {comparison['context']:,} tokens: stock torch.onnx.export {len(stock['tensors'])} tensors "
            f"{human_bytes(stock['bytes'])}, effexport {len(ours['tensors'])} tensors "
            f"{human_bytes(ours['bytes'])} ({ratio} less)")


REALISED_KEY = "realised"
"""``report.json`` key of :func:`realised_savings` (built artifacts of models that are not samples)."""


def realised_savings(analysis, context: int, batch: int = 1) -> dict:
    """Which savings a build realised, from the pipeline's ``analysis``: layers served from a ring of
    their window, KV-sharing consumers (no cache, they read their producer's), stateful layers
    (fixed-size states), compressed-entry buffers, and what was left alone and why; with the cache
    bytes at ``context`` tokens against the same caches with every ring kept full-length."""
    plan = analysis.plan
    ours = plan.nbytes(batch, context)
    full_length = sum(e.nbytes(batch, context) * (context / e.window if e.kind == "ring" else 1)
                      for e in plan.entries)
    return {
        "context": context, "batch": batch,
        "ring": [{"layer": r.layer, "window": r.window} for r in plan.layers if r.kind == "ring" and r.role != "consumer"],
        "consumers": [{"layer": r.layer, "reads": r.reads} for r in plan.layers if r.role == "consumer"],
        "stateful": sorted(analysis.stateful),
        "compressed": [{"name": e.name, "ratio": e.ratio} for e in plan.entries if e.kind == "compressed"],
        "left_alone": list(analysis.left_alone),
        "cache_bytes": ours, "cache_bytes_rings_full_length": round(full_length),
    }


def format_realised(realised: dict) -> str:
    """One line: the savings a build realised."""
    parts = [f"{len(realised['ring'])} ring layers", f"{len(realised['consumers'])} KV-sharing consumers",
             f"{len(realised['stateful'])} stateful layers", f"{len(realised['compressed'])} compressed buffers",
             f"{len(realised['left_alone'])} left alone"]
    return (f"realised: {', '.join(parts)}; cache at {realised['context']:,} tokens "
            f"{human_bytes(realised['cache_bytes'])} (rings full-length: "
            f"{human_bytes(realised['cache_bytes_rings_full_length'])})")
