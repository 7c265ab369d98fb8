"""The one-token decode graph's plain RMS norms through ONNX Runtime's skip-norm kernel
(:func:`effexport.exporter.backends.onnx.ort_fusions.zero_skip_norms`): which norms are replaced on small
graphs, that ONNX Runtime CPU computes the same numbers at batch 1 and 3 (the ``[1, 1, H]`` zero skip
broadcast over the batch), that the zero skips stay inline in an external-data save, that the
structure comparison's fp32 twin of a decode graph still fuses a one-head K norm into attention, and
on a CLI build of gemma4-e2b:tiny that decode.onnx has no plain ``[B, 1, H]`` norm left while model.onnx
is untouched. The decode graph's parity against eager (fp32, rel 1e-5, batch 2) on the same kind of
build: tests/test_kv_buffer.py::test_decode_graph_equals_eager_and_the_step_graph."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper

from effexport.exporter.backends.onnx.ort_fusions import INLINE, ZERO_SKIP_ENV, zero_skip_norms

H = 64
EPS = 1e-6
vi = helper.make_tensor_value_info


def _gamma(name="gamma", h=H, dtype=TP.FLOAT):
    return helper.make_tensor(name, dtype, [h], np.linspace(0.5, 1.5, h).astype(np.float32).tolist())


def _norm_model(x_shape=("B", 1, H), dtype=TP.FLOAT, gamma="initializer", inv_std_used=False, **attrs):
    """``y = SimplifiedLayerNormalization(x, gamma)`` (``gamma``: an initializer, a ``Constant`` node
    or a graph input), its inverse std read by a second output ``s = inv_std + 1`` when asked."""
    attrs = {"axis": -1, "epsilon": EPS, "stash_type": 1, **attrs}
    attrs = {k: v for k, v in attrs.items() if v is not None}
    outputs = ["y", "inv"] if inv_std_used else ["y"]
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], outputs, **attrs)]
    inputs, inits = [vi("x", dtype, list(x_shape))], []
    if gamma == "initializer":
        inits.append(_gamma(dtype=dtype))
    elif gamma == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["gamma"], value=_gamma(dtype=dtype)))
    else:
        inputs.append(vi("gamma", dtype, [H]))
    graph_outputs = [vi("y", dtype, list(x_shape))]
    if inv_std_used:
        inits.append(helper.make_tensor("one", TP.FLOAT, [], [1.0]))
        nodes.append(helper.make_node("Add", ["inv", "one"], ["s"]))
        graph_outputs.append(vi("s", TP.FLOAT, None))
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, graph_outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    ir_model = ir.from_proto(model)
    count = zero_skip_norms(ir_model)
    return ir.to_proto(ir_model), count


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("dtype,name", [(TP.FLOAT, "float"), (TP.FLOAT16, "float16"), (TP.BFLOAT16, "bfloat16")])
def test_one_token_norm_becomes_a_skip_norm_over_zeros(dtype, name):
    """``SimplifiedLayerNormalization(x [B, 1, H], gamma)`` -> ``com.microsoft.SkipSimplifiedLayerNormalization(x,
    zeros [1, 1, H] of x's dtype, gamma)``, same epsilon, same output name, the ``com.microsoft`` opset
    imported; every dtype (a half-precision decode graph and its fp32 twin keep one structure)."""
    out, count = _rewritten(_norm_model(dtype=dtype))
    assert count == 1 and len(out.graph.node) == 1
    node = out.graph.node[0]
    assert (node.domain, node.op_type) == ("com.microsoft", "SkipSimplifiedLayerNormalization")
    assert list(node.input) == ["x", f"ort.zero_skip.{H}.{name}", "gamma"] and list(node.output) == ["y"]
    assert [(a.name, a.f) for a in node.attribute] == [("epsilon", pytest.approx(EPS))]
    zeros = next(t for t in out.graph.initializer if t.name == node.input[1])
    assert list(zeros.dims) == [1, 1, H] and zeros.data_type == dtype
    assert not onnx.numpy_helper.to_array(zeros).astype(np.float32).any()
    assert {o.domain: o.version for o in out.opset_import}.get("com.microsoft") == 1


def test_default_epsilon_is_written():
    """A norm without ``epsilon`` computes with the default 1e-5; the skip norm's own default is 1e-12,
    so the attribute is always written."""
    out, count = _rewritten(_norm_model(epsilon=None))
    assert count == 1 and out.graph.node[0].attribute[0].f == pytest.approx(1e-5)


def test_norms_of_one_width_share_their_zeros():
    """One zero initializer per (H, dtype): two norms of width H read the same one, a norm of width 32
    its own; a ``Constant`` node's scale (the ones of a norm without a weight) counts as constant."""
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["a"], axis=-1, epsilon=EPS),
             helper.make_node("SimplifiedLayerNormalization", ["a", "gamma"], ["b"], axis=2, epsilon=EPS),
             helper.make_node("Constant", [], ["ones"], value=helper.make_tensor("ones", TP.FLOAT, [32], [1.0] * 32)),
             helper.make_node("SimplifiedLayerNormalization", ["z", "ones"], ["c"], axis=-1, epsilon=EPS)]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [vi("x", TP.FLOAT, ["B", 1, H]), vi("z", TP.FLOAT, ["B", 1, 32])],
        [vi("b", TP.FLOAT, ["B", 1, H]), vi("c", TP.FLOAT, ["B", 1, 32])], [_gamma()],
        value_info=[vi("a", TP.FLOAT, ["B", 1, H])]), opset_imports=[helper.make_opsetid("", 18)])
    out, count = _rewritten(model)
    assert count == 3
    skips = [n for n in out.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert [n.input[1] for n in skips] == [f"ort.zero_skip.{H}.float"] * 2 + ["ort.zero_skip.32.float"]
    assert sorted(t.name for t in out.graph.initializer if t.name.startswith("ort.zero_skip")) == \
        ["ort.zero_skip.32.float", f"ort.zero_skip.{H}.float"]


@pytest.mark.parametrize("model", [
    pytest.param(lambda: _norm_model(x_shape=("B", 1, 4, 16)), id="rank-4"),
    pytest.param(lambda: _norm_model(x_shape=("B", "T", H)), id="dynamic-token-dim"),
    pytest.param(lambda: _norm_model(x_shape=("B", 2, H)), id="two-tokens"),
    pytest.param(lambda: _norm_model(x_shape=("B", 1, "H")), id="dynamic-width"),
    pytest.param(lambda: _norm_model(inv_std_used=True), id="inverse-std-read"),
    pytest.param(lambda: _norm_model(gamma="input"), id="gamma-not-constant"),
    pytest.param(lambda: _norm_model(axis=1), id="axis-not-last"),
    pytest.param(lambda: _norm_model(stash_type=0), id="stash-type-0"),
    pytest.param(lambda: _norm_model(dtype=TP.DOUBLE), id="fp64"),
])
def test_other_norms_are_left_alone(model):
    out, count = _rewritten(model())
    assert count == 0
    assert [n.op_type for n in out.graph.node if n.op_type != "Constant"][0] == "SimplifiedLayerNormalization"
    assert not [t for t in out.graph.initializer if t.name.startswith("ort.zero_skip")]


def test_inverse_std_as_a_graph_output_is_left_alone():
    model = _norm_model()
    model.graph.node[0].output.append("inv")
    model.graph.output.append(vi("inv", TP.FLOAT, None))
    assert _rewritten(model)[1] == 0


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(ZERO_SKIP_ENV, "0")
    assert _rewritten(_norm_model())[1] == 0


@pytest.mark.parametrize("gamma", ["initializer", "constant"])
def test_onnx_runtime_cpu_gives_the_same_numbers(gamma):
    """The rewritten graph's output equals the original's on ONNX Runtime CPU (fp32, rel 1e-6: the
    kernels sum in another order) at batch 1 and 3: the ``[1, 1, H]`` skip broadcast over the batch."""
    model = _norm_model(gamma=gamma)
    out, count = _rewritten(model)
    assert count == 1
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 1, H)).astype(np.float32)
        np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=1e-6, atol=0)


def test_zero_skips_stay_inline_in_an_external_data_save(tmp_path):
    """A zero skip of at least ``EXTERNAL_TENSOR_BYTES`` (here [1, 1, 512] fp32, 2 KiB) stays in the
    model file while the weights go to the data file: a decode graph gets no data file of its own.
    The saved model runs on ONNX Runtime CPU."""
    from effexport.exporter.backends.onnx.export import EXTERNAL_TENSOR_BYTES, _save

    h = 512
    model = _norm_model(x_shape=("B", 1, h))
    model.graph.initializer[0].CopyFrom(_gamma(h=h))
    model.graph.output[0].CopyFrom(vi("y", TP.FLOAT, ["B", 1, h]))
    ir_model = ir.from_proto(model)
    assert zero_skip_norms(ir_model) == 1
    zeros = ir_model.graph.initializers[f"ort.zero_skip.{h}.float"]
    assert zeros.meta.get(INLINE) and zeros.const_value.nbytes >= EXTERNAL_TENSOR_BYTES
    path = tmp_path / "decode.onnx"
    _save(ir_model, path, external=True)
    saved = {t.name: t.data_location for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    assert saved == {"gamma": TP.EXTERNAL, zeros.name: TP.DEFAULT}
    x = np.random.default_rng(1).standard_normal((3, 1, h)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _run(model, x), rtol=1e-6, atol=0)


def _one_head_attention(dtype: int) -> onnx.ModelProto:
    """One-token GroupQueryAttention (2 heads, 1 KV head, head size 8) whose query is normed per head
    (Reshape, norm, Reshape) and whose key is normed directly (one head: the layout rules' form)."""
    inits = [helper.make_tensor("q.shape4", TP.INT64, [4], [0, 0, 2, 8]),
             helper.make_tensor("q.shape3", TP.INT64, [3], [0, 0, 16]),
             helper.make_tensor("q.w", dtype, [8], [1.0] * 8), helper.make_tensor("k.w", dtype, [8], [1.0] * 8)]
    nodes = [helper.make_node("Reshape", ["x_q", "q.shape4"], ["q4"]),
             helper.make_node("SimplifiedLayerNormalization", ["q4", "q.w"], ["qn"], axis=-1, epsilon=EPS),
             helper.make_node("Reshape", ["qn", "q.shape3"], ["q3"]),
             helper.make_node("SimplifiedLayerNormalization", ["x_k", "k.w"], ["k3"], axis=-1, epsilon=EPS),
             helper.make_node("GroupQueryAttention", ["q3", "k3", "x_k", "past_k", "past_v", "seqlens", "total"],
                              ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=2, kv_num_heads=1)]
    inputs = [vi("x_q", dtype, ["B", 1, 16]), vi("x_k", dtype, ["B", 1, 8]), vi("past_k", dtype, ["B", 1, 32, 8]),
              vi("past_v", dtype, ["B", 1, 32, 8]), vi("seqlens", TP.INT32, ["B"]), vi("total", TP.INT32, [])]
    value_info = [vi("q4", dtype, ["B", 1, 2, 8]), vi("qn", dtype, ["B", 1, 2, 8]), vi("q3", dtype, ["B", 1, 16]),
                  vi("k3", dtype, ["B", 1, 8])]
    graph = helper.make_graph(nodes, "g", inputs, [vi("out", dtype, None)], inits, value_info=value_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def test_structure_check_fuses_a_zero_skip_k_norm_of_the_twin(tmp_path):
    """A bf16 decode graph's one-head K norm goes into GroupQueryAttention before the zero-skip pass runs
    (CUDA fusions, inside the step fusions); in its fp32 twin the norm stays and becomes a zero-skip
    norm. The structure comparison fuses a copy of the twin as the artifact was fused: it finds that K
    norm all the same, and the two decode graphs compare equal."""
    from effexport.exporter.backends.onnx.ort_cuda import qk_norm_into_attention, with_cuda_fusions
    from effexport.exporter.verify.parity import compare_structure

    artifact, twin = ir.from_proto(_one_head_attention(TP.BFLOAT16)), ir.from_proto(_one_head_attention(TP.FLOAT))
    assert qk_norm_into_attention(artifact) == 1 and qk_norm_into_attention(twin) == 0  # fp32: CPU EP, no fusion
    assert zero_skip_norms(artifact) == 0 and zero_skip_norms(twin) == 1
    fused = with_cuda_fusions(ir.to_proto(twin))
    assert [n.op_type for n in fused.graph.node] == ["GroupQueryAttention"]
    assert list(fused.graph.node[0].input[14:16]) == ["q.w", "k.w"]
    ir.save(artifact, str(tmp_path / "a.onnx"))
    ir.save(twin, str(tmp_path / "t.onnx"))
    assert compare_structure(str(tmp_path / "a.onnx"), str(tmp_path / "t.onnx")) == ""


# ------------------------------------------------------------------------ a CLI build of gemma4-e2b:tiny
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """gemma4-e2b:tiny, ``--target onnx --kv-cache buffer`` (ort profile, fp32), no parity run: the
    graphs are what is checked here; the build's and the runtime's parity with the decode graph run in
    tests/test_kv_buffer.py on the same build."""
    from effexport.exporter.cli import main

    out = tmp_path_factory.mktemp("zero_skip") / "gemma"
    assert main(["gemma4-e2b:tiny", "--target", "onnx", "-o", str(out), "--kv-cache", "buffer",
                 "--max-context", "64", "--no-check"]) == 0
    return out


def _norms(model: onnx.ModelProto) -> tuple[list[ir.Node], list[ir.Node], list[ir.Node]]:
    """(plain norms over a ``[B, 1, H]`` input, the other plain norms, skip norms over a zero skip) of
    the main graph."""
    graph = ir.from_proto(model).graph
    one_token, other, zero = [], [], []
    for node in graph:
        if node.op_type == "SimplifiedLayerNormalization":
            shape = node.inputs[0].shape
            rank3 = shape is not None and shape.rank() == 3 and shape[1] == 1 and isinstance(shape[2], int)
            (one_token if rank3 else other).append(node)
        elif node.op_type == "SkipSimplifiedLayerNormalization" and node.inputs[1].name.startswith("ort.zero_skip."):
            zero.append(node)
    return one_token, other, zero


@pytest.mark.slow  # the build: ~55 s on 2 CPU cores
def test_decode_graph_runs_its_row_norms_as_skip_norms(built):
    """decode.onnx: no plain norm of a ``[B, 1, H]`` input is left (49 of gemma4-e2b:tiny's 62 go; the
    13 left normalize rank-4 per-head values); each went to one skip norm over a zero skip (one per
    width: 16, 32, 64), so the plain norms it lost are the skip norms it gained over model.onnx, whose
    norms are the same ones (the same program lowered at any token count). model.onnx has no zero
    skip; no data file beside model.onnx.data."""
    general = onnx.load(str(built / "model.onnx"), load_external_data=False)
    decode = onnx.load(str(built / "decode.onnx"), load_external_data=False)
    assert json.loads((built / "effexport.json").read_text())["files"] == {"step": "model.onnx", "decode": "decode.onnx"}
    one_token, other, zero = _norms(decode)
    assert one_token == [] and len(zero) == 49 and len(other) == 13
    assert all(n.inputs[0].shape.rank() == 4 for n in other)

    def count(model, op):
        return sum(n.op_type == op for n in model.graph.node)
    plain, skip = "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"
    assert count(general, plain) - count(decode, plain) == len(zero)
    assert count(decode, skip) - count(general, skip) == len(zero)
    inits = {t.name: t for t in decode.graph.initializer}
    zeros = sorted({n.inputs[1].name for n in zero})
    assert zeros == ["ort.zero_skip.16.float", "ort.zero_skip.32.float", "ort.zero_skip.64.float"]
    assert all(inits[z].data_location == TP.DEFAULT and not onnx.numpy_helper.to_array(inits[z]).any() for z in zeros)
    assert not [t for t in general.graph.initializer if t.name.startswith("ort.zero_skip")]
    assert not [n for n in general.graph.node if n.op_type == skip and n.input[1].startswith("ort.zero_skip")]
    assert sorted(p.name for p in built.iterdir() if p.name.endswith(".data")) == ["model.onnx.data"]
    # the one-output skip norm is valid ONNX for the checker too (the declared subset makes outputs 1-3 optional)
    onnx.checker.check_model(str(built / "decode.onnx"), full_check=True)
