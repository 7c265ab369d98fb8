"""``effexport``-domain nodes whose bodies travel as model-local ONNX functions.

Every call of an op with no standard or contrib equivalent (CCA, the DeepSeek compressor / indexer /
sparse attention, mHC) is kept in the exported graph as **one** node ``effexport::<op>`` carrying the
op's static parameters as attributes; its body, made of standard ai.onnx ops, is a
``FunctionProto`` in ``model.functions``. ONNX Runtime (>= 1.30, any execution provider) inlines
the body when it has no kernel for the node; a runtime with a faster kernel can register one for
``effexport::<op>`` and read the attributes.

Why not an onnxscript function inside the translation: ``torch.onnx.export`` (torch 2.11-2.13,
onnxscript 0.7) always runs onnxscript's version converter, which starts with an ``InlinePass``
that expands every model-local function, so such calls reach the file inlined. Here the
translation instead emits an opaque node (its schema is registered in ``onnx.defs``) that has no
function while torch.onnx runs its passes; :func:`attach` adds the bodies to the final ModelProto.

Bodies come in two kinds:

* **per call site** (:func:`call`): the op's Python lowering (written with onnxscript ops, shapes
  read at translation time) is recorded by :class:`_Recorder` into a function of its own. Call
  sites with the same static shapes and parameters get byte-identical bodies and share one
  function; sites that differ get distinct bodies under the same ``(domain, name)``, told apart by
  the ``overload`` field (ONNX IR >= 10; measured: ORT 1.30 and 1.32 CPU resolve overloads);
* **generic** (:func:`call_script`): an onnxscript ``@script`` function whose parameters are ONNX
  attributes (``mhc_post``, ``mhc_head``), one function without overload for every call site.
  ``sinkhorn`` and ``mhc_pre`` are per-site bodies instead: a function cannot unroll its Sinkhorn
  on the ``iters`` attribute, and a ``Loop`` would stop ONNX Runtime's CUDA graphs (:mod:`.functions`).

The functions' default-domain opset is set to the model's when attached.

Not covered: ops whose lowering needs a variadic-output standard op (``Split``) or a subgraph
(``Loop``/``If``) inside a per-site body; :class:`_Recorder` refuses them (no body uses control
flow: ONNX Runtime inlines the bodies, and its CUDA EP refuses to capture a graph holding any).
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Iterable, Sequence

import onnx
import onnx_ir as ir
import onnxscript
from onnx.defs import OpSchema

from effexport.exporter.backends.onnx._schemas import EFFEXPORT_DOMAIN, ensure_schema, make_schema

__all__ = ["declare", "call", "call_script", "attach", "local_functions", "types_kept"]

EFFEXPORT = onnxscript.values.Opset(EFFEXPORT_DOMAIN, 1)
_TENSORS = [f"tensor({t})" for t in ("float", "float16", "bfloat16", "double", "int64", "int32", "bool")]
_FUNCTIONS: dict[tuple[str, str], onnx.FunctionProto] = {}
"""(op name, overload) -> body, filled by the translations, read by :func:`attach`."""


def declare(name: str, inputs: Sequence[str], outputs: Sequence[str],
            attributes: Iterable[tuple[str, type]] = (), optional: Sequence[str] = (), doc: str = "") -> None:
    """Register the ``effexport::<name>`` schema (every input/output its own type variable)."""
    ensure_schema(make_schema(
        name, EFFEXPORT_DOMAIN,
        inputs=[(n, f"T_{n}", n in optional) for n in inputs],
        outputs=[(n, f"T_{n}") for n in outputs], attributes=list(attributes),
        type_constraints=[(f"T_{n}", _TENSORS) for n in (*inputs, *outputs)], doc=doc))


# ------------------------------------------------------------------------------ body recording
class _Recorder:
    """An onnxscript evaluator that records every op call as an ``ir.Node`` (no evaluation).

    Inputs must be ``ir.Value``s or ``None`` (empty optional input): Python constants are refused,
    the lowerings build them with ``_build.ints`` / ``i64`` / ``f32c``. Attributes are typed from
    the op's schema."""

    def __init__(self):
        self.nodes: list[ir.Node] = []

    # onnxscript >= 0.6 calls eval_op; older releases call eval(schema, ...)
    def eval_op(self, op, args, kwargs):
        return self.eval(op.op_schema, args, kwargs)

    def eval_function(self, function, args, kwargs):
        raise TypeError(f"function {function.name} called inside a per-site body; call its ops instead")

    def eval(self, schema: OpSchema, args, kwargs):
        formal = list(schema.inputs)
        variadic = bool(formal) and formal[-1].option == OpSchema.FormalParameterOption.Variadic
        if len(args) > len(formal) and not variadic:  # a variadic last input takes the rest
            raise TypeError(f"{schema.name}: {len(args)} inputs, schema has {len(formal)}")
        for a in args:
            if a is not None and not isinstance(a, ir.Value):
                raise TypeError(f"{schema.name}: input {a!r} is not a graph value; build constants "
                                "with _build.ints / i64 / f32c")
        attrs = []
        for key, value in kwargs.items():
            if value is None:  # the generated opset classes pass every attribute, unset ones as None
                continue
            if key not in schema.attributes:
                raise TypeError(f"{schema.name}: unknown attribute {key!r}")
            kind = schema.attributes[key].type
            kind = ir.AttributeType(int(getattr(kind, "value", kind)))
            if kind in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                raise TypeError(f"{schema.name}: subgraph attributes are not supported in a per-site body")
            attrs.append(ir.convenience.convert_attribute(key, value, attr_type=kind))
        if any(o.option == OpSchema.FormalParameterOption.Variadic for o in schema.outputs):
            raise TypeError(f"{schema.name}: variadic outputs are not supported in a per-site body")
        node = ir.Node(schema.domain, schema.name, list(args), attrs, num_outputs=len(schema.outputs))
        self.nodes.append(node)
        return node.outputs[0] if len(node.outputs) == 1 else tuple(node.outputs)


def _fresh(value, name: str) -> ir.Value:
    """A function input standing for ``value`` (same dtype and shape, which the lowering reads)."""
    if value is None:
        return ir.Value(name=name)
    shape = ir.Shape(list(value.shape)) if value.shape is not None else None
    return ir.Value(name=name, type=value.type, shape=shape)


def _reachable(nodes: list[ir.Node], outputs: Sequence[ir.Value]) -> list[ir.Node]:
    """``nodes`` (in recording order) that some output depends on."""
    needed, stack = set(), [o.producer() for o in outputs if o.producer() is not None]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack += [i.producer() for i in node.inputs if i is not None and i.producer() is not None]
    return [n for n in nodes if n in needed]


def _body(name: str, lowering: Callable, inputs: Sequence[str], args: Sequence, kwargs: dict,
          attributes: Sequence[str]) -> onnx.FunctionProto:
    """Record ``lowering(*fresh inputs, **kwargs)`` as a function; value names are positional, so
    equal lowerings give equal bytes."""
    fresh = [_fresh(a, n) for n, a in zip(inputs, args)]
    recorder = _Recorder()
    with onnxscript.evaluator.default_as(recorder):
        result = lowering(*[f if a is not None else None for f, a in zip(fresh, args)], **kwargs)
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    nodes = _reachable(recorder.nodes, outputs)
    for i, out in enumerate(outputs):  # an output that is an input or repeats needs its own value
        if out.producer() is None or outputs.index(out) != i:
            node = ir.Node("", "Identity", [out])
            nodes.append(node)
            outputs[i] = node.outputs[0]
    for i, node in enumerate(nodes):
        for j, out in enumerate(node.outputs):
            out.name = f"v{i}_{j}"
        node.name = f"n{i}"
    graph = ir.Graph(fresh, outputs, nodes=nodes, opset_imports={"": 18})
    function = ir.Function(EFFEXPORT_DOMAIN, name, graph=graph, attributes=[])
    proto = ir.serde.serialize_function(function)
    proto.attribute.extend(attributes)  # declared for the node's attributes; the body bakes them in
    return proto


def call(name: str, lowering: Callable, args: Sequence, attrs: dict, kwargs: dict | None = None):
    """Emit one ``effexport::<name>`` node (schema from :func:`declare`) for ``args`` (symbolic
    values, ``None`` = absent optional input) with ``attrs`` as its attributes (bools as ints),
    and record ``lowering(*args, **kwargs)`` as its body (per call site; sites with equal bodies
    share one function). Returns the node's outputs."""
    attrs = {k: int(v) if isinstance(v, bool) else v for k, v in attrs.items()}
    inputs = [p.name for p in onnx.defs.get_schema(name, 1, EFFEXPORT_DOMAIN).inputs]
    proto = _body(name, lowering, inputs, args, kwargs or {}, list(attrs))
    overload = hashlib.sha1(proto.SerializeToString()).hexdigest()[:12]
    proto.overload = overload
    _FUNCTIONS[name, overload] = proto
    outs = _node_op(name)(*args, **attrs)
    node = (outs[0] if isinstance(outs, (tuple, list)) else outs).producer()
    node.overload = overload
    return outs


def call_script(function, args: Sequence, attrs: dict):
    """Emit one ``effexport::<name>`` node whose body is the ``@script`` ``function`` (generic:
    its attributes are ``attrs``)."""
    if (function.name, "") not in _FUNCTIONS:
        proto = function.to_function_proto()
        if flow := sorted({n.op_type for n in proto.node} & {"Loop", "Scan", "If"}):
            raise TypeError(f"{function.name}: control flow {flow} in a function body (unroll it)")
        _FUNCTIONS[function.name, ""] = proto
    return _node_op(function.name)(*args, **attrs)


def _node_op(name: str) -> onnxscript.values.Op:
    """The schema-only ``effexport::<name>`` op (an ``@script`` function of that name registered
    on the opset would otherwise be returned by attribute access, and get inlined)."""
    return onnxscript.values.Op(EFFEXPORT, name, onnx.defs.get_schema(name, 1, EFFEXPORT_DOMAIN))


@contextlib.contextmanager
def types_kept(model: ir.Model):
    """Restore the dtype of ``effexport`` node outputs after a pass (onnxscript's optimizer runs
    ONNX node inference, which knows no output type for a schema without an inference function,
    and clears the type torch.onnx set from the FX graph)."""
    saved = [(v, v.type) for n in model.graph if n.domain == EFFEXPORT_DOMAIN for v in n.outputs]
    yield
    for value, kind in saved:
        if value.type is None:
            value.type = kind


def local_functions(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(op_type, overload)`` of every ``effexport`` node of the main graph, in graph order."""
    return [(n.op_type, n.overload) for n in model.graph.node if n.domain == EFFEXPORT_DOMAIN]


def attach(model: onnx.ModelProto) -> None:
    """Add the body of every ``effexport`` node of ``model`` to ``model.functions``, importing the
    model's default-domain opset."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    have = {(f.domain, f.name, f.overload) for f in model.functions}
    for key in dict.fromkeys(local_functions(model)):
        if (EFFEXPORT_DOMAIN, *key) in have:
            continue
        if key not in _FUNCTIONS:
            raise ValueError(f"no function body recorded for effexport::{key[0]} (overload {key[1]!r})")
        proto = onnx.FunctionProto()
        proto.CopyFrom(_FUNCTIONS[key])
        del proto.opset_import[:]
        proto.opset_import.append(onnx.helper.make_opsetid("", opset))
        model.functions.append(proto)
