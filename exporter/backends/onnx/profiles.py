"""ONNX profiles as values: each :class:`Profile` says everything that differs between profiles, and
the rest of the ONNX backend reads these fields instead of testing a profile's name.

* ``ort`` (default): ONNX Runtime contrib ops where one fits (``com.microsoft::GroupQueryAttention``),
  ai.onnx opset 18 otherwise, then the ONNX Runtime fusions (:mod:`.ort_fusions`).
* ``standard``: ai.onnx only, opset 23 (``Attention`` where exact).
* ``tensorrt``: what the TensorRT 10 ONNX parser accepts, opset 18 (:mod:`.tensorrt_profile`).
* ``tensorrt-plugins``: its plugin variant (plugin nodes; ONNX Runtime cannot run it).

The translation table of a profile is :func:`.translations.translation_table`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """One ONNX profile."""

    name: str
    opset: int  # default-domain opset (``standard`` needs 23 for ``Attention``)
    ir_version: int  # the lowest the opset allows (23 needs IR 11); ORT 1.30 loads IR <= 13
    gqa: bool = False  # attention lowers to com.microsoft::GroupQueryAttention where it fits
    attention23: bool = False  # attention lowers to ai.onnx Attention-23 where exact (else MatMul-Softmax)
    tensorrt: bool = False  # the TensorRT parser's subset (:mod:`.tensorrt_profile`)
    plugins: bool = False  # TensorRT plugin nodes instead of function-bodied effexport nodes
    ort_fusions: bool = False  # post-lowering fusions for ONNX Runtime (:func:`.ort_fusions.fuse_for_ort`)
    gqa_rows: bool = False  # runtime quirk: GQA refuses T > 1 new tokens on a non-empty cache at B > 1,
    # so the runtime feeds such a chunk one batch row at a time (:meth:`.runtime.OrtRuntime.step`)
    selectable: bool = False  # offered by ``--profile`` (the tensorrt ones come with ``--target tensorrt``)

    @property
    def ort_runs(self) -> bool:
        """ONNX Runtime can run a model of this profile (plugin nodes it cannot)."""
        return not self.plugins


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("ort", 18, 10, gqa=True, ort_fusions=True, gqa_rows=True, selectable=True),
    Profile("standard", 23, 11, attention23=True, selectable=True),
    Profile("tensorrt", 18, 10, tensorrt=True),
    Profile("tensorrt-plugins", 18, 10, tensorrt=True, plugins=True),
)}
def recorded(name) -> Profile | None:
    """The profile an artifact's manifest names (None: no ONNX profile, or a name no profile has)."""
    return PROFILES.get(name) if isinstance(name, str) else None


SELECTABLE = tuple(name for name, p in PROFILES.items() if p.selectable)
"""``--profile`` choices."""
ORT_PROFILES = tuple(name for name, p in PROFILES.items() if p.ort_runs)
"""The profiles ONNX Runtime runs (what the lowering tests check numerically)."""
