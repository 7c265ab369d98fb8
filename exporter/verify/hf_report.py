"""``effexport report DIR`` for a Hugging Face model directory: the analytic report from
``config.json`` alone (no weights are read; parameters are counted on the meta device).

The config's layers become :class:`~effexport.samples._spec.LayerSpec` s:

* ``layer_types`` (or, without it, every layer sliding when the config sets ``sliding_window``,
  else full): ``sliding_attention`` -> a ring of ``sliding_window``, ``full_attention`` -> a full
  cache, ``linear_attention`` (gated delta net) -> fixed-size states (conv window + recurrent state,
  fp32), any other type -> counted as a full cache, with a warning naming it;
* ``num_kv_shared_layers``: each of the last N layers is a consumer of the last earlier layer of its
  type (which becomes its owner);
* per-layer heads and head sizes (``num_attention_heads_per_layer``, ``per_layer_config``) where the
  config has them.

The baseline is the same model with every layer keeping its own full-length K/V. Active parameters
count ``num_experts_per_tok`` of the routed experts of each MoE layer. Not covered: compressed
attention (DeepSeek V4's CSA / HCA; its built-in sample reports them), CCA, chunked attention.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from effexport.samples import Sample
from effexport.samples._spec import CacheTensor, LayerSpec

S, F, LINEAR = "sliding_attention", "full_attention", "linear_attention"
BASELINE = "every layer keeps its own full-length K/V (no windows, no KV sharing)"


def layer_types(text) -> list[str]:
    """The config's attention type per layer (see the module docstring for configs without one)."""
    default = S if getattr(text, "sliding_window", None) else F
    return list(getattr(text, "layer_types", None) or [default] * text.num_hidden_layers)


def kv_shared(text) -> dict[int, int]:
    """``{consumer: producer}`` of ``num_kv_shared_layers``: the last N layers read the last earlier
    layer of their type."""
    types, shared = layer_types(text), getattr(text, "num_kv_shared_layers", 0) or 0
    first = len(types) - shared
    return {i: max(j for j in range(first) if types[j] == types[i]) for i in range(first, len(types))}


class HFLayout:
    """A transformers text config as a sample config: ``layer_specs``, ``param_counts``,
    ``max_position_embeddings``."""

    def __init__(self, text, params: dict[str, int]):
        self.text, self.params = text, params
        self.max_position_embeddings = getattr(text, "max_position_embeddings", None)
        self.unknown = sorted({t for t in layer_types(text) if t not in (S, F, LINEAR)})

    def param_counts(self) -> dict[str, int]:
        return self.params

    def _heads(self, index: int) -> tuple[int, int, int]:
        """Query heads, K/V heads and head size of layer ``index`` (per-layer configs where the config
        has them: Gemma 4's full layers use other head sizes)."""
        per_layer = getattr(self.text, "per_layer_config", None)
        t = per_layer[index] if per_layer else self.text
        heads = (getattr(self.text, "num_attention_heads_per_layer", None) or {})
        heads = heads[index] if heads else t.num_attention_heads
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return heads, getattr(t, "num_key_value_heads", None) or heads, head_dim

    def _linear(self, index: int) -> LayerSpec:
        t = self.text
        dk, dv = t.linear_key_head_dim, t.linear_value_head_dim
        conv = (2 * t.linear_num_key_heads * dk + t.linear_num_value_heads * dv) * t.linear_conv_kernel_dim
        cache = (CacheTensor("conv", "state", conv, entries=1),
                 CacheTensor("rec", "state", t.linear_num_value_heads * dk * dv, entries=1, fp32=True))
        return LayerSpec(index, "linear", "independent", index, t.linear_num_value_heads, dk, dv, cache, window=1)

    def layer_specs(self, baseline: bool = False) -> list[LayerSpec]:
        """One LayerSpec per decoder layer; ``baseline``: no windows, no sharing."""
        types, reads = layer_types(self.text), {} if baseline else kv_shared(self.text)
        owners = set(reads.values())
        specs = []
        for i, kind in enumerate(types):
            if kind == LINEAR:
                specs.append(self._linear(i))
                continue
            heads, kv, d = self._heads(i)
            window = self.text.sliding_window if kind == S and not baseline else None
            cache = () if i in reads else tuple(
                CacheTensor(name, "ring" if window else "full", kv * d, window=window) for name in ("k", "v"))
            role = "consumer" if i in reads else "owner" if i in owners else "independent"
            specs.append(LayerSpec(i, "sliding" if kind == S else "full", role, reads.get(i, i), heads, d, d, cache,
                                   window=window))
        return specs


def _param_counts(config) -> dict[str, int]:
    """Total / effective / active parameters of the model built from ``config`` on the meta device."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    text = config.get_text_config(decoder=True)
    experts = next((getattr(text, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                    if getattr(text, k, None)), 0)
    total = routed = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if experts and ".experts." in f".{name}." and "shared" not in name:
            routed += p.numel()
    active = total - routed + (routed * text.num_experts_per_tok // experts if experts else 0)
    return {"total": total, "effective": total, "active": active}


def hf_report_sample(path: str) -> Sample:
    """The report sample of a Hugging Face directory: its config only (no weights needed)."""
    from effexport.exporter.errors import LoadError
    from effexport.exporter.frontends.hf import hub_offline, require_transformers

    transformers = require_transformers()
    try:
        with hub_offline():
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LoadError(f"cannot read {path!r} as a transformers config: {first}") from None
    layout = HFLayout(config.get_text_config(decoder=True), _param_counts(config))
    name = os.path.basename(os.path.normpath(path)) or path
    return Sample(name, SimpleNamespace(BASELINE_DESCRIPTION=BASELINE), layout)
