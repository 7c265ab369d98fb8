"""TensorRT plugins for the ops no TensorRT layer fits, generated from the ops' own kernels.

:func:`register_plugins` registers, through TensorRT's quickly deployable plugin API
(``tensorrt.plugin``, TensorRT >= 10.7; an ``IPluginV3`` creator per op), one plugin per
:class:`~.specs.PluginSpec`: name ``effexport::<op>``, version 1, the spec's inputs and int32 /
float32 fields. Both TensorRT routes resolve to it: the torch-tensorrt converters
(:mod:`.converters`) and the ONNX parser's plugin fallback for the ``tensorrt-plugins`` variant.

* shape function (``trtp.register``): the op's **fake kernel** runs under ``FakeTensorMode`` with
  a ``ShapeEnv`` symbol for every dynamic input dim (static dims stay ints, so the fake kernel's
  static checks still hold); each output dim's sympy expression is evaluated on TensorRT's
  ``ShapeExpr`` s (the same technique as torch-tensorrt's ``generate_plugin``, which cannot be used
  directly: it does not accept ``Tensor?`` arguments and types its fields int64 / float64, which the
  ONNX parser does not produce);
* kernel (``trtp.impl``): the op's PyTorch implementation on CUDA tensors viewing TensorRT's
  buffers, on TensorRT's stream; absent optional inputs (``has_<arg> = 0``) are passed as ``None``.

Unverified: needs TensorRT >= 10.7 (not installable on this project's machines).
"""
from __future__ import annotations

from effexport.exporter.backends.tensorrt.specs import PLUGIN_NAMESPACE, PluginSpec, plugin_specs

__all__ = ["register_plugins", "call_kernel"]

_REGISTERED: set[str] = set()


def call_kernel(spec: PluginSpec, tensors: list, fields: dict):
    """Run ``spec.op`` on ``tensors`` (in spec order) and the plugin ``fields``, mapping
    ``has_<arg> = 0`` back to ``None`` and int32 fields of bool arguments back to bools. Returns a
    tuple of outputs. Shared by the plugin kernel and its fake (shape) evaluation."""
    schema = spec.op._schema
    by_name = dict(zip(spec.tensors, tensors))
    args, kwargs = [], {}
    for arg in schema.arguments:
        if arg.name in by_name:
            value = by_name[arg.name]
            if arg.name in spec.optional and not fields[f"has_{arg.name}"]:
                value = None
        else:
            value = fields[arg.name]
            value = bool(value) if arg.type.kind() == "BoolType" else value
        (kwargs.__setitem__(arg.name, value) if arg.kwarg_only else args.append(value))
    out = spec.op(*args, **kwargs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _signature(spec: PluginSpec, tensor_type: str, extra: str = "") -> str:
    fields = ", ".join(f"{name}: {'int' if kind == 'int32' else 'float'}" for name, kind in spec.fields)
    tensors = ", ".join(f"{name}: {tensor_type}" for name in spec.tensors)
    return ", ".join(p for p in (tensors, fields, extra) if p)


def _shape_desc(spec: PluginSpec, descs: list, fields: dict):
    """Output ``TensorDesc`` s from the fake kernel (see the module docstring)."""
    import sympy
    import tensorrt as trt
    import tensorrt.plugin as trtp
    import torch
    from torch._dynamo.source import LocalSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    trt_types = {torch.float32: trt.float32, torch.float16: trt.float16, torch.bfloat16: trt.bfloat16,
                 torch.int64: trt.int64, torch.int32: trt.int32, torch.bool: trt.bool}
    torch_types = {v: k for k, v in trt_types.items()}
    env, symbols, fakes = ShapeEnv(), {}, []
    with FakeTensorMode(shape_env=env):
        for i, desc in enumerate(descs):
            dims = []
            for j in range(desc.ndim):
                expr = desc.shape_expr[j]
                if expr.is_constant:
                    dims.append(int(expr.constant_value))
                    continue
                source = LocalSource(f"in{i}_{j}")
                sym = env.create_symintnode(env.create_symbol(7, source=source, dynamic_dim=DimDynamic.DYNAMIC),
                                            hint=7, source=source)
                symbols[sym.node.expr] = expr
                dims.append(sym)
            fakes.append(torch.empty(dims, dtype=torch_types[desc.dtype]))
        outs = call_kernel(spec, fakes, fields)
    helpers = {"FloorDiv": lambda a, b: a // b, "Max": max, "Min": min}
    keys = list(symbols)
    result = []
    for out in outs:
        desc = descs[0].like()
        desc.dtype = trt_types[out.dtype]  # outputs need not share the first input's dtype (e.g. top-k indices)
        shape = trtp.ShapeExprs(out.dim())
        for i, dim in enumerate(out.shape):
            if isinstance(dim, int):
                shape[i] = dim
            else:
                shape[i] = sympy.lambdify(keys, dim.node.expr, modules=[helpers, "math"])(*[symbols[k] for k in keys])
        desc.shape_expr = shape
        result.append(desc)
    return tuple(result)


def _register_one(spec: PluginSpec) -> None:
    import tensorrt.plugin as trtp
    import torch

    key = f"{PLUGIN_NAMESPACE}::{spec.name}"
    field_names = [name for name, _ in spec.fields]
    outputs_type = "Tuple[" + ", ".join(["trtp.TensorDesc"] * spec.num_outputs) + "]"
    source = (
        "from typing import Tuple\n"
        f"def desc({_signature(spec, 'trtp.TensorDesc')}) -> {outputs_type}:\n"
        f"    return _desc(_spec, [{', '.join(spec.tensors)}], dict(zip(_fields, [{', '.join(field_names)}])))\n"
        f"def impl({_signature(spec, 'trtp.Tensor', 'outputs: Tuple[trtp.Tensor], stream: int')}) -> None:\n"
        f"    _impl(_spec, [{', '.join(spec.tensors)}], dict(zip(_fields, [{', '.join(field_names)}])), outputs, stream)\n")
    scope = {"trtp": trtp, "_spec": spec, "_fields": field_names, "_desc": _shape_desc, "_impl": _kernel,
             "torch": torch}
    exec(compile(source, f"<effexport plugin {key}>", "exec"), scope)  # noqa: S102
    trtp.register(key)(scope["desc"])
    trtp.impl(key)(scope["impl"])


def _kernel(spec: PluginSpec, tensors: list, fields: dict, outputs, stream: int) -> None:
    import torch

    inputs = [torch.as_tensor(t, device="cuda") for t in tensors]
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        results = call_kernel(spec, inputs, fields)
        for dest, value in zip(outputs, results):
            torch.as_tensor(dest, device="cuda").copy_(value)


def register_plugins() -> list[str]:
    """Register every effexport plugin with ``tensorrt.plugin`` (idempotent); returns the keys."""
    for spec in plugin_specs().values():
        key = f"{PLUGIN_NAMESPACE}::{spec.name}"
        if key not in _REGISTERED:
            _register_one(spec)
            _REGISTERED.add(key)
    return sorted(_REGISTERED)
