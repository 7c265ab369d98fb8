"""bench/ort_graphs.py's CPU-side pieces: ``NAME@nL`` cases (a preset cut to its first n layers), the
roofline's weight bytes of MoE models (only the experts a step can use), and the export of a cut
sample through the bench's own export function, and the routing diagnosis of an MoE artifact on the
CPU in fp32 (the GPU run itself is not tested here)."""
import os
import sys

import numpy as np
import onnx
import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import decode_step  # noqa: E402  (bench/, on the path above)
import ort_graphs  # noqa: E402

from effexport.samples import UnknownModelError  # noqa: E402


def test_case_names_with_a_layer_cut():
    sample = ort_graphs.bench_sample("laguna-xs2@8L")
    assert sample.name == "laguna-xs2@8L" and sample.config.num_hidden_layers == 8
    assert ort_graphs.bench_sample("deepseek-v4-flash@4L").config.n_layers == 4
    assert ort_graphs.bench_sample("zaya1-8b").name == "zaya1-8b"
    for bad in ("laguna-xs2@8", "laguna-xs2@0L", "laguna-xs2@L", "laguna-xs2@xL"):
        with pytest.raises(ValueError, match="@nL"):
            ort_graphs.bench_sample(bad)
    with pytest.raises(UnknownModelError):
        ort_graphs.bench_sample("no-such-model@2L")


@pytest.mark.parametrize("name", ["laguna-xs2@3L", "zaya1-8b@2L", "deepseek-v4-flash@4L"])
def test_moe_weight_bytes_count_the_experts_a_step_uses(name):
    """At batch 1 the bytes are the sample's own ``active`` parameters (``param_counts``: total less
    the routed experts a token does not use) in bf16, gathered embeddings aside; at a batch large
    enough every expert counts."""
    model = ort_graphs.bench_sample(name).build("meta", torch.bfloat16)
    experts = ort_graphs.routed_experts(model)
    assert experts and all(k < e for e, k, _ in experts)
    case = {"weight_bytes": decode_step.weight_bytes(model), "experts": experts}
    counts = model.param_counts()
    assert ort_graphs.step_weight_bytes(case, 1) == case["weight_bytes"] - 2 * (counts["total"] - counts["active"])
    e, k, _ = experts[0]
    assert ort_graphs.step_weight_bytes(case, -(-e // k)) == case["weight_bytes"]
    assert ort_graphs.step_weight_bytes(case, 1) < ort_graphs.step_weight_bytes(case, 2) < case["weight_bytes"]


@pytest.mark.slow
def test_cut_sample_exports_through_the_bench(tmp_path, monkeypatch):
    """``--export-sample laguna-xs2:tiny@3L`` (the subprocess ``sample_build`` starts) on the CPU: a
    bf16 ort artifact with one MoE per routed layer of the cut model."""
    monkeypatch.setattr(decode_step, "DEV", "cpu")
    out = str(tmp_path / "cut")
    assert ort_graphs.main(["--export-sample", "laguna-xs2:tiny@3L", out, "256"]) == 0
    model = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    routed = ort_graphs.routed_experts(ort_graphs.bench_sample("laguna-xs2:tiny@3L").build("meta"))
    assert len(routed) == 2  # layer 0 is dense
    assert sum(n.op_type == "MoE" for n in model.graph.node) == len(routed)


def _fp32_cut_artifact(tmp_path, monkeypatch, name="laguna-xs2:tiny@3L"):
    """A cut tiny MoE sample built on the CPU in fp32 and exported like ``--export-sample`` does (ort
    profile, buffer caches), and its eager model."""
    import ort_cuda

    monkeypatch.setattr(decode_step, "DEV", "cpu")
    model = decode_step.build(ort_graphs.bench_sample(name), torch.float32)
    out = str(tmp_path / "fp32")
    ort_cuda.export_effexport(model, out, torch.float32, 256, "buffer")
    return model, out


@pytest.mark.slow
def test_routing_diagnosis_of_an_fp32_moe_artifact(tmp_path, monkeypatch):
    """The routing diagnosis on the CPU: every MoE node's router TopK is found and added as an output of
    the diagnostic copy (weights left external, the step model untouched), the artifact's experts in fp32
    equal eager's on every step, and an eager model with one router changed differs (so the comparison
    can fail); outlier steps get a verdict."""
    model, out = _fp32_cut_artifact(tmp_path, monkeypatch)
    prompt, steps = 16, 8
    stream = torch.from_numpy(np.random.RandomState(1).randint(0, model.config.vocab_size, (1, prompt + steps)))
    artifact = ort_graphs.artifact_routing(out, stream.numpy(), prompt, device="cpu")

    step_model = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    copy = onnx.load(os.path.join(out, ort_graphs.ROUTING_FILE), load_external_data=False)
    moe = [n.name for n in step_model.graph.node if n.op_type == "MoE"]
    assert len(moe) == 2 and [m for m, _ in artifact["moe"]] == moe
    assert all(index is not None for _, index in artifact["moe"])
    assert [o.name for o in copy.graph.output] == [o.name for o in step_model.graph.output] + \
        [index for _, index in artifact["moe"]]
    external = lambda m: {t.name: [(e.key, e.value) for e in t.external_data] for t in m.graph.initializer}  # noqa: E731
    assert external(copy) == external(step_model)  # the same weights, where they were
    assert len(artifact["steps"]) == steps + 1 and all(len(s) == 2 for s in artifact["steps"])
    k = model.config.num_experts_per_tok
    assert artifact["steps"][0][0].shape == (prompt, k) and artifact["steps"][1][0].shape == (1, k)

    calls = ort_graphs.eager_routing(model, stream)
    assert len(calls) == 2 and all(idx.shape == (prompt + steps, k) and (gap >= 0).all() for _, idx, gap in calls)
    same = ort_graphs.compare_routing(calls, artifact, prompt, errors=[0.0] * steps + [0.5])
    assert same["differences"] == [0] * (steps + 1) and same["tokens"] == [prompt] + [1] * steps
    assert same["layers"] == [name for name, _, _ in calls] and all(g > 0 for g in same["min_gap"])
    assert same["outliers"] == [{"step": steps, "max_rel": 0.5, "flip": False, "flips_up_to": 0, "eager_gap": None}]
    assert "no flip" in ort_graphs.routing_line({"case": "c", "parity": {"routing": same}})

    router = ort_graphs.routers(model)[-1][1]
    with torch.no_grad():
        router.weight.neg_()  # the last MoE layer routes every token elsewhere
    differ = ort_graphs.compare_routing(ort_graphs.eager_routing(model, stream), artifact, prompt,
                                        errors=[0.5] + [0.0] * steps)
    assert differ["differences"][0] > 0 and sum(differ["differences"]) > steps
    assert all(f["layer"] == same["layers"][-1] for f in differ["flips"])
    assert differ["outliers"][0]["flip"] and differ["outliers"][0]["eager_gap"] >= 0
    assert "flip, eager gap" in ort_graphs.routing_line({"case": "c", "parity": {"routing": differ}})


@pytest.mark.slow
def test_stock_points_on_the_cpu(tmp_path, monkeypatch):
    """``--stock`` on the CPU in fp32 for a one-layer tiny sample: the stock export built in its
    subprocess (``--export-stock``), timed through :func:`ort_graphs.stock_measure` against a case's
    effexport row at the same (L, B) (the effexport side is the GPU's: given here), its ratios
    consistent with its ms; a failed build is its row's error, an overrun build is killed and skipped."""
    import functools
    import subprocess
    import time
    from types import SimpleNamespace

    monkeypatch.setattr(decode_step, "DEV", "cpu")  # stock_decode sets it; restored after
    name = "gemma4-e2b:tiny@1L"
    points = ort_graphs.parse_stock(f"{name}:64:2,{name}:32:1,broken:tiny:8:1")
    assert points == [(name, 64, 2), (name, 32, 1), ("broken:tiny", 8, 1)]
    for bad in ("gemma3-1b:64:1", f"{name}:64", f"{name}:x:1", f"{name}:1:1"):
        with pytest.raises(ValueError, match="--stock"):
            ort_graphs.parse_stock(bad)

    out = str(tmp_path / "stock")
    started = time.monotonic()
    jobs = {name: (out, ort_graphs.stock_build(name, out, out + ".log", device="cpu", dtype="fp32"), out + ".log"),
            "broken:tiny": (out + "2", subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]), out + ".log")}
    results = {"cases": [{"case": name, "rows": [{"context": 64, "batch": 2, "graph_ms": 0.5, "uncaptured_ms": 2.0},
                                                 {"context": 64, "batch": 1, "graph_ms": 9.0, "uncaptured_ms": 9.0}]}],
               "stock": []}
    args = SimpleNamespace(stock=points, build_timeout=300, tokens=3)
    monkeypatch.setattr(ort_graphs, "stock_decode", functools.partial(ort_graphs.stock_decode, device="cpu"))
    ort_graphs.stock_measure(results, args, jobs, started)

    row, other, broken = results["stock"]
    assert row["error"] is None and row["skipped"] is None, row
    assert row["stock_ms"] > 0 and row["stock_mean_ms"] > 0
    assert (row["graph_ms"], row["uncaptured_ms"]) == (0.5, 2.0)
    assert row["stock_over_graph"] == pytest.approx(row["stock_ms"] / row["graph_ms"])
    assert row["stock_over_uncaptured"] == pytest.approx(row["stock_ms"] / row["uncaptured_ms"])
    assert row["stock_max_rel_vs_eager"] < 1e-4
    assert row["stock_placement"]["providers"].get("CPU", 0) > 0 and row["stock_placement"]["memcpy"] == {}
    assert row["stock_kv_bytes"] > other["stock_kv_bytes"] > 0  # B=2 at 63 positions, B=1 at 31
    assert other["error"] is None and other["stock_ms"] > 0  # no effexport row at (32, 1): no ratio
    assert other["graph_ms"] is None and other["stock_over_graph"] is None
    assert "exit 3" in broken["error"] and broken["stock_ms"] is None
    md = ort_graphs.stock_table(results["stock"])
    assert f"| {name} | 64 | 2 | {row['stock_ms']:.2f} | 0.50 | 2.00 | {row['stock_over_graph']:.1f} |" in md

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(ort_graphs.BuildOverrun, match="still running"):
        ort_graphs.wait(sleeper, out + ".log", 0.5, "stock build")
    assert sleeper.returncode is not None


@pytest.mark.slow
def test_bench_export_writes_the_decode_graph(tmp_path, monkeypatch):
    """The bench's export of a KV-sharing model with buffer caches is the CLI's: ``decode.onnx`` beside
    ``model.onnx`` in the manifest, and :func:`ort_graphs.general_only` a sibling that runs the same
    step without it -- one-token steps through either give the same logits on ORT CPU (fp32, 1e-5)."""
    import ort_cuda

    from effexport.runtime import CudaGraphRuntime

    monkeypatch.setattr(decode_step, "DEV", "cpu")
    model = decode_step.build(ort_graphs.bench_sample("gemma4-e2b:tiny"), torch.float32)
    out = str(tmp_path / "g4")
    ort_cuda.export_effexport(model, out, torch.float32, 64, "buffer")
    assert os.path.isfile(os.path.join(out, "decode.onnx"))
    general = ort_graphs.general_only(out)
    assert general is not None and ort_graphs.general_only(general) is None
    runtimes = [CudaGraphRuntime(d, device="cpu") for d in (out, general)]
    assert [r.graph_files for r in runtimes] == [["model.onnx", "decode.onnx"], ["model.onnx"]]
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 12))
    logits = []
    for runtime in runtimes:
        caches = runtime.initial_caches(1)
        result = runtime.step(ids[:, :10], 0, caches)
        steps = [np.asarray(runtime.step(ids[:, 10 + i:11 + i], 10 + i, result.caches).logits) for i in range(2)]
        assert runtime.last_graph == runtime.graph_files[-1]
        logits.append(np.stack(steps))
    assert np.abs(logits[0] - logits[1]).max() <= 1e-5 * np.abs(logits[1]).max()


@pytest.mark.slow
def test_parity_with_the_eager_tokens_first(tmp_path, monkeypatch):
    """``parity(..., eager_first=True)`` (eager greedy-decodes first and leaves the device before the
    artifact's session opens: the large MoE cuts) measures what the artifact-first path measures: on
    the CPU in fp32, both within 1e-5 of eager at every step, over the same 9 positions, and the
    routing diagnosis finds the same experts."""
    model, out = _fp32_cut_artifact(tmp_path, monkeypatch)
    eager = ort_graphs._Eager(model, lambda o: o[0])
    results = {first: ort_graphs.parity(out, eager, model.config.vocab_size, routing=True, eager_first=first,
                                        device="cpu") for first in (False, True)}
    for first, result in results.items():
        assert result["tokens_from"] == ("eager" if first else "artifact")
        assert len(result["max_rel_per_step"]) == 9 and result["max_rel"] < 1e-5, (first, result["max_rel"])
        assert result["routing"]["differences"] == [0] * 9
        assert result["fp32"]["eager_bf16"] == 0.0  # an fp32 model: its fp32 copy is itself


def test_build_only_then_reuse(tmp_path, monkeypatch):
    """``--build-only`` waits for every case's build and records it without timing anything; a later
    ``--reuse`` run takes a case whose manifest is written instead of building it again, and builds a
    case whose build did not finish (no manifest)."""
    import json
    import subprocess

    from effexport.exporter.backends.artifact import MANIFEST

    started = []

    def fake_build(name, out, max_context, log, env=None):  # writes the manifest last, like the real build
        started.append(name)
        code = f"import os, json; os.makedirs({out!r}, exist_ok=True); json.dump({{}}, open(os.path.join({out!r}, {MANIFEST!r}), 'w'))"
        return subprocess.Popen([sys.executable, "-c", code])

    def failing_build(name, out, max_context, log, env=None):
        started.append(name)
        with open(log, "w") as f:
            f.write("the build failed\n")
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"])

    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    monkeypatch.setattr(ort_graphs, "sample_build", fake_build)
    assert ort_graphs.built(work, "gemma4-e2b") is None
    args = ["--out", out, "--work", work, "--cases", "gemma4-e2b,zaya1-8b", "--build-only"]
    assert ort_graphs.main(args) == 0
    assert started == ["gemma4-e2b", "zaya1-8b"]
    with open(os.path.join(out, "ort_graphs.json")) as f:
        cases = json.load(f)["cases"]
    assert [c["effexport_build_done_s"] > 0 for c in cases] == [True, True]
    assert not any("rows" in c or "parity" in c or "reused" in c for c in cases)
    assert ort_graphs.built(work, "gemma4-e2b") == {"effexport_dir": os.path.join(work, "gemma4-e2b-effexport")}

    os.remove(os.path.join(work, "zaya1-8b-effexport", MANIFEST))  # an unfinished build: built again
    started.clear()
    monkeypatch.setattr(ort_graphs, "sample_build", failing_build)
    assert ort_graphs.main(args[:-1] + ["--build-only", "--reuse"]) == 0
    assert started == ["zaya1-8b"]
    with open(os.path.join(out, "ort_graphs.json")) as f:
        reused, rebuilt = json.load(f)["cases"]
    assert reused["reused"] is True and "error" not in reused
    assert "exit 4" in rebuilt["error"] and "the build failed" in rebuilt["error"]
    # the Gemma 3 case needs the peer's package and the saved model's weight bytes too
    assert ort_graphs.built(work, "gemma3-1b") is None
    assert set(ort_graphs.case_dirs(work, "gemma3-1b")) == {"effexport_dir", "genai_dir"}
    assert set(ort_graphs.case_dirs(work, "gemma3-1b+nocuda")) == {"effexport_dir"}


def test_real_size_init_dtype_follows_the_device_memory():
    """``decode_step.build`` initialises in fp32 (then casts) unless the fp32 weights would not fit in
    80% of the GPU's total memory: Laguna XS.2's 33B parameters (134 GB in fp32) init in bf16 on an
    80 GB H100 and on a 141 GB H200 alike (90% of the H200 would have let the fp32 init through by a
    few hundred MB -- or not, by what else was allocated, so the bench's two processes could disagree);
    Gemma 4 E2B (~5B) in fp32; an fp32 build is fp32 whatever the memory."""
    from effexport.samples import get_sample

    h100, h200 = 80 * 2**30, 141 * 10**9
    for device in (h100, h200):
        assert decode_step.init_dtype(get_sample("laguna-xs2"), torch.bfloat16, device) == torch.bfloat16
        assert decode_step.init_dtype(get_sample("gemma4-e2b"), torch.bfloat16, device) == torch.float32
        assert decode_step.init_dtype(get_sample("laguna-xs2"), torch.float32, device) == torch.float32
    assert decode_step.init_dtype(get_sample("laguna-xs2"), torch.bfloat16, 200 * 2**30) == torch.float32


def test_measure_times_only_the_asked_runtimes(monkeypatch):
    """``--runtimes`` picks the runtimes :func:`ort_graphs.measure` opens (each loads its own copy of
    the weights: minutes for a real-size model): ``graph`` alone opens one captured runtime and fills
    ``graph_ms`` only; an unknown name is a usage error."""
    import types

    import effexport.runtime

    opened = []

    class FakeRuntime:
        def __init__(self, directory, device="cuda", capture=True):
            opened.append((directory, capture))

    monkeypatch.setattr(effexport.runtime, "CudaGraphRuntime", FakeRuntime)
    monkeypatch.setattr(ort_graphs, "effexport_decode", lambda runtime, context, batch, tokens: 1e-3)
    monkeypatch.setattr(ort_graphs, "general_only", lambda directory: directory + "-general")
    monkeypatch.setattr(ort_graphs, "kv_bytes", lambda directory, batch, context: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    case = {"case": "x", "effexport_dir": "d", "weight_bytes": 10**9}
    args = types.SimpleNamespace(contexts=[4096], batches=[1], tokens=4, peer_batches=[], runtimes=["graph"])
    ort_graphs.measure(case, args, 1e12)
    assert opened == [("d", True)]
    assert case["rows"][0]["graph_ms"] == pytest.approx(1.0)
    assert not {"uncaptured_ms", "general_graph_ms"} & set(case["rows"][0])
    opened.clear()
    ort_graphs.measure(case := {"case": "x", "effexport_dir": "d", "weight_bytes": 10**9},
                       types.SimpleNamespace(**{**vars(args), "runtimes": list(ort_graphs.RUNTIMES)}), 1e12)
    assert opened == [("d", True), ("d", False), ("d-general", True)]
    with pytest.raises(SystemExit):
        ort_graphs.main(["--runtimes", "graph,fast", "--cases", "gemma4-e2b"])
    assert ort_graphs.split_variant("gemma4-e2b+nocuda")[1]["EFFEXPORT_ORT_CUDA_FUSIONS"] == "0"  # the build variants
    assert ort_graphs.split_variant("gemma4-e2b+noskip")[1]["EFFEXPORT_ORT_ZERO_SKIP"] == "0"
    assert ort_graphs.split_variant("gemma3-1b+nopack")[1]["EFFEXPORT_ORT_PACK_QKV"] == "0"
