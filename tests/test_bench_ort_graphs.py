"""bench/ort_graphs.py's CPU-side pieces: ``NAME@nL`` cases (a preset cut to its first n layers), the
roofline's weight bytes of MoE models (only the experts a step can use), and the export of a cut
sample through the bench's own export function (the GPU run itself is not tested here)."""
import os
import sys

import onnx
import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import decode_step  # noqa: E402  (bench/, on the path above)
import ort_graphs  # noqa: E402

from effexport.samples import UnknownModelError  # noqa: E402


def test_case_names_with_a_layer_cut():
    sample = ort_graphs.bench_sample("laguna-xs2@8L")
    assert sample.name == "laguna-xs2@8L" and sample.config.num_hidden_layers == 8
    assert ort_graphs.bench_sample("deepseek-v4-flash@4L").config.n_layers == 4
    assert ort_graphs.bench_sample("zaya1-8b").name == "zaya1-8b"
    for bad in ("laguna-xs2@8", "laguna-xs2@0L", "laguna-xs2@L", "laguna-xs2@xL"):
        with pytest.raises(ValueError, match="@nL"):
            ort_graphs.bench_sample(bad)
    with pytest.raises(UnknownModelError):
        ort_graphs.bench_sample("no-such-model@2L")


@pytest.mark.parametrize("name", ["laguna-xs2@3L", "zaya1-8b@2L", "deepseek-v4-flash@4L"])
def test_moe_weight_bytes_count_the_experts_a_step_uses(name):
    """At batch 1 the bytes are the sample's own ``active`` parameters (``param_counts``: total less
    the routed experts a token does not use) in bf16, gathered embeddings aside; at a batch large
    enough every expert counts."""
    model = ort_graphs.bench_sample(name).build("meta", torch.bfloat16)
    experts = ort_graphs.routed_experts(model)
    assert experts and all(k < e for e, k, _ in experts)
    case = {"weight_bytes": decode_step.weight_bytes(model), "experts": experts}
    counts = model.param_counts()
    assert ort_graphs.step_weight_bytes(case, 1) == case["weight_bytes"] - 2 * (counts["total"] - counts["active"])
    e, k, _ = experts[0]
    assert ort_graphs.step_weight_bytes(case, -(-e // k)) == case["weight_bytes"]
    assert ort_graphs.step_weight_bytes(case, 1) < ort_graphs.step_weight_bytes(case, 2) < case["weight_bytes"]


@pytest.mark.slow
def test_cut_sample_exports_through_the_bench(tmp_path, monkeypatch):
    """``--export-sample laguna-xs2:tiny@3L`` (the subprocess ``sample_build`` starts) on the CPU: a
    bf16 ort artifact with one MoE per routed layer of the cut model."""
    monkeypatch.setattr(decode_step, "DEV", "cpu")
    out = str(tmp_path / "cut")
    assert ort_graphs.main(["--export-sample", "laguna-xs2:tiny@3L", out, "256"]) == 0
    model = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    routed = ort_graphs.routed_experts(ort_graphs.bench_sample("laguna-xs2:tiny@3L").build("meta"))
    assert len(routed) == 2  # layer 0 is dense
    assert sum(n.op_type == "MoE" for n in model.graph.node) == len(routed)
