"""``bench/ds_bf16_variants.py`` on the CPU: every variant of the fp32 deepseek-v4-flash:tiny
artifact (the failing test's ``--kv-cache buffer`` build, made once for the module) is the same
computation as the artifact, so the bf16 variants the GPU run compares differ from the artifact only
in how ONNX Runtime places and allocates the counts they read."""
import json
import os
import sys
from collections import Counter

import numpy as np
import onnx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import ds_bf16_variants  # noqa: E402


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """``DIR/fp32``: the CLI build of the failing test (fp32: ORT CPU has no bf16 kernels)."""
    from effexport.exporter.cli import main

    root = tmp_path_factory.mktemp("ds_variants")
    assert main(["deepseek-v4-flash:tiny", "--target", "onnx", "-o", str(root / "fp32"), "--max-context", "64",
                 "--no-check", "--kv-cache", "buffer"]) == 0
    return root


def test_every_variant_computes_the_artifacts_logits(artifacts, tmp_path):
    """Each variant runs the test's generation on ORT CPU with the artifact's tokens and logits
    (within 1e-6); every variant but the exporter's own form changes the graph; the JSON lists them
    all, the exporter's form first."""
    report = ds_bf16_variants.run_variants(str(artifacts), "cpu", str(tmp_path), budget=1e9)
    runs = report["runs"]
    assert list(runs) == ["fp32/artifact", *(f"fp32/{n}" for n in ds_bf16_variants.VARIANTS)]
    assert list(ds_bf16_variants.VARIANTS)[0] == "gather_kv"
    for key, run in runs.items():
        assert run.get("ok"), (key, run.get("error"))
        assert run["logits_max_diff"] <= 1e-6, key
        assert key == "fp32/artifact" or run["same_tokens_as_fp32_artifact"], key
        assert len(run["tokens"]) == ds_bf16_variants.NEW_TOKENS
        reference = report["logits"]["fp32/artifact"]
        assert all(np.abs(a - b).max() <= 1e-6 for a, b in zip(report["logits"][key], reference))
    edits = {k.split("/")[1]: v["edits"] for k, v in runs.items() if k != "fp32/artifact"}
    assert edits.pop("gather_kv") == 0  # the exporter reads the bodies' counts so already
    assert all(n > 0 for n in edits.values()), edits
    written = json.loads((tmp_path / "ds_bf16_variants.json").read_text())
    assert list(written["runs"]) == list(runs) and "logits" not in written


def _reads(model) -> Counter:
    """The op types that read a dim in the ``kv_compress_step`` bodies, and their CumSum nodes."""
    found = Counter()
    for fn in model.functions:
        if fn.name == "kv_compress_step":
            producers = {o: n for n in fn.node for o in n.output}
            constants = ds_bf16_variants._constants(fn.node)
            found.update(n.op_type for n in fn.node
                         if n.op_type == "CumSum" or ds_bf16_variants._dim_read(n, producers, constants))
    return found


def test_variant_rewrites_each_dim_read_form(artifacts):
    """The edits find the bodies' two counts (tokens, entry capacity) in each form they write, and
    CumSum takes the positions' Range, one per body."""
    model = onnx.load(str(artifacts / "fp32" / "model.onnx"))
    reads = 2 * sum(f.name == "kv_compress_step" for f in model.functions)
    assert _reads(model) == {"Gather": reads}
    squeezed, n = ds_bf16_variants.variant(model, "squeeze", "kv")
    assert n == reads and _reads(squeezed) == {"Squeeze": reads}
    back, n = ds_bf16_variants.variant(squeezed, "gather", "kv")
    assert n == reads and _reads(back) == {"Gather": reads}
    reduced, n = ds_bf16_variants.variant(squeezed, "reducemax", "kv")
    assert n == reads and _reads(reduced) == {"ReduceMax": reads}
    cumsum, n = ds_bf16_variants.variant(model, "squeeze", "kv", positions=True)
    assert n == reads + reads // 2 and _reads(cumsum) == {"Squeeze": reads, "CumSum": reads // 2}
