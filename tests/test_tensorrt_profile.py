"""The ``tensorrt`` ONNX profile on a whole tiny model: lint clean (op types in the TensorRT 10
parser's support matrix, restrictions, dtypes, opset 18 / IR 10, unique function names, strict
shape inference) and ONNX Runtime CPU parity against eager through ``effexport.runtime`` and
``exporter/verify/parity.py`` (fp32, max rel error <= 1e-4 over a 37-token prefill, the
capture's prompt length, and 12 greedy decode steps, tokens drawn apart from the capture's example ids).

CI budget: one preset, ZAYA1 (CCA as a function-bodied node plus full-cache attention; its
export is the cheapest, ~45 s here). The other op families are linted and checked against eager
at op level in tests/test_tensorrt.py (one export); with ``tensorrt`` in ``ORT_PROFILES``,
tests/test_onnx_export.py runs the profile's ORT parity for every tiny preset. Not covered:
engine builds (no TensorRT here; the ``tensorrt``-marked tests in tests/test_tensorrt.py).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from _helpers import assert_long_enough

from effexport.exporter.backends.onnx import tensorrt_profile as tp
from effexport.exporter.verify.parity import check_parity
from effexport.exporter.backends.artifact import MANIFEST
from effexport.exporter.backends.onnx.runtime import OrtRuntime
from effexport.exporter.backends.tensorrt.engine import ONNX_FILE, export_onnx

pytestmark = pytest.mark.slow
MODELS = [pytest.param(name, id=name.split(":")[0]) for name in
          ("zaya1-8b:tiny",)]
PREFILL, DECODE = 37, 12


@pytest.fixture(scope="module", params=MODELS)
def artifact(request, rewritten, tmp_path_factory):
    """(shared capture, linted tensorrt-profile model, artifact dir with effexport.json)."""
    shared = rewritten(request.param)
    directory = str(tmp_path_factory.mktemp("trt"))
    model = export_onnx(shared.program, shared.analysis.plan, directory)  # raises on any lint problem
    manifest = {"format": 1, "model": request.param, "target": "onnx", "profile": "tensorrt", "dtype": "fp32",
                "files": {"step": ONNX_FILE}, "inputs": shared.program.inputs, "outputs": shared.program.outputs,
                "cache_plan": shared.analysis.plan.to_json()}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f)
    return shared, model, directory


def test_lint_clean(artifact):
    _, model, _ = artifact
    assert tp.lint(model) == []
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 18)]
    assert model.ir_version == 10
    flat = [n for n in model.graph.node] + [n for f in model.functions for n in f.node]
    assert not {n.op_type for n in flat} & {"GroupQueryAttention", "Attention", "MultiHeadAttention"}
    assert all(n.domain in ("", "effexport") for n in flat)


def test_ort_parity_prefill_and_decode(artifact):
    shared, _, directory = artifact
    assert_long_enough(shared.sample.config.layer_specs(), PREFILL, DECODE)
    prompt = torch.randint(0, shared.sample.config.vocab_size, (2, PREFILL), generator=torch.Generator().manual_seed(12))
    report = check_parity(shared.model, OrtRuntime(directory, threads=1), prompt, DECODE, "fp32")
    assert report.tokens_equal, report.detail
    worst = {o.name: o.max_rel for o in report.outputs}
    assert report.passed and max(worst.values()) <= 1e-4, report.table()
