"""The CCA pass (``passes/cca.py``) on the ZAYA1 tiny preset and on convs that are not CCA.

ZAYA1: every layer's q/k/v sub-graph becomes one ``effexport::cca`` node (no conv left), the
attention pass then gives full ``attention_cache`` sites, the CachePlan keeps K/V full and conv /
shift states per layer, and the rewritten step graph matches eager logits and caches (fp32, 1e-5)
over prefill and >= 8 decode steps. The numeric check is shown to be the judge: a one-constant edit
of the graph is rejected with the reason, and weights on the meta device do not stop recognition.
Negative models (captured like any sample): a single causal depthwise conv (Mamba-style) and a
depthwise conv followed by a dense, not per-head, conv are left alone with the reason.

The pass is the pipeline's first pass (before attention discovery).
"""
import copy

import pytest
import torch
from torch import fx, nn

from _helpers import assert_close
from effexport.exporter.capture import capture_step
from effexport.passes.program import StepProgram
from effexport.passes import pipeline
from effexport.passes._graph import aten, is_call, meta_val
from effexport.passes.cca import find_cca, rewrite_cca

CCA = torch.ops.effexport.cca.default
CONVS = (aten.conv1d.default, aten.convolution.default)
NEW_TOKENS = 3  # capture with T != P = 2: with T = 2 torch.export specialises T to the conv state length



@pytest.fixture(scope="module")
def zaya(rewritten):
    """The ZAYA1 tiny model and its captured step graph (the session's shared capture)."""
    shared = rewritten("zaya1-8b:tiny")
    return shared.model, shared.captured


def _copy(program: StepProgram) -> StepProgram:
    gm = fx.GraphModule(program.gm, copy.deepcopy(program.gm.graph))
    return StepProgram(gm, list(program.inputs), list(program.outputs), dict(program.seq_dims))


def _run_pipeline(program: StepProgram):
    assert pipeline.PIPELINE[0] == ("cca", rewrite_cca)
    return pipeline.run_pipeline(program)


@pytest.fixture(scope="module")
def cca_rewritten(zaya, rewritten):
    """The full pipeline: (model, new program, analysis) -- the session's shared rewrite."""
    shared = rewritten("zaya1-8b:tiny")
    return shared.model, shared.program, shared.analysis


def _count(gm, *targets) -> int:
    return sum(1 for n in gm.graph.nodes if is_call(n, *targets))


# ------------------------------------------------------------------------------------- structure
def test_every_layer_becomes_one_cca_node(cca_rewritten):
    """n_layers cca nodes, zero convs left, counts {cca: 4, left_alone: 0}, graph linted, every
    computed node carries a meta value."""
    model, new, analysis = cca_rewritten
    layers = model.config.num_hidden_layers
    assert analysis.counts["cca"] == {"cca": layers, "left_alone": 0}
    assert _count(new.gm, CCA) == layers
    assert _count(new.gm, *CONVS) == 0
    assert not [why for why in analysis.left_alone if "CCA" in why]
    new.gm.graph.lint()
    missing = [n.name for n in new.gm.graph.nodes if n.op == "call_function" and meta_val(n) is None
               and not is_call(n, aten._assert_tensor_metadata.default)]
    assert missing == []
    assert f"pass cca: cca={layers}, left_alone=0" in analysis.explain()


def test_cca_outputs_feed_full_attention_cache(cca_rewritten):
    """Every site is a full attention_cache whose q, new K and new V are the cca node's outputs 0-2,
    and the cca node's states 3-4 are step outputs."""
    model, new, analysis = cca_rewritten
    assert [s.cache for s in analysis.sites] == ["full"] * model.config.num_hidden_layers
    attn = [n for n in new.gm.graph.nodes if is_call(n, torch.ops.effexport.attention_cache.default)]
    assert len(attn) == model.config.num_hidden_layers
    for node in attn:
        srcs = [node.args[i] for i in range(3)]
        assert all(is_call(s.args[0], CCA) for s in srcs), [s.name for s in srcs]
        assert [s.args[1] for s in srcs] == [0, 1, 2]
        assert len({s.args[0] for s in srcs}) == 1
    outputs = next(n for n in new.gm.graph.nodes if n.op == "output").args[0]
    by_name = dict(zip(new.outputs, outputs))
    for i in range(model.config.num_hidden_layers):
        conv, shift = by_name[f"present.{i}.conv"], by_name[f"present.{i}.shift"]
        assert is_call(conv.args[0], CCA) and conv.args[1] == 3, conv.name
        assert shift.args[0] is conv.args[0] and shift.args[1] == 4, shift.name


def test_cache_plan_has_kv_and_states_per_layer(cca_rewritten):
    """Per layer: k, v full [batch, Hk, seq, d]; conv state [batch, C, P]; shift state [batch, Hk*d/2]."""
    model, _, analysis = cca_rewritten
    cfg = model.config
    expected = []
    for i in range(cfg.num_hidden_layers):
        kv = ("batch", cfg.num_key_value_heads, "seq", cfg.head_dim)
        expected += [(f"{i}.k", "full", kv), (f"{i}.v", "full", kv),
                     (f"{i}.conv", "state", ("batch", cfg.conv_channels, cfg.conv_padding)),
                     (f"{i}.shift", "state", ("batch", cfg.value_half))]
    assert [(e.name, e.kind, e.shape) for e in analysis.plan.entries] == expected


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("chunks", [
    pytest.param((5,) + (1,) * 12, id="prefill5-decode12x1"),
    pytest.param((1, 1, 3, 1, 2, 1, 1, 1, 1, 1, 1), id="prefill1-uneven-chunks"),
])
def test_parity_with_eager(cca_rewritten, chunks):
    """Logits of every step (fp32, rel 1e-5) and the final K/V/conv/shift caches match eager."""
    model, new, analysis = cca_rewritten
    ids = torch.randint(1, model.config.vocab_size, (2, sum(chunks)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, present = model(ids)
        caches, start = analysis.plan.empty_caches(2), 0
        for size in chunks:
            outs = new.gm(ids[:, start:start + size], torch.tensor(start), *caches)
            assert_close(outs[0], ref[:, start:start + size], what=f"logits of tokens {start}..{start + size - 1}")
            caches, start = list(outs[1:]), start + size
    for entry, cache in zip(analysis.plan.entries, caches):
        assert_close(cache, present[entry.name], what=f"cache {entry.name}")


# ------------------------------------------------------------------------------- the numeric check
def test_numeric_check_matches_exactly_and_tells_cos_from_sin(zaya):
    """Each match reproduces the reference on random inputs (rel <= 1e-6) and the table it calls
    cos is the one computed with aten.cos."""
    _, program = zaya
    matches, rejected = find_cca(program.gm)
    assert len(matches) == 4 and rejected == []
    for m in matches:
        assert m.max_rel <= 1e-6
        assert m.dims == dict(hq=4, hk=2, d=16, k0=2, k1=2, p=2, channels=96, dv=16, rot=8)
        for name, op in (("cos", aten.cos.default), ("sin", aten.sin.default)):
            assert any(is_call(n, op) for n in m.args[name].all_input_nodes), (name, m.args[name].name)


def test_edited_residual_is_rejected_by_the_numeric_check(zaya):
    """Change layer 0's q-k mean residual factor 0.5 -> 0.4: the structure still matches, numerics
    do not; that layer is left alone with the reason, the other three are rewritten."""
    _, program = zaya
    prog = _copy(program)
    halves = [n for n in prog.gm.graph.nodes if is_call(n, aten.mul.Tensor) and n.args[1] == 0.5
              and meta_val(n).dim() == 5]
    assert len(halves) == 4
    halves[0].args = (halves[0].args[0], 0.4)
    prog.gm.recompile()
    analysis = pipeline.Analysis()
    counts = rewrite_cca(pipeline.Context(prog, analysis))
    assert counts == {"cca": 3, "left_alone": 1}
    assert len(analysis.left_alone) == 1
    assert "does not compute effexport::cca" in analysis.left_alone[0]
    assert "layers.0." in analysis.left_alone[0]
    assert _count(prog.gm, *CONVS) == 2


def test_weights_on_meta_device_are_recognised(zaya):
    """The check runs on random weights: every module attribute moved to meta, still 4 matches."""
    _, program = zaya
    prog = _copy(program)
    for node in prog.gm.graph.nodes:
        if node.op == "get_attr":
            *path, name = node.target.split(".")
            owner = prog.gm
            for part in path:
                owner = getattr(owner, part)
            value = getattr(owner, name)
            setattr(owner, name, nn.Parameter(torch.empty_like(value, device="meta"), requires_grad=False))
    matches, rejected = find_cca(prog.gm)
    assert (len(matches), rejected) == (4, [])


def test_attention_before_value_projections_is_reordered(zaya):
    """Layer 0's value projections moved after its q @ k^T: the op (which needs them) would come
    after a user of its q; the pass re-sorts the graph, keeps the input order and stays exact."""
    model, program = zaya
    prog = _copy(program)
    graph = prog.gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    scores, probs_v = [n for n in graph.nodes if is_call(n, aten.matmul.default)][:2]
    v_proj = [n for n in graph.nodes if is_call(n, aten.linear.default)][2:4]  # layer 0: q, k, v_cur, v_del
    moved, seen = [], set(v_proj)
    for n in graph.nodes:
        if n in seen or any(i in seen for i in n.all_input_nodes):
            seen.add(n)
            if order[n] < order[probs_v]:
                moved.append(n)
    for n in moved:
        probs_v.prepend(n)
    graph.lint()
    assert list(graph.nodes).index(v_proj[1]) > list(graph.nodes).index(scores)
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    analysis = pipeline.Analysis()
    assert rewrite_cca(pipeline.Context(prog, analysis)) == {"cca": 4, "left_alone": 0}
    assert [n.name for n in prog.gm.graph.nodes if n.op == "placeholder"] == placeholders
    ids = torch.randint(1, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        past = {k: v[:, :, :0] if k.endswith((".k", ".v")) else torch.zeros_like(v)
                for k, v in model(ids[:, :1])[1].items()}
        ref, _ = model(ids)
        got = prog.gm(ids, *past.values())
    assert_close(got[0], ref, what="logits")


# -------------------------------------------------------------------------------------- negatives
class _ConvLM(nn.Module):
    """A tiny LM with a causal conv over ``cat(state, x^T)`` that is not CCA.

    kind "single": one depthwise conv (a Mamba-style short conv); "dense": depthwise then a conv
    mixing all channels (groups 1) instead of per head."""

    def __init__(self, kind: str, vocab: int = 32, dim: int = 16, kernel: int = 3):
        super().__init__()
        self.kind, self.pad = kind, (kernel - 1) * (1 if kind == "single" else 2)
        self.embed = nn.Embedding(vocab, dim)
        self.conv0 = nn.Conv1d(dim, dim, kernel, groups=dim)
        self.conv1 = nn.Conv1d(dim, dim, kernel, groups=1) if kind == "dense" else None
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, past=None):
        x = self.embed(input_ids).transpose(1, 2)  # [B, E, T]
        state = past["0.conv"] if past else x.new_zeros(x.shape[0], x.shape[1], self.pad)
        c = torch.cat([state, x], dim=-1)  # [B, E, P + T]
        y = self.conv0(c)
        if self.conv1 is not None:
            y = self.conv1(y)
        return self.head(torch.nn.functional.silu(y).transpose(1, 2)), {"0.conv": c[..., c.shape[-1] - self.pad:]}


@pytest.mark.parametrize("kind, reason", [
    pytest.param("single", "not one second conv1d", id="single-depthwise-conv"),
    pytest.param("dense", "second conv is not grouped per head", id="dense-second-conv"),
])
def test_causal_conv_that_is_not_cca_is_left_alone(kind, reason):
    """The candidate is found (a conv over cat(state, x)), not rewritten, and the reason names
    what failed; the captured graph runs as before."""
    torch.manual_seed(0)
    model = _ConvLM(kind).eval()
    ids = torch.randint(0, 32, (2, 7))
    program = capture_step(model, ids, new_tokens=NEW_TOKENS)
    convs = _count(program.gm, *CONVS)
    analysis = pipeline.Analysis()
    counts = rewrite_cca(pipeline.Context(program, analysis))
    assert counts == {"cca": 0, "left_alone": 1}
    assert len(analysis.left_alone) == 1 and reason in analysis.left_alone[0], analysis.left_alone
    assert _count(program.gm, *CONVS) == convs and _count(program.gm, CCA) == 0
    state = torch.randn(2, 16, model.pad)
    with torch.no_grad():
        ref = model(ids[:, :4], {"0.conv": state})
        got = program.gm(ids[:, :4], state)
    assert_close(got[0], ref[0], what="logits")
