"""The pass pipeline on every tiny sample: exact rewrite counts (zeros included), the CachePlan,
and parity of the rewritten step graph with eager over prefill + decode steps."""
import operator

import pytest
import torch

from _helpers import assert_close, assert_long_enough
from effexport.passes.pipeline import PASS_NAMES, run_pipeline
from effexport.passes.sites import layer_index
from effexport.exporter.errors import RewriteError

ops = torch.ops.effexport
ATTENTION_SAMPLES = ["gemma4-e2b:tiny", "gemma4-e4b:tiny", "gemma4-odd:tiny", "laguna-xs2:tiny", "zaya1-8b:tiny"]


def expected_from_specs(sample):
    """What the rewrite must produce, from the sample's own layer specs (an independent oracle)."""
    specs = sample.config.layer_specs()
    attn = [l for l in specs if l.type in ("full", "sliding", "cca")]
    consumers = {l.index: l.reads for l in attn if l.role == "consumer"}
    sliding_owned = [l for l in attn if l.type == "sliding" and l.role != "consumer"]
    full_owned = [l for l in attn if l.type != "sliding" and l.role != "consumer"]
    windows = {l.window for l in attn if l.type == "sliding"}
    return attn, consumers, sliding_owned, full_owned, windows


def op_nodes(gm, op):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ATTENTION_SAMPLES])
def test_rewrite_counts(rewritten, name):
    r = rewritten(name)
    attn, consumers, sliding_owned, full_owned, windows = expected_from_specs(r.sample)
    c = r.analysis.counts
    assert c["discover"]["sites"] == len(attn)
    # softmax nodes that are not attention (MoE router softmax in ZAYA1) are rejected with a reason
    routers = r.sample.config.num_hidden_layers if name.startswith("zaya") else 0
    assert c["discover"]["rejected"] == routers
    assert all("q @ k^T" in x.reason or "probs @ V" in x.reason for x in r.analysis.rejected)
    assert c["classify_masks"] == {"causal": len(attn) - sum(l.type == "sliding" for l in attn),
                                   "sliding": sum(l.type == "sliding" for l in attn),
                                   "full": 0, "chunked": 0, "unknown": 0}
    assert {s.window for s in r.analysis.sites if s.mask_kind == "sliding"} == windows
    assert c["kv_sharing"]["consumers"] == len(consumers)
    assert c["rewrite"]["ring"] == len(sliding_owned)
    assert c["rewrite"]["full"] == len(full_owned)
    assert c["rewrite"]["left_alone"] == 0 and c["rewrite"]["plain"] == 0
    gm = r.program.gm
    assert len(op_nodes(gm, ops.attention_cache.default)) == len(full_owned)
    n_sliding_consumers = sum(1 for i in consumers if any(l.index == i and l.type == "sliding" for l in attn))
    assert len(op_nodes(gm, ops.attention_ring.default)) == len(sliding_owned) + n_sliding_consumers
    assert len(op_nodes(gm, ops.attention_read.default)) == len(consumers) - n_sliding_consumers
    # no decomposed attention left: only the router softmaxes remain, and no [T, P + T] mask
    softmax = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in
               (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)]
    assert len(softmax) == routers
    assert not [n for n in gm.graph.nodes if _is_cache_wide_mask(n)]


def _is_cache_wide_mask(node):
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != torch.bool or val.dim() < 2:
        return False
    last = val.shape[-1]
    return isinstance(last, torch.SymInt) and len(last.node.expr.free_symbols) > 1


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ATTENTION_SAMPLES])
def test_consumers_read_their_producer(rewritten, name):
    r = rewritten(name)
    attn, consumers, *_ = expected_from_specs(r.sample)
    found = {layer_index(s.layer): s.reads for s in r.analysis.sites if s.role == "consumer"}
    assert found == consumers
    # the consumer ops read exactly the owner op's K/V nodes (no K/V of their own)
    gm = r.program.gm
    for node in op_nodes(gm, ops.attention_read.default):
        k = node.args[1]
        assert k.target is operator.getitem and k.args[0].target is ops.attention_cache.default
    ring_nodes = op_nodes(gm, ops.attention_ring.default)
    by_kv = {}
    for node in ring_nodes:
        by_kv.setdefault((node.args[1], node.args[3]), []).append(node)
    n_sliding_consumers = sum(1 for i in consumers if any(l.index == i and l.type == "sliding" for l in attn))
    assert sum(len(v) - 1 for v in by_kv.values()) == n_sliding_consumers


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ATTENTION_SAMPLES])
def test_cache_plan_matches_layer_specs(rewritten, name):
    r = rewritten(name)
    plan = r.analysis.plan
    specs = {l.index: l for l in r.sample.config.layer_specs()}
    for entry in plan.entries:
        spec = specs[entry.layer]
        assert spec.role != "consumer", f"consumer layer {entry.layer} owns cache {entry.name}"
        tensor = next(t for t in spec.cache if t.name == entry.name.split(".", 1)[1])
        assert entry.kind == tensor.kind, entry
        if entry.kind == "ring":
            assert entry.window == tensor.window == entry.shape[2]
    owned = {(l.index, t.name) for l in specs.values() for t in l.cache}
    assert {(e.layer, e.name.split(".", 1)[1]) for e in plan.entries} == owned
    # bytes of every cache input at a context = the analytic sum from the layer specs (fp32 here)
    context = 100
    analytic = sum(t.num_entries(context, "ring") * t.elements * 4 * 2 for l in specs.values() for t in l.cache)
    assert plan.nbytes(batch=2, context=context) == analytic


def test_deepseek_counts(rewritten):
    """mHC (pre/post per sub-layer, one head) and CSA / HCA / window-only layers by compress_ratios."""
    r = rewritten("deepseek-v4-flash:tiny")
    cfg, c = r.sample.config, r.analysis.counts
    layers = cfg.n_layers
    ratios = list(cfg.compress_ratios[:layers])
    assert {k: c["mhc"][k] for k in ("mhc_pre", "mhc_post", "mhc_head", "left_alone")} == \
        {"mhc_pre": 2 * layers, "mhc_post": 2 * layers, "mhc_head": 1, "left_alone": 0}
    assert {k: c["compressed"][k] for k in ("csa", "hca", "window_only", "left_alone")} == \
        {"csa": ratios.count(4), "hca": sum(x > 4 for x in ratios), "window_only": ratios.count(0), "left_alone": 0}
    assert c["discover"]["sites"] == 0  # the generic attention pass finds nothing left to do
    kinds = {e.name.split(".", 1)[1]: e.kind for e in r.analysis.plan.entries}
    assert kinds["kv"] == "ring" and kinds["comp"] == "compressed" and kinds["index_k"] == "compressed"
    assert not [e for e in r.analysis.plan.entries if e.kind == "full"]
    gm = r.program.gm
    assert len(op_nodes(gm, ops.sparse_attention.default)) == layers
    assert len(op_nodes(gm, ops.indexer_topk.default)) == ratios.count(4)
    assert len(op_nodes(gm, ops.mhc_pre.default)) == 2 * layers


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ATTENTION_SAMPLES + ["deepseek-v4-flash:tiny"]])
def test_rewritten_step_equals_eager(rewritten, name):
    r = rewritten(name)
    ids = r.ids
    with torch.no_grad():
        ref, _ = r.model(ids)
        caches = r.analysis.plan.empty_caches(ids.shape[0])
        outs = r.program.gm(ids[:, :6], torch.tensor(0), *caches)
        assert_close(outs[0], ref[:, :6], what="prefill logits")
        caches = list(outs[1:])
        for t in range(6, 24):  # 18 decode steps, well past the tiny windows (8)
            outs = r.program.gm(ids[:, t:t + 1], torch.tensor(t), *caches)
            assert_close(outs[0][:, 0], ref[:, t], what=f"decode logits at {t}")
            caches = list(outs[1:])
    ring = [(c, e) for c, e in zip(caches, r.analysis.plan.entries) if e.kind == "ring"]
    assert all(e.window in c.shape and c.shape == tuple(e.concrete_shape(2, 0)) for c, e in ring)


def test_explain_lists_every_site(rewritten):
    r = rewritten("gemma4-odd:tiny")
    text = r.analysis.explain()
    assert text.count("site ") >= len(r.analysis.sites)
    assert "sliding(W=8)" in text and "consumer of layer 5" in text and "consumer of layer 4" in text


def test_dump_after_calls_back_and_unknown_pass_is_an_error(rewritten):
    r = rewritten("laguna-xs2:tiny")
    seen = []
    run_pipeline(r.captured, dump_after="classify_masks", dump=lambda name, gm: seen.append((name, len(gm.graph.nodes))))
    assert seen and seen[0][0] == "classify_masks"
    with pytest.raises(RewriteError, match="passes are: " + ", ".join(PASS_NAMES)):
        run_pipeline(r.captured, dump_after="nope")


def test_bf16_model_hands_the_rounded_query_to_the_ops():
    """In a bf16 model the query is rounded to bf16 after RoPE (``.to(x.dtype)``) and upcast again for
    the fp32 scores (``q.float()``). The ops get that bf16 query: the upcast is exact and the ops
    score in fp32 themselves, whereas walking through the rounding cast would hand them the unrounded
    fp32 RoPE output (different numbers from eager, and the slow mixed-precision kernel path)."""
    from effexport.exporter.capture import capture_step
    from effexport.samples import get_sample

    sample = get_sample("gemma4-e2b:tiny")
    model = sample.build(dtype=torch.bfloat16)
    ids = torch.randint(0, sample.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    program, analysis = run_pipeline(capture_step(model, ids))
    attention = [n for n in program.gm.graph.nodes if n.op == "call_function"
                 and n.target in (ops.attention_ring.default, ops.attention_cache.default, ops.attention_read.default)]
    assert len(attention) == len(sample.config.layer_specs())
    for node in attention:
        q = node.args[0]
        assert q.meta["val"].dtype == torch.bfloat16, (node.name, q.meta["val"].dtype)
    with torch.no_grad():
        ref, _ = model(ids)
        caches = analysis.plan.empty_caches(2)
        for e, c in zip(analysis.plan.entries, caches):
            assert c.dtype == torch.bfloat16, e
        outs = program.gm(ids[:, :6], torch.tensor(0), *caches)
        assert_close(outs[0], ref[:, :6], dtype=torch.bfloat16, what="prefill logits")
        caches = list(outs[1:])
        for t in range(6, 15):  # 9 decode steps, past the tiny window (8)
            outs = program.gm(ids[:, t:t + 1], torch.tensor(t), *caches)
            assert_close(outs[0][:, 0], ref[:, t], dtype=torch.bfloat16, what=f"decode logits at {t}")
            caches = list(outs[1:])


def test_matmul_fake_value_on_a_symbolic_batch():
    """A new node's fake value for ``aten.matmul`` of a symbolic-batch 3-d tensor with a 2-d matrix
    (the DeepSeek compressor's per-entry transform): torch 2.11's matmul raises "Cannot call numel()
    on tensor with symbolic sizes" there, so ``fake_call`` falls back to a broadcast product. Both
    values have matmul's shape (symbolic batch kept) and dtype, on any torch; the fallback formula
    computes matmul's numbers on real tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from effexport.passes._graph import fake_call, matmul_2d_value

    real_l, real_r = torch.randn(3, 5, 16), torch.randn(16, 7)
    assert_close(matmul_2d_value(real_l, real_r), real_l @ real_r, what="fallback numbers")
    mode = FakeTensorMode(shape_env=ShapeEnv())
    batch_dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC, DimDynamic.STATIC])
    left = mode.from_tensor(torch.randn(3, 1024, 16, dtype=torch.bfloat16), symbolic_context=batch_dynamic)
    right = mode.from_tensor(torch.randn(16, 8, dtype=torch.bfloat16))
    assert isinstance(left.shape[0], torch.SymInt)
    with mode:
        values = fake_call(torch.ops.aten.matmul.default, [left, right], {}), matmul_2d_value(left, right)
    for value in values:
        assert value.shape[0] is left.shape[0] or str(value.shape[0]) == str(left.shape[0])
        assert tuple(value.shape[1:]) == (1024, 8) and value.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- models on CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gemma4-e2b:tiny", "laguna-xs2:tiny", "zaya1-8b:tiny", "deepseek-v4-flash:tiny"])
def test_pipeline_on_a_cuda_model(rewritten, name):
    """A model captured on CUDA (what bench/decode_step.py does at real size) rewrites exactly as on
    the CPU -- same counts; the passes' numeric probes run on CPU copies of the parameters -- and the
    rewritten step on CUDA matches the eager CUDA model (fp32, a prefill of the capture's 37 prompt
    tokens, past every window and top-k, then 12 decode steps; tokens drawn apart from the capture's)."""
    from effexport.exporter.capture import capture_step
    from effexport.passes.pipeline import run_pipeline

    cpu = rewritten(name)
    model = cpu.sample.build().cuda()
    program, analysis = run_pipeline(capture_step(model, cpu.ids.cuda()))
    assert dict(analysis.counts) == dict(cpu.analysis.counts)
    prefill, decode = cpu.ids.shape[1] - 3, 12
    assert_long_enough(cpu.sample.config.layer_specs(), prefill, decode)
    ids = torch.randint(0, cpu.sample.config.vocab_size, (2, prefill + decode),
                        generator=torch.Generator().manual_seed(21)).cuda()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 tolerance
    try:
        with torch.no_grad():
            ref, _ = model(ids)
            outs = program.gm(ids[:, :prefill], torch.tensor(0, device="cuda"), *analysis.plan.empty_caches(2, "cuda"))
            assert_close(outs[0], ref[:, :prefill], what=f"{name} prefill logits on CUDA")
            for t in range(prefill, prefill + decode):
                outs = program.gm(ids[:, t:t + 1], torch.tensor(t, device="cuda"), *outs[1:])
                assert_close(outs[0][:, 0], ref[:, t], what=f"{name} decode logits at {t} on CUDA")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
