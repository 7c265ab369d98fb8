"""bench/ort_kernel_floor.py on ORT CPU in fp32 (the GPU timing itself is not tested here): every case
builds a valid chain that runs, and the alternatives it compares compute the same thing -- a
``SkipSimplifiedLayerNormalization`` with a zero skip is the plain norm."""
import os
import sys

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import ort_kernel_floor as floor  # noqa: E402


def _run(case: str, x: np.ndarray) -> np.ndarray:
    model = floor.chain_model(case, 3, floor.FLOAT)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_skip_norm_with_zero_skip_is_the_norm():
    x = np.random.default_rng(0).standard_normal((1, 1, floor.HIDDEN)).astype(np.float32)
    norm, skip = _run("norm", x), _run("skip_norm", x)
    assert norm.shape == (1, 1, floor.HIDDEN) and np.abs(norm).max() > 0.1
    np.testing.assert_allclose(skip, norm, rtol=1e-5, atol=1e-5)


def test_every_case_runs_on_the_cpu(tmp_path):
    assert floor.main(["--device", "cpu", "--out", str(tmp_path), "--chain", "2", "--reps", "1"]) == 0
    import json

    with open(tmp_path / "ort_kernel_floor.json") as f:
        results = json.load(f)
    assert set(results["cases"]) == set(floor.CASES)
    for case, entry in results["cases"].items():
        assert "error" not in entry and entry["finite"] and entry["us_per_node"] > 0, case
        assert ("gbps" in entry) == case.startswith(("matmul_", "tmatmul_"))
    assert not list(tmp_path.glob("*.onnx"))  # the chains are not left behind


def test_transposed_weights_compute_the_same_pairs():
    """``tmatmul_N`` (weights ``[N, H]`` read with ``transB=1``) is ``matmul_N`` over the transposed
    weights: the same chain's output when its initializers are those transposed."""
    x = np.random.default_rng(0).standard_normal((1, 1, floor.HIDDEN)).astype(np.float32)
    plain, trans = floor.chain_model("matmul_256", 2, floor.FLOAT), floor.chain_model("tmatmul_256", 2, floor.FLOAT)
    import onnx.numpy_helper as nh

    for init in trans.graph.initializer:  # replace the plain chain's weights by the transposed chain's, transposed
        target = next(t for t in plain.graph.initializer if t.name == init.name)
        target.CopyFrom(nh.from_array(nh.to_array(init).T.copy(), init.name))
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    got, want = run(trans), run(plain)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unknown_case():
    with pytest.raises(ValueError, match="unknown case"):
        floor.chain_model("conv", 2, floor.FLOAT)
