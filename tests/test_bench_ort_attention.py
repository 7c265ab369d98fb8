"""``bench/ort_attention.py`` (issue #20) in its CPU smoke mode: every attention lowering the script
times on the GPU, built the same way and run by the CPU EP in fp32, agrees with the torch fp32
reference (1e-4 of the largest output) and leaves the buffers as they were; the GroupQueryAttention
check's variants (and effexport's own lowering of the failing GPU test) agree too; a worker that dies
mid-item is replaced, the item recorded as crashed and the items after it still measured."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import ort_attention  # noqa: E402


def test_contexts_and_items():
    assert ort_attention.contexts("32768:4095,4096") == [(32768, 4095), (4096, 4095)]
    args = ort_attention.parse(["--smoke", "--heads", "32", "--batches", "2", "--candidates", "decomp,gqa"])
    checks, sweep, last = ort_attention.plan_items(args)  # three worker processes
    assert {i["kind"] for i in checks} == {"gqa_check"} and last == [{"kind": "gqa_check", "variant": "exporter_graph"}]
    assert sweep[0] == {"kind": "copy_bw"}
    assert [i["candidate"] for i in sweep[1:]] == ["decomp", "gqa"] * 2
    assert len(ort_attention.plan_items(ort_attention.parse(["--smoke", "--no-check"]))) == 1
    # the consumer section: by default, after the copy bandwidth (before the sweep), selectable by --candidates
    (default,) = ort_attention.plan_items(ort_attention.parse(["--no-check", "--heads", "256"]))
    consumers = [i for i in default if i["kind"] == "consumer"]
    assert default[1:1 + len(consumers)] == consumers and len(consumers) == 2 * 2 * 3  # p 100 / 4095, B 8 / 1
    assert {(i["hq"], i["hkv"], i["d"], i["window"]) for i in consumers} == {(8, 1, 256, 512)}
    assert {(i["pos"], i["batch"]) for i in consumers} == {(100, 8), (100, 1), (4095, 8), (4095, 1)}
    (only,) = ort_attention.plan_items(ort_attention.parse(["--no-check", "--candidates", "consumer_mha_window"]))
    assert [i.get("candidate") for i in only] == [None] + ["consumer_mha_window"] * 4
    (none,) = ort_attention.plan_items(ort_attention.parse(["--no-check", "--candidates", "decomp"]))
    assert not [i for i in none if i["kind"] == "consumer"]


def test_smoke_on_the_cpu(tmp_path):
    """The sweep through its worker processes (one killed midway and replaced)."""
    args = ort_attention.parse(["--smoke", "--heads", "32", "--batches", "2"])
    crash = ort_attention.item_key({"kind": "sweep", "d": 32, "hq": args.q_heads, "hkv": args.kv_heads, "rows": 64,
                                    "pos": 20, "batch": 2, "candidate": "attn24_add"})
    env = {**os.environ, "ORT_ATTENTION_CRASH_AT": crash}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ort_attention.py"), "--smoke", "--out",
                           str(tmp_path), "--heads", "32", "--batches", "2", "--no-check", "--candidates",
                           ",".join(ort_attention.CANDIDATES)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "ort_attention.json").read_text())
    assert results["meta"]["ep"] == "CPUExecutionProvider" and not results["skipped"]
    assert results["args"]["heads"] == [32] and not results["gqa_check"] and not results["consumer"]
    assert "| decomp |" in (tmp_path / "ort_attention.md").read_text()

    sweep = results["sweep"]
    assert len(sweep) == 2 * len(ort_attention.CANDIDATES)  # contexts 64:20, 64:63 at B 2, d 32
    crashed = [r for r in sweep if r.get("error", "").startswith("worker exit 3")]
    assert [(r["candidate"], r["pos"]) for r in crashed] == [("attn24_add", 20)]
    assert results["crashed"] and results["crashed"][0]["candidate"] == "attn24_add"
    ran = [r for r in sweep if "error" not in r]
    # the CPU EP runs every lowering but the crashed one (a candidate it refused would be an error here)
    assert {r["candidate"] for r in ran} == set(ort_attention.CANDIDATES)
    for r in ran:
        what = f"{r['candidate']} pos {r['pos']}"
        assert isinstance(r["max_rel"], float) and r["max_rel"] < 1e-4, (what, r["max_rel"])
        assert r["buffers_intact"] and r["after_timing_buffers_intact"], what
        assert r["uncaptured_us"] > 0 and r["bytes"] == (r["pos"] + 1) * r["hkv"] * r["d"] * 4 * 2 * r["batch"], what
        assert not r["other_ep_nodes"], what


def test_consumer_section_on_the_cpu(tmp_path):
    """The KV-sharing consumer candidates (the exporter's slot-ring read, GroupQueryAttention windowed
    with unbound presents, MultiHeadAttention over the post-step window) at the smoke shapes (Hkv 1,
    as Gemma 4), window not full (p 5 < W 16) and full (p 40), agree with the torch fp32 reference
    over positions p-W+1..p on the CPU EP (fp32) and leave the windows as they were."""
    cands = ",".join(ort_attention.CONSUMER_CANDIDATES)
    assert ort_attention.main(["--smoke", "--inline", "--no-check", "--batches", "2", "--candidates", cands,
                               "--target-ms", "3", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "ort_attention.json").read_text())
    assert not results["sweep"] and not results["skipped"] and not results["crashed"]
    rows = results["consumer"]
    shape = ort_attention.CONSUMER_SHAPES["smoke"]
    assert sorted((r["candidate"], r["pos"]) for r in rows) == sorted(
        (c, p) for c in ort_attention.CONSUMER_CANDIDATES for p in shape["positions"])
    assert max(shape["positions"]) >= shape["window"] > min(shape["positions"])  # both regimes
    for r in rows:
        what = f"{r['candidate']} pos {r['pos']}"
        assert "error" not in r, (what, r.get("error"))
        assert isinstance(r["max_rel"], float) and r["max_rel"] < 1e-4, (what, r["max_rel"])
        assert r["buffers_intact"] and r["after_timing_buffers_intact"], what
        assert r["uncaptured_us"] > 0 and not r["other_ep_nodes"], what
        assert r["bytes"] == min(r["pos"] + 1, r["window"]) * r["hkv"] * r["d"] * 4 * 2 * r["batch"], what
    nodes = {r["candidate"]: r for r in rows}
    assert nodes["consumer_mha_window"]["nodes"] == 1  # Hkv 1: the query fold is a binding, not a node
    assert nodes["consumer_gqa_unshared"]["node_types"]["GroupQueryAttention"] == 1
    assert {"MatMul", "Softmax", "Where"} <= set(nodes["consumer_decomp"]["node_types"])
    assert "| consumer_mha_window | 1 |" in (tmp_path / "ort_attention.md").read_text()


def test_gqa_check_on_the_cpu(tmp_path, capfd):
    """The GQA check's variants (the failing GPU case rebuilt standalone, each hypothesis, effexport's
    own lowering of the test) agree with the torch reference on the CPU EP (fp32): a variant that
    the reference or the graph got wrong shows here before it runs on the GPU."""
    assert ort_attention.main(["--smoke", "--inline", "--check-only", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "ort_attention.json").read_text())
    assert not results["sweep"] and not results["skipped"]
    checks = {r["variant"]: r for r in results["gqa_check"]}
    assert set(checks) == set(ort_attention.CHECK_VARIANTS)
    assert checks["total_on_device"].get("skipped")  # no device on the CPU
    assert checks["test_case"]["total_sequence_length"] == 16 and checks["total_pos1"]["total_sequence_length"] == 12
    for name, r in checks.items():
        if name == "total_on_device":
            continue
        assert "error" not in r, (name, r.get("error"))
        assert isinstance(r["max_rel"], float) and r["max_rel"] < 1e-4, (name, r["max_rel"])
        if r["shared"]:
            assert r["row_written"] and r["rows_before_kept"] and r["rows_after_kept"], name
    assert "| test_case |" in capfd.readouterr().out


def test_stdout_of_the_process_is_captured():
    """ORT prints its attention-kernel choice from C++ (file descriptor 1): the check reads it."""
    sink = []
    with ort_attention.captured_stdout(sink):
        os.write(1, b"\x1b[36mOperator=GroupQueryAttention SdpaKernel=FLASH_ATTENTION\x1b[0m\n")
    assert "SdpaKernel=FLASH_ATTENTION" in sink[0]
    assert ort_attention._kernel(sink[0]) == "FLASH_ATTENTION"
    with ort_attention.environment({"ORT_ATTENTION_TEST_VAR": "1"}):
        assert os.environ["ORT_ATTENTION_TEST_VAR"] == "1"
    assert "ORT_ATTENTION_TEST_VAR" not in os.environ


def test_decomp_candidate_is_the_exporters_lowering():
    """``decomp`` is what the ``ort`` profile emits for a head GroupQueryAttention does not take (the
    same compute and data-movement nodes, bf16 products, fp32 softmax); it and the exporter's graph
    agree on the CPU (fp32)."""
    from collections import Counter

    import numpy as np
    import onnxruntime as ort
    import torch

    import effexport.custom_ops  # noqa: F401  (registers the ops)
    from effexport.exporter.backends.onnx.attention import GQA_MAX_HEAD_DIM
    from effexport.exporter.backends.onnx.export import lower

    ops = torch.ops.effexport

    class Buffer(torch.nn.Module):
        def forward(self, q, k_new, v_new, k_buf, v_buf, pos):
            return ops.attention_buffer(q, k_new, v_new, k_buf, v_buf, pos, None, scale=0.05)

    B, H, HKV, C, d, pos = 2, 4, 2, 32, GQA_MAX_HEAD_DIM * 2, 9
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(*shape, generator=g) for shape in
            ((B, H, 1, d), (B, HKV, 1, d), (B, HKV, 1, d), (B, HKV, C, d), (B, HKV, C, d))] + [torch.tensor(pos)]
    spec = dict(batch=B, hq=H, hkv=HKV, rows=C, d=d, pos=pos, scale=0.05)
    heavy = {"MatMul", "Cast", "Softmax", "Where", "ScatterND", "Transpose", "Mul", "GreaterOrEqual"}  # not the index
    # arithmetic (the exporter reshapes positions into the ScatterND index, the bench adds them to zeros)

    def kinds(model):
        return Counter(n.op_type for n in model.graph.node if n.op_type in heavy)

    exported_bf16 = lower(Buffer(), tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args), "ort")
    assert kinds(ort_attention.build_decomp(spec, ort_attention.BFLOAT16)) == kinds(exported_bf16)

    exported, mine = lower(Buffer(), tuple(args), "ort"), ort_attention.build_decomp(spec, ort_attention.FLOAT)
    feeds = {k: a.numpy() for k, a in zip(("q", "k_new", "v_new", "k_buf", "v_buf", "pos"), args)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {i.name: feeds[i.name] for i in m.graph.input})
    for got, want in zip(run(mine), run(exported)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
