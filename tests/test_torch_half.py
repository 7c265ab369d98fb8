"""``effexport MODEL --target torch --dtype bf16``: captured in bf16, ``program.pt2`` in bf16, parity of
the artifact itself (torch CPU here: its kernels have bf16, unlike ONNX Runtime's CPU kernels, so no
fp32 twin) against fp32 eager, bounded by eager bf16's own error; report.json says which check ran."""
import json

import numpy as np
import pytest
import torch

from _helpers import run_cli
from effexport.exporter.backends.torch import PROGRAM_FILE
from effexport.exporter.backends.torch.runtime import TorchRuntime, load_program
from effexport.exporter.cli import main

MODEL, STEPS, MAX_CONTEXT = "gemma4-e2b:tiny", 6, 64


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_bf16") / "gemma"
    code, log = run_cli(MODEL, "--target", "torch", "--dtype", "bf16", "--kv-cache", "buffer", "--max-context",
                        str(MAX_CONTEXT), "-o", str(out), "--steps", str(STEPS))
    return code, out, log


def test_bf16_build_passes_parity_of_the_artifact_itself(artifact):
    code, out, log = artifact
    assert code == 0, log
    manifest = json.loads((out / "effexport.json").read_text())
    assert manifest["target"] == "torch" and manifest["dtype"] == "bf16"
    parity = json.loads((out / "report.json").read_text())["parity"]
    assert parity["passed"] and parity["tokens_equal"]
    where = "torch CUDA" if torch.cuda.is_available() else "torch CPU"
    assert "bounded by eager bf16's own error" in parity["mode"] and f"program.pt2 itself on {where}" in parity["mode"]
    assert "twin" not in parity["mode"]
    assert "in bf16" in log  # the capture stage ran on the bf16 model


def test_program_weights_and_caches_are_bf16(artifact):
    _, out, _ = artifact
    ep = load_program(str(out / PROGRAM_FILE))
    floats = [t for t in [*ep.state_dict.values(), *ep.constants.values()]
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert floats and any(t.dtype == torch.bfloat16 for t in floats)
    big = [t for t in floats if t.numel() >= 1024]  # the matmul / embedding weights, not fp32 tables
    assert big and all(t.dtype == torch.bfloat16 for t in big), {t.dtype for t in big}
    manifest = json.loads((out / "effexport.json").read_text())
    assert {e["dtype"] for e in manifest["cache_plan"]["entries"]} == {"bfloat16"}


def test_numpy_path_carries_bf16_caches_as_tensors(artifact):
    _, out, _ = artifact
    runtime = TorchRuntime(str(out), device="cpu")
    caches = runtime.initial_caches(1)
    assert all(isinstance(c, torch.Tensor) and c.dtype == torch.bfloat16 for c in caches)
    ids = np.array([[3, 5, 7]], dtype=np.int64)
    first = runtime.step(ids, 0, caches)
    assert first.logits.dtype == np.float32 and np.isfinite(first.logits).all()
    nxt = runtime.step(first.logits[:, -1:].argmax(-1).astype(np.int64), 3, first.caches)
    logits, _ = runtime.step_torch(torch.from_numpy(ids), 0, runtime.initial_caches_torch(1))
    assert np.array_equal(first.logits, logits.float().numpy())
    assert nxt.logits.shape == (1, 1, first.logits.shape[-1])


def test_aoti_still_refuses_bf16(tmp_path, capsys):
    assert main([MODEL, "--target", "aoti", "--dtype", "bf16", "-o", str(tmp_path / "o")]) == 2
    assert "builds fp32 only" in capsys.readouterr().err
