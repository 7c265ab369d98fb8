"""The ONNX lowering registry: per profile, one translation for every effexport op.

Profiles (``PROFILES``):

* ``ort`` (default): ONNX Runtime contrib ops where one fits (``com.microsoft::GroupQueryAttention``
  for full-cache and prefill attention), ai.onnx opset 18 otherwise.
* ``standard``: ai.onnx only, opset 23 (``Attention`` where exact).

Ops without a standard or contrib equivalent (CCA, mHC, the DeepSeek compressor / indexer /
sparse attention) lower in both profiles to a node in the ``effexport`` domain whose schema is
registered in ``onnx.defs`` and whose ONNX function body (standard ops) travels in the model, so
stock ONNX Runtime executes it (:mod:`.functions`).

``translation_table(profile)`` is what ``torch.onnx.export(..., custom_translation_table=...)``
takes. ``REFUSED`` lists ops deliberately left without a lowering, each with the reason; the
coverage test asserts every ``OPS`` entry of every ``custom_ops`` module is in one of the two.
"""
from __future__ import annotations

from typing import Callable

from torch._ops import OpOverload

from effexport.exporter.errors import LowerError

__all__ = ["PROFILES", "OPSET", "IR_VERSION", "REFUSED", "translation_table"]

PROFILES = ("ort", "standard")
OPSET = {"ort": 18, "standard": 23}
"""Default-domain opset per profile (``standard`` needs 23 for ``Attention``)."""
IR_VERSION = {"ort": 10, "standard": 11}
"""IR version written per profile: the lowest the opset allows (23 needs IR 11); ORT 1.30 loads
IR <= 13 (ONNX ``helper.make_model`` would write a newer one)."""


def _refused() -> dict[OpOverload, str]:
    import torch

    import effexport.custom_ops.cca  # noqa: F401
    import effexport.custom_ops.indexer_topk  # noqa: F401
    import effexport.custom_ops.kv_compress  # noqa: F401
    import effexport.custom_ops.sparse_attention  # noqa: F401

    ops = torch.ops.effexport
    todo = "no ONNX function body written yet (planned: effexport-domain schema + body of standard ops)"
    return {ops.cca.default: todo,
            ops.kv_compress.default: todo, ops.kv_compress_step.default: todo,
            ops.indexer_topk.default: todo + "; parity needs tie-free scores (export-traps.md)",
            ops.sparse_attention.default: todo, ops.sparse_attention_ring.default: todo}


REFUSED: dict[OpOverload, str] = _refused()
"""Ops with no lowering yet, and why: exporting a graph that contains one fails in torch.onnx
with "No ONNX function found"."""


def translation_table(profile: str = "ort") -> dict[OpOverload, Callable]:
    """``{OpOverload: translation}`` for ``torch.onnx.export``'s ``custom_translation_table``.

    Importing the translations registers the schemas they need (GQA, the effexport domain)."""
    if profile not in PROFILES:
        raise LowerError(f"unknown ONNX profile {profile!r}; profiles are: {', '.join(PROFILES)}")
    from effexport.exporter.onnx import attention, functions

    table: dict[OpOverload, Callable] = {}
    table.update(attention.TRANSLATIONS[profile])
    table.update(functions.TRANSLATIONS)
    return table
