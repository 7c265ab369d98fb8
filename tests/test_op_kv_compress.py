"""Tests for ``effexport::kv_compress`` / ``kv_compress_step`` (DeepSeek V4 CSA/HCA compressor).

Oracles: (1) a line-by-line port of the official ``Compressor.forward`` (prefill and one-token
decode, in-place state, complex-number RoPE; FP8/FP4 simulation left out as in the op), (2) the
prefill form itself for the stepwise form (random chunkings from the empty state, T much longer than
the ratio and not a multiple of it), (3) the eager sample ``samples/deepseek_v4.py`` when present.
Plus opcheck, torch.export with dynamic batch/sequence, static-shape guarantees and input checks.
"""
import importlib.util
import random

import pytest
import torch

from _helpers import assert_close

from effexport.custom_ops import kv_compress as kvc

EPS = 1e-6
CASES = [  # ratio, overlap, c, rope_dim
    pytest.param(4, True, 16, 8, id="csa-r4"),
    pytest.param(16, False, 16, 8, id="hca-r16"),
    pytest.param(128, False, 8, 4, id="hca-r128"),
    pytest.param(3, True, 8, 0, id="csa-r3-norope"),
]


def _inputs(bsz, seqlen, ratio, overlap, c, rope_dim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    width = (2 if overlap else 1) * c
    a = torch.randn(bsz, seqlen, width, generator=g).to(dtype)
    z = (torch.randn(bsz, seqlen, width, generator=g) * 2).to(dtype)
    ape = torch.randn(ratio, width, generator=g)
    norm_w = torch.rand(c, generator=g) + 0.5
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / max(rope_dim, 1))
    return a, z, ape, norm_w, inv_freq


def _finite(x):
    """-inf (unfilled state logits) -> 0 so states compare with :func:`assert_close`."""
    return x.nan_to_num(neginf=0.0)


def _prefill(a, z, ape, nw, inv, ratio, overlap, rope_dim):
    return torch.ops.effexport.kv_compress(a, z, ape, nw, inv, ratio=ratio, overlap=overlap, eps=EPS,
                                           rope_dim=rope_dim)


def _step(a, z, ape, nw, inv, cache, sa, sz, pos, ratio, overlap, rope_dim):
    return torch.ops.effexport.kv_compress_step(a, z, ape, nw, inv, cache, sa, sz, torch.tensor(pos),
                                                ratio=ratio, overlap=overlap, eps=EPS, rope_dim=rope_dim)


# ------------------------------------------------------------------ official Compressor (ported)
class OfficialCompressor:
    """``inference/model.py::Compressor.forward`` @ DeepSeek-V4-Pro (verbatim logic), fed with the
    projections ``kv = x W^c_kv`` and ``score = x W^c_gate`` instead of ``x``; no quantization."""

    def __init__(self, bsz, ratio, overlap, c, rope_dim, ape, norm_w, inv_freq, max_len):
        coff = 1 + overlap
        self.ratio, self.overlap, self.d, self.rd = ratio, overlap, c, rope_dim
        self.ape, self.norm_w = ape, norm_w
        self.kv_state = torch.zeros(bsz, coff * ratio, coff * c)
        self.score_state = torch.full((bsz, coff * ratio, coff * c), float("-inf"))
        self.kv_cache = torch.zeros(bsz, max_len // ratio, c)
        freqs = torch.outer(torch.arange(max_len), inv_freq)
        self.freqs_cis = torch.polar(torch.ones_like(freqs), freqs)

    def overlap_transform(self, tensor, value=0):
        b, s, _, _ = tensor.size()
        ratio, d = self.ratio, self.d
        new_tensor = tensor.new_full((b, s, 2 * ratio, d), value)
        new_tensor[:, :, ratio:] = tensor[:, :, :, d:]
        new_tensor[:, 1:, :ratio] = tensor[:, :-1, :, :d]
        return new_tensor

    def rope(self, x, freqs_cis):  # apply_rotary_emb on [b, s, rd]
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * freqs_cis.view(1, xc.size(1), xc.size(-1))).flatten(-2)

    def forward(self, kv, score, start_pos):
        bsz, seqlen, _ = kv.size()
        ratio, overlap, d, rd = self.ratio, self.overlap, self.d, self.rd
        if start_pos == 0:
            should_compress = seqlen >= ratio
            remainder = seqlen % ratio
            cutoff = seqlen - remainder
            offset = ratio if overlap else 0
            if overlap and cutoff >= ratio:
                self.kv_state[:bsz, :ratio] = kv[:, cutoff - ratio: cutoff]
                self.score_state[:bsz, :ratio] = score[:, cutoff - ratio: cutoff] + self.ape
            if remainder > 0:
                kv, self.kv_state[:bsz, offset: offset + remainder] = kv.split([cutoff, remainder], dim=1)
                self.score_state[:bsz, offset: offset + remainder] = score[:, cutoff:] + self.ape[:remainder]
                score = score[:, :cutoff]
            kv = kv.unflatten(1, (-1, ratio))
            score = score.unflatten(1, (-1, ratio)) + self.ape
            if overlap:
                kv = self.overlap_transform(kv, 0)
                score = self.overlap_transform(score, float("-inf"))
            kv = (kv * score.softmax(dim=2)).sum(dim=2)
        else:
            should_compress = (start_pos + 1) % ratio == 0
            score = score + self.ape[start_pos % ratio]
            if overlap:
                self.kv_state[:bsz, ratio + start_pos % ratio] = kv.squeeze(1)
                self.score_state[:bsz, ratio + start_pos % ratio] = score.squeeze(1)
                if should_compress:
                    kv_state = torch.cat([self.kv_state[:bsz, :ratio, :d],
                                          self.kv_state[:bsz, ratio:, d:]], dim=1)
                    score_state = torch.cat([self.score_state[:bsz, :ratio, :d],
                                             self.score_state[:bsz, ratio:, d:]], dim=1)
                    kv = (kv_state * score_state.softmax(dim=1)).sum(dim=1, keepdim=True)
                    self.kv_state[:bsz, :ratio] = self.kv_state[:bsz, ratio:]
                    self.score_state[:bsz, :ratio] = self.score_state[:bsz, ratio:]
            else:
                self.kv_state[:bsz, start_pos % ratio] = kv.squeeze(1)
                self.score_state[:bsz, start_pos % ratio] = score.squeeze(1)
                if should_compress:
                    weights = self.score_state[:bsz].softmax(dim=1)
                    kv = (self.kv_state[:bsz] * weights).sum(dim=1, keepdim=True)
        if not should_compress:
            return None
        kv = kv * torch.rsqrt(kv.square().mean(-1, keepdim=True) + EPS) * self.norm_w
        if rd:
            freqs_cis = (self.freqs_cis[:cutoff:ratio] if start_pos == 0
                         else self.freqs_cis[start_pos + 1 - ratio].unsqueeze(0))
            kv = torch.cat([kv[..., :-rd], self.rope(kv[..., -rd:], freqs_cis)], dim=-1)
        if start_pos == 0:
            self.kv_cache[:bsz, :seqlen // ratio] = kv
        else:
            self.kv_cache[:bsz, start_pos // ratio] = kv.squeeze(1)
        return kv


@pytest.mark.parametrize("ratio,overlap,c,rope_dim", CASES)
def test_matches_official_prefill_then_decode(ratio, overlap, c, rope_dim):
    """Official prefill of P tokens + one-token decodes == the ops, entry for entry (fp32 <= 1e-5)."""
    prefill_len, bsz = ratio + 1, 2
    total = prefill_len + max(ratio + 3, 12)
    a, z, ape, nw, inv = _inputs(bsz, total, ratio, overlap, c, rope_dim, seed=ratio)
    ref = OfficialCompressor(bsz, ratio, overlap, c, rope_dim, ape, nw, inv, max_len=4 * ratio + 8)
    ref.forward(a[:, :prefill_len], z[:, :prefill_len], 0)
    entries, sa, sz = _prefill(a[:, :prefill_len], z[:, :prefill_len], ape, nw, inv, ratio, overlap, rope_dim)
    assert_close(entries, ref.kv_cache[:, :prefill_len // ratio], what="prefill entries")
    cache = torch.zeros_like(ref.kv_cache)
    cache[:, :entries.shape[1]] = entries
    for p in range(prefill_len, total):
        ref.forward(a[:, p:p + 1], z[:, p:p + 1], p)
        cache, sa, sz = _step(a[:, p:p + 1], z[:, p:p + 1], ape, nw, inv, cache, sa, sz, p,
                              ratio, overlap, rope_dim)
    assert_close(cache, ref.kv_cache, what="decode cache")
    assert total // ratio > prefill_len // ratio  # the decode completed blocks


# ------------------------------------------------------------------------- stepwise == prefill
@pytest.mark.parametrize("ratio,overlap", [pytest.param(4, True, id="csa-r4"),
                                           pytest.param(16, False, id="hca-r16"),
                                           pytest.param(128, False, id="hca-r128"),
                                           pytest.param(5, True, id="csa-r5")])
def test_random_chunked_steps_equal_prefill(ratio, overlap):
    """From the empty state, random chunkings (1..2r+3 tokens per call) reproduce the prefill entries
    and states exactly-ish, for lengths up to ~9 blocks that are not multiples of r."""
    rnd = random.Random(ratio)
    c, rope_dim = 8, 4
    for trial in range(6 if ratio < 128 else 2):
        total = rnd.randrange(1, 9 * ratio) if ratio < 128 else rnd.randrange(2 * ratio, 3 * ratio)
        bsz = rnd.choice([1, 2])
        a, z, ape, nw, inv = _inputs(bsz, total, ratio, overlap, c, rope_dim, seed=trial)
        entries, sa_ref, sz_ref = _prefill(a, z, ape, nw, inv, ratio, overlap, rope_dim)
        cache = torch.full((bsz, total // ratio + 2, c), 7.0)  # sentinel: never-completed slots
        sa, sz = kvc.empty_state(bsz, ratio, overlap, c)
        p = 0
        while p < total:
            n = min(rnd.randrange(1, 2 * ratio + 4), total - p)
            cache, sa, sz = _step(a[:, p:p + n], z[:, p:p + n], ape, nw, inv, cache, sa, sz, p,
                                  ratio, overlap, rope_dim)
            p += n
        what = f"total={total} trial={trial}"
        assert_close(cache[:, :total // ratio], entries, what=f"entries {what}")
        assert torch.equal(cache[:, total // ratio:], torch.full_like(cache[:, total // ratio:], 7.0))
        assert_close(sa, sa_ref, what=f"state_a {what}")
        assert torch.equal(sz.isinf(), sz_ref.isinf()), what
        assert_close(_finite(sz), _finite(sz_ref), what=f"state_z {what}")


def test_prefill_state_layout():
    """State rows: the incomplete block at row ``p mod r`` of the last r rows, the previous complete
    block (overlap) in the first r rows, unfilled rows (0, -inf)."""
    ratio, c, total = 4, 8, 10  # two complete blocks, 2 leftover tokens
    a, z, ape, nw, inv = _inputs(1, total, ratio, True, c, 4)
    _, sa, sz = _prefill(a, z, ape, nw, inv, ratio, True, 4)
    torch.testing.assert_close(sa[:, :4], a[:, 4:8])
    torch.testing.assert_close(sa[:, 4:6], a[:, 8:10])
    torch.testing.assert_close(sz[:, 4:6], z[:, 8:10] + ape[:2])
    assert (sa[:, 6:] == 0).all() and (sz[:, 6:] == float("-inf")).all()
    empty_a, empty_z = kvc.empty_state(1, ratio, True, c)
    _, sa0, sz0 = _prefill(a[:, :0], z[:, :0], ape, nw, inv, ratio, True, 4)
    assert torch.equal(sa0, empty_a) and torch.equal(sz0, empty_z)


def test_step_drops_slots_past_capacity():
    """A block whose index is >= N is not written anywhere; the earlier slots are exact."""
    ratio, c = 4, 8
    a, z, ape, nw, inv = _inputs(1, 13, ratio, True, c, 4)
    entries, _, _ = _prefill(a, z, ape, nw, inv, ratio, True, 4)  # 3 entries
    sa, sz = kvc.empty_state(1, ratio, True, c)
    cache, _, _ = _step(a, z, ape, nw, inv, torch.zeros(1, 2, c), sa, sz, 0, ratio, True, 4)
    assert_close(cache, entries[:, :2], what="capacity-2 cache")


def test_entries_pool_the_documented_tokens():
    """HCA entry i depends only on block i's tokens; CSA entry i on blocks i-1 and i (perturbation)."""
    for overlap in (False, True):
        a, z, ape, nw, inv = _inputs(1, 16, 4, overlap, 8, 4)
        base, _, _ = _prefill(a, z, ape, nw, inv, 4, overlap, 4)
        a2 = a.clone()
        a2[:, 9] += 1.0  # a token of block 2
        moved = (_prefill(a2, z, ape, nw, inv, 4, overlap, 4)[0] - base).abs().amax(-1)[0]
        assert (moved > 1e-4).tolist() == [False, False, True, overlap], (overlap, moved)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
def test_low_precision_close_to_fp32(dtype):
    """Reduced-precision projections give entries of that dtype within the dtype tolerance."""
    a, z, ape, nw, inv = _inputs(2, 19, 4, True, 16, 8)
    ref, _, _ = _prefill(a, z, ape, nw, inv, 4, True, 8)
    out, sa, _ = _prefill(a.to(dtype), z.to(dtype), ape, nw, inv, 4, True, 8)
    assert out.dtype == dtype and sa.dtype == torch.float32
    assert_close(out, ref, dtype=dtype)


# ------------------------------------------------------------------------ contract: opcheck etc.
def _opcheck_samples():
    for ratio, overlap, total, pos in [(4, True, 10, 0), (4, True, 3, 6), (8, False, 17, 13)]:
        c, rd = 8, 4
        a, z, ape, nw, inv = _inputs(2, total, ratio, overlap, c, rd, seed=total)
        sa, sz = kvc.empty_state(2, ratio, overlap, c)
        cache = torch.randn(2, 6, c)
        kw = dict(ratio=ratio, overlap=overlap, eps=EPS, rope_dim=rd)
        yield ((a, z, ape, nw, inv), kw), ((a, z, ape, nw, inv, cache, sa, sz, torch.tensor(pos)), kw)


@pytest.mark.parametrize("which", [pytest.param(0, id="kv_compress"), pytest.param(1, id="kv_compress_step")])
def test_opcheck(which):
    """``torch.library.opcheck`` (schema, fake tensor, aot dispatch dynamic) on several inputs."""
    for sample in _opcheck_samples():
        args, kwargs = sample[which]
        torch.library.opcheck(kvc.OPS[which], args, kwargs)


class _Prefill(torch.nn.Module):
    def forward(self, a, z, ape, nw, inv):
        return torch.ops.effexport.kv_compress(a, z, ape, nw, inv, ratio=4, overlap=True, eps=EPS, rope_dim=4)


class _Step(torch.nn.Module):
    def forward(self, a, z, ape, nw, inv, cache, sa, sz, pos):
        return torch.ops.effexport.kv_compress_step(a, z, ape, nw, inv, cache, sa, sz, pos, ratio=4,
                                                    overlap=True, eps=EPS, rope_dim=4)


def test_export_dynamic_batch_and_sequence():
    """Both forms export with dynamic B and T; the exported programs equal eager on new sizes."""
    auto = torch.export.Dim.AUTO
    a, z, ape, nw, inv = _inputs(2, 11, 4, True, 8, 4)
    ep = torch.export.export(_Prefill(), (a, z, ape, nw, inv),
                             dynamic_shapes=({0: auto, 1: auto}, {0: auto, 1: auto}, None, None, None))
    a3, z3, *_ = _inputs(3, 23, 4, True, 8, 4, seed=5)
    for got, want in zip(ep.module()(a3, z3, ape, nw, inv), _Prefill()(a3, z3, ape, nw, inv)):
        assert_close(_finite(got), _finite(want), what="exported prefill")
    assert ep.module()(a3, z3, ape, nw, inv)[0].shape == (3, 5, 8)

    sa, sz = kvc.empty_state(2, 4, True, 8)
    cache, pos = torch.zeros(2, 9, 8), torch.tensor(5)
    ep = torch.export.export(_Step(), (a, z, ape, nw, inv, cache, sa, sz, pos),
                             dynamic_shapes=({0: auto, 1: auto}, {0: auto, 1: auto}, None, None, None,
                                             {0: auto}, {0: auto}, {0: auto}, None))
    sa3, sz3 = _Prefill()(a3[:, :6], z3[:, :6], ape, nw, inv)[1:]
    args = (a3[:, 6:13], z3[:, 6:13], ape, nw, inv, torch.randn(3, 9, 8), sa3, sz3, torch.tensor(6))
    for got, want in zip(ep.module()(*args), _Step()(*args)):
        assert_close(_finite(got), _finite(want), what="exported step")


def test_real_size_shapes_on_meta():
    """V4 sizes (c 512, rope 64; CSA r 4 coff 2, HCA r 128) propagate through the fake kernels."""
    for ratio, overlap in [(4, True), (128, False)]:
        coff = 2 if overlap else 1
        with torch.device("meta"):
            a = torch.empty(1, 4096, coff * 512)
            out = torch.ops.effexport.kv_compress(a, a, torch.empty(ratio, coff * 512), torch.empty(512),
                                                  torch.empty(32), ratio=ratio, overlap=overlap, eps=EPS,
                                                  rope_dim=64)
        assert [tuple(t.shape) for t in out] == [(1, 4096 // ratio, 512), (1, coff * ratio, coff * 512),
                                                (1, coff * ratio, coff * 512)]


@pytest.mark.parametrize("bad", [pytest.param("ape", id="ape-shape"), pytest.param("width", id="odd-width"),
                                 pytest.param("rope", id="rope-dim"),
                                 pytest.param("state", id="state-shape")])
def test_rejects_bad_inputs(bad):
    a, z, ape, nw, inv = _inputs(1, 8, 4, True, 8, 4)
    sa, sz = kvc.empty_state(1, 4, True, 8)
    cache = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError):
        if bad == "ape":
            _prefill(a, z, ape[:3], nw, inv, 4, True, 4)
        elif bad == "width":
            _prefill(a[..., :15], z[..., :15], ape[:, :15], nw, inv, 4, True, 4)
        elif bad == "rope":
            _prefill(a, z, ape, nw, inv, 4, True, 6)
        else:
            _step(a, z, ape, nw, inv, cache, sa[:, :4], sz[:, :4], 8, 4, True, 4)


# --------------------------------------------------------------------- the eager sample's pieces
HAS_SAMPLE = importlib.util.find_spec("effexport.samples.deepseek_v4") is not None
sample_only = pytest.mark.skipif(not HAS_SAMPLE, reason="samples/deepseek_v4.py is not present")


def _sample_compressor(ratio, rotate, seed=0):
    """A sample ``Compressor`` (dim 24, head_dim 16, rope 8) with every parameter off its trivial
    init, and the YaRN table of the tiny preset's compressed layers."""
    from effexport.samples import deepseek_v4 as dsv4
    torch.manual_seed(seed)
    comp = dsv4.Compressor(24, 16, 8, ratio, rotate=rotate, eps=EPS)
    with torch.no_grad():
        comp.ape.normal_(0, 0.5)
        comp.norm.weight.copy_(1 + 0.1 * torch.randn(16))
    inv_freq = dsv4.layer_inv_freq(dsv4.PRESETS["deepseek-v4-flash:tiny"], 2)
    post = (lambda e: e @ dsv4.hadamard_matrix(16)) if rotate else (lambda e: e)
    return comp, inv_freq, post


def _projections(comp, x):
    """The matmuls that stay outside the op: ``a = x W^c_kv``, ``z = x W^c_gate`` (fp32, no ape)."""
    return (torch.nn.functional.linear(x.float(), comp.wkv.weight.float()),
            torch.nn.functional.linear(x.float(), comp.wgate.weight.float()))


SAMPLE_CASES = [pytest.param(4, False, id="csa-r4"), pytest.param(16, False, id="hca-r16"),
                pytest.param(4, True, id="indexer-r4-hadamard")]


@sample_only
@pytest.mark.parametrize("ratio,rotate", SAMPLE_CASES)
def test_matches_sample_compressor_forward(ratio, rotate):
    """``kv_compress`` (+ the Hadamard rotation outside the op for indexer keys) == the sample's
    ``Compressor.forward`` (fp32 <= 1e-5), for a length that is not a multiple of r."""
    comp, inv_freq, post = _sample_compressor(ratio, rotate)
    x = torch.randn(2, 5 * ratio + 3, 24)
    a, z = _projections(comp, x)
    entries, _, _ = torch.ops.effexport.kv_compress(a, z, comp.ape, comp.norm.weight, inv_freq, ratio=ratio,
                                                    overlap=comp.overlap, eps=EPS, rope_dim=8)
    with torch.no_grad():
        want = comp(x, inv_freq)
    assert_close(post(entries), want, what="entries")


@sample_only
@pytest.mark.parametrize("ratio,rotate", SAMPLE_CASES)
def test_matches_sample_compressor_step(ratio, rotate):
    """Random chunks through ``kv_compress_step`` == the sample's ``Compressor.step``: the entries it
    emits land at their slots, and the fp32 states are the same tensors."""
    comp, inv_freq, post = _sample_compressor(ratio, rotate, seed=1)
    rnd, total = random.Random(ratio), 6 * ratio + 1
    x = torch.randn(1, total, 24)
    a, z = _projections(comp, x)
    cache = torch.zeros(1, total // ratio, 16)
    sa, sz = kvc.empty_state(1, ratio, comp.overlap, 16)
    ref_state, emitted, p = None, [], 0
    while p < total:
        n = min(rnd.randrange(1, 2 * ratio + 2), total - p)
        with torch.no_grad():
            new, ref_state = comp.step(x[:, p:p + n], p, ref_state, inv_freq)
        emitted.append(new)
        cache, sa, sz = _step(a[:, p:p + n], z[:, p:p + n], comp.ape, comp.norm.weight, inv_freq, cache,
                              sa, sz, p, ratio, comp.overlap, 8)
        assert_close(sa, ref_state[0], what=f"state_a at {p + n}")
        assert torch.equal(sz.isinf(), ref_state[1].isinf())
        assert_close(_finite(sz), _finite(ref_state[1]), what=f"state_z at {p + n}")
        p += n
    assert_close(post(cache), torch.cat(emitted, dim=1), what="entries")
