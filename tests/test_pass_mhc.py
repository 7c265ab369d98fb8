"""Tests for the mHC rewrite pass (passes/mhc.py): pre / post / head mixing -> ``effexport::mhc_*``.

Covered, on graphs captured with ``exporter.capture.capture_step``:

* a 2-block mHC residual stack (the DeepSeek V4 sample's own ``hc_pre`` / ``hc_post`` / ``hc_head``
  around RMSNorm + gated MLP) in fp32 and bf16: exact rewrite counts, every Sinkhorn node gone (> 10x
  fewer nodes), ``fn`` / ``base`` / ``scale`` bound to the right parameters, parity with eager at other
  batch / length (fp32 rel <= 1e-5, bf16 <= 2e-2);
* a mixed stack: Sinkhorn with 7 and 20 iterations (``iters`` is read from the graph), a softmax-only
  residual mix and a row-first normalisation schedule (both left alone, with reasons), parity;
  the numerical check rejects a chain when told a different iteration count;
* the full ``deepseek-v4-flash:tiny`` decode-step graph (slow: its capture takes minutes on this
  machine): every pre / post / head rewritten, parity of logits and caches with eager.

Not covered: the HF ``modular_deepseek_v4`` mHC variant, and mixing whose parameters are graph inputs.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close
from torch import fx, nn

from effexport.exporter.capture import capture_step
from effexport.passes.program import StepProgram
from effexport.passes.mhc import ASSERT_META, SOFTMAX, prune, rewrite_mhc, sinkhorn_chain, verify_sinkhorn
from effexport.passes.pipeline import Analysis, Context
from effexport.samples._blocks import GatedMLP, RMSNorm
from effexport.samples.deepseek_v4 import hc_head, hc_post, hc_pre

OPS = torch.ops.effexport
N, D, VOCAB = 4, 16, 64
SINKHORN_OPS = (torch.ops.aten.div.Tensor, torch.ops.aten.sum.dim_IntList, *SOFTMAX)


# ------------------------------------------------------------------------------------ toy models
def _mixes(X, fn, base, scale, eps=1e-6):
    """The sample's mix logits ``(vec(X) fn^T) rsqrt(mean(vec(X)^2) + eps) * scale + base`` split in three."""
    n = X.shape[-2]
    xf = X.flatten(-2).float()
    mix = F.linear(xf, fn.float()) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    s, b = scale.float(), base.float()
    return (mix[..., :n] * s[0] + b[:n], mix[..., n:2 * n] * s[1] + b[n:2 * n],
            (mix[..., 2 * n:] * s[2] + b[2 * n:]).unflatten(-1, (n, n)))


def pre_variant(X, fn, base, scale, kind: str, iters: int, eps=1e-6):
    """``hc_pre`` with another residual-mix normalisation: "softmax" (no Sinkhorn), "row-first"
    (Sinkhorn that normalises rows before columns: not the op's schedule) or "sigmoid-start" (the HF
    variant's Sinkhorn start: sigmoid instead of the row softmax, then the op's schedule)."""
    pre, post, logits = _mixes(X, fn, base, scale)
    if kind == "sigmoid-start":
        m = torch.sigmoid(logits) + eps
        m = m / (m.sum(-2, keepdim=True) + eps)
        for _ in range(iters - 1):
            m = m / (m.sum(-1, keepdim=True) + eps)
            m = m / (m.sum(-2, keepdim=True) + eps)
    else:
        m = logits.softmax(-1)
    if kind == "row-first":
        m = m + eps
        for _ in range(iters):
            m = m / (m.sum(-1, keepdim=True) + eps)
            m = m / (m.sum(-2, keepdim=True) + eps)
    u = ((torch.sigmoid(pre) + eps).unsqueeze(-1) * X.float()).sum(-2)
    return u.to(X.dtype), 2 * torch.sigmoid(post), m


class MhcStack(nn.Module):
    """embed -> N streams -> per block ``(kind, iters)``: mixing, RMSNorm, gated MLP, ``hc_post`` ->
    ``hc_head`` -> logits. ``kind`` "sinkhorn" uses the sample's ``hc_pre``; others ``pre_variant``.
    ``forward(ids, past=None) -> (logits, {})`` (the sample contract, with no cache)."""

    def __init__(self, blocks=(("sinkhorn", 20), ("sinkhorn", 20))):
        super().__init__()
        self.blocks, mix = blocks, (2 + N) * N
        self.embed = nn.Embedding(VOCAB, D)
        self.fn = nn.ParameterList(nn.Parameter(torch.randn(mix, N * D) * 0.5 * (N * D) ** -0.5) for _ in blocks)
        self.base = nn.ParameterList(nn.Parameter(torch.randn(mix) * 0.5) for _ in blocks)
        self.scale = nn.ParameterList(nn.Parameter(torch.rand(3) + 0.5) for _ in blocks)
        self.norms = nn.ModuleList(RMSNorm(D) for _ in blocks)
        self.mlps = nn.ModuleList(GatedMLP(D, 2 * D) for _ in blocks)
        self.head_fn = nn.Parameter(torch.randn(N, N * D) * 0.5 * (N * D) ** -0.5)
        self.head_base = nn.Parameter(torch.randn(N) * 0.5)
        self.head_scale = nn.Parameter(torch.rand(1) + 0.5)
        self.out = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids, past=None):
        X = self.embed(ids).unsqueeze(2).repeat(1, 1, N, 1)  # [B, T, N, D]
        for i, (kind, iters) in enumerate(self.blocks):
            if kind == "sinkhorn":
                u, post, comb = hc_pre(X, self.fn[i], self.base[i], self.scale[i], iters)
            else:
                u, post, comb = pre_variant(X, self.fn[i], self.base[i], self.scale[i], kind, iters)
            X = hc_post(X, self.mlps[i](self.norms[i](u)), post, comb)
        return self.out(hc_head(X, self.head_fn, self.head_base, self.head_scale)), {}


def _copy(prog: StepProgram) -> StepProgram:
    gm = fx.GraphModule(prog.gm, copy.deepcopy(prog.gm.graph))
    return StepProgram(gm, list(prog.inputs), list(prog.outputs), dict(prog.seq_dims))


def _rewrite(prog: StepProgram):
    """(rewritten copy, counts, reasons left alone)."""
    ctx = Context(_copy(prog), Analysis())
    counts = rewrite_mhc(ctx)
    return ctx.program, counts, ctx.analysis.left_alone


def _assert_close_with_inf(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """``assert_close`` for tensors holding -inf markers (empty compressor slots): same infinities,
    finite entries within tolerance."""
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], want[inf]), f"{what}: infinities differ"
    assert_close(got.masked_fill(inf, 0), want.masked_fill(inf, 0), what=what)


def _count(gm: fx.GraphModule, *targets) -> int:
    return sum(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)



def _captured(blocks, dtype, seed=0):
    torch.manual_seed(seed)
    model = MhcStack(blocks).to(dtype).eval()
    prog = capture_step(model, torch.randint(0, VOCAB, (2, 8)))
    return model, prog, *_rewrite(prog)


@pytest.fixture(scope="module", params=[pytest.param(torch.float32, id="fp32"),
                                        pytest.param(torch.bfloat16, id="bf16")])
def stack(request, one_thread):
    """The plain 2-block Sinkhorn stack: (dtype, model, captured, rewritten, counts, reasons)."""
    return request.param, *_captured((("sinkhorn", 20), ("sinkhorn", 20)), request.param)


MIXED = (("sinkhorn", 7), ("softmax", 0), ("row-first", 5), ("sigmoid-start", 20), ("sinkhorn", 20))


@pytest.fixture(scope="module")
def mixed(one_thread):
    """Blocks the op covers (7 and 20 iterations) and two it must not take: (model, captured, new, counts, reasons)."""
    return _captured(MIXED, torch.float32, seed=1)


# ------------------------------------------------------------------------------------ plain stack
def test_stack_counts(stack):
    _, _, prog, new, counts, reasons = stack
    assert {k: counts[k] for k in ("mhc_pre", "mhc_post", "mhc_head", "left_alone")} == \
        {"mhc_pre": 2, "mhc_post": 2, "mhc_head": 1, "left_alone": 0}, reasons
    assert reasons == []
    assert counts["nodes_before"] == len(prog.gm.graph.nodes) and counts["nodes_after"] == len(new.gm.graph.nodes)
    assert [_count(new.gm, op) for op in (OPS.mhc_pre.default, OPS.mhc_post.default, OPS.mhc_head.default)] == [2, 2, 1]
    assert all(n.kwargs["iters"] == 20 for n in new.gm.graph.nodes if n.target is OPS.mhc_pre.default)


def test_stack_sinkhorn_nodes_gone(stack):
    """The unrolled Sinkhorn (softmax + 39 normalisations per block) is gone: > 10x fewer such nodes."""
    _, _, prog, new, counts, _ = stack
    before, after = _count(prog.gm, *SINKHORN_OPS), _count(new.gm, *SINKHORN_OPS)
    assert before >= 2 * (1 + 2 * 39) and after * 10 < before, (before, after)
    assert counts["nodes_after"] * 3 < counts["nodes_before"], counts
    assert not any(n.op == "call_function" and "val" not in n.meta and n.target is not torch.ops.aten._assert_tensor_metadata.default
                   for n in new.gm.graph.nodes)


def test_stack_parameters_by_role(stack):
    """``fn`` / ``base`` / ``scale`` are bound to the very parameters the model uses for them."""
    _, model, _, new, _, _ = stack
    pres = [n for n in new.gm.graph.nodes if n.target is OPS.mhc_pre.default]
    for i, node in enumerate(pres):
        got = [new.gm.get_parameter(a.target) for a in node.args[1:]]
        for g, want in zip(got, (model.fn[i], model.base[i], model.scale[i])):
            assert torch.equal(g, want)
    (head,) = [n for n in new.gm.graph.nodes if n.target is OPS.mhc_head.default]
    assert [a.target for a in head.args[1:]] == ["head_fn", "head_base", "head_scale"]


@pytest.mark.parametrize("batch,length", [pytest.param(2, 8, id="capture-size"), pytest.param(3, 13, id="other-size"),
                                          pytest.param(1, 1, id="one-token")])
def test_stack_parity(stack, batch, length):
    dtype, model, _, new, _, _ = stack
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        want = model(ids)[0]
        got = new.gm(ids)[0]
    assert_close(got, want, dtype=dtype, what=f"logits {dtype}")


# ------------------------------------------------------------------------------------ mixed stack
def test_mixed_counts_and_iters(mixed):
    """Sinkhorn blocks rewritten with the iteration count found in the graph; softmax-only,
    row-first and sigmoid-start mixing are left alone, each with its reason."""
    _, _, new, counts, reasons = mixed
    assert {k: counts[k] for k in ("mhc_pre", "mhc_post", "mhc_head", "left_alone")} == \
        {"mhc_pre": 2, "mhc_post": 2, "mhc_head": 1, "left_alone": 3}, reasons
    assert [n.kwargs["iters"] for n in new.gm.graph.nodes if n.target is OPS.mhc_pre.default] == [7, 20]
    assert len(reasons) == 3
    assert sum("no Sinkhorn chain" in r for r in reasons) == 2, reasons  # softmax-only, sigmoid-start
    assert sum("schedule 'rcrc" in r for r in reasons) == 1, reasons
    # the left-alone blocks keep their own arithmetic: 2 softmax, 2 * 5 row-first + 39 sigmoid-start steps
    assert _count(new.gm, *SOFTMAX) == 2 and _count(new.gm, torch.ops.aten.div.Tensor) == 10 + 39


def test_mixed_parity(mixed):
    model, _, new, _, _ = mixed
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(new.gm(ids)[0], model(ids)[0], what="logits")


@pytest.mark.parametrize("told,ok", [pytest.param(7, True, id="told-7"), pytest.param(20, False, id="told-20"),
                                     pytest.param(6, False, id="told-6")])
def test_sinkhorn_check_needs_the_graph_iters(mixed, told, ok):
    """The 7-iteration chain matches ``sinkhorn(iters=7)`` only: a wrong count fails the numerical check."""
    _, prog, _, _, _ = mixed
    gm = _copy(prog).gm
    chains = [c for n in gm.graph.nodes if n.target in SOFTMAX and (c := sinkhorn_chain(n)) is not None]
    assert [c.iters for c in chains] == [7, None, 20]  # the row-first chain has no valid iteration count
    reason = verify_sinkhorn(gm, chains[0], told, N)
    assert (reason == "") == ok, reason


def test_prune_drops_asserts_of_dead_values(mixed):
    """``prune`` removes metadata asserts that alone keep a dead Sinkhorn chain alive (plain dead-code
    elimination keeps it, asserts being side effects), and nothing live."""
    _, prog, _, _, _ = mixed
    gm = _copy(prog).gm
    assert prune(gm) == 0  # the captured graph has nothing dead
    softmax = next(n for n in gm.graph.nodes if n.target in SOFTMAX)
    chain = sinkhorn_chain(softmax)  # the 7-iteration chain: 13 normalisations
    assert any(u.target is ASSERT_META for u in chain.end.users)
    chain.end.replace_all_uses_with(softmax, delete_user_cb=lambda user: user.target is not ASSERT_META)
    divs = _count(gm, torch.ops.aten.div.Tensor)
    plain = _copy(StepProgram(gm, [], [])).gm
    plain.graph.eliminate_dead_code()
    assert _count(plain, torch.ops.aten.div.Tensor) == divs
    assert prune(gm) >= 3 * 13
    assert _count(gm, torch.ops.aten.div.Tensor) == divs - 13
    assert torch.isfinite(gm(torch.randint(0, VOCAB, (2, 5)))[0]).all()


# ------------------------------------------------------------------------- DeepSeek V4 step graph
@pytest.fixture(scope="module")
def deepseek(one_thread, rewritten):
    shared = rewritten("deepseek-v4-flash:tiny")  # the session's shared capture
    return shared.model, shared.captured, *_rewrite(shared.captured)


@pytest.mark.slow
def test_deepseek_counts(deepseek):
    model, prog, new, counts, reasons = deepseek
    layers = model.config.n_layers
    assert {k: counts[k] for k in ("mhc_pre", "mhc_post", "mhc_head", "left_alone")} == \
        {"mhc_pre": 2 * layers, "mhc_post": 2 * layers, "mhc_head": 1, "left_alone": 0}, reasons
    assert all(n.kwargs["iters"] == model.config.hc_sinkhorn_iters
               for n in new.gm.graph.nodes if n.target is OPS.mhc_pre.default)
    before, after = _count(prog.gm, torch.ops.aten.div.Tensor), _count(new.gm, torch.ops.aten.div.Tensor)
    assert after * 10 < before, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("batch,past_len,new_len", [pytest.param(3, 10, 2, id="b3-past10-new2"),
                                                    pytest.param(2, 10, 3, id="b2-past10-new3")])
def test_deepseek_parity(deepseek, batch, past_len, new_len):
    """A step over a cache at batch / lengths other than the capture's: logits and every present
    tensor match eager. (The captured graph itself only holds at past lengths with as many
    compressed entries as at capture; see the report.)"""
    model, _, new, _, _ = deepseek
    ids = torch.randint(0, 256, (batch, past_len + new_len), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, past = model(ids[:, :past_len])
        want_logits, want_present = model(ids[:, past_len:], past)
        got = new.gm(ids[:, past_len:], *past.values())
    assert_close(got[0], want_logits, what="logits")
    assert list(want_present) == [name[len("present."):] for name in new.outputs[1:]]
    for name, g, w in zip(new.outputs[1:], got[1:], want_present.values()):
        _assert_close_with_inf(g, w, name)
