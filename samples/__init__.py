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

import dataclasses
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

    def with_layers(self, n: int) -> "Sample":
        """The same preset cut to its first ``n`` decoder layers (real widths, fewer layers: a model
        that fits one GPU, for benchmarks). Every per-layer tuple of the config is cut with it;
        DeepSeek's leading hash-routed layers are capped at ``n``, Gemma 4's trailing KV-sharing
        layers are the ones dropped first. The name gets ``@{n}L``."""
        cfg = self.config
        field = next((f for f in ("num_hidden_layers", "n_layers") if hasattr(cfg, f)), None)
        if field is None:
            raise ValueError(f"{self.name}: the config has no layer count")
        old = getattr(cfg, field)
        if not 0 < n <= old:
            raise ValueError(f"{self.name}: {n} layers asked, the preset has {old}")
        changes = {field: n}
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if isinstance(value, tuple) and len(value) == old:
                changes[f.name] = value[:n]
        if hasattr(cfg, "num_kv_shared_layers"):  # the trailing KV-sharing layers go first
            changes["num_kv_shared_layers"] = max(0, n - (old - cfg.num_kv_shared_layers))
        if hasattr(cfg, "n_hash_layers"):  # the leading hash-routed layers stay
            changes["n_hash_layers"] = min(cfg.n_hash_layers, n)
        if hasattr(cfg, "name"):
            changes["name"] = f"{cfg.name}@{n}L"
        return Sample(f"{self.name}@{n}L", self.module, dataclasses.replace(cfg, **changes))


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
