"""``--dtype bf16|fp16`` builds (``--target onnx``): the artifact is captured and lowered in half
precision; its parity runs on ONNX Runtime's CUDA EP when there is one, otherwise through an fp32
twin of the same rewritten graph checked on the CPU, whose op structure must equal the artifact's.

This machine has no CUDA EP: the twin path runs here; the CUDA path is a ``gpu`` test."""
from __future__ import annotations

import json

import onnx
import pytest
from _helpers import assert_sinkhorn_unrolled, control_flow, tiny_gemma3
from onnx import TensorProto, helper

from effexport.exporter.backends.onnx.cuda_kernels import memcpy_edges, unsupported_nodes
from effexport.exporter.cli import main

TINY = "gemma4-e2b:tiny"


def _model(path, ops: list[str]) -> str:
    """A chain ``x -> op -> op ... -> y`` of unary ops (structure only), saved at ``path``."""
    names = ["x"] + [f"t{i}" for i in range(len(ops) - 1)] + ["y"]
    nodes = [helper.make_node(op, [names[i]], [names[i + 1]]) for i, op in enumerate(ops)]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [vi("x")], [vi("y")])), str(path))
    return str(path)


def test_compare_structure(tmp_path):
    """Same op types and counts (Casts aside) -> ""; a different count or type -> named."""
    from effexport.exporter.verify.parity import compare_structure

    a = _model(tmp_path / "a.onnx", ["Relu", "Cast", "Tanh"])
    assert compare_structure(a, _model(tmp_path / "b.onnx", ["Relu", "Tanh"])) == ""
    assert compare_structure(a, _model(tmp_path / "c.onnx", ["Relu", "Relu", "Tanh"])) == "ai.onnx::Relu 1 vs 2"
    assert compare_structure(a, _model(tmp_path / "d.onnx", ["Relu", "Sigmoid"])) == \
        "ai.onnx::Sigmoid 0 vs 1, ai.onnx::Tanh 1 vs 0"


def test_compare_structure_reads_a_clip_as_its_max_and_min(tmp_path):
    """The optimizer folds ``Min(Max(x, lo), hi)`` into ``Clip`` only where it reads both bounds as
    constants (an fp32 twin: yes; bf16: not always), so a Clip counts as the Max / Min of its bounds."""
    from effexport.exporter.verify.parity import compare_structure

    def clip_model(path, bounds):
        inits = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("lo", -1.0), ("hi", 1.0))]
        node = helper.make_node("Clip", ["x", *bounds], ["y"])
        vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
        onnx.save(helper.make_model(helper.make_graph([node], "g", [vi("x")], [vi("y")], inits)), str(path))
        return str(path)

    both, upper = clip_model(tmp_path / "both.onnx", ["lo", "hi"]), clip_model(tmp_path / "upper.onnx", ["", "hi"])
    assert compare_structure(both, _model(tmp_path / "mm.onnx", ["Max", "Min"])) == ""
    assert compare_structure(upper, _model(tmp_path / "m.onnx", ["Min"])) == ""
    assert compare_structure(upper, _model(tmp_path / "mx.onnx", ["Max"])) == "ai.onnx::Max 0 vs 1, ai.onnx::Min 1 vs 0"


def test_compare_structure_reads_a_skip_norm_as_its_add_and_norm(tmp_path):
    """A half-precision model that keeps its residual stream in fp32 (ZAYA1) has ``Add -> Cast ->
    norm``, which ``SkipSimplifiedLayerNormalization`` (one type for sum and output) cannot fuse where
    the fp32 twin does: a skip norm counts as its residual Add (two with a bias) and the norm."""
    from effexport.exporter.verify.parity import compare_structure

    def graph(path, nodes, inputs):
        vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
        gamma = helper.make_tensor("g", TensorProto.FLOAT, [2], [1.0, 1.0])
        model = helper.make_model(helper.make_graph(nodes, "g", [vi(n) for n in inputs], [vi("y")], [gamma]),
                                  opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
        onnx.save(model, str(path))
        return str(path)

    norm = dict(axis=-1, epsilon=1e-6)
    fused = graph(tmp_path / "f.onnx", [helper.make_node("SkipSimplifiedLayerNormalization", ["a", "b", "g"], ["y"],
                                                         domain="com.microsoft", epsilon=1e-6)], ["a", "b"])
    apart = graph(tmp_path / "a.onnx", [helper.make_node("Add", ["a", "b"], ["s"]),
                                        helper.make_node("Cast", ["s"], ["c"], to=TensorProto.FLOAT),
                                        helper.make_node("SimplifiedLayerNormalization", ["c", "g"], ["y"], **norm)],
                  ["a", "b"])
    assert compare_structure(apart, fused) == ""
    biased = graph(tmp_path / "b.onnx", [helper.make_node("SkipSimplifiedLayerNormalization", ["a", "b", "g", "c"],
                                                          ["y"], domain="com.microsoft", epsilon=1e-6)], ["a", "b", "c"])
    assert compare_structure(apart, biased) == "ai.onnx::Add 1 vs 2"


@pytest.mark.parametrize("preset", [
    "deepseek-v4-flash:tiny",
    "zaya1-8b:tiny"])  # its bf16 graph fuses 3 residual adds (fp32 residual stream), its twin 11: equal structure
def test_bf16_graph_is_well_typed(tmp_path, preset):
    """A bf16 build of the families with effexport-domain ops (ZAYA1's CCA body with its Convs,
    DeepSeek V4's grouped output projection, an Einsum) passes ONNX Runtime's type checks: the CPU
    EP may lack bf16 kernels (NOT_IMPLEMENTED), but the graph must not be refused as invalid (ONNX's
    Conv and Einsum have no bf16 type: the CCA convs run in fp32 between casts, the grouped
    projection is a MatMul); then its fp32 twin's parity and structure pass the build."""
    import onnxruntime as ort

    out = tmp_path / "out"
    code = main([preset, "--target", "onnx", "--dtype", "bf16", "--kv-cache", "buffer", "--max-context", "64",
                 "-o", str(out), "--steps", "2"])
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not [n for n in model.graph.node if n.op_type == "Einsum"]
    # ONNX Runtime's CUDA graphs refuse control flow (issue #20): the bf16 mHC bodies are unrolled too
    assert control_flow(model) == []
    assert assert_sinkhorn_unrolled(model) == sum(n.op_type == "mhc_post" for n in model.graph.node)
    # ONNX Runtime's CUDA Reciprocal has no bf16 kernel (ZAYA1's bf16 graph did not load on the GPU):
    # the CCA body divides instead
    assert not [n for f in model.functions if f.name == "cca" for n in f.node if n.op_type == "Reciprocal"]
    # every node has a CUDA kernel and none is joined to the device part by a copy: ORT's CUDA graph
    # capture refused the DeepSeek graph (tests/test_cuda_placement.py says how this is read offline)
    assert [str(u) for u in unsupported_nodes(model)] == []
    assert [str(c) for c in memcpy_edges(model)] == []
    try:
        ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  (onnxruntime's error classes are not importable by name)
        assert "NOT_IMPLEMENTED" in str(exc), str(exc)[:400]
    assert code == 0


@pytest.fixture(scope="module")
def bf16_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "gemma"
    code = main([TINY, "--target", "onnx", "--dtype", "bf16", "--kv-cache", "buffer", "-o", str(out), "--steps", "8"])
    return code, out


def test_bf16_build_is_bf16_and_checked_through_the_twin(bf16_build):
    """exit 0; weights and caches bf16; report.json says the fp32 twin ran (errors at fp32 tolerance)
    and the structures matched; no twin directory left beside the output."""
    code, out = bf16_build
    assert code == 0
    manifest = json.loads((out / "effexport.json").read_text())
    parity = json.loads((out / "report.json").read_text())["parity"]
    assert manifest["dtype"] == "bf16"
    assert {e["dtype"] for e in manifest["cache_plan"]["entries"]} == {"bfloat16"}
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    weights = [t for t in model.graph.initializer if len(t.dims) >= 2 and t.data_type in floats]
    assert weights and all(t.data_type == TensorProto.BFLOAT16 for t in weights)
    logits = model.graph.output[0].type.tensor_type.elem_type
    assert logits == TensorProto.BFLOAT16
    assert parity["passed"] and parity["tolerance"] == 1e-4
    assert parity["mode"].startswith("fp32 twin on ONNX Runtime CPU") and "op structure equals" in parity["mode"]
    assert all(o["max_rel"] <= 1e-4 for o in parity["outputs"])
    assert [p.name for p in out.parent.iterdir()] == ["gemma"]
    assert [str(u) for u in unsupported_nodes(model)] == [] and [str(c) for c in memcpy_edges(model)] == []


def test_twin_structure_mismatch_fails_the_verdict():
    """A twin whose op structure differs from the artifact's fails the check, named; a passing twin
    with equal structure passes and says so."""
    from effexport.exporter.build import twin_verdict
    from effexport.exporter.verify.parity import OutputError, ParityReport

    def ok():
        return ParityReport(True, 8, 1e-4, [OutputError("logits/decode", 1e-6, 1e-7)])

    bad = twin_verdict(ok(), "ai.onnx::MatMul 96 vs 95", "bf16")
    assert not bad.passed and "differs from the fp32 twin's: ai.onnx::MatMul 96 vs 95" in bad.detail
    assert "PARITY FAILED" in bad.table() and "equals" not in bad.mode
    good = twin_verdict(ok(), "", "bf16")
    assert good.passed and "op structure equals the twin's" in good.mode and "checked: fp32 twin" in good.table()


def test_check_of_a_bf16_artifact_needs_the_cuda_ep(bf16_build, capsys):
    """Without ORT's CUDA EP, ``check`` of a bf16 artifact exits 4 naming what to install."""
    assert main(["check", str(bf16_build[1])]) == 4
    err = capsys.readouterr().err
    assert "bf16 artifact" in err and "onnxruntime-gpu" in err and "Traceback" not in err


def test_half_verdict_is_bounded_by_eager_in_the_dtype():
    """``check_parity_half``: an artifact that computes what eager bf16 computes passes (its error to
    fp32 equals eager bf16's); one with weights off by 5% fails, with the bound and eager's own error
    in the detail. (Eager bf16 stands in for the artifact: the CUDA EP is not here.)"""
    import copy

    import torch

    from effexport.exporter.verify.parity import EagerRuntime, check_parity_half
    from effexport.samples import get_sample

    fp32 = get_sample(TINY).build()
    half = copy.deepcopy(fp32).to(torch.bfloat16)
    prompt = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    good = check_parity_half(half, fp32, EagerRuntime(copy.deepcopy(half)), prompt, 8, "bf16")
    assert good.passed and "eager bf16 vs fp32 eager" in good.detail and good.mode.startswith("the bf16 artifact")
    off = copy.deepcopy(half)
    with torch.no_grad():
        for p in off.parameters():
            p.mul_(1.05)
    bad = check_parity_half(half, fp32, EagerRuntime(off), prompt, 8, "bf16")
    assert not bad.passed and "bounds logits/prefill" in bad.detail
    assert max(o.max_rel for o in bad.outputs) > bad.tolerance


@pytest.mark.parametrize("target", ["aoti", "tensorrt"])
def test_half_precision_is_onnx_only(tmp_path, target, capsys):
    assert main([TINY, "--target", target, "--dtype", "bf16", "-o", str(tmp_path / "x")]) == 2
    assert "builds fp32 only" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, reason=(
    "measured on an H100 (ORT 1.31.1): the tiny random gemma bf16 artifact's prefill logits are 0.137 max "
    "rel from fp32 eager where eager bf16 is 0.063 (bound 0.094); its greedy tokens equal fp32's over 8 steps, "
    "eager bf16's leave them at step 4. Which ORT bf16 kernel adds the error is not found yet"))
def test_bf16_build_checked_on_the_cuda_ep(tmp_path):
    """On a GPU with onnxruntime-gpu: the bf16 artifact itself runs on ORT CUDA against eager bf16."""
    from effexport.exporter.build import cuda_ep_available

    if not cuda_ep_available():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)")
    out = tmp_path / "gemma"
    assert main([TINY, "--target", "onnx", "--dtype", "bf16", "-o", str(out), "--steps", "8"]) == 0
    parity = json.loads((out / "report.json").read_text())["parity"]
    assert parity["mode"].startswith("the bf16 artifact against fp32 eager") and parity["tolerance"] >= 2e-2
    assert main(["check", str(out)]) == 0


def test_bf16_llama_norms_match_their_fp32_twin(tmp_path):
    """A Hugging Face Llama in bf16 casts the normalized value back before multiplying by the norm's
    weight (``w * x.to(bf16)``): the ``ort`` fusions fold that weight into the norm as the fp32 twin's
    first round does, so the two graphs have one structure and the build passes through its twin
    (before: one extra ``Mul`` per norm, exit 1)."""
    from models import hf_tiny

    hf_tiny.build("llama").save_pretrained(tmp_path / "llama")
    out = tmp_path / "out"
    assert main([str(tmp_path / "llama"), "--target", "onnx", "--dtype", "bf16", "-o", str(out), "--steps", "8"]) == 0
    parity = json.loads((out / "report.json").read_text())["parity"]
    assert parity["passed"] and "op structure equals" in parity["mode"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    norms = [n for n in model.graph.node if n.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")]
    assert norms and not any(n.op_type == "Mul" and any(i in {m.output[0] for m in norms} for i in n.input)
                             for n in model.graph.node)


def test_bf16_rotations_and_qk_norms_run_in_attention_or_in_bf16(bf16_build):
    """A bf16 build rotates queries and keys without fp32 round trips: every GroupQueryAttention takes
    its rotation (``do_rotary = 1`` over bf16 cos / sin tables: no RotaryEmbedding feeds one) and its
    per-head Q / K norms (``q_norm_weight`` / ``k_norm_weight``), and a
    rotation left outside attention (the decomposed consumers and global heads) reads and writes bf16
    with bf16 tables, no Cast on either side. Fails on the lowering that kept RoPE in fp32 between
    two Casts (45 Casts and 15 RotaryEmbeddings in this graph, 8 of them feeding GQA)."""
    model = onnx.load(str(bf16_build[1] / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa
    for node in gqa:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("do_rotary") == 1, node.name
        assert all(inits[node.input[i]].data_type == TensorProto.BFLOAT16 for i in (7, 8)), node.name
        assert all(producer.get(node.input[i]) is None or producer[node.input[i]].op_type != "RotaryEmbedding"
                   for i in (0, 1)), node.name
        # the CUDA-only per-head Q / K norm (exporter/backends/onnx/ort_cuda.py): bf16 [d] weights, the
        # query and key read straight from their projections (no Reshape / norm / Reshape between)
        assert len(node.input) > 15 and all(inits[node.input[i]].data_type == TensorProto.BFLOAT16
                                            and len(inits[node.input[i]].dims) == 1 for i in (14, 15)), node.name
        assert attrs.get("qk_norm_epsilon", 0) > 0 and {producer[node.input[i]].op_type for i in (0, 1)} == {"MatMul"}
    rotary = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    assert rotary
    for node in rotary:
        assert producer[node.input[0]].op_type != "Cast", node.name
        assert inits[node.input[2]].data_type == TensorProto.BFLOAT16
        assert not [n for n in model.graph.node if n.op_type == "Cast" and node.output[0] in n.input], node.name



def test_a_half_model_keeps_the_buffers_from_pretrained_keeps(tmp_path):
    """The half-precision model a bf16 build captures (``in_dtype`` -> ``to_dtype``) has the buffer dtypes
    ``from_pretrained(dtype=bf16)`` gives the same Hugging Face model: RoPE frequencies fp32 (their
    values the fp32 model's, not rounded to bf16: every rotation angle ``pos * inv_freq`` would move
    with the position), Gemma 3's embedding scale bf16; parameters bf16. A sample keeps its fp32
    non-persistent buffers (ZAYA1's ``inv_freq``); the fp32 reference is left as it was."""
    import torch
    import transformers

    from effexport.exporter.build import in_dtype
    from effexport.exporter.frontends.hf import wrap_hf_module
    from effexport.exporter.frontends.loading import load_model

    tiny_gemma3(directory=tmp_path / "g3")
    want = {f"hf.{n}": b.dtype for n, b in transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "g3", dtype=torch.bfloat16).named_buffers()}
    assert want["hf.model.rotary_emb.full_attention_inv_freq"] == torch.float32
    assert want["hf.model.embed_tokens.embed_scale"] == torch.bfloat16
    fp32 = wrap_hf_module(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g3"), "g3")
    half = in_dtype(fp32, "bf16").model
    assert {n: b.dtype for n, b in half.named_buffers()} == want
    ref = dict(fp32.model.named_buffers())
    for name, buffer in half.named_buffers():
        if buffer.dtype == torch.float32:
            assert torch.equal(buffer, ref[name]) and buffer is not ref[name], name
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert all(b.dtype == torch.float32 for b in fp32.model.buffers())
    zaya = in_dtype(load_model("zaya1-8b:tiny"), "bf16").model
    assert zaya.inv_freq.dtype == torch.float32 and zaya.layers[0].mlp.gate.balancing_biases.dtype == torch.bfloat16
