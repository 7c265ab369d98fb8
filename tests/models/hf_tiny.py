"""Tiny randomly initialised Hugging Face causal LMs, one per family the installed transformers has
(no downloads): configured so that the mechanisms effexport must keep actually occur at test
lengths -- sliding windows smaller than the prompt, KV-shared layers, per-layer head counts, MoE,
CCA states -- and with the constants HF initialises that would hide a mechanism spread out (every
norm gain; ZAYA temperatures; DeepSeek sinks, biases, scales and hash routing: :func:`build`).

``FAMILIES[name]`` is ``(config class, model class, config kwargs, expected)`` by class *name*
(looked up in ``transformers`` so a missing family is reported, not an ImportError); ``expected``
holds the rewrite counts the passes must report for that config.
"""
from __future__ import annotations

import torch

S, F = "sliding_attention", "full_attention"
CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
WINDOW = 6  # sliding window of the tiny configs: smaller than every prompt the tests use
CHUNK = 8  # Llama 4's attention chunk

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
    # AltUp / LAuReL; activation sparsity off (erf_inv has no ONNX translation)
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
    # DeepSeek V4: window-only, CSA (ratio 4, indexer top-4), HCA (ratio 16); window 8; mHC with 4
    # streams (3 Sinkhorn iterations instead of 20: a smaller graph, the same pattern); hash-routed
    # MoE on layer 0, top-k MoE after. Expected: every mHC mixing folded, every compressor left alone
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM", dict(
        vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        head_dim=32, q_lora_rank=32, n_routed_experts=4, num_experts_per_tok=2, sliding_window=8, o_groups=2,
        o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=4, layer_types=[S, CSA, HCA],
        compress_rates={CSA: 4, HCA: 16}, mlp_layer_types=["hash_moe", "moe", "moe"], hc_sinkhorn_iters=3,
        max_position_embeddings=256),
        dict(mhc_pre=6, mhc_post=6, mhc_head=1, compressors=3)),
    # Mistral: every layer sliding (window 6), GQA
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=WINDOW, max_position_embeddings=256),
        dict(sites=2, ring=2, full=0, consumers=0, sliding=2, windows={WINDOW}, states=0)),
    # Qwen2: sliding from layer max_window_layers=1 on (layer 0 full), attention biases
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        max_position_embeddings=256),
        dict(sites=3, ring=2, full=1, consumers=0, sliding=2, windows={WINDOW}, states=0)),
    # Qwen3: Q/K RMS norms, GQA, full attention
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
        dict(sites=2, ring=0, full=2, consumers=0, sliding=0, windows=set(), states=0)),
    # Gemma 2: sliding / full alternating, attention-logit and final softcaps
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, layer_types=[S, F],
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=256),
        dict(sites=2, ring=1, full=1, consumers=0, sliding=1, windows={WINDOW}, states=0)),
    # Gemma 3 (text): sliding / sliding / full, Q/K norms, local RoPE base
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, layer_types=[S, S, F],
        max_position_embeddings=256),
        dict(sites=3, ring=2, full=1, consumers=0, sliding=2, windows={WINDOW}, states=0)),
    # Cohere 2: sliding / full, parallel attention + MLP block, logit scale
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=WINDOW, layer_types=[S, F], max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
        dict(sites=2, ring=1, full=1, consumers=0, sliding=1, windows={WINDOW}, states=0)),
    # OLMo 3: sliding / sliding / full, post-norms, Q/K norms over all heads
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=WINDOW, layer_types=[S, S, F], max_position_embeddings=256,
        eos_token_id=2, pad_token_id=1),
        dict(sites=3, ring=2, full=1, consumers=0, sliding=2, windows={WINDOW}, states=0)),
    # Phi-3: fused QKV and gate-up projections, partial rotary, sliding window on every layer
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=WINDOW, max_position_embeddings=256,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
        dict(sites=2, ring=2, full=0, consumers=0, sliding=2, windows={WINDOW}, states=0)),
    # GPT-OSS: attention sinks, sliding / full alternating, top-2 of 4 experts, YaRN RoPE
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, layer_types=[S, F], num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256,
        rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32.0,
                             beta_slow=1.0, truncate=False, rope_theta=150000.0)),
        dict(sites=2, ring=1, full=1, consumers=0, sliding=1, windows={WINDOW}, states=0)),
    # Qwen3-Next: gated delta net (linear attention: causal conv + recurrent state) / full attention
    # with output gate, top-2 of 4 experts and a shared expert
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, layer_types=["linear_attention", F], linear_conv_kernel_dim=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256),
        dict(sites=1, ring=0, full=1, consumers=0, sliding=0, windows=set(), states=2)),
    # Llama 4 (text): chunked attention (chunks of 8) with complex RoPE on layers 0-1 (layer 1 MoE),
    # NoPE full attention with attention temperature tuning on layer 2 (floor_scale 8)
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=CHUNK,
        num_local_experts=4, num_experts_per_tok=1, moe_layers=[1], no_rope_layers=[1, 1, 0],
        max_position_embeddings=256, floor_scale=8),
        dict(sites=3, ring=0, full=1, consumers=0, sliding=0, windows=set(), states=0, chunk=2)),
}


DEEPSEEK_OFFSETS = ("sinks", "position_bias", "base", "hc_base")
DEEPSEEK_SCALES = ("scale", "hc_scale")


# Held-out configs: built and checked like FAMILIES by the CLI matrix (tests/test_hf_families.py),
# not part of the graph-level matrix (tests/test_hf.py)
HELD_OUT: dict[str, tuple[str, str, dict, dict]] = {
    # DeepSeek V4 with transformers' defaults where FAMILIES["deepseek_v4"] sets its own: compress_rates
    # (CSA 4, HCA 128: one block is longer than the test prompts of FAMILIES), index_topk (512: more
    # than the entries at every test length) and mlp_layer_types (the first 3 layers hash-routed, then
    # top-k); window 8; a window-only, a CSA, an HCA and a second CSA layer
    "deepseek_v4_defaults": ("DeepseekV4Config", "DeepseekV4ForCausalLM", dict(
        vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        head_dim=32, q_lora_rank=32, n_routed_experts=4, num_experts_per_tok=2, sliding_window=8, o_groups=2,
        o_lora_rank=16, index_n_heads=2, index_head_dim=16, layer_types=[S, CSA, HCA, CSA], hc_sinkhorn_iters=3,
        max_position_embeddings=512),
        dict(mhc_pre=8, mhc_post=8, mhc_head=1, compressors=5)),
}


def build(family: str, attn_implementation: str | None = None, seed: int = 0, **overrides):
    """The tiny HF model of ``family`` (eval mode, fp32, deterministic random weights); attention
    ``sdpa`` unless the class supports ``eager`` only (Gemma 2, DeepSeek V4). ``overrides`` replace
    config fields (e.g. ``head_dim=256``)."""
    import transformers

    config_cls, model_cls, kwargs, _ = {**FAMILIES, **HELD_OUT}[family]
    kwargs = {**kwargs, **overrides}
    sdpa = getattr(getattr(transformers, model_cls), "_supports_sdpa", True)
    attn_implementation = attn_implementation or ("sdpa" if sdpa else "eager")
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # parameters HF initialises to constants that would hide a mechanism
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("qk_norm.temp"):  # ZAYA key temperature (zeros: every key would be 0)
                param.copy_(1 + 0.2 * torch.randn(param.shape))
            elif leaf in DEEPSEEK_OFFSETS:  # DeepSeek sinks, compressor position bias, mHC biases (zeros)
                param.copy_(0.5 * torch.randn(param.shape))
            elif leaf in DEEPSEEK_SCALES:  # mHC gate scales (ones)
                param.copy_(1 + 0.1 * torch.randn(param.shape))
            elif leaf == "weight" and "norm" in name.rsplit(".", 2)[-2].lower() and param.dim() == 1:
                # RMSNorm / LayerNorm gains (ones, or zeros where the norm computes (1 + w)): spread
                # them, so a norm read from the wrong layer, dropped or applied twice changes numbers
                param.add_(0.2 * torch.randn(param.shape))
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):  # DeepSeek hash routing (zeros: every token to expert 0, twice)
                experts = model.config.n_routed_experts
                buf.copy_(torch.rand(buf.shape[0], experts).argsort(-1)[:, :buf.shape[1]])
        for module in model.modules():
            if type(module).__name__ == "DeepseekV4Indexer":
                # heads h + H/2 query with -q_h: one ReLU term of every score is positive, so no two
                # entries tie at 0 (HF's topk order among ties is not specified)
                w = module.q_b_proj.weight.view(module.num_heads, module.head_dim, -1)
                half = module.num_heads // 2
                w[half:2 * half] = -w[:half]
    return model


def available(family: str) -> bool:
    """Whether the installed transformers has the family's classes."""
    import transformers

    config_cls, model_cls, _, _ = {**FAMILIES, **HELD_OUT}[family]
    return hasattr(transformers, config_cls) and hasattr(transformers, model_cls)
