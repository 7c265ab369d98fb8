"""Every tiny preset's rewritten step, captured in a CUDA graph and replayed, gives the uncaptured
step's outputs (marked ``gpu``: skipped without a CUDA device).

The model is built and captured on the GPU (fp32), rewritten with ``cache_layout="buffer"`` so that
every cache has a fixed shape (full caches are ``max_context``-row buffers; rings, compressed
entries and states are fixed anyway), and run with the Triton kernels. What made this fail before
the ``constants`` pass: Laguna, ZAYA1 and DeepSeek V4 copied host RoPE tables to the GPU inside the
step, which a capturing stream refuses.

Per preset: a prefill (uncaptured) fills the caches; then ``DECODE`` greedy one-token steps run
twice from the same caches -- uncaptured, and replayed from one CUDA graph captured on static
``input_ids`` / ``pos`` / cache tensors (warm-up on a side stream, then ``torch.cuda.graph``; after
each replay the presents are copied into the static caches, as a runtime does). The logits and every
present of each step must agree within fp32's parity bound (1e-5 of the largest magnitude; the same
kernels on the same inputs, so equal bits are expected and the number of bit-equal steps is printed).
"""
from __future__ import annotations

import pytest
import torch

from _helpers import assert_close

TINY = ["gemma4-e2b:tiny", "gemma4-e4b:tiny", "gemma4-odd:tiny", "laguna-xs2:tiny", "zaya1-8b:tiny",
        "deepseek-v4-flash:tiny", "deepseek-v4-pro:tiny"]
XDIST_SPLIT = ("preset",)
PREFILL, DECODE, BATCH, MAX_CONTEXT = 40, 6, 2, 128


def _rewritten_on_cuda(preset: str):
    from effexport.custom_ops import enable_triton
    from effexport.exporter.capture import capture_step
    from effexport.passes.constants import constant_conversions
    from effexport.passes.pipeline import run_pipeline
    from effexport.samples import get_sample

    enable_triton()
    sample = get_sample(preset)
    model = sample.build(device="cuda")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, sample.config.vocab_size, (BATCH, PREFILL + DECODE + 1), generator=gen).cuda()
    captured = capture_step(model, ids[:, :40])
    program, analysis = run_pipeline(captured, max_context=MAX_CONTEXT, cache_layout="buffer")
    assert constant_conversions(program.gm.graph) == [], "a constant is still converted at every step"
    assert all(e.kind != "full" for e in analysis.plan.entries), "a growing cache cannot be replayed"
    return program.gm, analysis.plan, ids


@pytest.mark.gpu
@pytest.mark.parametrize("preset", TINY)
def test_cuda_graph_replay_equals_uncaptured_step(preset):
    step, plan, ids = _rewritten_on_cuda(preset)
    dev = torch.device("cuda")
    with torch.no_grad():
        out = step(ids[:, :PREFILL], torch.tensor(0, device=dev), *plan.empty_caches(BATCH, dev))
        prefill_caches = [c.clone() for c in out[1:]]
        first = out[0][:, -1:].argmax(-1)

        # uncaptured reference: greedy decode from the prefill caches
        ref_logits, ref_presents, tokens = [], [], [first]
        caches = [c.clone() for c in prefill_caches]
        for t in range(DECODE):
            o = step(tokens[-1], torch.tensor(PREFILL + t, device=dev), *caches)
            caches = list(o[1:])
            ref_logits.append(o[0].clone())
            ref_presents.append([c.clone() for c in caches])
            tokens.append(o[0][:, -1:].argmax(-1))

        # static inputs, warm-up on a side stream, capture
        static_ids = first.clone()
        static_pos = torch.tensor(PREFILL, device=dev)
        static_caches = [c.clone() for c in prefill_caches]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(static_ids, static_pos, *static_caches)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step(static_ids, static_pos, *static_caches)
        for c, p in zip(static_caches, prefill_caches):  # capture does not run kernels; be sure anyway
            c.copy_(p)

        equal = 0
        for t in range(DECODE):
            static_ids.copy_(tokens[t])
            static_pos.fill_(PREFILL + t)
            graph.replay()
            logits = static_out[0].clone()
            presents = [p.clone() for p in static_out[1:]]
            for c, p in zip(static_caches, static_out[1:]):
                if c.data_ptr() != p.data_ptr():
                    c.copy_(p)
            torch.cuda.synchronize()
            assert_close(logits, ref_logits[t], what=f"{preset} decode step {t} logits (replayed)")
            for i, (p, r) in enumerate(zip(presents, ref_presents[t])):
                if r.dtype.is_floating_point:
                    assert_close(p, r, what=f"{preset} decode step {t} present {i} (replayed)")
                else:
                    assert torch.equal(p, r), f"{preset} decode step {t} present {i} (replayed)"
            equal += torch.equal(logits, ref_logits[t])
    print(f"{preset}: {equal}/{DECODE} replayed decode steps bit-equal to the uncaptured step")
