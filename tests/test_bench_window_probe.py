"""``bench/window_probe.py`` on the CPU (ONNX Runtime CPU, fp32): the tiny HF Gemma 3 built by the CLI,
prompts shorter and longer than its 6-row sliding window, buffer reuse off and on -- every case passes
its parity check against eager, as the fp32 twins do (the script exists for the CUDA EP, where the bf16
build failed in run 36b; this checks the script itself)."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import window_probe  # noqa: E402


def test_window_probe_on_the_cpu(tmp_path):
    assert window_probe.main(["--device", "cpu", "--dtype", "fp32", "--families",
                              "gemma3,gemma3+nowindow,gemma3+norot", "--prompts", "3,8",
                              "--batches", "2", "--steps", "4", "--out", str(tmp_path / "out"),
                              "--work", str(tmp_path / "work")]) == 0
    result = json.loads((tmp_path / "out" / "window_probe.json").read_text())
    entry = result["families"]["gemma3"]
    assert entry["window"] == 6 and entry["head_dim"] == 16 and "error" not in entry
    for variant in ("gemma3", "gemma3+nowindow", "gemma3+norot"):
        cases = result["families"][variant]["cases"]
        assert [(c["prompt"], c["mem_reuse"]) for c in cases] == [(3, False), (3, True), (8, False), (8, True)]
        assert all(c["passed"] and c["tokens_equal"] and c["logits/decode"] < 1e-5 for c in cases), (variant, cases)
    # the default build gives every sliding owner a windowed GroupQueryAttention, rotating inside (run
    # 39); +nowindow (EFFEXPORT_ORT_WINDOW_CACHE=0) has none; +norot
    # (EFFEXPORT_ORT_ROTARY_IN_ATTENTION=0) keeps every rotation a node
    window, slots, norot = (result["families"][v]["structure"] for v in ("gemma3", "gemma3+nowindow",
                                                                           "gemma3+norot"))
    assert slots["gqa_window_cache"] == 0, slots
    assert window["gqa_window_cache"] >= 1 and window["gqa"] == slots["gqa"] + window["gqa_window_cache"], window
    assert window["gqa_do_rotary"] == window["gqa"], window
    assert norot["gqa"] == window["gqa"] and norot["gqa_do_rotary"] == 0, norot
    assert norot["rotary_nodes"] == window["rotary_nodes"] + 2 * window["gqa"], (window, norot)
    md = (tmp_path / "out" / "window_probe.md").read_text().splitlines()
    assert len(md) == 2 + 12 and md[2].startswith("| gemma3 | 16 | ") and "| yes |" in md[2], md

def test_family_variants():
    assert window_probe.parse_family("gemma3") == ("gemma3", {}, {})
    assert window_probe.parse_family("gemma3/hd256") == ("gemma3", {"head_dim": 256}, {})
    assert window_probe.parse_family("laguna/hd64+norot+nonorm") == (
        "laguna", {"head_dim": 64}, {"EFFEXPORT_ORT_ROTARY_IN_ATTENTION": "0", "EFFEXPORT_ORT_CUDA_FUSIONS": "0"})
    assert window_probe.parse_family("gemma3+window+wtotal") == (
        "gemma3", {}, {"EFFEXPORT_ORT_WINDOW_CACHE": "1", "EFFEXPORT_ORT_WINDOW_TOTAL": "window"})
    for bad, says in (("gemma3/w8", "FAMILY/hdN"), ("gemma3+fast", "unknown build switch +fast")):
        try:
            window_probe.parse_family(bad)
        except ValueError as exc:
            assert says in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")
