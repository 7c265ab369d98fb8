"""Full caches as fixed-capacity buffers (``--kv-cache buffer``): the ``effexport::attention_buffer``
op, the ``buffers`` pass, the ONNX lowering (GroupQueryAttention in its shared-buffer form in the
``ort`` profile, a ScatterND write + decomposition elsewhere) and the runtime's in-place binding.

Parity is fp32 against the growing-cache op / the eager model (``_helpers.TOLERANCE``); the ONNX
Runtime checks run on the CPU, where GroupQueryAttention detects a shared past/present buffer the
same way its CUDA kernel does (pointer equality)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import effexport.custom_ops  # noqa: F401  (registers the ops)
from _helpers import assert_close

ops = torch.ops.effexport
H, HKV, D, C = 4, 2, 16, 16  # heads, KV heads, head size, buffer rows


def _inputs(batch: int, t_len: int, pos: int, seed: int = 0, d: int = D):
    """q, k_new, v_new, k_buf, v_buf (random rows everywhere: rows >= pos must not matter), pos, sinks."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return (r(batch, H, t_len, d), r(batch, HKV, t_len, d), r(batch, HKV, t_len, d),
            r(batch, HKV, C, d), r(batch, HKV, C, d), torch.tensor(pos), r(H))


VARIANTS = [pytest.param(0, 0.0, False, id="causal"), pytest.param(5, 0.0, False, id="window"),
            pytest.param(5, 4.0, True, id="window-softcap-sinks")]


# ------------------------------------------------------------------------------------------- op
@pytest.mark.parametrize("window,softcap,sinks", VARIANTS)
@pytest.mark.parametrize("batch,t_len,pos", [(2, 3, 0), (1, 4, 7), (3, 1, 9), (2, 1, C - 1)])
def test_buffer_equals_the_growing_cache(batch, t_len, pos, window, softcap, sinks):
    """``attention_buffer`` over rows ``< pos`` of a buffer equals ``attention_cache`` with that past;
    the new rows land at ``pos..pos+T-1`` and every other row is returned unchanged."""
    q, k_new, v_new, k_buf, v_buf, p, s = _inputs(batch, t_len, pos)
    s = s if sinks else None
    kw = dict(scale=0.3, window=window, softcap=softcap)
    out, k_out, v_out = ops.attention_buffer(q, k_new, v_new, k_buf, v_buf, p, s, **kw)
    ref, k_ref, v_ref = ops.attention_cache(q, k_new, v_new, k_buf[:, :, :pos], v_buf[:, :, :pos], s, **kw)
    assert_close(out, ref, what="out")
    assert torch.equal(k_out[:, :, :pos + t_len], k_ref) and torch.equal(v_out[:, :, :pos + t_len], v_ref)
    assert torch.equal(k_out[:, :, pos + t_len:], k_buf[:, :, pos + t_len:])
    assert torch.equal(v_out[:, :, pos + t_len:], v_buf[:, :, pos + t_len:])


def test_buffer_decode_loop_equals_prefill():
    """A prefill chunk then one-token steps through one buffer equal causal attention over the whole
    sequence (window, softcap and sinks on)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 11, D, generator=g) for h in (H, HKV, HKV))
    sinks = torch.randn(H, generator=g)
    kw = dict(scale=0.25, window=4, softcap=5.0)
    ref = ops.attention(q, k, v, sinks, **kw)
    k_buf, v_buf = torch.zeros(2, HKV, C, D), torch.zeros(2, HKV, C, D)
    outs = []
    for start, end in [(0, 6)] + [(p, p + 1) for p in range(6, 11)]:
        out, k_buf, v_buf = ops.attention_buffer(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                                 k_buf, v_buf, torch.tensor(start), sinks, **kw)
        outs.append(out)
    assert_close(torch.cat(outs, dim=2), ref, what="buffer loop vs prefill")
    assert torch.equal(k_buf[:, :, :11], k) and not k_buf[:, :, 11:].any()


def test_buffer_refuses_positions_past_its_rows():
    q, k_new, v_new, k_buf, v_buf, _, _ = _inputs(1, 3, 0)
    with pytest.raises(ValueError, match=r"do not fit the buffer's 16 rows.*larger max context"):
        ops.attention_buffer(q, k_new, v_new, k_buf, v_buf, torch.tensor(C - 2), scale=1.0)


def test_buffer_opcheck():
    """torch.library.opcheck: schema, fake kernel (symbolic shapes), AOT dispatch."""
    q, k_new, v_new, k_buf, v_buf, pos, sinks = _inputs(2, 3, 4)
    torch.library.opcheck(ops.attention_buffer.default, (q, k_new, v_new, k_buf, v_buf, pos, sinks),
                          dict(scale=0.3, window=3, softcap=2.0))
    torch.library.opcheck(ops.attention_buffer.default, (q, k_new, v_new, k_buf, v_buf, torch.tensor(0)),
                          dict(scale=0.3))


@pytest.mark.parametrize("batch,t_len,pos", [(2, 1, 0), (1, 3, 7), (2, 1, C - 1)])
def test_inplace_buffer_equals_the_functional_op(batch, t_len, pos):
    """``attention_buffer_inplace`` returns the functional op's output and leaves in its buffers the
    functional op's returned buffers; it refuses the same positions."""
    q, k_new, v_new, k_buf, v_buf, p, s = _inputs(batch, t_len, pos)
    kw = dict(scale=0.3, window=5, softcap=4.0)
    out, k_out, v_out = ops.attention_buffer(q, k_new, v_new, k_buf, v_buf, p, s, **kw)
    got = ops.attention_buffer_inplace(q, k_new, v_new, k_buf, v_buf, p, s, **kw)
    assert torch.equal(got, out) and torch.equal(k_buf, k_out) and torch.equal(v_buf, v_out)
    with pytest.raises(ValueError, match=r"attention_buffer_inplace: positions .* do not fit"):
        ops.attention_buffer_inplace(q, k_new, v_new, k_buf, v_buf, torch.tensor(C - t_len + 1), s, **kw)


def test_inplace_buffer_opcheck_and_compile():
    """opcheck (schema with its mutated buffers, fake kernel, AOT dispatch), and a compiled step
    (``torch.compile``, functionalised then written back) mutates the caller's buffers as eager does."""
    q, k_new, v_new, k_buf, v_buf, pos, sinks = _inputs(2, 1, 4)
    torch.library.opcheck(ops.attention_buffer_inplace.default,
                          (q, k_new, v_new, k_buf.clone(), v_buf.clone(), pos, sinks), dict(scale=0.3, window=3))

    def step(q, k_new, v_new, k_buf, v_buf, pos):
        return ops.attention_buffer_inplace(q, k_new, v_new, k_buf, v_buf, pos, scale=0.3) * 2

    k_eager, v_eager = k_buf.clone(), v_buf.clone()
    want = step(q, k_new, v_new, k_eager, v_eager, pos)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k_new, v_new, k_buf, v_buf, pos)
    assert torch.equal(got, want) and torch.equal(k_buf, k_eager) and torch.equal(v_buf, v_eager)
    assert torch.equal(k_buf[:, :, 4:5], k_new)


# ------------------------------------------------------------------------------------- ONNX op
class _Buffer(torch.nn.Module):
    def __init__(self, window: int, softcap: float, sinks: bool):
        super().__init__()
        self.kw, self.sinks = dict(scale=0.3, window=window, softcap=softcap), sinks

    def forward(self, q, k_new, v_new, k_buf, v_buf, pos, sinks):
        return ops.attention_buffer(q, k_new, v_new, k_buf, v_buf, pos, sinks if self.sinks else None, **self.kw)


def _lowered(module, profile: str, d: int = D) -> onnx.ModelProto:
    from effexport.exporter.backends.onnx.export import lower

    bt = {0: torch.export.Dim("batch"), 2: torch.export.Dim("t")}
    return lower(module, _inputs(2, 3, 5, d=d), profile, dynamic_shapes=(bt, bt, bt, {0: bt[0]}, {0: bt[0]}, None, None))


ARGS = ("q", "k_new", "v_new", "k_buf", "v_buf", "pos", "sinks")


def _feeds(model: onnx.ModelProto, args) -> dict:
    """The op's arguments by input name; ``pos_host`` (the ort profile's host copy of ``pos``, read by
    GroupQueryAttention's total_sequence_length) gets ``pos``."""
    given = dict(zip(ARGS, args))
    given["pos_host"] = given["pos"]
    return {i.name: given[i.name].numpy() for i in model.graph.input}


@pytest.mark.parametrize("window,softcap,sinks", VARIANTS)
@pytest.mark.parametrize("profile", ["ort", "standard", "tensorrt"])
def test_lowering_parity(profile, window, softcap, sinks):
    """ONNX Runtime CPU equals the eager op at shapes other than the export example (fp32, rel 1e-5):
    the output, and the buffer rows ``0..pos+T-1`` (later rows are unspecified for GQA's unshared
    present; the decomposed profiles return them unchanged)."""
    module = _Buffer(window, softcap, sinks)
    model = _lowered(module, profile)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for i, (b, t, pos) in enumerate([(2, 3, 0), (1, 4, 6), (3, 1, 9), (2, 1, C - 1)]):
        args = _inputs(b, t, pos, seed=i + 1)
        want = module(*args)
        got = session.run(None, _feeds(model, args))
        assert_close(torch.from_numpy(got[0]), want[0], rtol=1e-5, what=f"{profile} out B={b} T={t} pos={pos}")
        rows = C if profile != "ort" else pos + t
        for g, w, name in zip(got[1:], want[1:], ("k", "v")):
            assert g.shape == tuple(w.shape), f"{name} buffer shape {g.shape}"
            assert np.array_equal(g[:, :, :rows], w[:, :, :rows].numpy()), f"{profile} {name} rows B={b} pos={pos}"


class _TwoLayers(torch.nn.Module):
    """Two layers' buffers read at one position, scale 1 (Gemma 4's): what a step's decomposed
    attentions share."""

    def forward(self, q, k_new, v_new, k_buf, v_buf, pos, sinks):
        a = ops.attention_buffer(q, k_new, v_new, k_buf, v_buf, pos, None, scale=1.0, window=0, softcap=0.0)
        b = ops.attention_buffer(q * 0.5, v_new, k_new, v_buf, k_buf, pos, None, scale=1.0, window=0, softcap=0.0)
        return a[0] + b[0], a[1], b[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decomposed_attention_is_lean(dtype):
    """Heads GroupQueryAttention does not take (wider than its kernels), with nothing to compute in
    fp32 (scale 1, no softcap, no sinks: Gemma 4's wide layers): each attention is MatMul, Add,
    Softmax, MatMul between the query's and the output's Reshape, in the build's dtype -- the mask
    an additive ``0 / -inf`` bias made once for every layer (one Where; ONNX Runtime's CUDA ``Where``
    has no bf16 kernel), no Mul for a scale of 1, no Cast around the softmax, no Reshape of the
    scores -- the same structure in fp32 and half precision. ONNX Runtime CPU equals the eager ops:
    fp32 rel 1e-5; fp16 as close to the fp32 eager op on the same fp16 data as the eager fp16 op is
    (rel 1e-3, measured 3.6e-4); bf16 has no CPU kernels (structure only)."""
    from collections import Counter

    from effexport.exporter.backends.onnx.attention import GQA_MAX_HEAD_DIM
    from effexport.exporter.backends.onnx.export import lower

    d = GQA_MAX_HEAD_DIM * 2
    module = _TwoLayers()
    typed = lambda args: tuple(a.to(dtype) if a.is_floating_point() else a for a in args)  # noqa: E731
    bt = {0: torch.export.Dim("batch"), 2: torch.export.Dim("t")}
    model = lower(module, typed(_inputs(2, 3, 5, d=d)), "ort",
                  dynamic_shapes=(bt, bt, bt, {0: bt[0]}, {0: bt[0]}, None, None))
    types = Counter(n.op_type for n in model.graph.node)
    assert "GroupQueryAttention" not in types
    assert types["Softmax"] == 2 and types["Where"] == 1, types  # one bias for both layers
    assert types["Cast"] == (dtype != torch.float32), types  # the bias to the half dtype, once
    assert types["Mul"] == 1, types  # the test's own q * 0.5 only
    producer = {o: n for n in model.graph.node for o in n.output}
    adds = [producer[n.input[0]] for n in model.graph.node if n.op_type == "Softmax"]
    assert all(a.op_type == "Add" and producer[a.input[0]].op_type == "MatMul" for a in adds)
    assert adds[0].input[1] == adds[1].input[1]
    if dtype == torch.bfloat16:
        return
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for i, (b, t, pos) in enumerate([(2, 3, 0), (1, 4, 6), (3, 1, C - 1)]):
        args = typed(_inputs(b, t, pos, seed=i + 1, d=d))
        want = module(*(a.float() if a.is_floating_point() else a for a in args))[0]
        got = torch.from_numpy(session.run(None, _feeds(model, args))[0]).float()
        assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-3,
                     what=f"{dtype} out B={b} T={t} pos={pos}")


def test_ort_profile_is_one_shared_buffer_gqa():
    """ort: one GroupQueryAttention reading the buffer inputs directly and writing the present outputs
    directly (so a runtime can bind them to one memory), fixed C rows on both sides, window attribute."""
    model = _lowered(_Buffer(5, 0.0, False), "ort")
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1
    inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    assert list(gqa[0].input[3:5]) == inputs[3:5] and list(gqa[0].output[1:3]) == outputs[1:3]
    for value in (*model.graph.input[3:5], *model.graph.output[1:3]):
        assert value.type.tensor_type.shape.dim[2].dim_value == C
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["local_window_size"] == 5 and attrs["num_heads"] == H and attrs["kv_num_heads"] == HKV
    assert "Concat" not in {n.op_type for n in model.graph.node}  # no copy of the cache


def test_ort_profile_above_gqa_head_size_writes_by_scatter():
    """Head sizes GQA does not take (Gemma 4's 512) write the new rows with one ScatterND per cache
    (no Gather or Concat of the buffer: a bound present is written in place) and attend decomposed."""
    from effexport.exporter.backends.onnx.attention import GQA_MAX_HEAD_DIM

    module, d = _Buffer(0, 0.0, True), GQA_MAX_HEAD_DIM + 64
    model = _lowered(module, "ort", d=d)
    types = [n.op_type for n in model.graph.node]
    assert "GroupQueryAttention" not in types and "Gather" not in types and types.count("ScatterND") == 2
    caches = {"k_buf", "v_buf"}
    assert not [n for n in model.graph.node if n.op_type == "Concat" and caches & set(n.input)]
    args = _inputs(3, 1, 9, seed=7, d=d)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, _feeds(model, args))
    for g, w in zip(got, module(*args)):
        assert_close(torch.from_numpy(g), w, rtol=1e-5, what=f"d={d}")


def test_half_precision_decomposition_multiplies_in_its_dtype():
    """A bf16 build's decomposed attention (heads GQA does not take) runs both products on bf16
    operands -- K and V are never cast to fp32 (five times the bytes) -- each one batched GEMM
    of the G query heads of a KV head (rank-4 operands: no broadcast over heads), softmax in fp32."""
    from onnx import TensorProto

    from effexport.exporter.backends.onnx.attention import GQA_MAX_HEAD_DIM
    from effexport.exporter.backends.onnx.export import lower

    d = GQA_MAX_HEAD_DIM + 64
    args = tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in _inputs(2, 1, 5, d=d))
    bt = {0: torch.export.Dim("batch")}
    model = onnx.shape_inference.infer_shapes(lower(_Buffer(0, 0.0, False), args, "ort",
                                                    dynamic_shapes=(bt, bt, bt, bt, bt, None, None)))
    types = {v.name: v.type.tensor_type for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2
    for node in matmuls:
        assert [types[x].elem_type for x in node.input] == [TensorProto.BFLOAT16] * 2, node
        assert [len(types[x].shape.dim) for x in node.input] == [4, 4], node
    assert [types[n.input[0]].elem_type for n in model.graph.node if n.op_type == "Softmax"] == [TensorProto.FLOAT]
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert not [n for n in casts if n.input[0] in {"k_buf", "v_buf", "k_new", "v_new"}]


@pytest.mark.parametrize("wide", [False, True], ids=["gqa", "decomposed"])
def test_shared_binding_updates_the_buffer_in_place(wide):
    """Past and present bound to one memory: ORT writes the new rows into it (same pointer, rows
    0..pos+T-1 equal the eager op's) and the output equals an unbound run's -- through
    GroupQueryAttention, and through the ScatterND write of heads GQA does not take."""
    from effexport.exporter.backends.onnx.attention import GQA_MAX_HEAD_DIM

    d = GQA_MAX_HEAD_DIM + 64 if wide else D
    module = _Buffer(0, 0.0, False)
    model = _lowered(module, "ort", d=d)
    assert ("GroupQueryAttention" in {n.op_type for n in model.graph.node}) != wide
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    args = _inputs(2, 1, 7, seed=5, d=d)
    unbound = session.run(None, _feeds(model, args))
    k_buf, v_buf = args[3].clone(), args[4].clone()
    binding = session.io_binding()
    for name, value in list(_feeds(model, args).items())[:3] + list(_feeds(model, args).items())[5:]:
        binding.bind_cpu_input(name, value)
    binding.bind_output(model.graph.output[0].name, "cpu")  # get_outputs() keeps the binding order
    for i, buf in ((3, k_buf), (4, v_buf)):
        binding.bind_input(model.graph.input[i].name, "cpu", 0, np.float32, list(buf.shape), buf.data_ptr())
        binding.bind_output(model.graph.output[i - 2].name, "cpu", 0, np.float32, list(buf.shape), buf.data_ptr())
    session.run_with_iobinding(binding)
    out = binding.get_outputs()
    assert np.array_equal(out[0].numpy(), unbound[0])
    assert out[1].data_ptr() == k_buf.data_ptr() and out[2].data_ptr() == v_buf.data_ptr()
    _, k_want, v_want = module(*args)
    assert torch.equal(k_buf[:, :, :8], k_want[:, :, :8]) and torch.equal(v_buf[:, :, :8], v_want[:, :, :8])
    assert not torch.equal(k_buf[:, :, 7], args[3][:, :, 7])  # row 7 was really written


# ------------------------------------------------------------------------ pass, build, runtime
def test_pipeline_buffers_the_full_cache(rewritten):
    """gemma4-e2b:tiny (1 full owner, 4 sliding owners, 5 consumers): with ``cache_layout="buffer"``
    the full owner's attention_cache becomes attention_buffer over max_context rows, rings stay; the
    rewritten step equals the growing-cache step over a prefill and decode steps."""
    from effexport.passes.pipeline import run_pipeline

    base = rewritten("gemma4-e2b:tiny")
    program, analysis = run_pipeline(base.captured, max_context=64, cache_layout="buffer")
    assert analysis.counts["buffers"] == {"buffered": 1, "kept": 0}
    assert base.analysis.counts["buffers"] == {"buffered": 0, "kept": 0}
    targets = [n.target for n in program.gm.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.attention_buffer.default) == 1 and ops.attention_cache.default not in targets
    kinds = {e.name: (e.kind, e.shape) for e in analysis.plan.entries}
    assert {n: k for n, k in kinds.items() if k[0] != "ring"} == {
        "4.k": ("buffer", ("batch", 1, 64, 32)), "4.v": ("buffer", ("batch", 1, 64, 32))}
    assert sum(e.kind == "ring" for e in analysis.plan.entries) == base.analysis.counts["cache_plan"]["ring"]
    ids = base.ids
    grow_caches, buf_caches = base.analysis.plan.empty_caches(2), analysis.plan.empty_caches(2)
    with torch.no_grad():
        for start, end in [(0, 12)] + [(p, p + 1) for p in range(12, 20)]:
            step = (ids[:, start:end], torch.tensor(start))
            want, *grow_caches = base.program(*step, *grow_caches)
            got, *buf_caches = program(*step, *buf_caches)
            assert_close(got, want, what=f"logits at {start}")
    assert buf_caches[[e.name for e in analysis.plan.entries].index("4.k")].shape[2] == 64
    from effexport.exporter.verify.report import stock_comparison  # a buffer counts as the full cache it holds

    grow, buffer = (stock_comparison(base.sample, plan, 131072)["effexport"]["bytes"]
                    for plan in (base.analysis.plan, analysis.plan))
    assert buffer == grow > 0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One CLI build of gemma4-e2b:tiny with ``--kv-cache buffer`` (ort profile, parity on)."""
    from effexport.exporter.cli import main

    out = tmp_path_factory.mktemp("kvbuf") / "gemma"
    code = main(["gemma4-e2b:tiny", "--target", "onnx", "-o", str(out), "--kv-cache", "buffer",
                 "--max-context", "64", "--steps", "8"])
    return code, out


def test_build_with_buffers_passes_parity(built):
    code, out = built
    assert code == 0
    manifest = json.loads((out / "effexport.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["kv_cache"] == "buffer" and report["parity"]["passed"]
    assert report["passes"]["buffers"] == {"buffered": 1, "kept": 0}
    buffers = [e for e in manifest["cache_plan"]["entries"] if e["kind"] == "buffer"]
    assert [e["name"] for e in buffers] == ["4.k", "4.v"] and all(e["shape"][2] == 64 for e in buffers)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    past = {f"past.{e['name']}" for e in buffers}
    fed = [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and set(n.input[3:5]) == past]
    assert len(fed) == 1 and {o.name for o in model.graph.output} >= set(fed[0].output[1:3])


def test_runtime_binds_buffers_in_place(built):
    """OrtRuntime with I/O binding: buffers (and the windowed rings of sliding owners no consumer reads)
    are device tensors bound as past and present (same memory after every step), greedy generation
    equals the unbound runtime's, logits bit for bit."""
    from effexport.exporter.backends.onnx.runtime import OrtRuntime

    _, out = built
    ids = np.random.RandomState(0).randint(0, 128, (2, 12))
    plain, bound = OrtRuntime(str(out)), OrtRuntime(str(out), io_binding=True)
    caches = bound.initial_caches(2)
    bound_caches = [c for c in caches if isinstance(c, torch.Tensor)]
    buffers = [b for b in bound_caches if b.shape[2] == 64]
    assert len(buffers) == 2 and len(bound_caches) == 8  # + 3 windowed rings (K, V): owners no consumer reads
    result = bound.step(ids, 0, caches)
    assert [c.data_ptr() for c in result.caches if isinstance(c, torch.Tensor)] == [b.data_ptr() for b in bound_caches]
    assert buffers[0][:, :, :12].abs().sum() > 0 and not buffers[0][:, :, 12:].any()
    tokens_a, logits_a = plain.generate(ids, 10)
    tokens_b, logits_b = bound.generate(ids, 10)
    assert np.array_equal(tokens_a, tokens_b)
    assert all(np.array_equal(a, b) for a, b in zip(logits_a, logits_b))


def test_only_rings_consumers_read_keep_the_slot_layout(built):
    """gemma4-e2b:tiny: sliding owners 0-3, consumers 5-8 read layer 3's ring. Rings 0-2 become
    GroupQueryAttention windowed caches bound in place; ring 3 keeps the slot layout (its consumers
    read its past after the owner's write): 3 windowed GQA nodes, + the full-layer owner's GQA in the
    shared-buffer form."""
    model = onnx.load(str(built[1] / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["effexport.in_place"]) == [f"past.{i}.{n}" for i in range(3) for n in "kv"]
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    windowed = [n for n in gqa if any(a.name == "sliding_window_cache" and a.i == 1 for a in n.attribute)]
    assert len(windowed) == 3 and len(gqa) == 4
    assert {n.input[3] for n in windowed} == {f"past.{i}.k" for i in range(3)}


def test_runtime_refuses_steps_past_the_buffers(built):
    from effexport.exporter.errors import LoadError
    from effexport.exporter.backends.onnx.runtime import OrtRuntime

    runtime = OrtRuntime(str(built[1]))
    with pytest.raises(LoadError, match=r"positions 62..65 do not fit the artifact's 64-row cache buffers"):
        runtime.step(np.zeros((1, 4), dtype=np.int64), 62, runtime.initial_caches(1))


def test_buffer_build_has_the_ort_step_fusions(built):
    """The fixed-size caches bound the positions, so the ``ort`` step fuses every rotation into
    ``RotaryEmbedding`` (tables from the graph's own cos / sin arithmetic, ``pos`` as the first
    position) or into the GroupQueryAttention it feeds, residual adds into ``SkipSimplifiedLayerNormalization``, keeps one copy of the
    shape / position arithmetic and reads the per-layer inputs with one ``Split``; the build's parity check (above) ran on this graph."""
    from collections import Counter

    _, out = built
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    types = Counter((n.domain, n.op_type) for n in model.graph.node)
    rotary = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    # a query rotation per layer, a key rotation per layer computing its own K (KV-sharing consumers
    # read their producer's rotated cache): gemma4-e2b:tiny has 10 layers, 5 of them consumers; a
    # GroupQueryAttention takes both of its layer's (do_rotary over the same tables)
    plan = json.loads((out / "effexport.json").read_text())["cache_plan"]
    owners = sum(1 for r in plan["layers"] if r["role"] != "consumer")
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and all(any(a.name == "do_rotary" and a.i == 1 for a in n.attribute) for n in gqa)
    assert len(rotary) == len(plan["layers"]) + owners - 2 * len(gqa)
    assert all(n.domain == "com.microsoft" for n in rotary)
    assert not {"Neg", "Cos", "Sin"} & {t for _, t in types}
    # the only Split is the per-layer inputs' (one row per decoder layer, instead of a Gather per
    # layer): no rotate-half Split is left
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    assert len(splits) == 1 and len(splits[0].output) == len(plan["layers"])
    assert types[("com.microsoft", "SkipSimplifiedLayerNormalization")] > 0
    # one position arithmetic for every layer (per-layer copies would be one Range per layer at least)
    assert types[("", "Range")] < len(plan["layers"]) // 2
    tables = {n.input[2] for n in rotary} | {n.input[3] for n in rotary} | {n.input[i] for n in gqa for i in (7, 8)}
    init = {t.name: t for t in model.graph.initializer}
    assert tables <= set(init) and all(init[t].dims[0] == 64 for t in tables)


def _gqa_total_crossings(model: onnx.ModelProto) -> list:
    """The values ONNX Runtime's CUDA EP would copy into a GroupQueryAttention input by a Memcpy node
    as its ``total_sequence_length`` (:func:`~effexport.exporter.backends.onnx.cuda_kernels.memcpy_edges`:
    the partitioning simulated offline): a total computed on the GPU, copied to the host mid-graph."""
    from effexport.exporter.backends.onnx.cuda_kernels import memcpy_edges

    totals = {n.input[6] for n in model.graph.node if n.op_type == "GroupQueryAttention" and len(n.input) > 6}
    return [e for e in memcpy_edges(model) if e.consumer_op == "GroupQueryAttention" and e.value in totals]


def _with_total_from_pos_host(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the total computed as the previous lowering did for one-token graphs,
    ``Cast(Max(Min(pos_host + 1, C), C))`` (the gpu test's 1.50)."""
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    g.input.append(helper.make_tensor_value_info("pos_host", TensorProto.INT64, []))
    g.initializer.extend([helper.make_tensor("one_", TensorProto.INT64, [], [1]),
                          helper.make_tensor("cap_", TensorProto.INT64, [], [C])])
    gqa = next(n for n in g.node if n.op_type == "GroupQueryAttention")
    chain = [helper.make_node("Add", ["pos_host", "one_"], ["t1_"], name="t1"),
             helper.make_node("Min", ["t1_", "cap_"], ["t2_"], name="t2"),
             helper.make_node("Max", ["t2_", "cap_"], ["t3_"], name="t3"),
             helper.make_node("Cast", ["t3_"], ["t4_"], to=TensorProto.INT32, name="t4")]
    at = list(g.node).index(gqa)
    for k, node in enumerate(chain):
        g.node.insert(at + k, node)
    gqa.input[6] = "t4_"
    return model


def test_one_token_graph_total_is_a_host_constant():
    """A graph of one-token steps (T static 1) gives GroupQueryAttention the capacity as an int32
    initializer, computed by no node (no ``pos_host`` input then). Computed from ``pos_host`` and
    constants -- the previous two lowerings, ``Where(true, C, pos_host + 1)`` and
    ``Max(Min(pos_host + 1, C), C)`` -- ONNX Runtime's CUDA EP ran that arithmetic on the GPU (its
    CPU fallback keeps a node on the host only where it reads a ``Shape``'s host output; a graph input
    does not count) and copied the total back to the kernel's host input by a Memcpy node: the gpu
    test below failed at 1.50 with both. The general lowering (T dynamic) reads T from a ``Shape``, so
    its total chain from ``pos_host`` stays on the host. Equal to the eager op on ORT CPU at several
    positions (fp32, rel 1e-5)."""
    from effexport.exporter.backends.onnx.export import lower

    module = _Buffer(0, 0.0, False)
    bt = {0: torch.export.Dim("batch")}
    for dtype in (torch.float32, torch.bfloat16):
        args = tuple(a.to(dtype) if a.is_floating_point() else a for a in _inputs(2, 1, 11, seed=3))
        model = lower(module, args, "ort", dynamic_shapes=(bt, bt, bt, bt, bt, None, None))
        gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        assert len(gqa) == 1
        init = {t.name: t for t in model.graph.initializer}
        total = init.get(gqa[0].input[6])
        assert total is not None and total.data_type == onnx.TensorProto.INT32
        assert onnx.numpy_helper.to_array(total).tolist() == C
        assert "pos_host" not in {i.name for i in model.graph.input}
        assert _gqa_total_crossings(model) == [], dtype
        # the previous lowering's graph: the simulated partitioning copies its total to the host
        old = _gqa_total_crossings(_with_total_from_pos_host(model))
        assert [(e.value, e.direction) for e in old] == [("t4_", "to host")], [str(e) for e in old]
    general = _lowered(module, "ort")  # T dynamic: the total is pos_host + T, or C at T = 1
    producer = {o: n for n in general.graph.node for o in n.output}
    seen, todo = set(), [next(n for n in general.graph.node if n.op_type == "GroupQueryAttention").input[6]]
    while todo:  # the total's ancestors
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(producer[name].input if name in producer else ())
    assert "pos_host" in seen and "Shape" in {producer[v].op_type for v in seen if v in producer}
    assert _gqa_total_crossings(general) == []
    fp32 = lower(module, _inputs(2, 1, 11, seed=3), "ort", dynamic_shapes=(bt, bt, bt, bt, bt, None, None))
    session = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
    for i, (b, pos) in enumerate([(2, 0), (1, 11), (3, C - 1)]):
        args = _inputs(b, 1, pos, seed=i + 1)
        want = module(*args)
        got = session.run(None, _feeds(fp32, args))
        assert_close(torch.from_numpy(got[0]), want[0], rtol=1e-5, what=f"out B={b} pos={pos}")
        for g, w in zip(got[1:], want[1:]):
            assert np.array_equal(g[:, :, :pos + 1], w[:, :, :pos + 1].numpy())


@pytest.mark.gpu
@pytest.mark.parametrize("wide", [False, True], ids=["gqa", "decomposed"])
def test_bf16_buffer_on_cuda_in_place(wide):
    """onnxruntime-gpu, bf16: the buffer step bound in place on the CUDA EP (GQA's shared buffer, or
    the ScatterND write + bf16 decomposition for heads GQA does not take) equals the eager op in fp32
    on the same bf16 inputs within the bf16 tolerance (2e-2 of the largest output), and writes the
    new rows into the bound buffer."""
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a GPU and onnxruntime-gpu")
    from effexport.exporter.backends.onnx.attention import GQA_MAX_HEAD_DIM
    from effexport.exporter.backends.onnx.export import lower

    d = GQA_MAX_HEAD_DIM * 2 if wide else 64
    module = _Buffer(0, 0.0, False)
    args = tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in _inputs(2, 1, 11, seed=3, d=d))
    bt = {0: torch.export.Dim("batch")}
    model = lower(module, args, "ort", dynamic_shapes=(bt, bt, bt, bt, bt, None, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    dev = [a.cuda() for a in args]
    k_buf, v_buf = dev[3].clone(), dev[4].clone()
    out = torch.empty(2, H, 1, d, dtype=torch.bfloat16, device="cuda")
    from effexport.exporter.backends.onnx.runtime import _bind

    binding = session.io_binding()
    # a one-token graph has no pos_host (its total is a constant: test_one_token_graph_total_is_a_host_constant);
    # where one is, its host copy must outlive the run (the binding holds its address, not the tensor)
    feeds = dict(zip(ARGS, dev), k_buf=k_buf, v_buf=v_buf, pos_host=dev[ARGS.index("pos")].cpu())
    for meta in session.get_inputs():
        _bind(binding.bind_input, meta.name, feeds[meta.name])
    for meta, buf in zip(session.get_outputs(), (out, k_buf, v_buf)):
        _bind(binding.bind_output, meta.name, buf)
    # the copies and clones above ran on torch's stream, which ONNX Runtime's stream does not wait for
    torch.cuda.synchronize()
    session.run_with_iobinding(binding)
    torch.cuda.synchronize()
    want, k_want, v_want = module(*(a.float() if a.is_floating_point() else a for a in args))
    err = ((out.float().cpu() - want).abs().max() / want.abs().max()).item()
    assert err < 2e-2, err
    assert torch.equal(k_buf[:, :, 11].cpu(), args[1][:, :, 0]) and torch.equal(v_buf[:, :, 11].cpu(), args[2][:, :, 0])
    assert torch.equal(k_buf[:, :, :11].cpu(), args[3][:, :, :11])  # the other rows untouched


# ------------------------------------------------------------------ the one-token decode graph
def _graph(out, name: str) -> onnx.ModelProto:
    return onnx.load(str(out / name), load_external_data=False)


def _ops(model: onnx.ModelProto) -> dict:
    from collections import Counter

    return Counter(n.op_type for n in model.graph.node)


def test_decode_graph_is_one_mha_per_prefix_read(built):
    """gemma4-e2b:tiny (sliding owners 0-3, full owner 4 with GroupQueryAttention, consumers 5-8 of
    ring 3 and 9 of buffer 4): ``decode.onnx`` reads the five consumers' caches and ring 3's own
    (slot layout: its consumers read it) with one MultiHeadAttention each -- 6, none in model.onnx --
    and has none of their MatMul / Softmax decompositions (6 Softmax in model.onnx, 0 here; 12 fewer
    MatMul); the four GroupQueryAttention stay. Fewer nodes (measured: 430 -> 383). Same inputs and
    outputs, names and shapes, but the new-token count: ``seq`` in model.onnx, 1 here."""
    _, out = built
    assert json.loads((out / "effexport.json").read_text())["files"] == {"step": "model.onnx", "decode": "decode.onnx"}
    general, decode = _graph(out, "model.onnx"), _graph(out, "decode.onnx")
    g, d = _ops(general), _ops(decode)
    assert (g["MultiHeadAttention"], d["MultiHeadAttention"]) == (0, 6)
    assert (g["Softmax"], d["Softmax"]) == (6, 0) and g["MatMul"] - d["MatMul"] == 12
    assert g["GroupQueryAttention"] == d["GroupQueryAttention"] == 4
    assert len(decode.graph.node) < len(general.graph.node) - 40
    # one token and one KV head: every heads <-> tokens transpose moves an axis of size 1 and is a
    # reshape (ort_fusions' layout rules), so none is left to launch a kernel (model.onnx: 15)
    assert d["Transpose"] == 0 and g["Transpose"] > 0
    mha = [n for n in decode.graph.node if n.op_type == "MultiHeadAttention"]
    # the caches as the producers left them this step, read in place: ring 3 by its owner and consumers
    # 5-8, buffer 4 by consumer 9
    assert sorted(n.input[1] for n in mha) == ["present.3.k"] * 5 + ["present.4.k"]
    assert all(n.input[4] for n in mha)  # key_padding_mask: the prefix length per row

    def io(model):
        def dims(v):
            return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        return ([(v.name, v.type.tensor_type.elem_type, dims(v)) for v in model.graph.input],
                [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in model.graph.output])
    (gi, go), (di, do) = io(general), io(decode)
    assert [x[:2] for x in gi] == [x[:2] for x in di] and [x[:2] for x in go] == [x[:2] for x in do]
    for (name, _, a), (_, _, b) in zip(gi + go, di + do):
        if name in ("input_ids", "logits"):
            assert (a[1], b[1]) == ("seq", 1) and a[:1] + a[2:] == b[:1] + b[2:], name
        else:
            assert a == b, name
    meta = [{p.key: p.value for p in m.metadata_props} for m in (general, decode)]
    assert all(m["effexport.in_place"] == meta[0]["effexport.in_place"] for m in meta)
    assert meta[1]["effexport.device_positions"] == "true"


def test_step_graphs_read_gqa_totals_on_the_host(built):
    """gemma4-e2b:tiny: no GroupQueryAttention of model.onnx or decode.onnx gets a
    ``total_sequence_length`` ONNX Runtime's CUDA EP would compute on the GPU and copy to the host
    (:func:`_gqa_total_crossings`; main's decode.onnx had four: the three windowed caches' and the
    buffer's). decode.onnx's (T static 1) are int32 initializers: the capacity, 64, for the buffer and
    for the windowed caches alike (an upper bound of ``pos + 1``; the window, 8, until run 39: ONNX
    Runtime 1.31.1's CUDA kernel computes a windowed cache wrong once ``pos + 1`` passes the total)."""
    _, out = built
    general, decode = _graph(out, "model.onnx"), _graph(out, "decode.onnx")
    assert _gqa_total_crossings(general) == [] and _gqa_total_crossings(decode) == []
    init = {t.name: t for t in decode.graph.initializer}
    totals = [n.input[6] for n in decode.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(totals) == 4 and all(t in init and init[t].data_type == onnx.TensorProto.INT32 for t in totals)
    assert sorted(int(onnx.numpy_helper.to_array(init[t])) for t in totals) == [64, 64, 64, 64]


def test_decode_graph_references_the_step_weights(built):
    """No second copy of the weights: decode.onnx has no data file of its own, and every external
    initializer it has is one of model.onnx's, same name, file, offset and length."""
    _, out = built

    def external(model):
        return {t.name: tuple((e.key, e.value) for e in t.external_data) for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    general, decode = external(_graph(out, "model.onnx")), external(_graph(out, "decode.onnx"))
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".data")) == ["model.onnx.data"]
    assert decode and set(decode.values()) <= set(general.values())
    assert all(general[name] == ref for name, ref in decode.items() if name in general)  # a name: one tensor
    assert len(set(decode.values())) == len(decode)
    inline = sum(t.ByteSize() for t in _graph(out, "decode.onnx").graph.initializer)
    assert inline < 64 * 1024


def test_build_parity_ran_the_decode_graph(built):
    report = json.loads((built[1] / "report.json").read_text())["parity"]
    assert report["passed"] and report["graphs"] == {"prefill": "model.onnx", "decode": "decode.onnx"}


def test_decode_graph_equals_eager_and_the_step_graph(built, rewritten):
    """Prefill 5 tokens through model.onnx at batch 2, then 12 one-token steps (positions 5..16: the
    8-slot ring wraps) through decode.onnx: logits equal the eager model's and model.onnx's own for
    the same steps (fp32, rel 1e-5), greedy tokens identical; the runtime ran decode.onnx for each
    one-token step and shares every external weight between its two sessions (one OrtValue per
    tensor, handed to both through ``SessionOptions.add_initializer``)."""
    from effexport.exporter.backends.onnx.runtime import OrtRuntime

    _, out = built
    model = rewritten("gemma4-e2b:tiny").model
    runtime, general = OrtRuntime(str(out)), OrtRuntime(str(out))
    general.decode_session = None  # model.onnx for every step
    ids = torch.from_numpy(np.random.RandomState(5).randint(0, 128, (2, 5)))
    with torch.no_grad():
        want, past = model(ids)
    a = runtime.step(ids.numpy(), 0, runtime.initial_caches(2))
    b = general.step(ids.numpy(), 0, general.initial_caches(2))
    assert runtime.last_graph == "model.onnx"
    token = want[:, -1:].argmax(-1)
    for pos in range(5, 17):
        with torch.no_grad():
            want, past = model(token, past)
        a = runtime.step(token.numpy(), pos, a.caches)
        b = general.step(token.numpy(), pos, b.caches)
        assert (runtime.last_graph, general.last_graph) == ("decode.onnx", "model.onnx")
        assert_close(torch.from_numpy(a.logits), want, rtol=1e-5, what=f"decode.onnx vs eager at {pos}")
        assert_close(torch.from_numpy(a.logits), torch.from_numpy(b.logits), rtol=1e-5, what=f"vs model.onnx at {pos}")
        token = want[:, -1:].argmax(-1)
        assert torch.equal(torch.from_numpy(a.logits[:, -1:].argmax(-1)), token)

    external = {}
    for name in ("model.onnx", "decode.onnx"):
        for t in _graph(out, name).graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                external[t.name] = {e.key: e.value for e in t.external_data}["offset"]
    assert set(runtime.weights) == set(external)  # every external weight given to the sessions
    by_offset = {}
    for name, value in runtime.weights.items():
        by_offset.setdefault(external[name], set()).add(id(value))
    assert all(len(ids) == 1 for ids in by_offset.values())  # one value per tensor of the data file


def test_decode_graph_only_where_it_differs(rewritten):
    """A model without KV sharing whose full caches GroupQueryAttention takes (Laguna: sliding and
    full layers, head 16) gets no decode graph (:func:`~.backend.mha_candidates`): at T = 1 it would
    lower the same nodes. Gemma 4 E2B (consumers) gets one."""
    from effexport.exporter.backends.onnx.backend import mha_candidates
    from effexport.passes.pipeline import run_pipeline

    for name, expected in (("laguna-xs2:tiny", False), ("gemma4-e2b:tiny", True)):
        _, analysis = run_pipeline(rewritten(name).captured, max_context=64, cache_layout="buffer")
        assert mha_candidates(analysis.plan) is expected, name


def test_one_token_graph_reads_a_wide_buffer_with_multihead_attention():
    """In the decode graph (``one_token_graph``), a buffer owner whose head size GroupQueryAttention
    does not take (here 320, as Gemma 4's 512) writes its row by ScatterND and attends with one
    MultiHeadAttention over the written buffer (``key_padding_mask = pos + 1``; 2 KV heads folded
    into the query rows) instead of the MatMul / Softmax decomposition; equal to the eager op on ORT
    CPU (fp32, rel 1e-5) at positions 0, 6 and the last row, rows after pos random. The general
    lowering of the same one-token module keeps the decomposition."""
    from effexport.exporter.backends.onnx.attention import GQA_MAX_HEAD_DIM, one_token_graph
    from effexport.exporter.backends.onnx.export import lower

    d = GQA_MAX_HEAD_DIM + 64
    module, bt = _Buffer(0, 0.0, False), {0: torch.export.Dim("batch")}
    with one_token_graph():
        model = lower(module, _inputs(2, 1, 5, d=d), "ort", dynamic_shapes=(bt, bt, bt, bt, bt, None, None))
    general = lower(module, _inputs(2, 1, 5, d=d), "ort", dynamic_shapes=(bt, bt, bt, bt, bt, None, None))
    ops_ = [n.op_type for n in model.graph.node]
    assert ops_.count("MultiHeadAttention") == 1 and "Softmax" not in ops_ and "MatMul" not in ops_
    assert "MultiHeadAttention" not in [n.op_type for n in general.graph.node]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for i, (b, pos) in enumerate([(2, 0), (1, 6), (3, C - 1)]):
        args = _inputs(b, 1, pos, seed=i + 4, d=d)
        want = module(*args)
        got = session.run(None, _feeds(model, args))
        assert_close(torch.from_numpy(got[0]), want[0], rtol=1e-5, what=f"out B={b} pos={pos}")
        for g, w in zip(got[1:], want[1:]):
            assert np.array_equal(g[:, :, :pos + 1], w[:, :, :pos + 1].numpy())
