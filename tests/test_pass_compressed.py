"""The compressed-attention pass (``passes/compressed.py``) on the DeepSeek V4 Flash tiny preset, and
on look-alike models it must refuse.

Covered: exact counts (compress_ratios (0, 0, 4, 16, 4, 16): 2 window-only, 2 CSA, 2 HCA layers,
nothing left alone), the decode cache I/O (every raw K=V cache a ring of ``window`` slots, entry
caches fixed buffers of ``max_context // r`` slots, no full-length cache left, no ring length read),
parity of the rewritten step graph against eager logits over a 5-token prefill and 35 one-token
decode steps (crossing 8 CSA and 2 HCA block boundaries), and two negative edits of the captured
graph: a pooling without the block softmax is not recognised, and a compressor whose RoPE is wrong
(cos -> sin) fails the numeric check; both layers are left alone with a reason. Look-alike models
(``models.compressor_lookalike``): HCA compressors gated from the wrong block boundary or mean-pooled
without the gate, and CSA compressors pairing the wrong block halves, are all left alone with their
reasons; both keep parity across block boundaries left alone (the CSA one captured with the build's
example step of 2 blocks, ``samples._spec.capture_new_tokens``: with 1 block per example step export
specialised the block count and the left-alone graph was wrong at other lengths).

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


def _assert_prefill_and_decode(model, ids, gm, plan):
    """fp32 rel <= 1e-5 on every step's logits: prefill 5 tokens from zero caches, then one-token
    steps to the end of ``ids``; returns the last step's outputs."""
    with torch.no_grad():
        want, _ = model(ids)
        outs = gm(ids[:, :5], torch.tensor(0), *plan.empty_caches(2))
        assert_close(outs[0], want[:, :5], what="prefill logits")
        for t in range(5, ids.shape[1]):
            outs = gm(ids[:, t:t + 1], torch.tensor(t), *outs[1:])
            assert_close(outs[0][:, 0], want[:, t], what=f"decode logits at position {t}")
    return want


def test_parity_prefill_and_decode(captured, ds_rewritten):
    """fp32 rel <= 1e-5 on every step's logits: prefill 5 tokens from zero caches, then 35 steps."""
    model, ids, _ = captured
    prog, analysis = ds_rewritten
    _assert_prefill_and_decode(model, ids, prog.gm, analysis.plan)


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


# ------------------------------------------------------------------ a compressor look-alike model
LOOKALIKE_CHUNKS = (20, 3) + (1,) * 17  # 40 tokens: the prefill crosses the block boundary at 16, decode the one at 32


@pytest.fixture(scope="module")
def lookalike():
    """``(model, ids, program, analysis)``: the DeepSeek V4 sample with 2 HCA layers (ratio 16) whose
    compressors pool in blocks the wrong way (``models.compressor_lookalike``: layer 0 gates with the
    position embedding of the wrong block boundary, layer 1 mean-pools without the gate); captured
    once (~25 s)."""
    from effexport.exporter.capture import capture_step
    from models import compressor_lookalike

    model = compressor_lookalike.build(("shifted", "mean"))
    ids = torch.randint(0, model.config.vocab_size, (2, sum(LOOKALIKE_CHUNKS)), generator=torch.Generator().manual_seed(1))
    program, analysis = pipeline.run_pipeline(capture_step(model, ids), max_context=MAX_CONTEXT)
    return model, ids, program, analysis


def test_lookalike_compressors_left_alone_with_reasons(lookalike):
    """Both layers left alone, each with its reason: layer 0's compressor has the structure but fails
    the numeric check, layer 1's has no block softmax; neither attention reads a recognised
    compressor's entries. No compressed op, no ring: the sample's growing caches stay. The premise:
    the look-alike pooling changes the logits (same weights, the sample's compressors)."""
    from models import compressor_lookalike

    model, ids, program, analysis = lookalike
    real = compressor_lookalike.build((None, None))
    real.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model(ids)[0], real(ids)[0]), "premise: the look-alike pools like DeepSeek"
    counts = analysis.counts["compressed"]
    assert {k: counts[k] for k in ("csa", "hca", "window_only", "left_alone")} == \
        {"csa": 0, "hca": 0, "window_only": 0, "left_alone": 3}, analysis.explain()
    why = analysis.left_alone
    assert any("[layers.0.attn]" in w and "does not compute kv_compress_step" in w for w in why), why
    for layer in (0, 1):
        assert any(f"[layers.{layer}.attn]" in w and "not a recognised compressor's entries" in w for w in why), why
    assert not [n for n in program.gm.graph.nodes if is_call(n, OPS.kv_compress_step.default, OPS.sparse_attention.default)]
    assert {(e.name.split(".", 1)[1], e.kind) for e in analysis.plan.entries} == {
        ("kv", "full"), ("comp", "full"), ("comp_kv_state", "state"), ("comp_score_state", "state")}


def test_lookalike_compressors_parity(lookalike):
    """The left-alone step graph computes the look-alike's own logits (fp32 rel <= 1e-5): a 20-token
    prefill across the first block boundary, a 3-token chunk, then 17 decode steps across the next."""
    model, ids, program, analysis = lookalike
    with torch.no_grad():
        want, _ = model(ids)
        outs, pos = (None, *analysis.plan.empty_caches(2)), 0
        for n in LOOKALIKE_CHUNKS:
            outs = program.gm(ids[:, pos:pos + n], torch.tensor(pos), *outs[1:])
            assert_close(outs[0], want[:, pos:pos + n], what=f"logits of tokens {pos}..{pos + n - 1}")
            pos += n


@pytest.fixture(scope="module")
def csa_lookalike():
    """``(model, ids, program, analysis)``: one CSA layer (ratio 4, overlapping blocks, indexer) whose
    compressors pair the wrong halves of neighbouring blocks; captured once (~15 s) the way a build
    captures (``samples._spec.capture_new_tokens``: an example step of 8 new tokens, 2 blocks)."""
    from effexport.exporter.capture import capture_step
    from effexport.samples._spec import capture_new_tokens
    from models import compressor_lookalike

    model = compressor_lookalike.build(("swapped",), ratio=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    new_tokens = capture_new_tokens(model.config.layer_specs())
    assert new_tokens == 8
    program, analysis = pipeline.run_pipeline(capture_step(model, ids, new_tokens), max_context=MAX_CONTEXT)
    return model, ids, program, analysis


def test_csa_lookalike_left_alone_with_reasons(csa_lookalike):
    """Both overlapping compressors (the attention's and the indexer's) fail the numeric check and the
    sparse attention over their entries is not recognised: all left alone, no compressed op."""
    model, ids, program, analysis = csa_lookalike
    counts = analysis.counts["compressed"]
    assert {k: counts[k] for k in ("csa", "hca", "window_only", "left_alone")} == \
        {"csa": 0, "hca": 0, "window_only": 0, "left_alone": 3}, analysis.explain()
    why = analysis.left_alone
    assert sum("does not compute kv_compress_step" in w for w in why) == 2, why
    assert any("not a recognised compressor's entries" in w for w in why), why
    assert not [n for n in program.gm.graph.nodes if is_call(n, OPS.kv_compress_step.default, OPS.indexer_topk.default)]


def test_csa_lookalike_parity(csa_lookalike):
    """Left alone, the step graph computes the look-alike's logits: prefill 5, then 35 steps (steps
    that complete no block, one block; the prefill one block with fewer entries than top-k), and
    chunks of 13, 6 and 2 (3 and 2 blocks per step). Captured with a 3-token example step (one block
    per step) export specialised the block count to 1: rel 2.5e-2 at the 5-token prefill and a
    failure at P = 8, T = 1 (indexer mask [T, 2] vs scores [B, T, 3])."""
    model, ids, program, analysis = csa_lookalike
    want = _assert_prefill_and_decode(model, ids, program.gm, analysis.plan)
    with torch.no_grad():
        outs, pos = (None, *analysis.plan.empty_caches(2)), 0
        for n in (13, 6, 2, 1):
            outs = program.gm(ids[:, pos:pos + n], torch.tensor(pos), *outs[1:])
            assert_close(outs[0], want[:, pos:pos + n], what=f"logits of tokens {pos}..{pos + n - 1}")
            pos += n


def test_csa_lookalike_states_start_as_the_model_starts_them(csa_lookalike):
    """The CachePlan's empty caches are the model's own empty state: the compressors' gate scores start
    at -inf (empty slots), their projected values at 0 (``capture.initial_fills``); started from
    zeros, the left-alone compressors pool empty slots (rel 2.5e-2 at the 5-token prefill). Only a
    non-zero fill is written to the manifest's entries."""
    model, ids, program, analysis = csa_lookalike
    fills = {e.name: e.fill for e in analysis.plan.entries if e.kind == "state"}
    assert fills == {"0.comp_kv_state": 0.0, "0.comp_score_state": float("-inf"),
                     "0.index_kv_state": 0.0, "0.index_score_state": float("-inf")}, fills
    entries = {e["name"]: e for e in analysis.plan.to_json()["entries"]}
    assert entries["0.comp_score_state"]["fill"] == float("-inf") and "fill" not in entries["0.comp_kv_state"]
    assert all(torch.isneginf(c).all() for e, c in zip(analysis.plan.entries, analysis.plan.empty_caches(1))
               if e.name.endswith("score_state"))


def test_capture_refuses_a_state_it_cannot_start():
    """A model whose prefill starts a state from a value the empty cache cannot give (0.5 here) is
    refused at capture with the reason, instead of an artifact whose prefill differs."""
    from effexport.exporter.capture import initial_fills
    from effexport.exporter.errors import CaptureError

    class Half(torch.nn.Module):
        def forward(self, ids, past=None):
            kv = torch.nn.functional.one_hot(ids, 8).float()
            state = past["0.s"] if past is not None else torch.full((ids.shape[0], 8), 0.5)
            state = state + kv.sum(1)
            kv = kv if past is None else torch.cat([past["0.kv"], kv], 1)
            return kv * state[:, None], {"0.kv": kv, "0.s": state}

    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    _, past = Half()(ids)
    with pytest.raises(CaptureError, match=r"prefill \(past=None\) is not reproduced.*0\.s"):
        initial_fills(Half(), ids, past, {"0.kv": 1, "0.s": None})


def test_sample_capture_example_completes_two_blocks_per_step():
    """A build captures a sample with an example step of twice the largest compression ratio (every
    compressor completes >= 2 blocks in it, so export keeps the block count symbolic)."""
    from effexport.exporter.frontends.loading import load_model

    loaded = load_model("deepseek-v4-flash:tiny")
    assert loaded.example_new_tokens == 32
    assert loaded.example_length == 37 + 32
    assert load_model("gemma4-e2b:tiny").example_new_tokens == 3


def test_step_bound_recorded_from_export(csa_lookalike):
    """The capture records the most new tokens a step may take where export bounded them: none for the
    build's 2-block example step; captured with a 1-block step (T = 3 at P = 37) export bounded T to 7
    ((T + P % 4) // 4 < 2), which the artifact would record as ``max_step_tokens``."""
    from effexport.exporter.capture import capture_step

    model, ids, program, analysis = csa_lookalike
    assert program.max_new_tokens is None
    assert capture_step(model, ids, 3).max_new_tokens == 7


def _wide_topk(name: str, layers: int, **changes):
    """``name`` cut to its first ``layers`` layers (swa, swa, csa), config fields changed."""
    import dataclasses

    from effexport.samples import Sample, get_sample

    s = get_sample(name).with_layers(layers)
    return Sample(s.name, s.module, dataclasses.replace(s.config, **changes))


def test_indexer_topk_wider_than_the_entries_keeps_parity():
    """A top-k wider than the compressed entries (the graph picks ``min(topk, entries)`` columns,
    ``indexer_topk`` pads ``topk`` with -1): the indexer is recognised -- the numeric check probes 10
    entries, fewer than top-k 16 -- and the rewritten step keeps parity at every step, where top-k
    exceeds the entries throughout (1 to 10 entries)."""
    sample = _wide_topk("deepseek-v4-flash:tiny", 3, index_topk=16)
    model = sample.build()
    ids = torch.randint(0, sample.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    from effexport.exporter.capture import capture_step

    prog, analysis = pipeline.run_pipeline(capture_step(model, ids), max_context=MAX_CONTEXT)
    assert analysis.counts["compressed"]["csa"] == 1, analysis.explain()
    assert [n.kwargs.get("topk", n.args[-1] if n.args else None) for n in prog.gm.graph.nodes
            if is_call(n, OPS.indexer_topk.default)] == [16]
    _assert_prefill_and_decode(model, ids, prog.gm, analysis.plan)


def test_real_size_indexer_recognised_on_meta_weights_and_sharded():
    """DeepSeek V4-Flash at its real widths (top-k 512, 64 indexer heads), cut to 3 layers (the third
    a CSA layer), on meta weights as ``--weights none`` builds it: the indexer is recognised (it was
    left alone with "selected indices differ": the probe holds 10 entries, fewer than top-k), and
    over 8 ranks it stays whole on every rank while the sparse attention's 64 query heads split."""
    from effexport.exporter.capture import capture_step
    from effexport.passes.sharding import plan_sharding, shard_rank

    sample = _wide_topk("deepseek-v4-flash", 3)
    assert sample.config.index_topk == 512 and sample.config.layer_type(2) == "csa"
    model = sample.build("meta")
    prog, analysis = pipeline.run_pipeline(capture_step(model, torch.zeros(2, 40, dtype=torch.long, device="meta")),
                                           max_context=4096)
    counts = analysis.counts["compressed"]
    assert (counts["csa"], counts["window_only"], counts["left_alone"]) == (1, 2, 0), analysis.explain()
    shard = plan_sharding(prog, analysis.plan, 8)
    rank_prog, _ = shard_rank(prog, analysis.plan, shard, 0, "0")
    gm = rank_prog.gm
    (indexer,) = [n for n in gm.graph.nodes if is_call(n, OPS.indexer_topk.default)]
    assert indexer.args[0].meta["val"].shape[2] == sample.config.index_n_heads  # whole on every rank
    heads = {n.args[0].meta["val"].shape[2] for n in gm.graph.nodes if is_call(n, OPS.sparse_attention.default)}
    assert heads == {sample.config.n_heads // 8}
