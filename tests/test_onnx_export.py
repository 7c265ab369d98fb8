"""End-to-end ONNX export of rewritten step graphs (``export_step``) for every tiny preset (Gemma 4
E2B/E4B, Laguna XS.2, ZAYA1, DeepSeek V4 Flash), every profile: ONNX Runtime prefill of 37 tokens
from the plan's empty caches plus 12 decode steps equal the eager model's logits (the prefill is
longer than every window and holds more compressed entries than every top-k, a compressed block of
each ratio completes during the decode steps: ``_helpers.assert_long_enough``; the token stream is
drawn apart from the capture's example ids); the graph's cache I/O is
exactly the CachePlan; the IR version is the one ORT 1.30 loads; one effexport-domain node (with a
model-local function body) per rewritten non-attention op; external data round-trips. Each model
is captured once (session fixture) and exported once per profile."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from _helpers import assert_close, assert_long_enough, assert_sinkhorn_unrolled, control_flow, step_feeds

import effexport.custom_ops  # noqa: F401  (registers the ops named below)
from effexport.exporter.backends.onnx.export import _save, export_step, step_io_names
from effexport.exporter.backends.onnx.profiles import ORT_PROFILES, PROFILES
from effexport.exporter.backends.onnx.translations import translation_table
from effexport.exporter.backends.artifact import MANIFEST
from effexport.exporter.backends.onnx.runtime import OrtRuntime

pytestmark = pytest.mark.slow
XDIST_SPLIT = ("step",)  # one pytest-xdist unit per parameter value (tests/conftest.py)
# the tiny presets' capture length less its 3 new tokens (samples._spec.capture_length); the last of
# the 12 steps completes DeepSeek tiny's third HCA block (ratio 16)
PREFILL, DECODE, BATCH = 37, 12, 2
MODELS = [pytest.param(name, id=name.split(":")[0]) for name in
          ("gemma4-e2b:tiny", "gemma4-e4b:tiny", "laguna-xs2:tiny", "zaya1-8b:tiny", "deepseek-v4-flash:tiny")]
ATTENTION_OPS = {torch.ops.effexport.attention.default, torch.ops.effexport.attention_cache.default,
                 torch.ops.effexport.attention_read.default}


@pytest.fixture(scope="module", params=MODELS)
def step(request, rewritten):
    """(eager model, rewritten program, analysis) of one sample: the session's shared capture."""
    shared = rewritten(request.param)
    assert_long_enough(shared.sample.config.layer_specs(), PREFILL, DECODE)
    return shared.model, shared.program, shared.analysis, shared.sample.config.vocab_size


class _Exports(dict):
    """profile -> (path, returned ModelProto) of the current model, exported on first use (tests
    of a profile that is skipped export nothing)."""

    def __init__(self, step, tmp_path_factory):
        super().__init__()
        self.step, self.tmp = step, tmp_path_factory

    def __missing__(self, profile: str):
        _, program, analysis, _ = self.step
        path = self.tmp.mktemp(profile) / "step.onnx"
        self[profile] = (path, export_step(program, analysis.plan, str(path), profile))
        return self[profile]


@pytest.fixture(scope="module")
def exported(step, tmp_path_factory):
    """profile -> (path, returned ModelProto) for the current model."""
    return _Exports(step, tmp_path_factory)


def _decode(path, plan, ids: torch.Tensor) -> list[np.ndarray]:
    """Prefill ``PREFILL`` tokens at pos 0 from the plan's empty caches, then one token per step."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    caches = [c.numpy() for c in plan.empty_caches(ids.shape[0])]
    out = sess.run(None, step_feeds(sess, ids[:, :PREFILL].numpy(), 0, caches))
    logits = [out[0]]
    for t in range(PREFILL, PREFILL + DECODE):
        out = sess.run(None, step_feeds(sess, ids[:, t:t + 1].numpy(), t, out[1:]))
        logits.append(out[0])
    return logits


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_prefill_and_decode_match_eager(step, exported, profile):
    """fp32 max rel error <= 1e-4 over the prefill and each of the decode steps."""
    model, _, analysis, vocab = step
    ids = torch.randint(0, vocab, (BATCH, PREFILL + DECODE), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref, _ = model(ids)
    logits = _decode(exported[profile][0], analysis.plan, ids)
    assert_close(torch.from_numpy(logits[0]), ref[:, :PREFILL], rtol=1e-4, what=f"{profile} prefill")
    for i, step_logits in enumerate(logits[1:]):
        assert_close(torch.from_numpy(step_logits[:, 0]), ref[:, PREFILL + i], rtol=1e-4,
                     what=f"{profile} decode step {i}")


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_cache_io_is_the_plan(step, exported, profile):
    """Inputs are input_ids, pos and past.{entry} in plan order; rings have W static slots, full
    caches a dynamic length; outputs mirror them."""
    _, _, analysis, _ = step
    model = exported[profile][1]
    inputs, outputs = step_io_names(analysis.plan)
    graph_inputs = [i for i in model.graph.input if i.name != "pos_host"]  # ort: GQA's host position
    assert [i.name for i in graph_inputs] == inputs
    assert [o.name for o in model.graph.output] == outputs
    assert ("pos_host" in [i.name for i in model.graph.input]) == (
        profile == "ort" and any(n.op_type == "GroupQueryAttention" and n.input[6].endswith("_host")
                                 for n in model.graph.node))
    for entry, value in zip(analysis.plan.entries, graph_inputs[2:]):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
        for d, want in zip(dims, entry.shape):
            if want == "seq":
                assert d.dim_param == "past_seq", entry
            elif isinstance(want, int):
                assert d.dim_value == want, entry
        if entry.kind == "ring":
            assert entry.window > 0 and entry.window in [d.dim_value for d in dims]
        if entry.kind != "full":  # rings, compressed buffers and states have static shapes
            assert all(d.dim_value > 0 for d in dims[1:]), entry


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_pos_is_read_on_the_device_only(step, exported, profile):
    """No input ONNX Runtime's CUDA kernels read on the host (Range bounds, Slice ends, shapes,
    axes) is computed from ``pos``: a runtime may keep ``pos`` in device memory and replay the step
    from a CUDA graph. The model's metadata says so."""
    from effexport.exporter.backends.onnx.export import DEVICE_POSITIONS
    from effexport.exporter.backends.onnx.host_positions import host_reads

    model = exported[profile][1]
    assert host_reads(ir.from_proto(model)) == []
    assert {p.key: p.value for p in model.metadata_props}[DEVICE_POSITIONS] == "true"


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_ir_version_and_domains(step, exported, profile):
    """The file has the profile's IR version (<= 11, which ORT 1.30 loads), passes the checker,
    and only the ort profile uses the com.microsoft domain (GroupQueryAttention for full caches;
    DeepSeek V4 has only compressed / windowed attention, which no contrib op covers)."""
    _, program, _, _ = step
    path, model = exported[profile]
    saved = onnx.load(str(path))
    assert saved.ir_version == PROFILES[profile].ir_version <= 11
    onnx.checker.check_model(saved)
    types = {(n.domain, n.op_type) for n in saved.graph.node}
    gqa_sites = any(n.op == "call_function" and n.target in ATTENTION_OPS for n in program.gm.graph.nodes)
    assert (("com.microsoft", "GroupQueryAttention") in types) == (profile == "ort" and gqa_sites)
    # no baked mask: no boolean tensor of rank >= 2 among initializers or Constant nodes
    tensors = list(saved.graph.initializer) + [a.t for n in saved.graph.node if n.op_type == "Constant"
                                              for a in n.attribute if a.name == "value"]
    assert not [t.name for t in tensors if t.data_type == onnx.TensorProto.BOOL and len(t.dims) >= 2]
    if profile == "standard":
        assert {d for d, _ in types} <= {"", "ai.onnx", "effexport"}


def test_tensorrt_profile_lints_clean(step, exported):
    """The ``tensorrt`` profile of every tiny preset uses only what the TensorRT 10 ONNX parser
    accepts (exporter/backends/onnx/tensorrt_profile.py: support matrix, restrictions, dtypes, opset / IR,
    unique function names, strict shape inference); its ORT parity is the test above."""
    from effexport.exporter.backends.onnx import tensorrt_profile as tp

    _, model = exported["tensorrt"]
    assert tp.lint(tp.make_parser_safe(model)) == []


LOCAL_OPS = {op: op.name().split("::")[1].split(".")[0] for op in translation_table("ort")
             if op not in ATTENTION_OPS | {torch.ops.effexport.attention_ring.default}}
"""The ops kept as effexport-domain nodes (everything but attention) -> their ONNX op type."""
EXPECTED_LOCAL = {"zaya1": {"cca"}, "deepseek": {"kv_compress_step", "indexer_topk", "sparse_attention",
                                                   "mhc_pre", "mhc_post", "mhc_head"}}


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_effexport_nodes_are_the_rewrites(step, exported, profile, request):
    """One effexport-domain node per rewritten call of a non-attention op (CCA for ZAYA1; compressor,
    indexer, sparse attention and mHC for DeepSeek V4; none for Gemma 4 / Laguna), each with its
    static parameters as attributes and a model-local function body of standard ops; the bodies
    are not also inlined (no Loop or Conv in the main graph)."""
    _, program, _, _ = step
    model = onnx.load(str(exported[profile][0]))
    rewrites = Counter(LOCAL_OPS[n.target] for n in program.gm.graph.nodes
                       if n.op == "call_function" and n.target in LOCAL_OPS)
    nodes = [n for n in model.graph.node if n.domain == "effexport"]
    assert Counter(n.op_type for n in nodes) == rewrites
    assert set(rewrites) == EXPECTED_LOCAL.get(request.node.callspec.params["step"].split("-")[0], set())
    bodies = {(f.domain, f.name, f.overload): f for f in model.functions}
    for n in nodes:
        body = bodies[n.domain, n.op_type, n.overload]
        assert body.node and all(m.domain in ("", "ai.onnx") for m in body.node), n.op_type
        assert set(body.attribute) == {a.name for a in n.attribute}, n.op_type
    assert not {"Loop", "Conv"} & {n.op_type for n in model.graph.node}


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_no_control_flow(exported, profile):
    """No Loop / Scan / If in the main graph or any function body (ONNX Runtime inlines the bodies,
    and its CUDA EP refuses a CUDA-graph capture with control flow: issue #20); DeepSeek V4's
    ``mhc_pre`` bodies are Sinkhorn unrolled for their ``iters`` (an mhc_pre per mhc_post)."""
    model = onnx.load(str(exported[profile][0]))
    assert control_flow(model) == []
    assert assert_sinkhorn_unrolled(model) == sum(n.op_type == "mhc_post" for n in model.graph.node)


def test_external_data_round_trip(step, exported, tmp_path):
    """Weights written as external data load back and give the same logits."""
    _, _, analysis, vocab = step
    path = tmp_path / "ext" / "step.onnx"
    _save(onnx.load(str(exported["ort"][0])), path, external=True)
    assert (path.parent / "step.onnx.data").stat().st_size > 0
    inline = [t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() > 4096]
    assert not inline, f"large initializers kept inline: {inline[:3]}"
    ids = torch.randint(0, vocab, (BATCH, PREFILL + DECODE), generator=torch.Generator().manual_seed(2))
    np.testing.assert_array_equal(_decode(path, analysis.plan, ids)[-1],
                                  _decode(exported["ort"][0], analysis.plan, ids)[-1])


CHUNK = 3


def test_runtime_chunk_on_a_cache_at_batch_2(step, exported, tmp_path):
    """``effexport.runtime`` feeds a 3-token chunk after an 8-token prefill at batch 2 (ort
    profile) and its logits, and the next decode step's, equal eager (rel 1e-4). ORT's CPU
    GroupQueryAttention refuses that chunk in one batched call ("batch_size must be 1 ..."): where
    the model has GQA, the batched call either raises that error or agrees with the runtime."""
    model, _, analysis, vocab = step
    path = exported["ort"][0]
    inputs, outputs = [i.name for i in exported["ort"][1].graph.input], step_io_names(analysis.plan)[1]
    shutil.copyfile(path, tmp_path / "model.onnx")  # a copy: an artifact's files must lie inside it
    (tmp_path / MANIFEST).write_text(json.dumps({
        "target": "onnx", "profile": "ort", "files": {"step": "model.onnx"}, "inputs": inputs,
        "outputs": outputs, "cache_plan": analysis.plan.to_json()}))
    runtime = OrtRuntime(str(tmp_path))
    ids = torch.randint(0, vocab, (BATCH, PREFILL + CHUNK + 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = model(ids)
    first = runtime.step(ids[:, :PREFILL].numpy(), 0, runtime.initial_caches(BATCH))
    chunk = runtime.step(ids[:, PREFILL:PREFILL + CHUNK].numpy(), PREFILL, first.caches)
    assert_close(torch.from_numpy(chunk.logits), ref[:, PREFILL:PREFILL + CHUNK], rtol=1e-4, what="chunk")
    nxt = runtime.step(ids[:, -1:].numpy(), PREFILL + CHUNK, chunk.caches)
    assert_close(torch.from_numpy(nxt.logits[:, 0]), ref[:, -1], rtol=1e-4, what="decode after the chunk")
    try:
        batched = runtime._run(ids[:, PREFILL:PREFILL + CHUNK].numpy(), PREFILL, first.caches)
    except Exception as exc:  # onnxruntime's InvalidArgument
        assert "batch_size must be 1" in str(exc)
        assert any(n.op_type == "GroupQueryAttention" for n in exported["ort"][1].graph.node)
    else:
        np.testing.assert_allclose(batched.logits, chunk.logits, rtol=1e-5, atol=1e-5)


def test_runtime_io_binding_keeps_caches_as_ort_values(step, exported, tmp_path):
    """With I/O binding (the CUDA path; here on CPU) caches stay ``OrtValue`` tensors between steps
    (torch tensors bound in place for the caches the model lists as in place) and every step's
    logits equal the plain numpy path's bit for bit."""
    import onnxruntime as ort

    _, _, analysis, vocab = step
    inputs, outputs = [i.name for i in exported["ort"][1].graph.input], step_io_names(analysis.plan)[1]
    shutil.copyfile(exported["ort"][0], tmp_path / "model.onnx")
    (tmp_path / MANIFEST).write_text(json.dumps({
        "target": "onnx", "profile": "ort", "files": {"step": "model.onnx"}, "inputs": inputs,
        "outputs": outputs, "cache_plan": analysis.plan.to_json()}))
    plain, bound = OrtRuntime(str(tmp_path)), OrtRuntime(str(tmp_path), io_binding=True)
    ids = torch.randint(0, vocab, (BATCH, PREFILL + CHUNK + 4), generator=torch.Generator().manual_seed(4)).numpy()
    a = plain.step(ids[:, :PREFILL], 0, plain.initial_caches(BATCH))
    b = bound.step(ids[:, :PREFILL], 0, bound.initial_caches(BATCH))
    for pos in [PREFILL, *range(PREFILL + CHUNK, ids.shape[1])]:  # a chunk (row-by-row path), then decode
        end = pos + (CHUNK if pos == PREFILL else 1)
        a, b = plain.step(ids[:, pos:end], pos, a.caches), bound.step(ids[:, pos:end], pos, b.caches)
        # in-place caches (buffers, GQA windowed caches) are device tensors bound as past and present
        assert all(isinstance(c, torch.Tensor) if in_place else isinstance(c, ort.OrtValue)
                   for c, in_place in zip(b.caches, bound.in_place))
        np.testing.assert_array_equal(b.logits, a.logits)
        for x, y in zip(b.caches, a.caches):
            np.testing.assert_array_equal(x.numpy(), y)


def _power_nodes(model: onnx.ModelProto, exponent: float) -> list:
    """``Pow(x, exponent)`` nodes of the main graph (exponent an initializer or Constant scalar)."""
    consts = {t.name: t for t in model.graph.initializer}
    consts.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    return [n for n in model.graph.node if n.op_type == "Pow" and n.input[1] in consts
            and onnx.numpy_helper.to_array(consts[n.input[1]]).size == 1
            and float(onnx.numpy_helper.to_array(consts[n.input[1]])) == exponent]


def test_ort_profile_fuses_every_rms_norm_and_tanh_gelu(step, exported):
    """Every RMSNorm the standard profile spells out (``Pow(x, 2) -> ReduceMean``) is one
    ``SimplifiedLayerNormalization`` node in the ort profile (or, after a residual add, one
    ``SkipSimplifiedLayerNormalization``), every tanh GELU of the step graph one
    ``FastGelu``, and none is left unfused there (ORT on CUDA is launch-bound: BENCHMARKS.md runs 5-10)."""
    _, program, _, _ = step
    ort_model, standard = onnx.load(str(exported["ort"][0])), onnx.load(str(exported["standard"][0]))
    types = [(n.domain, n.op_type) for n in ort_model.graph.node]
    norms = [n for n in _power_nodes(standard, 2.0)
             if any(c.op_type == "ReduceMean" and n.output[0] in c.input for c in standard.graph.node)]
    gelus = [n for n in program.gm.graph.nodes if n.op == "call_function"
             and n.target == torch.ops.aten.gelu.default and n.kwargs.get("approximate") == "tanh"]
    assert norms, "every tiny preset has RMS norms"
    # a norm of a residual sum is the add's SkipSimplifiedLayerNormalization (exporter/onnx/ort_fusions.py)
    assert types.count(("", "SimplifiedLayerNormalization")) \
        + types.count(("com.microsoft", "SkipSimplifiedLayerNormalization")) == len(norms)
    assert types.count(("com.microsoft", "FastGelu")) == len(gelus)
    assert not _power_nodes(ort_model, 2.0) and not _power_nodes(ort_model, 3.0)
    assert len(ort_model.graph.node) < len(standard.graph.node)


def test_ort_profile_runs_routed_experts_as_moe(step, exported):
    """Every layer's stacked routed experts (Laguna's sparse layers, every ZAYA1 and DeepSeek V4 layer,
    hash-routed ones included) are one ``com.microsoft.MoE`` in the ort profile, and nothing but MoE
    reads the expert weights (no dense compute of every expert is left); the standard profile keeps
    them decomposed. Numbers: test_prefill_and_decode_match_eager (ort), against eager."""
    from effexport.samples._blocks import StackedExperts

    model = step[0]
    routed = sum(isinstance(m, StackedExperts) for m in model.modules())
    ort_model, standard = exported["ort"][1], exported["standard"][1]
    moe = [n for n in ort_model.graph.node if n.op_type == "MoE"]
    assert len(moe) == routed and all(n.domain == "com.microsoft" for n in moe)
    assert not any(n.op_type == "MoE" for n in standard.graph.node)
    readers = Counter(n.op_type for n in ort_model.graph.node for name in n.input if name.endswith("experts.down"))
    assert set(readers) <= {"MoE"} and sum(readers.values()) == routed
