"""The torch engine's in-place buffer caches (``exporter/backends/torch/inplace.py``): each
``effexport::attention_buffer`` over two cache inputs runs as ``attention_buffer_inplace`` on them,
and the step's presents of those caches are the inputs, which a captured decode step then does not
copy back.

On the CPU: the rewritten engine against the functional one (``inplace=False``) over a prefill and
decode steps, exactly (fp32, the same eager ops), with and without KV sharing (gemma4-e2b:tiny: a
full owner read by a KV-sharing consumer; laguna-xs2:tiny: two full owners, no sharing); the caches
written in place; the copy-back decision; what the rewrite leaves alone; Inductor re-inplacing the op
onto the graph inputs. On a GPU (``gpu``): Inductor + CUDA graphs with in-place buffers against the
uncompiled functional engine, fp32 and bf16.
"""
import operator

import pytest
import torch
from torch import fx

from _helpers import assert_close
from effexport.exporter.backends.torch import TorchEngine
from effexport.exporter.backends.torch.engine import copy_backs
from effexport.exporter.backends.torch.inplace import aliased_caches, inplace_buffers

ops = torch.ops.effexport
MAX_CONTEXT, PROMPT, DECODE = 64, 20, 6
_PROGRAMS: dict = {}


def _program(name: str, dtype=torch.float32, device="cpu"):
    """(model, ids, program, plan) of ``name`` rewritten with ``--kv-cache buffer`` (cached)."""
    key = (name, dtype, device)
    if key not in _PROGRAMS:
        from effexport.exporter.capture import capture_step
        from effexport.passes.pipeline import run_pipeline
        from effexport.samples import get_sample

        sample = get_sample(name)
        model = sample.build(device=device).to(dtype)
        ids = torch.randint(0, sample.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
        ids = ids.to(device)
        program, analysis = run_pipeline(capture_step(model, ids), max_context=MAX_CONTEXT, cache_layout="buffer")
        _PROGRAMS[key] = (model, ids, program, analysis.plan)
    return _PROGRAMS[key]


def _count(gm, op) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is op)


@pytest.mark.parametrize("name,owners", [("gemma4-e2b:tiny", 1), ("laguna-xs2:tiny", 2)])
def test_inplace_engine_equals_the_functional_engine(name, owners):
    """Prefill (T = 20) then decode steps: logits and every cache equal to the functional engine's
    (exact: the same eager ops); each buffer cache is the tensor passed in (same data_ptr), with the
    step's rows written and the rows past them untouched; the copy-back decision leaves out every
    buffer and only them; the caller's graph keeps its functional op."""
    _, ids, program, plan = _program(name)
    buffers = tuple(e.name for e in plan.entries if e.kind == "buffer")
    assert len(buffers) == 2 * owners
    functional = TorchEngine(program.gm, plan.entries, "cpu", inplace=False)
    engine = TorchEngine(program.gm, plan.entries, "cpu")
    assert functional.inplace == () and engine.inplace == buffers
    assert _count(engine.module, ops.attention_buffer_inplace.default) == owners
    assert _count(engine.module, ops.attention_buffer.default) == 0
    assert _count(program.gm, ops.attention_buffer.default) == owners  # the caller's graph as it was
    assert _count(program.gm, ops.attention_buffer_inplace.default) == 0
    index = [i for i, e in enumerate(plan.entries) if e.kind == "buffer"]
    others = tuple(i for i in range(len(plan.entries)) if i not in index)

    ca, cb = functional.initial_caches(2), engine.initial_caches(2)
    steps = [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, PROMPT + DECODE)]
    with torch.no_grad():
        for start, stop in steps:
            before = [cb[i].clone() for i in index]
            ptrs = [cb[i].data_ptr() for i in index]
            a, na = functional.step(ids[:, start:stop], start, ca)
            b, nb = engine.step(ids[:, start:stop], start, cb)
            assert torch.equal(b, a), f"logits at {start}..{stop - 1}"
            for i, (x, y) in enumerate(zip(nb, na)):
                assert torch.equal(x, y), f"cache {plan.entries[i].name} after {start}..{stop - 1}"
            assert copy_backs(ca, na) == tuple(range(len(plan.entries)))  # functional: every present
            assert copy_backs(cb, nb) == others  # in place: none of the buffers
            for j, i in enumerate(index):
                assert nb[i] is cb[i] and nb[i].data_ptr() == ptrs[j]
                written = nb[i][:, :, start:stop]
                assert not torch.equal(written, before[j][:, :, start:stop]), "no row written"
                assert torch.equal(nb[i][:, :, :start], before[j][:, :, :start])
                assert torch.equal(nb[i][:, :, stop:], before[j][:, :, stop:])
            ca, cb = na, nb


def test_kv_sharing_consumer_reads_the_written_buffer_after_the_op():
    """gemma4-e2b:tiny: the KV-sharing consumer's ``attention_read`` now reads the owner's cache
    inputs, and comes after the in-place op in the graph (the order every backend keeps)."""
    _, _, program, plan = _program("gemma4-e2b:tiny")
    gm = TorchEngine(program.gm, plan.entries, "cpu").module
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    (op,) = [n for n in gm.graph.nodes if n.target is ops.attention_buffer_inplace.default]
    (read,) = [n for n in gm.graph.nodes if n.target is ops.attention_read.default]
    assert read.args[1] is op.args[3] and read.args[2] is op.args[4]
    assert op.args[3].op == "placeholder" and order[read] > order[op]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    caches = [n for n in gm.graph.nodes if n.op == "placeholder"][2:]
    buffers = tuple(i for i, e in enumerate(plan.entries) if e.kind == "buffer")
    assert aliased_caches(gm) == buffers and buffers
    assert all(output.args[0][1 + i] is caches[i] for i in buffers)
    assert caches.index(op.args[3]) in buffers and caches.index(op.args[4]) in buffers


def _toy(extra_reader: bool = False, scaled_present: bool = False) -> fx.GraphModule:
    """``step(ids, pos, k, v) -> (logits, k', v')``: one functional buffer op and a reader of its
    present (a KV-sharing consumer); optionally another reader of the cache input, or a present that
    is not the op's returned buffer."""
    graph = fx.Graph()
    ids, pos, k, v = (graph.placeholder(n) for n in ("ids", "pos", "k", "v"))
    q = graph.call_function(torch.ops.aten.mul.Tensor, (ids, 1.0))
    kn = graph.call_function(torch.ops.aten.mul.Tensor, (ids, 0.5))
    node = graph.call_function(ops.attention_buffer.default, (q, kn, kn, k, v, pos), {"scale": 0.3})
    out, k2, v2 = (graph.call_function(operator.getitem, (node, i)) for i in range(3))
    read = graph.call_function(ops.attention_read.default, (q, k2, v2, pos), {"scale": 0.3})
    logits = graph.call_function(torch.ops.aten.add.Tensor, (out, read))
    if extra_reader:
        logits = graph.call_function(torch.ops.aten.add.Tensor, (logits, graph.call_function(
            torch.ops.aten.sum.default, (k,))))
    if scaled_present:
        k2 = graph.call_function(torch.ops.aten.mul.Tensor, (k2, 1.0))
    graph.output((logits, k2, v2))
    return fx.GraphModule(torch.nn.Module(), graph)


def _toy_inputs(pos: int = 5):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, 2, 1, 8, generator=gen), torch.tensor(pos),
            torch.randn(1, 2, 32, 8, generator=gen), torch.randn(1, 2, 32, 8, generator=gen))


@pytest.mark.parametrize("extra_reader,scaled_present", [(True, False), (False, True)])
def test_rewrite_leaves_other_readers_and_other_presents_alone(extra_reader, scaled_present):
    """A cache input read by more than the op (its old rows would change under that reader), or a
    present that is not the op's returned buffer, keeps the functional op; the plain case is rewritten."""
    gm = _toy(extra_reader, scaled_present)
    assert inplace_buffers(gm) == () and aliased_caches(gm) == ()
    assert _count(gm, ops.attention_buffer.default) == 1
    plain = _toy()
    want = plain(*_toy_inputs())
    assert inplace_buffers(plain) == (0, 1) == aliased_caches(plain)
    args = _toy_inputs()
    got = plain(*args)
    assert got[1] is args[2] and got[2] is args[3]
    assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_inductor_updates_the_graph_inputs_without_copying_them():
    """Inductor (CPU) on the rewritten toy step: the op is re-inplaced onto the cache inputs -- no
    clone or ``copy_`` of a buffer in the generated code -- the returned presents are the inputs, and
    the result equals the functional step's."""
    from torch._inductor.utils import run_and_get_code

    want = _toy()(*_toy_inputs())
    gm = _toy()
    inplace_buffers(gm)
    args = _toy_inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        got, (code, *_) = run_and_get_code(torch.compile(gm), *args)
    torch._dynamo.reset()
    assert "attention_buffer_inplace" in code
    assert ".copy_(" not in code and "clone" not in code, code
    assert got[1] is args[2] and got[2] is args[3]
    assert_close(got[0], want[0], rtol=1e-6, what="Inductor in-place toy step")
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_compiled_graph_inplace_equals_uncompiled_functional(dtype, rtol):
    """gemma4-e2b:tiny on the GPU: Inductor + CUDA-graph decode with in-place buffers against the same
    compiled engine with functional buffers over a prefill and decode steps at increasing positions:
    logits within ``rtol`` (fp32 1e-4: the Triton kernels' tf32x3 dots; bf16 2e-2); the captured step
    copies back no buffer, whose static tensors keep their memory across steps. The reference is
    compiled too: compiled bf16 against uncompiled bf16 differs by rounding order alone (H100: 4.3e-2
    on this model's prefill; ``test_torch_engine`` bounds that against fp32 eager)."""
    _, ids, program, plan = _program("gemma4-e2b:tiny", dtype, "cuda")
    plain = TorchEngine(program.gm, plan.entries, "cuda", compile=True, cuda_graphs=True, inplace=False)
    fast = TorchEngine(program.gm, plan.entries, "cuda", compile=True, cuda_graphs=True)
    assert fast.compiled and fast.cuda_graphs and fast.inplace == ("4.k", "4.v"), fast.graph_reason
    index = [i for i, e in enumerate(plan.entries) if e.kind == "buffer"]
    with torch.no_grad():
        a, ca = plain.step(ids[:, :PROMPT], 0, plain.initial_caches(2))
        b, cb = fast.step(ids[:, :PROMPT], 0, fast.initial_caches(2))
        assert_close(b.float(), a.float(), rtol=rtol, what="prefill logits")
        ptrs = None
        for t in range(PROMPT, PROMPT + 3 * DECODE):
            a, ca = plain.step(ids[:, t % 40:t % 40 + 1], t, ca)
            b, cb = fast.step(ids[:, t % 40:t % 40 + 1], t, cb)
            assert_close(b.float(), a.float(), rtol=rtol, what=f"decode logits at {t}")
            ptrs = ptrs or [cb[i].data_ptr() for i in index]
            assert [cb[i].data_ptr() for i in index] == ptrs
        for i in index:
            assert_close(cb[i][:, :, :t + 1].float(), ca[i][:, :, :t + 1].float(), rtol=rtol,
                         what=f"cache {plan.entries[i].name}")
    graph = fast.graphs[2]
    assert not set(graph.copied) & set(index) and set(graph.copied) == set(range(len(plan.entries))) - set(index)


def test_functionalised_step_keeps_the_consumer_after_the_write():
    """gemma4-e2b:tiny's rewritten step through ``torch.compile(backend="aot_eager")`` (Dynamo, then
    AOTAutograd's functionalisation of the mutated cache inputs -- what Inductor starts from -- run by
    eager kernels): a prefill and two decode steps equal the functional engine's (1e-6), the KV-sharing
    consumer reading the rows the step wrote, and the buffer presents are the cache inputs, written."""
    _, ids, program, plan = _program("gemma4-e2b:tiny")
    functional = TorchEngine(program.gm, plan.entries, "cpu", inplace=False)
    engine = TorchEngine(program.gm, plan.entries, "cpu")
    index = [i for i, e in enumerate(plan.entries) if e.kind == "buffer"]
    torch._dynamo.reset()
    fn = torch.compile(engine.module, backend="aot_eager", dynamic=False)
    ca, cb = functional.initial_caches(2), engine.initial_caches(2)
    try:
        with torch.no_grad():
            for start, stop in [(0, PROMPT), (PROMPT, PROMPT + 1), (PROMPT + 1, PROMPT + 2)]:
                a, ca = functional.step(ids[:, start:stop], start, ca)
                b, *nb = fn(ids[:, start:stop], torch.tensor(start), *cb)
                assert_close(b, a, rtol=1e-6, what=f"logits at {start}..{stop - 1} (aot_eager)")
                assert all(nb[i] is cb[i] and torch.equal(cb[i], ca[i]) for i in index)
                cb = nb
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["gemma4-e2b:tiny", "laguna-xs2:tiny"])
def test_packed_projections_equal_the_unpacked_engine(name):
    """The engine's packed projections (``exporter/backends/torch/packing.py``, on by default): every
    group of ``linear`` calls over one input with their own constant weights is one ``linear`` over the
    concatenated weights (the caller's graph and weights untouched), and the step's logits and caches
    equal the unpacked engine's within fp32's 1e-5 over a prefill and decode steps."""
    from effexport.exporter.backends.torch.packing import LINEAR, _groups
    from effexport.passes._graph import attr as _attr

    _, ids, program, plan = _program(name)
    before = _count(program.gm, LINEAR)
    plain = TorchEngine(program.gm, plan.entries, "cpu", pack=False)
    engine = TorchEngine(program.gm, plan.entries, "cpu")
    assert plain.packed == 0 and _count(plain.module, LINEAR) == before
    assert engine.packed > 0 and _count(engine.module, LINEAR) == before - engine.packed
    assert _groups(engine.module) == [] and len(_groups(program.gm)) > 0  # nothing left; the caller's as it was
    assert _count(program.gm, LINEAR) == before
    # layer 0's q / k / v (Laguna: and its gate g): one packed weight, the originals' rows in order; the originals gone from the
    # engine's module, kept in the caller's
    qkv = [f"layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    packed = [n for n in engine.module.graph.nodes if n.op == "call_function" and n.target is LINEAR
              and n.args[1].op == "get_attr" and n.args[1].target.startswith("_packed_projection_")]
    weights = [_attr(engine.module, n.args[1].target) for n in packed]
    expected = torch.cat([_attr(program.gm, t) for t in qkv], 0)
    assert any(w.shape[0] >= len(expected) and torch.equal(w[:len(expected)], expected) for w in weights)
    for t in qkv:
        with pytest.raises(AttributeError):
            _attr(engine.module, t)

    ca, cb = plain.initial_caches(2), engine.initial_caches(2)
    steps = [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, PROMPT + DECODE)]
    with torch.no_grad():
        for start, stop in steps:
            a, ca = plain.step(ids[:, start:stop], start, ca)
            b, cb = engine.step(ids[:, start:stop], start, cb)
            assert_close(b, a, what=f"logits at {start}..{stop - 1} (packed vs unpacked)")
            for x, y, e in zip(cb, ca, plan.entries):
                assert_close(x, y, what=f"cache {e.name} after {start}..{stop - 1}")


def test_packing_leaves_shared_biased_and_lone_weights():
    """Only ``linear`` calls without bias whose weight nothing else reads are packed, per input: a
    weight read twice (tied), a biased projection and a projection of another input stay."""
    from effexport.exporter.backends.torch.packing import LINEAR, pack_projections

    root = torch.nn.Module()
    for name, shape in (("a", (6, 4)), ("b", (3, 4)), ("c", (5, 4)), ("tied", (2, 4)), ("biased", (2, 4)),
                        ("bias", (2,)), ("other", (4, 4))):
        root.register_buffer(name, torch.randn(shape, generator=torch.Generator().manual_seed(len(name))))
    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    lin, attr = torch.ops.aten.linear.default, graph.get_attr
    outs = [graph.call_function(lin, (x, attr(n))) for n in ("a", "b", "c", "tied")]
    outs.append(graph.call_function(torch.ops.aten.sum.default, (attr("tied"),)))  # a second reader
    outs.append(graph.call_function(lin, (x, attr("biased"), attr("bias"))))
    outs.append(graph.call_function(lin, (y, attr("other"))))
    graph.output(tuple(outs))
    gm = fx.GraphModule(root, graph)
    x, y = torch.randn(2, 3, 4), torch.randn(2, 4)
    want = gm(x, y)
    assert pack_projections(gm) == 2  # a, b, c -> one; the rest stay
    assert _count(gm, LINEAR) == 4 and not any(hasattr(gm, n) for n in "abc") and hasattr(gm, "tied")
    for got, ref in zip(gm(x, y), want):
        assert_close(got, ref, what="packed module output")
    assert pack_projections(gm) == 0


def test_tuned_compile_passes_the_inductor_options(monkeypatch):
    """``tune=True`` compiles the engine's module with :data:`~.engine.TUNED` (Inductor's
    coordinate-descent tuning), ``tune=False`` with torch.compile's defaults; tuning without compiling is
    refused (it tunes Inductor's kernels)."""
    from effexport.exporter.backends.torch import engine as engine_mod

    calls = []

    def fake_compile(fn, **kw):
        calls.append(kw)
        return fn

    monkeypatch.setattr(engine_mod.torch, "compile", fake_compile)
    _, _, program, plan = _program("gemma4-e2b:tiny")
    tuned = TorchEngine(program.gm, plan.entries, "cpu", compile=True, tune=True)
    plain = TorchEngine(program.gm, plan.entries, "cpu", compile=True)
    assert calls == [{"options": {"coordinate_descent_tuning": True}}, {}]
    assert tuned.tuned and not plain.tuned and engine_mod.TUNED == {"coordinate_descent_tuning": True}
    with pytest.raises(ValueError, match="needs compile=True"):
        TorchEngine(program.gm, plan.entries, "cpu", compile=False, tune=True)
    assert len(calls) == 2
