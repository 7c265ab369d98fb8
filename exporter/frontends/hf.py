"""Hugging Face transformers models as effexport input: a directory (config.json + safetensors, no
network) or an in-memory causal LM, adapted to effexport's step contract.

The step contract (``exporter/capture.py``): ``forward(input_ids [B, T], past=None) -> (logits
[B, T, V], present)`` where ``past`` / ``present`` are flat dicts of per-layer tensors named
``"{layer}.{name}"``. :class:`HFStep` runs the transformers model *as written* -- its own mask
helpers, RoPE, attention implementation, MoE routing and the Gemma ``shared_kv_states`` side channel
-- and only supplies the cache object: a transformers ``Cache`` whose layers are HF's own layer
classes for the config (``DynamicCache(config=...)``), except that

* sliding-window layers keep every token (``DynamicLayer`` instead of ``DynamicSlidingWindowLayer``):
  the step graph then holds ``cat(past, new)`` and HF's sliding mask over the whole cache, which the
  passes recognise (mask probing) and turn into a W-slot ring -- the same as for the samples;
* KV-sharing consumers keep HF's ``DummyLayer`` (no cache; they read the producer's K/V through
  HF's side channel, so the captured graph shows consumers attending the producer's K/V nodes);
* linear-attention layers (ZAYA's conv window and delayed-value state, Qwen3-Next's gated delta net
  conv and recurrent state) keep HF's classes with a functional state update
  (:class:`_FunctionalLinearState`); their states are cache entries ``"{layer}.conv{i}"`` /
  ``"{layer}.rec{i}"`` (next to ``"{layer}.k"`` / ``"{layer}.v"`` on hybrid layers), and a layer
  with states only takes its token count from the K/V layers;
* DeepSeek V4's layers (window, CSA, HCA) are replaced as a whole by :class:`_DeepseekV4State`, which
  serves HF's own compressor / indexer code with state held in step tensors (``CACHE_ADAPTERS``).

Before every call each layer is filled from ``past`` (empty on prefill), after it the updated tensors
are read back into ``present``. Adapters that change what the model computes are avoided; where a
transformers default does not export (the MoE ``grouped_mm`` experts kernel, flash/flex attention)
the model is switched to the equivalent implementation transformers itself offers
(``batched_mm`` experts, ``sdpa`` attention), see :func:`prepare_module`.

Not covered: encoder-decoder and multimodal models (the text decoder of a multimodal checkpoint is
not extracted), padding masks (batch items share positions), beam search caches, quantized caches.
"""
from __future__ import annotations

import contextlib
import json
import math
import os

import torch
from torch import nn

from effexport.exporter.errors import BackendMissingError, LoadError, UsageError

# model types known not to capture or lower, and why (one line each; the user gets it as the error).
# Any other model type whose AutoModelForCausalLM class is a ...ForCausalLM is taken: the passes
# rewrite what they recognise and leave the rest as plain graph (--explain says what and why).
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {
    "rwkv": "RWKV carries its recurrent state in the forward's own `state` argument, not in a transformers "
            "Cache, so the step graph holds no state and does not match eager",
    "recurrent_gemma": "RecurrentGemma keeps its recurrent and attention state in module attributes (its own "
                       "_setup_cache), not in a transformers Cache, so the step graph cannot carry it (lowering "
                       "fails on the batch dimension)",
    "xlstm": "xLSTM reads its own cache class (rnn_state), not the transformers DynamicCache the step wrapper "
             "supplies, so it cannot be captured",
    "mamba": "Mamba's state-space cache path is not supported: the exported step fails in ONNX Runtime on its "
             "first call (a broadcast Add in the selective scan)",
}
# attention implementations that torch.export captures as plain graphs (others are switched to sdpa)
EXPORTABLE_ATTENTION = ("sdpa", "eager")
# the MoE experts implementation that exports (the default grouped_mm is an op with no ONNX lowering)
EXPORTABLE_EXPERTS = "batched_mm"

# per-state-index tensors of linear-attention cache layers (conv window, recurrent state)
LINEAR_STATE = (("conv_states", "conv"), ("recurrent_states", "rec"))


def require_transformers():
    """The ``transformers`` module; ``BackendMissingError`` (exit 4) with the install hint without it."""
    try:
        import transformers
    except ImportError:
        raise BackendMissingError("Hugging Face models need transformers: pip install 'effexport[hf]'") from None
    return transformers


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get else config


def prepare_module(module: nn.Module) -> nn.Module:
    """Switch ``module`` (in place) to implementations torch.export captures: eval mode, ``sdpa``
    attention (``eager`` for models without sdpa support, e.g. DeepSeek V4) unless it is ``sdpa`` or
    ``eager`` already, ``batched_mm`` MoE experts."""
    module.eval()
    config = module.config
    if getattr(config, "_attn_implementation", None) not in EXPORTABLE_ATTENTION:
        module.set_attn_implementation("sdpa" if getattr(module, "_supports_sdpa", True) else "eager")
    if getattr(config, "_experts_implementation", None) not in (None, EXPORTABLE_EXPERTS):
        module.set_experts_implementation(EXPORTABLE_EXPERTS)
    return module


def _cache_kwarg(module: nn.Module) -> str:
    """The forward's name for the cache argument (``cache`` from transformers 5.x, else
    ``past_key_values``)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class HFStep(nn.Module):
    """A transformers causal LM as an effexport step model: ``forward(input_ids, past=None) ->
    (logits, present)``; the wrapped model is ``self.hf``."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = prepare_module(hf_model)
        self.cache_arg = _cache_kwarg(hf_model)

    def new_cache(self):
        """HF's cache layers for this config: sliding layers replaced by full-length ones, linear-
        attention states made functional (see :func:`_export_layer`)."""
        from transformers.cache_utils import DynamicCache

        config = _text_config(self.hf.config)
        cache = DynamicCache(config=self.hf.config)
        adapter = CACHE_ADAPTERS.get(getattr(config, "model_type", None))
        cache.layers = adapter(config) if adapter else [_export_layer(layer) for layer in cache.layers]
        return cache

    def forward(self, input_ids: torch.Tensor, past: dict[str, torch.Tensor] | None = None):
        """Run ``input_ids [B, T]`` after the tokens held in ``past`` (None: from position 0)."""
        cache = self.new_cache()
        if past:
            for i, layer in enumerate(cache.layers):
                _fill_layer(layer, i, past)
            seen = next((layer.get_seq_length() for layer in cache.layers if _is_kv(layer) and layer.is_initialized), 0)
            for layer in cache.layers:  # states do not say how many tokens they have seen: the K/V caches do
                if isinstance(layer, _FunctionalLinearState):
                    layer.past_length = seen
        out = self.hf(input_ids=input_ids, use_cache=True, **{self.cache_arg: cache})
        present: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(cache.layers):
            present.update(_read_layer(layer, i))
        return out.logits, present


def _export_layer(layer):
    """One HF cache layer as the step graph needs it.

    ``DynamicSlidingWindowLayer`` -> ``DynamicLayer`` (keeps every token; the hybrid sliding layer
    likewise -> the hybrid full layer). Linear-attention layers update their conv / recurrent
    states with ``copy_`` into the previous tensor (a static address for CUDA graphs); here that
    tensor is a step input, so the layer is re-made as a subclass that assigns the new tensor
    instead (same values, no input mutation in the captured graph)."""
    from transformers import cache_utils as cu

    full = {cu.DynamicSlidingWindowLayer: cu.DynamicLayer}
    hybrid_sliding = getattr(cu, "LinearAttentionAndSlidingWindowAttentionLayer", None)
    if hybrid_sliding is not None:
        full[hybrid_sliding] = cu.LinearAttentionAndFullAttentionLayer
    kind = type(layer)
    if kind in full:
        linear = getattr(layer, "number_of_states", None)
        layer = full[kind]() if linear is None else full[kind](number_of_states=linear)
    mixin = getattr(cu, "LinearAttentionCacheLayerMixin", None)
    if mixin is not None and isinstance(layer, mixin):
        functional = _functional_class(type(layer))
        swapped = functional.__new__(functional)
        swapped.__dict__.update(layer.__dict__)
        swapped.record_past = True  # no in-place decode update (see _FunctionalLinearState)
        layer = swapped
    return layer


_FUNCTIONAL: dict[type, type] = {}


def _functional_class(kind: type) -> type:
    if kind not in _FUNCTIONAL:
        _FUNCTIONAL[kind] = type(f"Functional{kind.__name__}", (_FunctionalLinearState, kind), {})
    return _FUNCTIONAL[kind]


class _FunctionalLinearState:
    """Conv / recurrent state updates that assign instead of ``copy_`` (mixed in before the HF
    linear-attention layer class); values as ``LinearAttentionLayer.update_*_state``.

    ``record_past`` is set (see :func:`_export_layer`) so that HF's one-token decode updates the conv
    state through :meth:`update_conv_state` too, not with its in-place ``causal_conv1d_update``; and
    a layer with only states reports ``past_length`` (the K/V layers' length, set by
    :meth:`HFStep.forward`) as its sequence length: HF counts tokens in a tensor that starts at 0 in
    every step's fresh cache, and models take their positions from the first layer's count."""

    past_length = 0

    def get_seq_length(self) -> int:
        from transformers.cache_utils import DynamicLayer

        return DynamicLayer.get_seq_length(self) if isinstance(self, DynamicLayer) else self.past_length

    def update_conv_state(self, conv_states, state_idx: int = 0, conv_kernel_size=None, **kwargs):
        if self.conv_kernel_size[state_idx] is None:
            self.conv_kernel_size[state_idx] = conv_kernel_size or conv_states.shape[-1]
        width = self.conv_kernel_size[state_idx]
        if self.has_previous_state[state_idx]:  # the conv sees the cached window, also for T >= width
            full = torch.cat([self.conv_states[state_idx], conv_states], dim=-1)
        elif conv_states.shape[-1] < width:
            full = torch.nn.functional.pad(conv_states, (width - conv_states.shape[-1], 0))
        else:
            full = conv_states
        self.has_previous_state[state_idx] = True
        self.conv_states[state_idx] = full[..., -width:]
        self.is_conv_states_initialized[state_idx] = True
        return full

    def update_recurrent_state(self, recurrent_states, state_idx: int = 0, **kwargs):
        self.recurrent_states[state_idx] = recurrent_states
        self.is_recurrent_states_initialized[state_idx] = True
        return recurrent_states


def _is_linear(layer) -> bool:
    return hasattr(layer, "conv_states") and hasattr(layer, "has_previous_state")


def _is_kv(layer) -> bool:
    from transformers.cache_utils import DynamicLayer

    return isinstance(layer, DynamicLayer)


def _fill_layer(layer, index: int, past: dict) -> None:
    """Put ``past["{index}.*"]`` into an HF cache layer (nothing if it has none)."""
    if isinstance(layer, _StepState):
        return layer.fill(index, past)
    if _is_kv(layer) and f"{index}.k" in past:
        layer.keys, layer.values = past[f"{index}.k"], past[f"{index}.v"]
        layer.device, layer.is_initialized = layer.keys.device, True
    if _is_linear(layer):
        for i in range(layer.number_of_states):
            conv, rec = past.get(f"{index}.conv{i}"), past.get(f"{index}.rec{i}")
            if conv is not None:
                layer.conv_states[i], layer.conv_kernel_size[i] = conv, conv.shape[-1]
                layer.is_conv_states_initialized[i] = layer.has_previous_state[i] = True
                layer.dtype, layer.device = conv.dtype, conv.device
            if rec is not None:
                layer.recurrent_states[i] = rec
                layer.is_recurrent_states_initialized[i] = layer.has_previous_state[i] = True


def _read_layer(layer, index: int) -> dict:
    """The tensors an HF cache layer holds after a call, by cache name."""
    if isinstance(layer, _StepState):
        return layer.read(index)
    out = {}
    if _is_kv(layer) and getattr(layer, "is_initialized", False) and layer.keys is not None:
        out[f"{index}.k"], out[f"{index}.v"] = layer.keys, layer.values
    if _is_linear(layer):
        for attr, name in LINEAR_STATE:
            for i, tensor in getattr(layer, attr).items():
                if tensor is not None:
                    out[f"{index}.{name}{i}"] = tensor
    return out


# -------------------------------------------------------------------------------------- DeepSeek V4
class _StepState:
    """A cache layer whose whole state lives in the step's ``past`` / ``present`` dicts (``fill``
    before the call, ``read`` after it) -- for models whose own cache layers keep state that is not a
    tensor."""

    def fill(self, index: int, past: dict) -> None:
        raise NotImplementedError

    def read(self, index: int) -> dict:
        raise NotImplementedError


# DeepSeek V4 compressor state names (HF cache dict key -> effexport cache names: entries, kv, gate)
DEEPSEEK_STATES = {"compressor": ("comp", "comp_kv_state", "comp_gate_state"),
                   "indexer": ("index_k", "index_kv_state", "index_gate_state")}
DEEPSEEK_NAMES = {"compressed_sparse_attention": ("compressor", "indexer"),
                  "heavily_compressed_attention": ("compressor",), "sliding_attention": ()}


class _DeepseekV4State(_StepState):
    """One DeepSeek V4 layer's cache as step tensors, replacing ``DeepseekV4HCACache`` /
    ``DeepseekV4CSACache`` / the sliding layer (transformers' classes keep the compressor's progress
    in a Python int ``entry_count``, buffer ``T mod ratio`` leftover tokens in tensors whose length
    changes with the position, and crop the window). Served to HF's own compressor and indexer code
    through the same three methods, with the same values:

    * ``kv`` ``[B, 1, S, D]``: every token's K=V (``values`` is ``keys``); HF's sliding mask over it
      is what the passes probe, as for the other families' sliding layers;
    * per compressor (``compressor``, and ``indexer`` on CSA layers): ``comp`` / ``index_k``
      ``[B, S // r, d]`` the entries so far, and ``*_kv_state`` / ``*_gate_state`` ``[B, 2r, c]``
      fixed-size raw projections: rows ``[0, r)`` the last complete window, rows ``[r, r + S mod
      r)`` the open one (zeros after). The entry count and window start are ``S // r`` with ``S``
      the cache length, not a counter.

    ``store_compression_weights`` hands the compressor ``prev window + new complete windows + the
    open window zero-padded to r`` (always >= 2 windows, so HF's ``if n_windows > 0`` / ``> 1``
    branches take the general path at every length); the CSA overlap then comes from the previous
    window inside the chunk (``update_overlap_state`` returns nothing), and before position r its
    first-half gate is ``-inf`` (HF's "no prior window"). ``update_compressor_states`` keeps the
    entries of the new complete windows (drops the first and the open one) and, on CSA layers,
    returns them followed by ``index_topk`` zero entries: HF's indexer masks entries at or past
    ``(pos + 1) // r`` as future and turns such picks into -1, so they are never attended, and
    ``topk(min(index_topk, N))`` has a fixed k at every length (it would otherwise specialise).

    This layout is the captured graph's; the passes (``passes/_compressed_hf.py``) make ``kv`` a ring
    of the window, the entries fixed buffers and the states the compressor op's layout."""

    def __init__(self, config, layer_type: str):
        super().__init__()
        self.ratio = config.compress_rates.get(layer_type, 0)
        self.names = DEEPSEEK_NAMES[layer_type]
        self.overlap = layer_type == "compressed_sparse_attention"
        self.padding = config.index_topk if self.overlap else 0
        self.start = 0  # tokens before this call (S of the past); a SymInt while capturing
        self.entries: dict = {}
        self.states: dict = {}

    # HF cache-layer interface ---------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = self.keys
        return self.keys, self.keys

    def store_compression_weights(self, name: str, kv: torch.Tensor, gate: torch.Tensor):
        r, start = self.ratio, self.start
        held = start % r
        kv_state, gate_state = self.states.get(name) or (kv.new_zeros(kv.shape[0], 2 * r, kv.shape[-1]),) * 2
        kv = torch.cat([kv_state[:, :r + held], kv], dim=1)  # from the previous window's first token
        gate = torch.cat([gate_state[:, :r + held], gate], dim=1)
        if self.overlap:  # no window before the first one: its Ca half gets softmax weight 0
            first = torch.arange(gate.shape[1], device=gate.device) + (start - held) < r
            half = torch.arange(gate.shape[-1], device=gate.device) < gate.shape[-1] // 2
            gate = gate.masked_fill(first[:, None] & half, float("-inf"))
        pad = r - (kv.shape[1] - r) % r  # 1..r: the open window, zero-padded to r rows
        kv = torch.nn.functional.pad(kv, (0, 0, 0, pad))
        gate = torch.nn.functional.pad(gate, (0, 0, 0, pad))
        self.states[name] = (kv[:, -2 * r:], gate[:, -2 * r:])
        return kv, gate, (start - held) - r

    def update_overlap_state(self, name, chunk_kv, chunk_gate, head_dim):
        return None, None  # the previous window is the chunk's first one

    def update_compressor_states(self, name: str, compressed: torch.Tensor) -> torch.Tensor:
        new = compressed[:, 1:-1]  # drop the previous window's and the open window's entries
        old = self.entries.get(name)
        self.entries[name] = new if old is None else torch.cat([old, new], dim=1)
        if not self.padding:
            return self.entries[name]
        return torch.nn.functional.pad(self.entries[name], (0, 0, 0, self.padding))

    # step tensors ---------------------------------------------------------------------------
    def fill(self, index: int, past: dict) -> None:
        kv = past.get(f"{index}.kv")
        if kv is None:
            return
        self.keys = self.values = kv
        self.device, self.is_initialized = kv.device, True
        self.start = kv.shape[-2]
        for name in self.names:
            entries, kv_state, gate_state = (past[f"{index}.{n}"] for n in DEEPSEEK_STATES[name])
            self.entries[name], self.states[name] = entries, (kv_state, gate_state)

    def read(self, index: int) -> dict:
        out = {f"{index}.kv": self.keys}
        for name in self.names:
            entries, kv_state, gate_state = DEEPSEEK_STATES[name]
            out[f"{index}.{entries}"] = self.entries[name]
            out[f"{index}.{kv_state}"], out[f"{index}.{gate_state}"] = self.states[name]
        return out


def _deepseek_v4_layers(config) -> list:
    """A DeepSeek V4 cache: one :class:`_DeepseekV4State` layer per decoder layer."""
    from transformers.cache_utils import DynamicLayer

    if "deepseek_v4" not in _STATE_CLASSES:
        _STATE_CLASSES["deepseek_v4"] = type("DeepseekV4StepLayer", (_DeepseekV4State, DynamicLayer), {})
    return [_STATE_CLASSES["deepseek_v4"](config, kind) for kind in config.layer_types]


_STATE_CLASSES: dict[str, type] = {}
# model types whose HF cache layers are replaced as a whole (``config -> layers``)
CACHE_ADAPTERS = {"deepseek_v4": _deepseek_v4_layers}


# ----------------------------------------------------------------------------------------- loading
def _loaded(step: HFStep, name: str, source: dict):
    from effexport.exporter.frontends.model import LoadedModel

    text = _text_config(step.hf.config)
    limit = getattr(text, "max_position_embeddings", None)
    return LoadedModel(name=name, model=step, vocab_size=int(text.vocab_size), sample=None,
                       source={"kind": "hf", "model_type": getattr(text, "model_type", None),
                               "class": type(step.hf).__name__,
                               "attn_implementation": step.hf.config._attn_implementation, **source},
                       example_length=_capture_length(text), context_limit=int(limit) if limit else None)


def _capture_length(text) -> int:
    """The capture's example length (``samples._spec.capture_length``'s rule) from the config's
    sliding window, DeepSeek V4's compression rates and its indexer top-k (on CSA layers)."""
    from types import SimpleNamespace

    from effexport.samples._spec import capture_length

    layers = [SimpleNamespace(window=getattr(text, "sliding_window", None), ratio=0, topk=None)]
    rates = getattr(text, "compress_rates", None) or {}
    for kind, ratio in (rates.items() if isinstance(rates, dict) else ()):
        topk = getattr(text, "index_topk", None) if kind == "compressed_sparse_attention" else None
        layers.append(SimpleNamespace(window=None, ratio=int(ratio), topk=topk))
    return capture_length(layers)


def wrap_hf_module(module: nn.Module, name: str | None = None):
    """An in-memory transformers causal LM (``...ForCausalLM``) as a LoadedModel."""
    require_transformers()
    if not any(cls.__name__.endswith("ForCausalLM") for cls in type(module).__mro__):
        raise UsageError(f"{type(module).__name__} is not a causal LM; effexport needs the "
                         "...ForCausalLM class (logits head), e.g. AutoModelForCausalLM")
    model_type = getattr(_text_config(module.config), "model_type", None)
    if model_type in UNSUPPORTED_MODEL_TYPES:
        raise UsageError(f"{type(module).__name__}: {UNSUPPORTED_MODEL_TYPES[model_type]}")
    step = HFStep(module)
    source = {"module": type(module).__module__}
    directory = getattr(module.config, "_name_or_path", "") or ""
    if directory and is_hf_directory(directory):  # loaded from a local directory: check reloads it
        source["path"] = os.path.abspath(directory)
    return _loaded(step, name or getattr(module.config, "name_or_path", "") or type(module).__name__, source)


def check_model_type(path: str, config: dict) -> None:
    """Refuse a ``config.json`` (as a dict) that names a model type known not to export, one the
    installed transformers does not know (remote code is never run) or one with no ``...ForCausalLM``
    class (encoders, multimodal wrappers); without transformers only the first check runs."""
    model_type = config["model_type"]
    arch = ", ".join(config.get("architectures") or []) or model_type
    if model_type in UNSUPPORTED_MODEL_TYPES:
        raise LoadError(f"{path}: {arch} (model_type {model_type!r}) cannot be exported: "
                        f"{UNSUPPORTED_MODEL_TYPES[model_type]}")
    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal
    except ImportError:
        return  # loading reports the missing package
    if model_type not in CONFIG_MAPPING_NAMES:
        remote = " (its config.json names remote code, which effexport does not run)" if "auto_map" in config else ""
        raise LoadError(f"{path}: transformers {transformers.__version__} has no model_type {model_type!r}{remote}; "
                        "upgrade transformers if a newer release has it")
    cls = causal.get(model_type)
    if not cls or not cls.endswith("ForCausalLM"):
        what = f"its AutoModelForCausalLM class is {cls}" if cls else "transformers has no causal-LM class for it"
        raise LoadError(f"{path}: {arch} (model_type {model_type!r}) is not a decoder-only causal LM ({what}); "
                        "effexport exports ...ForCausalLM models: for a multimodal checkpoint save its text "
                        "model (e.g. Gemma3ForCausalLM) with save_pretrained and pass that directory")


def is_hf_directory(path: str) -> bool:
    """A directory holding a transformers ``config.json``."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def load_hf_directory(path: str, allow_missing_weights: bool = False):
    """A Hugging Face model directory (``config.json`` + ``*.safetensors``) as a LoadedModel, fp32,
    offline: nothing is downloaded and no remote code runs. Weights the model has and the files lack,
    weights the files have and the model lacks, and shape mismatches are refused (exit 2, naming the
    first few) unless ``allow_missing_weights`` (then the model keeps random weights there, and the
    LoadedModel's source records them under ``missing_weights``)."""
    transformers = require_transformers()
    if not is_hf_directory(path):
        raise LoadError(f"{path!r} is not a Hugging Face model directory (no config.json with a "
                        "model_type); save one with model.save_pretrained(DIR)")
    weights = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    if not weights:
        raise LoadError(f"{path!r} has no *.safetensors weights; save with "
                        "model.save_pretrained(DIR) (safe_serialization is the default)")
    try:
        with hub_offline(), _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            if getattr(config, "_attn_implementation", None) not in (None, *EXPORTABLE_ATTENTION):
                config._attn_implementation = None  # flash / flex: transformers' default (sdpa), needs no package
            _check_weight_count(transformers, config, path, weights)
            with torch.random.fork_rng():  # weights the files lack: the same random values every load
                torch.manual_seed(0)
                model, info = transformers.AutoModelForCausalLM.from_pretrained(
                    path, config=config, local_files_only=True, trust_remote_code=False, dtype=torch.float32,
                    use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True)
    except (ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoadError(f"cannot load {path!r} as a transformers causal LM: {first}; check that "
                        "config.json's model_type is supported by the installed transformers "
                        f"({transformers.__version__})") from None
    missing = _check_loading_info(path, info, allow_missing_weights)
    step = HFStep(model)
    source = {"path": os.path.abspath(path), "transformers": transformers.__version__}
    if missing:
        source["missing_weights"] = missing
    return _loaded(step, os.path.basename(os.path.normpath(path)) or path, source)


# parameters a config may describe beyond what its safetensors hold (random weights, fp32: 0.8 GB)
MAX_MISSING_PARAMS = 200_000_000


def _check_weight_count(transformers, config, path: str, shards: list[str]) -> None:
    """Before any allocation: the parameters the config describes (counted on the meta device) exceed
    those the safetensors files hold by at most :data:`MAX_MISSING_PARAMS` (a config of another,
    larger model would otherwise allocate its full size in random weights before the names of the
    missing tensors are known)."""
    from effexport.exporter.frontends.inputs import check_safetensors

    try:
        with torch.device("meta"):
            meta = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - transformers' own config validation raises many types
        raise LoadError(f"{os.path.join(path, 'config.json')} is refused by transformers "
                        f"({type(exc).__name__}: {str(exc).strip()[:200]}); fix the config or save it again "
                        "with model.save_pretrained(DIR)") from None
    expected = sum(p.numel() for p in meta.parameters())
    held = 0
    for shard in shards:
        for key, info in check_safetensors(os.path.join(path, shard)).items():
            if key != "__metadata__":
                held += math.prod(info["shape"])
    if expected > held + MAX_MISSING_PARAMS:
        raise LoadError(f"{path}: config.json describes {expected:,} parameters, the safetensors files hold "
                        f"{held:,}: most weights are missing (or config.json belongs to another model); copy "
                        "the whole model directory")


def _check_loading_info(path: str, info: dict, allow_missing: bool) -> dict:
    """transformers' loading report: refuse missing, unexpected and mismatched-shape tensors (exit 2,
    the first few named) unless ``allow_missing``; returns what was found (empty when complete)."""
    found = {"missing": sorted(info.get("missing_keys") or ()),
             "unexpected": sorted(info.get("unexpected_keys") or ()),
             "mismatched": sorted(f"{k}: file {list(a)}, model {list(b)}" for k, a, b in
                                  (info.get("mismatched_keys") or ()))}
    found = {k: v for k, v in found.items() if v}
    if found and not allow_missing:
        what = "; ".join(f"{len(v)} {k} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                         for k, v in found.items())
        raise LoadError(f"{path}: the safetensors weights do not match the model: {what}; copy the complete "
                        "model directory, or pass --allow-missing-weights to build with random weights there")
    return found


@contextlib.contextmanager
def _quiet(transformers):
    """transformers' loading progress bar and load report off (effexport reports what matters in one
    line); its previous settings restored."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


@contextlib.contextmanager
def hub_offline():
    """``HF_HUB_OFFLINE=1`` for the duration of a load (``local_files_only`` already keeps
    transformers off the network; this covers hub helpers that read the environment)."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before
