"""The issue #21 GPU scripts checked on the CPU: ``bench/torch_engine.py``'s case specs, rooflines and
mHC pairing, and ``bench/run_issue21.sh`` end to end in its ``SMOKE=1`` mode (tiny DeepSeek V4 with and
without mHC through the torch engine on the CPU, the AOTInductor probe on a CPU Linear: compile, the
default load, and the cpp-only package built with cmake and run by the container runner)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import _common  # noqa: E402
import torch_engine  # noqa: E402


def test_real_sample_specs():
    s = torch_engine.real_sample("deepseek-v4-flash@2L/nomhc")
    assert s.name == "deepseek-v4-flash@2L/nomhc"
    assert s.config.n_layers == 2 and s.config.plain_residual and s.config.hc_mult == 1
    assert s.config.dim == 4096  # real widths
    assert torch_engine.real_sample("laguna-xs2@8L").config.num_hidden_layers == 8
    assert torch_engine.real_sample("zaya1-8b").name == "zaya1-8b"
    with pytest.raises(ValueError, match="DeepSeek V4"):
        torch_engine.real_sample("zaya1-8b/nomhc")
    with pytest.raises(ValueError, match="unknown flag"):
        torch_engine.real_sample("deepseek-v4-flash@2L/dense")


def test_active_weight_bytes_counts_the_selected_experts():
    sample = torch_engine.real_sample("deepseek-v4-flash:tiny")
    model = sample.build().to(torch.bfloat16)
    cfg = sample.config
    k, e = cfg.n_activated_experts, cfg.n_routed_experts
    per_expert = model.layers[0].ffn.experts.expert_params() * 2  # bf16
    all_bytes = _common.weight_bytes(model)
    gathered = model.embed.weight.numel() * 2
    assert all_bytes == sum(p.numel() * 2 for p in model.parameters()) - gathered
    assert _common.active_weight_bytes(model, 1) == all_bytes - cfg.n_layers * (e - k) * per_expert
    assert _common.active_weight_bytes(model, 2) == all_bytes - cfg.n_layers * max(0, e - 2 * k) * per_expert
    assert _common.active_weight_bytes(model, 64) == all_bytes  # every expert may be selected
    dense = torch_engine.real_sample("gemma4-e2b:tiny").build()
    assert _common.active_weight_bytes(dense, 1) == _common.weight_bytes(dense)


def test_mhc_overhead_pairs_a_case_with_its_nomhc_twin():
    row = {"context": 4096, "batch": 1}
    cases = [{"preset": "d@2L", "dtype": "bf16", "rows": [{**row, "compiled_graph_s": 0.0106, "rewritten_s": "x"}]},
             {"preset": "d@2L/nomhc", "dtype": "bf16", "rows": [{**row, "compiled_graph_s": 0.0100}]},
             {"preset": "other/nomhc", "dtype": "bf16", "rows": [row]}]
    (m,) = torch_engine.mhc_overhead(cases)
    assert m["preset"] == "d@2L" and set(m) == {"preset", "context", "batch", "compiled_graph"}
    assert m["compiled_graph"]["overhead"] == pytest.approx(0.06)


@pytest.mark.parametrize("flag,caches", [(None, ["4.k", "4.v"]), ("--no-inplace", [])])
def test_torch_engine_records_whether_buffers_run_in_place(tmp_path, flag, caches):
    """``bench/torch_engine.py`` runs the engines' buffer caches in place by default and functional
    with ``--no-inplace``; the JSON says which, and which caches (gemma4-e2b:tiny on the CPU: its full
    owner's K and V); the errors stay at fp32's."""
    argv = ["--device", "cpu", "--tiny", "--presets", "gemma4-e2b:tiny", "--dtypes", "fp32", "--decode", "1",
            "--reps", "1", "--tiny-context", "48", "--out", str(tmp_path)] + ([flag] if flag else [])
    assert torch_engine.main(argv) == 0
    result = json.loads((tmp_path / "torch_engine.json").read_text())
    assert result["inplace"] is (flag is None)
    (case,) = result["cases"]
    assert case["inplace_caches"] == caches and case["errors"]["rewritten"]["vs_fp32"] < 1e-5
    assert all(isinstance(row["rewritten_s"], float) for row in case["rows"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_issue21_smoke_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable, "NS": "0", "T_TOTAL": "900"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "run_issue21.sh")], env=env, capture_output=True,
                          text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    engine = json.loads((out / "torch_engine.json").read_text())
    assert engine["inplace"] is True  # the default
    assert [c["preset"] for c in engine["cases"]] == ["deepseek-v4-flash:tiny@1L", "deepseek-v4-flash:tiny@1L/nomhc"]
    for case in engine["cases"]:
        assert "error" not in case, case
        assert case["errors"]["rewritten"]["vs_fp32"] < 0.1
        assert case["errors"]["reference"] == "fp32 eager"
        (row,) = case["rows"]
        assert isinstance(row["rewritten_s"], float) and row["kv_bytes"] > 0
        assert 0 < row["weight_bytes_active"] < case["weight_bytes_all"]  # MoE: unselected experts left out
    (mhc,) = engine["mhc_overhead"]
    assert mhc["rewritten"]["plain_s"] > 0
    probe = json.loads((out / "aoti_probe.json").read_text())
    assert probe["api"]["aoti_load_package"] and probe["api"]["config.aot_inductor.package_cpp_only"]
    attempts = {a["attempt"]: a for a in probe["attempts"]}
    assert attempts["compile"]["rc"] == 0
    assert attempts["default"]["ok"] and attempts["default"]["max_abs_err"] < 1e-4
    cpp = attempts["cpp_only"]
    if not shutil.which("cmake"):
        assert cpp["reason"] == "no cmake on PATH"
        return
    assert cpp.get("ok"), cpp
    assert cpp["max_abs_err"] < 1e-4 and "CMakeLists.txt" in cpp["files"]
