"""Real-size presets captured and rewritten on the meta device (no weights): the same counts logic
as the tiny presets, at the published configurations. Marked slow; the time of each is printed
(``pytest -s``), not asserted (BENCHMARKS-style numbers are in the capture issue's closing note).

The example token stream is ``samples._spec.capture_length`` long: past every window, compressed
block and top-k of the preset (2059 tokens for V4-Flash), because torch.export keeps only the branch
of each size comparison the example takes. DeepSeek V4 on meta: the numeric checks of the mHC and
compressed-attention passes run on random stand-ins for parameters that have no values
(``passes._graph.attr_value``) and on the CPU whatever device the graph recorded (``probe_call``);
``test_deepseek_on_meta_rewrites_like_on_cpu`` proves that path on the tiny preset (a model built on
meta gets exactly the CPU build's rewrite). The 43-layer V4-Flash test runs with EFFEXPORT_REALSIZE=1
(about 5 CPU-minutes), Laguna XS.2 and ZAYA1-8B too (~1.5 each); all passed in the full run of
2026-11-29 (V4-Flash capture 200-281 s + rewrite 56 s)."""
import os
import time

import pytest
import torch

from effexport.exporter.capture import capture_step
from effexport.passes.pipeline import run_pipeline
from effexport.samples import get_sample
from effexport.samples._spec import capture_length

pytestmark = pytest.mark.slow
XDIST_SPLIT = ("name",)  # one pytest-xdist unit per parameter value (tests/conftest.py)
REALSIZE = os.environ.get("EFFEXPORT_REALSIZE") == "1"
_LONG = pytest.mark.skipif(not REALSIZE, reason="real-size capture of ~1.5 CPU-minutes (CI's 30-minute budget): "
                                                "set EFFEXPORT_REALSIZE=1")
ATTENTION = [pytest.param(n, id=n, marks=() if n in ("gemma4-e2b", "gemma4-e4b") else _LONG)
             for n in ("gemma4-e2b", "gemma4-e4b", "laguna-xs2", "zaya1-8b")]


def _rewrite(name: str):
    sample = get_sample(name)
    model = sample.build("meta")
    ids = torch.zeros(2, capture_length(sample.config.layer_specs()), dtype=torch.long, device="meta")
    start = time.monotonic()
    program, analysis = run_pipeline(capture_step(model, ids), max_context=1 << 20)
    print(f"{name}: capture + rewrite on meta in {time.monotonic() - start:.0f}s")
    return sample, program, analysis


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_models_on_meta(name):
    sample, program, analysis = _rewrite(name)
    specs = sample.config.layer_specs()
    c = analysis.counts
    assert c["discover"]["sites"] == len(specs)
    assert c["classify_masks"]["sliding"] == sum(l.type == "sliding" for l in specs)
    assert {s.window for s in analysis.sites if s.mask_kind == "sliding"} == \
        {l.window for l in specs if l.type == "sliding"}
    assert c["kv_sharing"]["consumers"] == sum(l.role == "consumer" for l in specs)
    assert c["rewrite"]["ring"] == sum(l.type == "sliding" and l.role != "consumer" for l in specs)
    assert c["rewrite"]["full"] == sum(l.type != "sliding" and l.role != "consumer" for l in specs)
    assert c["rewrite"]["left_alone"] == 0
    assert c["cca"]["cca"] == sum(l.type == "cca" for l in specs)
    owned = {(l.index, t.name) for l in specs for t in l.cache}
    assert {(e.layer, e.name.split(".", 1)[1]) for e in analysis.plan.entries} == owned


def test_deepseek_on_meta_rewrites_like_on_cpu(rewritten):
    """deepseek-v4-flash:tiny built on meta: the same mHC / CSA / HCA / window-only counts and the same
    CachePlan as the CPU build (whose numerics the pass tests check), nothing left alone."""
    cpu = rewritten("deepseek-v4-flash:tiny")
    ids = torch.zeros(cpu.ids.shape, dtype=torch.long, device="meta")
    program, analysis = run_pipeline(capture_step(cpu.sample.build("meta"), ids))
    for name in ("mhc", "compressed", "cache_plan"):
        assert analysis.counts[name] == cpu.analysis.counts[name], name
    assert analysis.counts["compressed"]["left_alone"] == analysis.counts["mhc"]["left_alone"] == 0
    assert [(e.name, e.kind, e.dtype) for e in analysis.plan.entries] == \
        [(e.name, e.kind, e.dtype) for e in cpu.analysis.plan.entries]


@pytest.mark.skipif(not REALSIZE,
                    reason="V4-Flash capture + rewrite on meta takes ~5 CPU-minutes (CI's 30-minute budget): "
                           "set EFFEXPORT_REALSIZE=1")
def test_deepseek_v4_flash_on_meta():
    """All 43 layers of V4-Flash: every mHC mixing folded (2 per layer + the head), every CSA / HCA /
    window-only attention rewritten with nothing left alone, and the CachePlan the layer specs give:
    a W-slot ring of K=V per layer, compressed entries per compressor (CSA: entries + indexer keys),
    fixed window states."""
    sample, program, analysis = _rewrite("deepseek-v4-flash")
    specs = sample.config.layer_specs()
    c = analysis.counts
    assert (c["mhc"]["mhc_pre"], c["mhc"]["mhc_post"], c["mhc"]["mhc_head"]) == (2 * len(specs), 2 * len(specs), 1)
    kinds = [sample.config.layer_type(i) for i in range(len(specs))]
    assert (c["compressed"]["csa"], c["compressed"]["hca"], c["compressed"]["window_only"]) == (
        kinds.count("csa"), kinds.count("hca"), kinds.count("swa"))
    assert c["mhc"]["left_alone"] == c["compressed"]["left_alone"] == 0 and not analysis.left_alone
    plan = analysis.plan
    assert {e.window for e in plan.entries if e.kind == "ring"} == {sample.config.window_size}
    assert sum(e.kind == "ring" for e in plan.entries) == len(specs)
    assert sum(e.kind == "compressed" for e in plan.entries) == 2 * kinds.count("csa") + kinds.count("hca")
    assert {e.ratio for e in plan.entries if e.kind == "compressed"} == {
        r for r in sample.config.compress_ratios if r}
    assert not [e for e in plan.entries if e.kind == "full"]
