"""The pass pipeline: one explicit, ordered tuple; each pass returns what it changed.

    complex         complex arithmetic (Llama 4's RoPE) -> real arithmetic on (real, imag) pairs
    dead_code       remove what the captured graph computes for nothing (e.g. K/V projections of
                    KV-sharing consumers that a model still computes), counted
    cca             compressed convolutional attention (ZAYA1) -> effexport::cca (q/k/v + conv/shift state)
    mhc             hyper-connection mixing with unrolled Sinkhorn (DeepSeek V4) -> effexport::mhc_pre/post/head
    discover        find attention sites (SDPA and decomposed), record q/k/v, scale, softcap, sinks
    classify_masks  evaluate each mask sub-graph at probe lengths: causal / sliding(W) / chunked(C) /
                    full / ...
    kv_sharing      group sites reading the same K/V: owner + consumers
    rewrite         replace sites by effexport attention ops (ring / chunk / full cache / read-only)
    compressed      CSA / HCA / window-only attention (DeepSeek V4) -> kv_compress_step, indexer_topk,
                    sparse_attention; raw K=V cache -> ring, compressed entries -> fixed buffers
    positions       positions from the new ``pos`` input instead of a cache length
    buffers         (``cache_layout="buffer"`` only) full caches -> fixed max_context buffers written
                    in place: attention_cache -> attention_buffer
    constants       conversions of constant data (a host fp64 RoPE table ``.to(device, float32)``, a
                    norm weight ``.float()``) computed once into buffers instead of at every step:
                    no host-to-device copy is left in the step (what a CUDA graph needs)
    cache_plan      the CachePlan of the rewritten step graph

``run_pipeline(program)`` rewrites a captured :class:`StepProgram` in place of a copy and returns it
with an :class:`Analysis` (per-pass counts, sites, rejections, the plan, ``explain()`` text).
Every pass keeps ``node.meta["val"]`` valid and the graph linted.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from effexport.passes._graph import count_linear, finish, meta_val
from effexport.passes.attention import AttentionRewriter
from effexport.passes.buffers import CACHE_LAYOUTS, buffer_full_caches
from effexport.passes.cache_plan import CacheEntry, CachePlan, LayerRole
from effexport.passes.cca import rewrite_cca
from effexport.passes.complex import rewrite_complex
from effexport.passes.constants import fold_constant_conversions
from effexport.passes.compressed import rewrite_compressed
from effexport.passes.errors import RewriteError
from effexport.passes.mhc import rewrite_mhc
from effexport.passes.masks import MaskClassifier
from effexport.passes.positions import rewrite_positions
from effexport.passes.program import StepProgram
from effexport.passes.sharing import group_sites
from effexport.passes.sites import AttentionSite, Rejected, find_sites, layer_index

REWRITABLE = ("causal", "sliding", "chunked", "full")


@dataclass
class Analysis:
    """What the pipeline found and did."""

    sites: list[AttentionSite] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    groups: list[list[AttentionSite]] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    plan: CachePlan = field(default_factory=CachePlan)
    left_alone: list[str] = field(default_factory=list)
    stateful: dict[int, list[str]] = field(default_factory=dict)  # layer -> its fixed-size state caches

    def explain(self) -> str:
        """Per attention site: what it was classified as and why; per stateful layer: its states;
        per site left alone: why."""
        lines = [f"{len(self.sites)} attention sites"]
        for s in self.sites:
            lines.append("  " + s.describe() + f" -> {s.cache or 'left alone'}")
            lines.append(f"      mask: {s.reason}")
        for layer, names in sorted(self.stateful.items()):
            shapes = {e.name: e.shape for e in self.plan.entries}
            states = ", ".join(f"{n} {list(shapes.get(n, ()))}" for n in names)
            lines.append(f"  stateful layer {layer}: linear attention / state-space, fixed-size states {states}: "
                         "kept as written (plain graph), nothing grows with the context")
        for r in self.rejected:
            lines.append(f"  not attention: {r.node}: {r.reason}")
        for why in self.left_alone:
            lines.append(f"  left alone: {why}")
        for name, counts in self.counts.items():
            lines.append(f"  pass {name}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        return "\n".join(lines)


@dataclass
class Context:
    program: StepProgram
    analysis: Analysis
    classifier: MaskClassifier | None = None
    rewriter: AttentionRewriter | None = None
    pos: fx.Node | None = None
    max_context: int = 4096  # capacity of fixed compressed-entry buffers (max_context // ratio slots)
    compressed: dict = field(default_factory=dict)  # placeholder -> ratio of compressed-entry buffers
    compressed_rings: dict = field(default_factory=dict)
    cache_layout: str = "grow"  # "buffer": full caches as fixed max_context buffers (passes/buffers.py)
    buffers: set = field(default_factory=set)  # past placeholders of fixed-capacity full caches (max_context rows)


def _dead_code(ctx: Context) -> dict:
    gm = ctx.program.gm
    linear_before = count_linear(gm)
    return {"nodes": finish(gm), "projections": linear_before - count_linear(gm)}


def _discover(ctx: Context) -> dict:
    ctx.analysis.sites, ctx.analysis.rejected = find_sites(ctx.program.gm)
    sites = ctx.analysis.sites
    return {"sites": len(sites), "sdpa": sum(s.form == "sdpa" for s in sites),
            "decomposed": sum(s.form == "decomposed" for s in sites),
            "softcap": sum(bool(s.softcap) for s in sites), "sinks": sum(s.sinks is not None for s in sites),
            "rejected": len(ctx.analysis.rejected)}


def _classify(ctx: Context) -> dict:
    ctx.classifier = MaskClassifier(ctx.program.gm)
    counts: dict[str, int] = {k: 0 for k in ("causal", "sliding", "full", "chunked", "unknown")}
    for s in ctx.analysis.sites:
        kind = ctx.classifier.classify(s.mask, s.mask_mode, s.causal_flag, s.q, s.k)
        s.mask_kind, s.window, s.reason = kind.kind, kind.window or kind.chunk, kind.reason
        counts[kind.kind] += 1
    return counts


def _sharing(ctx: Context) -> dict:
    groups = ctx.analysis.groups = group_sites(ctx.analysis.sites)
    return {"groups": len(groups), "consumers": sum(len(g) - 1 for g in groups),
            "owners": sum(len(g) > 1 for g in groups)}


def _rewrite(ctx: Context) -> dict:
    gm = ctx.program.gm
    graph = gm.graph
    first_cache = next((n for n in graph.nodes if n.op == "placeholder" and n.name != "input_ids"), None)
    anchor = first_cache or next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(anchor) if first_cache else graph.inserting_after(
            [n for n in graph.nodes if n.op == "placeholder"][-1]):
        pos = graph.placeholder("pos")
    val = next(meta_val(n) for n in graph.nodes if isinstance(meta_val(n), torch.Tensor))
    with val.fake_mode:
        pos.meta["val"] = torch.empty((), dtype=torch.int64)
    ctx.pos = pos
    ctx.rewriter = AttentionRewriter(gm, pos)
    counts = {"ring": 0, "chunk": 0, "full": 0, "plain": 0, "read": 0, "left_alone": 0}
    for group in ctx.analysis.groups:
        bad = [s for s in group if s.mask_kind not in REWRITABLE]
        if bad:
            ctx.analysis.left_alone.append(
                f"group of site {group[0].index} ({len(group)} sites): site {bad[0].index} mask is "
                f"{bad[0].mask_kind}: {bad[0].reason}")
            counts["left_alone"] += len(group)
            continue
        kind = ctx.rewriter.rewrite_group(group[0], group[1:])
        if kind.startswith("left alone"):
            ctx.analysis.left_alone.append(f"group of site {group[0].index}: {kind[len('left alone: '):]}")
            counts["left_alone"] += len(group)
            continue
        counts[kind] += 1
        counts["read"] += len(group) - 1 if kind != "plain" else 0
    counts["dead_nodes"] = finish(gm)
    return counts


def _positions(ctx: Context) -> dict:
    gm, prog = ctx.program.gm, ctx.program
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and n is not ctx.pos]
    growing = {ph: prog.seq_dims.get(name) for ph, name in zip(placeholders, prog.inputs)
               if prog.seq_dims.get(name) is not None}
    n = rewrite_positions(gm, ctx.pos, growing, set(ctx.rewriter.rings))
    finish(gm)
    return {"arange": n}


def _buffers(ctx: Context) -> dict:
    if ctx.cache_layout == "grow":
        return {"buffered": 0, "kept": 0}
    ctx.buffers, kept = buffer_full_caches(ctx.program.gm, ctx.pos, ctx.max_context)
    finish(ctx.program.gm)
    return {"buffered": len(ctx.buffers) // 2, "kept": kept}


def _constants(ctx: Context) -> dict:
    counts = fold_constant_conversions(ctx.program.gm)
    counts["dead_nodes"] = finish(ctx.program.gm)
    return counts


def _cache_plan(ctx: Context) -> dict:
    prog, gm = ctx.program, ctx.program.gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = prog.inputs
    plan = CachePlan()
    for ph, name in zip([p for p in placeholders if p.name != "pos"], names):
        if name == "input_ids":
            continue
        val = meta_val(ph)
        key = name[len("past."):]
        layer = layer_index(key)
        seq_dim = prog.seq_dims.get(name)
        ratio = ctx.compressed.get(ph, 0)
        if ph in ctx.rewriter.rings:
            kind = "chunk" if ph in ctx.rewriter.chunked else "ring"
            window = ctx.rewriter.rings[ph]
        elif ratio:
            kind, window = "compressed", 0
        elif ph in ctx.buffers:
            kind, window = "buffer", 0
        elif seq_dim is not None:
            kind, window = "full", 0
        else:
            kind, window = "state", 0
        shape = []
        for i, d in enumerate(val.shape):
            if i == 0:
                shape.append("batch")
            elif kind == "full" and i == seq_dim:
                shape.append("seq")
            else:
                shape.append(int(d))
        plan.entries.append(CacheEntry(name=key, layer=layer, kind=kind, shape=tuple(shape),
                                       dtype=str(val.dtype).replace("torch.", ""), window=window, ratio=ratio,
                                       fill=prog.fills.get(name, 0.0) if kind == "state" else 0.0))
    for s in ctx.analysis.sites:
        layer = layer_index(s.layer)
        plan.layers.append(LayerRole(layer=layer if layer is not None else s.index, role=s.role,
                                     reads=s.reads if s.reads is not None else s.index,
                                     kind=s.cache or "none", window=s.window))
    ctx.analysis.plan = plan
    # the step's flat signature: input_ids, pos, caches...
    prog.inputs = ["input_ids", "pos"] + [n for n in names if n != "input_ids"]
    return {"entries": len(plan.entries), **{kind: sum(e.kind == kind for e in plan.entries)
                                             for kind in ("ring", "chunk", "full", "buffer", "compressed", "state")}}


PIPELINE: tuple[tuple[str, Callable[[Context], dict]], ...] = (
    ("complex", rewrite_complex),
    ("dead_code", _dead_code),
    ("cca", rewrite_cca),
    ("mhc", rewrite_mhc),
    ("discover", _discover),
    ("classify_masks", _classify),
    ("kv_sharing", _sharing),
    ("rewrite", _rewrite),
    ("compressed", rewrite_compressed),
    ("positions", _positions),
    ("buffers", _buffers),
    ("constants", _constants),
    ("cache_plan", _cache_plan),
)
PASS_NAMES = tuple(name for name, _ in PIPELINE)


def run_pipeline(program: StepProgram, dump_after: str | None = None,
                 dump: Callable[[str, fx.GraphModule], None] | None = None,
                 max_context: int = 4096, cache_layout: str = "grow") -> tuple[StepProgram, Analysis]:
    """Run every pass in order on a copy of ``program``; ``dump(name, gm)`` is called after the pass
    named ``dump_after``; ``max_context`` sizes fixed compressed-entry buffers and, with
    ``cache_layout="buffer"``, the full caches' buffers (:mod:`.buffers`)."""
    if cache_layout not in CACHE_LAYOUTS:
        raise RewriteError(f"unknown cache layout {cache_layout!r}; layouts are: {', '.join(CACHE_LAYOUTS)}")
    if dump_after is not None and dump_after not in PASS_NAMES:
        raise RewriteError(f"unknown pass {dump_after!r} for --dump-after; passes are: {', '.join(PASS_NAMES)}")
    gm = fx.GraphModule(program.gm, copy.deepcopy(program.gm.graph))
    prog = StepProgram(gm, list(program.inputs), list(program.outputs), dict(program.seq_dims),
                       program.capture_seconds, dict(program.fills), program.max_new_tokens)
    ctx = Context(prog, Analysis(), max_context=max_context, cache_layout=cache_layout)
    for name, fn in PIPELINE:
        ctx.analysis.counts[name] = fn(ctx)
        if name == dump_after and dump is not None:
            dump(name, prog.gm)
    return prog, ctx.analysis
