"""The compressed-attention pass (``passes/compressed.py``) on the DeepSeek V4 Flash tiny preset.

Covered: exact counts (compress_ratios (0, 0, 4, 16, 4, 16): 2 window-only, 2 CSA, 2 HCA layers,
nothing left alone), the decode cache I/O (every raw K=V cache a ring of ``window`` slots, entry
caches fixed buffers of ``max_context // r`` slots, no full-length cache left, no ring length read),
parity of the rewritten step graph against eager logits over a 5-token prefill and 35 one-token
decode steps (crossing 8 CSA and 2 HCA block boundaries), and two negative edits of the captured
graph: a pooling without the block softmax is not recognised, and a compressor whose RoPE is wrong
(cos -> sin) fails the numeric check; both layers are left alone with a reason.

The pass runs between the pipeline's own ``rewrite`` and ``positions`` passes (the proposed
``PIPELINE`` line). The model is captured once per module (~3 min on the shared 2-core machine).
"""
import copy

import pytest
import torch
from torch import fx

from _helpers import assert_close
from effexport.passes.program import StepProgram
from effexport.passes import pipeline
from effexport.passes._graph import aten, is_call
from effexport.passes.compressed import find_compressed, rewrite_compressed

MAX_CONTEXT = 64
OPS = torch.ops.effexport



@pytest.fixture(scope="module")
def captured(rewritten):
    """(model, example ids [2, 40], captured step program) of deepseek-v4-flash:tiny (shared capture)."""
    shared = rewritten("deepseek-v4-flash:tiny")
    return shared.model, shared.ids, shared.captured


def _run(program: StepProgram, edit=None):
    """The pipeline with the compressed pass after ``rewrite``, on a copy; ``edit(gm)`` first."""
    gm = fx.GraphModule(program.gm, copy.deepcopy(program.gm.graph))
    if edit is not None:
        edit(gm)
    prog = StepProgram(gm, list(program.inputs), list(program.outputs), dict(program.seq_dims))
    assert ("compressed", rewrite_compressed) in pipeline.PIPELINE
    return pipeline.run_pipeline(prog, max_context=MAX_CONTEXT)


@pytest.fixture(scope="module")
def ds_rewritten(captured):
    return _run(captured[2])


def test_counts(ds_rewritten):
    counts = ds_rewritten[1].counts["compressed"]
    assert {k: counts[k] for k in ("csa", "hca", "window_only", "left_alone")} == \
        {"csa": 2, "hca": 2, "window_only": 2, "left_alone": 0}, ds_rewritten[1].explain()
    gm = ds_rewritten[0].gm
    found = {op: sum(is_call(n, op) for n in gm.graph.nodes) for op in
             (OPS.kv_compress_step.default, OPS.indexer_topk.default, OPS.sparse_attention.default)}
    assert list(found.values()) == [6, 2, 6]  # 4 main compressors + 2 indexer compressors
    assert not any(is_call(n, aten.softmax.int) and n.args[1] == 2 for n in gm.graph.nodes)
    assert not any(is_call(n, aten.sort.stable) for n in gm.graph.nodes)


def test_cache_layout(captured, ds_rewritten):
    model, plan = captured[0], ds_rewritten[1].plan
    c = model.config
    for e in plan.entries:
        layer, name = e.name.split(".", 1)
        r = c.compress_ratios[int(layer)]
        if name == "kv":
            assert (e.kind, e.window, e.shape) == ("ring", c.window_size, ("batch", c.window_size, c.head_dim))
        elif name == "comp":
            assert (e.kind, e.ratio, e.shape) == ("compressed", r, ("batch", MAX_CONTEXT // r, c.head_dim))
        elif name == "index_k":
            assert (e.kind, e.ratio, e.shape) == ("compressed", 4, ("batch", MAX_CONTEXT // 4, c.index_head_dim))
        else:  # compressor states keep the sample's [B, coff*r, coff*c] layout
            assert e.kind == "state" and e.shape[0] == "batch"
    assert not [e for e in plan.entries if e.kind == "full"]
    assert ds_rewritten[0].inputs[:2] == ["input_ids", "pos"]
    assert not [w for w in ds_rewritten[1].left_alone if "ring cache length" in w]


def test_parity_prefill_and_decode(captured, ds_rewritten):
    """fp32 rel <= 1e-5 on every step's logits: prefill 5 tokens from zero caches, then 35 steps."""
    model, ids, _ = captured
    prog, analysis = ds_rewritten
    with torch.no_grad():
        want, _ = model(ids)
        caches = analysis.plan.empty_caches(2)
        outs = prog.gm(ids[:, :5], torch.tensor(0), *caches)
        assert_close(outs[0], want[:, :5], what="prefill logits")
        for t in range(5, ids.shape[1]):
            outs = prog.gm(ids[:, t:t + 1], torch.tensor(t), *outs[1:])
            assert_close(outs[0][:, 0], want[:, t], what=f"decode logits at position {t}")


def _nth(gm, pred, n):
    return [node for node in gm.graph.nodes if pred(node)][n]


def test_pooling_without_block_softmax_is_left_alone(captured):
    """A sigmoid gate instead of the block softmax (last HCA compressor): no compressor candidate,
    so that layer's attention is left alone; every other layer is still rewritten."""
    def edit(gm):
        sm = _nth(gm, lambda n: is_call(n, aten.softmax.int) and n.args[1] == 2, -1)
        sm.target, sm.args = aten.sigmoid.default, (sm.args[0],)
    prog, analysis = _run(captured[2], edit)
    counts = analysis.counts["compressed"]
    assert (counts["csa"], counts["hca"], counts["window_only"], counts["left_alone"]) == (2, 1, 2, 1)
    assert any("not a recognised compressor" in why for why in analysis.left_alone), analysis.explain()


def test_wrong_rope_fails_the_numeric_check(captured):
    """cos -> sin in the last HCA compressor's entry RoPE: the structure matches, the check rejects."""
    def edit(gm):
        sm = _nth(gm, lambda n: is_call(n, aten.softmax.int) and n.args[1] == 2, -1)
        order = list(gm.graph.nodes)
        cos = next(n for n in order[order.index(sm):] if is_call(n, aten.cos.default))
        cos.target = aten.sin.default
    layers, reasons, _ = find_compressed(_run_graph(captured[2], edit))
    assert sorted(a.kind for a in layers) == ["csa", "csa", "hca", "window_only", "window_only"]
    assert any("does not compute kv_compress_step" in why for why in reasons), reasons


def _run_graph(program, edit):
    gm = fx.GraphModule(program.gm, copy.deepcopy(program.gm.graph))
    edit(gm)
    return gm
