"""``bench/gelu_kernel_probe.py`` on ONNX Runtime CPU (the script exists for the CUDA EP): both exact-GELU
nodes run in fp32 and fp16 with the reference's numbers, and the CPU's missing bf16 kernel is recorded as
a case that does not run, not raised."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gelu_kernel_probe  # noqa: E402


def test_gelu_kernel_probe_on_the_cpu(tmp_path):
    assert gelu_kernel_probe.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    cases = {(c["op"], c["dtype"]): c for c in json.loads((tmp_path / "gelu_kernel_probe.json").read_text())["cases"]}
    assert set(cases) == {(op, d) for op in ("com.microsoft.Gelu-1", "ai.onnx.Gelu-20") for d in ("bf16", "fp16", "fp32")}
    for op in ("com.microsoft.Gelu-1", "ai.onnx.Gelu-20"):
        assert cases[(op, "fp32")]["runs"] and cases[(op, "fp32")]["max_rel"] < 1e-6
        assert cases[(op, "fp16")]["runs"] and cases[(op, "fp16")]["max_rel"] < 2e-3
        assert not cases[(op, "bf16")]["runs"] and "NOT_IMPLEMENTED" in cases[(op, "bf16")]["error"]
