"""``CudaGraphRuntime`` and the device-side position it relies on.

On the CPU (CI) the runtime runs its fixed-memory bindings without capture: greedy generation, chunked
prefill (row by row at batch 2) and the caches' identity across steps are checked against the plain
``OrtRuntime``. The position contract: every tiny preset's ONNX step reads ``pos`` on the device only
(tests/test_onnx_export.py, every profile); here, a ``--kv-cache buffer`` build's GroupQueryAttention
reads ``total_sequence_length`` from ``pos_host`` and, for a one-token step, not at all (a stale host
position cannot change a replayed decode step), while a prompt chunk needs it. The gpu-marked test
replays the decode steps from CUDA graphs (onnxruntime-gpu) and compares with the uncaptured runtime.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from effexport.exporter.errors import LoadError
from effexport.exporter.backends.onnx.host_positions import POS_HOST, host_reads
from effexport.runtime import CudaGraphRuntime, OrtRuntime

CONTEXT = 64


def _build(out, *extra, preset: str = "gemma4-e2b:tiny") -> None:
    from effexport.exporter.cli import main

    code = main([preset, "--target", "onnx", "-o", str(out), "--max-context", str(CONTEXT),
                 "--no-check", *extra])
    assert code == 0


@pytest.fixture(scope="module")
def buffered(tmp_path_factory):
    """gemma4-e2b:tiny, ``--kv-cache buffer``, ort profile, fp32 (one full-cache owner: a shared
    buffer GQA; rings for the sliding owners)."""
    out = tmp_path_factory.mktemp("graph") / "buffer"
    _build(out, "--kv-cache", "buffer")
    return out


def _ids(batch: int, length: int, seed: int = 3) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 128, (batch, length))


def test_pos_host_is_the_only_host_read(buffered):
    """The step takes ``pos_host`` after ``pos``; it feeds GroupQueryAttention's total_sequence_length
    only, every other use of the position is on the device, and the model says so."""
    model = onnx.load(str(buffered / "model.onnx"), load_external_data=False)
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "pos", POS_HOST]
    assert json.loads((buffered / "effexport.json").read_text())["inputs"] == names
    assert {p.key: p.value for p in model.metadata_props}["effexport.device_positions"] == "true"
    assert host_reads(ir.from_proto(model)) == []
    users = [n for n in model.graph.node if POS_HOST in n.input]
    assert users and all(n.op_type in ("Add", "Where", "Cast") for n in users)


def _session_run(path, ids, pos, pos_host, caches):
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, [ids, np.array(pos, np.int64), np.array(pos_host, np.int64), *caches]))
    return session.run(None, feeds)


def test_decode_ignores_the_host_position_and_a_chunk_needs_it(buffered):
    """A one-token step gives the same logits whatever ``pos_host`` says (GQA gets the buffer's
    capacity), so a CUDA graph captured at one position replays correctly at the next; a prompt
    chunk at ``pos > 0`` reads it (a wrong one changes the result or is refused)."""
    runtime = OrtRuntime(str(buffered))
    ids = _ids(1, 9)
    caches = runtime.step(ids[:, :8], 0, runtime.initial_caches(1)).caches
    right = _session_run(buffered, ids[:, 8:9], 8, 8, caches)[0]
    for stale in (0, 3, CONTEXT - 1):
        assert np.array_equal(_session_run(buffered, ids[:, 8:9], 8, stale, caches)[0], right)
    chunk = _ids(1, 4, seed=4)
    want = _session_run(buffered, chunk, 8, 8, caches)[0]
    try:
        wrong = _session_run(buffered, chunk, 8, 0, caches)[0]
    except Exception:  # noqa: BLE001  ORT refuses total < past + T: also a proof it is read
        return
    assert not np.allclose(wrong, want)


def test_generate_equals_the_plain_runtime(buffered):
    """Greedy generation through the fixed-memory bindings (prefill uncaptured, one-token steps as
    graph B) equals OrtRuntime's, logits bit for bit, at batch 1 and 2; both run the one-token steps
    through the artifact's decode graph."""
    plain, fixed = OrtRuntime(str(buffered)), CudaGraphRuntime(str(buffered), device="cpu")
    for batch in (1, 2):
        ids = _ids(batch, 10, seed=batch)
        tokens_a, logits_a = plain.generate(ids, 12)
        tokens_b, logits_b = fixed.generate(ids, 12)
        assert np.array_equal(tokens_a, tokens_b)
        assert all(np.array_equal(a, b) for a, b in zip(logits_a, logits_b))
        assert plain.last_graph == fixed.last_graph == "decode.onnx"


def test_caches_stay_in_place(buffered):
    """Every step returns the runtime's own cache tensors (same pointers, contents changed); chunked prefill at batch 2 (row by row) equals the plain
    runtime's; caches from elsewhere are copied in."""
    plain, fixed = OrtRuntime(str(buffered)), CudaGraphRuntime(str(buffered), device="cpu")
    ids = _ids(2, 14, seed=7)
    caches = fixed.initial_caches(2)
    pointers = [c.data_ptr() for c in caches]
    first = fixed.step(ids[:, :6], 0, caches)
    assert first.caches is caches and [c.data_ptr() for c in first.caches] == pointers
    assert all(c.abs().sum() > 0 for c in caches)
    second = fixed.step(ids[:, 6:13], 6, first.caches)  # a chunk on a non-empty cache at batch 2
    elsewhere = [c.clone() for c in second.caches]  # the next step overwrites the runtime's own
    third = fixed.step(ids[:, 13:14], 13, second.caches)
    want = plain.step(ids[:, :6], 0, plain.initial_caches(2))
    want = plain.step(ids[:, 6:13], 6, want.caches)
    assert np.array_equal(second.logits, want.logits)
    want = plain.step(ids[:, 13:14], 13, want.caches)
    assert np.array_equal(third.logits, want.logits)
    other = CudaGraphRuntime(str(buffered), device="cpu")
    adopted = other.step(ids[:, 13:14], 13, elsewhere)
    assert np.array_equal(adopted.logits, want.logits)


def test_growing_caches_are_refused(tmp_path):
    """A --kv-cache grow artifact has no fixed shapes: refused with the flag that fixes it."""
    out = tmp_path / "grow"
    _build(out)
    with pytest.raises(LoadError, match="--kv-cache buffer"):
        CudaGraphRuntime(str(out), device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["gemma4-e2b:tiny", "deepseek-v4-flash:tiny"])
def test_cuda_graph_replay_equals_uncaptured(tmp_path, preset):
    """onnxruntime-gpu: the decode steps replayed from CUDA graphs (graph per batch size, captured on
    the third step) give the uncaptured runtime's tokens and logits (same kernels: 1e-3 rel in bf16),
    at batch 1 and 2. bf16: ONNX Runtime's CUDA GroupQueryAttention has fp16 / bf16 kernels only, so
    an fp32 artifact has nodes on the CPU provider and ORT refuses the graph capture (BENCHMARKS.md
    run 21). DeepSeek V4: ORT refused its capture while mHC's Sinkhorn was a ``Loop`` ("the model has
    control flow nodes", issue #20); the bodies are unrolled now (tests/test_onnx_export.py
    ``test_no_control_flow``)."""
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a GPU and onnxruntime-gpu")
    out = tmp_path / "buffer"
    _build(out, "--kv-cache", "buffer", "--dtype", "bf16", preset=preset)
    plain, graphs = OrtRuntime(str(out), device="cuda"), CudaGraphRuntime(str(out), device="cuda")
    for batch, prompt in ((1, 3), (2, 10)):  # a prompt shorter than the 8-position window, and longer
        ids = _ids(batch, prompt, seed=batch)
        tokens_a, logits_a = plain.generate(ids, 16)
        tokens_b, logits_b = graphs.generate(ids, 16)
        assert np.array_equal(tokens_a, tokens_b)
        for i, (a, b) in enumerate(zip(logits_a, logits_b)):
            a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
            assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max(), f"B={batch} step {i}"


def test_session_options_reach_the_session(buffered, tmp_path):
    """``session_options`` start the runtime's session (here ORT's profiler: its trace names the
    step's nodes, what bench/ort_graphs.py --profile aggregates per op type)."""
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "trace")
    runtime = CudaGraphRuntime(str(buffered), device="cpu", session_options=opts)
    runtime.step(_ids(1, 4), 0, runtime.initial_caches(1))
    trace = json.loads(open(runtime.session.end_profiling()).read())
    ops = {e["args"].get("op_name") for e in trace if e.get("cat") == "Node"}
    assert "GroupQueryAttention" in ops and "MatMul" in ops


def test_mem_reuse_off_on_cuda_by_default(buffered, monkeypatch):
    """ONNX Runtime's buffer reuse: off by default on CUDA (its planner computed wrong batch-2 steps
    there, BENCHMARKS.md run 36), on for the CPU EP; the environment overrides the default, an explicit
    ``mem_reuse`` or the caller's ``session_options`` decide over it. The CPU EP gives the same logits
    either way."""
    from effexport.exporter.backends.onnx.runtime import MEM_REUSE_ENV, mem_reuse_default

    monkeypatch.delenv(MEM_REUSE_ENV, raising=False)
    assert mem_reuse_default("cuda") is False and mem_reuse_default("cpu") is True
    monkeypatch.setenv(MEM_REUSE_ENV, "1")
    assert mem_reuse_default("cuda") is True
    monkeypatch.setenv(MEM_REUSE_ENV, "0")
    assert mem_reuse_default("cpu") is False
    monkeypatch.delenv(MEM_REUSE_ENV)
    ids = _ids(2, 5, seed=9)
    runs = {}
    for key, kwargs in (("default", {}), ("off", {"mem_reuse": False})):
        runtime = OrtRuntime(str(buffered), **kwargs)
        assert runtime.mem_reuse is (key == "default")
        assert runtime.session.get_session_options().enable_mem_reuse is (key == "default")
        runs[key] = runtime.generate(ids, 4)
    assert np.array_equal(runs["default"][0], runs["off"][0])
    assert all(np.array_equal(a, b) for a, b in zip(runs["default"][1], runs["off"][1]))
    opts = ort.SessionOptions()
    opts.enable_mem_reuse = False
    assert OrtRuntime(str(buffered), session_options=opts).session.get_session_options().enable_mem_reuse is False


def test_cuda_sessions_grow_their_arena_by_what_is_asked(monkeypatch):
    """Every CUDA session the runtimes open asks the arena to grow by the requested size (not by
    powers of two: a model's weights loaded by ORT could reserve twice their size), and the graph
    runtime adds ``enable_cuda_graph`` to those options rather than replacing them. Checked without a
    GPU: the provider list the runtimes would pass."""
    from effexport.exporter.backends.onnx.runtime import CUDA_OPTIONS

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.delattr(ort, "preload_dlls", raising=False)
    plain = OrtRuntime._providers(object.__new__(OrtRuntime), ort, "cuda")
    assert plain == [("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}), "CPUExecutionProvider"]
    graphs = object.__new__(CudaGraphRuntime)
    graphs.capture = True
    monkeypatch.setattr(CudaGraphRuntime, "_check_device_positions", lambda self: None)
    assert graphs._providers(ort, "cuda")[0] == ("CUDAExecutionProvider", {**CUDA_OPTIONS, "enable_cuda_graph": "1"})
    assert OrtRuntime._providers(object.__new__(OrtRuntime), ort, "cpu") == ["CPUExecutionProvider"]


def test_runtime_pair_probe_on_the_cpu(buffered, tmp_path):
    """``bench/runtime_pair_probe.py`` (the batch-2 diagnosis for the GPU): on ORT's CPU EP the two
    runtimes give the same tokens and bit-identical logits at batch 1 and 2, with ORT's buffer reuse on
    and off, and turning reuse off changes neither runtime's numbers."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import runtime_pair_probe as probe

    assert probe.main(["--artifact", str(buffered), "--device", "cpu", "--out", str(tmp_path), "--tokens", "4"]) == 0
    configs = json.loads((tmp_path / "runtime_pair_probe.json").read_text())["configs"]
    assert set(configs) == {"reuse", "no_reuse"}
    for config, cases in configs.items():
        assert set(cases) == {"B1", "B2"}, config
        for case, entry in cases.items():
            assert entry["tokens_equal"] and len(entry["max_rel_per_step"]) == 4, (config, case)
            assert entry["max_rel"] == 0.0, (config, case, entry["max_rel"])
            if config == "no_reuse":
                assert entry["ort_vs_reuse"] == 0.0 and entry["graph_vs_reuse"] == 0.0, (case, entry)
