"""Fusions only ONNX Runtime's CUDA execution provider runs: GroupQueryAttention's per-head Q / K
RMS norm (``q_norm_weight`` / ``k_norm_weight``, ORT >= 1.31; the CPU EP refuses the node with
"q_norm_weight / k_norm_weight inputs are not supported").

A model with QK-norm (Gemma 3 / 4, Qwen3, Laguna) normalizes each head of the projected query and
key before rotating them: ``Reshape([B, T, H*d] -> [B, T, H, d])``, ``SimplifiedLayerNormalization``
over ``d``, ``Reshape`` back -- three nodes each for the query and the key of every attention layer.
GroupQueryAttention applies the same norm (``x * (mean(x^2) + eps)^-1/2 * w`` per head, in fp32,
before any rotary embedding, ORT's schema) to its 3-D inputs, so the six nodes go.

Applied only to half-precision GroupQueryAttention (ORT's CUDA kernel has no fp32 form; a bf16 /
fp16 ``ort`` artifact is a GPU artifact in any case), so the fp32 twin a CPU-only machine checks a
half-precision build through keeps the norms as nodes and runs; the structure comparison fuses a
copy of the twin the same way (:func:`with_cuda_fusions`) and compares that. What the CPU cannot check is ORT's CUDA kernel computing that norm as ``SimplifiedLayerNormalization`` does: the
GPU parity of the artifact does (``bench/ort_graphs.py``, the gpu tests)."""
from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from effexport.exporter.backends.onnx._build import constant, single_use

ENV = "EFFEXPORT_ORT_CUDA_FUSIONS"
"""``0`` builds without these fusions (a comparison, or an ONNX Runtime build whose CUDA kernel lacks them)."""
Q_NORM, K_NORM = 14, 15  # GroupQueryAttention's q_norm_weight / k_norm_weight inputs (ORT 1.31, 1.32)
_HALF = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)


def _norm_node(node: ir.Node | None, axes: tuple[int, ...]) -> bool:
    """``node`` is a plain ``SimplifiedLayerNormalization`` over one of ``axes`` whose inverse-std
    output nobody reads."""
    return node is not None and node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "ai.onnx") \
        and not (len(node.outputs) > 1 and node.outputs[1].uses()) and node.attributes.get_int("axis", -1) in axes


def _norm_weight(w: ir.Value | None, d, dtype) -> bool:
    """``w`` is a constant ``[d]`` of ``dtype``."""
    return w is not None and w.is_initializer() and w.shape is not None and list(w.shape) == [d] and w.dtype == dtype


def _zero_skip_norm(node: ir.Node | None) -> bool:
    """``node`` is a ``SkipSimplifiedLayerNormalization`` of one output over an all-zero ``[1, 1, d]``
    skip: a plain norm that the decode graph's :func:`.ort_fusions.zero_skip_norms` ran through the
    skip-norm kernel. That pass runs after these fusions, so only the fp32 twin of a decode graph
    (:func:`with_cuda_fusions`) has such a norm where a half-precision build fused a plain one."""
    if node is None or node.op_type != "SkipSimplifiedLayerNormalization" or node.domain != "com.microsoft" \
            or len(node.inputs) != 3 or len(node.outputs) != 1 or node.inputs[1] is None:
        return False
    zeros = constant(node.inputs[1])
    return zeros is not None and zeros.ndim == 3 and zeros.shape[:2] == (1, 1) and not zeros.any()


def _head_norm(value: ir.Value, heads: int):
    """``value = Reshape(SimplifiedLayerNormalization(Reshape(x, [B, T, H, d]), w), [B, T, H*d])`` over
    the last axis, each link read only by the next, ``x`` 3-D with ``H * d`` channels and ``w`` a
    constant 1-D ``[d]`` of ``x``'s dtype -> ``(x, w, epsilon)``; else None. With one head the
    reshapes may be gone already (``value = SimplifiedLayerNormalization(x, w)``, the ``ort``
    layout rule for a single head's norm, or that norm with a zero skip: :func:`_zero_skip_norm`)."""
    direct = value.producer()
    if heads == 1 and (_norm_node(direct, (-1, 2)) or _zero_skip_norm(direct)) and single_use(value):
        x, w = direct.inputs[0], direct.inputs[-1]  # the scale is the last input of either op
        if x is None or x.shape is None or x.shape.rank() != 3 or not _norm_weight(w, x.shape[2], x.dtype):
            return None
        return x, w, direct.attributes.get_float("epsilon", 1e-5)
    back = value.producer()
    if back is None or back.op_type != "Reshape" or back.domain not in ("", "ai.onnx") \
            or not single_use(back.inputs[0]):
        return None
    norm = back.inputs[0].producer()
    if not _norm_node(norm, (-1, 3)) or norm.inputs[0] is None or not single_use(norm.inputs[0]):
        return None
    split = norm.inputs[0].producer()
    if split is None or split.op_type != "Reshape" or split.domain not in ("", "ai.onnx"):
        return None
    x, heads_x, w = split.inputs[0], norm.inputs[0], norm.inputs[1]
    if x.shape is None or x.shape.rank() != 3 or heads_x.shape is None or heads_x.shape.rank() != 4:
        return None
    d, h = heads_x.shape[3], heads_x.shape[2]
    if not isinstance(d, int) or h != heads or x.shape[2] != heads * d or value.shape is None \
            or list(value.shape)[2:] != [heads * d]:
        return None
    if not _norm_weight(w, d, x.dtype):
        return None
    return x, w, norm.attributes.get_float("epsilon", 1e-5)


def qk_norm_into_attention(model: ir.Model) -> int:
    """Move the per-head Q / K norms of every half-precision GroupQueryAttention into it (both or
    neither; one epsilon for both, ``qk_norm_epsilon``); returns how many attentions took theirs.
    Nothing is fused with :data:`ENV` set to ``0``."""
    if os.environ.get(ENV, "1") == "0":
        return 0
    return _fuse_qk_norms(model, _HALF)


def _fuse_qk_norms(model: ir.Model, dtypes) -> int:
    moved = 0
    for node in list(model.graph):
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" \
                or node.inputs[0] is None or node.inputs[0].dtype not in dtypes or node.inputs[1] is None \
                or any(v is not None for v in node.inputs[Q_NORM:]):
            continue
        q = _head_norm(node.inputs[0], node.attributes.get_int("num_heads", -1))
        k = _head_norm(node.inputs[1], node.attributes.get_int("kv_num_heads", -1))
        if q is None or k is None or not np.isclose(q[2], k[2], rtol=1e-6, atol=0.0) or q[1].shape != k[1].shape:
            continue
        node.resize_inputs(max(len(node.inputs), K_NORM + 1))
        for i, value in ((0, q[0]), (1, k[0]), (Q_NORM, q[1]), (K_NORM, k[1])):
            node.replace_input_with(i, value)
        node.attributes["qk_norm_epsilon"] = ir.AttrFloat32("qk_norm_epsilon", float(q[2]))
        moved += 1
    if moved:
        RemoveUnusedNodesPass()(model)
    return moved


def has_cuda_fusions(model) -> bool:
    """Whether an ONNX ``ModelProto`` has a GroupQueryAttention with ``q_norm_weight``."""
    return any(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" and len(n.input) > Q_NORM
               and n.input[Q_NORM] for n in model.graph.node)


def with_cuda_fusions(model):
    """An ONNX ``ModelProto`` with the CUDA-only fusions applied in any dtype: the fp32 twin a
    half-precision build is checked through, as its structure would be fused (its nodes that only
    fed the fused ones go too), for the structure comparison."""
    fused = ir.from_proto(model)
    _fuse_qk_norms(fused, tuple(ir.DataType))
    return ir.to_proto(fused)
