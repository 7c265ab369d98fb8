"""Tests for ``effexport::indexer_topk`` (DeepSeek V4 lightning indexer + causal top-k).

Oracles: a brute-force Python loop (per query: score every visible entry, sort by (-score, index)),
and a port of the official ``Indexer.forward`` scoring/masking for the selected set. Properties:
never selects an invisible entry, k clipped to the visible count with a -1 tail, ties resolved to
the lowest indices, decode rows equal prefill rows. Plus opcheck and torch.export with dynamic
batch, sequence and entry count.
"""
import importlib.util
import random

import pytest
import torch

from effexport.custom_ops import indexer_topk as itk


def _inputs(bsz, seqlen, heads, dim, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, seqlen, heads, dim, generator=g).to(dtype)
    w = torch.randn(bsz, seqlen, heads, generator=g).to(dtype)
    k = torch.randn(bsz, n, dim, generator=g).to(dtype)
    return q, w, k


def _op(q, w, k, pos, ratio, topk):
    return torch.ops.effexport.indexer_topk(q, w, k, torch.tensor(pos), ratio=ratio, topk=topk)


def _brute_force(q, w, k, pos, ratio, topk):
    """Loop oracle: for each (b, t) score the visible entries in float64, sort by (-score, i)."""
    bsz, seqlen = q.shape[:2]
    out = torch.full((bsz, seqlen, topk), -1, dtype=torch.int64)
    for b in range(bsz):
        for t in range(seqlen):
            visible = [i for i in range(k.shape[1]) if ratio * (i + 1) <= pos + t + 1]
            scores = {i: sum(float(w[b, t, h]) * max(float(q[b, t, h].double() @ k[b, i].double()), 0.0)
                             for h in range(q.shape[2])) for i in visible}
            best = sorted(visible, key=lambda i: (-scores[i], i))[:topk]
            out[b, t, :len(best)] = torch.tensor(best, dtype=torch.int64)
    return out


@pytest.mark.parametrize("ratio,topk,pos,seqlen,n", [
    pytest.param(4, 3, 0, 23, 5, id="prefill-r4-k3"),
    pytest.param(4, 8, 0, 17, 4, id="prefill-k-gt-n"),
    pytest.param(4, 2, 37, 1, 12, id="decode-pos37"),
    pytest.param(2, 5, 6, 9, 9, id="chunk-r2"),
])
def test_equals_brute_force(ratio, topk, pos, seqlen, n):
    """Exactly the brute-force selection and order (random scores: no ties)."""
    q, w, k = _inputs(2, seqlen, 3, 8, n, seed=seqlen)
    got = _op(q, w, k, pos, ratio, topk)
    assert got.dtype == torch.int64 and got.shape == (2, seqlen, topk)
    assert torch.equal(got, _brute_force(q, w, k, pos, ratio, topk))


def test_random_shapes_property():
    """Seeded random shapes/positions/ratios: brute force equality, visibility, -1 tail, k clipping."""
    rnd = random.Random(0)
    for trial in range(12):
        ratio, topk = rnd.choice([1, 2, 4, 5]), rnd.randrange(1, 7)
        seqlen, pos, n = rnd.randrange(1, 12), rnd.randrange(0, 30), rnd.randrange(1, 12)
        q, w, k = _inputs(1, seqlen, 2, 4, n, seed=trial)
        got = _op(q, w, k, pos, ratio, topk)
        assert torch.equal(got, _brute_force(q, w, k, pos, ratio, topk)), trial
        for t in range(seqlen):
            n_visible = min(n, (pos + t + 1) // ratio)
            row = got[0, t]
            chosen = row[row >= 0]
            assert len(chosen) == min(topk, n_visible), (trial, t)
            assert (row[len(chosen):] == -1).all()  # the -1 tail is contiguous
            assert (ratio * (chosen + 1) <= pos + t + 1).all()  # never an invisible entry
            assert len(set(chosen.tolist())) == len(chosen)  # no repeats


def test_ties_resolve_to_lowest_indices():
    """All-zero queries (every score 0) select 0, 1, ..., k-1; partial ties keep index order too."""
    q, w, k = _inputs(1, 9, 2, 4, 6)
    got = _op(torch.zeros_like(q), w, k, 12, 2, 4)
    assert torch.equal(got[0], torch.arange(4).expand(9, 4))
    # entries 1, 3, 4 share the best score, 0 and 2 the next: order 1, 3, 4, 0, 2
    keys = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    qq, ww = torch.tensor([[[[1.0, 0.0]]]]), torch.ones(1, 1, 1)
    assert _op(qq, ww, keys[None], 40, 4, 5)[0, 0].tolist() == [1, 3, 4, 0, 2]


def test_relu_and_head_weights():
    """Negative dot products contribute nothing; negative head weights can flip the ranking."""
    keys = torch.tensor([[[1.0], [-3.0], [2.0]]])  # [1, 3, 1]
    q = torch.tensor([[[[1.0], [-1.0]]]])  # heads see +k and -k
    assert _op(q, torch.tensor([[[1.0, 0.0]]]), keys, 20, 1, 3)[0, 0].tolist() == [2, 0, 1]
    assert _op(q, torch.tensor([[[0.0, 1.0]]]), keys, 20, 1, 3)[0, 0].tolist() == [1, 0, 2]
    assert _op(q, torch.tensor([[[-1.0, 0.0]]]), keys, 20, 1, 3)[0, 0].tolist() == [1, 0, 2]


def test_decode_rows_equal_prefill_rows():
    """One query at a time (pos = t, T = 1) reproduces each prefill row."""
    q, w, k = _inputs(2, 21, 2, 8, 5, seed=3)
    full = _op(q, w, k, 0, 4, 3)
    for t in range(21):
        assert torch.equal(_op(q[:, t:t + 1], w[:, t:t + 1], k, t, 4, 3), full[:, t:t + 1]), t


def test_matches_official_masking():
    """The official prefill path (score + -inf mask, topk(min(k, T//r)), -1 for invisible picks)
    selects the same set per query (order-free comparison: torch.topk's tie order is unspecified)."""
    ratio, topk, seqlen = 4, 3, 18
    q, w, k = _inputs(1, seqlen, 2, 8, seqlen // ratio, seed=9)
    score = torch.einsum("bshd,btd->bsht", q, k).relu()
    score = (score * w.unsqueeze(-1)).sum(dim=2)
    n_done = torch.arange(1, seqlen + 1).unsqueeze(1) // ratio  # completed blocks per query
    mask = torch.arange(seqlen // ratio).repeat(seqlen, 1) >= n_done
    score = score + torch.where(mask, float("-inf"), 0)
    ref = score.topk(min(topk, seqlen // ratio), dim=-1)[1]
    ref = torch.where(ref >= n_done, -1, ref)
    got = _op(q, w, k, 0, ratio, topk)
    for t in range(seqlen):
        assert sorted(got[0, t].tolist()) == sorted(ref[0, t].tolist()), t


def test_low_precision_inputs():
    """bf16 inputs are scored in fp32: same selection as the fp32 scores of the rounded inputs."""
    q, w, k = _inputs(1, 11, 2, 8, 6, seed=4, dtype=torch.bfloat16)
    assert torch.equal(_op(q, w, k, 0, 2, 4), _op(q.float(), w.float(), k.float(), 0, 2, 4))


def test_opcheck():
    """``torch.library.opcheck`` on prefill, decode and k > N inputs."""
    for seqlen, n, pos, topk in [(9, 3, 0, 2), (1, 7, 30, 4), (5, 2, 3, 6)]:
        q, w, k = _inputs(2, seqlen, 2, 4, n, seed=n)
        torch.library.opcheck(itk.OPS[0], (q, w, k, torch.tensor(pos)), {"ratio": 4, "topk": topk})


class _Indexer(torch.nn.Module):
    def forward(self, q, w, k, pos):
        return torch.ops.effexport.indexer_topk(q, w, k, pos, ratio=4, topk=3)


def test_export_dynamic_batch_sequence_and_entries():
    """Exports with dynamic B, T and N; the exported program equals eager on new sizes."""
    auto = torch.export.Dim.AUTO
    q, w, k = _inputs(2, 13, 2, 4, 5)
    ep = torch.export.export(_Indexer(), (q, w, k, torch.tensor(0)),
                             dynamic_shapes=({0: auto, 1: auto},) * 3 + (None,))
    for bsz, seqlen, n, pos in [(3, 22, 7, 0), (1, 1, 9, 35)]:
        q, w, k = _inputs(bsz, seqlen, 2, 4, n, seed=seqlen)
        got = ep.module()(q, w, k, torch.tensor(pos))
        assert torch.equal(got, _Indexer()(q, w, k, torch.tensor(pos)))


def test_real_size_shapes_on_meta():
    """V4-Flash sizes (64 heads x 128, top-512, 1M/4 entries) propagate through the fake kernel."""
    with torch.device("meta"):
        out = torch.ops.effexport.indexer_topk(torch.empty(1, 1, 64, 128), torch.empty(1, 1, 64),
                                               torch.empty(1, 262144, 128), torch.tensor(5),
                                               ratio=4, topk=512)
    assert out.shape == (1, 1, 512) and out.dtype == torch.int64


@pytest.mark.parametrize("bad", [pytest.param("w", id="w-shape"), pytest.param("dim", id="key-dim"),
                                 pytest.param("pos", id="pos-dtype"), pytest.param("topk", id="topk-0")])
def test_rejects_bad_inputs(bad):
    q, w, k = _inputs(1, 3, 2, 4, 2)
    pos, topk = torch.tensor(0), 2
    if bad == "w":
        w = w[..., :1]
    elif bad == "dim":
        k = k[..., :3]
    elif bad == "pos":
        pos = torch.tensor(0.0)
    else:
        topk = 0
    with pytest.raises(ValueError):
        torch.ops.effexport.indexer_topk(q, w, k, pos, ratio=4, topk=topk)


# --------------------------------------------------------------------- the eager sample's pieces
HAS_SAMPLE = importlib.util.find_spec("effexport.samples.deepseek_v4") is not None
sample_only = pytest.mark.skipif(not HAS_SAMPLE, reason="samples/deepseek_v4.py is not present")


@sample_only
@pytest.mark.parametrize("pos,seqlen", [pytest.param(0, 23, id="prefill"), pytest.param(40, 1, id="decode"),
                                        pytest.param(13, 6, id="chunk")])
def test_matches_sample_indexer(pos, seqlen):
    """``indexer_topk`` fed with the query prep that stays outside the op (RoPE + Hadamard of
    ``qr W_qb``, scaled ``x W_w``) == the sample's ``Indexer.forward`` selection; the extra slots of
    the op's static width are -1."""
    from effexport.samples import deepseek_v4 as dsv4
    torch.manual_seed(pos)
    topk, heads, dim = 5, 4, 16
    indexer = dsv4.Indexer(dim=24, q_lora_rank=12, n_heads=heads, head_dim=dim, rope_head_dim=8, topk=topk)
    inv_freq = dsv4.layer_inv_freq(dsv4.PRESETS["deepseek-v4-flash:tiny"], 2)
    x, qr = torch.randn(2, seqlen, 24), torch.randn(2, seqlen, 12)
    keys = torch.randn(2, (pos + seqlen) // 4 + 1, dim)  # one never-visible slot past the end
    positions = torch.arange(pos, pos + seqlen)
    with torch.no_grad():
        _, want = indexer(x, qr, positions, keys, inv_freq)
        q = indexer.wq_b(qr).unflatten(-1, (heads, dim))
        q = dsv4.rope_interleaved(q, positions, inv_freq) @ dsv4.hadamard_matrix(dim)
        w = indexer.weights_proj(x).float() * (dim ** -0.5 * heads ** -0.5)
    got = torch.ops.effexport.indexer_topk(q, w, keys, torch.tensor(pos), ratio=4, topk=topk)
    k = want.shape[-1]
    assert torch.equal(got[..., :k], want)
    assert (got[..., k:] == -1).all()
