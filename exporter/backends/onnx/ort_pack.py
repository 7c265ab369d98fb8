"""Packed Q/K/V for ONNX Runtime's GroupQueryAttention: one projection GEMM per attention instead of three.

A decode step runs each of its projections as one GEMM over a single row per sequence; at that size a
GEMM costs its launch and tail more than its bytes (BENCHMARKS.md run 35b, ``bench/ort_kernel_floor.py``
on an H100, bf16: a pair of one-row GEMMs 1536 -> 256 -> 1536 takes 8.1 us, 6% of the copy bandwidth).
``com.microsoft.GroupQueryAttention`` takes its query, key and value packed in one tensor
``[B, S, (num_heads + 2 * kv_num_heads) * head_size]`` (key and value then absent) and unpacks them in
its own first kernel, so the three ``MatMul`` nodes of one input become one ``MatMul`` with the three
weights side by side, and no ``Split`` is added.

Where (:func:`pack_qkv_into_attention`): a GroupQueryAttention whose query, key and value are each the
only use of a ``MatMul`` of one shared input by a constant ``[K, N]`` weight, in one dtype, with ``N``
= ``num_heads * d``, ``kv_num_heads * d``, ``kv_num_heads * d``. A norm or any other node between a
projection and the attention keeps it unpacked: Gemma 4's value norm, and the per-head Q / K norms of
Gemma 3, Qwen3 or Laguna until :func:`.ort_cuda.qk_norm_into_attention` moved them into the attention
(half precision, CUDA). The fp32 twin a half-precision build is checked through may therefore be
unpacked where the artifact is packed: the structure comparison (``verify.parity.compare_structure``)
counts a packed attention as the two ``MatMul`` nodes it saved.

The packed weight is a new initializer (the three concatenated along N, named after the query's
weight + ``.qkv``, one per distinct triple of weights); the decode graph's packing computes the same bytes under the same name, so both
graphs reference one copy in the data file (``export._shared_initializers``). Arithmetic: the same
products, each output column from the same row of weights, so the numbers are the unpacked graph's up
to the GEMM kernel's choice of split. :data:`ENV` ``0`` turns it off (a comparison).
"""
from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from effexport.exporter.backends.onnx._build import constant, single_use

ENV = "EFFEXPORT_ORT_PACK_QKV"
GQA = ("com.microsoft", "GroupQueryAttention")
PACKED_SUFFIX = ".qkv"


def _projection(value: ir.Value | None) -> tuple[ir.Node, ir.Value, np.ndarray] | None:
    """``(MatMul node, its input, its constant 2-D weight's values)`` when ``value`` is a ``MatMul``'s
    output read only by one node and not a graph output (:func:`._build.single_use`), its weight a
    constant with data (:func:`._build.constant`: a structure-only build's weights have none); else None."""
    node = None if value is None else value.producer()
    if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or not single_use(value):
        return None
    x, w = node.inputs
    data = None if w is None else constant(w)
    if x is None or data is None or data.ndim != 2:
        return None
    return node, x, data


def _packable(node: ir.Node) -> list[tuple[ir.Node, ir.Value, np.ndarray]] | None:
    if (node.domain, node.op_type) != GQA or len(node.inputs) < 3 or any(v is None for v in node.inputs[:3]):
        return None
    parts = [_projection(v) for v in node.inputs[:3]]
    if any(p is None for p in parts) or len({id(x) for _, x, _ in parts}) != 1:
        return None
    (_, _, q), (_, _, k), (_, _, v) = parts
    heads, kv_heads = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
    if heads <= 0 or kv_heads <= 0 or q.shape[1] % heads or len({p.inputs[1].const_value.dtype for p, _, _ in parts}) != 1 \
            or len({q.shape[0], k.shape[0], v.shape[0]}) != 1:
        return None
    d = q.shape[1] // heads
    if (k.shape[1], v.shape[1]) != (kv_heads * d, kv_heads * d):
        return None
    return parts


def pack_qkv_into_attention(model: ir.Model) -> int:
    """Pack the query / key / value projections of every GroupQueryAttention that allows it (the module
    docstring); returns how many attentions were packed (none with :data:`ENV` set to ``0``)."""
    if os.environ.get(ENV, "1") == "0":
        return 0
    graph, packed = model.graph, 0
    made: dict[tuple[str, ...], ir.Value] = {}  # (query, key, value weight names) -> their packed weight
    for node in list(graph):
        parts = _packable(node)
        if parts is None:
            continue
        (q_node, x, _), *_ = parts
        key = tuple(p.inputs[1].name for p, _, _ in parts)
        weight = made.get(key)
        if weight is None:  # weights two attentions share are packed once
            data = np.ascontiguousarray(np.concatenate([t for _, _, t in parts], axis=1))
            name, k = key[0] + PACKED_SUFFIX, 1
            while name in graph.initializers:
                name, k = f"{key[0]}{PACKED_SUFFIX}{k}", k + 1
            dtype = parts[0][0].inputs[1].const_value.dtype
            weight = made[key] = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(data.shape),
                                          const_value=ir.tensor(data, dtype=dtype, name=name))
            graph.register_initializer(weight)
        out = node.inputs[0]
        matmul = ir.Node("", "MatMul", [x, weight], name=q_node.name + PACKED_SUFFIX, num_outputs=1)
        matmul.outputs[0].name = out.name + PACKED_SUFFIX
        matmul.outputs[0].dtype = out.dtype
        if out.shape is not None:
            matmul.outputs[0].shape = ir.Shape([*out.shape[:-1], weight.shape[1]])
        graph.insert_before(q_node, matmul)
        node.replace_input_with(0, matmul.outputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        for p, _, _ in parts:
            graph.remove(p, safe=True)
        packed += 1
    if packed:
        RemoveUnusedNodesPass()(model)
    return packed


def is_packed(node) -> bool:
    """Whether an ONNX ``NodeProto`` is a GroupQueryAttention with packed Q/K/V (no key input)."""
    return (node.domain, node.op_type) == GQA and len(node.input) > 1 and not node.input[1]
