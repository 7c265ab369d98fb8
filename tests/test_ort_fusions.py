"""The ``ort`` profile's fusions (exporter/backends/onnx/ort_fusions.py) on small graphs written the way
torch.onnx writes them: what is fused, what is left alone, and that ONNX Runtime CPU computes the
same numbers before and after. (Whole-model parity of fused step graphs, every tiny preset:
tests/test_onnx_export.py::test_prefill_and_decode_match_eager; node counts there too.)"""
import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper

from effexport.exporter.backends.onnx.ort_fusions import fuse_for_ort

SHAPE = [2, 3, 16]


def _const(name: str, value: float, dtype: int):
    """A scalar initializer in ``dtype`` (bf16 through onnx.helper's rounding conversion)."""
    return helper.make_tensor(name, dtype, [], [value])


def _model(nodes, inputs, output, dtype, consts, opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, dtype, SHAPE if n == "x" else [SHAPE[-1]]) for n in inputs],
        [helper.make_tensor_value_info(output, dtype, SHAPE)],
        initializer=[_const(n, v, dtype) for n, v in consts.items()]
        + [helper.make_tensor("axes", TP.INT64, [1], [-1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _rms_model(dtype=TP.FLOAT, scale_first=False) -> onnx.ModelProto:
    mul_args = ["w", "n"] if scale_first else ["n", "w"]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Reciprocal", ["rms"], ["inv"]),
             helper.make_node("Mul", ["x", "inv"], ["n"]),
             helper.make_node("Mul", mul_args, ["y"])]
    return _model(nodes, ["x", "w"], "y", dtype, {"two": 2.0, "eps": 1e-6})


def _gelu_model(dtype=TP.FLOAT, cubic=0.044715) -> onnx.ModelProto:
    nodes = [helper.make_node("Pow", ["x", "three"], ["p"]),
             helper.make_node("Mul", ["cubic", "p"], ["c"]),
             helper.make_node("Add", ["x", "c"], ["a"]),
             helper.make_node("Mul", ["k", "a"], ["ka"]),
             helper.make_node("Tanh", ["ka"], ["t"]),
             helper.make_node("Add", ["t", "one"], ["t1"]),
             helper.make_node("Mul", ["half", "t1"], ["h"]),
             helper.make_node("Mul", ["x", "h"], ["y"])]
    return _model(nodes, ["x"], "y", dtype, {"three": 3.0, "cubic": cubic, "k": math.sqrt(2 / math.pi),
                                                "one": 1.0, "half": 0.5})


def _fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    ir_model = ir.from_proto(model)
    count = fuse_for_ort(ir_model)
    return ir.to_proto(ir_model), count


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("scale_first", [False, True])
def test_fp32_rms_norm_becomes_simplified_layer_normalization(scale_first):
    model = _rms_model(scale_first=scale_first)
    fused, count = _fused(model)
    assert count == 1 and [n.op_type for n in fused.graph.node] == ["SimplifiedLayerNormalization"]
    node = fused.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["axis"] == -1 and attrs["stash_type"] == 1 and attrs["epsilon"] == pytest.approx(1e-6)
    onnx.checker.check_model(fused, full_check=True)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(SHAPE).astype(np.float32), "w": rng.standard_normal(SHAPE[-1]).astype(np.float32)}
    ref, out = _run(model, feeds), _run(fused, feeds)
    assert np.abs(ref).min() > 0  # a real comparison: no zeros
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_rms_norm_without_scale_gets_a_ones_scale():
    """Gemma 4's value norm has no weight: fused with a constant ones scale of the last dim's size."""
    model = _rms_model()
    model.graph.node.pop()  # drop the Mul by the scale
    model.graph.node[-1].output[0] = "y"
    del model.graph.input[1]
    fused, count = _fused(model)
    assert count == 1 and [n.op_type for n in fused.graph.node] == ["Constant", "SimplifiedLayerNormalization"]
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_allclose(_run(fused, {"x": x}), _run(model, {"x": x}), rtol=1e-5, atol=1e-6)


def test_norm_computed_in_bf16_is_left_alone():
    """A norm whose arithmetic is bf16 would be computed in fp32 by the fused op: different numbers."""
    fused, count = _fused(_rms_model(TP.BFLOAT16))
    assert count == 0 and "SimplifiedLayerNormalization" not in {n.op_type for n in fused.graph.node}


def test_other_reductions_are_left_alone():
    """x^3 (not a square) and a mean over another axis are not RMS norms."""
    model = _rms_model()
    for init in model.graph.initializer:
        if init.name == "two":
            init.CopyFrom(_const("two", 3.0, TP.FLOAT))
    assert _fused(model)[1] == 0
    model = _rms_model()
    for init in model.graph.initializer:
        if init.name == "axes":
            init.CopyFrom(helper.make_tensor("axes", TP.INT64, [1], [0]))
    assert _fused(model)[1] == 0


@pytest.mark.parametrize("dtype", [TP.FLOAT, TP.FLOAT16])
def test_tanh_gelu_becomes_fast_gelu(dtype):
    model = _gelu_model(dtype)
    fused, count = _fused(model)
    assert count == 1 and [(n.domain, n.op_type) for n in fused.graph.node] == [("com.microsoft", "FastGelu")]
    assert {o.domain: o.version for o in fused.opset_import}.get("com.microsoft") == 1
    onnx.checker.check_model(fused, full_check=True)
    np_dtype = np.float32 if dtype == TP.FLOAT else np.float16
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np_dtype) * 3
    out = _run(fused, {"x": x}).astype(np.float32)
    eager = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float32)), approximate="tanh").numpy()
    ref = _run(model, {"x": x}).astype(np.float32)
    tol = 1e-5 if dtype == TP.FLOAT else 2e-3
    np.testing.assert_allclose(out, eager, rtol=tol, atol=tol)
    np.testing.assert_allclose(ref, eager, rtol=max(tol, 1e-5) * 5, atol=tol * 5)


def test_bf16_gelu_matches_with_its_rounded_constants():
    """bf16 stores 0.044715 as 0.044677734375 and sqrt(2/pi) as 0.796875: still the tanh GELU."""
    fused, count = _fused(_gelu_model(TP.BFLOAT16))
    assert count == 1 and fused.graph.node[0].op_type == "FastGelu"
    assert fused.graph.output[0].type.tensor_type.elem_type == TP.BFLOAT16


def _erf_gelu_model(dtype=TP.FLOAT, sqrt_2=math.sqrt(2.0)) -> onnx.ModelProto:
    """The exact GELU as the exporter writes it: ``x * (0.5 * (erf(x / sqrt 2) + 1))``."""
    nodes = [helper.make_node("Div", ["x", "sqrt_2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]),
             helper.make_node("Mul", ["half", "e1"], ["h"]),
             helper.make_node("Mul", ["x", "h"], ["y"])]
    return _model(nodes, ["x"], "y", dtype, {"sqrt_2": sqrt_2, "one": 1.0, "half": 0.5})


@pytest.mark.parametrize("dtype", [TP.FLOAT, TP.FLOAT16])
def test_erf_gelu_becomes_gelu(dtype):
    """Five nodes -> one ``com.microsoft.Gelu`` with eager PyTorch's exact GELU numbers (ORT CPU)."""
    model = _erf_gelu_model(dtype)
    fused, count = _fused(model)
    assert count == 1 and [(n.domain, n.op_type) for n in fused.graph.node] == [("com.microsoft", "Gelu")]
    onnx.checker.check_model(fused, full_check=True)
    np_dtype = np.float32 if dtype == TP.FLOAT else np.float16
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np_dtype) * 3
    eager = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float32))).numpy()
    tol = 1e-5 if dtype == TP.FLOAT else 2e-3
    np.testing.assert_allclose(_run(fused, {"x": x}).astype(np.float32), eager, rtol=tol, atol=tol)


def test_bf16_erf_gelu_matches_and_another_constant_does_not():
    fused, count = _fused(_erf_gelu_model(TP.BFLOAT16))
    assert count == 1 and fused.graph.node[0].op_type == "Gelu"
    assert fused.graph.output[0].type.tensor_type.elem_type == TP.BFLOAT16
    assert _fused(_erf_gelu_model(sqrt_2=2.0))[1] == 0


def test_a_different_constant_is_not_gelu():
    assert _fused(_gelu_model(cubic=0.1))[1] == 0


# ----------------------------------------------------------------------- the step fusions (round 2)
from effexport.exporter.backends.onnx.ort_fusions import fuse_step_for_ort, share_shape_reads  # noqa: E402


def _ir_fused(model: onnx.ModelProto, max_positions=None) -> tuple[onnx.ModelProto, int]:
    ir_model = ir.from_proto(onnx.shape_inference.infer_shapes(model))
    count = fuse_step_for_ort(ir_model, max_positions)
    return ir.to_proto(ir_model), count


def _graph(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers)),
                              opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _half_norm_model(dtype=TP.FLOAT16) -> onnx.ModelProto:
    """Two norms of fp16 values computed in fp32 between casts, one fp32 scale (Gemma's ``1 + w``)."""
    d = SHAPE[-1]
    scale = helper.make_tensor("scale", TP.FLOAT, [d], np.linspace(0.5, 1.5, d).astype(np.float32))
    nodes = []
    for i in (0, 1):
        nodes += [helper.make_node("Cast", [f"x{i}"], [f"w{i}"], to=TP.FLOAT),
                  helper.make_node("SimplifiedLayerNormalization", [f"w{i}", "scale"], [f"n{i}"], axis=-1,
                                   epsilon=1e-6, stash_type=1),
                  helper.make_node("Cast", [f"n{i}"], [f"y{i}"], to=dtype)]
    return _graph(nodes, [helper.make_tensor_value_info(f"x{i}", dtype, SHAPE) for i in (0, 1)],
                  [helper.make_tensor_value_info(f"y{i}", dtype, SHAPE) for i in (0, 1)], [scale])


def test_half_precision_norm_loses_its_casts():
    """``Cast -> SimplifiedLayerNormalization(fp32) -> Cast`` of an fp16 value becomes one fp16 norm
    reading the scale rounded to fp16 once (one initializer for both norms); ONNX Runtime CPU gives
    the same numbers within fp16 rounding."""
    model = _half_norm_model()
    fused, count = _ir_fused(model)
    assert count >= 2
    assert [n.op_type for n in fused.graph.node] == ["SimplifiedLayerNormalization"] * 2
    scales = {n.input[1] for n in fused.graph.node}
    assert len(scales) == 1
    init = next(t for t in fused.graph.initializer if t.name in scales)
    assert init.data_type == TP.FLOAT16
    rng = np.random.default_rng(0)
    feeds = {f"x{i}": rng.standard_normal(SHAPE).astype(np.float16) for i in (0, 1)}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    out = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=4e-3, atol=4e-3)


def test_fp32_norm_between_casts_of_fp32_values_is_left_alone():
    """Only half-precision values lose the casts (an fp32 value's casts were folded long before)."""
    model = _half_norm_model(TP.FLOAT16)
    model.graph.node[0].attribute[0].i = TP.DOUBLE  # the first norm computes in fp64: not this pattern
    model.graph.node[1].op_type = "SimplifiedLayerNormalization"
    fused, _ = _ir_fused(model)
    assert [n.op_type for n in fused.graph.node][:3] == ["Cast", "SimplifiedLayerNormalization", "Cast"]


def _skip_model(skip_shape=SHAPE) -> onnx.ModelProto:
    d = SHAPE[-1]
    gamma = helper.make_tensor("gamma", TP.FLOAT, [d], np.linspace(0.5, 1.5, d).astype(np.float32))
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("SimplifiedLayerNormalization", ["s", "gamma"], ["n"], axis=-1, epsilon=1e-6,
                              stash_type=1),
             helper.make_node("Mul", ["n", "s"], ["y"])]  # the residual stream reads the sum on
    return _graph(nodes, [helper.make_tensor_value_info("a", TP.FLOAT, SHAPE),
                          helper.make_tensor_value_info("b", TP.FLOAT, skip_shape)],
                  [helper.make_tensor_value_info("y", TP.FLOAT, SHAPE)], [gamma])


def test_residual_add_and_norm_become_skip_simplified_layer_normalization():
    model = _skip_model()
    fused, count = _ir_fused(model)
    assert count >= 1
    ops = [(n.domain, n.op_type) for n in fused.graph.node]
    assert ops == [("com.microsoft", "SkipSimplifiedLayerNormalization"), ("", "Mul")]
    skip = fused.graph.node[0]
    assert fused.graph.node[1].input == [skip.output[0], skip.output[3]]  # the sum read on from output 3
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal(SHAPE).astype(np.float32), "b": rng.standard_normal(SHAPE).astype(np.float32)}
    ref, out = _run(model, feeds), _run(fused, feeds)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_broadcast_add_is_not_a_skip():
    """``b`` of another shape (a bias broadcast over the rows) is not what the fused op adds."""
    fused, _ = _ir_fused(_skip_model(skip_shape=[SHAPE[-1]]))
    assert "SkipSimplifiedLayerNormalization" not in {n.op_type for n in fused.graph.node}


def _two_shape_reads(second_dim: str) -> ir.Model:
    """Two Shape reads of dim 1 of two values, the second's dim named ``second_dim``."""
    nodes = [helper.make_node("Shape", ["p"], ["sp"], start=1, end=2),
             helper.make_node("Shape", ["q"], ["sq"], start=1, end=2),
             helper.make_node("Add", ["sp", "sq"], ["y"])]
    model = _graph(nodes, [helper.make_tensor_value_info("p", TP.FLOAT, ["b", "t", 4]),
                           helper.make_tensor_value_info("q", TP.FLOAT, ["b", second_dim, 8])],
                   [helper.make_tensor_value_info("y", TP.INT64, [1])])
    return ir.from_proto(model)


def test_shape_reads_of_one_symbol_become_one_read():
    same = _two_shape_reads("t")
    assert share_shape_reads(same) == 1
    add = next(n for n in same.graph if n.op_type == "Add")
    assert add.inputs[0] is add.inputs[1]
    other = _two_shape_reads("u")
    assert share_shape_reads(other) == 0


def _rope_model(d=8, heads=2, table=None) -> onnx.ModelProto:
    """``x * cos + rotate_half(x) * sin`` over ``[B, H, T, D]`` with the tables computed from ``pos``
    and the tokens' count the way torch.onnx writes a Hugging Face rotary embedding."""
    half = d // 2
    inv_freq = (1.0 / (10000 ** (np.arange(0, half, dtype=np.float32) / half))).astype(np.float32)
    inits = [helper.make_tensor("inv_freq", TP.FLOAT, [half], inv_freq),
             helper.make_tensor("zero", TP.INT64, [], [0]), helper.make_tensor("one", TP.INT64, [], [1]),
             helper.make_tensor("ax1", TP.INT64, [1], [1]), helper.make_tensor("ax0", TP.INT64, [1], [0]),
             helper.make_tensor("ax3", TP.INT64, [1], [3]), helper.make_tensor("st1", TP.INT64, [1], [1]),
             helper.make_tensor("h0", TP.INT64, [1], [0]), helper.make_tensor("h1", TP.INT64, [1], [half]),
             helper.make_tensor("big", TP.INT64, [1], [2 ** 62])]
    nodes = [helper.make_node("Shape", ["input_ids"], ["tshape"], start=1, end=2),
             helper.make_node("Squeeze", ["tshape", "ax0"], ["t"]),
             helper.make_node("Range", ["zero", "t", "one"], ["steps"]),
             helper.make_node("Add", ["steps", "pos"], ["positions"]),
             helper.make_node("Cast", ["positions"], ["posf"], to=TP.FLOAT),
             helper.make_node("Unsqueeze", ["posf", "ax1"], ["posc"]),
             helper.make_node("Mul", ["posc", "inv_freq"], ["freqs"]),
             helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
             helper.make_node("Cos", ["emb"], ["cos2"]), helper.make_node("Sin", ["emb"], ["sin2"]),
             helper.make_node("Unsqueeze", ["cos2", "ax0"], ["cos3"]),
             helper.make_node("Unsqueeze", ["sin2", "ax0"], ["sin3"]),
             helper.make_node("Unsqueeze", ["cos3", "ax1"], ["cos"]),
             helper.make_node("Unsqueeze", ["sin3", "ax1"], ["sin"]),
             helper.make_node("Slice", ["x", "h0", "h1", "ax3", "st1"], ["x1"]),
             helper.make_node("Slice", ["x", "h1", "big", "ax3", "st1"], ["x2"]),
             helper.make_node("Neg", ["x2"], ["nx2"]),
             helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=-1),
             helper.make_node("Mul", ["x", "cos"], ["xc"]), helper.make_node("Mul", ["rot", "sin"], ["rs"]),
             helper.make_node("Add", ["xc", "rs"], ["y"])]
    if table == "per-token":  # the table also reads the token ids: not a function of the position
        nodes[4] = helper.make_node("Cast", ["positions_tok"], ["posf"], to=TP.FLOAT)
        nodes[3:3] = [helper.make_node("ReduceSum", ["input_ids"], ["idsum"], keepdims=0),
                      helper.make_node("Add", ["steps", "pos"], ["positions0"]),
                      helper.make_node("Add", ["positions0", "idsum"], ["positions_tok"])]
        nodes = [n for n in nodes if list(n.output) != ["positions"]]
    return _graph(nodes, [helper.make_tensor_value_info("input_ids", TP.INT64, ["b", "t"]),
                          helper.make_tensor_value_info("pos", TP.INT64, []),
                          helper.make_tensor_value_info("x", TP.FLOAT, ["b", heads, "t", d])],
                  [helper.make_tensor_value_info("y", TP.FLOAT, ["b", heads, "t", d])], inits)


def _rope_feeds(pos: int, t_len: int, seed: int = 0, d=8, heads=2):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 9, (2, t_len)).astype(np.int64), "pos": np.array(pos, dtype=np.int64),
            "x": rng.standard_normal((2, heads, t_len, d)).astype(np.float32)}


def test_rotate_half_rope_becomes_rotary_embedding():
    """One ``RotaryEmbedding`` reading ``pos`` as its first position and tables evaluated from the
    graph's own cos / sin arithmetic; ONNX Runtime CPU gives the same numbers at every window of
    positions inside the tables (a prompt at 0, a chunk, a decode step at the last row)."""
    model = _rope_model()
    fused, count = _ir_fused(model, max_positions=32)
    assert count >= 1
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("RotaryEmbedding") == 1 and not {"Cos", "Sin", "Neg", "Slice", "Concat"} & set(ops)
    tables = [t for t in fused.graph.initializer if t.name.startswith("rotary.") and len(t.dims) == 2]
    assert sorted(list(t.dims) for t in tables) == [[32, 4], [32, 4]]
    for pos, t_len in ((0, 5), (7, 3), (31, 1)):
        feeds = _rope_feeds(pos, t_len)
        np.testing.assert_allclose(_run(fused, feeds), _run(model, feeds), rtol=1e-5, atol=1e-6)


def test_rope_without_bounded_positions_or_with_other_tables_is_left_alone():
    """No table length (no fixed-size cache bounds the positions) or tables that read more than the
    position (here the token ids): the arithmetic stays as it is."""
    assert "RotaryEmbedding" not in {n.op_type for n in _ir_fused(_rope_model(), None)[0].graph.node}
    model = _rope_model(table="per-token")
    fused, _ = _ir_fused(model, max_positions=32)
    assert "RotaryEmbedding" not in {n.op_type for n in fused.graph.node}
    feeds = _rope_feeds(3, 4)
    np.testing.assert_allclose(_run(fused, feeds), _run(model, feeds), rtol=1e-6, atol=1e-6)


def _qk_norm_model(dtype, eps_k: float = 1e-6):
    """x_q [1, T, 2*8], x_k [1, T, 1*8] -> Reshape -> SimplifiedLayerNormalization(w) -> Reshape ->
    GroupQueryAttention (heads 2, KV heads 1, head size 8) in ``dtype``."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    t = {"bf16": TensorProto.BFLOAT16, "fp32": TensorProto.FLOAT}[dtype]
    nodes, inits = [], []
    for name, heads, eps in (("q", 2, 1e-6), ("k", 1, eps_k)):
        inits += [helper.make_tensor(f"{name}.shape4", TensorProto.INT64, [4], [0, 0, heads, 8]),
                  helper.make_tensor(f"{name}.shape3", TensorProto.INT64, [3], [0, 0, heads * 8]),
                  helper.make_tensor(f"{name}.w", t, [8], [1.0] * 8)]
        nodes += [helper.make_node("Reshape", [f"x_{name}", f"{name}.shape4"], [f"{name}4"]),
                  helper.make_node("SimplifiedLayerNormalization", [f"{name}4", f"{name}.w"], [f"{name}n"], axis=-1,
                                   epsilon=eps),
                  helper.make_node("Reshape", [f"{name}n", f"{name}.shape3"], [f"{name}3"])]
    nodes.append(helper.make_node("GroupQueryAttention", ["q3", "k3", "x_k", "past_k", "past_v", "seqlens", "total"],
                                  ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=2, kv_num_heads=1))
    vi = helper.make_tensor_value_info
    inputs = [vi("x_q", t, [1, "T", 16]), vi("x_k", t, [1, "T", 8]), vi("past_k", t, [1, 1, 32, 8]),
              vi("past_v", t, [1, 1, 32, 8]), vi("seqlens", TensorProto.INT32, [1]), vi("total", TensorProto.INT32, [])]
    value_info = [vi("q4", t, [1, "T", 2, 8]), vi("qn", t, [1, "T", 2, 8]), vi("q3", t, [1, "T", 16]),
                  vi("k4", t, [1, "T", 1, 8]), vi("kn", t, [1, "T", 1, 8]), vi("k3", t, [1, "T", 8])]
    graph = helper.make_graph(nodes, "g", inputs, [vi("out", t, None)], inits, value_info=value_info)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                                  helper.make_opsetid("com.microsoft", 1)]))


def test_qk_norm_into_attention_only_in_half_precision(monkeypatch):
    """A bf16 GroupQueryAttention takes its per-head Q / K norms (q_norm_weight / k_norm_weight, one
    epsilon; the Reshape / norm / Reshape chains gone); fp32 (ORT's CUDA GQA has no fp32 kernel, and
    the CPU EP refuses the inputs), different epsilons, or EFFEXPORT_ORT_CUDA_FUSIONS=0: untouched."""
    from effexport.exporter.backends.onnx.ort_cuda import ENV, K_NORM, Q_NORM, qk_norm_into_attention

    model = _qk_norm_model("bf16")
    assert qk_norm_into_attention(model) == 1
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert [v.name for v in gqa.inputs[:2]] == ["x_q", "x_k"]
    assert gqa.inputs[Q_NORM].name == "q.w" and gqa.inputs[K_NORM].name == "k.w"
    assert gqa.attributes.get_float("qk_norm_epsilon") == pytest.approx(1e-6)
    assert [n.op_type for n in model.graph] == ["GroupQueryAttention"]
    for model in (_qk_norm_model("fp32"), _qk_norm_model("bf16", eps_k=1e-5)):
        assert qk_norm_into_attention(model) == 0 and len(list(model.graph)) == 7
    monkeypatch.setenv(ENV, "0")
    assert qk_norm_into_attention(_qk_norm_model("bf16")) == 0


def test_structure_check_fuses_the_twin_like_the_artifact(tmp_path):
    """A bf16 artifact with the CUDA-only Q / K norms in its attention equals its fp32 twin (which
    keeps them as nodes, for ONNX Runtime's CPU EP) once the comparison fuses a copy of the twin the
    same way; the unfused bf16 graph against the same twin also compares equal, and a twin with
    another op does not."""
    import onnx_ir as ir

    from effexport.exporter.backends.onnx.ort_cuda import qk_norm_into_attention
    from effexport.exporter.verify.parity import compare_structure

    fused = _qk_norm_model("bf16")
    assert qk_norm_into_attention(fused) == 1
    paths = {}
    for name, model in (("fused", fused), ("plain", _qk_norm_model("bf16")), ("twin", _qk_norm_model("fp32"))):
        paths[name] = str(tmp_path / f"{name}.onnx")
        ir.save(model, paths[name])
    assert compare_structure(paths["fused"], paths["twin"]) == ""
    assert compare_structure(paths["plain"], paths["twin"]) == ""
    other = _qk_norm_model("fp32")
    norm = next(n for n in other.graph if n.op_type == "SimplifiedLayerNormalization")
    norm.op_type = "LayerNormalization"
    ir.save(other, str(tmp_path / "other.onnx"))
    assert compare_structure(paths["fused"], str(tmp_path / "other.onnx")) != ""


def _row_gathers(rows=5, picks=(0, 3, 1, 4), axis=-2, shape=(2, 3, 5, 4)) -> onnx.ModelProto:
    """``x [B, T, L, P]`` read one row at a time, ``Gather(x, i, axis)`` per pick (Gemma 4's per-layer
    inputs: one read per decoder layer), each row scaled by a different factor so the outputs differ."""
    nodes, inits, outs = [], [], []
    for j, i in enumerate(picks):
        inits += [helper.make_tensor(f"i{j}", TP.INT64, [], [i]), helper.make_tensor(f"k{j}", TP.FLOAT, [], [j + 1.0])]
        nodes += [helper.make_node("Gather", ["x", f"i{j}"], [f"g{j}"], axis=axis),
                  helper.make_node("Mul", [f"g{j}", f"k{j}"], [f"y{j}"])]
        outs.append(helper.make_tensor_value_info(f"y{j}", TP.FLOAT, None))
    return _graph(nodes, [helper.make_tensor_value_info("x", TP.FLOAT, list(shape))], outs, inits)


def test_single_row_gathers_become_one_split():
    """Four single-row ``Gather`` nodes of one ``[B, T, L, P]`` value become one ``Reshape`` to
    ``[B, T, L*P]`` and one ``Split`` into ``L`` rows; ONNX Runtime CPU gives the same numbers
    exactly (no arithmetic moved)."""
    model = _row_gathers()
    fused, _ = _ir_fused(model)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("Gather") == 0 and ops.count("Split") == 1 and ops.count("Reshape") == 1, ops
    split = next(n for n in fused.graph.node if n.op_type == "Split")
    assert len(split.output) == 5
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 4)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    out = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for j, (a, b, i) in enumerate(zip(out, ref, (0, 3, 1, 4))):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, x[:, :, i] * (j + 1.0))


@pytest.mark.parametrize("picks,axis", [((0, 1), -2), ((0, 1, 2), 1)])
def test_few_or_other_axis_gathers_are_left_alone(picks, axis):
    """Two rows are not worth a Split; a gather along another axis than the rows is another thing."""
    fused, _ = _ir_fused(_row_gathers(picks=picks, axis=axis))
    assert [n.op_type for n in fused.graph.node].count("Gather") == len(picks)


# ------------------------------------------------------------- one-token / one-head layout rules
def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_transpose_of_unit_axes_becomes_a_reshape_that_meets_its_neighbours():
    """One token: ``[B, 1, H, D] -> [B, H, 1, D]`` moves only an axis of size 1, so it is a Reshape;
    between two Reshapes it then collapses into one, and around an identity it disappears. ORT CPU:
    the same numbers. A transpose that moves a real axis stays."""
    b, h, d = "b", 4, 8
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["y"]),                      # [b, 1, H*D] -> [b, 1, H, D]
             helper.make_node("Transpose", ["y"], ["t"], perm=[0, 2, 1, 3]),        # -> [b, H, 1, D]
             helper.make_node("Shape", ["x"], ["bs"], start=0, end=1),
             helper.make_node("Concat", ["bs", "tail"], ["s2"], axis=0),            # [b, 1, H*D] at run time
             helper.make_node("Reshape", ["t", "s2"], ["z"]),
             helper.make_node("Transpose", ["w"], ["v"], perm=[0, 2, 1, 3])]        # [b, 3, H, D]: stays
    inits = [helper.make_tensor("s1", TP.INT64, [4], [0, 1, h, d]),
             helper.make_tensor("tail", TP.INT64, [2], [1, h * d])]
    model = _graph(nodes, [helper.make_tensor_value_info("x", TP.FLOAT, [b, 1, h * d]),
                           helper.make_tensor_value_info("w", TP.FLOAT, [b, 3, h, d])],
                   [helper.make_tensor_value_info("z", TP.FLOAT, [b, 1, h * d]),
                    helper.make_tensor_value_info("v", TP.FLOAT, [b, h, 3, d])], inits)
    fused, _ = _ir_fused(model)
    # z is x again (an Identity only because both are graph outputs); the real transpose is left
    assert sorted(_ops(fused)) == ["Identity", "Transpose"]
    assert next(n for n in fused.graph.node if n.op_type == "Transpose").input[0] == "w"
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 1, h * d)).astype(np.float32),
             "w": rng.standard_normal((2, 3, h, d)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    for a, b_ in zip(run(fused), run(model)):
        np.testing.assert_array_equal(a, b_)


def test_single_head_norm_loses_its_reshapes_and_still_fuses_into_attention():
    """A one-KV-head K norm ``Reshape([B, T, 1, D]) -> SimplifiedLayerNormalization -> Reshape([B, T,
    D])`` is the norm of the ``[B, T, D]`` rows themselves (two nodes fewer, same numbers on ORT CPU),
    and a half-precision GroupQueryAttention still takes it as ``k_norm_weight``; a norm over two heads
    keeps its reshapes."""
    from effexport.exporter.backends.onnx.ort_fusions import _NormOverUnitHeads
    from onnxscript.rewriter import pattern

    d = 8

    def norm_model(heads, dtype=TP.FLOAT):
        w = helper.make_tensor("w", dtype, [d], np.linspace(0.5, 1.5, d).astype(np.float16 if dtype == TP.FLOAT16
                                                                                    else np.float32))
        nodes = [helper.make_node("Reshape", ["x", "s1"], ["y"]),
                 helper.make_node("SimplifiedLayerNormalization", ["y", "w"], ["n"], axis=-1, epsilon=1e-6),
                 helper.make_node("Reshape", ["n", "s2"], ["z"])]
        inits = [w, helper.make_tensor("s1", TP.INT64, [4], [0, 0, heads, d]),
                 helper.make_tensor("s2", TP.INT64, [3], [0, 0, heads * d])]
        return _graph(nodes, [helper.make_tensor_value_info("x", dtype, ["b", "t", heads * d])],
                      [helper.make_tensor_value_info("z", dtype, ["b", "t", heads * d])], inits)

    model = norm_model(1)
    ir_model = ir.from_proto(onnx.shape_inference.infer_shapes(model))
    assert pattern.RewriteRuleSet([_NormOverUnitHeads.rule()]).apply_to_model(ir_model) == 1
    fused = ir.to_proto(ir_model)
    assert _ops(fused) == ["SimplifiedLayerNormalization"]
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, d)).astype(np.float32)}
    np.testing.assert_allclose(_run(fused, feeds), _run(model, feeds), rtol=1e-6, atol=1e-6)
    two = ir.from_proto(onnx.shape_inference.infer_shapes(norm_model(2)))
    assert pattern.RewriteRuleSet([_NormOverUnitHeads.rule()]).apply_to_model(two) == 0


def test_one_head_k_norm_without_reshapes_goes_into_attention():
    """:func:`qk_norm_into_attention` takes a single head's norm written without the reshapes."""
    from effexport.exporter.backends.onnx.ort_cuda import _head_norm

    d = 8
    w = helper.make_tensor("w", TP.FLOAT16, [d], np.ones(d, dtype=np.float16))
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["n"], axis=-1, epsilon=1e-6),
             helper.make_node("Identity", ["n"], ["z"])]
    model = ir.from_proto(_graph(nodes, [helper.make_tensor_value_info("x", TP.FLOAT16, ["b", "t", d])],
                                 [helper.make_tensor_value_info("z", TP.FLOAT16, ["b", "t", d])], [w]))
    norm_out = next(n for n in model.graph if n.op_type == "SimplifiedLayerNormalization").outputs[0]
    x, weight, eps = _head_norm(norm_out, 1)
    assert x.name == "x" and weight.name == "w" and abs(eps - 1e-6) < 1e-12
    assert _head_norm(norm_out, 2) is None  # two heads need the reshapes around the norm
