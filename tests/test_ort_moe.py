"""Stacked routed experts -> ``com.microsoft.MoE`` (exporter/backends/onnx/ort_moe.py) on small graphs
written the way torch.onnx writes ``samples._blocks.StackedExperts`` (the Laguna / ZAYA / DeepSeek V4
tiny builds show these nodes): what is fused, what is left alone, and that ONNX Runtime CPU computes the
same numbers before and after. Whole models (every tiny preset: MoE count, parity against eager):
tests/test_onnx_export.py."""
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper
from onnx_ir.passes.common import RemoveUnusedNodesPass

from effexport.exporter.backends.onnx.ort_moe import fuse_moe, non_negative

N, D, H, E = 7, 16, 8, 6
BIG = np.iinfo(np.int64).max


def _int(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _experts_model(router="sigmoid", k=2, limit=None, swapped=False, start=0.0, dtype=np.float32, act="silu",
                   seed=0, cast_after=False) -> onnx.ModelProto:
    """``x [N, D]``, router logits ``r [N, E]`` (and hash ids ``ids [N, k]`` for ``router="hash"``) ->
    ``StackedExperts(x, idx, w)`` with ``idx, w`` from ``router``:

    * ``sigmoid``: top-k of sigmoid(r) + bias, weights the unbiased scores renormalised (Laguna, DeepSeek);
    * ``skip``: top-1 of softmax(r), weight 0 where the index is E - 1 (ZAYA's skip class);
    * ``hash``: fixed indices (repeats allowed), sqrt(softplus(r)) weights times 2.5 (DeepSeek's hash layers);
    * ``tanh``: top-k of tanh(r): weights that can be negative (must not be fused)."""
    rng = np.random.default_rng(seed)
    t = {np.float32: TP.FLOAT, np.float16: TP.FLOAT16, "bf16": TP.BFLOAT16}[dtype]

    def tensor(name, array):  # in the model's dtype (bf16 through onnx.helper's rounding conversion)
        return helper.make_tensor(name, t, array.shape, np.asarray(array, np.float32).reshape(-1).tolist())

    inits = [tensor("gate_up", rng.standard_normal((E, 2 * H, D)) * 0.4), tensor("down", rng.standard_normal((E, D, H)) * 0.4),
             numpy_helper.from_array((rng.standard_normal(E) * 0.3).astype(np.float32), "bias"),
             numpy_helper.from_array(np.array(start, np.float32), "zero") if cast_after else tensor("zero", np.array(start)),
             _int("k", [k]), _int("axes", [-1]), _int("s0", [0]), _int("s1", [H]), _int("s2", [BIG]),
             _int("ax2", [2]), _int("one", [1]), _int("shape_e", [E])]
    nodes, inputs = [], [helper.make_tensor_value_info("x", t, [N, D]),
                         helper.make_tensor_value_info("r", TP.FLOAT, [N, E])]
    if router == "sigmoid":
        nodes += [helper.make_node("Sigmoid", ["r"], ["s"]), helper.make_node("Add", ["s", "bias"], ["sb"]),
                  helper.make_node("TopK", ["sb", "k"], ["tv", "idx"], axis=-1),
                  helper.make_node("GatherElements", ["s", "idx"], ["g"], axis=-1),
                  helper.make_node("ReduceSum", ["g", "axes"], ["gs"], keepdims=1),
                  helper.make_node("Div", ["g", "gs"], ["w"])]
    elif router == "tanh":
        nodes += [helper.make_node("Tanh", ["r"], ["s"]), helper.make_node("TopK", ["s", "k"], ["w", "idx"], axis=-1)]
    elif router == "skip":
        inits += [_int("last", [E - 1]), numpy_helper.from_array(np.array(0, np.int64), "i0"),
                  numpy_helper.from_array(np.array(0.0, np.float32), "f0")]
        nodes += [helper.make_node("Softmax", ["r"], ["s"], axis=-1),
                  helper.make_node("TopK", ["s", "k"], ["tv", "top"], axis=-1),
                  helper.make_node("GatherElements", ["s", "top"], ["g"], axis=1),
                  helper.make_node("Equal", ["top", "last"], ["skip"]),
                  helper.make_node("Where", ["skip", "i0", "top"], ["idx"]),
                  helper.make_node("Where", ["skip", "f0", "g"], ["w"])]
    elif router == "hash":
        inputs.append(helper.make_tensor_value_info("idx", TP.INT64, [N, k]))
        inits.append(numpy_helper.from_array(np.array(2.5, np.float32), "scale"))
        nodes += [helper.make_node("Softplus", ["r"], ["sp"]), helper.make_node("Sqrt", ["sp"], ["s"]),
                  helper.make_node("GatherElements", ["s", "idx"], ["g"], axis=1),
                  helper.make_node("Mul", ["g", "scale"], ["w"])]
    nodes += [helper.make_node("Einsum", ["x", "gate_up"], ["gu"], equation="nd,ehd->neh"),
              helper.make_node("Slice", ["gu", "s0", "s1", "ax2", "one"], ["up" if swapped else "gate"]),
              helper.make_node("Slice", ["gu", "s1", "s2", "ax2", "one"], ["gate" if swapped else "up"])]
    gate, up = "gate", "up"
    if limit is not None:
        inits += [tensor("lim", np.array(limit)), tensor("neglim", np.array(-limit))]
        nodes += [helper.make_node("Min", ["gate", "lim"], ["gate_c"]),
                  helper.make_node("Clip", ["up", "neglim", "lim"], ["up_c"])]
        gate, up = "gate_c", "up_c"
    if act == "silu":
        nodes += [helper.make_node("Sigmoid", [gate], ["sg"]), helper.make_node("Mul", [gate, "sg"], ["act"])]
    else:  # a look-alike: tanh instead of sigmoid
        nodes += [helper.make_node("Tanh", [gate], ["sg"]), helper.make_node("Mul", [gate, "sg"], ["act"])]
    nodes += [helper.make_node("Mul", ["act", up], ["h"]),
              helper.make_node("Einsum", ["h", "down"], ["out"], equation="neh,edh->ned"),
              helper.make_node("Shape", ["x"], ["n"], end=1),
              helper.make_node("Concat", ["n", "shape_e"], ["cshape"], axis=0),
              helper.make_node("Expand", ["zero", "cshape"], ["zeros"]),
              # the weights in the model's dtype before the scatter, as the samples pass them
              # (``weights.to(x.dtype)``), or (``cast_after``) scattered in fp32 and then cast
              helper.make_node("Cast", ["w"], ["w_t"], to=TP.FLOAT if cast_after else t),
              helper.make_node("ScatterElements", ["zeros", "idx", "w_t"], ["comb"], axis=1, reduction="add"),
              helper.make_node("Cast", ["comb"], ["comb_t"], to=t),
              helper.make_node("Einsum", ["out", "comb_t"], ["routed"], equation="ned,ne->nd"),
              helper.make_node("Identity", ["routed"], ["y"])]
    graph = helper.make_graph(nodes, "experts", inputs, [helper.make_tensor_value_info("y", t, [N, D])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)


def _fused(model: onnx.ModelProto, without_data: bool = False) -> tuple[onnx.ModelProto, int]:
    ir_model = ir.from_proto(model)
    gate_up = ir_model.graph.initializers["gate_up"]
    data = gate_up.const_value
    if without_data:  # a structure-only / streamed build: the weight has no data while the fusions run
        gate_up.const_value = None
    count = fuse_moe(ir_model)
    gate_up.const_value = data
    RemoveUnusedNodesPass()(ir_model)
    return ir.to_proto(ir_model), count


def _feeds(router="sigmoid", k=2, dtype=np.float32, seed=1):
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((N, D)).astype(dtype), "r": (rng.standard_normal((N, E)) * 2).astype(np.float32)}
    if router == "hash":
        idx = np.stack([rng.choice(E, k, replace=False) for _ in range(N)])
        idx[0, 1] = idx[0, 0]  # a repeated expert: the scatter adds both weights
        feeds["idx"] = idx.astype(np.int64)
    if router == "skip":
        feeds["r"][:3, E - 1] = 9.0  # these tokens choose the skip class
    return feeds


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b.astype(np.float64)).max())


@pytest.mark.parametrize("router,k,limit", [("sigmoid", 2, None), ("sigmoid", 3, 0.6), ("skip", 1, None),
                                            ("hash", 2, 0.6)])
def test_stacked_experts_become_moe_with_the_same_numbers(router, k, limit):
    model = _experts_model(router, k, limit)
    fused, count = _fused(model)
    onnx.checker.check_model(fused, full_check=True)
    types = Counter(n.op_type for n in fused.graph.node)
    assert count == 1 and types["MoE"] == 1 and types["Einsum"] == 0 and types["Slice"] == 0
    moe = next(n for n in fused.graph.node if n.op_type == "MoE")
    attrs = {a.name: helper.get_attribute_value(a) for a in moe.attribute}
    assert moe.domain == "com.microsoft" and attrs["k"] == k and attrs["swiglu_fusion"] == 1
    assert attrs["normalize_routing_weights"] == 1 and attrs["activation_type"] == b"swiglu"
    assert attrs["activation_alpha"] == 1.0 and attrs["activation_beta"] == 0.0
    assert ("swiglu_limit" in attrs) == (limit is not None)
    if limit is not None:
        assert attrs["swiglu_limit"] == pytest.approx(limit)
    fc1 = numpy_helper.to_array(next(i for i in fused.graph.initializer if i.name == moe.input[2]))
    gate_up = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "gate_up"))
    np.testing.assert_array_equal(fc1[:, 0::2], gate_up[:, :H])  # interleaved rows: g0, u0, g1, u1, ...
    np.testing.assert_array_equal(fc1[:, 1::2], gate_up[:, H:])
    feeds = _feeds(router, k)
    want, got = _run(model, feeds), _run(fused, feeds)
    assert _rel(got, want) < 1e-5


def test_skipped_tokens_stay_zero():
    """ZAYA's skip class: a token whose weights are all zero gets exactly zero (MoE's weights are
    1/k of arbitrary experts there, times the weights' sum 0)."""
    model = _experts_model("skip", 1)
    fused, _ = _fused(model)
    feeds = _feeds("skip", 1)
    got = _run(fused, feeds)
    assert not np.any(got[:3]) and np.any(got[3:])


def test_fp16_experts():
    """fp16, with the combine weights scattered in fp32 and cast after (ONNX Runtime's CPU EP has no
    fp16 ScatterElements-add, so the samples' own form, an fp16 scatter, runs on the GPU only)."""
    model = _experts_model("sigmoid", 2, dtype=np.float16, cast_after=True)
    fused, count = _fused(model)
    assert count == 1
    feeds = _feeds("sigmoid", 2, np.float16)
    assert _rel(_run(fused, feeds), _run(model, feeds)) < 3e-3  # fp16 rounding of the routing logits


def test_bf16_experts_are_fused():
    """bf16 (the GPU builds): the same structure; ONNX Runtime's CPU EP has no bf16 MoE (nor bf16
    Einsum), so the numbers of a bf16 build are the GPU round's."""
    model = _experts_model("sigmoid", 2, limit=0.6, dtype="bf16")
    fused, count = _fused(model)
    onnx.checker.check_model(fused, full_check=True)
    types = Counter(n.op_type for n in fused.graph.node)
    assert count == 1 and types["MoE"] == 1 and types["Einsum"] == 0
    moe = next(n for n in fused.graph.node if n.op_type == "MoE")
    fc1 = next(i for i in fused.graph.initializer if i.name == moe.input[2])
    assert fc1.data_type == TP.BFLOAT16 and list(fc1.dims) == [E, 2 * H, D]


def test_weight_without_data_is_interleaved_in_the_graph():
    """A structure-only or streamed build has no gate_up data while the fusions run: the interleave
    is computed from the initializer in the graph (which ONNX Runtime folds at load), same numbers."""
    model = _experts_model("sigmoid", 2, limit=0.6)
    fused, count = _fused(model, without_data=True)
    moe = next(n for n in fused.graph.node if n.op_type == "MoE")
    assert count == 1 and moe.input[2] not in {i.name for i in fused.graph.initializer}
    feeds = _feeds()
    assert _rel(_run(fused, feeds), _run(model, feeds)) < 1e-5


@pytest.mark.parametrize("what,kwargs", [
    ("signed routing weights", dict(router="tanh")),
    ("the scatter starts from ones", dict(start=1.0)),
    ("gate and up the other way round", dict(swapped=True)),
    ("not SiLU gating", dict(act="tanh")),
])
def test_look_alikes_are_left_alone(what, kwargs):
    model = _experts_model(**kwargs)
    fused, count = _fused(model)
    assert count == 0, what
    assert Counter(n.op_type for n in fused.graph.node)["Einsum"] == 3


def test_non_negative():
    model = ir.from_proto(_experts_model("sigmoid"))
    values = {v.name: v for node in model.graph for v in node.outputs}
    assert non_negative(values["w"]) and non_negative(values["s"])
    assert not non_negative(values["sb"])  # sigmoid + a bias with negative entries
    assert not non_negative(values["gu"]) and not non_negative(values["idx"])
