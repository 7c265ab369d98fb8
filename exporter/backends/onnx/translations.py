"""The ONNX lowering registry: per profile (:mod:`.profiles`), one translation for every effexport op.

Ops without a standard or contrib equivalent (mHC :mod:`.functions`, CCA :mod:`.cca`, the
DeepSeek compressor / indexer / sparse attention :mod:`.compressed`) lower in every profile to one
``effexport``-domain node per call whose body, a model-local function of standard ai.onnx ops
(:mod:`._local`), lets stock ONNX Runtime execute them.

``translation_table(profile)`` is what ``torch.onnx.export(..., custom_translation_table=...)``
takes. ``REFUSED`` lists ops deliberately left without a lowering, each with the reason; the
coverage test asserts every ``OPS`` entry of every ``custom_ops`` module is in one of the two.
"""
from __future__ import annotations

from typing import Callable

from torch._ops import OpOverload

from effexport.exporter.errors import LowerError

from effexport.exporter.backends.onnx.profiles import ORT_PROFILES, PROFILES

__all__ = ["REFUSED", "translation_table"]


REFUSED: dict[OpOverload, str] = {}
"""Ops with no lowering yet, and why (none today): exporting a graph that contains one fails in
torch.onnx with "No ONNX function found"."""


def translation_table(profile: str = "ort") -> dict[OpOverload, Callable]:
    """``{OpOverload: translation}`` for ``torch.onnx.export``'s ``custom_translation_table``.

    Importing the translations registers the schemas they need (GQA, the effexport domain)."""
    if profile not in PROFILES:
        raise LowerError(f"unknown ONNX profile {profile!r}; profiles are: {', '.join(ORT_PROFILES)}")
    from effexport.exporter.backends.onnx import attention, cca, collectives, compressed, functions

    table: dict[OpOverload, Callable] = {}
    table.update(attention.TRANSLATIONS.get(profile, {}))
    table.update(functions.TRANSLATIONS)
    table.update(cca.TRANSLATIONS)
    table.update(compressed.TRANSLATIONS)
    table.update(collectives.TRANSLATIONS)  # a sharded rank program's all-reduces (--tp)
    if PROFILES[profile].tensorrt:
        from effexport.exporter.backends.onnx import tensorrt_profile

        table.update(tensorrt_profile.translations(plugins=PROFILES[profile].plugins))
    return table
