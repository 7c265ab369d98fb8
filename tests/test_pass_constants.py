"""The ``constants`` pass (passes/constants.py): conversions of constant data -- a host fp64 RoPE table
``.to(device, float32)``, a norm weight ``.float()`` -- are computed once into buffers instead of at
every step.

* every tiny preset (fp32) and two Hugging Face families: the captured graph has such conversions
  (so the check below can fail), the rewritten one has none, and the rewritten step's outputs are
  bit-identical to the same pipeline without the pass over a prefill and decode steps;
* bf16 (where ``.float()`` of a norm weight really converts): folded into fp32 buffers, outputs
  bit-identical;
* a hand-written module: host fp64 table moved per step, a position-dependent table (not constant,
  stays), equal tables sharing one buffer, the size limit, the meta device left alone.

On a GPU the same pass is what lets the step be captured in a CUDA graph:
``tests/test_gpu_cuda_graph.py`` (marked ``gpu``).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from effexport.exporter.capture import capture_step
from effexport.passes import constants as C
from effexport.passes._graph import dead_code_elimination
from effexport.passes.constants import constant_conversions, fold_constant_conversions
from effexport.passes.pipeline import run_pipeline
from effexport.samples import get_sample

TINY = ["gemma4-e2b:tiny", "gemma4-e4b:tiny", "gemma4-odd:tiny", "laguna-xs2:tiny", "zaya1-8b:tiny",
        "deepseek-v4-flash:tiny", "deepseek-v4-pro:tiny"]
HOST_TABLES = {"laguna-xs2:tiny", "deepseek-v4-flash:tiny", "deepseek-v4-pro:tiny"}  # fp64 tables on the host
XDIST_SPLIT = ("preset",)


def unfolded(captured, **kw):
    """The pipeline's program just before the ``constants`` pass (same graph otherwise)."""
    snap = []
    prog, analysis = run_pipeline(captured, dump_after="buffers",
                                  dump=lambda _, gm: snap.append(fx.GraphModule(gm, copy.deepcopy(gm.graph))), **kw)
    return snap[0], prog, analysis


def run_steps(step, plan, ids, prefill: int, decode: int) -> list[torch.Tensor]:
    """Prefill ``ids[:, :prefill]`` then ``decode`` one-token steps; every output of every step."""
    caches, outs = plan.empty_caches(ids.shape[0]), []
    with torch.no_grad():
        out = step(ids[:, :prefill], torch.tensor(0), *caches)
        outs += list(out)
        for t in range(prefill, prefill + decode):
            out = step(ids[:, t:t + 1], torch.tensor(t), *out[1:])
            outs += list(out)
    return outs


def assert_identical(a: list, b: list) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f"output {i} differs"


def check_folded(captured, model_ids, folded_expected: bool, **kw):
    """Shared body: conversions in the capture, none after the pass, outputs bit-identical."""
    before = constant_conversions(captured.gm.graph)
    assert before, "the captured graph converts no constant: this check could not fail"
    pre, prog, analysis = unfolded(captured, **kw)
    assert constant_conversions(pre.graph), "nothing left for the constants pass to do"
    assert constant_conversions(prog.gm.graph) == []
    counts = analysis.counts["constants"]
    assert counts["meta"] == 0 and counts["large"] == 0
    assert (counts["folded"] > 0) == folded_expected, counts
    buffers = dict(prog.gm.named_buffers())
    folded = [n for n in prog.gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("folded_")]
    assert len({n.target for n in folded}) == counts["buffers"]
    assert all(str(n.target) in buffers for n in folded)  # buffers: they move with gm.to(device)
    ids, prefill = model_ids
    assert_identical(run_steps(prog.gm, analysis.plan, ids, prefill, 3), run_steps(pre, analysis.plan, ids, prefill, 3))
    return counts


@pytest.mark.parametrize("preset", TINY)
def test_tiny_presets_convert_no_constant_per_step(preset, rewritten):
    r = rewritten(preset)
    counts = check_folded(r.captured, (r.ids, 30), preset in HOST_TABLES)
    if preset in HOST_TABLES:  # the fp64 host tables became fp32 buffers, equal ones shared
        assert counts["buffers"] <= counts["folded"]


@pytest.mark.parametrize("preset", ["gemma4-e2b:tiny", "laguna-xs2:tiny"])
def test_bf16_norm_weights_become_fp32_buffers(preset):
    sample = get_sample(preset)
    model = sample.build(dtype=torch.bfloat16)
    ids = torch.randint(0, sample.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    captured = capture_step(model, ids)
    counts = check_folded(captured, (ids, 30), True)
    assert counts["folded"] >= sample.config.num_hidden_layers  # at least one norm weight per layer


@pytest.mark.parametrize("family", ["llama", "gemma4"])
def test_hf_families_convert_no_constant_per_step(family):
    import transformers  # noqa: F401  (a test dependency)

    from models import hf_tiny

    from effexport.exporter.frontends.hf import HFStep
    if not hf_tiny.available(family):
        pytest.skip(f"transformers has no {family}")
    step = HFStep(hf_tiny.build(family))
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    check_folded(capture_step(step, ids), (ids, 20), False)


# ----------------------------------------------------------------------------- a hand-written module
class Tables(nn.Module):
    """A host fp64 frequency table moved to the input's device every call (twice, equal values), a
    position-dependent table built from it, and an fp64 weight cast to fp32."""

    def __init__(self):
        super().__init__()
        self.inv_freq = 1.0 / 1e4 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # plain attribute
        self.inv_freq_2 = self.inv_freq.clone()
        self.weight = nn.Parameter(torch.randn(4, dtype=torch.float64), requires_grad=False)

    def forward(self, x, pos):
        positions = (pos + torch.arange(x.shape[1])).to(torch.float32)  # depends on an input
        freqs = positions[:, None] * self.inv_freq.to(x.device, torch.float32)
        freqs2 = positions[:, None] * self.inv_freq_2.to(x.device, torch.float32)
        return x * freqs.cos() + x * freqs2.sin() + self.weight.to(torch.float32)


def _tables_gm(module: Tables):
    x, pos = torch.randn(2, 5, 4), torch.tensor(3)
    gm = torch.export.export(module, (x, pos), strict=False).module()
    return fx.GraphModule(gm, gm.graph), (x, pos)


def test_host_tables_fold_and_positions_stay():
    module = Tables()
    gm, args = _tables_gm(module)
    assert len(constant_conversions(gm.graph)) == 3
    counts = fold_constant_conversions(gm)
    dead_code_elimination(gm)  # export's _assert_tensor_metadata checks too
    gm.recompile()
    assert counts == {"folded": 3, "buffers": 2, "noop": 0, "meta": 0, "large": 0, "host_to_device": 0}
    assert constant_conversions(gm.graph) == []
    names = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert names == {"folded_inv_freq_float32", "folded_weight_float32"}  # equal tables: one buffer
    assert dict(gm.named_buffers())["folded_inv_freq_float32"].dtype == torch.float32
    # the position-dependent products stay in the graph: the module's numbers at other positions too
    for p in (3, 11, 1000):
        x = torch.randn(2, 5, 4)
        assert torch.equal(gm(x, torch.tensor(p)), module(x, torch.tensor(p)))


def test_large_dtype_conversions_are_kept(monkeypatch):
    monkeypatch.setattr(C, "MAX_DTYPE_FOLD_BYTES", 8)  # the 16-byte tables are "large" now
    gm, _ = _tables_gm(Tables())
    counts = fold_constant_conversions(gm)
    assert counts["large"] == 3 and counts["folded"] == 0
    assert len(constant_conversions(gm.graph)) == 3


def test_meta_values_are_left_alone():
    """A structure-only build (weights on meta) has no values to fold: the conversion stays."""
    gm, _ = _tables_gm(Tables())
    gm.weight = nn.Parameter(torch.empty(4, dtype=torch.float64, device="meta"), requires_grad=False)
    counts = fold_constant_conversions(gm)
    assert counts["meta"] == 1 and counts["folded"] == 2
    assert len(constant_conversions(gm.graph)) == 1
