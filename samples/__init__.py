"""Reference architectures as plain eager PyTorch, with published and CPU-sized presets.

One module per architecture (``gemma4``, ``laguna``, ``zaya1``, ``deepseek_v4``); each defines a
config dataclass, ``PRESETS`` (``"gemma4-e2b"``, ``"gemma4-e2b:tiny"``, ...), ``Model`` and
``example_inputs``. This registry resolves a preset name to its module and config and builds models
(``device="meta"`` builds real-size presets without allocating weights).

Model contract (every sample):
    ``Model(config)``; ``model(input_ids [B, T], past=None) -> (logits [B, T, V], present)`` where
    ``present`` is a ``dict[str, Tensor]`` with keys ``"{layer}.{name}"``: the explicit decode cache
    (documented in each module). ``past=None`` starts at position 0; passing ``present`` back with the
    next tokens continues the sequence. ``model.param_counts() -> {"total", "effective", "active"}``.
    ``config.layer_specs(baseline=False) -> list[LayerSpec]`` (see ``samples/_spec.py``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch

SAMPLE_MODULES = ("gemma4", "laguna", "zaya1", "deepseek_v4")


class UnknownModelError(ValueError):
    """A model name that is neither a built-in preset nor a path."""


@dataclass(frozen=True)
class Sample:
    """A resolved preset: its name, the architecture module and the config."""

    name: str
    module: ModuleType
    config: object

    @property
    def tiny(self) -> bool:
        return ":" in self.name

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              seed: int = 0) -> torch.nn.Module:
        """Instantiate the model; on ``meta`` no weights are allocated, elsewhere weights are a
        deterministic random init from ``seed``."""
        if str(device) == "meta":
            with torch.device("meta"):
                return self.module.Model(self.config).to(dtype)
        torch.manual_seed(seed)
        model = self.module.Model(self.config)
        return model.to(device=device, dtype=dtype).eval()


def _modules() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{m}") for m in SAMPLE_MODULES]


def preset_names(report_only: bool = True) -> list[str]:
    """All preset names, in module order. ``report_only=False`` leaves out presets that exist only
    for accounting (e.g. ``deepseek-v3.2``, which has no model)."""
    names = []
    for mod in _modules():
        for name in mod.PRESETS:
            if report_only or name not in getattr(mod, "REPORT_ONLY", ()):
                names.append(name)
    return names


def get_sample(name: str) -> Sample:
    """Resolve a preset name; raises :class:`UnknownModelError` listing the valid names."""
    for mod in _modules():
        if name in mod.PRESETS:
            return Sample(name, mod, mod.PRESETS[name])
    valid = ", ".join(preset_names())
    raise UnknownModelError(f"unknown model {name!r}; built-in samples are: {valid}")
