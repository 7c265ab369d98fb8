"""Operator schemas the ONNX lowering needs registered in ``onnx.defs`` before it emits nodes.

onnxscript (and so ``torch.onnx``'s translation recorder) only emits a node whose schema
``onnx.defs.get_schema`` knows. Two kinds are registered here, idempotently:

* ``com.microsoft::GroupQueryAttention`` (ONNX Runtime contrib op). Only the inputs, outputs and
  attributes the ``ort`` profile uses are declared (up to ``head_sink``; ORT >= 1.23 has it); ORT
  reads the node with its own, complete schema.
* ``effexport::<op>`` schemas for the ops that have no standard or contrib equivalent; each such
  node in an exported model also carries an ONNX function body (see :mod:`._local`).

* ``SimplifiedLayerNormalization`` (ORT contrib op registered in the default domain) and
  ``com.microsoft::FastGelu``, which the ``ort`` profile's fusions emit (:mod:`.ort_fusions`); like
  GroupQueryAttention, only what the fusions write is declared, so ``onnx.checker`` accepts the model.

Not covered: schemas for other contrib ops (none is emitted).
"""
from __future__ import annotations

from typing import Iterable

import onnx
from onnx.defs import OpSchema

__all__ = ["MSFT_DOMAIN", "EFFEXPORT_DOMAIN", "ensure_schema", "ensure_gqa_schema", "ensure_mha_schema",
           "ensure_fusion_schemas", "make_schema"]

MSFT_DOMAIN = "com.microsoft"
EFFEXPORT_DOMAIN = "effexport"
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_ATTR_TYPES = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT, str: OpSchema.AttrType.STRING}


def ensure_schema(schema: OpSchema) -> None:
    """Register ``schema`` unless a schema of that name and domain is already known."""
    if not onnx.defs.has(schema.name, schema.domain):
        onnx.defs.register_schema(schema)


def make_schema(name: str, domain: str, inputs: Iterable[tuple[str, str, bool]],
                outputs: Iterable[tuple], attributes: Iterable[tuple[str, type]],
                type_constraints: Iterable[tuple[str, list[str]]], doc: str = "") -> OpSchema:
    """An ``OpSchema`` at version 1: inputs ``(name, type_str, optional)``, outputs
    ``(name, type_str)`` or ``(name, type_str, optional)``, attributes ``(name, python type)`` (all
    required: the lowering always writes every attribute), constraints ``(type_str, allowed types)``."""
    single, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
    return OpSchema(
        name, domain, 1, doc=doc,
        inputs=[OpSchema.FormalParameter(n, t, param_option=optional if opt else single)
                for n, t, opt in inputs],
        outputs=[OpSchema.FormalParameter(n, t, param_option=optional if opt and opt[0] else single)
                 for n, t, *opt in outputs],
        type_constraints=[(t, allowed, "") for t, allowed in type_constraints],
        attributes=[OpSchema.Attribute(n, _ATTR_TYPES[ty], "", required=False) for n, ty in attributes],
    )


def ensure_gqa_schema() -> None:
    """Register the part of ORT's ``com.microsoft::GroupQueryAttention`` the ``ort`` profile emits."""
    ensure_schema(make_schema(
        "GroupQueryAttention", MSFT_DOMAIN,
        inputs=[("query", "T", False), ("key", "T", True), ("value", "T", True),
                ("past_key", "T", True), ("past_value", "T", True), ("seqlens_k", "M", False),
                ("total_sequence_length", "M", False), ("cos_cache", "T", True),
                ("sin_cache", "T", True), ("position_ids", "P", True),
                ("attention_bias", "T", True), ("head_sink", "T", True)],
        outputs=[("output", "T"), ("present_key", "T"), ("present_value", "T")],
        attributes=[("num_heads", int), ("kv_num_heads", int), ("scale", float), ("softcap", float),
                    ("local_window_size", int), ("do_rotary", int), ("rotary_interleaved", int),
                    ("smooth_softmax", int), ("sliding_window_cache", int)],
        type_constraints=[("T", _FLOATS), ("M", ["tensor(int32)"]), ("P", ["tensor(int64)"])],
        doc="ONNX Runtime contrib GroupQueryAttention (subset declared for emission)."))


def ensure_mha_schema() -> None:
    """Register the part of ORT's ``com.microsoft::MultiHeadAttention`` the ``ort`` profile's one-token
    graph emits (query, BNSH key / value, ``key_padding_mask`` as per-row key counts)."""
    ensure_schema(make_schema(
        "MultiHeadAttention", MSFT_DOMAIN,
        inputs=[("query", "T", False), ("key", "T", True), ("value", "T", True), ("bias", "T", True),
                ("key_padding_mask", "M", True)],
        outputs=[("output", "T")],
        attributes=[("num_heads", int), ("scale", float), ("unidirectional", int)],
        type_constraints=[("T", _FLOATS), ("M", ["tensor(int32)"])],
        doc="ONNX Runtime contrib MultiHeadAttention (subset declared for emission)."))


def ensure_fusion_schemas() -> None:
    """Register the contrib ops the ``ort`` profile's fusions emit (the declared subset)."""
    ensure_schema(make_schema(
        "SimplifiedLayerNormalization", "", inputs=[("X", "T", False), ("scale", "T", False)],
        outputs=[("Y", "T")], attributes=[("axis", int), ("epsilon", float), ("stash_type", int)],
        type_constraints=[("T", _FLOATS + ["tensor(double)"])],
        doc="ONNX Runtime contrib SimplifiedLayerNormalization (RMSNorm; subset declared for emission)."))
    ensure_schema(make_schema(
        "SkipSimplifiedLayerNormalization", MSFT_DOMAIN,
        inputs=[("input", "T", False), ("skip", "T", False), ("gamma", "T", False), ("bias", "T", True)],
        outputs=[("output", "T"), ("mean", "U", True), ("inv_std_var", "U", True), ("input_skip_bias_sum", "T", True)],
        attributes=[("epsilon", float)], type_constraints=[("T", _FLOATS), ("U", ["tensor(float)"])],
        doc="ONNX Runtime contrib SkipSimplifiedLayerNormalization (residual add + RMSNorm; subset declared)."))
    ensure_schema(make_schema(
        "RotaryEmbedding", MSFT_DOMAIN,
        inputs=[("input", "T", False), ("position_ids", "M", False), ("cos_cache", "T", False),
                ("sin_cache", "T", False)],
        outputs=[("output", "T")], attributes=[("interleaved", int), ("num_heads", int),
                                               ("rotary_embedding_dim", int), ("scale", float)],
        type_constraints=[("T", _FLOATS), ("M", ["tensor(int64)"])],
        doc="ONNX Runtime contrib RotaryEmbedding (rotate-half or interleaved RoPE; subset declared)."))
    ensure_schema(make_schema(
        "FastGelu", MSFT_DOMAIN, inputs=[("X", "T", False)], outputs=[("Y", "T")], attributes=[],
        type_constraints=[("T", _FLOATS)],
        doc="ONNX Runtime contrib FastGelu (tanh GELU; subset declared for emission)."))
    ensure_schema(make_schema(
        "Gelu", MSFT_DOMAIN, inputs=[("X", "T", False)], outputs=[("Y", "T")], attributes=[],
        type_constraints=[("T", _FLOATS)],
        doc="ONNX Runtime contrib Gelu (exact, erf GELU; subset declared for emission)."))
