"""``max_step_tokens`` (effexport.json): the most new tokens the step graph takes in one call (export's
guards on the new-token count, e.g. Qwen3-Next's 64-token chunk loop unrolled once). The runtimes feed
longer inputs in pieces (``exporter.runtime.in_pieces``); the manifest check refuses a malformed bound.
The end-to-end check (a CLI-built Qwen3-Next fed 150 tokens in one call) is
``tests/test_hf_families.py::test_long_prompt_in_one_call``."""
import json

import numpy as np
import pytest

from effexport.exporter.errors import LoadError
from effexport.exporter.runtime import StepResult, in_pieces, load_manifest


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
