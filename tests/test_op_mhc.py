"""Tests for ``effexport::{sinkhorn, mhc_pre, mhc_post, mhc_head}`` (custom_ops/mhc.py).

Covered: ``torch.library.opcheck`` on every op; parity with a line-by-line, one-token-at-a-time
transcription of spec 4.4 (official V4 ``hc_pre`` / ``hc_post`` / ``hc_head`` / ``hc_split_sinkhorn``) at
fp32 <= 1e-5; Sinkhorn doubly-stochastic properties; decode (T = 1 steps) == prefill over seeded random
shapes; ``torch.export`` with dynamic batch and sequence for every op, run at other sizes; the exported
mHC graph is one node per op (no unrolled Sinkhorn); bf16 inputs within 2e-2 of the fp32 spec; input
validation. mHC has no window or compression ratio: every token is independent, so the decode property
is checked over long and odd lengths only.
"""
from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from _helpers import assert_close

from effexport.custom_ops import mhc  # noqa: F401  (registers the ops)

OPS = torch.ops.effexport
EPS, NORM_EPS, ITERS = 1e-6, 1e-6, 20


# ------------------------------------------------------------------------------------- inputs
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_pre_params(n: int, d: int, seed: int = 0, rows: int | None = None, n_scale: int = 3):
    """mHC parameters like a trained checkpoint's scale: ``fn [rows, n*d]``, ``base [rows]``, ``scale``
    (fp32). ``rows`` defaults to ``2n + n*n`` (``mhc_pre``); pass ``n`` for ``mhc_head``."""
    g = _gen(seed)
    rows = 2 * n + n * n if rows is None else rows
    fn = torch.randn(rows, n * d, generator=g) * 0.2
    base = torch.randn(rows, generator=g) * 0.5
    scale = torch.rand(n_scale, generator=g) + 0.5
    return fn, base, scale


def make_x(b: int, t: int, n: int, d: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(b, t, n, d, generator=_gen(seed)).to(dtype)


# ------------------------------------------------------------ spec 4.4, transcribed line by line
def spec_sinkhorn(logits: torch.Tensor, iters: int = ITERS, eps: float = EPS) -> torch.Tensor:
    """One ``[n, n]`` matrix: ``M = rowsoftmax(M) + eps; M = M / (colsum + eps); (iters-1) x (row, col)``."""
    m = torch.softmax(logits, dim=1) + eps
    m = m / (m.sum(dim=0, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=1, keepdim=True) + eps)
        m = m / (m.sum(dim=0, keepdim=True) + eps)
    return m


def spec_hc_pre(x, fn, base, scale, iters=ITERS, eps=EPS, norm_eps=NORM_EPS):
    """Spec 4.4 ``hc_pre`` one token at a time, fp32."""
    b_, t_, n, d = x.shape
    u, post, comb = torch.empty(b_, t_, d), torch.empty(b_, t_, n), torch.empty(b_, t_, n, n)
    for b in range(b_):
        for t in range(t_):
            X = x[b, t].float()                                      # X in R^{n x d}
            xbar = X.reshape(n * d)                                  # vec(X)
            rho = (xbar.square().mean() + norm_eps) ** -0.5
            mu = (xbar @ fn.T) * rho                                 # R^{2n + n*n}
            pre = torch.sigmoid(mu[0:n] * scale[0] + base[0:n]) + eps
            post[b, t] = 2 * torch.sigmoid(mu[n:2 * n] * scale[1] + base[n:2 * n])
            comb[b, t] = spec_sinkhorn((mu[2 * n:] * scale[2] + base[2 * n:]).view(n, n), iters, eps)
            u[b, t] = sum(pre[i] * X[i] for i in range(n))
    return u, post, comb


def spec_hc_post(x, f, post, comb):
    """Spec 4.4 ``X'_j = post_j F + sum_i M[i, j] X_i`` one token and one stream at a time, fp32."""
    b_, t_, n, d = x.shape
    out = torch.empty(b_, t_, n, d)
    for b in range(b_):
        for t in range(t_):
            for j in range(n):
                out[b, t, j] = post[b, t, j] * f[b, t].float() + sum(
                    comb[b, t, i, j] * x[b, t, i].float() for i in range(n))
    return out


def spec_hc_head(x, fn, base, scale, eps=EPS, norm_eps=NORM_EPS):
    """Spec 4.4 collapse: ``pre = sigmoid(mu * scale + base) + eps; u = sum_i pre_i X_i``, fp32."""
    b_, t_, n, d = x.shape
    u = torch.empty(b_, t_, d)
    for b in range(b_):
        for t in range(t_):
            X = x[b, t].float()
            xbar = X.reshape(n * d)
            mu = (xbar @ fn.T) * (xbar.square().mean() + norm_eps) ** -0.5
            pre = torch.sigmoid(mu * scale + base) + eps
            u[b, t] = sum(pre[i] * X[i] for i in range(n))
    return u


def sublayer(u: torch.Tensor) -> torch.Tensor:
    """A stand-in for attention/FFN: any per-token map of ``u [B, T, d]``."""
    return torch.tanh(u) * 0.5 + u.roll(1, dims=-1)


# --------------------------------------------------------------------------------- opcheck
def _opcheck_cases():
    n, d = 4, 8
    fn, base, scale = make_pre_params(n, d)
    hfn, hbase, hscale = make_pre_params(n, d, rows=n, n_scale=1)
    x = make_x(2, 3, n, d)
    u, post, comb = OPS.mhc_pre(x, fn, base, scale)
    x1 = make_x(1, 1, 2, 4)
    p2 = make_pre_params(2, 4)
    return [
        pytest.param(OPS.sinkhorn.default, (torch.randn(3, 4, 4),), {"iters": 20, "eps": 1e-6},
                     id="sinkhorn-fp32"),
        pytest.param(OPS.sinkhorn.default, (torch.randn(2, 5, 2, 2).bfloat16(),), {"iters": 1, "eps": 1e-3},
                     id="sinkhorn-bf16-iters1"),
        pytest.param(OPS.mhc_pre.default, (x, fn, base, scale), {}, id="pre-fp32"),
        pytest.param(OPS.mhc_pre.default, (x.bfloat16(), fn, base, scale), {"iters": 3}, id="pre-bf16"),
        pytest.param(OPS.mhc_pre.default, (x1, *p2), {"iters": 5, "eps": 1e-4, "norm_eps": 1e-5},
                     id="pre-n2-decode"),
        pytest.param(OPS.mhc_post.default, (x, u, post, comb), {}, id="post-fp32"),
        pytest.param(OPS.mhc_post.default, (x.bfloat16(), u.bfloat16(), post, comb), {}, id="post-bf16"),
        pytest.param(OPS.mhc_post.default, (x, u.bfloat16(), post, comb), {}, id="post-fp32-x-bf16-f"),
        pytest.param(OPS.mhc_head.default, (x, hfn, hbase, hscale), {}, id="head-fp32"),
        pytest.param(OPS.mhc_head.default, (x.bfloat16(), hfn, hbase, hscale), {"eps": 1e-3}, id="head-bf16"),
    ]


@pytest.mark.parametrize("op, args, kwargs", _opcheck_cases())
def test_opcheck(op, args, kwargs):
    torch.library.opcheck(op, args, kwargs)


def test_ops_tuple_lists_every_op():
    assert set(mhc.OPS) == {OPS.sinkhorn.default, OPS.mhc_pre.default, OPS.mhc_post.default,
                            OPS.mhc_head.default}


# --------------------------------------------------------------------- parity with spec 4.4
@pytest.mark.parametrize("b, t, n, d, iters", [
    pytest.param(2, 5, 4, 16, 20, id="v4-n4"),
    pytest.param(1, 3, 2, 8, 20, id="n2"),
    pytest.param(1, 2, 4, 8, 1, id="iters1"),
])
def test_mhc_pre_matches_spec(b, t, n, d, iters):
    fn, base, scale = make_pre_params(n, d)
    x = make_x(b, t, n, d)
    u, post, comb = OPS.mhc_pre(x, fn, base, scale, iters=iters)
    ru, rpost, rcomb = spec_hc_pre(x, fn, base, scale, iters=iters)
    assert_close(u, ru, what="u")
    assert_close(post, rpost, what="post")
    assert_close(comb, rcomb, what="comb")


def test_mhc_pre_default_eps_and_iters_are_v4():
    """The defaults are V4's ``hc_sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6``."""
    fn, base, scale = make_pre_params(4, 8)
    x = make_x(1, 2, 4, 8)
    got = OPS.mhc_pre(x, fn, base, scale)
    want = OPS.mhc_pre(x, fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert not torch.equal(OPS.mhc_pre(x, fn, base, scale, iters=2)[2], got[2])


@pytest.mark.parametrize("n", [pytest.param(4, id="n4"), pytest.param(3, id="n3")])
def test_mhc_post_matches_spec(n):
    fn, base, scale = make_pre_params(n, 8)
    x = make_x(2, 4, n, 8)
    _, post, comb = OPS.mhc_pre(x, fn, base, scale)
    f = torch.randn(2, 4, 8, generator=_gen(7))
    assert_close(OPS.mhc_post(x, f, post, comb), spec_hc_post(x, f, post, comb), what="X'")


def test_mhc_post_output_follows_f_dtype():
    """Official ``hc_post`` returns ``y.type_as(f)``: fp32 streams + bf16 sub-layer output -> bf16."""
    fn, base, scale = make_pre_params(4, 8)
    x = make_x(1, 3, 4, 8)
    u, post, comb = OPS.mhc_pre(x, fn, base, scale)
    out = OPS.mhc_post(x, u.bfloat16(), post, comb)
    assert out.dtype == torch.bfloat16
    assert_close(out, spec_hc_post(x, u.bfloat16(), post, comb), torch.bfloat16)


def test_mhc_post_uses_comb_transposed():
    """With a non-symmetric comb, ``X'_j`` reads column j (H^res = comb^T), not row j."""
    x = make_x(1, 1, 2, 4)
    comb = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])              # every stream i feeds j = 0
    out = OPS.mhc_post(x, torch.zeros(1, 1, 4), torch.zeros(1, 1, 2), comb)
    assert_close(out[0, 0, 0], x[0, 0, 0] + x[0, 0, 1])
    assert torch.count_nonzero(out[0, 0, 1]) == 0


@pytest.mark.parametrize("n, d", [pytest.param(4, 16, id="n4"), pytest.param(2, 8, id="n2")])
def test_mhc_head_matches_spec(n, d):
    fn, base, scale = make_pre_params(n, d, rows=n, n_scale=1)
    x = make_x(2, 3, n, d)
    assert_close(OPS.mhc_head(x, fn, base, scale), spec_hc_head(x, fn, base, scale), what="u")


def test_sinkhorn_matches_spec():
    logits = torch.randn(6, 4, 4, generator=_gen(3))
    got = OPS.sinkhorn(logits, iters=ITERS, eps=EPS)
    assert_close(got, torch.stack([spec_sinkhorn(m) for m in logits]))


# ------------------------------------------------------------------ Sinkhorn properties
@pytest.mark.parametrize("n", [pytest.param(n, id=f"n{n}") for n in (2, 4, 8)])
def test_sinkhorn_doubly_stochastic(n):
    """Logits of std 0.5 (V4-like): rows and columns sum to 1 within 1e-5 after 20 iterations."""
    m = OPS.sinkhorn(torch.randn(256, n, n, generator=_gen(n)) * 0.5, iters=20, eps=EPS)
    assert (m > 0).all()
    assert_close(m.sum(-1), torch.ones(256, n), rtol=1e-5, what="row sums")
    assert_close(m.sum(-2), torch.ones(256, n), rtol=1e-5, what="col sums")


def test_sinkhorn_peaked_logits_columns_exact_rows_converge():
    """Columns are normalised last, so they sum to 1 for any logits; rows of peaked logits (std 2)
    converge slowly: > 1e-3 off after 20 iterations, within 1e-5 after 500 (float32)."""
    logits = torch.randn(256, 4, 4, generator=_gen(11)) * 2
    row_err = {}
    for iters in (20, 500):
        m = OPS.sinkhorn(logits, iters=iters, eps=EPS)
        assert_close(m.sum(-2), torch.ones(256, 4), rtol=1e-5, what=f"col sums @ {iters}")
        row_err[iters] = (m.sum(-1) - 1).abs().max().item()
    assert row_err[20] > 1e-3 and row_err[500] < 1e-5, row_err


# ---------------------------------------------------------------- decode == prefill
def _mhc_layers(x, params, head, per_token: bool):
    """mHC-wrapped sub-layers and the head, on the whole sequence or one token at a time (decode)."""
    steps = [slice(t, t + 1) for t in range(x.shape[1])] if per_token else [slice(None)]
    outs = []
    for s in steps:
        h = x[:, s]
        for fn, base, scale in params:
            u, post, comb = OPS.mhc_pre(h, fn, base, scale)
            h = OPS.mhc_post(h, sublayer(u), post, comb)
        outs.append(OPS.mhc_head(h, *head))
    return torch.cat(outs, dim=1)


def test_decode_steps_equal_prefill():
    """Seeded random shapes (long and odd T): T single-token calls equal one call on all T tokens."""
    rng = random.Random(0)
    for case in range(4):
        b, t, n, d = rng.randint(1, 3), rng.choice([1, 9, 37, 65]), rng.choice([2, 4]), rng.choice([8, 12])
        params = [make_pre_params(n, d, seed=10 * case)]
        head = make_pre_params(n, d, seed=10 * case + 9, rows=n, n_scale=1)
        x = make_x(b, t, n, d, seed=case)
        prefill = _mhc_layers(x, params, head, per_token=False)
        decode = _mhc_layers(x, params, head, per_token=True)
        assert_close(decode, prefill, what=f"case {case} (b={b} t={t} n={n} d={d})")


# ----------------------------------------------------------------------------- export
class _Sinkhorn(torch.nn.Module):
    def forward(self, logits):
        return OPS.sinkhorn(logits, iters=20, eps=1e-6)


class _Pre(torch.nn.Module):
    def __init__(self, n, d):
        super().__init__()
        for name, p in zip(("fn", "base", "scale"), make_pre_params(n, d)):
            self.register_buffer(name, p)

    def forward(self, x):
        return OPS.mhc_pre(x, self.fn, self.base, self.scale)


class _Post(torch.nn.Module):
    def forward(self, x, f, post, comb):
        return OPS.mhc_post(x, f, post, comb)


class _Head(torch.nn.Module):
    def __init__(self, n, d):
        super().__init__()
        for name, p in zip(("fn", "base", "scale"), make_pre_params(n, d, rows=n, n_scale=1)):
            self.register_buffer(name, p)

    def forward(self, x):
        return OPS.mhc_head(x, self.fn, self.base, self.scale)


class _Block(torch.nn.Module):
    """One mHC-wrapped sub-layer: what the rewrite produces for a V4 block half."""

    def __init__(self, n, d):
        super().__init__()
        self.pre = _Pre(n, d)

    def forward(self, x):
        u, post, comb = self.pre(x)
        return OPS.mhc_post(x, sublayer(u), post, comb)


def _inputs(kind: str, b: int, t: int, n: int = 4, d: int = 8):
    x = make_x(b, t, n, d, seed=b * 100 + t)
    if kind == "sinkhorn":
        return (torch.randn(b, t, n, n, generator=_gen(t)),)
    if kind == "post":
        fn, base, scale = make_pre_params(n, d)
        u, post, comb = OPS.mhc_pre(x, fn, base, scale)
        return x, u, post, comb
    return (x,)


_EXPORT_CASES = [
    pytest.param("sinkhorn", _Sinkhorn, id="sinkhorn"),
    pytest.param("pre", lambda: _Pre(4, 8), id="mhc_pre"),
    pytest.param("post", _Post, id="mhc_post"),
    pytest.param("head", lambda: _Head(4, 8), id="mhc_head"),
    pytest.param("block", lambda: _Block(4, 8), id="pre-sublayer-post"),
]


def _export(module, args):
    auto = torch.export.Dim.AUTO
    dyn = tuple({0: auto, 1: auto} for _ in args)
    return torch.export.export(module, args, dynamic_shapes=dyn)


@pytest.mark.parametrize("kind, make", _EXPORT_CASES)
def test_export_dynamic_batch_and_sequence(kind, make):
    module = make()
    ep = _export(module, _inputs(kind, 2, 5))
    x_val = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.users and
                 n.name in ep.graph_signature.user_inputs).meta["val"]
    assert all(isinstance(s, torch.SymInt) for s in x_val.shape[:2]), x_val.shape
    for b, t in ((1, 1), (3, 17), (2, 64)):
        args = _inputs(kind, b, t)
        got, want = ep.module()(*args), module(*args)
        got, want = (got, want) if isinstance(got, (tuple, list)) else ((got,), (want,))
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, what=f"{kind} output {i} at b={b} t={t}")


def _call_functions(ep) -> list:
    return [n for n in ep.graph.nodes if n.op == "call_function"]


def test_exported_mhc_pre_is_one_node():
    ep = _export(_Pre(4, 8), _inputs("pre", 2, 5))
    calls = _call_functions(ep)
    assert sum(n.target is OPS.mhc_pre.default for n in calls) == 1
    assert len(calls) < 20, [str(n.target) for n in calls]
    assert not any(isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten"
                   for n in calls), "Sinkhorn or the mixes leaked into aten ops"


def test_unrolled_spec_would_fail_the_node_count():
    """Negative control: the same math in plain torch exports to hundreds of nodes (20 unrolled
    Sinkhorn iterations), so the node-count check above can fail."""

    class Unrolled(_Pre):
        def forward(self, x):
            n = x.shape[2]
            xf = x.flatten(2)
            mu = (xf @ self.fn.T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + NORM_EPS)
            m = (mu[..., 2 * n:] * self.scale[2] + self.base[2 * n:]).unflatten(-1, (n, n))
            return mhc._sinkhorn_fp32(m, ITERS, EPS)

    assert len(_call_functions(_export(Unrolled(4, 8), _inputs("pre", 2, 5)))) > 80


# ----------------------------------------------------------------------------- bf16 / dtypes
def test_bf16_inputs_within_tolerance_of_fp32_spec():
    n, d = 4, 16
    fn, base, scale = make_pre_params(n, d)
    x32 = make_x(2, 6, n, d)
    x16 = x32.bfloat16()
    u, post, comb = OPS.mhc_pre(x16, fn, base, scale)
    assert (u.dtype, post.dtype, comb.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    ru, rpost, rcomb = spec_hc_pre(x32, fn, base, scale)
    bf = torch.bfloat16
    assert_close(u, ru, bf, what="u")
    assert_close(post, rpost, bf, what="post")
    assert_close(comb, rcomb, bf, what="comb")

    f32 = sublayer(ru)
    out = OPS.mhc_post(x16, f32.bfloat16(), post, comb)
    assert out.dtype == bf
    assert_close(out, spec_hc_post(x32, f32, rpost, rcomb), bf, what="X'")

    hfn, hbase, hscale = make_pre_params(n, d, rows=n, n_scale=1)
    head = OPS.mhc_head(x16, hfn, hbase, hscale)
    assert head.dtype == bf
    assert_close(head, spec_hc_head(x32, hfn, hbase, hscale), bf, what="head u")

    sk = OPS.sinkhorn(rcomb.log().bfloat16(), iters=ITERS, eps=EPS)
    assert sk.dtype == bf
    assert_close(sk, OPS.sinkhorn(rcomb.log(), iters=ITERS, eps=EPS), bf, what="sinkhorn")


# --------------------------------------------------------------------------- validation
def _bad_calls():
    x = make_x(1, 2, 4, 8)
    fn, base, scale = make_pre_params(4, 8)
    _, post, comb = OPS.mhc_pre(x, fn, base, scale)
    f = torch.zeros(1, 2, 8)
    return [
        pytest.param(lambda: OPS.mhc_pre(x, fn[:-1], base, scale), "fn must be", id="pre-fn-rows"),
        pytest.param(lambda: OPS.mhc_pre(x, fn, base, scale[:1]), "scale must be", id="pre-scale"),
        pytest.param(lambda: OPS.mhc_pre(x, fn, base, scale, iters=0), "iters >= 1", id="pre-iters0"),
        pytest.param(lambda: OPS.mhc_pre(x[0], fn, base, scale), r"\[B, T, n, d\]", id="pre-3d"),
        pytest.param(lambda: OPS.sinkhorn(torch.zeros(2, 3, 4), iters=20, eps=EPS), "n, n", id="sk-nonsquare"),
        pytest.param(lambda: OPS.mhc_post(x, f, post, comb[..., :2]), "comb must be", id="post-comb"),
        pytest.param(lambda: OPS.mhc_post(x, f[:, :1], post, comb), "f must be", id="post-f"),
        pytest.param(lambda: OPS.mhc_head(x, fn, base, scale), "fn must be", id="head-fn"),
    ]


@pytest.mark.parametrize("call, message", _bad_calls())
def test_invalid_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_cuda_matches_cpu(dtype):
    n, d = 4, 64
    fn, base, scale = make_pre_params(n, d)
    x = make_x(2, 9, n, d, dtype=dtype)
    cpu = OPS.mhc_pre(x, fn, base, scale)
    gpu = OPS.mhc_pre(*(a.cuda() for a in (x, fn, base, scale)))
    for c, g in zip(cpu, gpu):
        assert g.device.type == "cuda" and g.dtype == c.dtype
        assert_close(g.cpu(), c, dtype, what="mhc_pre on cuda")
    post = OPS.mhc_post(x, cpu[0], cpu[1], cpu[2])
    assert_close(OPS.mhc_post(*(a.cuda() for a in (x, cpu[0], cpu[1], cpu[2]))).cpu(), post, dtype)


# ------------------------------------------------------------- samples.deepseek_v4 parity
@pytest.fixture(scope="module")
def v4():
    """The DeepSeek V4 sample module (its ``sinkhorn``/``hc_pre``/``hc_post``/``hc_head`` are the
    model's own mHC math); skipped visibly if the sample is missing."""
    if importlib.util.find_spec("effexport.samples.deepseek_v4") is None:
        pytest.skip("samples/deepseek_v4.py is not in this tree")
    return importlib.import_module("effexport.samples.deepseek_v4")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_ops_match_deepseek_v4_sample(v4, dtype):
    n, d = 4, 16
    fn, base, scale = make_pre_params(n, d)
    x = make_x(2, 5, n, d, dtype=dtype)
    got, want = OPS.mhc_pre(x, fn, base, scale), v4.hc_pre(x, fn, base, scale, 20, 1e-6, 1e-6)
    for name, g, w in zip(("u", "post", "comb"), got, want):
        assert g.dtype == w.dtype, name
        assert_close(g, w, dtype, what=name)
    f = sublayer(got[0].float()).to(dtype)
    post_out = OPS.mhc_post(x, f, got[1], got[2])
    assert post_out.dtype == v4.hc_post(x, f, got[1], got[2]).dtype
    assert_close(post_out, v4.hc_post(x, f, got[1], got[2]), dtype, what="X'")
    hfn, hbase, hscale = make_pre_params(n, d, rows=n, n_scale=1)
    assert_close(OPS.mhc_head(x, hfn, hbase, hscale), v4.hc_head(x, hfn, hbase, hscale), dtype, what="head")
    logits = torch.randn(7, n, n, generator=_gen(5))
    assert_close(OPS.sinkhorn(logits, iters=20, eps=1e-6), v4.sinkhorn(logits, 20, 1e-6), what="sinkhorn")


def test_tiny_v4_model_with_mhc_ops_matches_sample(v4, monkeypatch):
    """The tiny V4 preset with its mHC functions swapped for the ops: identical logits (fp32 <= 1e-5)."""
    from effexport.samples import get_sample

    model = get_sample("deepseek-v4-flash:tiny").build(seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=_gen(0))
    calls = {"pre": 0, "post": 0, "head": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    with torch.no_grad():
        want, _ = model(ids)
        monkeypatch.setattr(v4, "hc_pre", counted("pre", lambda X, fn, base, scale, iters, eps, norm_eps:
                            OPS.mhc_pre(X, fn, base, scale, iters=iters, eps=eps, norm_eps=norm_eps)))
        monkeypatch.setattr(v4, "hc_post", counted("post", OPS.mhc_post))
        monkeypatch.setattr(v4, "hc_head", counted("head", lambda X, fn, base, scale, eps, norm_eps:
                            OPS.mhc_head(X, fn, base, scale, eps=eps, norm_eps=norm_eps)))
        got, _ = model(ids)
    layers = model.config.n_layers
    assert calls == {"pre": 2 * layers, "post": 2 * layers, "head": 1}, calls
    assert_close(got, want, what="logits")
