"""``max_step_tokens`` (effexport.json): the most new tokens the step graph takes in one call (export's
guards on the new-token count, e.g. Qwen3-Next's 64-token chunk loop unrolled once). The runtimes feed
longer inputs in pieces (``exporter.backends.artifact.in_pieces``; the torch and AOTInductor runtimes in
``step_torch`` too); the manifest check refuses a malformed bound.
The end-to-end check (a CLI-built Qwen3-Next fed 150 tokens in one call) is
``tests/test_hf_families.py::test_long_prompt_in_one_call``."""
import json

import numpy as np
import pytest
import torch

from effexport.exporter.errors import LoadError
from effexport.exporter.backends.artifact import StepResult, in_pieces, load_manifest


def _counting_step(limit, calls):
    """A step that sums tokens into its one cache and refuses more than ``limit`` new tokens."""
    def step(ids, pos, caches):
        assert ids.shape[1] <= limit, ids.shape
        calls.append((pos, ids.shape[1]))
        total = caches[0] + ids.sum(1, keepdims=True)
        return StepResult(np.cumsum(ids, 1)[..., None] + caches[0][..., None], [total])
    return step


def test_pieces_equal_one_call():
    ids = np.arange(2 * 150).reshape(2, 150)
    calls = []
    got = in_pieces(_counting_step(63, calls), 63, ids, 7, [np.zeros((2, 1), np.int64)])
    assert calls == [(7, 63), (70, 63), (133, 24)]
    want = _counting_step(10 ** 6, [])(ids, 7, [np.zeros((2, 1), np.int64)])
    assert np.array_equal(got.logits, want.logits) and np.array_equal(got.caches[0], want.caches[0])
    calls.clear()
    in_pieces(_counting_step(63, calls), None, ids[:, :5], 0, [np.zeros((2, 1), np.int64)])
    assert calls == [(0, 5)]


@pytest.mark.parametrize("bound", [0, -3, 2.5, "64", True])
def test_manifest_refuses_a_bad_bound(tmp_path, bound):
    (tmp_path / "model.onnx").write_bytes(b"")
    manifest = {"target": "onnx", "files": {"step": "model.onnx"}, "inputs": [], "outputs": [],
                "cache_plan": {"entries": [], "layers": []}, "max_step_tokens": bound}
    (tmp_path / "effexport.json").write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match="max_step_tokens"):
        load_manifest(str(tmp_path))
    manifest["max_step_tokens"] = 63
    (tmp_path / "effexport.json").write_text(json.dumps(manifest))
    assert load_manifest(str(tmp_path))["max_step_tokens"] == 63


class _Engine:
    """A TorchEngine stand-in: the counting step on torch tensors, refusing more than ``limit`` tokens
    (functional: no cache is updated in place)."""

    aliased, device = (), torch.device("cpu")

    def __init__(self, limit, calls):
        self.limit, self.calls = limit, calls

    def step(self, ids, pos, caches):
        assert ids.shape[1] <= self.limit, ids.shape
        self.calls.append((int(pos), ids.shape[1]))
        return torch.cumsum(ids, 1)[..., None] + caches[0][..., None], [caches[0] + ids.sum(1, keepdim=True)]


@pytest.mark.parametrize("runtime", ["torch", "aoti"])
def test_torch_runtimes_feed_pieces(runtime):
    """TorchRuntime and AotiRuntime feed a step longer than ``max_step_tokens`` in pieces, through
    ``step_torch`` (device tensors) and ``step`` (numpy) alike."""
    if runtime == "torch":
        from effexport.exporter.backends.torch.runtime import TorchRuntime as cls
    else:
        from effexport.exporter.backends.aoti.runtime import AotiRuntime as cls
    calls = []
    rt = cls.__new__(cls)
    rt.manifest = {"max_step_tokens": 63}
    engine = _Engine(63, calls)
    if runtime == "torch":
        rt.engine = engine
    else:  # AotiRuntime.step_torch calls the package's model on device tensors
        rt.device = rt.pos_device = torch.device("cpu")
        rt.model = lambda ids, pos, *caches: (lambda lg, cs: (lg, *cs))(*engine.step(ids, pos, list(caches)))
    ids = torch.arange(2 * 150).reshape(2, 150)
    logits, caches = rt.step_torch(ids, 7, [torch.zeros((2, 1), dtype=torch.int64)])
    assert calls == [(7, 63), (70, 63), (133, 24)]
    want = _Engine(10 ** 6, [])
    want_logits, want_caches = want.step(ids, 7, [torch.zeros((2, 1), dtype=torch.int64)])
    assert torch.equal(logits, want_logits) and torch.equal(caches[0], want_caches[0])
    calls.clear()
    result = rt.step(ids.numpy(), 7, [np.zeros((2, 1), np.int64)])
    assert calls == [(7, 63), (70, 63), (133, 24)]
    assert np.array_equal(result.logits, want_logits.numpy()) and np.array_equal(result.caches[0], want_caches[0].numpy())
