"""ZAYA1 sample (spec section 3): decode == recompute, the CCA mechanisms, the router state and the
skip expert on the tiny preset; parameter and cache accounting of the real-size preset on meta."""
import functools
import math
import time

import pytest
import torch

from _helpers import assert_close
from effexport.samples import Sample, zaya1
from effexport.samples._blocks import rope_cos_sin

TINY = [pytest.param("zaya1-8b:tiny", id="zaya1-8b-tiny")]
BF16 = 2  # bytes per element of the spec's bf16 cache


@functools.lru_cache(maxsize=None)
def _model(name: str):
    """A tiny model, built once per preset (seed 0, fp32, eval)."""
    return Sample(name, zaya1, zaya1.PRESETS[name]).build("cpu")


@pytest.fixture(scope="module")
def tiny():
    return _model("zaya1-8b:tiny")



@pytest.fixture(scope="module")
def real():
    """The real-size preset on meta and its build time; the tiny preset is built on meta first so
    that torch's one-time lazy set-up of meta kernels is not charged to the model."""
    Sample("zaya1-8b:tiny", zaya1, zaya1.PRESETS["zaya1-8b:tiny"]).build("meta")
    t0 = time.perf_counter()
    model = Sample("zaya1-8b", zaya1, zaya1.PRESETS["zaya1-8b"]).build("meta")
    return model, time.perf_counter() - t0


def _run_chunks(model, ids, chunks):
    """Feed ``ids`` in chunks of the given sizes, threading the cache; returns logits [B, T, V]."""
    past, outs, start = None, [], 0
    for size in chunks:
        logits, past = model(ids[:, start:start + size], past)
        outs.append(logits)
        start += size
    assert start == ids.shape[1]
    return torch.cat(outs, dim=1), past


# ------------------------------------------------------------------------------ decode == recompute
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("chunks", [
    pytest.param((5,) + (1,) * 18, id="prefill5-decode18x1"),
    pytest.param((1,) * 23, id="token-by-token-from-empty"),
    pytest.param((1, 2, 3, 1, 4, 5, 7), id="uneven-chunks"),
])
def test_decode_equals_recompute(name, chunks):
    """Every decode step's logits equal the full forward's logits at that position (fp32, 1e-5):
    23 tokens, 7.7x the conv's 3-token receptive field, odd (not a multiple of P = 2); chunks
    shorter than P exercise the conv state across calls."""
    model = _model(name)
    ids = zaya1.example_inputs(model.config, batch=2, seq_len=sum(chunks))
    with torch.no_grad():
        full, present_full = model(ids)
        stepped, present = _run_chunks(model, ids, chunks)
    for t in range(ids.shape[1]):
        assert_close(stepped[:, t], full[:, t], what=f"logits at position {t}")
    assert present.keys() == present_full.keys()
    for key in present:
        assert_close(present[key], present_full[key], what=f"cache {key}")


@pytest.mark.parametrize("name", TINY)
def test_greedy_with_cache_equals_recompute(name):
    """16 greedy tokens with the cache are the tokens of greedy with full recompute."""
    model = _model(name)
    prompt = zaya1.example_inputs(model.config, batch=2, seq_len=6, seed=1)
    with torch.no_grad():
        ids = prompt
        for _ in range(16):
            ids = torch.cat([ids, model(ids)[0][:, -1:].argmax(-1)], dim=1)
        logits, past = model(prompt)
        cached = prompt
        for _ in range(16):
            nxt = logits[:, -1:].argmax(-1)
            cached = torch.cat([cached, nxt], dim=1)
            logits, past = model(nxt, past)
    assert torch.equal(cached, ids)
    assert past["0.k"].shape[2] == prompt.shape[1] + 16


@pytest.mark.parametrize("name", TINY)
def test_cache_layout_matches_layer_specs(name):
    """The present dict holds, per layer, exactly the tensors layer_specs() accounts for: k/v full
    [B, Hk, S, d] (Hk*d per token), conv [B, C, P] and shift [B, Hk*d/2] states."""
    model = _model(name)
    cfg = model.config
    with torch.no_grad():
        _, present = model(zaya1.example_inputs(cfg, batch=2, seq_len=9))
    for spec in cfg.layer_specs():
        for ct in spec.cache:
            x = present[f"{spec.index}.{ct.name}"]
            assert x.shape[0] == 2
            if ct.kind == "full":  # [B, Hk, S, d]
                assert x.shape[2] == 9 and x.shape[1] * x.shape[3] == ct.elements
            else:  # state: conv [B, C, P], shift [B, Dv]
                entries = x.shape[2] if x.dim() == 3 else 1
                assert (x.shape[1], entries) == (ct.elements, ct.entries)
    assert len(present) == 4 * cfg.num_hidden_layers


# ------------------------------------------------------------------------------- CCA mechanisms
def _qkv(model, x, layer=0):
    attn = model.layers[layer].self_attn
    cos, sin = rope_cos_sin(torch.arange(x.shape[1]), model.inv_freq)
    with torch.no_grad():
        return attn.qkv(x, cos, sin)


def test_conv_is_causal_with_receptive_field_3(tiny):
    """Changing token t never changes q/k at positions < t; q/k at t depend on tokens t-2..t
    (K0 + K1 - 1 = 3) and not on token t-3."""
    cfg = tiny.config
    assert cfg.cca_time0 + cfg.cca_time1 - 1 == 3
    torch.manual_seed(0)
    x = torch.randn(1, 12, cfg.hidden_size)
    q0, k0, *_ = _qkv(tiny, x)
    for t in range(12):
        x2 = x.clone()
        x2[:, t] += torch.randn(cfg.hidden_size)
        q1, k1, *_ = _qkv(tiny, x2)
        dq = (q1 - q0).abs().amax(dim=(0, 1, 3))  # [T]: change per position
        dk = (k1 - k0).abs().amax(dim=(0, 1, 3))
        unaffected = torch.cat([dq[:t], dq[t + 3:], dk[:t], dk[t + 3:]])  # before t, and t+3 on
        assert unaffected.numel() == 2 * (12 - min(3, 12 - t))
        assert unaffected.max().item() <= 1e-6 if unaffected.numel() else True
        assert (dq[t:t + 3] > 1e-3).all() and (dk[t:t + 3] > 1e-3).all()  # t, t+1, t+2 change


def test_value_shift(tiny):
    """KV head 1's value at t is x[t-1] W_vd (zero at t = 0); KV head 0's is x[t] W_vc."""
    cfg = tiny.config
    assert cfg.num_key_value_heads == 2 and cfg.value_half == cfg.head_dim
    torch.manual_seed(1)
    x = torch.randn(2, 10, cfg.hidden_size)
    proj = tiny.layers[0].self_attn.qkv_proj
    _, _, v, _, shift = _qkv(tiny, x)  # v [B, Hk, T, d]
    expected_del = torch.cat([torch.zeros(2, 1, cfg.head_dim), x[:, :-1] @ proj.v_proj_delayed.weight.T], 1)
    assert_close(v[:, 1], expected_del, what="delayed value head")
    assert v[:, 1, 0].abs().max().item() == 0.0
    assert_close(v[:, 0], x @ proj.v_proj_current.weight.T, what="current value head")
    assert_close(shift, x[:, -1] @ proj.v_proj_delayed.weight.T, what="shift state")


def test_qk_l2_norm_and_temperature(tiny):
    """||q|| = sqrt(d) per head and token; ||k|| = sqrt(d) * |temp[kv head]| (RoPE keeps norms)."""
    cfg = tiny.config
    torch.manual_seed(2)
    q, k, *_ = _qkv(tiny, torch.randn(2, 9, cfg.hidden_size), layer=2)
    d = cfg.head_dim
    assert_close(q.norm(dim=-1), torch.full(q.shape[:-1], math.sqrt(d)), what="|q|")
    temp = tiny.layers[2].self_attn.qk_norm.temp.detach()
    assert (temp - 1).abs().min() > 1e-3  # perturbed away from its trivial value
    expected = (math.sqrt(d) * temp.abs()).view(1, -1, 1).expand(k.shape[:-1])
    assert_close(k.norm(dim=-1), expected, what="|k|")


def test_partial_rope_rotates_first_half(tiny):
    """RoPE (theta 5e6) touches the first rot = d/2 dims only: the pass-through dims equal the
    un-rotated q/k at every position, the rotated dims only at position 0."""
    cfg = tiny.config
    rot = cfg.rotary_dim
    assert rot == cfg.head_dim // 2 and tiny.inv_freq.shape == (rot // 2,)
    assert_close(tiny.inv_freq, 5e6 ** (-torch.arange(0, rot, 2) / rot))
    torch.manual_seed(3)
    x = torch.randn(1, 8, cfg.hidden_size)
    attn = tiny.layers[1].self_attn
    cos, sin = rope_cos_sin(torch.arange(8), tiny.inv_freq)
    with torch.no_grad():
        q, k, *_ = attn.qkv(x, cos, sin)
        q_id, k_id, *_ = attn.qkv(x, torch.ones_like(cos), torch.zeros_like(sin))
    assert_close(q[..., rot:], q_id[..., rot:], what="q pass-through dims")
    assert_close(k[..., rot:], k_id[..., rot:], what="k pass-through dims")
    assert_close(q[:, :, 0], q_id[:, :, 0], what="q at position 0")
    assert (q[:, :, 1:, :rot] - q_id[:, :, 1:, :rot]).abs().max() > 1e-2


# -------------------------------------------------------------------------------- router and MoE
def _router_records(model, ids):
    """Per layer: (h, incoming state, logits, outgoing state) captured by forward hooks."""
    records = []

    def hook(module, args, output):
        records.append((args[0], args[1], output[0], output[3]))

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return records


def test_router_state_carried_across_layers(tiny):
    """Layer 0 starts without state; layer l > 0 receives layer l-1's router state r; changing the
    state (= changing layer 0's router down-projection) changes layer 1's routing logits, and
    zeroing layer 1's router_states_scale removes the dependence."""
    ids = zaya1.example_inputs(tiny.config, batch=2, seq_len=8)
    records = _router_records(tiny, ids)
    assert records[0][1] is None
    for prev, cur in zip(records, records[1:]):
        assert torch.equal(cur[1], prev[3])
    h1, state0, logits1, _ = records[1]
    router0, router1 = tiny.layers[0].mlp.gate, tiny.layers[1].mlp.gate
    with torch.no_grad():
        assert_close(router1(h1, state0)[0], logits1, what="layer-1 logits recomputed")
        assert_close(records[0][3], router0.down_proj(records[0][0]), what="layer-0 state")
        bumped = state0 + 0.5 * torch.randn_like(state0)  # a different layer-0 down_proj output
        changed = (router1(h1, bumped)[0] - logits1).abs().max().item()
        scale = router1.router_states_scale.clone()
        router1.router_states_scale.zero_()
        try:
            no_eda = (router1(h1, bumped)[0] - router1(h1, state0)[0]).abs().max().item()
        finally:
            router1.router_states_scale.copy_(scale)
    assert changed > 1e-2 and no_eda == 0.0


def test_skip_expert_gives_zero_output(tiny):
    """When the skip class (index E) wins, the MoE output is exactly zero; when it cannot win,
    every token gets a non-zero expert output; the perturbed tiny model picks it for some tokens."""
    cfg = tiny.config
    torch.manual_seed(4)
    x = torch.randn(2, 7, cfg.hidden_size)
    moe = tiny.layers[1].mlp
    bias = moe.gate.balancing_biases.clone()
    try:
        with torch.no_grad():
            moe.gate.balancing_biases[-1] = 10.0
            out_skip, _ = moe(x)
            _, idx, weight, _ = moe.gate(x.reshape(-1, cfg.hidden_size))
            moe.gate.balancing_biases[-1] = -10.0
            out_run, _ = moe(x)
    finally:
        moe.gate.balancing_biases.copy_(bias)
    assert out_skip.abs().max().item() == 0.0 and weight.abs().max().item() == 0.0
    assert idx.max().item() == 0  # skip is masked to expert 0 with weight 0
    assert (out_run.abs().amax(-1) > 0).all()
    records = _router_records(tiny, zaya1.example_inputs(cfg, batch=2, seq_len=16))
    picks = torch.cat([(torch.softmax(r[2], -1) + layer.mlp.gate.balancing_biases).argmax(-1)
                       for r, layer in zip(records, tiny.layers)])
    assert 0 < (picks == cfg.num_experts).sum().item() < picks.numel()


# ------------------------------------------------------------------------------ real-size accounting
def test_registry_resolves_presets():
    """Both presets are registered under their published names and resolve to this module."""
    from effexport.samples import get_sample
    for name in ("zaya1-8b", "zaya1-8b:tiny"):
        sample = get_sample(name)
        assert sample.module is zaya1 and sample.config == zaya1.PRESETS[name]


def test_real_size_builds_on_meta_fast(real):
    model, seconds = real
    assert seconds < 5.0
    assert model.embed_tokens.weight.is_meta and model.lm_head.weight is model.embed_tokens.weight


def test_real_size_param_counts(real):
    """Spec 3.2: non-embedding total 8.30 B, active non-embedding 0.75 B, embeddings 0.54 B
    (observed 8.3034 B, 0.7536 B, 0.5371 B), each within 1%."""
    model, _ = real
    counts = model.param_counts()
    emb = model.embed_tokens.weight.numel()
    assert emb == 262272 * 2048
    assert counts["effective"] == counts["total"]
    assert abs((counts["total"] - emb) / 8.30e9 - 1) < 0.01
    assert abs((counts["active"] - emb) / 0.75e9 - 1) < 0.01
    assert abs(emb / 0.54e9 - 1) < 0.01


def test_real_size_cache_bytes():
    """Spec 3.4: K/V 40 x 1024 = 40960 B/token bf16; constant state 40 x (5120 + 256) B; the
    baseline (MHA at hidden size, 2 x 2048 elements per layer) is 8x the per-token bytes."""
    cfg = zaya1.PRESETS["zaya1-8b"]
    specs = cfg.layer_specs()
    assert len(specs) == 40 and {(s.type, s.role) for s in specs} == {("cca", "independent")}
    assert all(s.reads == s.index and (s.heads, s.qk_dim, s.v_dim) == (8, 128, 128) for s in specs)
    per_token = sum(ct.elements * BF16 for s in specs for ct in s.cache if ct.kind == "full")
    state = sum(ct.entries * ct.elements * BF16 for s in specs for ct in s.cache if ct.kind == "state")
    assert per_token == 40 * 1024 == 40960
    assert state == 40 * (5120 + 256)
    conv = {ct.name: ct for ct in specs[0].cache}
    assert (conv["conv"].entries, conv["conv"].elements) == (2, 1280)
    assert (conv["shift"].entries, conv["shift"].elements) == (1, 128)
    base = cfg.layer_specs(baseline=True)
    base_per_token = sum(ct.elements * BF16 for s in base for ct in s.cache if ct.kind == "full")
    assert all(ct.kind == "full" for s in base for ct in s.cache)
    assert base_per_token == 40 * 2 * 2048 * BF16 == 8 * per_token
    assert zaya1.BASELINE_DESCRIPTION
