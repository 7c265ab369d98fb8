"""Tests for ``effexport::attention`` / ``attention_cache`` / ``attention_ring`` / ``attention_read``.

Covered: opcheck of every op; prefill equivalence with torch SDPA (explicit sliding boolean mask)
and with the samples' ``eager_attention`` (softcap, sinks, GQA 1/2/4/6, head dims 16/32/64,
windows 1/3/8/>=S); decode loops (step-by-step, random chunks, prefill longer than the window)
equal prefill on the whole sequence; ring contents; KV-sharing reads; argument errors; export with
dynamic batch and sequence; meta-device shapes at real size. fp32 tolerances come from
``_helpers.TOLERANCE``.
"""
import random

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from _helpers import assert_close
from effexport.custom_ops import attention as attn_mod
from effexport.samples._blocks import attention_mask, eager_attention

OPS = torch.ops.effexport


def _qkv(batch, heads, kv_heads, t_len, s_len, d, dv=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(batch, heads, t_len, d, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, s_len, d, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, s_len, dv, generator=gen).to(dtype)
    return q, k, v


def _sinks(heads, seed=1):
    return torch.randn(heads, generator=torch.Generator().manual_seed(seed))


def _blocks_ref(q, k, v, scale, window=0, softcap=0.0, sinks=None, q_start=None):
    """The samples' decomposed attention with ``attention_mask`` (queries at the last T positions)."""
    t_len, s_len = q.shape[2], k.shape[2]
    q_start = s_len - t_len if q_start is None else q_start
    mask = attention_mask(torch.arange(q_start, q_start + t_len), torch.arange(s_len), window or None)
    return eager_attention(q, k, v, mask, scale, softcap or None, sinks)


# ------------------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("groups", [pytest.param(g, id=f"gqa{g}") for g in (1, 2, 4, 6)])
@pytest.mark.parametrize("head_dim", [pytest.param(d, id=f"d{d}") for d in (16, 32, 64)])
@pytest.mark.parametrize("window", [pytest.param(w, id=f"w{w}") for w in (0, 1, 3, 8, 13, 40)])
def test_attention_matches_sdpa_sliding_mask(groups, head_dim, window):
    """Prefill with window W == torch SDPA with an explicit sliding boolean mask (GQA by expand)."""
    kv_heads, s_len = 2, 13
    q, k, v = _qkv(2, kv_heads * groups, kv_heads, s_len, s_len, head_dim, seed=groups + head_dim + window)
    scale = head_dim ** -0.5
    out = OPS.attention(q, k, v, scale=scale, window=window)
    i = torch.arange(s_len)
    diff = i[:, None] - i[None, :]
    mask = (diff >= 0) & ((diff < window) if window else True)  # [T, S] sliding causal
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1),
                                         v.repeat_interleave(groups, 1), attn_mask=mask, scale=scale)
    assert_close(out, ref, what="attention vs sdpa")
    assert_close(out, _blocks_ref(q, k, v, scale, window), what="attention vs eager_attention")


@pytest.mark.parametrize("case", [
    pytest.param(dict(window=0, softcap=0.0, sinks=False, t=5), id="causal-tail"),
    pytest.param(dict(window=3, softcap=0.0, sinks=False, t=5), id="window3-tail"),
    pytest.param(dict(window=0, softcap=5.0, sinks=False, t=11), id="softcap"),
    pytest.param(dict(window=0, softcap=0.0, sinks=True, t=11), id="sinks"),
    pytest.param(dict(window=4, softcap=2.0, sinks=True, t=7), id="window4-softcap-sinks"),
    pytest.param(dict(window=1, softcap=0.0, sinks=True, t=11), id="window1-sinks"),
    pytest.param(dict(window=64, softcap=30.0, sinks=True, t=1), id="window-gt-s-decode"),
])
@pytest.mark.parametrize("groups", [pytest.param(g, id=f"gqa{g}") for g in (1, 4, 6)])
def test_attention_matches_eager_blocks(case, groups):
    """Softcap, sinks, windows and trailing queries (T < S) == ``eager_attention`` + ``attention_mask``."""
    q, k, v = _qkv(2, 2 * groups, 2, case["t"], 11, 32, dv=24, seed=groups)
    sinks = _sinks(2 * groups) if case["sinks"] else None
    out = OPS.attention(q, k, v, sinks, scale=0.3, window=case["window"], softcap=case["softcap"])
    ref = _blocks_ref(q, k, v, 0.3, case["window"], case["softcap"], sinks)
    assert out.shape == (2, 2 * groups, case["t"], 24)
    assert_close(out, ref)


def test_attention_bidirectional():
    """``causal=False`` is unmasked attention (T need not be <= S) and rejects a window."""
    q, k, v = _qkv(1, 4, 2, 9, 5, 16)
    sinks = _sinks(4)
    out = OPS.attention(q, k, v, sinks, scale=0.25, causal=False, softcap=3.0)
    assert_close(out, eager_attention(q, k, v, None, 0.25, 3.0, sinks))
    with pytest.raises(ValueError, match="does not take a window"):
        OPS.attention(q, k, v, scale=0.25, causal=False, window=2)


def test_sinks_lower_the_output_mass():
    """A sink only adds to the denominator: a huge sink drives the output to 0, -inf sink == none."""
    q, k, v = _qkv(1, 2, 1, 4, 4, 8)
    no_sink = OPS.attention(q, k, v, scale=0.3)
    assert_close(OPS.attention(q, k, v, torch.full((2,), float("-inf")), scale=0.3), no_sink)
    assert OPS.attention(q, k, v, torch.full((2,), 1e4), scale=0.3).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
def test_attention_low_precision(dtype):
    """Half-precision inputs: fp32 softmax, output in q's dtype, within the dtype's tolerance."""
    q, k, v = _qkv(2, 4, 2, 12, 12, 32)
    out = OPS.attention(q.to(dtype), k.to(dtype), v.to(dtype), _sinks(4), scale=0.2, window=5,
                        softcap=10.0)
    assert out.dtype == dtype
    assert_close(out, _blocks_ref(q, k, v, 0.2, 5, 10.0, _sinks(4)), dtype=dtype)


# -------------------------------------------------------------------------------- decode loops
def _random_chunks(total, max_chunk, rng):
    chunks, done = [], 0
    while done < total:
        chunks.append(min(rng.randint(1, max_chunk), total - done))
        done += chunks[-1]
    return chunks


def _loop_case(seed):
    """A random shape/window/softcap/sinks case (seeded), with sequences much longer than W."""
    rng = random.Random(seed)
    kv_heads, groups = rng.choice([1, 2]), rng.choice([1, 2, 3])
    window = rng.choice([1, 2, 3, 5, 8])
    s_len = rng.randint(4 * window + 1, 6 * window + 7)
    q, k, v = _qkv(rng.choice([1, 2]), kv_heads * groups, kv_heads, s_len, s_len,
                   rng.choice([8, 16]), dv=rng.choice([8, 12]), seed=seed)
    sinks = _sinks(kv_heads * groups, seed) if rng.random() < 0.5 else None
    softcap = rng.choice([0.0, 4.0])
    return rng, q, k, v, sinks, window, softcap


LOOP_SEEDS = [pytest.param(s, id=f"seed{s}") for s in range(6)]


@pytest.mark.parametrize("seed", LOOP_SEEDS)
def test_attention_cache_loop_equals_prefill(seed):
    """Full-cache decode (random chunk sizes, incl. 1) == prefill; present == the whole K/V."""
    rng, q, k, v, sinks, window, softcap = _loop_case(seed)
    window = rng.choice([0, window])
    ref = OPS.attention(q, k, v, sinks, scale=0.4, window=window, softcap=softcap)
    k_cache, v_cache = k[:, :, :0], v[:, :, :0]
    outs, start = [], 0
    for t in _random_chunks(q.shape[2], 4, rng):
        sl = slice(start, start + t)
        out, k_cache, v_cache = OPS.attention_cache(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], k_cache, v_cache, sinks, scale=0.4,
            window=window, softcap=softcap)
        outs.append(out)
        start += t
    assert_close(torch.cat(outs, dim=2), ref, what="decode outputs")
    assert torch.equal(k_cache, k) and torch.equal(v_cache, v)


def _ring_expected(x, end, window):
    """Ring contents after writing positions < end: slot p mod W holds position p (else zeros)."""
    ring = torch.zeros(*x.shape[:2], window, x.shape[3], dtype=x.dtype)
    for p in range(max(0, end - window), end):
        ring[:, :, p % window] = x[:, :, p]
    return ring


def _run_ring(q, k, v, sinks, window, softcap, chunks):
    batch, kv_heads = k.shape[:2]
    k_ring = k.new_zeros(batch, kv_heads, window, k.shape[3])
    v_ring = v.new_zeros(batch, kv_heads, window, v.shape[3])
    outs, start = [], 0
    for t in chunks:
        sl = slice(start, start + t)
        out, k_ring, v_ring = OPS.attention_ring(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], k_ring, v_ring, torch.tensor(start), sinks,
            scale=0.4, window=window, softcap=softcap)
        outs.append(out)
        start += t
        assert torch.equal(k_ring, _ring_expected(k, start, window)), f"K ring after {start}"
        assert torch.equal(v_ring, _ring_expected(v, start, window)), f"V ring after {start}"
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("schedule", [
    pytest.param("steps", id="step-by-step"),
    pytest.param("chunks-le-w", id="random-chunks-le-window"),
    pytest.param("chunks-any", id="random-chunks-up-to-2w"),
    pytest.param("prefill-gt-w", id="prefill-gt-window-then-decode"),
])
@pytest.mark.parametrize("seed", LOOP_SEEDS)
def test_attention_ring_loop_equals_prefill(schedule, seed):
    """Ring decode == windowed prefill on the whole sequence (S >= 4W), ring holds the last W."""
    rng, q, k, v, sinks, window, softcap = _loop_case(seed)
    s_len = q.shape[2]
    if schedule == "steps":
        chunks = [1] * s_len
    elif schedule == "chunks-le-w":
        chunks = _random_chunks(s_len, window, rng)
    elif schedule == "chunks-any":
        chunks = _random_chunks(s_len, 2 * window + 1, rng)
    else:
        first = rng.randint(window + 1, 2 * window + 2)
        chunks = [first] + [1] * (s_len - first)
    ref = OPS.attention(q, k, v, sinks, scale=0.4, window=window, softcap=softcap)
    assert_close(_run_ring(q, k, v, sinks, window, softcap, chunks), ref, what=f"ring {chunks}")


def test_attention_ring_rejects_wrong_ring_size():
    q, k, v = _qkv(1, 2, 1, 1, 1, 8)
    ring = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="exactly window=3"):
        OPS.attention_ring(q, k, v, ring, ring, torch.tensor(0), scale=1.0, window=3)


# ---------------------------------------------------------------------------- KV-sharing reads
@pytest.mark.parametrize("window", [pytest.param(0, id="causal"), pytest.param(4, id="window4")])
def test_attention_read_full_cache(window):
    """A consumer reading the producer's full cache (chunks of any T) == attention on its K/V."""
    rng = random.Random(window)
    q_prod, k, v = _qkv(2, 4, 2, 23, 23, 16, seed=3)
    q_cons = _qkv(2, 8, 2, 23, 23, 16, seed=4)[0]  # consumer: own queries, more heads
    sinks = _sinks(8)
    ref = OPS.attention(q_cons, k, v, sinks, scale=0.5, window=window, softcap=6.0)
    k_cache, v_cache = k[:, :, :0], v[:, :, :0]
    outs, start = [], 0
    for t in _random_chunks(23, 5, rng):
        sl = slice(start, start + t)
        _, k_cache, v_cache = OPS.attention_cache(q_prod[:, :, sl], k[:, :, sl], v[:, :, sl],
                                                  k_cache, v_cache, scale=0.5, window=window)
        outs.append(OPS.attention_read(q_cons[:, :, sl], k_cache, v_cache, torch.tensor(start),
                                       sinks, scale=0.5, window=window, softcap=6.0))
        start += t
    assert_close(torch.cat(outs, dim=2), ref)


@pytest.mark.parametrize("read_window", [pytest.param(5, id="same-window"),
                                         pytest.param(3, id="smaller-window")])
def test_attention_read_ring_decode(read_window):
    """A consumer reading the producer's ring (after the producer wrote the token) == windowed
    attention on the producer's K/V, from a prefill longer than W through many decode steps."""
    window, s_len, prefill = 5, 31, 8
    q_prod, k, v = _qkv(2, 2, 1, s_len, s_len, 16, seed=5)
    q_cons = _qkv(2, 4, 1, s_len, s_len, 16, seed=6)[0]
    ref = OPS.attention(q_cons, k, v, scale=0.5, window=read_window)
    ring = k.new_zeros(2, 1, window, 16), v.new_zeros(2, 1, window, 16)
    _, *ring = OPS.attention_ring(q_prod[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill],
                                  *ring, torch.tensor(0), scale=0.5, window=window)
    outs = []
    for p in range(prefill, s_len):
        sl = slice(p, p + 1)
        _, *ring = OPS.attention_ring(q_prod[:, :, sl], k[:, :, sl], v[:, :, sl], *ring,
                                      torch.tensor(p), scale=0.5, window=window)
        outs.append(OPS.attention_read(q_cons[:, :, sl], *ring, torch.tensor(p), scale=0.5,
                                       window=read_window, ring=True))
    assert_close(torch.cat(outs, dim=2), ref[:, :, prefill:])


def test_attention_read_ring_multi_token_raises():
    q, k, v = _qkv(1, 2, 1, 2, 4, 8)
    with pytest.raises(ValueError, match="only exact for one query token"):
        OPS.attention_read(q, k, v, torch.tensor(6), scale=1.0, window=4, ring=True)
    with pytest.raises(ValueError, match="0 < window <= ring slots"):
        OPS.attention_read(q[:, :, :1], k, v, torch.tensor(6), scale=1.0, window=5, ring=True)


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda q, k, v: OPS.attention(q, k[:, :1].expand(-1, 1, -1, -1), v, scale=1.0),
                 "heads", id="kv-heads-mismatch"),
    pytest.param(lambda q, k, v: OPS.attention(q[:, :3], k, v, scale=1.0), "multiple", id="gqa-ratio"),
    pytest.param(lambda q, k, v: OPS.attention(q, k, v, torch.zeros(3), scale=1.0), "sinks",
                 id="sinks-shape"),
    pytest.param(lambda q, k, v: OPS.attention(q, k[:, :, :2], v[:, :, :2], scale=1.0), "last T",
                 id="t-gt-s"),
    pytest.param(lambda q, k, v: OPS.attention_read(q, k, v, torch.tensor([0]), scale=1.0), "0-d int64",
                 id="pos-shape"),
    pytest.param(lambda q, k, v: OPS.attention_cache(q, k, v, k.half(), v.half(), scale=1.0), "dtype",
                 id="cache-dtype"),
])
def test_argument_errors(call, match):
    """Bad shapes / arguments fail with a clear message instead of a wrong result."""
    q, k, v = _qkv(1, 4, 2, 4, 4, 8)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)


# ------------------------------------------------------------------------- samples' attention
def _sample_case(name):
    """(sample module, config, built model, per-layer (role, producer)) of a tiny preset."""
    from effexport.samples import get_sample
    sample = get_sample(name)
    cfg, model = sample.config, sample.build()
    if hasattr(cfg, "kv_roles"):  # gemma4: KV-sharing consumers read their producer's K/V
        roles = cfg.kv_roles()
    else:  # laguna: every layer owns its cache
        roles = (("independent", None),) * cfg.num_hidden_layers
    return sample.module, cfg, model, roles


@pytest.mark.parametrize("name", [pytest.param("gemma4-e2b:tiny", id="gemma4-e2b-tiny"),
                                  pytest.param("laguna-xs2:tiny", id="laguna-xs2-tiny")])
def test_sample_attention_core_matches_ops(name, monkeypatch):
    """Every attention layer's core ``(q, k, v) -> out`` of a tiny sample (scale and softcap as the
    layer passes them, window from the config's layer types), over a prefill longer
    than the window and decode steps to > 2W, equals the ops: ``attention`` (prefill),
    ``attention_cache`` (owners' decode), ``attention_ring`` (sliding owners, prefill and decode),
    ``attention_read`` on the producer's full cache and (decode) ring (Gemma 4 KV consumers)."""
    module, cfg, model, roles = _sample_case(name)
    calls = []
    real = module.eager_attention

    def recording(q, k, v, mask, scale, softcap=None, sinks=None):
        out = real(q, k, v, mask, scale, softcap, sinks)
        calls.append((q, k, v, dict(scale=scale, softcap=softcap or 0.0), out))
        return out

    monkeypatch.setattr(module, "eager_attention", recording)
    window, prefill = cfg.sliding_window, cfg.sliding_window + 3
    ids = module.example_inputs(cfg, batch=2, seq_len=2 * window + 4)
    rings, past, checked = {}, None, 0
    with torch.no_grad():
        for start, end in [(0, prefill)] + [(p, p + 1) for p in range(prefill, ids.shape[1])]:
            calls.clear()
            _, past = model(ids[:, start:end], past)
            pos = torch.tensor(start)
            assert len(calls) == cfg.num_hidden_layers
            for i, (q, k, v, kw, ref) in enumerate(calls):
                role, reads = roles[i]
                w = window if cfg.layer_types[i] == module.SLIDING else 0  # mask from the config
                kw["window"] = w
                if role == "consumer":
                    got = OPS.attention_read(q, k, v, pos, **kw)
                    if w and end - start == 1:
                        assert_close(OPS.attention_read(q, *rings[reads], pos, ring=True, **kw), ref,
                                     what=f"layer {i} ring read at {start}")
                elif start == 0:
                    got = OPS.attention(q, k, v, **kw)
                else:
                    got, k_present, _ = OPS.attention_cache(q, k[:, :, start:], v[:, :, start:],
                                                            k[:, :, :start], v[:, :, :start], **kw)
                    assert torch.equal(k_present, k)
                if w and role != "consumer":
                    ring = rings.get(i) or (k.new_zeros(*k.shape[:2], w, k.shape[3]),
                                            v.new_zeros(*v.shape[:2], w, v.shape[3]))
                    out, *rings[i] = OPS.attention_ring(q, k[:, :, start:], v[:, :, start:], *ring,
                                                        pos, **kw)
                    assert_close(out, ref, what=f"layer {i} ring at {start}")
                assert_close(got, ref, what=f"layer {i} at {start}")
                checked += 1
    assert checked == cfg.num_hidden_layers * (ids.shape[1] - prefill + 1)


# ----------------------------------------------------------------------------------- contract
def _opcheck_samples():
    q, k, v = _qkv(2, 4, 2, 3, 7, 8, dv=6)
    q1 = q[:, :, :1].contiguous()
    sinks = _sinks(4)
    k_new, v_new = k[:, :, :3].contiguous(), v[:, :, :3].contiguous()
    ring_k, ring_v = k[:, :, :4].contiguous(), v[:, :, :4].contiguous()
    return [
        pytest.param(OPS.attention.default, (q, k, v), dict(scale=0.3), id="attention-causal"),
        pytest.param(OPS.attention.default, (q, k, v, sinks),
                     dict(scale=0.3, window=2, softcap=3.0), id="attention-window-sinks-softcap"),
        pytest.param(OPS.attention.default, (q, k, v), dict(scale=0.3, causal=False), id="attention-full"),
        pytest.param(OPS.attention_cache.default, (q, k_new, v_new, k, v), dict(scale=0.3),
                     id="cache-causal"),
        pytest.param(OPS.attention_cache.default, (q, k_new, v_new, k[:, :, :0], v[:, :, :0], sinks),
                     dict(scale=0.3, window=3, softcap=2.0), id="cache-empty-past-window-sinks"),
        pytest.param(OPS.attention_ring.default, (q, k_new, v_new, ring_k, ring_v, torch.tensor(9)),
                     dict(scale=0.3, window=4), id="ring-chunk"),
        pytest.param(OPS.attention_ring.default,
                     (q1, k_new[:, :, :1], v_new[:, :, :1], ring_k, ring_v, torch.tensor(2), sinks),
                     dict(scale=0.3, window=4, softcap=1.0), id="ring-decode-partly-filled"),
        pytest.param(OPS.attention_read.default, (q, k, v, torch.tensor(4), sinks),
                     dict(scale=0.3, window=3), id="read-full"),
        pytest.param(OPS.attention_read.default, (q1, ring_k, ring_v, torch.tensor(11)),
                     dict(scale=0.3, window=4, ring=True), id="read-ring"),
    ]


@pytest.mark.parametrize("op,args,kwargs", _opcheck_samples())
def test_opcheck(op, args, kwargs):
    """``torch.library.opcheck``: schema, fake kernel (incl. dynamic shapes), no aliasing."""
    torch.library.opcheck(op, args, kwargs)


def test_ops_tuple_and_no_aliasing():
    """``OPS`` lists the five overloads; outputs are fresh tensors, inputs are left untouched."""
    assert attn_mod.OPS == (OPS.attention.default, OPS.attention_cache.default,
                            OPS.attention_ring.default, OPS.attention_read.default,
                            OPS.attention_buffer.default)
    q, k, v = _qkv(1, 2, 1, 1, 3, 8)
    ring_k, ring_v = k.clone(), v.clone()
    out, k_ring, v_ring = OPS.attention_ring(q, k[:, :, :1], v[:, :, :1], ring_k, ring_v,
                                             torch.tensor(1), scale=1.0, window=3)
    assert torch.equal(ring_k, k) and torch.equal(ring_v, v)  # not mutated
    for t in (out, k_ring, v_ring):
        assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
                   for x in (q, k, v, ring_k, ring_v))
    k_buf, v_buf = k.clone(), v.clone()
    out, k_out, v_out = OPS.attention_buffer(q, k[:, :, :1], v[:, :, :1], k_buf, v_buf, torch.tensor(1), scale=1.0)
    assert torch.equal(k_buf, k) and torch.equal(v_buf, v)  # the functional op writes a new buffer
    for t in (out, k_out, v_out):
        assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
                   for x in (q, k, v, k_buf, v_buf))


# ------------------------------------------------------------------------------------- export
class _OpModule(torch.nn.Module):
    """Wraps one op call so it can go through ``torch.export``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _export_cases():
    """(op, fn, example args, dims per arg, a second input set of other batch/sequence sizes)."""
    b, t, s, p = Dim.AUTO, Dim.AUTO, Dim.AUTO, Dim.AUTO

    def prefill(bs, t_len, s_len):
        q, k, v = _qkv(bs, 4, 2, t_len, s_len, 8, dv=6, seed=t_len)
        return q, k, v, _sinks(4)

    def cache(bs, t_len, p_len):
        q, k, v = _qkv(bs, 4, 2, t_len, p_len + t_len, 8, dv=6, seed=p_len)
        return q, k[:, :, p_len:], v[:, :, p_len:], k[:, :, :p_len], v[:, :, :p_len]

    def ring(bs, t_len, start):
        q, k, v = _qkv(bs, 4, 2, t_len, t_len + 4, 8, dv=6, seed=start)
        return q, k[:, :, :t_len], v[:, :, :t_len], k[:, :, t_len:], v[:, :, t_len:], torch.tensor(start)

    def read(bs, t_len, s_len):
        q, k, v = _qkv(bs, 4, 2, t_len, s_len, 8, dv=6, seed=s_len)
        return q, k, v, torch.tensor(s_len - t_len)

    def read_ring(bs, start):
        q, k, v = _qkv(bs, 4, 2, 1, 4, 8, dv=6, seed=start)
        return q, k, v, torch.tensor(start)

    qd = {0: b, 2: t}
    return [
        pytest.param(OPS.attention.default,
                     lambda q, k, v, sk: OPS.attention(q, k, v, sk, scale=0.3, window=3, softcap=4.0),
                     prefill(2, 5, 7), (qd, {0: b, 2: s}, {0: b, 2: s}, None), prefill(3, 9, 12),
                     id="attention"),
        pytest.param(OPS.attention_cache.default,
                     lambda *a: OPS.attention_cache(*a, scale=0.3, window=4),
                     cache(2, 3, 7), (qd, qd, qd, {0: b, 2: p}, {0: b, 2: p}), cache(3, 2, 11),
                     id="attention_cache"),
        pytest.param(OPS.attention_ring.default,
                     lambda *a: OPS.attention_ring(*a, scale=0.3, window=4),
                     ring(2, 3, 5), (qd, qd, qd, {0: b}, {0: b}, None), ring(3, 6, 13),
                     id="attention_ring"),
        pytest.param(OPS.attention_read.default,
                     lambda *a: OPS.attention_read(*a, scale=0.3, window=5),
                     read(2, 3, 8), (qd, {0: b, 2: s}, {0: b, 2: s}, None), read(3, 4, 15),
                     id="attention_read"),
        pytest.param(OPS.attention_read.default,
                     lambda *a: OPS.attention_read(*a, scale=0.3, window=4, ring=True),
                     read_ring(2, 9), ({0: b}, {0: b}, {0: b}, None), read_ring(3, 2),
                     id="attention_read-ring"),
    ]


@pytest.mark.parametrize("op,fn,args,dims,other", _export_cases())
def test_export_dynamic_batch_and_sequence(op, fn, args, dims, other):
    """``torch.export`` keeps the op as one node with symbolic batch/sequence; the exported program
    equals eager on the example and on inputs of other batch and sequence sizes."""
    ep = torch.export.export(_OpModule(fn), args, dynamic_shapes=(dims,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(op) == 1, targets
    for inputs in (args, other):
        got, want = ep.module()(*inputs), fn(*inputs)
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        for g, w in zip(got, want):
            assert_close(g, w, what=f"exported {op}")


# --------------------------------------------------------------------------------------- meta
def test_real_size_shapes_on_meta():
    """Gemma 4 E2B global layer at 128k context, and a Laguna sliding layer, on the meta device."""
    with torch.device("meta"):
        q = torch.empty(1, 8, 1, 512)
        k = torch.empty(1, 1, 131072, 512)
        out = OPS.attention_read(q, k, k, torch.tensor(131071), scale=1.0)
        assert out.shape == (1, 8, 1, 512) and out.device.type == "meta"
        q, k_new = torch.empty(1, 64, 1, 128), torch.empty(1, 8, 1, 128)
        ring = torch.empty(1, 8, 512, 128)
        out, k_ring, _ = OPS.attention_ring(q, k_new, k_new, ring, ring, torch.tensor(100000),
                                            torch.empty(64), scale=128 ** -0.5, window=512)
        assert out.shape == (1, 64, 1, 128) and k_ring.shape == ring.shape
        new, past = torch.empty(1, 8, 4, 128), torch.empty(1, 8, 4096, 128)
        out, k_present, _ = OPS.attention_cache(torch.empty(1, 48, 4, 128), new, new, past, past,
                                                scale=128 ** -0.5)
        assert out.shape == (1, 48, 4, 128) and k_present.shape == (1, 8, 4100, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16")])
def test_cuda_matches_cpu(dtype):
    """The eager kernels run on CUDA (pos on the GPU or the CPU) and match the CPU results."""
    q, k, v = _qkv(2, 6, 2, 5, 12, 32, dv=16)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    sinks = _sinks(6)
    ring_k, ring_v = k[:, :, 5:9], v[:, :, 5:9]
    calls = [
        lambda q, k, v, s, p: OPS.attention(q, k, v, s, scale=0.3, window=4, softcap=5.0),
        lambda q, k, v, s, p: OPS.attention_cache(q, k[:, :, :5], v[:, :, :5], k[:, :, 5:], v[:, :, 5:],
                                                  s, scale=0.3, window=3),
        lambda q, k, v, s, p: OPS.attention_ring(q, k[:, :, :5], v[:, :, :5], k[:, :, 5:9], v[:, :, 5:9],
                                                 p, s, scale=0.3, window=4),
        lambda q, k, v, s, p: OPS.attention_read(q, k, v, p, s, scale=0.3, window=6),
        lambda q, k, v, s, p: OPS.attention_read(q[:, :, :1], ring_k.to(q.device), ring_v.to(q.device),
                                                 p, s, scale=0.3, window=4, ring=True),
    ]
    for i, call in enumerate(calls):
        want = call(q, k, v, sinks, torch.tensor(7))
        for pos_device in ("cuda", "cpu"):
            got = call(q.cuda(), k.cuda(), v.cuda(), sinks.cuda(), torch.tensor(7, device=pos_device))
            got, want_t = (got, want) if isinstance(want, tuple) else ((got,), (want,))
            for g, w in zip(got, want_t):
                assert g.device.type == "cuda" and g.dtype == w.dtype
                assert_close(g.cpu(), w, dtype=dtype, what=f"call {i} pos on {pos_device}")
