"""The stock-export comparison in ``report.json`` (``report.stock_comparison``): the cache tensors a
stock ``torch.onnx.export`` of the eager sample would carry vs the artifact's CachePlan.

Gemma 4 E2B (tiny): the eager sample caches K and V of its 5 owner layers (the 5 KV-sharing
layers read layers 3 and 4, so they have no cache of their own), every one at full length, 4 of
them sliding (W = 8); the CachePlan keeps those 4 as 8-slot rings. Exact bytes from the config.
DeepSeek V4 (tiny): compressed entries grow every ``r`` tokens in the stock caches too. The stock
tensor list is the captured step's cache inputs (the torch.export program that torch.onnx.export
lowers)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from effexport.exporter.verify.report import format_stock, stock_caches, stock_comparison

pytestmark = pytest.mark.slow  # uses the session's captures
N = 131072  # gemma4-e2b:tiny's context limit, the report's context
F32 = 4


def test_gemma_stock_vs_plan(rewritten):
    shared = rewritten("gemma4-e2b:tiny")
    c = shared.sample.config
    comparison = stock_comparison(shared.sample, shared.analysis.plan, N)
    stock, ours = comparison["stock"], comparison["effexport"]
    assert [t["name"] for t in stock["tensors"]] == shared.captured.inputs[1:]
    owners = c.num_hidden_layers - c.num_kv_shared_layers
    assert [t["name"] for t in stock["tensors"]] == [f"past.{i}.{kv}" for i in range(owners) for kv in "kv"]
    kv = c.num_key_value_heads
    for t in stock["tensors"]:
        layer = int(t["name"].split(".")[1])
        d = c.global_head_dim if c.layer_types[layer] == "full_attention" else c.head_dim
        assert t["shape"] == [1, kv, N, d] and t["dtype"] == "float32"
    sliding = c.layer_types[:owners].count("sliding_attention")
    full = owners - sliding
    assert stock["bytes"] == 2 * N * kv * F32 * (sliding * c.head_dim + full * c.global_head_dim)
    assert ours["bytes"] == 2 * kv * F32 * (sliding * c.sliding_window * c.head_dim + full * N * c.global_head_dim)
    assert ours["bytes"] == shared.analysis.plan.nbytes(1, N)
    assert sorted(t["kind"] for t in ours["tensors"]) == ["full"] * 2 * full + ["ring"] * 2 * sliding
    assert comparison["ratio"] == pytest.approx(stock["bytes"] / ours["bytes"]) and comparison["ratio"] > 2.9
    assert format_stock(comparison).startswith(f"cache at {N:,} tokens: stock torch.onnx.export 10 tensors")


def test_deepseek_compressed_entries_grow_per_ratio(rewritten):
    """The stock caches are the captured step's inputs; raw K/V grow per token, each compressed
    buffer by one entry per r tokens (r from the CachePlan's compressed entries)."""
    shared = rewritten("deepseek-v4-flash:tiny")
    small, large = (stock_caches(shared.sample, n) for n in (256, 512))
    assert [t["name"] for t in small] == shared.captured.inputs[1:]
    ratios = {e.ratio for e in shared.analysis.plan.entries if e.kind == "compressed"}
    assert ratios and min(ratios) > 1
    growth = {t["name"]: b["shape"][1] - t["shape"][1] for t, b in zip(small, large)}
    assert {256 // r for r in ratios} | {256} <= set(growth.values())
    assert max(growth.values()) == 256  # the raw window K/V: the stock export keeps every token


def test_deepseek_effexport_entries_counted_at_the_context(rewritten):
    """effexport's compressed buffers are counted at ``context // r`` slots (what an artifact built for
    that context holds), not at the built ``max_context // r``: at a context 16x the build's, each
    entry buffer is 16x its built size, rings and states keep theirs."""
    shared = rewritten("deepseek-v4-flash:tiny")
    plan = shared.analysis.plan
    built = {e.name: e.concrete_shape(1, 0) for e in plan.entries}
    context = 16 * next(e.ratio * e.concrete_shape(1, 0)[1] for e in plan.entries if e.kind == "compressed")
    ours = {t["name"][len("past."):]: t for t in stock_comparison(shared.sample, plan, context)["effexport"]["tensors"]}
    for e in plan.entries:
        want = list(built[e.name])
        if e.kind == "compressed":
            want[1] = context // e.ratio
        assert ours[e.name]["shape"] == want, e.name
        assert ours[e.name]["bytes"] == math.prod(want) * F32
    assert any(e.kind == "compressed" for e in plan.entries) and any(e.kind == "ring" for e in plan.entries)


def test_unavailable_when_the_meta_forward_fails():
    """A model whose eager forward cannot run on the meta device: the comparison says why (and the
    build prints it) instead of failing the build or inventing numbers."""
    class NoMeta(torch.nn.Module):
        def forward(self, ids, past=None):
            raise NotImplementedError("data-dependent routing on meta")

    sample = SimpleNamespace(build=lambda device: NoMeta())
    out = stock_comparison(sample, plan=None, context=64)
    assert out == {"context": 64, "batch": 1, "unavailable": "NotImplementedError: data-dependent routing on meta"}
    assert format_stock(out) == "no stock-export comparison: NotImplementedError: data-dependent routing on meta"
