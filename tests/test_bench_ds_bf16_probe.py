"""``bench/ds_bf16_probe.py``'s CPU-side pieces: the emulated-bf16 copy (an fp32 graph that rounds
every bf16 value where the original makes it, so ONNX Runtime CPU, which has no bf16 kernels, runs a
bf16 model's structure) and the chain of values behind a ``kv_compress_step`` body's ape ``Add``
that the probe reads back on the GPU."""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import ds_bf16_probe  # noqa: E402


def _bf16_model(weight: np.ndarray) -> onnx.ModelProto:
    """``y = Cast(MatMul(Cast(x -> bf16), w_bf16) -> fp32)``, the MatMul inside a local function (as
    the lowerings write their ops) and the main graph's values typed (as the exporter declares
    them): ORT CPU has no bf16 MatMul."""
    w = numpy_helper.from_array(torch.from_numpy(weight).to(torch.bfloat16).view(torch.int16).numpy(), "w")
    w.data_type = TensorProto.BFLOAT16
    fn = helper.make_function("test", "mm", ["a", "b"], ["c"], [helper.make_node("MatMul", ["a", "b"], ["c"])],
                              [helper.make_opsetid("", 18)])
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
         helper.make_node("mm", ["xb", "w"], ["yb"], domain="test"),
         helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w],
        value_info=[helper.make_tensor_value_info("xb", TensorProto.BFLOAT16, [2, 4]),
                    helper.make_tensor_value_info("yb", TensorProto.BFLOAT16, [2, 3])])
    return helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid("test", 1)])


@pytest.mark.parametrize("inline", [True, False])
def test_emulated_bf16_runs_on_the_cpu_with_bf16_rounding(inline):
    """The bf16 model has no CPU kernels; its emulation runs and gives torch's bf16 result (inputs,
    weights and the product each rounded to bf16), not the fp32 one: with the function inlined
    first, and with it kept for ORT to inline (the call's output rounded by its declared bf16 type)."""
    rng = np.random.RandomState(0)
    x, w = rng.randn(2, 4).astype(np.float32), rng.randn(4, 3).astype(np.float32)
    model = _bf16_model(w)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|implementation"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    emulated = ds_bf16_probe.emulate_bf16(model, inline=inline)
    assert bool(emulated.functions) != inline
    assert not any(t.data_type == TensorProto.BFLOAT16 for t in emulated.graph.initializer)
    (y,) = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    bf = torch.bfloat16
    expected = (torch.from_numpy(x).to(bf).float() @ torch.from_numpy(w).to(bf).float()).to(bf).float().numpy()
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)
    assert np.abs(y - x @ w).max() > 1e-3  # the rounding is there


def test_ape_chain_walks_back_to_the_range_bounds():
    """In an inlined ``kv_compress_step`` body, the values behind ``z + ape[(Range(0, T) + pos) mod r]``
    are found back to ``Shape(a)``: what the probe adds as graph outputs to read their values."""
    from onnx import inliner

    const = lambda name, v: helper.make_node("Constant", [], [name], value_int=v)  # noqa: E731
    body = [helper.make_node("Shape", ["a"], ["s"], start=1, end=2),
            helper.make_node("Constant", [], ["ax"], value_ints=[0]),
            helper.make_node("Squeeze", ["s", "ax"], ["t"]), const("zero", 0), const("one", 1), const("r", 4),
            helper.make_node("Range", ["zero", "t", "one"], ["rng"]),
            helper.make_node("Add", ["rng", "pos"], ["p"]), helper.make_node("Mod", ["p", "r"], ["m"]),
            helper.make_node("Gather", ["ape", "m"], ["g"], axis=0), helper.make_node("Add", ["z", "g"], ["out"])]
    fn = helper.make_function("effexport", "kv_compress_step", ["a", "z", "ape", "pos"], ["out"], body,
                              [helper.make_opsetid("", 18)])
    for i, node in enumerate(fn.node):
        node.name = f"kv_compress_step/n{i}"
    graph = helper.make_graph(
        [helper.make_node("kv_compress_step", ["a", "z", "ape", "pos"], ["out"], domain="effexport")], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("a", [1, 3, 8]), ("z", [1, 3, 8]))]
        + [helper.make_tensor_value_info("pos", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8])],
        [numpy_helper.from_array(np.zeros((4, 8), np.float32), "ape")])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 18),
                                                                    helper.make_opsetid("effexport", 1)])
    flat = inliner.inline_local_functions(model)
    producers = {o: n for n in flat.graph.node for o in n.output}
    chain = ds_bf16_probe._ape_chain(flat, producers)
    ops = {producers[n].op_type for n in chain if n in producers}
    assert {"Gather", "Mod", "Range", "Squeeze", "Shape"} <= ops
    assert "z" in chain and "pos" not in chain
