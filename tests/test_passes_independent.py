"""The pass pipeline on models it was not written against (``tests/models/``), and cases it must not
rewrite.

Covered:
* an independently written Gemma-4-style decoder (``models.alt_gemma``): exact per-pass counts,
  per-site findings (window W, scale folded out of q, softcap, GQA heads, owner/consumer map by the
  HF rule), the dead K/V projections of consumers removed, the CachePlan, the ops in the rewritten
  graph, and fp32 parity of the rewritten step graph against the eager model (prefill, a 3-token
  chunk, 12 single-token steps; 4 windows);
* negatives (``models.negatives``): plain causal (no window, no sharing, no ring), a window that
  only applies past 64 keys (unknown, left alone, unchanged results across the gate), equal but
  independently computed K/V (not shared), bidirectional (classified full), chunked (left alone),
  a padding mask read from the token values (unknown, left alone), an ALiBi-style score bias (no
  attention op: the bias has no argument in the ops), a window switched on by a Python ``if`` on
  the length (refused at capture, naming the condition, on either side of the example's length);
* HF idioms that once broke the passes: HF's verbatim ``repeat_kv`` indexing (a no-op slice before
  the unsqueeze), ``.to(dtype)`` in mask code (export's ``_assert_tensor_metadata`` kept dead masks
  alive), and a bidirectional (full) mask over a cache (must be left alone, not made causal).

Not covered here: lowering to ONNX/TensorRT (exporter tests), sinks and SDPA ``is_causal`` (the
sample tests).
"""
from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_close
from models import alt_gemma, negatives
from models.alt_gemma import GLOBAL, LOCAL, AltConfig
from models.negatives import NegConfig

from effexport.exporter.capture import capture_step
from effexport.passes._graph import meta_val
from effexport.passes.pipeline import run_pipeline
from effexport.passes.sites import layer_index

aten, ops = torch.ops.aten, torch.ops.effexport
SOFTMAX = (aten.softmax.int, aten._softmax.default)
ALT_CHUNKS = (9, 3) + (1,) * 12      # 24 tokens = 4 windows of 6
NEG_CHUNKS = (60, 2) + (1,) * 8      # 70 tokens: crosses the length gate at 64



def token_ids(vocab: int, length: int, seed: int = 1) -> torch.Tensor:
    """Random ``[2, length]`` token ids."""
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def rewrite(model, vocab: int):
    """Capture ``model`` (9-token example, batch 2) and run the pipeline: ``(program, analysis)``."""
    return run_pipeline(capture_step(model, token_ids(vocab, 9, seed=0)))


@torch.no_grad()
def step_parity(model, program, plan, ids: torch.Tensor, chunks) -> float:
    """Feed ``ids`` chunk by chunk to the eager model (its own cache) and to the rewritten step graph
    (the plan's caches, ``pos``); assert every chunk's logits match (fp32). Returns the worst rel."""
    assert sum(chunks) == ids.shape[1]
    caches, past, pos, worst = plan.empty_caches(ids.shape[0]), None, 0, 0.0
    for n in chunks:
        ref, past = model(ids[:, pos:pos + n], past)
        out = program.gm(ids[:, pos:pos + n], torch.tensor(pos), *caches)
        worst = max(worst, assert_close(out[0], ref, what=f"logits of tokens {pos}..{pos + n - 1}")[1])
        caches, pos = list(out[1:]), pos + n
    return worst


def op_counts(gm) -> dict[str, int]:
    """How many softmaxes and effexport attention ops the graph holds."""
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    return {"softmax": sum(t in SOFTMAX for t in targets),
            **{name: targets.count(getattr(ops, name).default)
               for name in ("attention", "attention_cache", "attention_ring", "attention_read")}}


def weights_read(gm) -> set[str]:
    """Names of the parameters the graph still reads."""
    return {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}


# ------------------------------------------------------------------------ independent Gemma-4 style
def expected_alt(cfg: AltConfig) -> dict:
    """The pipeline's counts for an :class:`AltConfig`, derived from the config's own rules."""
    n, consumers = len(cfg.kinds), cfg.consumers()
    owners = [i for i in range(n) if i not in consumers]
    ring_owners = [i for i in owners if cfg.kinds[i] == LOCAL]
    return {
        "discover": {"sites": n, "sdpa": 0, "decomposed": n, "softcap": len(cfg.softcap_layers),
                     "sinks": 0, "rejected": 0},
        "classify_masks": {"causal": cfg.kinds.count(GLOBAL), "sliding": cfg.kinds.count(LOCAL),
                           "full": 0, "chunked": 0, "unknown": 0},
        "kv_sharing": {"groups": len(owners), "consumers": len(consumers),
                       "owners": len(set(consumers.values()))},
        "dead_code": {"projections": 2 * len(consumers)},  # each consumer's wk and wv
        "rewrite": {"ring": len(ring_owners), "full": len(owners) - len(ring_owners), "plain": 0,
                    "read": len(consumers), "left_alone": 0},
        "cache_plan": {"entries": 2 * len(owners), "ring": 2 * len(ring_owners),
                       "full": 2 * (len(owners) - len(ring_owners)), "compressed": 0, "state": 0},
    }


def check_alt(model, program, analysis) -> None:
    """Every count of :func:`expected_alt` matches (shared by the main and the HF-idiom cases)."""
    for name, want in expected_alt(model.cfg).items():
        got = {k: analysis.counts[name][k] for k in want}
        assert got == want, f"pass {name}: {got} != {want}\n{analysis.explain()}"


@pytest.fixture(scope="module")
def alt():
    """The default :class:`AltConfig` model, captured and rewritten once: ``(model, program, analysis)``."""
    model = alt_gemma.build()
    program, analysis = rewrite(model, model.cfg.vocab)
    return model, program, analysis


def test_alt_config_is_the_intended_topology():
    """The model under test really has what the other tests count on: 8 layers, consumers 5, 6 <- 4
    (local) and 7 <- 3 (global; layer f-1 = 4 is local), softcap on 1, 3, 7."""
    cfg = AltConfig()
    assert cfg.consumers() == {5: 4, 6: 4, 7: 3}
    assert expected_alt(cfg)["dead_code"]["projections"] == 6


def test_alt_counts(alt):
    """Exact counts of every pass: 8 decomposed sites (3 softcapped), 6 sliding + 2 causal,
    5 KV groups with 3 consumers, 4 ring + 1 full rewrites, 3 reads, 6 dead projections removed,
    10 cache entries (8 ring, 2 full)."""
    check_alt(*alt)


def test_alt_sites(alt):
    """Per site, in layer order: window W on local layers only, the ``d^-1/2`` scale folded out of q,
    the softcap where the model has one, GQA heads seen through ``repeat_kv``, roles by the HF rule."""
    model, _, analysis = alt
    cfg = model.cfg
    assert [layer_index(s.layer) for s in analysis.sites] == list(range(len(cfg.kinds)))
    for site in analysis.sites:
        i, local = site.index, cfg.kinds[site.index] == LOCAL
        mixer = model.stack[i].mixer
        assert (site.mask_kind, site.window) == (("sliding", cfg.window) if local else ("causal", 0)), site.describe()
        assert math.isclose(site.scale, mixer.dim ** -0.5, rel_tol=1e-6), site.describe()
        assert site.softcap == (cfg.attn_softcap if i in cfg.softcap_layers else 0.0), site.describe()
        assert meta_val(site.k).shape[1] == mixer.kv_heads and meta_val(site.q).shape[1] == cfg.heads
        producer = cfg.producer_of(i)
        if producer != i:
            assert (site.role, site.reads, site.cache) == ("consumer", producer, "none"), site.describe()
        else:
            role = "owner" if i in cfg.consumers().values() else "independent"
            assert (site.role, site.cache) == (role, "ring" if local else "full"), site.describe()


def test_alt_graph(alt):
    """The rewritten graph: no softmax left; ring ops for local owners and their consumers, a cache
    op for the global owner and a read for its consumer; consumers' K/V weights no longer read."""
    model, program, _ = alt
    cfg = model.cfg
    consumers = cfg.consumers()
    local_consumers = sum(cfg.kinds[c] == LOCAL for c in consumers)
    owners = [i for i in range(len(cfg.kinds)) if i not in consumers]
    local_owners = sum(cfg.kinds[i] == LOCAL for i in owners)
    assert op_counts(program.gm) == {"softmax": 0, "attention": 0,
                                     "attention_ring": local_owners + local_consumers,
                                     "attention_cache": len(owners) - local_owners,
                                     "attention_read": len(consumers) - local_consumers}
    read = weights_read(program.gm)
    for i in range(len(cfg.kinds)):
        kv = {f"stack.{i}.mixer.wk.weight", f"stack.{i}.mixer.wv.weight"}
        assert (kv & read) == (set() if i in consumers else kv), f"layer {i}"


def test_alt_cache_plan(alt):
    """Step inputs ``input_ids, pos, past.{i}.key/value`` for owners only; local owners keep a ring
    of W slots, global owners a full-length cache; every layer's role and the layer it reads."""
    model, program, analysis = alt
    cfg = model.cfg
    owners = [i for i in range(len(cfg.kinds)) if cfg.producer_of(i) == i]
    assert program.inputs == ["input_ids", "pos"] + [f"past.{i}.{n}" for i in owners for n in ("key", "value")]
    for entry in analysis.plan.entries:
        mixer = model.stack[entry.layer].mixer
        if cfg.kinds[entry.layer] == LOCAL:
            assert (entry.kind, entry.window) == ("ring", cfg.window)
            assert entry.shape == ("batch", mixer.kv_heads, cfg.window, mixer.dim)
        else:
            assert entry.kind == "full" and entry.shape == ("batch", mixer.kv_heads, "seq", mixer.dim)
    assert [(r.layer, r.reads) for r in analysis.plan.layers] == [(i, cfg.producer_of(i)) for i in range(len(cfg.kinds))]


def test_alt_parity(alt):
    """Rewritten step graph == eager model, fp32 rel <= 1e-5: prefill 9 (> W), a 3-token chunk,
    then 12 single-token decode steps (24 tokens, 4 windows)."""
    model, program, analysis = alt
    worst = step_parity(model, program, analysis.plan, token_ids(model.cfg.vocab, sum(ALT_CHUNKS)), ALT_CHUNKS)
    assert worst <= 1e-5


# two-layer variants (layer 1 reads layer 0's sliding K/V) with HF idioms that once broke the passes
SMALL = dict(kinds=(LOCAL, LOCAL), first_shared=1, softcap_layers=(1,))


def test_alt_hf_repeat_kv_indexing():
    """With HF's verbatim ``repeat_kv`` the same counts and parity as with ``unsqueeze(2)``."""
    model = alt_gemma.build(AltConfig(hf_indexing=True, **SMALL))
    program, analysis = rewrite(model, model.cfg.vocab)
    check_alt(model, program, analysis)
    step_parity(model, program, analysis.plan, token_ids(model.cfg.vocab, sum(ALT_CHUNKS)), ALT_CHUNKS)


def test_alt_mask_casts():
    """With ``.to(dtype)`` in the mask code the same counts and parity as without."""
    model = alt_gemma.build(AltConfig(mask_casts=True, **SMALL))
    program, analysis = rewrite(model, model.cfg.vocab)
    check_alt(model, program, analysis)
    step_parity(model, program, analysis.plan, token_ids(model.cfg.vocab, sum(ALT_CHUNKS)), ALT_CHUNKS)


# -------------------------------------------------------------------------------------- negatives
NEGATIVES = {
    "causal": NegConfig(mask="causal"),
    "length_gated": NegConfig(mask="length_gated"),
    "twin_kv": NegConfig(mask="causal", twin_kv=True),
    "bidirectional": NegConfig(mask="bidirectional"),
    "chunked": NegConfig(mask="chunked"),
    "padding": NegConfig(mask="padding", vocab=6),  # token 0 hides its key: one token in 6 is padding
    "padding3": NegConfig(mask="padding", vocab=6, pad=3),
    "alibi": NegConfig(mask="alibi"),
    "python_if": NegConfig(mask="python_if"),
    "tied_k": NegConfig(mask="causal", lookalike="tied_k"),
    "other_proj": NegConfig(mask="causal", lookalike="other_proj"),
    "biased_read": NegConfig(mask="causal", lookalike="biased_read"),
}


@pytest.fixture(scope="module")
def negative():
    """``negative(name) -> (model, program, analysis)``, each model captured at most once."""
    captured: dict = {}

    def get(name):
        if name not in captured:
            model = negatives.build(NEGATIVES[name])
            captured[name] = (model, *rewrite(model, model.cfg.vocab))
        return captured[name]
    return get


def neg_parity(model, program, analysis) -> float:
    return step_parity(model, program, analysis.plan, token_ids(model.cfg.vocab, sum(NEG_CHUNKS)), NEG_CHUNKS)


def test_plain_causal_no_window_no_sharing(negative):
    """Plain causal SDPA model: every site causal with no window, independent, full caches, no ring
    entries, one ``attention_cache`` per layer; parity."""
    model, program, analysis = negative("causal")
    n = model.cfg.layers
    assert analysis.counts["discover"]["sdpa"] == n
    assert [(s.mask_kind, s.window, s.role) for s in analysis.sites] == [("causal", 0, "independent")] * n
    assert analysis.counts["kv_sharing"] == {"groups": n, "consumers": 0, "owners": 0}
    assert {e.kind for e in analysis.plan.entries} == {"full"} and len(analysis.plan.entries) == 2 * n
    assert op_counts(program.gm)["attention_cache"] == n
    assert neg_parity(model, program, analysis) <= 1e-5


def test_length_gated_window_is_unknown_and_left_alone(negative):
    """A window that applies only past 64 keys: the premise holds (causal at 64 keys, windowed at
    65), every site is ``unknown`` and left alone (its softmax stays, no effexport op, full caches),
    and the step graph computes the eager results on both sides of the gate."""
    model, program, analysis = negative("length_gated")
    cfg, n = model.cfg, model.cfg.layers
    for s, windowed in ((cfg.gate, False), (cfg.gate + 1, True)):
        k = torch.arange(s)
        vis = negatives.visibility(cfg, k[-3:], k)
        assert torch.equal(vis, k[None] <= k[-3:, None]) != windowed, f"S={s}"
    assert [s.mask_kind for s in analysis.sites] == ["unknown"] * n
    assert analysis.counts["rewrite"]["left_alone"] == n and len(analysis.left_alone) == n
    assert analysis.counts["rewrite"]["ring"] == analysis.counts["rewrite"]["full"] == 0
    assert op_counts(program.gm) == {"softmax": n, "attention": 0, "attention_cache": 0,
                                     "attention_ring": 0, "attention_read": 0}
    assert {e.kind for e in analysis.plan.entries} == {"full"}
    assert neg_parity(model, program, analysis) <= 1e-5


def test_equal_independent_kv_not_shared(negative):
    """Layers with tied K/V weights on the same input hold equal K/V (premise), computed by separate
    projections into separate caches: not grouped, each keeps its own cache; parity."""
    model, program, analysis = negative("twin_kv")
    n = model.cfg.layers
    with torch.no_grad():
        _, present = model(token_ids(model.cfg.vocab, 5))
    assert all(torch.equal(present["0.k"], present[f"{i}.k"]) for i in range(1, n))
    assert len({s.k for s in analysis.sites}) == n
    assert analysis.counts["kv_sharing"] == {"groups": n, "consumers": 0, "owners": 0}
    assert [r.role for r in analysis.plan.layers] == ["independent"] * n
    assert [e.name for e in analysis.plan.entries] == [f"{i}.{t}" for i in range(n) for t in "kv"]
    assert neg_parity(model, program, analysis) <= 1e-5


@pytest.mark.parametrize("name", ["tied_k", "other_proj"])
def test_kv_lookalikes_with_own_cache_not_shared(negative, name):
    """K/V that resemble layer 0's: layer 1 applies layer 0's K projection module to its own input
    (``tied_k``), or its own projections to layer 0's input (``other_proj``). The premise: the same
    weights or the same source, other values. Each layer is independent with its own cache; parity."""
    model, program, analysis = negative(name)
    n = model.cfg.layers
    with torch.no_grad():
        _, present = model(token_ids(model.cfg.vocab, 5))
    first = model.attn[0]
    assert (model.attn[1].k is first.k) == (name == "tied_k") and model.attn[1].v is not first.v
    assert not torch.allclose(present["0.k"], present["1.k"]), "premise: layer 1 holds layer 0's K"
    assert len({s.k for s in analysis.sites}) == n
    assert analysis.counts["kv_sharing"] == {"groups": n, "consumers": 0, "owners": 0}
    assert [(r.role, r.reads) for r in analysis.plan.layers] == [("independent", i) for i in range(n)]
    assert [e.name for e in analysis.plan.entries] == [f"{i}.{t}" for i in range(n) for t in "kv"]
    assert op_counts(program.gm)["attention_cache"] == n
    assert neg_parity(model, program, analysis) <= 1e-5


def test_kv_lookalike_biased_read_not_shared(negative):
    """Layer 1 reads layer 0's whole K/V (its cache too) and adds a bias to K: it reads layer 0's cache
    but is no consumer of it (a consumer reads the owner's K as-is and would drop the bias). Layer 0
    owns the only cache; layer 1 attends over the biased K in the step graph (``plain``), not through
    an ``attention_read`` of layer 0's cache; parity (the premise: the bias changes the logits)."""
    model, program, analysis = negative("biased_read")
    ids = token_ids(model.cfg.vocab, sum(NEG_CHUNKS))
    unbiased = negatives.build(model.cfg)
    unbiased.load_state_dict(model.state_dict())
    with torch.no_grad():
        unbiased.attn[1].k_bias.zero_()
        assert not torch.allclose(model(ids)[0], unbiased(ids)[0]), "premise: the bias changes nothing"
    assert analysis.counts["kv_sharing"] == {"groups": 2, "consumers": 0, "owners": 0}
    assert [(s.role, s.cache) for s in analysis.sites] == [("independent", "full"), ("independent", "plain")]
    assert [e.name for e in analysis.plan.entries] == ["0.k", "0.v"]
    counts = op_counts(program.gm)
    assert (counts["attention_cache"], counts["attention"], counts["attention_read"]) == (1, 1, 0)
    assert neg_parity(model, program, analysis) <= 1e-5


def test_bidirectional_classified_full(negative):
    """No mask at all: every site classified ``full`` (not causal, no window)."""
    _, _, analysis = negative("bidirectional")
    assert [(s.mask_kind, s.window) for s in analysis.sites] == [("full", 0)] * len(analysis.sites)


def test_bidirectional_parity(negative):
    """Bidirectional attention over a cache has no cached effexport form: left alone, same result."""
    model, program, analysis = negative("bidirectional")
    assert analysis.counts["rewrite"]["left_alone"] == len(analysis.sites)
    assert neg_parity(model, program, analysis) <= 1e-5


def test_chunked_rewritten_to_chunk_caches(negative):
    """Chunked attention (blocks of 4): classified ``chunked``, every layer's cache becomes a chunk-local
    cache of 4 slots (the chunked ring op), no softmax left, parity."""
    model, program, analysis = negative("chunked")
    n = model.cfg.layers
    assert [s.mask_kind for s in analysis.sites] == ["chunked"] * n
    assert analysis.counts["rewrite"]["chunk"] == n and analysis.counts["rewrite"]["left_alone"] == 0
    assert op_counts(program.gm)["softmax"] == 0
    assert {(e.kind, e.window, e.shape[2]) for e in analysis.plan.entries} == {("chunk", 4, 4)}
    assert neg_parity(model, program, analysis) <= 1e-5


@pytest.mark.parametrize("name", [
    pytest.param("padding", id="pad-token-0"),
    pytest.param("padding3", id="pad-token-3"),
])
def test_padding_mask_left_alone(negative, name):
    """A mask that reads the token values (padding keys hidden) is no causal or window mask: every
    site ``unknown`` and left alone (softmax kept, full caches) with the reason that the mask reads
    ``input_ids``' values, and the step graph still hides the padding keys (parity over 70 tokens, the
    premise: the padding changes the logits). Pad id 3 was taken for causal while the mask probes fed
    all-zero token ids (``ids != 3`` is all True there); the xfail until the fix."""
    model, program, analysis = negative(name)
    n, ids = model.cfg.layers, token_ids(model.cfg.vocab, sum(NEG_CHUNKS))
    causal = negatives.build(NegConfig(mask="causal", vocab=model.cfg.vocab))
    causal.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model(ids)[0], causal(ids)[0]), "premise: padding changes nothing"
    assert [s.mask_kind for s in analysis.sites] == ["unknown"] * n
    assert all("reads the values of input_ids" in s.reason for s in analysis.sites), analysis.sites[0].reason
    assert analysis.counts["rewrite"]["left_alone"] == n
    assert op_counts(program.gm) == {"softmax": n, "attention": 0, "attention_cache": 0,
                                     "attention_ring": 0, "attention_read": 0}
    assert {e.kind for e in analysis.plan.entries} == {"full"}
    assert neg_parity(model, program, analysis) <= 1e-5


def test_mask_from_sizes_of_ids_still_causal():
    """The other side of the padding rule: a mask that uses ``input_ids`` only for its sizes (HF's
    default ``attention_mask = ones_like(input_ids)``, ``new_ones``) is still classified causal."""
    from effexport.passes.masks import MaskClassifier

    class Mask(torch.nn.Module):
        def forward(self, ids, cache):  # ids [B, T], cache [B, P, d]: [B, T, P + T] causal & all-ones
            t, s = ids.shape[1], cache.shape[1] + ids.shape[1]
            q, k = torch.arange(s - t, s), torch.arange(s)
            keep = torch.cat([ids.new_ones(ids.shape[0], s - t), torch.ones_like(ids)], dim=1).bool()
            return (k[None, :] <= q[:, None])[None] & keep[:, None, :]

    auto = torch.export.Dim.AUTO
    gm = torch.export.export(Mask(), (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 5, 4)),
                             dynamic_shapes=({0: auto, 1: auto}, {0: auto, 1: auto})).module()
    mask = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    kind = MaskClassifier(gm).classify(mask, "visible")
    assert kind.kind == "causal", kind.reason


def test_alibi_bias_not_rewritten(negative):
    """Causal attention plus an ALiBi-style score bias: no effexport attention op replaces it (the
    ops take no bias; rewriting would drop it), softmaxes kept, parity (the premise: the bias changes
    the logits)."""
    model, program, analysis = negative("alibi")
    n, ids = model.cfg.layers, token_ids(model.cfg.vocab, sum(NEG_CHUNKS))
    plain = negatives.build(NegConfig(mask="chunked", chunk=10 ** 6))  # causal, decomposed, no bias
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model(ids)[0], plain(ids)[0]), "premise: the bias changes nothing"
    assert not [s for s in analysis.sites if s.mask_kind in ("causal", "sliding", "full")]
    assert op_counts(program.gm) == {"softmax": n, "attention": 0, "attention_cache": 0,
                                     "attention_ring": 0, "attention_read": 0}
    assert {e.kind for e in analysis.plan.entries} == {"full"}
    assert neg_parity(model, program, analysis) <= 1e-5


@pytest.mark.parametrize("gate, condition", [
    pytest.param(64, "input_ids.shape[1] + past.0.k.shape[2] <= 64", id="gate-past-the-example"),
    pytest.param(7, "input_ids.shape[1] + past.0.k.shape[2] > 7", id="gate-within-the-example"),
])
def test_python_if_window_refused_at_capture(gate, condition):
    """A window that a Python ``if`` switches on past ``gate`` keys: the capture (9 keys) traces one
    branch only -- causal for gate 64, windowed for gate 7 -- and export keeps the condition only as
    a guard on the inputs (for 64 also as the bound keys <= 64). The capture refuses the model, naming
    the condition, instead of building a step graph that is causal past the gate, or windowed before
    it (it built them until the check: the strict xfail until then). Not detected: a gate below 4
    keys (export assumes every dynamic size >= 2, so no guard is recorded)."""
    import dataclasses

    from effexport.exporter.errors import CaptureError

    model = negatives.build(dataclasses.replace(NEGATIVES["python_if"], gate=gate))
    with pytest.raises(CaptureError, match=r"branches on the cache length of 'past\.0\.k'") as err:
        rewrite(model, model.cfg.vocab)
    assert condition in str(err.value)
