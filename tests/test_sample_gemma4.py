"""Gemma 4 E2B/E4B sample (spec section 1): decode == recompute, KV-sharing topology, sliding window,
PLE and the whole forward against a direct transcription of spec 1.4-1.6, RoPE, and real-size
accounting (spec 1.7 parameter recounts, spec 1.8/5 KV bytes) on the meta device."""
from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close

from effexport.samples import Sample
from effexport.samples import gemma4
from effexport.samples._blocks import apply_rope, attention_mask, rope_cos_sin
from effexport.samples.gemma4 import FULL, PRESETS, SLIDING, example_inputs

TINY = ["gemma4-e2b:tiny", "gemma4-e4b:tiny", "gemma4-odd:tiny"]
TINY_PARAMS = [pytest.param(n, id=n.split(":")[0].removeprefix("gemma4-")) for n in TINY]


def build(name: str, device: str = "cpu", config=None):
    """Build a preset (or a variant config) through the registry's ``Sample.build``."""
    return Sample(name, gemma4, config or PRESETS[name]).build(device)



@pytest.fixture(scope="module")
def tiny():
    """Tiny fp32 models, built once per module."""
    return {name: build(name) for name in TINY}


@pytest.fixture(scope="module")
def real():
    """Real-size presets on the meta device."""
    return {name: build(name, "meta") for name in ("gemma4-e2b", "gemma4-e4b")}


# ----------------------------------------------------------------------------- decode == recompute
@pytest.mark.parametrize("name", TINY_PARAMS)
@torch.no_grad()
def test_decode_matches_recompute(tiny, name):
    """Prefill 5 tokens, then 22 single-token steps (27 tokens = 3 windows of 8 + 3): every step's
    logits equal the full-sequence forward at that position (fp32, rel <= 1e-5)."""
    model, cfg = tiny[name], PRESETS[name]
    ids = example_inputs(cfg, batch=2, seq_len=3 * cfg.sliding_window + 3, seed=1)  # [2, 27]
    full, _ = model(ids)
    logits, cache = model(ids[:, :5])
    worst = assert_close(logits, full[:, :5], what="prefill")[1]
    for t in range(5, ids.shape[1]):
        logits, cache = model(ids[:, t:t + 1], cache)
        worst = max(worst, assert_close(logits[:, 0], full[:, t], what=f"decode step {t}")[1])
    roles = cfg.kv_roles()
    owners = [i for i, (role, _) in enumerate(roles) if role != "consumer"]
    assert sorted(cache) == sorted(f"{i}.{n}" for i in owners for n in "kv")
    for i in owners:  # full-length, sliding layers included (their consumers read it)
        hkv, d = cfg.kv_heads_of(cfg.layer_types[i]), cfg.head_dim_of(cfg.layer_types[i])
        assert cache[f"{i}.k"].shape == cache[f"{i}.v"].shape == (2, hkv, ids.shape[1], d)
    print(f"{name}: decode vs recompute max rel err {worst:.2e}")


@pytest.mark.parametrize("name", TINY_PARAMS)
@torch.no_grad()
def test_chunked_continuation_matches_recompute(tiny, name):
    """Multi-token continuation chunks (6, then 7, then 11 tokens; chunks cross the window)."""
    model, cfg = tiny[name], PRESETS[name]
    ids = example_inputs(cfg, batch=2, seq_len=24, seed=2)
    full, _ = model(ids)
    cache, start = None, 0
    for length in (6, 7, 11):
        logits, cache = model(ids[:, start:start + length], cache)
        assert_close(logits, full[:, start:start + length], what=f"chunk at {start}")
        start += length


@pytest.mark.parametrize("name", TINY_PARAMS)
@torch.no_grad()
def test_greedy_generation_cache_equals_recompute(tiny, name):
    """Greedy decoding for 20 tokens with the cache picks the same tokens as full recompute."""
    model = tiny[name]
    prompt = example_inputs(PRESETS[name], batch=2, seq_len=4, seed=3)
    logits, cache = model(prompt)
    cached = [logits[:, -1].argmax(-1)]
    for _ in range(19):
        logits, cache = model(cached[-1][:, None], cache)
        cached.append(logits[:, -1].argmax(-1))
    seq = prompt
    for _ in range(20):
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(torch.stack(cached, dim=1), seq[:, 4:])
    assert len(set(seq[:, 4:].flatten().tolist())) > 3  # not a degenerate constant generation


# ---------------------------------------------------------------------------- KV-sharing topology
def _consumers(cfg, layer_type):
    return {i: r for i, (role, r) in enumerate(cfg.kv_roles())
            if role == "consumer" and cfg.layer_types[i] == layer_type}


@pytest.mark.parametrize("name, f, sliding_src, full_src, full_consumers", [
    pytest.param("gemma4-e2b", 15, 13, 14, {19, 24, 29, 34}, id="e2b"),
    pytest.param("gemma4-e4b", 24, 22, 23, {29, 35, 41}, id="e4b"),
    pytest.param("gemma4-e2b:tiny", 5, 3, 4, {9}, id="e2b-tiny"),
    pytest.param("gemma4-e4b:tiny", 6, 4, 5, {11}, id="e4b-tiny"),
    # f-1 = 5 is sliding: the JAX shortcut (global <- f-1, local <- f-2) would give F<-5, S<-4
    pytest.param("gemma4-odd:tiny", 6, 5, 4, {9}, id="odd-tiny"),
])
def test_sharing_map(name, f, sliding_src, full_src, full_consumers):
    """Spec 1.3/1.11: shared layers read the last earlier non-shared layer of their type."""
    cfg = PRESETS[name]
    assert cfg.first_kv_shared_layer == f
    sliding = _consumers(cfg, SLIDING)
    assert set(sliding) == {i for i in range(f, cfg.num_hidden_layers) if i not in full_consumers}
    assert set(sliding.values()) == {sliding_src}
    assert _consumers(cfg, FULL) == {i: full_src for i in full_consumers}
    specs = cfg.layer_specs()
    assert {s.index for s in specs if s.role == "owner"} == {sliding_src, full_src}
    assert all(s.role == "independent" and s.reads == s.index for s in specs[:f]
               if s.index not in (sliding_src, full_src))
    assert all(s.role == "consumer" and s.reads == (full_src if s.index in full_consumers
                                                    else sliding_src) for s in specs[f:])


@pytest.mark.parametrize("name, non_shared", [
    pytest.param("gemma4-e2b", 15, id="e2b"), pytest.param("gemma4-e4b", 24, id="e4b"),
    pytest.param("gemma4-e2b:tiny", 5, id="e2b-tiny"), pytest.param("gemma4-odd:tiny", 6, id="odd-tiny")])
def test_consumers_have_no_kv_modules(tiny, real, name, non_shared):
    """Consumer attention has no k_proj/v_proj/k_norm/v_norm modules (counted over the model)."""
    model = {**tiny, **real}[name]
    for attr in ("k_proj", "v_proj", "k_norm", "v_norm"):
        assert sum(n.endswith(f"self_attn.{attr}") for n, _ in model.named_modules()) == non_shared
    assert sum(n.endswith("self_attn.q_proj") for n, _ in model.named_modules()) == len(model.layers)
    for layer in model.layers[non_shared:]:
        assert layer.self_attn.is_consumer and not hasattr(layer.self_attn, "k_proj")


def _perturb_returned_k(module, args, output):
    out, (k, v) = output
    return out, (k + 0.5 * torch.randn_like(k), v)


@pytest.mark.parametrize("name, producer, bystander", [
    pytest.param("gemma4-e2b:tiny", 3, 2, id="e2b-tiny-sliding"),
    pytest.param("gemma4-odd:tiny", 5, 3, id="odd-tiny-sliding"),
    pytest.param("gemma4-odd:tiny", 4, 2, id="odd-tiny-full-src-vs-sliding-bystander"),
])
@torch.no_grad()
def test_consumers_read_exactly_the_producer_kv(tiny, name, producer, bystander):
    """Perturbing the K a producer hands on (its own attention output untouched) changes its
    consumers' outputs and nothing before them; the same perturbation on a non-producer layer
    changes nothing but that layer's own cache entry. Consumers receive the producer's present K/V."""
    model, cfg = tiny[name], PRESETS[name]
    ids = example_inputs(cfg, batch=1, seq_len=20, seed=4)
    f = cfg.first_kv_shared_layer
    consumers = [i for i, (role, r) in enumerate(cfg.kv_roles()) if role == "consumer" and r == producer]
    seen, outs = {}, {}
    hooks = [model.layers[c].self_attn.register_forward_pre_hook(
        lambda m, a, c=c: seen.__setitem__(c, a[5])) for c in consumers]
    hooks += [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0]))
              for i, layer in enumerate(model.layers)]
    ref_logits, ref_cache = model(ids)
    ref_outs = dict(outs)
    for c in consumers:  # the very tensors the producer put in the cache
        assert seen[c][0] is ref_cache[f"{producer}.k"] and seen[c][1] is ref_cache[f"{producer}.v"]

    h = model.layers[producer].self_attn.register_forward_hook(_perturb_returned_k)
    torch.manual_seed(0)
    logits, _ = model(ids)
    h.remove()
    for i in range(f):  # layers before the first shared layer cannot see the change
        assert torch.equal(outs[i], ref_outs[i]), f"layer {i} changed"
    for c in consumers:
        assert (outs[c] - ref_outs[c]).abs().max() > 1e-3, f"consumer {c} ignored its producer"
    assert (logits - ref_logits).abs().max() > 1e-3

    h = model.layers[bystander].self_attn.register_forward_hook(_perturb_returned_k)
    logits, cache = model(ids)
    h.remove()
    for hook in hooks:
        hook.remove()
    assert torch.equal(logits, ref_logits)
    assert not torch.equal(cache[f"{bystander}.k"], ref_cache[f"{bystander}.k"])


# ---------------------------------------------------------------------------------- sliding window
@pytest.mark.parametrize("layer, sliding", [
    pytest.param(0, True, id="sliding-independent"), pytest.param(3, True, id="sliding-owner"),
    pytest.param(5, True, id="sliding-consumer"), pytest.param(4, False, id="full-owner"),
    pytest.param(9, False, id="full-consumer")])
@torch.no_grad()
def test_sliding_window_perturbation(tiny, layer, sliding):
    """Spec 1.4 mask ``i - W < j <= i``: perturbing key position 0 leaves a sliding layer's outputs
    at positions >= W (=8) unchanged and changes positions 0..W-1; a full layer changes everywhere."""
    model, cfg = tiny["gemma4-e2b:tiny"], PRESETS["gemma4-e2b:tiny"]
    attn, w, t = model.layers[layer].self_attn, cfg.sliding_window, 20
    gen = torch.Generator().manual_seed(5)
    pos = torch.arange(t)
    mask = attention_mask(pos, pos, w if sliding else None)
    cos, sin = rope_cos_sin(pos, model.inv_freq_sliding if sliding else model.inv_freq_full)
    x = torch.randn(1, t, cfg.hidden_size, generator=gen)
    x2 = x.clone()
    if attn.is_consumer:  # perturb the shared K/V entry of token 0
        kv = [torch.randn(1, attn.kv_heads, t, attn.head_dim, generator=gen) for _ in range(2)]
        kv2 = [z.clone() for z in kv]
        kv2[0][:, :, 0] += 1.0
        kv2[1][:, :, 0] += 1.0
        y, y2 = attn(x, cos, sin, mask, None, kv)[0], attn(x, cos, sin, mask, None, kv2)[0]
    else:
        x2[:, 0] += 1.0
        y, y2 = attn(x, cos, sin, mask)[0], attn(x2, cos, sin, mask)[0]
    delta = (y - y2).abs().amax(dim=(0, 2))  # [T]
    assert (delta[:w] > 1e-4).all()
    if sliding:
        assert (delta[w:] <= 1e-6).all(), delta
    else:
        assert (delta[w:] > 1e-4).all()


@torch.no_grad()
def test_sliding_window_in_the_model(tiny):
    """Changing token 0 leaves layer 0 (sliding) outputs at positions >= 8 unchanged while the
    logits at the last position, reached through full layers, change."""
    model, cfg = tiny["gemma4-e2b:tiny"], PRESETS["gemma4-e2b:tiny"]
    ids = example_inputs(cfg, batch=1, seq_len=20, seed=6)
    ids2 = ids.clone()
    ids2[0, 0] = (ids[0, 0] + 1) % cfg.vocab_size
    outs = []
    h = model.layers[0].register_forward_hook(lambda m, a, o: outs.append(o[0]))
    logits, _ = model(ids)
    logits2, _ = model(ids2)
    h.remove()
    delta = (outs[0] - outs[1]).abs().amax(dim=(0, 2))
    assert (delta[cfg.sliding_window:] <= 1e-6).all() and delta[cfg.sliding_window - 1] > 1e-4
    assert (logits[0, -1] - logits2[0, -1]).abs().max() > 1e-4


# ------------------------------------------------------------------- spec transcription (1.4-1.6)
def _rms(x, w=None, eps=1e-6):
    y = x * (x.pow(2).mean(-1, keepdim=True) + eps) ** -0.5
    return y if w is None else y * w


def _ple_reference(sd, cfg, ids):
    """Spec 1.6, transcribed: ``p = (RMSNorm(x0 W_ple E^-1/2).view(L, P) + E_ple[ids] * sqrt(P)) / sqrt 2``."""
    e, n, p = cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
    x0 = sd["embed_tokens.weight"][ids] * math.sqrt(e)
    ple_ids = torch.where(ids < cfg.vocab_size_per_layer_input, ids, 0)  # out of range -> id 0
    tok = sd["embed_tokens_per_layer.weight"][ple_ids].view(*ids.shape, n, p) * math.sqrt(p)
    ctx = _rms(((x0 @ sd["per_layer_model_projection.weight"].T) * e ** -0.5).view(*ids.shape, n, p),
               sd["per_layer_projection_norm.weight"])
    return x0, (ctx + tok) * 2 ** -0.5


def _rope_reference(x, pos, d, theta, proportional):
    """Rotate-half RoPE, pair (i, i + d/2) turned by ``pos * inv_freq[i]`` (spec 1.4)."""
    i = torch.arange(d // 2, dtype=torch.float64)
    inv = theta ** (-2 * i / d)
    if proportional:
        inv = torch.where(i < int(0.25 * d // 2), inv, torch.zeros_like(inv))
    ang = (pos[:, None].double() * inv).float()[:, None]  # [T, 1, d/2], x is [B, T, H, d]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)


def _forward_reference(model, ids):
    """Spec 1.3-1.6 transcribed on the model's weights (no cache): independent of gemma4.py."""
    cfg, sd = model.config, model.state_dict()
    n_layers, t = cfg.num_hidden_layers, ids.shape[1]
    f = n_layers - cfg.num_kv_shared_layers
    h, ple = _ple_reference(sd, cfg, ids)
    pos = torch.arange(t)
    shared = {}
    for li in range(n_layers):
        pre, typ = f"layers.{li}.", cfg.layer_types[li]
        d = cfg.head_dim if typ == SLIDING else cfg.global_head_dim
        theta = cfg.sliding_rope_theta if typ == SLIDING else cfg.full_rope_theta
        x = _rms(h, sd[pre + "input_layernorm.weight"])
        q = _rms((x @ sd[pre + "self_attn.q_proj.weight"].T).view(1, t, -1, d),
                 sd[pre + "self_attn.q_norm.weight"])
        q = _rope_reference(q, pos, d, theta, typ == FULL)
        is_shared = li >= f > 0
        if is_shared:  # the HF snippet of spec 1.3, verbatim
            prev = cfg.layer_types[:f]
            k, v = shared[len(prev) - 1 - prev[::-1].index(typ)]
        else:
            k = _rms((x @ sd[pre + "self_attn.k_proj.weight"].T).view(1, t, -1, d),
                     sd[pre + "self_attn.k_norm.weight"])
            v = _rms((x @ sd[pre + "self_attn.v_proj.weight"].T).view(1, t, -1, d))
            k = _rope_reference(k, pos, d, theta, typ == FULL)
            shared[li] = (k, v)
        g = q.shape[2] // k.shape[2]
        s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(g, 2)) * 1.0  # scaling = 1
        j, i_ = torch.meshgrid(pos, pos, indexing="xy")  # i_ query, j key
        visible = (j <= i_) & ((i_ - j < cfg.sliding_window) if typ == SLIDING else True)
        o = torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~visible, -math.inf).softmax(-1),
                         v.repeat_interleave(g, 2)).reshape(1, t, -1)
        h = h + _rms(o @ sd[pre + "self_attn.o_proj.weight"].T,
                     sd[pre + "post_attention_layernorm.weight"])
        z = _rms(h, sd[pre + "pre_feedforward_layernorm.weight"])
        m = (F.gelu(z @ sd[pre + "mlp.gate_proj.weight"].T, approximate="tanh")
             * (z @ sd[pre + "mlp.up_proj.weight"].T)) @ sd[pre + "mlp.down_proj.weight"].T
        h = h + _rms(m, sd[pre + "post_feedforward_layernorm.weight"])
        gate = F.gelu(h @ sd[pre + "per_layer_input_gate.weight"].T, approximate="tanh")
        u = (gate * ple[:, :, li]) @ sd[pre + "per_layer_projection.weight"].T
        h = (h + _rms(u, sd[pre + "post_per_layer_input_norm.weight"])) * sd[pre + "layer_scalar"]
    return 30.0 * torch.tanh((_rms(h, sd["norm.weight"]) @ sd["embed_tokens.weight"].T) / 30.0)


@pytest.mark.parametrize("name", TINY_PARAMS)
@torch.no_grad()
def test_forward_matches_spec_transcription(tiny, name):
    """The whole forward (QK-norm with scale, weightless v-norm, scaling 1, RoPE per type, sharing,
    GeGLU, PLE, layer_scalar, softcap 30) against a transcription of spec 1.3-1.6."""
    model = tiny[name]
    ids = example_inputs(PRESETS[name], batch=1, seq_len=20, seed=7)
    _, max_rel = assert_close(model(ids)[0], _forward_reference(model, ids), what="logits")
    print(f"{name}: forward vs spec transcription max rel err {max_rel:.2e}")


@pytest.mark.parametrize("ple_vocab", [pytest.param(128, id="ple-vocab-eq"),
                                       pytest.param(100, id="ple-vocab-smaller")])
@torch.no_grad()
def test_ple_matches_spec(ple_vocab):
    """Spec 1.6 per-layer inputs, incl. ids outside the PLE vocabulary mapped to id 0."""
    cfg = dataclasses.replace(PRESETS["gemma4-e2b:tiny"], vocab_size_per_layer_input=ple_vocab)
    model = build("gemma4-e2b:tiny", config=cfg)
    ids = torch.arange(cfg.vocab_size).view(2, -1)  # every id, some beyond the PLE vocab
    x0, ple = model.embed_inputs(ids)
    ref_x0, ref_ple = _ple_reference(model.state_dict(), cfg, ids)
    assert ple.shape == (2, 64, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)
    assert_close(x0, ref_x0, what="x0")
    _, max_rel = assert_close(ple, ref_ple, what="per-layer inputs")
    assert max_rel < 1e-6


@pytest.mark.parametrize("hidden, bf16_scale", [pytest.param(1536, 39.25, id="e2b-width"),
                                                pytest.param(2560, 50.5, id="e4b-width")])
@torch.no_grad()
def test_embed_scale_rounded_only_in_bf16(hidden, bf16_scale):
    """Spec 1.6: ``x0 = E[ids] * sqrt(E)`` with sqrt(E) cast to the weight dtype: exact in fp32,
    39.25 / 50.5 in bf16."""
    cfg = dataclasses.replace(PRESETS["gemma4-e2b:tiny"], hidden_size=hidden)
    model = build("gemma4-e2b:tiny", config=cfg)
    ids = torch.tensor([[1, 5, 7]])
    x0 = model.embed_inputs(ids)[0]
    assert torch.equal(x0, model.embed_tokens.weight[ids] * math.sqrt(hidden))
    model = model.to(torch.bfloat16)
    x0 = model.embed_inputs(ids)[0]
    assert x0.dtype == torch.bfloat16 and abs(math.sqrt(hidden) - bf16_scale) > 0.05
    assert torch.equal(x0, model.embed_tokens.weight[ids] * torch.tensor(bf16_scale, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------- RoPE
def test_proportional_rope_real_size(real):
    """Spec 1.4: full layers use 1e6^(-2i/512) for i < 64 and 0 for 64 <= i < 256, so pairs
    (i, i+256), i >= 64, are not rotated; sliding layers rotate all 128 pairs with 1e4^(-2i/256)."""
    cfg = PRESETS["gemma4-e2b"]
    inv = cfg.rope_inv_freq(FULL)
    i = torch.arange(256, dtype=torch.float64)
    assert inv.shape == (256,) and torch.equal(inv[64:], torch.zeros(192, dtype=torch.float64))
    torch.testing.assert_close(inv[:64], 1e6 ** (-2 * i[:64] / 512), rtol=1e-12, atol=0)
    inv_s = cfg.rope_inv_freq(SLIDING)
    torch.testing.assert_close(inv_s, 1e4 ** (-2 * torch.arange(128, dtype=torch.float64) / 256),
                               rtol=1e-12, atol=0)
    pos = torch.arange(0, 4096, 97)
    x = torch.randn(1, 1, len(pos), 512, generator=torch.Generator().manual_seed(8))
    y = apply_rope(x, *rope_cos_sin(pos, inv))
    identity = torch.cat([torch.arange(64, 256), torch.arange(320, 512)])
    assert torch.equal(y[..., identity], x[..., identity])
    rotated = torch.cat([torch.arange(64), torch.arange(256, 320)])
    assert ((y - x)[..., 1:, :][..., rotated].abs().amax(dim=-2) > 1e-3).all()  # every rotated dim moves
    assert real["gemma4-e2b"].inv_freq_full.shape == (256,)
    assert real["gemma4-e2b"].inv_freq_sliding.shape == (128,)


def test_rope_tables_stay_fp32_under_bf16_cast():
    """Casting the model to bf16 keeps the RoPE frequency tables exact fp32."""
    model = build("gemma4-e2b:tiny").to(torch.bfloat16)
    cfg = PRESETS["gemma4-e2b:tiny"]
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    for t, buf in ((SLIDING, model.inv_freq_sliding), (FULL, model.inv_freq_full)):
        assert buf.dtype == torch.float32 and torch.equal(buf, cfg.rope_inv_freq(t).float())


# ------------------------------------------------------------------------ real-size accounting
@pytest.mark.parametrize("name", [pytest.param("gemma4-e2b", id="e2b"), pytest.param("gemma4-e4b", id="e4b")])
def test_meta_build_is_fast(name):
    """Real-size presets build on the meta device in < 5 s."""
    start = time.perf_counter()
    build(name, "meta")
    assert time.perf_counter() - start < 5.0


def _groups(model) -> dict[str, int]:
    """Parameters grouped like the spec 1.7 table."""
    out = {"attention": 0, "mlp": 0, "ple_layers": 0, "embedding": 0, "ple_table": 0, "norms": 0}
    for n, p in model.named_parameters():
        key = ("ple_table" if n.startswith("embed_tokens_per_layer") else
               "embedding" if n.startswith("embed_tokens") else
               "attention" if "self_attn" in n and "norm" not in n else
               "mlp" if ".mlp." in n else
               "ple_layers" if "per_layer" in n else "norms")
        out[key] += p.numel()
    return out


@pytest.mark.parametrize("name, effective, total, parts", [
    # spec 1.7: attention, MLP, PLE gate/proj/norm + W_ple, main embedding, PLE table
    pytest.param("gemma4-e2b", 2.28e9, 4.63e9, dict(attention=278e6, mlp=1557e6, ple_layers=41e6,
                                                    embedding=403e6, ple_table=2.349e9), id="e2b"),
    pytest.param("gemma4-e4b", 4.64e9, 7.46e9, dict(attention=587e6, mlp=3303e6, ple_layers=83e6,
                                                    embedding=671e6, ple_table=2.819e9), id="e4b"),
])
def test_param_counts_match_spec(real, name, effective, total, parts):
    """Spec 1.7 recounts within 1% (effective = all but the PLE table; dense: active = effective)."""
    counts = real[name].param_counts()
    assert abs(counts["effective"] / effective - 1) < 0.01, counts
    assert abs(counts["total"] / total - 1) < 0.01, counts
    assert counts["active"] == counts["effective"]
    groups = _groups(real[name])
    for key, expected in parts.items():
        assert abs(groups[key] / expected - 1) < 0.01, (key, groups[key], expected)
    print(f"{name}: {counts}")


@pytest.mark.parametrize("name, layer, width, q_out, kv_out", [
    pytest.param("gemma4-e2b", 0, 6144, 8 * 256, 256, id="e2b-sliding"),
    pytest.param("gemma4-e2b", 14, 6144, 8 * 512, 512, id="e2b-full-owner"),
    pytest.param("gemma4-e2b", 15, 12288, 8 * 256, None, id="e2b-shared-double-wide"),
    pytest.param("gemma4-e2b", 34, 12288, 8 * 512, None, id="e2b-full-consumer"),
    pytest.param("gemma4-e4b", 23, 10240, 8 * 512, 2 * 512, id="e4b-full-owner"),
    pytest.param("gemma4-e4b", 30, 10240, 8 * 256, None, id="e4b-shared-not-double"),
])
def test_layer_shapes(real, name, layer, width, q_out, kv_out):
    """Spec 1.2/1.5: 256/512 head dims, Hkv 1 (E2B) / 2 (E4B), double-wide MLP only in E2B shared layers."""
    lay = real[name].layers[layer]
    assert lay.mlp.gate_proj.out_features == width
    assert lay.self_attn.q_proj.out_features == q_out
    assert (lay.self_attn.k_proj.out_features if kv_out else None) == kv_out


def _bytes(specs, context, policy, dtype_bytes=2):
    return sum(c.num_entries(context, policy) * c.elements * dtype_bytes for s in specs for c in s.cache)


@pytest.mark.parametrize("name, full_layers, full_bytes, ring_layers, ring_bytes, baseline", [
    # spec 5 / 1.8, bf16: E2B 3 x 2048 B per token + 12 sliding rings of 512 x 1024 B;
    # E4B 4 x 4096 + 20 x 512 x 2048; baseline: all 35 / 42 layers full-length, own K/V
    pytest.param("gemma4-e2b", {4, 9, 14}, 2048, 12, 1024, 28 * 1024 + 7 * 2048, id="e2b"),
    pytest.param("gemma4-e4b", {5, 11, 17, 23}, 4096, 20, 2048, 35 * 2048 + 7 * 4096, id="e4b"),
])
def test_kv_bytes_per_token(name, full_layers, full_bytes, ring_layers, ring_bytes, baseline):
    """Per-token KV bytes from the CacheTensor fields equal the spec's hand arithmetic."""
    cfg = PRESETS[name]
    specs = cfg.layer_specs()
    assert {s.index for s in specs if any(c.kind == "full" for c in s.cache)} == full_layers
    assert sum(any(c.kind == "ring" for c in s.cache) for s in specs) == ring_layers
    assert all(c.window == 512 for s in specs for c in s.cache if c.kind == "ring")
    assert all(not s.cache for s in specs if s.role == "consumer")
    n, big = 131072, 131072 + 1000
    grow = len(full_layers) * full_bytes  # 6144 / 16384 B per token
    assert _bytes(specs, big, "ring") - _bytes(specs, n, "ring") == 1000 * grow
    assert _bytes(specs, n, "ring") == n * grow + ring_layers * 512 * ring_bytes
    assert _bytes(specs, n, "full_length") == n * (grow + ring_layers * ring_bytes)
    base = cfg.layer_specs(baseline=True)
    assert all(s.role == "independent" and s.reads == s.index and s.window is None and s.type == "full"
               for s in base)
    assert _bytes(base, n, "ring") == _bytes(base, n, "full_length") == n * baseline
    assert isinstance(gemma4.BASELINE_DESCRIPTION, str) and "sharing" in gemma4.BASELINE_DESCRIPTION


def test_layer_specs_heads_and_windows():
    """LayerSpec heads/dims and windows per layer type (E2B)."""
    specs = PRESETS["gemma4-e2b"].layer_specs()
    for s in specs:
        assert s.heads == 8 and s.qk_dim == s.v_dim == (512 if s.type == "full" else 256)
        assert s.window == (512 if s.type == "sliding" else None)
    assert [s.type for s in specs].count("full") == 7


@torch.no_grad()
def test_global_kv_heads_knob():
    """``num_global_key_value_heads`` (None in the E-models) sets the KV heads of full layers only."""
    cfg = dataclasses.replace(PRESETS["gemma4-e2b:tiny"], num_global_key_value_heads=2)
    model = build("gemma4-e2b:tiny", config=cfg)
    assert model.layers[4].self_attn.k_proj.out_features == 2 * cfg.global_head_dim
    assert model.layers[3].self_attn.k_proj.out_features == 1 * cfg.head_dim
    assert [c.elements for c in cfg.layer_specs()[4].cache] == [64, 64]
    ids = example_inputs(cfg, batch=1, seq_len=12, seed=9)
    assert_close(model(ids)[0], _forward_reference(model, ids), what="logits")
