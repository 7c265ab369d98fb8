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
    owner's K and V); the errors stay at fp32's. The default run also passes ``--hf-eager`` (HF
    transformers' Gemma 4 column end to end: rows per L and B beside ours); without it, no column."""
    hf = flag is None and _has_hf_gemma4()
    argv = ["--device", "cpu", "--tiny", "--presets", "gemma4-e2b:tiny", "--dtypes", "fp32", "--decode", "1",
            "--reps", "1", "--tiny-context", "48", "--out", str(tmp_path)] + ([flag] if flag else []) + \
        (["--hf-eager"] if hf else [])
    assert torch_engine.main(argv) == 0
    result = json.loads((tmp_path / "torch_engine.json").read_text())
    assert result["inplace"] is (flag is None)
    (case,) = result["cases"]
    # without --profile / --compile-variants the JSON is as before: no profile, no variants, no markdown
    assert "profile" not in case and "compile_variants" not in case and "profiler_init" not in result
    assert not (tmp_path / "engine_profile.md").exists()
    assert case["inplace_caches"] == caches and case["errors"]["rewritten"]["vs_fp32"] < 1e-5
    assert all(isinstance(row["rewritten_s"], float) for row in case["rows"])
    assert ("hf_transformers" in case) is hf
    if hf:
        column = case["hf_transformers"]
        assert "error" not in column and [(r["context"], r["batch"]) for r in column["rows"]] == [(48, 1), (48, 2)]
        for r in column["rows"]:
            assert r["hf_eager_ms"] > 0 and r["hf_sdpa_ms"] > 0
            assert r["hf_eager_over_rewritten"] == pytest.approx(r["hf_eager_ms"] / r["rewritten_ms"])


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


# ------------------------------------------------------------------------------ --hf-eager (HF Gemma 4)
def _has_hf_gemma4() -> bool:
    try:
        from transformers import Gemma4ForCausalLM  # noqa: F401
    except ImportError:
        return False
    return True


def _hf_gemma4():
    if not _has_hf_gemma4():
        pytest.skip("no transformers with gemma4")


GEMMA4_PRESETS = ["gemma4-e2b", "gemma4-e4b", "gemma4-e2b:tiny", "gemma4-e4b:tiny", "gemma4-odd:tiny"]


@pytest.mark.parametrize("preset", GEMMA4_PRESETS)
def test_hf_gemma4_config_maps_every_field(preset):
    """Every field of our Gemma4Config is mapped (or named unmatched), none is unmatched for a preset,
    and HF's model built from the mapping (meta device: no memory) has our parameters' names and
    shapes, layer types, per-layer head dims and KV-sharing roles -- real size included."""
    _hf_gemma4()
    cfg = torch_engine.real_sample(preset).config
    fields = {f.name for f in torch_engine.dataclasses.fields(cfg)} - {"name"}
    assert set(torch_engine.HF_GEMMA4_FIELDS) == fields
    model, unmatched = torch_engine.hf_gemma4_model(cfg, torch.device("meta"), torch.bfloat16)
    assert unmatched == {}
    with torch.device("meta"):
        ours = torch_engine.real_sample(preset).module.Model(cfg)
    hf = {k.removeprefix("model."): tuple(p.shape) for k, p in model.named_parameters()}
    assert hf == {k: tuple(p.shape) for k, p in ours.named_parameters()}  # lm_head: tied to embed_tokens
    assert list(model.config.layer_types) == list(cfg.layer_types)
    for layer, mine, (role, _) in zip(model.model.layers, ours.layers, cfg.kv_roles()):
        assert layer.self_attn.head_dim == mine.self_attn.head_dim
        assert layer.self_attn.is_kv_shared_layer == (role == "consumer")
        assert layer.self_attn.sliding_window == (cfg.sliding_window if mine.layer_type == "sliding_attention"
                                                  else None)


def test_hf_gemma4_config_names_what_it_cannot_map():
    assert torch_engine.is_gemma4("gemma4-e2b@8L") and not torch_engine.is_gemma4("deepseek-v4-flash@2L/nomhc")
    cfg = torch_engine.get_sample("gemma4-e2b:tiny").config
    odd = torch_engine.dataclasses.replace(cfg, attn_logit_softcapping=50.0, num_global_key_value_heads=2)
    _, unmatched = torch_engine.hf_gemma4_config(odd)
    assert set(unmatched) == {"attn_logit_softcapping", "num_global_key_value_heads"}


def test_hf_gemma4_with_our_weights_gives_our_logits():
    """The mapping is the same model, not only the same shapes: our tiny sample's weights loaded into
    HF's (fp32, eager) give its logits, prefill (past the sliding window) and a decode step."""
    _hf_gemma4()
    sample = torch_engine.get_sample("gemma4-e2b:tiny")
    ours = sample.build("cpu").eval()
    model, _ = torch_engine.hf_gemma4_model(sample.config, torch.device("cpu"), torch.float32)
    missing, unexpected = model.load_state_dict({"model." + k: v for k, v in ours.state_dict().items()}, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, sample.config.vocab_size, (2, 2 * sample.config.sliding_window + 3),
                        generator=torch.Generator().manual_seed(0))
    kw = torch_engine._hf_cache_kw(model)
    with torch.no_grad():
        ref, past = ours(ids)
        out = model(input_ids=ids, use_cache=True)
        assert torch_engine._err(out.logits, ref) < 1e-5
        tok = ref[:, -1:].argmax(-1)
        ref1, _ = ours(tok, past)
        cache = out.cache if kw == "cache" else out.past_key_values
        assert torch_engine._err(model(input_ids=tok, use_cache=True, **{kw: cache}).logits, ref1) < 1e-5


def test_hf_random_cache_holds_l_tokens_and_a_step_is_undone():
    _hf_gemma4()
    cfg = torch_engine.get_sample("gemma4-e2b:tiny").config
    model, _ = torch_engine.hf_gemma4_model(cfg, torch.device("cpu"), torch.float32)
    cache = torch_engine.hf_random_cache(model, 2, 20, torch.Generator().manual_seed(0))
    assert cache.get_seq_length() == 20
    f = cfg.first_kv_shared_layer
    lengths = [layer.keys.shape[2] for layer in cache.layers[:f]]
    assert lengths == [20 if t == "full_attention" else cfg.sliding_window - 1 for t in cfg.layer_types[:f]]
    state = torch_engine._cache_state(cache)
    keys = [layer.keys for layer in cache.layers[:f]]
    with torch.no_grad():
        model(input_ids=torch.zeros(2, 1, dtype=torch.long), use_cache=True,
              **{torch_engine._hf_cache_kw(model): cache})
    assert cache.get_seq_length() == 21
    torch_engine._restore(cache, state)
    assert cache.get_seq_length() == 20 and all(a is b.keys for a, b in zip(keys, cache.layers[:f]))


def _hf_args(**kw):
    return torch_engine.argparse.Namespace(**{"hf_attn": "eager,sdpa", "tiny_context": 24, "contexts": [24],
                                              "batches": [1], **kw})


def test_hf_eager_column_ratios_and_recorded_failure(monkeypatch):
    """The column's rows: HF ms per step, the case's compiled-graph ms at the same L and B and their
    ratio; a transformers without Gemma 4 is an error in the JSON, not a crash."""
    _hf_gemma4()
    sample = torch_engine.get_sample("gemma4-e2b:tiny")
    case = {"preset": sample.name, "dtype": "fp32", "real_size": False,
            "rows": [{"context": 24, "batch": 1, "compiled_graph_s": 1e-3, "rewritten_s": "skipped"}]}
    clock = torch_engine.Clock(torch.device("cpu"), 1)
    out = torch_engine.hf_eager_column(case, sample, _hf_args(), torch.device("cpu"), clock, float("inf"), lambda: None)
    assert out is case["hf_transformers"] and out["config_unmatched"].startswith("none")
    r1, r2 = out["rows"]
    assert r1["compiled_graph_ms"] == 1.0 and "compiled_graph_ms" not in r2  # no B=2 row of ours
    for attn in ("eager", "sdpa"):
        assert r1[f"hf_{attn}_over_compiled_graph"] == pytest.approx(r1[f"hf_{attn}_ms"])
        assert r2[f"hf_{attn}_ms"] > 0
    assert "| 24 | 1 |" in torch_engine.hf_table([case])

    def missing(*a, **k):
        raise ImportError("transformers 5.0 has no gemma4")
    monkeypatch.setattr(torch_engine, "hf_gemma4_model", missing)
    case = {"preset": sample.name, "dtype": "fp32", "real_size": False}
    out = torch_engine.hf_eager_column(case, sample, _hf_args(), torch.device("cpu"), clock, float("inf"), lambda: None)
    assert out["error"] == "ImportError: transformers 5.0 has no gemma4" and out["rows"] == []
    assert "no gemma4" in torch_engine.hf_table([case])



def test_device_queue_runs_steps_detached_and_packs_their_results(tmp_path):
    """``bench/device_queue.sh``: ``start`` returns at once with the steps running in their own process
    session (a second ``start`` is refused while they run); a failing or timed-out step is recorded and
    the next one runs; ``wait`` returns when the queue is done and packs each step's results and log."""
    import tarfile

    steps = tmp_path / "steps"
    steps.write_text("# comment\n\nT=5 echo one > $OUT/one.txt; python3 -c 'import effexport'\n"
                     "T=1 sleep 5\nexit 3\nT=5 echo last > $OUT/last.txt\n")
    env = {**os.environ, "QUEUE_DIR": str(tmp_path / "q"), "OUT": str(tmp_path / "out")}
    script = os.path.join(ROOT, "bench", "device_queue.sh")
    start = subprocess.run(["bash", script, "start", str(steps)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=30)
    assert start.returncode == 0 and "4 steps" in start.stdout, start.stderr
    again = subprocess.run(["bash", script, "start", str(steps)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=30)
    assert again.returncode == 2 and "stop it first" in again.stderr  # one queue at a time
    done = subprocess.run(["bash", script, "wait", "60"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=90)
    status = (tmp_path / "out" / "status.txt").read_text().splitlines()
    ends = [line.split()[:3] for line in status if " end " in line]
    assert ends == [["01", "end", "rc=0"], ["02", "end", "rc=124"], ["03", "end", "rc=3"], ["04", "end", "rc=0"]]
    assert status[-1].startswith("done") and "done" in done.stdout
    with tarfile.open(tmp_path / "out" / "queue.tgz") as tar:
        names = set(tar.getnames())
        assert {"./results/01/one.txt", "./results/04/last.txt", "./01.log", "./04.log"} <= names
        assert tar.extractfile("./results/04/last.txt").read() == b"last\n"
