"""Chunked attention (Llama 4's ``attention_chunk_size``): ``attention_ring(chunked=True)``, a
chunk-local cache of C slots.

Op: prefill / decode loops (step by step, random chunks up to 2C + 1, a prefill longer than C then
decode) equal dense attention with the chunk mask ``j // C == i // C, j <= i`` built here, with GQA,
sinks and softcap; the C slots hold the last C positions; opcheck; each ONNX profile in ONNX Runtime
against the eager op across chunk boundaries.

Model: a tiny Llama 4 text model (2 chunked RoPE layers with C = 8, one NoPE full layer, MoE) captured
through :class:`HFStep`: two chunked sites rewritten to ``attention_ring(chunked=True)``, the
CachePlan gives those layers chunk caches of C slots and the NoPE layer a full cache, and the
rewritten graph and the ``ort`` ONNX export match the HF module's own logits (fp32,
max rel 1e-4) over a prefill of 21 tokens (three chunk boundaries) and 16 decode steps.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import transformers  # a test dependency: missing, the module fails to import (no silent skip)

from _helpers import assert_close, step_feeds
from models import hf_tiny

import effexport.custom_ops  # noqa: F401  (registers the ops)

OPS = torch.ops.effexport
C = hf_tiny.CHUNK  # chunk size of the op tests and the tiny Llama 4 (8)
PREFILL, DECODE, BATCH, RTOL = 21, 16, 2, 1e-4


# ------------------------------------------------------------------------------------------ op
def _chunk_reference(q, k, v, sinks, scale, softcap, chunk):
    """Dense attention of every query over every key with the chunk mask (fp64, built here)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = q.double() @ k.transpose(-1, -2) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None, :]
    scores = scores.masked_fill(~((j <= i) & (j // chunk == i // chunk)), float("-inf"))
    if sinks is not None:
        sink = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        return (torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1] @ v).float()
    return (torch.softmax(scores, -1) @ v).float()


def _schedule(name: str, length: int, rng: random.Random) -> list[int]:
    if name == "steps":
        return [1] * length
    if name == "prefill-gt-chunk":
        first = rng.randint(C + 1, 2 * C + 3)
        return [first] + [1] * (length - first)
    out = []
    while sum(out) < length:
        out.append(min(rng.randint(1, 2 * C + 1), length - sum(out)))
    return out


@pytest.mark.parametrize("schedule", ["steps", "random-chunks", "prefill-gt-chunk"])
@pytest.mark.parametrize("heads,kv_heads,sinks,softcap", [
    pytest.param(4, 2, False, 0.0, id="gqa2"),
    pytest.param(6, 1, True, 5.0, id="mqa-sinks-softcap"),
])
def test_chunked_ring_equals_dense_chunk_mask(schedule, heads, kv_heads, sinks, softcap):
    """Any split of a 5C + 3 sequence into calls == dense attention with the chunk mask; after each
    call slot ``p mod C`` holds position p for the last C positions."""
    gen = torch.Generator().manual_seed(heads + len(schedule))
    length, d = 5 * C + 3, 16
    q = torch.randn(2, heads, length, d, generator=gen)
    k, v = torch.randn(2, kv_heads, length, d, generator=gen), torch.randn(2, kv_heads, length, d, generator=gen)
    s = torch.randn(heads, generator=gen) if sinks else None
    ring_k, ring_v = k.new_zeros(2, kv_heads, C, d), v.new_zeros(2, kv_heads, C, d)
    outs, start = [], 0
    for t in _schedule(schedule, length, random.Random(length)):
        sl = slice(start, start + t)
        out, ring_k, ring_v = OPS.attention_ring(q[:, :, sl], k[:, :, sl], v[:, :, sl], ring_k, ring_v,
                                                 torch.tensor(start), s, scale=0.3, window=C, softcap=softcap,
                                                 chunked=True)
        outs.append(out)
        start += t
        for p in range(max(0, start - C), start):
            assert torch.equal(ring_k[:, :, p % C], k[:, :, p]) and torch.equal(ring_v[:, :, p % C], v[:, :, p])
    assert_close(torch.cat(outs, 2), _chunk_reference(q, k, v, s, 0.3, softcap, C), what=f"chunked {schedule}")


def test_chunked_differs_from_sliding():
    """Past the first chunk boundary the chunk mask is not the window mask (the mode is not ignored)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1, 8, generator=gen) for _ in range(3))
    ring = torch.randn(1, 2, C, 8, generator=gen), torch.randn(1, 2, C, 8, generator=gen)
    kw = dict(scale=0.3, window=C)
    chunked = OPS.attention_ring(q, k, v, *ring, torch.tensor(3 * C + 2), chunked=True, **kw)[0]
    sliding = OPS.attention_ring(q, k, v, *ring, torch.tensor(3 * C + 2), **kw)[0]
    first = OPS.attention_ring(q, k, v, *ring, torch.tensor(3 * C), chunked=True, **kw)[0]
    assert not torch.allclose(chunked, sliding)
    assert_close(first, v.expand(1, 2, 1, 8), what="first token of a chunk sees only itself")


def test_opcheck_chunked():
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 3, 8, generator=gen), torch.randn(2, 2, 3, 8, generator=gen), torch.randn(2, 2, 3, 6, generator=gen)
    ring = torch.randn(2, 2, 4, 8, generator=gen), torch.randn(2, 2, 4, 6, generator=gen)
    torch.library.opcheck(OPS.attention_ring.default, (q, k, v, *ring, torch.tensor(9), torch.randn(4)),
                          dict(scale=0.3, window=4, softcap=2.0, chunked=True))


class _ChunkRing(torch.nn.Module):
    def forward(self, q, k_new, v_new, k_ring, v_ring, pos, sinks):
        return OPS.attention_ring(q, k_new, v_new, k_ring, v_ring, pos, sinks, scale=0.3, window=C, chunked=True)


@pytest.mark.parametrize("profile", ["ort", "standard", "tensorrt"])
def test_onnx_chunked_ring(profile):
    """Each profile's lowering in ONNX Runtime == the eager op: a prefill of 11 (past one boundary),
    then decode at a chunk's first slot, mid-chunk and its last slot."""
    import onnxruntime as ort
    from torch.export import Dim

    from effexport.exporter.backends.onnx.export import lower

    gen = torch.Generator().manual_seed(2)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    args = (r(2, 4, 3, 16), r(2, 2, 3, 16), r(2, 2, 3, 16), r(2, 2, C, 16), r(2, 2, C, 16), torch.tensor(5), r(4))
    t, b = Dim("t", min=1, max=64), Dim("b", min=1, max=8)
    dyn = ({0: b, 2: t}, {0: b, 2: t}, {0: b, 2: t}, {0: b}, {0: b}, None, None)
    model = lower(_ChunkRing(), args, profile, dynamic_shapes=dyn)
    if profile == "tensorrt":  # only ops the TensorRT 10 ONNX parser takes (Mod, LessOrEqual on int64)
        from effexport.exporter.backends.onnx.tensorrt_profile import lint

        assert lint(model) == []
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    ring = [args[3].zero_(), args[4].zero_()]
    for pos, t_len in ((0, 11), (11, 1), (12, 1), (15, 1), (16, 1), (17, 4)):
        inputs = (r(2, 4, t_len, 16), r(2, 2, t_len, 16), r(2, 2, t_len, 16), *ring, torch.tensor(pos), args[6])
        want = _ChunkRing()(*inputs)
        got = sess.run(None, dict(zip(names, [x.numpy() for x in inputs])))
        assert_close(torch.from_numpy(got[0]), want[0], what=f"{profile} out at pos {pos}")
        assert np.array_equal(got[1], want[1].numpy()) and np.array_equal(got[2], want[2].numpy())
        ring = list(want[1:])


# ---------------------------------------------------------------------------------------- Llama 4
LLAMA4 = hf_tiny.FAMILIES["llama4"][2]  # the CLI matrix's tiny Llama 4 (test_hf_families), chunks of C
CHUNKED_LAYERS = (0, 1)


def build_llama4():
    """Tiny random Llama 4 text model: layers 0-1 chunked with RoPE (layer 1 MoE), layer 2 NoPE full
    attention with attention temperature tuning (floor_scale 8: the scale changes within the test)."""
    config = transformers.Llama4TextConfig(**LLAMA4)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.Llama4ForCausalLM(config).eval()


class _Llama4:
    def __init__(self):
        from effexport.exporter.capture import capture_step
        from effexport.exporter.frontends.hf import HFStep
        from effexport.passes.pipeline import run_pipeline

        self.hf = build_llama4()
        ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
        self.captured = capture_step(HFStep(self.hf), ids)
        self.program, self.analysis = run_pipeline(self.captured)
        ids = torch.randint(0, 128, (BATCH, PREFILL + DECODE), generator=torch.Generator().manual_seed(3))
        self.ids = ids
        with torch.no_grad():
            self.ref = self.hf(input_ids=ids).logits


@pytest.fixture(scope="module")
def llama4():
    if not hasattr(transformers, "Llama4ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Llama 4")
    return _Llama4()


def _decode(step, caches, ids):
    logits, caches = step(ids[:, :PREFILL], 0, caches)
    out = [logits]
    for t in range(PREFILL, PREFILL + DECODE):
        logits, caches = step(ids[:, t:t + 1], t, caches)
        out.append(logits[:, 0])
    return out


def _assert_parity(logits, ref, what):
    refs = [ref[:, :PREFILL]] + [ref[:, PREFILL + i] for i in range(DECODE)]
    worst = 0.0
    for i, (got, want) in enumerate(zip(logits, refs)):
        want = want.double().numpy()
        err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
        assert err <= RTOL, f"{what} {'prefill' if i == 0 else f'decode step {i - 1}'}: max rel {err:.3e} > {RTOL}"
        worst = max(worst, err)
    return worst


def test_llama4_rewrites_and_cache_plan(llama4):
    """Two chunked sites -> attention_ring(chunked=True); CachePlan: chunk caches of C slots for
    the chunked layers (k and v), a full cache for the NoPE layer, nothing left alone."""
    c, plan = llama4.analysis.counts, llama4.analysis.plan
    assert c["classify_masks"]["chunked"] == 2 and c["classify_masks"]["causal"] == 1
    assert (c["rewrite"]["chunk"], c["rewrite"]["full"], c["rewrite"]["ring"], c["rewrite"]["left_alone"]) == (2, 1, 0, 0)
    assert llama4.analysis.left_alone == []
    chunk_ops = [n for n in llama4.program.gm.graph.nodes if n.target is OPS.attention_ring.default]
    assert len(chunk_ops) == 2 and all(n.kwargs["chunked"] and n.kwargs["window"] == C for n in chunk_ops)
    entries = {e.name: e for e in plan.entries}
    for layer in CHUNKED_LAYERS:
        for name in ("k", "v"):
            e = entries[f"{layer}.{name}"]
            assert (e.kind, e.window, e.shape) == ("chunk", C, ("batch", 2, C, 16)), e
    assert [(entries[n].kind, entries[n].shape) for n in ("2.k", "2.v")] == [("full", ("batch", 2, "seq", 16))] * 2
    assert [(r.layer, r.kind, r.window) for r in plan.layers] == [(0, "chunk", C), (1, "chunk", C), (2, "full", 0)]
    # the chunk caches do not grow: at 4096 tokens they hold C entries each
    assert plan.nbytes(1, 4096) == 2 * 2 * (2 * C * 16 * 4) + 2 * (2 * 4096 * 16 * 4)


def test_llama4_complex_rope_lowered(llama4):
    """The captured graph multiplies complex tensors (RoPE); after the pipeline no complex value or
    complex op remains."""
    complex_ops = (torch.ops.aten.polar.default, torch.ops.aten.view_as_complex.default,
                   torch.ops.aten.view_as_real.default)

    def complex_nodes(gm):
        return [n for n in gm.graph.nodes if n.target in complex_ops or (
            isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex())]

    assert complex_nodes(llama4.captured.gm)
    assert complex_nodes(llama4.program.gm) == []
    assert llama4.analysis.counts["complex"]["complex_nodes"] > 0 and llama4.analysis.counts["complex"]["left_alone"] == 0


def test_llama4_rewritten_graph_matches_hf(llama4):
    def step(tokens, pos, caches):
        with torch.no_grad():
            out = llama4.program.gm(tokens, torch.tensor(pos), *caches)
        return out[0].numpy(), out[1:]

    _assert_parity(_decode(step, llama4.analysis.plan.empty_caches(BATCH), llama4.ids), llama4.ref, "llama4 graph")


@pytest.mark.parametrize("profile", ["ort"])
def test_llama4_onnx_parity(llama4, tmp_path, profile):
    """ONNX Runtime (CPU) prefill 21 + 16 decode steps against HF's own logits; the chunk caches
    keep their C slots. The ``ort`` profile only, for CI time: the chunked ring's ``standard`` and
    ``tensorrt`` lowerings are checked per op above, and the complex pass emits profile-neutral aten."""
    import onnxruntime as ort

    from effexport.exporter.backends.onnx.export import export_step

    path = tmp_path / "step.onnx"
    export_step(llama4.program, llama4.analysis.plan, str(path), profile)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def step(tokens, pos, caches):
        out = sess.run(None, step_feeds(sess, tokens.numpy(), pos, caches))
        assert all(out[1 + i].shape[2] == C for i in range(4))  # chunk caches: layers 0-1, k and v
        return out[0], out[1:]

    caches = [c.numpy() for c in llama4.analysis.plan.empty_caches(BATCH)]
    worst = _assert_parity(_decode(step, caches, llama4.ids), llama4.ref, f"llama4/{profile}")
    print(f"llama4/{profile}: worst max rel {worst:.2e}")


def test_chunked_group_mixing_masks_left_alone(llama4):
    """A KV group whose chunked owner shares its cache with a site of another mask has no op form
    (only ``attention_ring`` has the chunked mode): left alone with the reason, graph untouched."""
    import copy

    from torch import fx

    from effexport.passes.program import StepProgram
    from effexport.passes.attention import AttentionRewriter
    from effexport.passes.pipeline import Analysis, Context, _classify, _discover

    cap = llama4.captured
    gm = fx.GraphModule(cap.gm, copy.deepcopy(cap.gm.graph))
    ctx = Context(StepProgram(gm, list(cap.inputs), list(cap.outputs), dict(cap.seq_dims)), Analysis())
    _discover(ctx)
    _classify(ctx)
    chunked, causal = ctx.analysis.sites[0], ctx.analysis.sites[2]
    assert (chunked.mask_kind, chunked.window, causal.mask_kind) == ("chunked", C, "causal")
    before = len(gm.graph.nodes)
    why = AttentionRewriter(gm, None).rewrite_group(chunked, [causal])
    assert why == "left alone: site 0 is chunked but its KV group mixes masks"
    assert len(gm.graph.nodes) == before
