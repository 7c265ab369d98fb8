"""How every effexport op reaches TensorRT, as data (no TensorRT import; the coverage test reads it).

Two kinds (:data:`ROUTES`):

* ``layers``: a torch-tensorrt converter built from TensorRT network layers (matrix multiply,
  softmax, elementwise, gather, ...) in :mod:`.converters` -- the attention ops, whose masks are
  computed from positions exactly like the ONNX lowering (windows stay W-slot rings);
* ``plugin``: a TensorRT plugin (``IPluginV3`` through TensorRT's quickly deployable plugin API,
  ``tensorrt.plugin``, TensorRT >= 10.7) whose kernel is the op's own PyTorch kernel and whose shape
  function is the op's fake (meta) kernel -- for the ops no layer fits: CCA, the DeepSeek
  compressor / indexer / sparse attention, and mHC (:mod:`.plugins`).

A plugin's interface is derived from the op's schema by :func:`plugin_spec` and shared by both
routes (the torch-tensorrt converter and the ``tensorrt`` ONNX profile's plugin nodes), so one
registered plugin creator serves both:

* name ``<op>``, namespace ``effexport``, version ``1`` (the ONNX parser looks plugins up by the
  node's ``op_type`` plus its ``plugin_version`` / ``plugin_namespace`` attributes);
* inputs: every tensor argument in schema order; an optional tensor that is absent is fed as a
  zero-size placeholder and flagged by the int field ``has_<arg> = 0``;
* fields: every non-tensor argument, ``int``/``SymInt``/``bool`` as 32-bit ints and ``float`` as 32-bit
  floats -- the types the ONNX parser produces from ``INT`` / ``FLOAT`` node attributes
  (onnx-tensorrt ``loadFields``: INT -> kINT32, FLOAT -> kFLOAT32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._ops import OpOverload

__all__ = ["ROUTES", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "PluginSpec", "plugin_spec", "plugin_specs",
           "route_table"]

PLUGIN_NAMESPACE = "effexport"
PLUGIN_VERSION = "1"

ROUTES = {
    "attention": "layers", "attention_cache": "layers", "attention_ring": "layers", "attention_read": "layers",
    "attention_buffer": "layers",
    "cca": "plugin", "kv_compress": "plugin", "kv_compress_step": "plugin", "indexer_topk": "plugin",
    "sparse_attention": "plugin", "sparse_attention_ring": "plugin",
    "sinkhorn": "plugin", "mhc_pre": "plugin", "mhc_post": "plugin", "mhc_head": "plugin",
}
"""op name -> ``layers`` (converter of TensorRT layers) or ``plugin`` (plugin from the op's kernels)."""


@dataclass(frozen=True)
class PluginSpec:
    """The TensorRT plugin interface of one effexport op."""

    op: OpOverload
    name: str
    tensors: tuple[str, ...]
    optional: tuple[str, ...]
    fields: tuple[tuple[str, str], ...]  # (name, "int32" | "float32"), has_* flags included
    num_outputs: int

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)


def _field_type(arg) -> str:
    kind = arg.type.kind()
    if kind in ("IntType", "SymIntType", "BoolType"):
        return "int32"
    if kind == "FloatType":
        return "float32"
    raise TypeError(f"{arg.name}: argument type {arg.type} cannot be a TensorRT plugin field")


def _is_tensor(arg) -> bool:
    kind = arg.type.kind()
    if kind == "OptionalType":
        kind = arg.type.getElementType().kind()
    return kind == "TensorType"


def plugin_spec(op: OpOverload) -> PluginSpec:
    """The plugin interface of ``op`` from its schema (see the module docstring)."""
    schema = op._schema
    tensors, optional, fields = [], [], []
    for arg in schema.arguments:
        if _is_tensor(arg):
            tensors.append(arg.name)
            if arg.type.kind() == "OptionalType":
                optional.append(arg.name)
        else:
            fields.append((arg.name, _field_type(arg)))
    fields += [(f"has_{name}", "int32") for name in optional]
    return PluginSpec(op, schema.name.split("::")[-1], tuple(tensors), tuple(optional), tuple(fields),
                      len(schema.returns))


def route_table() -> dict[OpOverload, str]:
    """``{OpOverload: route}`` for every op in :data:`effexport.custom_ops.ALL_OPS` that has a route."""
    from effexport.custom_ops import ALL_OPS

    return {op: ROUTES[op._schema.name.split("::")[-1]] for op in ALL_OPS
            if op._schema.name.split("::")[-1] in ROUTES}


def plugin_specs() -> dict[OpOverload, PluginSpec]:
    """``{OpOverload: PluginSpec}`` of every op routed to a plugin."""
    return {op: plugin_spec(op) for op, route in route_table().items() if route == "plugin"}


def placeholder() -> torch.Tensor:
    """The zero-size tensor fed for an absent optional input (its ``has_<arg>`` field is 0)."""
    return torch.zeros(0)
