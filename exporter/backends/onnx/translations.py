"""The ONNX lowering registry: per profile, one translation for every effexport op.

Profiles (``PROFILES``):

* ``ort`` (default): ONNX Runtime contrib ops where one fits (``com.microsoft::GroupQueryAttention``
  for full-cache and prefill attention), ai.onnx opset 18 otherwise.
* ``standard``: ai.onnx only, opset 23 (``Attention`` where exact).
* ``tensorrt``: what the TensorRT 10 ONNX parser accepts, opset 18 (:mod:`.tensorrt_profile`);
  its plugin variant ``tensorrt-plugins`` (plugin nodes, not runnable by ORT) is not in ``PROFILES``.

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

__all__ = ["PROFILES", "OPSET", "IR_VERSION", "REFUSED", "translation_table"]

PROFILES = ("ort", "standard", "tensorrt")
OPSET = {"ort": 18, "standard": 23, "tensorrt": 18, "tensorrt-plugins": 18}
"""Default-domain opset per profile (``standard`` needs 23 for ``Attention``)."""
IR_VERSION = {"ort": 10, "standard": 11, "tensorrt": 10, "tensorrt-plugins": 10}
"""IR version written per profile: the lowest the opset allows (23 needs IR 11); ORT 1.30 loads
IR <= 13 (ONNX ``helper.make_model`` would write a newer one)."""


REFUSED: dict[OpOverload, str] = {}
"""Ops with no lowering yet, and why (none today): exporting a graph that contains one fails in
torch.onnx with "No ONNX function found"."""


def translation_table(profile: str = "ort") -> dict[OpOverload, Callable]:
    """``{OpOverload: translation}`` for ``torch.onnx.export``'s ``custom_translation_table``.

    Importing the translations registers the schemas they need (GQA, the effexport domain)."""
    if profile not in OPSET:
        raise LowerError(f"unknown ONNX profile {profile!r}; profiles are: {', '.join(PROFILES)}")
    from effexport.exporter.backends.onnx import attention, cca, compressed, functions

    table: dict[OpOverload, Callable] = {}
    table.update(attention.TRANSLATIONS.get(profile, {}))
    table.update(functions.TRANSLATIONS)
    table.update(cca.TRANSLATIONS)
    table.update(compressed.TRANSLATIONS)
    if profile.startswith("tensorrt"):
        from effexport.exporter.backends.onnx import tensorrt_profile

        table.update(tensorrt_profile.translations(plugins=profile == "tensorrt-plugins"))
    return table
