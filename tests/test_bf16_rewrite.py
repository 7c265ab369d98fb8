"""Models captured in bf16 are rewritten like their fp32 selves.

The passes prove a sub-graph computes an op by evaluating both on random inputs (numeric probes).
In bf16 every intermediate rounds, so the probes take the dtype's tolerance
(``passes._graph.PROBE_RTOL``) and feed the graph values of the graph's own dtypes; before, DeepSeek
V4's CSA compressors failed their probe in bf16 (a dtype clash, then an fp32-only tolerance) and
CSA / HCA layers were left alone with growing caches. Checked: the same rewrite counts and CachePlan
kinds as fp32, and the rewritten bf16 step against the eager bf16 model over a prefill longer than
every window / compressed block and decode steps (on CPU here; on CUDA with the Triton kernels in the
``gpu`` test)."""
from __future__ import annotations

import pytest
import torch

from _helpers import assert_close

PRESETS = [pytest.param("deepseek-v4-flash:tiny", id="deepseek-v4-flash"), pytest.param("zaya1-8b:tiny", id="zaya1-8b")]
XDIST_SPLIT = ("name",)


def _bf16(name: str, device: str = "cpu"):
    from effexport.exporter.capture import capture_step
    from effexport.passes.pipeline import run_pipeline
    from effexport.samples import get_sample

    sample = get_sample(name)
    model = sample.build().to(device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, sample.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(4)).to(device)
    program, analysis = run_pipeline(capture_step(model, ids[:, :40]))
    return model, ids, program, analysis


def _steps(model, ids, program, plan, device: str, decode: int = 8):
    """(eager logits, rewritten logits) of a 56-token prefill and ``decode`` greedy steps."""
    prefill = ids.shape[1] - decode
    with torch.no_grad():
        ref, past = model(ids[:, :prefill])
        got, *caches = program.gm(ids[:, :prefill], torch.tensor(0, device=device), *plan.empty_caches(2, device))
        pairs = [(ref, got)]
        for i in range(prefill, ids.shape[1]):
            ref, past = model(ids[:, i:i + 1], past)
            got, *caches = program.gm(ids[:, i:i + 1], torch.tensor(i, device=device), *caches)
            pairs.append((ref, got))
    return pairs


@pytest.mark.parametrize("name", PRESETS)
def test_bf16_rewrites_like_fp32(name, rewritten):
    """Same pass counts (nothing more left alone) and cache kinds as the fp32 capture; the rewritten
    bf16 step equals eager bf16 (tolerance 2e-2 relative) over a 56-token prefill + 8 decode steps."""
    fp32 = rewritten(name).analysis
    model, ids, program, analysis = _bf16(name)
    def rewrites(counts: dict) -> dict:  # node totals aside: a bf16 graph carries more casts
        return {k: v for k, v in counts.items() if "nodes" not in k}

    for pass_name in ("cca", "mhc", "compressed", "rewrite"):
        assert rewrites(analysis.counts[pass_name]) == rewrites(fp32.counts[pass_name]), pass_name
    assert [(e.name, e.kind) for e in analysis.plan.entries] == [(e.name, e.kind) for e in fp32.plan.entries]
    assert "bfloat16" in {e.dtype for e in analysis.plan.entries}  # (fp32 states stay fp32)
    for i, (ref, got) in enumerate(_steps(model, ids, program, analysis.plan, "cpu")):
        assert_close(got.float(), ref.float(), torch.bfloat16, what=f"{name} bf16 step {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS)
def test_bf16_rewritten_on_cuda_with_kernels(name):
    """On CUDA, Triton kernels on (prefill kernel for the 56-token chunk, decode kernels after): the
    rewritten bf16 step equals eager bf16 on the GPU within 2e-2."""
    from effexport.custom_ops import enable_triton

    enable_triton()
    model, ids, program, analysis = _bf16(name, "cuda")
    for i, (ref, got) in enumerate(_steps(model, ids, program, analysis.plan, "cuda")):
        assert_close(got.float().cpu(), ref.float().cpu(), torch.bfloat16, what=f"{name} bf16 CUDA step {i}")
