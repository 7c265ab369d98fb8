"""The ``tensorrt`` ONNX profile: only what the TensorRT 10 ONNX parser accepts, plus its lint.

Lowering (``translation_table("tensorrt")`` in :mod:`.translations`):

* default-domain opset 18 and IR version 10: inside the parser's opset range 9-20 of every
  TensorRT 10 release (TensorRT 10.0/10.1 ``docs/operators.md``), and what ONNX Runtime >= 1.30 loads;
* attention (all four ops) as ``MatMul`` / ``Softmax`` in fp32 with boolean masks computed in the
  graph from ``pos`` and shapes (:func:`.attention.attend_decomposed`): no ``com.microsoft``
  contrib op (``GroupQueryAttention`` is ORT-only), no ``Attention`` (opset 23; the parser has it
  only from TensorRT 10.14, 4-D, without past/present). Windowed layers keep their W-slot ring
  (the mask is ``[T, W + T]``, never ``[T, context]``); full caches grow by ``Concat``;
* CCA, the DeepSeek compressor / indexer / sparse attention and mHC: the shared translations of
  :mod:`.cca`, :mod:`.compressed`, :mod:`.functions` (standard ops, or ``effexport``-domain nodes
  with model-local function bodies). The parser imports model-local functions: it dispatches a
  node by ``op_type`` alone -- built-in importer first, then a local function of that *name*, then
  the plugin registry (onnx-tensorrt ``ModelImporter.cpp`` ``parseNode``; functions are keyed by
  name in ``importLocalFunctions``). Domains and ``overload`` are ignored, so
  :func:`make_parser_safe` gives every function body a unique name that no built-in op has.
  Function-bodied nodes were chosen over plugin nodes for the default profile because the parser
  builds them from its own layers (no plugin library needed) and ONNX Runtime runs the same file,
  so the parity check covers exactly what TensorRT parses.

Plugin variant (``profile="tensorrt-plugins"``, not in ``ORT_PROFILES``: ONNX Runtime cannot run it):
the same graph, but every op with no parser equivalent is one node whose ``op_type`` is the plugin
name, with ``plugin_version`` / ``plugin_namespace`` attributes and the plugin's fields (int32 /
float32 attributes; absent optional inputs as a zero-size placeholder with ``has_<arg> = 0``), the
interface :mod:`effexport.exporter.backends.tensorrt.specs` derives from the op schema. The parser resolves
such nodes through ``FallbackPluginImporter`` to the creators :mod:`effexport.exporter.backends.tensorrt.plugins`
registers. It is linted, not run.

Lint (:func:`lint`): op types against :data:`SUPPORTED_OPS` (data from the onnx-tensorrt operator
support matrix of TensorRT 10.1 GA, ``docs/operators.md`` at commit 96e7811, the newest release
whose matrix covers every TensorRT 10), the matrix's restrictions that this lowering can hit
(constant ``axes``, ``TopK`` sorted with constant K < 3840, no ``Loop`` scan outputs, supported
``Cast`` targets, no sparse / string constants), dtypes, domains, opset and IR version, function
names, and strict ONNX shape inference.

Not covered: the per-op dtype check inside function bodies (bodies carry no value_info) and
restrictions of ops this lowering never emits (e.g. ``Resize`` modes).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner

__all__ = ["OPSET", "IR_VERSION", "OPSET_RANGE", "MAX_IR_VERSION", "TRT_VERSION", "SOURCE", "SUPPORTED_OPS",
           "PLUGIN_DOMAIN", "translations", "make_parser_safe", "lint"]

TRT_VERSION = "10.1"
SOURCE = "onnx/onnx-tensorrt docs/operators.md, release 10.1 GA (commit 96e7811)"
OPSET = 18
IR_VERSION = 10
OPSET_RANGE = (9, 20)
"""Default-domain opsets the TensorRT 10.x ONNX parser accepts (inclusive)."""
MAX_IR_VERSION = 10
"""IR version of ONNX 1.16, the ONNX the TensorRT 10.1 parser is built with."""
PLUGIN_DOMAIN = "effexport.tensorrt"
"""Domain of plugin nodes (the parser ignores it; ONNX needs one for the custom schema)."""

_F = ("FP32", "FP16", "BF16")
_FI = _F + ("INT32", "INT64")
_ALL = _FI + ("BOOL",)
_F16 = ("FP32", "FP16")
_B = ("BOOL",)
SUPPORTED_OPS: dict[str, tuple[str, ...]] = {
    # FP32, FP16, BF16
    "Acosh": _F, "Acos": _F, "Asinh": _F, "Asin": _F, "Atanh": _F,
    "Atan": _F, "AveragePool": _F, "BatchNormalization": _F, "Ceil": _F, "Celu": _F,
    "Clip": _F, "ConvTranspose": _F, "Conv": _F, "Cosh": _F, "Cos": _F,
    "CumSum": _F, "Dropout": _F, "Einsum": _F, "Elu": _F, "Erf": _F,
    "Exp": _F, "Floor": _F, "GRU": _F, "Gemm": _F, "GlobalAveragePool": _F,
    "GlobalLpPool": _F, "GlobalMaxPool": _F, "GroupNormalization": _F, "HardSigmoid": _F, "HardSwish": _F,
    "Hardmax": _F, "ImageScaler": _F, "InstanceNormalization": _F, "IsInf": _F, "LRN": _F,
    "LSTM": _F, "LayerNormalization": _F, "LeakyRelu": _F, "LogSoftmax": _F, "Log": _F,
    "LpNormalization": _F, "LpPool": _F, "MatMul": _F, "MaxPool": _F, "MeanVarianceNormalization": _F,
    "PRelu": _F, "ParametricSoftplus": _F, "Pow": _F, "QuantizeLinear": _F, "RNN": _F,
    "RandomNormalLike": _F, "RandomNormal": _F, "RandomUniformLike": _F, "RandomUniform": _F, "Reciprocal": _F,
    "Resize": _F, "Round": _F, "ScaledTanh": _F, "Scan": _F, "Sigmoid": _F,
    "Sinh": _F, "Sin": _F, "Softmax": _F, "Softplus": _F, "Softsign": _F,
    "Sqrt": _F, "Tanh": _F, "Tan": _F, "ThresholdedRelu": _F, "Upsample": _F,
    # FP32, FP16, BF16, INT32, INT64
    "Abs": _FI, "Add": _FI, "ArgMax": _FI, "ArgMin": _FI, "DepthToSpace": _FI,
    "Div": _FI, "Equal": _FI, "GreaterOrEqual": _FI, "Greater": _FI, "IsNaN": _FI,
    "LessOrEqual": _FI, "Less": _FI, "Max": _FI, "Min": _FI, "Mod": _FI,
    "Mul": _FI, "Neg": _FI, "Pad": _FI, "Range": _FI, "ReduceL1": _FI,
    "ReduceL2": _FI, "ReduceLogSumExp": _FI, "ReduceLogSum": _FI, "ReduceMax": _FI, "ReduceMean": _FI,
    "ReduceMin": _FI, "ReduceProd": _FI, "ReduceSumSquare": _FI, "ReduceSum": _FI, "Relu": _FI,
    "ScatterElements": _FI, "ScatterND": _FI, "Scatter": _FI, "Shrink": _FI, "Sign": _FI,
    "SpaceToDepth": _FI, "Sub": _FI, "Sum": _FI, "TopK": _FI,
    # FP32, FP16, BF16, INT32, INT64, BOOL
    "Concat": _ALL, "ConstantOfShape": _ALL, "Constant": _ALL, "Expand": _ALL, "EyeLike": _ALL,
    "Flatten": _ALL, "GatherElements": _ALL, "GatherND": _ALL, "Gather": _ALL, "Identity": _ALL,
    "If": _ALL, "Loop": _ALL, "OneHot": _ALL, "Reshape": _ALL, "ReverseSequence": _ALL,
    "Shape": _ALL, "Size": _ALL, "Slice": _ALL, "Split": _ALL, "Squeeze": _ALL,
    "Tile": _ALL, "Transpose": _ALL, "Trilu": _ALL, "Unsqueeze": _ALL, "Where": _ALL,
    # FP32, FP16
    "DeformConv": _F16, "GridSample": _F16, "Mish": _F16, "NonMaxSuppression": _F16, "NonZero": _F16,
    "RoiAlign": _F16,
    # BOOL
    "And": _B, "Not": _B, "Or": _B, "Xor": _B,
    # FP32, FP16, BF16, INT32, INT64, UINT8, BOOL
    "CastLike": ("FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"), "Cast": ("FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"),
    # INT8, FP8, INT4
    "DequantizeLinear": ("INT8", "FP8", "INT4"),
    # FP32, FP16, BF16, INT8, INT32, INT64
    "Gelu": ("FP32", "FP16", "BF16", "INT8", "INT32", "INT64"),
    # FP32, FP16, BF16, FP8, INT32, INT64
    "Mean": ("FP32", "FP16", "BF16", "FP8", "INT32", "INT64"),
    # FP32, FP16, BF16,
    "Selu": _F,
}
"""ONNX op -> data types the parser supports (every "Y" row of :data:`SOURCE`)."""

_ONNX_TYPES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
               onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL",
               onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.INT8: "INT8"}
_CONSTANT_INPUTS = {"Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "ReduceMean": (1,), "ReduceSum": (1,),
                    "ReduceSumSquare": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
                    "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,),
                    "CumSum": (1,), "Pad": (3,), "TopK": (1,), "OneHot": (1,)}
"""Inputs the matrix requires to be initializers / build-time constants (by input index)."""
_TOPK_MAX = 3840


# ------------------------------------------------------------------------------------ lowering
def _attention_translations() -> dict:
    """The five attention ops, decomposed (MatMul/Softmax + position masks) in every form."""
    from effexport.exporter.backends.onnx import attention as att

    def attention(q, k, v, sinks=None, scale: float = 1.0, causal: bool = True, window: int = 0,
                  softcap: float = 0.0):
        return att._attention(q, k, v, sinks, scale, causal, window, softcap, "tensorrt")

    def attention_cache(q, k_new, v_new, k_past, v_past, sinks=None, scale: float = 1.0, window: int = 0,
                        softcap: float = 0.0):
        return att._attention_cache(q, k_new, v_new, k_past, v_past, sinks, scale, window, softcap, "tensorrt")

    def attention_ring(q, k_new, v_new, k_ring, v_ring, pos, sinks=None, scale: float = 1.0, window: int = 1,
                       softcap: float = 0.0, chunked: bool = False):
        return att._attention_ring(q, k_new, v_new, k_ring, v_ring, pos, sinks, scale, window, softcap,
                                   "tensorrt", chunked)

    def attention_read(q, k_cache, v_cache, pos, sinks=None, scale: float = 1.0, window: int = 0,
                       softcap: float = 0.0, ring: bool = False):
        return att._attention_read(q, k_cache, v_cache, pos, sinks, scale, window, softcap, ring, "tensorrt")

    def attention_buffer(q, k_new, v_new, k_buf, v_buf, pos, sinks=None, scale: float = 1.0, window: int = 0,
                         softcap: float = 0.0):
        return att._attention_buffer(q, k_new, v_new, k_buf, v_buf, pos, sinks, scale, window, softcap,
                                     "tensorrt")

    import torch

    ops = torch.ops.effexport
    return {ops.attention.default: attention, ops.attention_cache.default: attention_cache,
            ops.attention_ring.default: attention_ring, ops.attention_read.default: attention_read,
            ops.attention_buffer.default: attention_buffer}


_PY_TYPES = {"int32": "int", "float32": "float"}


def _plugin_schema(spec) -> None:
    from effexport.exporter.backends.onnx._schemas import ensure_schema, make_schema

    anything = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(int64)", "tensor(int32)",
                "tensor(bool)"]
    ensure_schema(make_schema(
        spec.name, PLUGIN_DOMAIN,
        inputs=[(name, f"T{i}", False) for i, name in enumerate(spec.tensors)],
        outputs=[(f"out{j}", f"O{j}") for j in range(spec.num_outputs)],
        attributes=[(name, int if kind == "int32" else float) for name, kind in spec.fields]
        + [("plugin_version", str), ("plugin_namespace", str)],
        type_constraints=[(f"T{i}", anything) for i in range(len(spec.tensors))]
        + [(f"O{j}", anything) for j in range(spec.num_outputs)],
        doc=f"TensorRT plugin node for effexport::{spec.name} (see effexport.exporter.backends.tensorrt.specs)."))


def _emit_plugin(spec, tensors: dict, fields: dict):
    """One plugin node: absent optional inputs become a zero-size placeholder, ``has_<arg>`` says so."""
    import onnx_ir as ir
    import onnxscript
    from onnxscript import opset18 as op

    from effexport.exporter.backends.tensorrt.specs import PLUGIN_NAMESPACE, PLUGIN_VERSION

    inputs = []
    for name in spec.tensors:
        value = tensors[name]
        if name in spec.optional:
            fields[f"has_{name}"] = value is not None
        inputs.append(op.Constant(value=ir.tensor(np.zeros(0, np.float32))) if value is None else value)
    attrs = {name: (int(fields[name]) if kind == "int32" else float(fields[name])) for name, kind in spec.fields}
    node = getattr(onnxscript.values.Opset(PLUGIN_DOMAIN, 1), spec.name)
    return node(*inputs, **attrs, plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE)


def _plugin_translation(spec):
    """A translation with the op's own signature (torch.onnx binds arguments by name)."""
    import torch

    params, schema = [], spec.op._schema
    for arg in schema.arguments:
        kind = "" if arg.name in spec.tensors else f": {_PY_TYPES[dict(spec.fields)[arg.name]]}"
        default = ""
        if arg.has_default_value():
            default = f" = {arg.default_value!r}" if arg.default_value is not None else " = None"
        if arg.kwarg_only and "*" not in params:
            params.append("*")
        params.append(f"{arg.name}{kind}{default}")
    tensors = ", ".join(f"{n!r}: {n}" for n in spec.tensors)
    fields = ", ".join(f"{n!r}: {n}" for n, _ in spec.fields if not n.startswith("has_"))
    source = (f"def {spec.name}({', '.join(params)}):\n"
              f"    return _emit(_spec, {{{tensors}}}, {{{fields}}})\n")
    scope = {"_emit": _emit_plugin, "_spec": spec, "torch": torch}
    exec(compile(source, f"<tensorrt plugin translation {spec.name}>", "exec"), scope)  # noqa: S102
    return scope[spec.name]


def translations(plugins: bool = False) -> dict:
    """What the ``tensorrt`` profile adds to the shared translations: decomposed attention; with
    ``plugins``, one plugin node per op that has no parser equivalent."""
    table = _attention_translations()
    if plugins:
        from effexport.exporter.backends.tensorrt.specs import plugin_specs

        for op, spec in plugin_specs().items():
            _plugin_schema(spec)
            table[op] = _plugin_translation(spec)
    return table


def make_parser_safe(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every model-local function a name of its own (the parser keys functions by name and
    ignores domain and ``overload``) that no built-in op has; call sites follow. In place."""
    taken = set(SUPPORTED_OPS)
    renames: dict[tuple[str, str, str], str] = {}
    for fn in model.functions:
        key = (fn.domain, fn.name, fn.overload)
        name = fn.name if fn.name not in taken else f"{fn.name}_{fn.overload or fn.domain}".replace(".", "_")
        suffix = 1
        while name in taken:
            suffix += 1
            name = f"{fn.name}_{suffix}"
        taken.add(name)
        renames[key] = name
    for fn in model.functions:
        fn.name, fn.overload = renames[fn.domain, fn.name, fn.overload], ""
    for graph_nodes in [model.graph.node] + [fn.node for fn in model.functions]:
        for node in _walk(graph_nodes):
            key = (node.domain, node.op_type, node.overload)
            if key in renames:
                node.op_type, node.overload = renames[key], ""
    return model


# ------------------------------------------------------------------------------------------ lint
def _walk(nodes):
    """Every node, recursing into subgraph attributes (Loop / If bodies)."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attr.g.node)
            for g in attr.graphs:
                yield from _walk(g.node)


def _constants(nodes, initializers) -> dict[str, object]:
    """Names of build-time constants -> numpy value (initializers and Constant outputs)."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in initializers}
    for node in _walk(nodes):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attribute[0]
            if attr.ref_attr_name:  # a function attribute: constant per call site, value unknown here
                values[node.output[0]] = None
                continue
            value = onnx.helper.get_attribute_value(attr)
            values[node.output[0]] = numpy_helper.to_array(value) if attr.type == onnx.AttributeProto.TENSOR else value
    return values


def _check_node(node, where: str, constants: dict, types: dict, problems: list) -> None:
    op = node.op_type
    if op not in SUPPORTED_OPS:
        problems.append(f"{where}: {op} is not supported by the TensorRT {TRT_VERSION} ONNX parser")
        return
    for index in _CONSTANT_INPUTS.get(op, ()):
        if index < len(node.input) and node.input[index] and node.input[index] not in constants:
            problems.append(f"{where}: {op} input {index} ({node.input[index]}) must be a build-time constant")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if not a.ref_attr_name}
    if op == "TopK":
        if attrs.get("sorted", 1) != 1:
            problems.append(f"{where}: TopK needs sorted=1")
        k = constants.get(node.input[1]) if len(node.input) > 1 else None
        k = None if k is None else np.asarray(k)
        if k is not None and int(k.reshape(-1)[0]) >= _TOPK_MAX:
            problems.append(f"{where}: TopK K={int(k.reshape(-1)[0])} must be < {_TOPK_MAX}")
    if op == "Loop" and len(node.output) != len(node.input) - 2:
        problems.append(f"{where}: Loop scan outputs are not supported")
    if op == "Constant" and set(attrs) & {"sparse_value", "value_string", "value_strings"}:
        problems.append(f"{where}: Constant with a sparse or string value")
    if op in ("Cast", "CastLike") and "to" in attrs and _ONNX_TYPES.get(attrs["to"]) not in SUPPORTED_OPS[op]:
        problems.append(f"{where}: Cast to {onnx.TensorProto.DataType.Name(attrs['to'])}")
    if op == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
        problems.append(f"{where}: ScatterND reduction is not supported")
    data = node.input[1] if op == "Where" else (node.input[0] if node.input else "")
    dtype = types.get(data)
    if dtype is not None and _ONNX_TYPES.get(dtype) not in SUPPORTED_OPS[op]:
        problems.append(f"{where}: {op} on {onnx.TensorProto.DataType.Name(dtype)} is not supported")


def _check_plugin(node, where: str, problems: list) -> None:
    from effexport.exporter.backends.tensorrt.specs import PLUGIN_NAMESPACE, PLUGIN_VERSION, plugin_specs

    specs = {s.name: s for s in plugin_specs().values()}
    spec = specs.get(node.op_type)
    if spec is None:
        problems.append(f"{where}: {node.op_type} is not an effexport TensorRT plugin")
        return
    attrs = {a.name: a for a in node.attribute}
    for name, value in (("plugin_version", PLUGIN_VERSION), ("plugin_namespace", PLUGIN_NAMESPACE)):
        if name not in attrs or attrs[name].s.decode() != value:
            problems.append(f"{where}: {name} must be {value!r}")
    want = {name: onnx.AttributeProto.INT if kind == "int32" else onnx.AttributeProto.FLOAT
            for name, kind in spec.fields}
    for name, kind in want.items():
        if name not in attrs or attrs[name].type != kind:
            problems.append(f"{where}: plugin field {name} missing or of the wrong type")
    extra = set(attrs) - set(want) - {"plugin_version", "plugin_namespace"}
    if extra:
        problems.append(f"{where}: attributes {sorted(extra)} are not fields of plugin {spec.name}")
    if len(node.input) != len(spec.tensors) or not all(node.input):
        problems.append(f"{where}: plugin {spec.name} needs {len(spec.tensors)} inputs, got {list(node.input)}")
    if len(node.output) != spec.num_outputs:
        problems.append(f"{where}: plugin {spec.name} has {spec.num_outputs} outputs, got {len(node.output)}")


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    return types


def lint(model: onnx.ModelProto, plugins: bool = False) -> list[str]:
    """Everything in ``model`` the TensorRT 10 ONNX parser would reject, one line each (empty: clean).

    Function names are checked on ``model``; everything else on a copy with the model-local
    functions inlined (what the parser imports, layer by layer), after strict shape inference, so
    the op, restriction and dtype checks see every node of every body with its inferred types.
    ``plugins``: plugin nodes (domain :data:`PLUGIN_DOMAIN`) are allowed and checked against their
    :class:`~effexport.exporter.backends.tensorrt.specs.PluginSpec`; shape inference then stops at them (ONNX
    cannot infer through a plugin; TensorRT asks the plugin), so it is not required to succeed."""
    problems: list[str] = []
    opset = {o.domain: o.version for o in model.opset_import}
    default = opset.get("", opset.get("ai.onnx"))
    if default is None or not OPSET_RANGE[0] <= default <= OPSET_RANGE[1]:
        problems.append(f"default-domain opset {default} outside the parser's range {OPSET_RANGE}")
    if model.ir_version > MAX_IR_VERSION:
        problems.append(f"IR version {model.ir_version} > {MAX_IR_VERSION}")
    names = [f.name for f in model.functions]
    if len(set(names)) != len(names):
        problems.append("several model-local functions share a name (the parser keys them by name); "
                        "run make_parser_safe")
    problems += [f"function {n} shadows a built-in op" for n in names if n in SUPPORTED_OPS]
    flat = onnx.inliner.inline_local_functions(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(flat, check_type=True, strict_mode=not plugins, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError / ValidationError
        problems.append(f"strict shape inference failed: {str(exc).splitlines()[0]}")
        inferred = flat
    if not plugins:
        problems += [f"output {v.name}: shape not inferred" for v in inferred.graph.output
                     if not v.type.tensor_type.HasField("shape")]
    types = _value_types(inferred)
    for name, dtype in types.items():
        if _ONNX_TYPES.get(dtype) in (None, "INT8"):
            problems.append(f"tensor {name}: {onnx.TensorProto.DataType.Name(dtype)} is not a TensorRT type here")
    io = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    problems += [f"tensor {n}: UINT8 only for network I/O" for n, t in types.items()
                 if t == onnx.TensorProto.UINT8 and n not in io]
    constants = _constants(inferred.graph.node, inferred.graph.initializer)
    for node in _walk(inferred.graph.node):
        where = f"node {node.name or node.op_type}"
        if node.domain in ("", "ai.onnx"):
            _check_node(node, where, constants, types, problems)
        elif plugins and node.domain == PLUGIN_DOMAIN:
            _check_plugin(node, where, problems)
        else:
            problems.append(f"{where}: {node.domain}::{node.op_type} has no parser importer, function or plugin")
    return problems
