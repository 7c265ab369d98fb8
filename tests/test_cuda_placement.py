"""Every node of a bf16 ``ort`` artifact can run on ONNX Runtime's CUDA EP, and none is joined to
the device part by a copy: what ``enable_cuda_graph`` needs ("all compute graph nodes have not been
partitioned to the CUDAExecutionProvider" otherwise). Checked without a GPU, against the CUDA EP's
kernel registrations recorded in :mod:`effexport.exporter.backends.onnx.cuda_kernels` (local
functions inlined, types inferred, as ORT sees the graph).

Two assertions per artifact, both exact rather than "int64 aside":

* :func:`unsupported_nodes` is empty: no node whose (op, domain, opset, types) has no CUDA kernel
  (such a node runs on the CPU whatever its inputs; ZAYA1's bf16 CCA ``ReduceMean`` was one);
* :func:`memcpy_edges` is empty: the nodes ORT moves to the CPU on purpose (shape arithmetic from
  ``Shape`` outputs, simulated as its ``GetCpuPreferredNodes`` does) feed only other host nodes and
  host inputs (``Reshape`` shapes, ``Slice`` / ``Range`` bounds ...), never a device input -- a
  shape-derived count compared with device indices was one (DeepSeek V4's sparse attention), and a
  token count added to the device position was another (its ring write slots).

The shape nodes themselves are allowed on the CPU (ORT accepts them in a captured graph; it checks
for Memcpy nodes), so they are not listed as unplaced. The tiny presets built in bf16 elsewhere in
the suite are checked there (tests/test_half_precision.py: gemma4-e2b, deepseek-v4-flash); this
file builds the others, one ``--kv-cache buffer`` artifact each (the layout a CUDA graph replays).
"""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from effexport.exporter.backends.onnx.cuda_kernels import KERNELS, memcpy_edges, unsupported_nodes
from effexport.exporter.cli import main

PRESETS = ["gemma4-e4b:tiny", "gemma4-odd:tiny", "laguna-xs2:tiny", "zaya1-8b:tiny", "deepseek-v4-pro:tiny"]
XDIST_SPLIT = ("preset",)


def _model(nodes, inputs, outputs, functions=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("effexport", 1)] if functions else [])
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_a_bf16_reduce_mean_has_no_cuda_kernel_and_an_fp32_one_has():
    """(op, types, opset) against the record: ReduceMean takes double / float / float16 / int32 on
    CUDA, so the bf16 node is named with the reason, the fp32 one is not."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
    for dtype, expected in ((TensorProto.BFLOAT16, 1), (TensorProto.FLOAT, 0)):
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")
        model = _model([node], [_vi("x", dtype, [2, 4])], [_vi("y", dtype, [2, 1])])
        model.graph.initializer.append(axes)
        found = unsupported_nodes(model)
        assert len(found) == expected
        if found:
            assert found[0].op == "ReduceMean" and found[0].types == {"T": "bfloat16"} and found[0].version == 18
            assert "float16" in found[0].reason and "bfloat16" in str(found[0])


def test_function_bodies_are_checked_inlined_with_their_call_types():
    """A local function's body is polymorphic until inlined: its bf16 ``Log`` (CUDA: double / float /
    float16) is found through the call, and named by its function."""
    body = onnx.helper.make_function("effexport", "logf", ["x"], ["y"], [helper.make_node("Log", ["x"], ["y"])],
                                     [helper.make_opsetid("", 18)])
    call = helper.make_node("logf", ["a"], ["b"], domain="effexport")
    model = _model([call], [_vi("a", TensorProto.BFLOAT16, [3])], [_vi("b", TensorProto.BFLOAT16, [3])], [body])
    [found] = unsupported_nodes(model)
    assert (found.op, found.function, found.types) == ("Log", "logf", {"T": "bfloat16"})
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
    assert unsupported_nodes(model) == []


def test_untyped_registrations_and_opset_ranges():
    """A kernel list per opset range: ``Where`` has bf16 from opset 16 on only; ``Transpose`` (all
    fixed-size types) takes bf16."""
    where = {k.since: k.types["T"] for k in KERNELS[("", "Where")]}
    assert "bfloat16" in where[16] and "bfloat16" not in where[9]
    assert any("bfloat16" in k.types["T"] for k in KERNELS[("", "Transpose")])
    nodes = [helper.make_node("Where", ["c", "x", "y"], ["z"])]
    inputs = [_vi("c", TensorProto.BOOL, [2]), _vi("x", TensorProto.BFLOAT16, [2]), _vi("y", TensorProto.BFLOAT16, [2])]
    assert unsupported_nodes(_model(nodes, inputs, [_vi("z", TensorProto.BFLOAT16, [2])])) == []
    [old] = unsupported_nodes(_model(nodes, inputs, [_vi("z", TensorProto.BFLOAT16, [2])], opset=15))
    assert old.version == 9


def _count_vs_indices(crossing: bool):
    """``idx < x.shape[1]`` with ``idx`` a device value (computed on the device: a graph input itself would
    go to the CPU with the shape node, as ORT places it): the count straight from ``Shape`` (ORT
    computes it on the CPU and copies it), or carried by ``Range`` (bounds read on the host, output on
    the device)."""
    c = lambda v: helper.make_node("Constant", [], [v[0]], value=helper.make_tensor(v[0], TensorProto.INT64, v[1], v[2]))  # noqa: E731
    nodes = [c(("one", [], [1])), c(("zero", [1], [0])),
             helper.make_node("Shape", ["x"], ["s"], start=1, end=2),
             helper.make_node("Squeeze", ["s", "zero"], ["n"]), helper.make_node("Neg", ["i"], ["idx"])]
    if crossing:
        nodes.append(helper.make_node("Less", ["idx", "n"], ["ok"]))
    else:
        nodes += [helper.make_node("Add", ["n", "one"], ["n1"]), helper.make_node("Range", ["n", "n1", "one"], ["r"]),
                  helper.make_node("Squeeze", ["r", "zero"], ["nd"]), helper.make_node("Less", ["idx", "nd"], ["ok"])]
    return _model(nodes, [_vi("x", TensorProto.BFLOAT16, [2, "T"]), _vi("i", TensorProto.INT64, [2, 4])],
                  [_vi("ok", TensorProto.BOOL, [2, 4])])


def test_a_shape_count_meeting_device_indices_is_a_copy_and_range_carries_it():
    """The Memcpy ORT inserts: a shape-derived scalar (CPU: Shape -> Squeeze) read by a device ``Less``;
    none once ``Range`` carries it across."""
    [edge] = memcpy_edges(_count_vs_indices(True))
    assert (edge.value, edge.producer_op, edge.consumer_op, edge.direction) == ("n", "Squeeze", "Less", "to device")
    assert memcpy_edges(_count_vs_indices(False)) == []
    assert unsupported_nodes(_count_vs_indices(True)) == []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One bf16 ``ort`` artifact per preset (``--kv-cache buffer``, no parity run: the graph is what is
    checked), built on first use."""
    out = {}

    def get(preset: str):
        if preset not in out:
            path = tmp_path_factory.mktemp("cuda") / preset.replace(":", "-")
            assert main([preset, "--target", "onnx", "--dtype", "bf16", "--kv-cache", "buffer", "--max-context", "64",
                         "--no-check", "-o", str(path)]) == 0
            out[preset] = {name: onnx.load(str(path / name), load_external_data=False)
                           for name in ("model.onnx", "decode.onnx") if (path / name).exists()}
        return out[preset]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_artifact_runs_on_the_cuda_ep_without_copies(built, preset):
    """The step graph, and the one-token decode graph where the build writes one (the Gemma 4
    presets: KV-sharing consumers read through MultiHeadAttention)."""
    graphs = built(preset)
    assert ("decode.onnx" in graphs) == preset.startswith("gemma4")
    for name, model in graphs.items():
        assert [str(u) for u in unsupported_nodes(model)] == [], name
        assert [str(c) for c in memcpy_edges(model)] == [], name
