"""Real-size presets captured and rewritten on the meta device (no weights): the same counts logic
as the tiny presets, at the published configurations. Marked slow (a minute or two each on a
2-core CPU); the time of each is printed (``pytest -s``), not asserted."""
import time

import pytest
import torch

from effexport.exporter.capture import capture_step
from effexport.passes.pipeline import run_pipeline
from effexport.samples import get_sample

pytestmark = pytest.mark.slow
ATTENTION = [pytest.param(n, id=n) for n in ("gemma4-e2b", "gemma4-e4b", "laguna-xs2", "zaya1-8b")]


def _rewrite(name: str, length: int):
    sample = get_sample(name)
    model = sample.build("meta")
    ids = torch.zeros(2, length, dtype=torch.long, device="meta")
    start = time.monotonic()
    program, analysis = run_pipeline(capture_step(model, ids), max_context=1 << 20)
    print(f"{name}: capture + rewrite on meta in {time.monotonic() - start:.0f}s")
    return sample, program, analysis


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_models_on_meta(name):
    sample, program, analysis = _rewrite(name, 14)
    specs = sample.config.layer_specs()
    c = analysis.counts
    assert c["discover"]["sites"] == len(specs)
    assert c["classify_masks"]["sliding"] == sum(l.type == "sliding" for l in specs)
    assert {s.window for s in analysis.sites if s.mask_kind == "sliding"} == \
        {l.window for l in specs if l.type == "sliding"}
    assert c["kv_sharing"]["consumers"] == sum(l.role == "consumer" for l in specs)
    assert c["rewrite"]["ring"] == sum(l.type == "sliding" and l.role != "consumer" for l in specs)
    assert c["rewrite"]["full"] == sum(l.type != "sliding" and l.role != "consumer" for l in specs)
    assert c["rewrite"]["left_alone"] == 0
    assert c["cca"]["cca"] == sum(l.type == "cca" for l in specs)
    owned = {(l.index, t.name) for l in specs for t in l.cache}
    assert {(e.layer, e.name.split(".", 1)[1]) for e in analysis.plan.entries} == owned


def test_deepseek_v4_flash_on_meta():
    sample, program, analysis = _rewrite("deepseek-v4-flash", 2 * 128 + 14)  # two HCA blocks in the prompt
    cfg, c = sample.config, analysis.counts
    ratios = list(cfg.compress_ratios)
    assert c["mhc"]["mhc_pre"] == c["mhc"]["mhc_post"] == 2 * cfg.n_layers and c["mhc"]["left_alone"] == 0
    assert {k: c["compressed"][k] for k in ("csa", "hca", "window_only", "left_alone")} == \
        {"csa": ratios.count(4), "hca": ratios.count(128), "window_only": ratios.count(0), "left_alone": 0}
    rings = [e for e in analysis.plan.entries if e.kind == "ring"]
    assert len(rings) == cfg.n_layers and all(e.window == 128 for e in rings)
    assert not [e for e in analysis.plan.entries if e.kind == "full"]
