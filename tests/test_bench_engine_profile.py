"""``bench/torch_engine.py``'s ``--profile`` and ``--compile-variants`` / ``--inductor`` pieces
(``bench/_engine_profile.py``) on the CPU: kernel categories, the per-step summary (categories sum to
the total), GEMM attribution by shape from a real profile, the variant specs and their resolution
against the installed Inductor, the compile time limit; the end-to-end run is in
``tests/test_bench_scripts.py`` (the in-place test's default case) and the driver's SMOKE run below."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import _engine_profile as ep  # noqa: E402


@pytest.mark.parametrize("name,activity,cat", [
    ("nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "kernel", "gemm_cublas"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "kernel", "gemm_cublas"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16>", "kernel", "gemm_cublas"),
    ("triton_tem_fused_mm_0", "kernel", "gemm_triton"),
    ("triton_poi_fused_add_mul_3", "kernel", "inductor_triton"),
    ("triton_red_fused__to_copy_mean_pow_1", "kernel", "inductor_triton"),  # "copy" in a fused name: Inductor's
    ("triton_per_fused_add_mean_4", "kernel", "inductor_triton"),
    ("_partial", "kernel", "effexport_triton"),
    ("_combine", "kernel", "effexport_triton"),
    ("Memcpy DtoD (Device -> Device)", "gpu_memcpy", "copy_memset"),
    ("Memset (Device)", "gpu_memset", "copy_memset"),
    ("void at::native::elementwise_kernel<128, 2, ...direct_copy_kernel_cuda...>", "kernel", "copy_memset"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "kernel", "aten_native"),
    ("aten::mm", "cpu_op", "gemm_cublas"),
    ("aten::copy_", "cpu_op", "copy_memset"),
    ("aten::mul", "cpu_op", "aten_native"),
    ("some_vendor_kernel", "kernel", "other"),
])
def test_category(name, activity, cat):
    assert ep.category(name, activity) == cat


def test_effexport_kernel_names_are_read_from_the_triton_sources():
    assert {"_partial", "_combine", "_prefill", "_mhc_pre"} <= ep.EFFEXPORT_KERNELS
    assert "softmax_tile" in ep.EFFEXPORT_KERNELS  # a @triton.jit helper: inlined, but harmless


def _ev(name, start, dur, activity="kernel"):
    return {"name": name, "activity": activity, "start_us": start, "dur_us": dur}


def test_summarize_partitions_the_kernel_time():
    steps = 2
    events = []
    t = 0.0
    for _ in range(steps):
        for name, dur, act in [("nvjet_a", 10.0, "kernel"), ("triton_poi_fused_x", 2.0, "kernel"),
                               ("_partial", 5.0, "kernel"), ("Memset (Device)", 1.0, "gpu_memset"),
                               ("nvjet_a", 10.0, "kernel"), ("weird", 0.5, "kernel")]:
            events.append(_ev(name, t, dur, act))
            t += dur + 1.0  # a 1 us gap after each
    gemms = [{"op": "aten::mm", "shapes": [[1, 1000], [1000, 2000]], "dtypes": ["c10::BFloat16"] * 2, "calls": 4,
              "calls_per_step": 2.0, "us_per_step": 24.0, "kernels": ["nvjet_a"], "bytes_read": 4_002_000}]
    s = ep.summarize(events, steps, wall_s=40e-6, gemms=gemms, top=3, bw=2e12)
    assert s["kernels_per_step"] == 6 and s["distinct_kernels"] == 5
    assert s["kernel_us_per_step"] == pytest.approx(28.5)
    assert sum(s["categories_us_per_step"].values()) == pytest.approx(s["kernel_us_per_step"])
    assert sum(s["categories_count_per_step"].values()) == pytest.approx(s["kernels_per_step"])
    assert s["categories_us_per_step"]["gemm_cublas"] == pytest.approx(20.0)
    assert s["gap_us_per_step"] == pytest.approx(40.0 - 28.5) and 0 < s["kernel_busy_fraction"] < 1
    assert s["span_us_per_step"] == pytest.approx((t - 1.0) / steps)
    top = s["top_kernels"]
    assert [k["name"] for k in top] == ["nvjet_a", "_partial", "triton_poi_fused_x"]
    assert top[0]["count_per_step"] == 2 and top[0]["us_per_call"] == pytest.approx(10.0)
    assert top[0]["bytes_read_per_call"] == 4_002_000
    assert top[0]["gb_per_s"] == pytest.approx(400.2) and top[0]["of_copy_bw"] == pytest.approx(0.2001)
    assert "bytes_read_per_call" not in top[1]
    assert s["gemm_bytes_per_step"] == 2 * 4_002_000 and s["gemm_roofline_us_per_step"] == pytest.approx(4.002)
    md = ep.markdown([{"preset": "p", "dtype": "bf16", "profile": [{"context": 8, "batch": 1, "x_graph": s}]}])
    assert "| x_graph | 40.0 | 28.5 | 11.5 | 6.0 |" in md and "`nvjet_a`" in md and "aten::mm" in md


def test_gemm_shapes_and_leaf_ops_from_a_cpu_profile():
    a, w = torch.randn(2, 64), torch.randn(64, 128)
    bias = torch.randn(128)

    def step():
        torch.mm(a, w)
        torch.addmm(bias, a, w)
        torch.relu(a)
    raw = ep.profile_calls(step, 3, torch.device("cpu"), record_shapes=True)
    gemms = {g["op"]: g for g in ep.gemm_shapes(raw, 3)}
    assert set(gemms) == {"aten::mm", "aten::addmm"}
    mm = gemms["aten::mm"]
    assert mm["shapes"] == [[2, 64], [64, 128]] and mm["calls_per_step"] == 1
    assert mm["bytes_read"] == (2 * 64 + 64 * 128) * 4 and mm["weight_bytes"] == 64 * 128 * 4
    assert gemms["aten::addmm"]["bytes_read"] == (128 + 2 * 64 + 64 * 128) * 4
    events, source = ep.device_events(raw)
    assert source.startswith("leaf CPU ops") and events
    names = {e["name"] for e in events}
    assert "aten::relu" not in names or "aten::clamp_min" not in names  # a leaf, not its parent too
    s = ep.summarize(events, 3, None)
    assert sum(s["categories_us_per_step"].values()) == pytest.approx(s["kernel_us_per_step"])
    assert "wall_us_per_step" not in s


class _Fake:
    """A kineto event as ``profile_calls`` returns them (the methods the summaries read)."""

    def __init__(self, name, act, start, dur, corr=0, shapes=(), dtypes=(), device="DeviceType.CPU"):
        self._v = dict(name=name, act=act, start=start, dur=dur, corr=corr, shapes=list(shapes), dtypes=list(dtypes),
                       device=device)

    def name(self):
        return self._v["name"]

    def activity_type(self):
        return self._v["act"]

    def device_type(self):
        return self._v["device"]

    def start_ns(self):
        return self._v["start"]

    def duration_ns(self):
        return self._v["dur"]

    def correlation_id(self):
        return self._v["corr"]

    def shapes(self):
        return self._v["shapes"]

    def dtypes(self):
        return self._v["dtypes"]

    def start_thread_id(self):
        return 1


def test_device_events_and_gemm_attribution_on_a_gpu_shaped_profile():
    """What CUPTI gives on the GPU: kernels correlated to their launches (runtime or driver API), GPU
    user annotations (ranges, not kernels: left out), memsets; an ``aten::mm`` op's kernels are the
    launches inside its time."""
    cuda = "DeviceType.CUDA"
    bf = "c10::BFloat16"
    evs = [
        _Fake("aten::mm", "cpu_op", 1000, 500, shapes=[[1, 1536], [1536, 6144]], dtypes=[bf, bf]),
        _Fake("cudaLaunchKernel", "cuda_runtime", 1100, 50, corr=7),
        _Fake("aten::mm", "cpu_op", 2000, 500, shapes=[[1, 1536], [1536, 6144]], dtypes=[bf, bf]),
        _Fake("cuLaunchKernelEx", "cuda_driver", 2100, 50, corr=9),
        _Fake("triton_poi_fused_0", "cpu_op", 3000, 100),
        _Fake("cuLaunchKernel", "cuda_driver", 3010, 50, corr=11),
        _Fake("nvjet_tst_a", "kernel", 5000, 8000, corr=7, device=cuda),
        _Fake("nvjet_tst_a", "kernel", 14000, 8000, corr=9, device=cuda),
        _Fake("triton_poi_fused_0", "kernel", 23000, 2000, corr=11, device=cuda),
        _Fake("Memset (Device)", "gpu_memset", 26000, 1000, device=cuda),
        _Fake("## Call CompiledFxGraph ##", "gpu_user_annotation", 4000, 30000, device=cuda),
    ]
    events, source = ep.device_events(evs)
    assert source.startswith("device activities")
    assert [e["name"] for e in events] == ["nvjet_tst_a", "nvjet_tst_a", "triton_poi_fused_0", "Memset (Device)"]
    (g,) = ep.gemm_shapes(evs, 2)
    assert g["kernels"] == ["nvjet_tst_a"] and g["calls_per_step"] == 1 and g["us_per_call"] == pytest.approx(8.0)
    assert g["bytes_read"] == (1536 + 1536 * 6144) * 2 and g["device_time"] == "kernels"
    assert g["gb_per_s"] == pytest.approx(g["bytes_read"] / 8.0 / 1e3)
    s = ep.summarize(events, 2, 12e-6, [g])
    assert s["kernel_us_per_step"] == pytest.approx(9.5) and s["kernels_per_step"] == 2
    assert s["categories_us_per_step"]["gemm_cublas"] == pytest.approx(8.0)
    assert s["categories_us_per_step"]["copy_memset"] == pytest.approx(0.5)
    assert s["top_kernels"][0]["bytes_read_per_call"] == g["bytes_read"]


def test_parse_variant_and_points():
    assert ep.parse_variant("freezing") == ("freezing", {"freezing": True})
    name, kw = ep.parse_variant("bk:max_autotune_gemm=true,max_autotune_gemm_backends=TRITON,ATEN,dynamic=False")
    assert name == "bk" and kw == {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON,ATEN",
                                   "dynamic": False}
    name, kw = ep.parse_variant("coordinate_descent_tuning=True,triton.max_tiles=3")
    assert name == "coordinate_descent_tuning=True,triton.max_tiles=3"
    assert kw == {"coordinate_descent_tuning": True, "triton.max_tiles": 3}
    with pytest.raises(ValueError, match="preset"):
        ep.parse_variant("not-a-preset")
    assert ep.parse_points("4096:1,32768:8,") == [(4096, 1), (32768, 8)]
    assert ep.parse_points("64") == [(64, 1)]


def test_compile_kwargs_resolves_against_the_installed_inductor():
    kw, notes = ep.compile_kwargs({"mode": "max-autotune", "dynamic": False, "no_such_key": 1})
    assert kw["dynamic"] is False and "mode" not in kw
    assert kw["options"]["max_autotune"] is True and "triton.cudagraphs" not in kw["options"]
    assert notes["missing"] == ["no_such_key"] and "cudagraphs" in notes
    kw, notes = ep.compile_kwargs({"triton.cudagraphs": True})  # asked for: kept
    assert kw["options"] == {"triton.cudagraphs": True}
    kw, notes = ep.compile_kwargs({}, backend="eager")
    assert kw == {"backend": "eager"} and "options_not_passed" not in notes
    kw, notes = ep.compile_kwargs({"freezing": True}, backend="eager")
    assert kw == {"backend": "eager"} and notes["options_not_passed"]
    for name, overrides in ep.PRESETS.items():  # every preset's keys exist in this torch
        assert "missing" not in ep.compile_kwargs(overrides)[1], name


def test_alarm_stops_a_long_call():
    t0 = time.monotonic()
    with pytest.raises(ep.CompileTimeout):
        with ep.alarm(0.2):
            while time.monotonic() - t0 < 5:
                time.sleep(0.01)
    assert time.monotonic() - t0 < 2
    with ep.alarm(0):  # no limit
        pass
    with ep.alarm(5):  # cancelled on exit
        pass
    time.sleep(0.05)


def test_fp32_reference_is_the_fp32_step_of_a_bf16_program():
    """``--variant-fp32-ref``'s reference of a bf16 program (gemma4-e2b:tiny cut to 7 layers: ring and
    buffer caches, two KV-sharing layers) is the step of the program the fp32 model holding the same
    bf16 weights (``model.float()``) captures and rewrites to, on the same caches cast to fp32 (to
    1e-6: the same computation; equal on the CPU), with no weight copied (each cast where it is read)
    and no 16-bit dtype left in its graph; the uncompiled bf16 step is a bf16 rounding away from it
    (~1e-2), not a fp32 one and not a bug's."""
    import copy

    import torch_engine
    from effexport.exporter.backends.torch import TorchEngine

    sample = torch_engine.real_sample("gemma4-e2b:tiny@7L")
    cpu = torch.device("cpu")
    _, model = torch_engine.build_models(sample, torch.bfloat16, cpu, False)
    program, analysis = torch_engine.rewrite(sample, model, cpu, 64)
    plan, vocab = analysis.plan, sample.config.vocab_size
    assert {e.kind for e in plan.entries} >= {"ring", "buffer"} and sample.config.num_kv_shared_layers == 2
    ref = ep.fp32_graph(program.gm)
    dtypes = [a for n in ref.graph.nodes for a in fx_args(n) if isinstance(a, torch.dtype) and a.is_floating_point]
    assert torch.bfloat16 in [a for n in program.gm.graph.nodes for a in fx_args(n)]
    assert torch.float32 in dtypes and not set(dtypes) & set(ep.HALF_DTYPES)
    shared = {p.data_ptr() for p in ref.parameters()}  # those its graph reads: gm's own tensors
    assert shared and shared <= {p.data_ptr() for p in program.gm.parameters()}
    casts = [n for n in ref.graph.nodes if n.target is torch.ops.aten.to.dtype and n.args[0].op == "get_attr"]
    assert casts and all(list(c.users) == [c.next] for c in casts)  # each right before its one reader
    points = [(48, 1), (40, 2)]
    out: dict = {}
    rewritten = TorchEngine(program.gm, plan.entries, cpu, compile=False, cuda_graphs=False)
    refs = torch_engine.fp32_references(program, plan, rewritten, vocab, cpu, points, True, float("inf"), out,
                                        lambda: None)
    program32, analysis32 = torch_engine.rewrite(sample, copy.deepcopy(model).float(), cpu, 64)
    assert [e.name for e in analysis32.plan.entries] == [e.name for e in plan.entries]
    engine32 = TorchEngine(program32.gm, analysis32.plan.entries, cpu, compile=False, cuda_graphs=False)
    for ctx, batch in points:
        caches, ids, pos = torch_engine._point_inputs(plan, vocab, cpu, ctx, batch)
        with torch.no_grad():
            logits32 = engine32.fn(ids, pos, *[c.float() if c.is_floating_point() else c for c in caches])[0]
        assert refs[(ctx, batch)].dtype == torch.float32
        assert torch_engine._err(refs[(ctx, batch)], logits32) <= 1e-6
        r = out["points"][f"{ctx}:{batch}"]
        assert r["s"] > 0 and 2e-3 < r["rewritten_err_vs_fp32"] < 8e-2, r


def fx_args(node) -> list:
    """Every leaf of a node's args and kwargs."""
    leaves: list = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), leaves.append)
    return leaves


def test_torch_engine_profile_and_variants_end_to_end(tmp_path):
    """``bench/torch_engine.py --profile --compile-variants --inductor`` on the CPU (gemma4-e2b:tiny, the
    variants compiled by dynamo's eager backend: the code path, not Inductor): the profile's fields,
    categories summing to the total, the variants in order (default added first; ``nopack``: the
    engine without packed projections, the same logits within fp32's rounding) with their resolved
    options, a missing config key named, and logits equal to the default's and, the case being fp32, to
    the fp32 reference's (the same computation)."""
    import torch_engine

    argv = ["--device", "cpu", "--tiny", "--presets", "gemma4-e2b:tiny", "--dtypes", "fp32", "--decode", "1",
            "--reps", "1", "--tiny-context", "48", "--out", str(tmp_path), "--profile", "48:1", "--profile-steps", "1",
            "--compile-variants", "nopack", "--inductor", "cd:coordinate_descent_tuning=True,no_such_key=1",
            "--variant-points", "40:2",
            "--variant-backend", "eager", "--variant-min-s", "0"]
    assert torch_engine.main(argv) == 0
    (case,) = json.loads((tmp_path / "torch_engine.json").read_text())["cases"]
    _check_profile_and_variants(case, tmp_path)


def _check_profile_and_variants(case, out):
    """--profile and the compile variants' JSON (see bench/torch_engine.py's docstring)."""
    (point,) = case["profile"]
    assert (point["context"], point["batch"]) == (48, 1) and point["kv_bytes"] > 0
    assert "skipped" in point["compiled"]["error"]  # no Inductor on the CPU without --cpu-compile
    s = point["rewritten"]
    assert s["steps"] == 1 and s["kernels_per_step"] > 0 and s["wall_us_per_step"] > 0
    assert sum(s["categories_us_per_step"].values()) == pytest.approx(s["kernel_us_per_step"])
    assert sum(s["categories_count_per_step"].values()) == pytest.approx(s["kernels_per_step"])
    assert 0 < len(s["top_kernels"]) <= 25 and s["gemm_shapes"] and s["gemm_bytes_per_step"] > 0
    assert s["top_kernels"][0]["total_us_per_step"] >= s["top_kernels"][-1]["total_us_per_step"]
    assert all(g["op"].startswith("aten::") and g["bytes_read"] > 0 for g in s["gemm_shapes"])
    v = case["compile_variants"]
    assert v["points"] == [[40, 2]] and v["backend"] == "eager"
    by = {x["name"]: x for x in v["variants"]}
    assert list(by) == ["default", "nopack", "cd"]  # default added, and first
    assert "missing" not in by["nopack"] and by["nopack"]["options"] == {}  # pack: the engine's, not Inductor's
    assert by["nopack"]["packed"] == 0 < by["default"]["packed"] == by["cd"]["packed"]
    assert by["cd"]["compile_kwargs"] == {"backend": "eager"}
    assert by["cd"]["missing"] == ["no_such_key"] and by["cd"]["options"] == {"coordinate_descent_tuning": True}
    ref = v["fp32_ref"]["points"]["40:2"]
    assert ref["s"] > 0 and ref["rewritten_err_vs_fp32"] <= 1e-6 and ref["rewritten_greedy_equal_fp32"]
    for x in by.values():
        assert "error" not in x and x["inplace_caches"] == 2, x
        for key in ("40:2",):
            r = x["points"][key]
            assert r["ms"] > 0 and r["compile_s"] > 0, r
            assert r["err_vs_fp32"] <= 1e-6 and r["greedy_equal_fp32"], r
            if x["name"] != "default":
                assert r["err_vs_default"] < 1e-5 and r["greedy_equal_default"]
    md = (out / "engine_profile.md").read_text()
    assert "where the step goes" in md and "| cd |" in md
    assert "| err vs default | err vs fp32 |" in md and "| uncompiled (rewritten) | - | - | - | " in md




@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_engine_profile_smoke_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable, "NS": "0", "T_TOTAL": "600"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "run_engine_profile.sh")], env=env,
                          capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch engine rc=0" in proc.stdout and "-- variant static" in proc.stdout
    (case,) = json.loads((out / "torch_engine.json").read_text())["cases"]
    (point,) = case["profile"]
    assert point["rewritten"]["kernels_per_step"] > 0
    names = [v["name"] for v in case["compile_variants"]["variants"]]
    assert names == ["default", "static"]
    assert all("err_vs_fp32" in r for v in case["compile_variants"]["variants"] for r in v["points"].values())
    assert "Inductor variants" in (out / "engine_profile.md").read_text()
