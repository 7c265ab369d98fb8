"""Which nodes of an ONNX model ONNX Runtime's CUDA execution provider cannot run, read offline.

A session with ``enable_cuda_graph`` is refused ("all compute graph nodes have not been
partitioned to the CUDAExecutionProvider") when the partitioned graph holds a Memcpy node. Two
things put one there, and both can be found without a GPU:

1. a node the CUDA EP has **no kernel** for -- its op, domain, opset or input types are not
   registered (a bf16 ``Log``, a ``Reciprocal`` in bf16, ...): it falls back to the CPU EP, and its
   device inputs and outputs are copied. :func:`unsupported_nodes` lists them.
2. a node the CUDA EP has a kernel for but that ORT **moves to the CPU** on purpose: its
   ``GetCpuPreferredNodes`` (onnxruntime/core/framework/fallback_cpu_capability.cc) starts from the
   outputs CUDA kernels write in host memory (``Shape``, ``Size``) and moves to the CPU each
   consumer whose every input is such a host value, an initializer or a graph input (and none is
   fp16 / bf16, and none is read on the host by the CUDA kernel itself), then that node's
   consumers, and so on: the shape arithmetic. That is allowed in a captured graph as long as no
   such value feeds a device input -- a ``Cast`` of a shape-derived count into a float mask, an
   index -- and no device value feeds such a node. :func:`placement` simulates it and
   :func:`memcpy_edges` lists the crossings.

The record below covers the ops the lowerings emit (the ``ort`` and ``standard`` profiles, the
``effexport`` function bodies once inlined, the ``ort`` fusions), not ORT's whole registry. Read
from ONNX Runtime's sources as stored (the v1.31.x tag itself was not available to read):
``docs/OperatorKernels.md`` at commit 001d12d2623fd411ce0f83d05abb5e82304a3389 (microsoft/onnxruntime
main after 1.24: opset-25 CPU ``Cast``; the file is generated from the kernels registered in
``onnxruntime/core/providers/cuda/cuda_execution_provider.cc`` and
``onnxruntime/contrib_ops/cuda/cuda_contrib_kernels.cc`` with the type constraints of each
kernel's .cc), cross-read against ``core/providers/cuda/tensor/tile.cc`` (same commit),
``math/variadic_elementwise_ops.cc`` (Max / Min / Sum: ``uint32..int64`` and the IEEE floats with
bf16) and older ``cuda_execution_provider.cc`` versions (~1.16: ``Where`` had no bf16 kernel then).
Host-memory inputs and outputs (``InputMemoryType(OrtMemTypeCPUInput, i)``) are those of the ops'
kernel definitions (``Shape`` / ``Size`` write on the host; ``Reshape`` / ``Expand`` / ``Tile``
read their shape argument there, ``Slice`` its bounds, ``Range`` all three inputs,
GroupQueryAttention its ``total_sequence_length``, ...: :data:`.host_positions.HOST_INPUTS`).

Types are named as in OperatorKernels.md (``float``, ``float16``, ``bfloat16``, ``int64`` ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from effexport.exporter.backends.onnx.host_positions import HOST_INPUTS

__all__ = ["ORT_SOURCE", "KERNELS", "HOST_INPUTS", "HOST_OUTPUTS", "Kernel", "Unsupported", "Crossing",
           "kernel_types", "unsupported_nodes", "placement", "memcpy_edges", "inlined_typed"]

ORT_SOURCE = ("microsoft/onnxruntime docs/OperatorKernels.md @ 001d12d2623fd411ce0f83d05abb5e82304a3389 "
              "(CUDAExecutionProvider section)")

_BF, _H, _F, _D = "bfloat16", "float16", "float", "double"
_HFD = frozenset({_H, _F, _D})
_BHFD = _HFD | {_BF}
_UZIL = frozenset({"int32", "int64", "uint32", "uint64"})
_ALL = frozenset({_BF, "bool", _D, _F, _H, "int16", "int32", "int64", "int8", "uint16", "uint32", "uint64",
                  "uint8"})
_NUM = _ALL - {"bool"}  # Add / Sub / Mul / Div 14+
_IND = frozenset({"int32", "int64"})


@dataclass(frozen=True)
class Kernel:
    """One registration: opset range ``[since, until]`` (``until`` None: open) and, per type
    parameter, the tensor types it takes."""
    since: int
    until: int | None
    types: dict = field(hash=False)

    def covers(self, version: int) -> bool:
        return self.since <= version and (self.until is None or version <= self.until)


def _k(since, until=None, **types) -> Kernel:
    return Kernel(since, until, {name: frozenset(t) for name, t in types.items()})


# Where each type parameter is read: ("i", k) input k, ("o", k) output k. Default: T from input 0.
_SIGNATURES: dict[tuple[str, str], dict[str, tuple]] = {
    ("", "Cast"): {"T1": ("i", 0), "T2": ("o", 0)},
    ("", "Where"): {"B": ("i", 0), "T": ("i", 1)},
    ("", "Gather"): {"T": ("i", 0), "Tind": ("i", 1)},
    ("", "GatherElements"): {"T": ("i", 0), "Tind": ("i", 1)},
    ("", "ScatterElements"): {"T": ("i", 0), "Tind": ("i", 1)},
    ("", "Pow"): {"T": ("i", 0), "T1": ("i", 1)},
    ("", "IsInf"): {"T1": ("i", 0)},
    ("", "IsNaN"): {"T1": ("i", 0)},
    ("", "ConstantOfShape"): {"T2": ("o", 0)},
    ("", "SimplifiedLayerNormalization"): {"T": ("i", 0), "V": ("i", 1)},
    ("", "CumSum"): {"T": ("i", 0), "T2": ("i", 1)},
    ("com.microsoft", "GroupQueryAttention"): {"T": ("i", 0), "M": ("i", 5)},
    ("com.microsoft", "MultiHeadAttention"): {"T": ("i", 0), "M": ("i", 4)},
    ("com.microsoft", "RotaryEmbedding"): {"T": ("i", 0), "M": ("i", 1)},
}

KERNELS: dict[tuple[str, str], tuple[Kernel, ...]] = {
    # ai.onnx (domain ""), CUDAExecutionProvider
    ("", "Abs"): (_k(13, T=_NUM), _k(6, 12, T=_NUM - {_BF})),
    ("", "Add"): (_k(14, T=_NUM), _k(13, 13, T=_BHFD | _UZIL), _k(7, 12, T=_HFD | _UZIL)),
    ("", "Sub"): (_k(14, T=_NUM), _k(13, 13, T=_BHFD | _UZIL), _k(7, 12, T=_HFD | _UZIL)),
    ("", "Mul"): (_k(14, T=_NUM), _k(13, 13, T=_BHFD | _UZIL), _k(7, 12, T=_HFD | _UZIL)),
    ("", "Div"): (_k(14, T=_NUM), _k(13, 13, T=_BHFD | _UZIL), _k(7, 12, T=_HFD | _UZIL)),
    ("", "And"): (_k(7, T={"bool"}),),
    ("", "Or"): (_k(7, T={"bool"}),),
    ("", "Xor"): (_k(7, T={"bool"}),),
    ("", "Not"): (_k(1, T={"bool"}),),
    ("", "ArgMax"): (_k(13, T=_HFD), _k(12, 12, T=_HFD), _k(1, 11, T=_HFD)),
    ("", "ArgMin"): (_k(13, T=_HFD), _k(12, 12, T=_HFD), _k(1, 11, T=_HFD)),
    ("", "Cast"): (_k(6, T1=_ALL, T2=_ALL),),  # 6-8, 9-12 (no bf16 source), 13-18, 19-20, 21-22, 23+
    ("", "Ceil"): (_k(6, T=_HFD),),
    ("", "Floor"): (_k(6, T=_HFD),),
    ("", "Clip"): (_k(12, T=_HFD | {"int64", "int8", "uint64", "uint8"}), _k(6, 11, T={_F})),
    ("", "Concat"): (_k(4, T=_ALL),),
    ("", "Conv"): (_k(22, T=_BHFD), _k(1, 21, T=_HFD)),
    ("", "ConstantOfShape"): (_k(9, T2=_ALL),),
    ("", "Cos"): (_k(7, T=_HFD),),
    ("", "Sin"): (_k(7, T=_HFD),),
    ("", "CumSum"): (_k(14, T=_HFD | _UZIL, T2=_IND), _k(11, 13, T={_F, _D} | _UZIL, T2=_IND)),
    ("", "Einsum"): (_k(12, T=_HFD),),
    ("", "Equal"): (_k(11, T=_HFD | _UZIL | {"bool"}), _k(7, 10, T={"bool", "int32", "int64"})),
    ("", "Erf"): (_k(13, T=_BHFD), _k(9, 12, T=_HFD)),
    ("", "Exp"): (_k(13, T=_BHFD), _k(6, 12, T=_HFD)),
    ("", "Expand"): (_k(8, T=_ALL),),
    ("", "Flatten"): (_k(1, T=_ALL),),
    ("", "Gather"): (_k(1, T=_ALL, Tind=_IND),),
    ("", "GatherElements"): (_k(11, T=_ALL, Tind=_IND),),
    ("", "GatherND"): (_k(13, T={_BF, "bool", _D, _F, _H, "int64"}), _k(11, 12, T={"bool", _D, _F, _H, "int64"})),
    ("", "Gelu"): (_k(20, T=_BHFD),),
    ("", "Gemm"): (_k(13, T=_BHFD), _k(7, 12, T=_HFD)),
    ("", "Greater"): (_k(9, T=_HFD | _UZIL), _k(7, 8, T=_HFD)),
    ("", "Less"): (_k(9, T=_HFD | _UZIL), _k(7, 8, T=_HFD)),
    ("", "GreaterOrEqual"): (_k(12, T=_HFD | _UZIL),),
    ("", "LessOrEqual"): (_k(12, T=_HFD | _UZIL),),
    ("", "Identity"): (_k(1, T=_ALL),),
    ("", "IsInf"): (_k(20, T1=_BHFD), _k(10, 19, T1={_F, _D})),
    ("", "IsNaN"): (_k(13, T1=_BHFD), _k(9, 12, T1=_HFD)),
    ("", "LayerNormalization"): (_k(1, T=_BHFD),),
    ("", "Log"): (_k(6, T=_HFD),),
    ("", "LogSoftmax"): (_k(1, T=_HFD),),
    ("", "MatMul"): (_k(13, T=_BHFD), _k(1, 12, T=_HFD)),
    ("", "Max"): (_k(12, T=_BHFD | _UZIL), _k(6, 11, T=_BHFD)),
    ("", "Min"): (_k(12, T=_BHFD | _UZIL), _k(6, 11, T=_BHFD)),
    ("", "Mod"): (_k(13, T=_BHFD | _UZIL), _k(10, 12, T=_HFD | _UZIL)),
    ("", "Neg"): (_k(13, T=_BHFD | {"int16", "int32", "int64", "int8"}), _k(6, 12, T=_HFD | {"int16", "int32", "int64", "int8"})),
    ("", "NonZero"): (_k(9, T={"bool", _F, _H, "int32", "int64", "uint8"}),),
    ("", "Pad"): (_k(13, T={"bool"} | _HFD), _k(2, 12, T=_HFD)),
    ("", "Pow"): (_k(15, T=_BHFD | _IND, T1=_BHFD | _IND), _k(13, 14, T=_BHFD | _IND, T1=_HFD | _IND),
                  _k(12, 12, T=_HFD | _IND, T1=_HFD | _IND), _k(7, 11, T=_HFD)),
    ("", "RMSNormalization"): (_k(23, T=_BHFD),),
    ("", "Range"): (_k(11, T={_D, _F, "int16", "int32", "int64"}),),
    ("", "Reciprocal"): (_k(6, T=_HFD),),
    ("", "ReduceL1"): (_k(1, T=_HFD | {"int32"}),),
    ("", "ReduceL2"): (_k(1, T=_HFD | {"int32"}),),
    ("", "ReduceLogSum"): (_k(1, T=_HFD),),
    ("", "ReduceLogSumExp"): (_k(1, T=_HFD),),
    ("", "ReduceMax"): (_k(1, T=_HFD | _IND),),
    ("", "ReduceMean"): (_k(1, T=_HFD | {"int32"}),),
    ("", "ReduceMin"): (_k(1, T=_HFD | _IND | {"int8", "uint8"}),),
    ("", "ReduceProd"): (_k(1, T=_HFD | {"int32"}),),
    ("", "ReduceSum"): (_k(13, T=_BHFD | _IND), _k(1, 12, T=_HFD | _IND)),
    ("", "ReduceSumSquare"): (_k(1, T=_HFD),),
    ("", "Relu"): (_k(13, T=_BHFD), _k(6, 12, T=_HFD)),
    ("", "Reshape"): (_k(1, T=_ALL),),
    ("", "ScatterElements"): (_k(11, T=_ALL, Tind=_IND),),
    ("", "ScatterND"): (_k(11, T=_ALL),),
    ("", "Shape"): (_k(1, T=_ALL),),
    ("", "Sigmoid"): (_k(13, T=_BHFD), _k(6, 12, T=_HFD)),
    ("", "Sign"): (_k(13, T=_NUM),),
    ("", "SimplifiedLayerNormalization"): (_k(1, T=_BHFD, V=_BHFD),),  # contrib op in the onnx domain
    ("", "Size"): (_k(1, T=_ALL),),
    ("", "Slice"): (_k(1, T=_ALL),),
    ("", "Softmax"): (_k(13, T=_BHFD), _k(1, 12, T=_HFD)),
    ("", "Softplus"): (_k(1, T=_HFD),),
    ("", "Split"): (_k(2, T=_ALL),),
    ("", "Sqrt"): (_k(13, T=_BHFD), _k(6, 12, T=_HFD)),
    ("", "Squeeze"): (_k(1, T=_ALL),),
    ("", "Sum"): (_k(6, T=_BHFD),),
    ("", "Tanh"): (_k(13, T=_BHFD), _k(6, 12, T=_HFD)),
    ("", "Tile"): (_k(13, T=_BHFD | _IND), _k(6, 12, T=_HFD | _IND)),
    ("", "TopK"): (_k(1, T=_HFD | _IND),),
    ("", "Transpose"): (_k(1, T=_ALL),),
    ("", "Trilu"): (_k(14, T=_ALL),),
    ("", "Unsqueeze"): (_k(1, T=_ALL),),
    ("", "Where"): (_k(16, B={"bool"}, T=_BHFD | _IND | {"uint8"}), _k(9, 15, B={"bool"}, T=_HFD | _IND | {"uint8"})),
    # com.microsoft, CUDAExecutionProvider (contrib_ops/cuda/cuda_contrib_kernels.cc)
    ("com.microsoft", "FastGelu"): (_k(1, T=_BHFD),),
    # the exact GELU: float, double, MLFloat16 and (since microsoft/onnxruntime PR #23518, ORT 1.21)
    # BFloat16 in contrib_ops/cuda/cuda_contrib_kernels.cc @ f2d5e8ba013084f8ed708548a8a1fcc25938e906
    ("com.microsoft", "Gelu"): (_k(1, T=_BHFD),),
    ("com.microsoft", "GroupQueryAttention"): (_k(1, T={_BF, _H}, M={"int32"}),),
    ("com.microsoft", "MoE"): (_k(1, T={_BF, _F, _H}),),
    # the decode graph's prefix reads; its bf16 kernel ran graph-captured in BENCHMARKS.md run 30
    # (bench/ort_attention.py's consumer_mha_window); key_padding_mask as the per-row key count
    ("com.microsoft", "MultiHeadAttention"): (_k(1, T={_BF, _F, _H}, M={"int32"}),),
    ("com.microsoft", "RotaryEmbedding"): (_k(1, T={_BF, _F, _H}, M={"int64"}),),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (_k(1, T={_BF, _F, _H}),),
    ("com.microsoft", "SkipLayerNormalization"): (_k(1, T={_BF, _F, _H}),),
}

# Function ops ORT expands into their body where no EP has a kernel (CastLike: no CPU or CUDA
# kernel; its body is one Cast to the second input's type).
_EXPANDED = {("", "CastLike"): ("", "Cast")}


HOST_OUTPUTS: dict[tuple[str, str], frozenset[int]] = {("", "Shape"): frozenset({0}), ("", "Size"): frozenset({0})}
"""Outputs a CUDA kernel writes in host memory (``OutputMemoryType(OrtMemTypeCPUOutput, i)``)."""

_HALF = {"float16", "bfloat16", "float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz"}
_TYPE_NAMES = {onnx.TensorProto.FLOAT: _F, onnx.TensorProto.FLOAT16: _H, onnx.TensorProto.BFLOAT16: _BF,
               onnx.TensorProto.DOUBLE: _D, onnx.TensorProto.BOOL: "bool", onnx.TensorProto.STRING: "string",
               **{getattr(onnx.TensorProto, n.upper()): n for n in ("int8", "int16", "int32", "int64", "uint8",
                                                                    "uint16", "uint32", "uint64")}}


@dataclass(frozen=True)
class Unsupported:
    """A node the CUDA EP has no kernel for, and why."""
    node: str
    op: str
    domain: str
    version: int
    types: dict = field(hash=False)
    reason: str
    function: str = ""  # the effexport function whose inlined body the node came from, if any

    def __str__(self) -> str:
        types = ", ".join(f"{k}={v}" for k, v in self.types.items())  # the node name starts with its function's
        return f"{self.domain or 'ai.onnx'}::{self.op} v{self.version} [{types}] {self.node}: {self.reason}"


@dataclass(frozen=True)
class Crossing:
    """A value that crosses between the CPU and the device: ORT inserts a Memcpy node for it."""
    value: str
    producer: str  # node name ('' for a graph input)
    producer_op: str
    consumer: str
    consumer_op: str
    direction: str  # "to device" (MemcpyFromHost) or "to host" (MemcpyToHost)

    def __str__(self) -> str:
        return (f"{self.value!r} {self.direction}: {self.producer_op or 'graph input'} {self.producer} -> "
                f"{self.consumer_op} {self.consumer}")


def inlined_typed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str], dict[str, tuple]]:
    """``model`` with its local functions inlined (as ORT does before partitioning) and shapes
    inferred: (model, value name -> type name, value name -> shape tuple (ints or None))."""
    from onnx import inliner, shape_inference

    model = _copy(model)
    for fn in model.functions:  # name the inlined nodes' origin ("cca/n10__1": the inliner suffixes a call's)
        for i, node in enumerate(fn.node):
            node.name = f"{fn.name}/{node.name or f'{node.op_type}_{i}'}"
    flat = inliner.inline_local_functions(model)
    flat = shape_inference.infer_shapes(flat)
    for i, node in enumerate(flat.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    types, shapes = {}, {}
    for vi in [*flat.graph.value_info, *flat.graph.input, *flat.graph.output]:
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = _TYPE_NAMES.get(tt.elem_type, str(tt.elem_type))
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for init in flat.graph.initializer:
        types[init.name] = _TYPE_NAMES.get(init.data_type, str(init.data_type))
        shapes[init.name] = tuple(init.dims)
    return flat, types, shapes


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}


def _version(node: onnx.NodeProto, opsets: dict[str, int]) -> int:
    """The since-version of the schema ``node`` resolves to (what ORT matches kernels against)."""
    opset = opsets.get(node.domain, 1)
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain).since_version
    except Exception:  # noqa: BLE001  (contrib ops without a registered onnx schema)
        return 1 if node.domain else opset


def kernel_types(node: onnx.NodeProto, types: dict[str, str]) -> dict[str, str]:
    """The node's type parameters as the CUDA kernel lookup reads them (``T`` -> ``bfloat16``, ...)."""
    sig = _SIGNATURES.get((node.domain, node.op_type), {"T": ("i", 0)})
    out = {}
    for name, (side, k) in sig.items():
        values = node.input if side == "i" else node.output
        if k < len(values) and values[k]:
            out[name] = types.get(values[k], "?")
    return out


def _function_of(node: onnx.NodeProto) -> str:
    return node.name.split("/", 1)[0] if "/" in node.name else ""  # see inlined_typed


def _check(node: onnx.NodeProto, types: dict[str, str], opsets: dict[str, int]) -> Unsupported | None:
    key = (node.domain, node.op_type)
    if node.op_type == "Constant" and not node.domain:
        return None  # an initializer once loaded
    key = _EXPANDED.get(key, key)
    version = _version(node, opsets) if key == (node.domain, node.op_type) else opsets.get(key[0], 1)
    probe = onnx.NodeProto()
    probe.CopyFrom(node)
    probe.domain, probe.op_type = key
    got = kernel_types(probe, types)
    kernels = KERNELS.get(key)
    fn = _function_of(node)
    if kernels is None:
        return Unsupported(node.name, node.op_type, node.domain, version, got,
                           "not in the record of CUDA kernels (cuda_kernels.KERNELS): none registered, or "
                           "one not read yet", fn)
    ranges = [k for k in kernels if k.covers(version)]
    if not ranges:
        spans = ", ".join(f"{k.since}-{k.until or ''}" for k in kernels)
        return Unsupported(node.name, node.op_type, node.domain, version, got,
                           f"no CUDA kernel for opset {version} (registered: {spans})", fn)
    kernel = ranges[0]
    for name, allowed in kernel.types.items():
        t = got.get(name)
        if t is not None and t != "?" and t not in allowed:
            return Unsupported(node.name, node.op_type, node.domain, version, got,
                               f"CUDA registers {name} = {', '.join(sorted(allowed))} only", fn)
    return None


def unsupported_nodes(model: onnx.ModelProto) -> list[Unsupported]:
    """Nodes of ``model`` (local functions inlined, types inferred) the CUDA EP has no kernel for:
    they run on the CPU EP whatever their inputs."""
    flat, types, _ = inlined_typed(model)
    opsets = _opsets(flat)
    return [u for node in flat.graph.node if (u := _check(node, types, opsets)) is not None]


def _constants(flat: onnx.ModelProto, shapes: dict[str, tuple]) -> set[str]:
    """Values ORT knows before running: initializers, Constant outputs, what constant folding makes of
    nodes over constants, and ``Shape`` of a fully static shape."""
    const = {i.name for i in flat.graph.initializer}
    for node in flat.graph.node:
        if node.op_type == "Constant" and not node.domain:
            const.update(node.output)
        elif node.op_type == "Shape" and not node.domain and node.input[0] in shapes \
                and all(isinstance(d, int) for d in shapes[node.input[0]]):
            const.update(node.output)
        elif node.input and all(not i or i in const for i in node.input) and not node.domain \
                and node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"):
            const.update(node.output)
    return const


def placement(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str], set[str]]:
    """Simulate ORT's CUDA EP partitioning: (inlined model, node name -> "cuda" | "cpu" | "const",
    constant values). "cpu" nodes are those without a CUDA kernel and those ``GetCpuPreferredNodes``
    moves to the CPU (the shape arithmetic: see the module docstring)."""
    flat, types, shapes = inlined_typed(model)
    opsets = _opsets(flat)
    const = _constants(flat, shapes)
    graph_inputs = {i.name for i in flat.graph.input}
    where: dict[str, str] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in flat.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    host_values: set[str] = set()
    order = {node.name: i for i, node in enumerate(flat.graph.node)}
    candidates = []
    for node in flat.graph.node:
        if all(o in const for o in node.output):
            where[node.name] = "const"
            continue
        if _check(node, types, opsets) is not None:
            where[node.name] = "cpu"
            continue
        where[node.name] = "cuda"
        for k in HOST_OUTPUTS.get((node.domain, node.op_type), ()):
            host_values.add(node.output[k])
            candidates.extend(consumers.get(node.output[k], []))
    seen = set()
    candidates.sort(key=lambda n: order[n.name])
    while candidates:  # GetCpuPreferredNodes: a priority queue in topological order
        node = candidates.pop(0)
        if node.name in seen or where[node.name] != "cuda":
            continue
        seen.add(node.name)
        host_in = HOST_INPUTS.get((node.domain, node.op_type), ())
        ok = True
        for k, name in enumerate(node.input):
            if not name:
                continue
            if types.get(name) in _HALF:
                ok = False
                break
            if name in const or name in graph_inputs:
                continue
            if name not in host_values or k in host_in:
                ok = False
                break
        if ok:
            where[node.name] = "cpu"
            host_values.update(node.output)
            for o in node.output:
                candidates.extend(consumers.get(o, []))
            candidates.sort(key=lambda n: order[n.name])
    return flat, where, const


def memcpy_edges(model: onnx.ModelProto) -> list[Crossing]:
    """The values ORT would copy between host and device under :func:`placement` (each one a Memcpy
    node, so no CUDA graph): a CPU node's output read by a CUDA kernel in device memory, a device value
    read by a CPU node or by a CUDA kernel's host input, and a graph input read on both sides."""
    flat, where, const = placement(model)
    producer = {o: n for n in flat.graph.node for o in n.output}
    graph_inputs = {i.name for i in flat.graph.input}
    out: list[Crossing] = []
    input_sides: dict[str, list] = {}
    for node in flat.graph.node:
        if where[node.name] == "const":
            continue
        host_in = HOST_INPUTS.get((node.domain, node.op_type), ())
        for k, name in enumerate(node.input):
            if not name or name in const:
                continue
            wants_host = where[node.name] == "cpu" or k in host_in
            if name in graph_inputs:
                input_sides.setdefault(name, []).append(("host" if wants_host else "device", node))
                continue
            src = producer.get(name)
            if src is None:
                continue
            on_host = where[src.name] == "cpu" or any(
                src.output[j] == name for j in HOST_OUTPUTS.get((src.domain, src.op_type), ()))
            if on_host != wants_host:
                out.append(Crossing(name, src.name, src.op_type, node.name, node.op_type,
                                    "to host" if wants_host else "to device"))
    for name, sides in input_sides.items():
        if len({s for s, _ in sides}) == 2:
            host = next(n for s, n in sides if s == "host")
            out.append(Crossing(name, "", "", host.name, host.op_type, "to host"))
    return out
