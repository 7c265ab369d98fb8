"""Real-size presets captured and rewritten on the meta device (no weights): the same counts logic
as the tiny presets, at the published configurations. Marked slow (minutes on a 2-core CPU)."""
import time

import pytest
import torch

from effexport.exporter.capture import capture_step
from effexport.passes.pipeline import run_pipeline
from effexport.samples import get_sample

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", [pytest.param("gemma4-e2b", id="gemma4-e2b"),
                                  pytest.param("laguna-xs2", id="laguna-xs2")])
def test_real_size_capture_and_rewrite_on_meta(name):
    sample = get_sample(name)
    model = sample.build("meta")
    ids = torch.zeros(2, 14, dtype=torch.long, device="meta")
    start = time.monotonic()
    program, analysis = run_pipeline(capture_step(model, ids))
    seconds = time.monotonic() - start
    specs = sample.config.layer_specs()
    c = analysis.counts
    assert c["discover"]["sites"] == len(specs)
    assert c["classify_masks"]["sliding"] == sum(l.type == "sliding" for l in specs)
    assert {s.window for s in analysis.sites if s.mask_kind == "sliding"} == {512}
    assert c["kv_sharing"]["consumers"] == sum(l.role == "consumer" for l in specs)
    assert c["rewrite"]["ring"] == sum(l.type == "sliding" and l.role != "consumer" for l in specs)
    assert c["rewrite"]["full"] == sum(l.type == "full" and l.role != "consumer" for l in specs)
    assert c["rewrite"]["left_alone"] == 0
    ring = [e for e in analysis.plan.entries if e.kind == "ring"]
    assert ring and all(e.shape[2] == 512 for e in ring)
    print(f"{name}: capture + rewrite on meta in {seconds:.0f}s")
