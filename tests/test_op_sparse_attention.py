"""Tests for ``effexport::sparse_attention`` / ``sparse_attention_ring`` (DeepSeek V4 core attention).

Oracles: a brute-force loop that gathers the explicit key set of every query (window entries, then
the selected or all visible compressed entries) and runs a float64 softmax with the sink in the
denominator; a port of the official ``sparse_attn`` gather kernel fed with the official index
construction (``get_window_topk_idxs`` / ``get_compress_topk_idxs``); the eager sample's
``sparse_attention_reference`` and ``Attention`` layer when ``samples/deepseek_v4.py`` is present.
Properties: ring decode == prefill at every position (T >> window), ring chunks, chunked prefill
with a window prefix, sink mass, -1 / invisible indices ignored. Plus opcheck and torch.export.
"""
import importlib.util
import random

import pytest
import torch

from _helpers import assert_close

from effexport.custom_ops import indexer_topk  # noqa: F401  (registers effexport::indexer_topk)
from effexport.custom_ops import kv_compress as kvc
from effexport.custom_ops import sparse_attention as spa


def _inputs(bsz, seqlen, heads, dim, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, seqlen, heads, dim, generator=g).to(dtype)
    kv = torch.randn(bsz, seqlen, dim, generator=g).to(dtype)
    comp = torch.randn(bsz, n, dim, generator=g).to(dtype)
    sink = torch.randn(heads, generator=g)
    return q, kv, comp, sink


def _random_idx(bsz, seqlen, k, n, ratio, pos=0, seed=0):
    """Distinct visible indices per query (sorted randomly), -1 where fewer than k are visible."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((bsz, seqlen, k), -1, dtype=torch.int64)
    for b in range(bsz):
        for t in range(seqlen):
            n_vis = min(n, (pos + t + 1) // ratio)
            pick = torch.randperm(n_vis, generator=g)[:k]
            idx[b, t, :len(pick)] = pick
    return idx


def _op(q, kv, comp, idx, sink, pos, window, ratio, scale=0.3):
    return torch.ops.effexport.sparse_attention(q, kv, comp, idx, sink, torch.tensor(pos), scale=scale,
                                                window=window, ratio=ratio)


def _ring(q, ring, comp, idx, sink, pos, window, ratio, scale=0.3):
    return torch.ops.effexport.sparse_attention_ring(q, ring, comp, idx, sink, torch.tensor(pos),
                                                     scale=scale, window=window, ratio=ratio)


def _brute_force(q, kv, comp, idx, sink, pos, window, ratio, scale=0.3):
    """Per (b, t, h): the explicit key list, float64 softmax with exp(sink) in the denominator."""
    bsz, seqlen, heads, _ = q.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(bsz):
        for t in range(seqlen):
            p = pos + t
            keys = [kv[b, s] for s in range(kv.shape[1]) if p - window < pos + seqlen - kv.shape[1] + s <= p]
            if ratio and idx is None:
                keys += [comp[b, i] for i in range(comp.shape[1]) if ratio * (i + 1) <= p + 1]
            elif ratio:
                keys += [comp[b, i] for i in idx[b, t].tolist() if i >= 0]
            keys = torch.stack(keys).double()  # [n_keys, D]
            for h in range(heads):
                logits = keys @ q[b, t, h].double() * scale
                weights = logits.exp() / (logits.exp().sum() + torch.exp(sink[h].double()))
                out[b, t, h] = weights @ keys
    return out


@pytest.mark.parametrize("mode,ratio,pos,seqlen,kv_len", [
    pytest.param("csa", 4, 0, 21, 21, id="csa-prefill"),
    pytest.param("hca", 4, 0, 21, 21, id="hca-prefill"),
    pytest.param("swa", 0, 0, 13, 13, id="window-only"),
    pytest.param("csa", 4, 9, 6, 10, id="csa-chunk-with-prefix"),
    pytest.param("hca", 3, 30, 1, 5, id="hca-decode-seq"),
])
def test_equals_explicit_gathered_set(mode, ratio, pos, seqlen, kv_len):
    """CSA with idx == attention over the explicitly gathered set; HCA == all visible entries;
    ratio 0 == window only (fp32 <= 1e-5 against a float64 loop)."""
    window, n = 5, (pos + seqlen) // max(ratio, 1) + 2  # two never-visible tail slots
    q, _, comp, sink = _inputs(2, seqlen, 3, 8, n, seed=seqlen)
    kv = torch.randn(2, kv_len, 8)
    idx = _random_idx(2, seqlen, 3, n, ratio, pos) if mode == "csa" else None
    got = _op(q, kv, comp, idx, sink, pos, window, ratio)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert_close(got, _brute_force(q, kv, comp, idx, sink, pos, window, ratio).float())


def test_ignores_minus_one_and_invisible_indices():
    """-1, out-of-range and not-yet-visible indices add nothing; dropping them changes nothing."""
    q, kv, comp, sink = _inputs(1, 9, 2, 8, 6)
    idx = _random_idx(1, 9, 2, 6, 4)
    noisy = torch.cat([idx, torch.full((1, 9, 1), -1), torch.full((1, 9, 1), 5),
                       torch.full((1, 9, 1), 17)], dim=-1)  # entry 5 is invisible for t < 23
    assert_close(_op(q, kv, comp, noisy, sink, 0, 4, 4), _op(q, kv, comp, idx, sink, 0, 4, 4))


def test_sink_mass():
    """Zero queries make every logit 0: o = mean(keys) * n / (n + exp(sink_h)) per head; a very
    negative sink is plain softmax attention."""
    q, kv, comp, _ = _inputs(1, 7, 2, 4, 3)
    sink = torch.tensor([0.0, 2.0])
    got = _op(torch.zeros_like(q), kv, comp, None, sink, 0, 3, 2)
    for t in range(7):
        keys = torch.cat([kv[0, max(0, t - 2): t + 1], comp[0, : (t + 1) // 2]])
        for h in range(2):
            want = keys.sum(0) / (len(keys) + sink[h].exp())
            torch.testing.assert_close(got[0, t, h], want, rtol=1e-6, atol=1e-6)
    no_sink = _op(q, kv, comp, None, torch.full((2,), -1e4), 0, 3, 2)
    keys = torch.cat([kv[0, 4:7], comp[0, :3]])  # t = 6: window {4, 5, 6} + entries 0..2
    want = torch.softmax(keys @ q[0, 6].T * 0.3, dim=0).T @ keys  # [H, D]
    assert_close(no_sink[0, 6], want)


@pytest.mark.parametrize("mode", [pytest.param("csa", id="csa"), pytest.param("hca", id="hca"),
                                  pytest.param("swa", id="window-only")])
def test_ring_decode_equals_prefill_every_position(mode):
    """Decoding one token at a time through a W-slot ring reproduces every prefill row, for a
    sequence of 4.5 windows (positions wrap the ring several times)."""
    window, ratio, total = 6, (0 if mode == "swa" else 4), 29
    n = total // 4
    q, kv, comp, sink = _inputs(2, total, 3, 8, n, seed=1)
    idx = _random_idx(2, total, 3, n, 4) if mode == "csa" else None
    full = _op(q, kv, comp, idx, sink, 0, window, ratio)
    ring = torch.zeros(2, window, 8)
    for p in range(total):
        ring = ring.index_copy(1, torch.tensor([p % window]), kv[:, p:p + 1])
        step_idx = None if idx is None else idx[:, p:p + 1]
        got = _ring(q[:, p:p + 1], ring, comp, step_idx, sink, p, window, ratio)
        assert_close(got, full[:, p:p + 1], what=f"position {p}")


def test_ring_chunks_and_chunked_prefill():
    """Seeded random chunk sizes: a ring of W + T - 1 slots and the prefill form with the previous
    window - 1 rows prepended both reproduce the full prefill rows."""
    rnd = random.Random(0)
    window, ratio, total = 5, 4, 31
    q, kv, comp, sink = _inputs(1, total, 2, 8, total // ratio, seed=2)
    idx = _random_idx(1, total, 2, total // ratio, ratio, seed=2)
    full = _op(q, kv, comp, idx, sink, 0, window, ratio)
    p = 0
    while p < total:
        t = min(rnd.randrange(1, 5), total - p)
        slots = window + t - 1
        ring = torch.zeros(1, slots, 8)
        for s in range(max(0, p + t - slots), p + t):  # the ring holds the latest `slots` positions
            ring[:, s % slots] = kv[:, s]
        rows = slice(p, p + t)
        assert_close(_ring(q[:, rows], ring, comp, idx[:, rows], sink, p, window, ratio), full[:, rows],
                     what=f"ring chunk at {p}")
        lo = max(0, p - window + 1)
        assert_close(_op(q[:, rows], kv[:, lo:p + t], comp, idx[:, rows], sink, p, window, ratio),
                     full[:, rows], what=f"prefill chunk at {p}")
        p += t
    with pytest.raises(ValueError, match="W >= window"):
        _ring(q[:, :3], torch.zeros(1, window, 8), comp, None, sink, 0, window, ratio)


def test_matches_official_sparse_attn_kernel():
    """The official path: window + compressed index lists over ``cat(kv, comp)`` gathered by the
    debug ``sparse_attn`` kernel (ported), prefill, both CSA (topk idx + offset) and HCA."""
    window, ratio, total, heads, dim = 8, 4, 27, 2, 16
    q, kv, comp, sink = _inputs(1, total, heads, dim, total // ratio, seed=5)
    base = torch.arange(total).unsqueeze(1)  # get_window_topk_idxs(start_pos=0)
    win = (base - window + 1).clamp(0) + torch.arange(min(total, window))
    win = torch.where(win > base, -1, win)
    for idx in (None, _random_idx(1, total, 3, total // ratio, ratio, seed=5)):
        if idx is None:  # get_compress_topk_idxs(start_pos=0, offset=total)
            cidx = torch.arange(total // ratio).repeat(total, 1)
            cidx = torch.where(cidx >= torch.arange(1, total + 1).unsqueeze(1) // ratio, -1, cidx + total)
        else:
            cidx = torch.where(idx[0] < 0, -1, idx[0] + total)
        topk = torch.cat([win, cidx], dim=-1)[None]  # [1, T, window + K]
        keys = torch.cat([kv, comp], dim=1)
        valid = topk != -1
        sel = keys.unsqueeze(1).expand(1, total, -1, dim).gather(
            2, topk.clamp_min(0).unsqueeze(-1).expand(1, total, topk.shape[-1], dim))
        scores = torch.einsum("bshd,bskd->bshk", q, sel) * 0.3
        scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
        mx = scores.max(dim=-1).values
        ex = torch.exp(scores - mx.unsqueeze(-1))
        denom = ex.sum(-1) + torch.exp(sink.view(1, 1, heads) - mx)
        ref = torch.einsum("bshk,bskd->bshd", ex / denom.unsqueeze(-1), sel)
        assert_close(_op(q, kv, comp, idx, sink, 0, window, ratio), ref, what=f"idx={idx is not None}")


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
def test_low_precision_close_to_fp32(dtype):
    q, kv, comp, sink = _inputs(2, 13, 2, 16, 3, seed=7)
    idx = _random_idx(2, 13, 2, 3, 4)
    ref = _op(q, kv, comp, idx, sink, 0, 5, 4)
    got = _op(q.to(dtype), kv.to(dtype), comp.to(dtype), idx, sink, 0, 5, 4)
    assert got.dtype == dtype
    assert_close(got, ref, dtype=dtype)


# ------------------------------------------------------------------------ contract: opcheck etc.
def test_opcheck():
    """``torch.library.opcheck`` on prefill (CSA; HCA with no entries yet and a window prefix) and
    ring decode (CSA, HCA) inputs."""
    q, kv, comp, sink = _inputs(2, 9, 2, 8, 3)
    idx = _random_idx(2, 9, 2, 3, 3)
    kw = dict(scale=0.25, window=4, ratio=3)
    for args in [(q, kv, comp, idx, sink, torch.tensor(0)),
                 (q, kv[:, :4], comp[:, :0], None, sink, torch.tensor(4))]:
        torch.library.opcheck(spa.OPS[0], args, kw)
    for args in [(q[:, :1], kv[:, :4], comp, idx[:, :1], sink, torch.tensor(11)),
                 (q[:, :1], kv[:, :4], comp, None, sink, torch.tensor(2))]:
        torch.library.opcheck(spa.OPS[1], args, kw)


class _Prefill(torch.nn.Module):
    def forward(self, q, kv, comp, idx, sink, pos):
        return torch.ops.effexport.sparse_attention(q, kv, comp, idx, sink, pos, scale=0.3, window=5, ratio=4)


class _Ring(torch.nn.Module):
    def forward(self, q, ring, comp, idx, sink, pos):
        return torch.ops.effexport.sparse_attention_ring(q, ring, comp, idx, sink, pos, scale=0.3, window=5,
                                                         ratio=4)


def test_export_dynamic_batch_and_sequence():
    """Both forms export with dynamic B, T (= S) and N; exported programs equal eager on new sizes."""
    auto = torch.export.Dim.AUTO
    q, kv, comp, sink = _inputs(2, 11, 2, 8, 3)
    idx = _random_idx(2, 11, 3, 3, 4)
    dyn = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, None, None)
    ep = torch.export.export(_Prefill(), (q, kv, comp, idx, sink, torch.tensor(0)), dynamic_shapes=dyn)
    q3, kv3, comp3, _ = _inputs(3, 22, 2, 8, 5, seed=3)
    idx3 = _random_idx(3, 22, 3, 5, 4, seed=3)
    args = (q3, kv3, comp3, idx3, sink, torch.tensor(0))
    assert_close(ep.module()(*args), _Prefill()(*args), what="exported prefill")

    ring_dyn = ({0: auto}, {0: auto}, {0: auto, 1: auto}, {0: auto}, None, None)
    ep = torch.export.export(_Ring(), (q[:, :1], kv[:, :5], comp, idx[:, :1], sink, torch.tensor(10)),
                             dynamic_shapes=ring_dyn)
    args = (q3[:, 20:21], kv3[:, :5], comp3, idx3[:, 20:21], sink, torch.tensor(20))
    assert_close(ep.module()(*args), _Ring()(*args), what="exported ring")


def test_real_size_shapes_on_meta():
    """V4-Flash decode sizes (64 heads x 512, ring 128, 1M/4 entries, top-512) through the fakes."""
    with torch.device("meta"):
        q, comp = torch.empty(1, 1, 64, 512), torch.empty(1, 262144, 512)
        out = torch.ops.effexport.sparse_attention_ring(
            q, torch.empty(1, 128, 512), comp, torch.empty(1, 1, 512, dtype=torch.int64), torch.empty(64),
            torch.tensor(5), scale=512 ** -0.5, window=128, ratio=4)
    assert out.shape == (1, 1, 64, 512)


@pytest.mark.parametrize("bad", [pytest.param("sink", id="sink-shape"), pytest.param("dim", id="kv-dim"),
                                 pytest.param("idx", id="idx-dtype"), pytest.param("window", id="window-0")])
def test_rejects_bad_inputs(bad):
    q, kv, comp, sink = _inputs(1, 4, 2, 8, 1)
    idx, window = torch.zeros(1, 4, 1, dtype=torch.int64), 3
    if bad == "sink":
        sink = sink[:1]
    elif bad == "dim":
        kv = kv[..., :4]
    elif bad == "idx":
        idx = idx.int()
    else:
        window = 0
    with pytest.raises(ValueError):
        _op(q, kv, comp, idx, sink, 0, window, 4)


# --------------------------------------------------------------------- the eager sample's pieces
HAS_SAMPLE = importlib.util.find_spec("effexport.samples.deepseek_v4") is not None
sample_only = pytest.mark.skipif(not HAS_SAMPLE, reason="samples/deepseek_v4.py is not present")


@sample_only
@pytest.mark.parametrize("mode,pos,seqlen,kv_len", [
    pytest.param("csa", 0, 19, 19, id="csa-prefill"), pytest.param("hca", 0, 19, 19, id="hca-prefill"),
    pytest.param("swa", 0, 19, 19, id="window-only"), pytest.param("csa", 30, 1, 5, id="csa-decode"),
])
def test_matches_sample_reference(mode, pos, seqlen, kv_len):
    """``sparse_attention`` == the sample's ``sparse_attention_reference`` (fp32 <= 1e-5)."""
    from effexport.samples import deepseek_v4 as dsv4
    window, ratio = 5, (0 if mode == "swa" else 4)
    n = (pos + seqlen) // 4
    q, _, comp, sink = _inputs(2, seqlen, 3, 8, n, seed=pos)
    kv = torch.randn(2, kv_len, 8)
    idx = _random_idx(2, seqlen, 3, n, 4, pos) if mode == "csa" else None
    q_pos = torch.arange(pos, pos + seqlen)
    kv_pos = torch.arange(pos + seqlen - kv_len, pos + seqlen)
    want = dsv4.sparse_attention_reference(q, kv, None if mode == "swa" else comp, idx, sink, q_pos, kv_pos,
                                           window, ratio, 0.3)
    assert_close(_op(q, kv, comp, idx, sink, pos, window, ratio), want)


@pytest.fixture(scope="module")
def tiny_model():
    from effexport.samples import get_sample
    return get_sample("deepseek-v4-flash:tiny").build()


class _OpsLayer:
    """The sample ``Attention`` layer rebuilt on the three effexport ops, with the official decode
    layout: a W-slot ring, fixed-capacity entry buffers and compressor states. Everything outside
    the ops (projections, norms, RoPE, Hadamard, inverse RoPE, grouped output projection) reuses the
    sample's own modules and functions."""

    def __init__(self, attn, bsz, max_len):
        from effexport.samples import deepseek_v4 as dsv4
        self.m, self.dsv4, self.c = attn, dsv4, attn.config
        self.inv_freq = dsv4.layer_inv_freq(self.c, attn.layer)
        d, r, di = self.c.head_dim, attn.ratio, self.c.index_head_dim
        self.ring = torch.zeros(bsz, self.c.window_size, d)
        if r:
            self.comp = torch.zeros(bsz, max_len // r, d)
            self.state = kvc.empty_state(bsz, r, attn.compressor.overlap, d)
        if attn.indexer is not None:
            self.keys = torch.zeros(bsz, max_len // r, di)
            self.index_state = kvc.empty_state(bsz, r, True, di)

    def _compress(self, comp_mod, x, buf, state, pos):
        a = torch.nn.functional.linear(x.float(), comp_mod.wkv.weight.float())
        z = torch.nn.functional.linear(x.float(), comp_mod.wgate.weight.float())
        return torch.ops.effexport.kv_compress_step(
            a, z, comp_mod.ape, comp_mod.norm.weight, self.inv_freq, buf, *state, pos, ratio=comp_mod.ratio,
            overlap=comp_mod.overlap, eps=comp_mod.norm.eps, rope_dim=self.c.rope_head_dim)

    @torch.no_grad()
    def __call__(self, x, start):
        m, c, dsv4, inv = self.m, self.c, self.dsv4, self.inv_freq
        bsz, t, _ = x.shape
        positions, pos = torch.arange(start, start + t), torch.tensor(start)
        qr = m.q_norm(m.wq_a(x))
        q = m.wq_b(qr).unflatten(-1, (c.n_heads, c.head_dim))  # [B, T, H, D]
        q = dsv4.rope_interleaved(dsv4.rms_norm(q, None, m.eps), positions, inv)
        kv = dsv4.rope_interleaved(m.kv_norm(m.wkv(x)), positions, inv)  # [B, T, D]
        self.ring = self.ring.index_copy(1, positions % c.window_size, kv)  # T == 1 here
        idx = None
        if m.ratio:
            self.comp, *self.state = self._compress(m.compressor, x, self.comp, self.state, pos)
        if m.indexer is not None:
            self.keys, *self.index_state = self._compress(m.indexer.compressor, x, self.keys,
                                                          self.index_state, pos)
            qi = m.indexer.wq_b(qr).unflatten(-1, (m.indexer.n_heads, m.indexer.head_dim))
            hada = dsv4.hadamard_matrix(m.indexer.head_dim)
            qi = dsv4.rope_interleaved(qi, positions, inv) @ hada
            w = m.indexer.weights_proj(x).float() * (m.indexer.head_dim ** -0.5 * m.indexer.n_heads ** -0.5)
            idx = torch.ops.effexport.indexer_topk(qi, w, self.keys @ hada, pos, ratio=m.ratio,
                                                   topk=c.index_topk)
        comp = self.comp if m.ratio else torch.zeros(bsz, 0, c.head_dim)
        o = torch.ops.effexport.sparse_attention_ring(q, self.ring, comp, idx, m.attn_sink, pos,
                                                      scale=c.head_dim ** -0.5, window=c.window_size,
                                                      ratio=m.ratio)
        o = dsv4.rope_interleaved(o, positions, inv, inverse=True).reshape(bsz, t, c.o_groups, -1)
        o = torch.einsum("btgd,grd->btgr", o, m.wo_a.weight.view(c.o_groups, c.o_lora_rank, -1))
        return m.wo_b(o.flatten(2))


@sample_only
@pytest.mark.parametrize("layer", [pytest.param(2, id="csa"), pytest.param(3, id="hca"),
                                   pytest.param(0, id="window-only")])
def test_sample_attention_layer_rebuilt_on_ops(tiny_model, layer):
    """Prefill through ``kv_compress`` + ``indexer_topk`` + ``sparse_attention`` and one-token decode
    through the step / ring forms both reproduce the sample's ``Attention`` (fp32 <= 1e-5), over
    T = 4 windows (past several HCA blocks, not a multiple of any ratio)."""
    from effexport.samples import deepseek_v4 as dsv4
    attn, c = tiny_model.layers[layer].attn, tiny_model.config
    total = 4 * c.window_size + 3  # 35 tokens: 8 CSA blocks, 2 HCA blocks of 16
    x = torch.randn(2, total, c.dim)
    with torch.no_grad():
        want, _ = attn(x, torch.arange(total), 0, None)  # the sample's full-sequence forward

        # prefill through the prefill forms
        inv, pos0 = dsv4.layer_inv_freq(c, layer), torch.tensor(0)
        qr = attn.q_norm(attn.wq_a(x))
        q = attn.wq_b(qr).unflatten(-1, (c.n_heads, c.head_dim))  # [B, T, H, D]
        q = dsv4.rope_interleaved(dsv4.rms_norm(q, None, attn.eps), torch.arange(total), inv)
        kv = dsv4.rope_interleaved(attn.kv_norm(attn.wkv(x)), torch.arange(total), inv)
        comp, idx = torch.zeros(2, 0, c.head_dim), None

        def prefill_compress(mod):
            a = torch.nn.functional.linear(x.float(), mod.wkv.weight.float())
            z = torch.nn.functional.linear(x.float(), mod.wgate.weight.float())
            return torch.ops.effexport.kv_compress(a, z, mod.ape, mod.norm.weight, inv, ratio=mod.ratio,
                                                   overlap=mod.overlap, eps=mod.norm.eps,
                                                   rope_dim=c.rope_head_dim)[0]
        if attn.ratio:
            comp = prefill_compress(attn.compressor)
        if attn.indexer is not None:
            ix, hada = attn.indexer, dsv4.hadamard_matrix(c.index_head_dim)
            qi = ix.wq_b(qr).unflatten(-1, (ix.n_heads, ix.head_dim))  # [B, T, Hi, Di]
            qi = dsv4.rope_interleaved(qi, torch.arange(total), inv) @ hada
            w = ix.weights_proj(x).float() * (ix.head_dim ** -0.5 * ix.n_heads ** -0.5)
            idx = torch.ops.effexport.indexer_topk(qi, w, prefill_compress(ix.compressor) @ hada, pos0,
                                                   ratio=4, topk=c.index_topk)
        o = torch.ops.effexport.sparse_attention(q, kv, comp, idx, attn.attn_sink, pos0,
                                                 scale=c.head_dim ** -0.5, window=c.window_size,
                                                 ratio=attn.ratio)
        o = dsv4.rope_interleaved(o, torch.arange(total), inv, inverse=True).reshape(2, total, c.o_groups, -1)
        o = torch.einsum("btgd,grd->btgr", o, attn.wo_a.weight.view(c.o_groups, c.o_lora_rank, -1))
    assert_close(attn.wo_b(o.flatten(2)).detach(), want, what="prefill via ops")

    ops_layer = _OpsLayer(attn, 2, max_len=64)
    decoded = torch.cat([ops_layer(x[:, p:p + 1], p) for p in range(total)], dim=1)
    assert_close(decoded, want, what="ring decode via ops")
