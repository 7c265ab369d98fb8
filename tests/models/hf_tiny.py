"""Tiny randomly initialised Hugging Face causal LMs, one per family the installed transformers has
(no downloads): configured so that the mechanisms effexport must keep actually occur at test
lengths -- sliding windows smaller than the prompt, KV-shared layers, per-layer head counts, MoE,
CCA states.

``FAMILIES[name]`` is ``(config class, model class, config kwargs, expected)`` by class *name*
(looked up in ``transformers`` so a missing family is reported, not an ImportError); ``expected``
holds the rewrite counts the passes must report for that config.
"""
from __future__ import annotations

import torch

S, F = "sliding_attention", "full_attention"
WINDOW = 6  # sliding window of the tiny configs: smaller than every prompt the tests use

FAMILIES: dict[str, tuple[str, str, dict, dict]] = {
    # plain Llama: two causal layers, GQA
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256),
        dict(sites=2, ring=0, full=2, consumers=0, sliding=0, windows=set(), states=0)),
    # Gemma 4: layers 0 (S) and 1 (F) produce, 2 (S) and 3 (F) read them (num_kv_shared_layers=2);
    # sliding window 6, PLE, final softcap
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=16, global_head_dim=32,
        sliding_window=WINDOW, layer_types=[S, F, S, F], num_kv_shared_layers=2, hidden_size_per_layer_input=8,
        final_logit_softcapping=30.0, max_position_embeddings=256),
        dict(sites=4, ring=1, full=1, consumers=2, sliding=2, windows={WINDOW}, states=0,
             reads={2: 0, 3: 1})),
    # Gemma 3n: layer 2 (F) reads layer 1 (F), layer 0 (S) independent (num_kv_shared_layers=1);
    # AltUp / LAuReL; activation sparsity off (erf_inv has no ONNX translation, export-traps.md)
    "gemma3n": ("Gemma3nTextConfig", "Gemma3nForCausalLM", dict(
        vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=WINDOW,
        layer_types=[S, F, F], num_kv_shared_layers=1, hidden_size_per_layer_input=8, laurel_rank=8,
        altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 3, max_position_embeddings=256),
        dict(sites=3, ring=1, full=1, consumers=1, sliding=1, windows={WINDOW}, states=0, reads={2: 1})),
    # Laguna: sliding / full / sliding with 4 / 8 / 4 query heads, dense then MoE MLPs, output gate
    "laguna": ("LagunaConfig", "LagunaForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, layer_types=[S, F, S],
        num_attention_heads_per_layer=[4, 8, 4], mlp_layer_types=["dense", "sparse", "sparse"],
        moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256),
        dict(sites=3, ring=2, full=1, consumers=0, sliding=2, windows={WINDOW}, states=0, heads=[4, 8, 4])),
    # ZAYA: two CCA layers (conv window + delayed-value state per layer), top-1 MoE
    "zaya": ("ZayaConfig", "ZayaForCausalLM", dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=1, router_hidden_size=16,
        max_position_embeddings=256),
        dict(sites=2, ring=0, full=2, consumers=0, sliding=0, windows=set(), states=4, cca=2)),
}


def build(family: str, attn_implementation: str = "sdpa", seed: int = 0):
    """The tiny HF model of ``family`` (eval mode, fp32, deterministic random weights)."""
    import transformers

    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # parameters HF initialises to constants that would hide a mechanism
        for name, param in model.named_parameters():
            if name.endswith("qk_norm.temp"):  # ZAYA key temperature (zeros: every key would be 0)
                param.copy_(1 + 0.2 * torch.randn(param.shape))
    return model


def available(family: str) -> bool:
    """Whether the installed transformers has the family's classes."""
    import transformers

    config_cls, model_cls, _, _ = FAMILIES[family]
    return hasattr(transformers, config_cls) and hasattr(transformers, model_cls)
