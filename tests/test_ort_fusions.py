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


def test_a_different_constant_is_not_gelu():
    assert _fused(_gelu_model(cubic=0.1))[1] == 0
