"""``bench/norm_error_probe.py`` on ONNX Runtime's CPU EP: an fp32 artifact of a tiny Hugging Face Gemma 3
taps one value per hidden-width norm (the residual sums of the fused skip norms included) paired with
eager's norm inputs, all at fp32's rounding; the same artifact with one norm's scale changed is found
at the next tap and not before. ``bench/bf16_emulation.py``: the bf16 artifact of the same model as an
fp32 graph rounding where the artifact holds bf16 values runs on the CPU EP with bf16-sized errors."""
import os
import shutil
import sys

import numpy as np
import onnx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import norm_error_probe as probe  # noqa: E402
from _helpers import run_cli, tiny_gemma3  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):

    root = tmp_path_factory.mktemp("norm_probe")
    tiny_gemma3(directory=root / "g3")
    for out, extra, env in (("art", [], {}), ("art16", ["--dtype", "bf16"], {"EFFEXPORT_ORT_CUDA_FUSIONS": "0"})):
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            code, log = run_cli(str(root / "g3"), "--target", "onnx", "--kv-cache", "buffer", "--max-context", "128",
                                *extra, "-o", str(root / out))
        assert code == 0, log
    return root


def test_taps_pair_with_eager_norms_at_fp32_rounding(built):
    art = str(built / "art")
    before = sorted(os.listdir(art))
    result = probe.probe(art, str(built / "g3"), 40, "cpu")
    assert result["taps"] == {"artifact": 10, "eager": 10, "fp32": 10}  # 2 layers x 4 norms, the final norm, logits
    model = onnx.load(os.path.join(art, "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in model.graph.node) >= 3  # sums tapped
    assert max(r["artifact_vs_fp32"] for r in result["rows"]) < 1e-5
    assert result["first_tap_over_twice_eager"] is None
    assert sorted(os.listdir(art)) == before  # the artifact untouched, the work copy gone


def test_a_changed_norm_scale_shows_at_the_next_tap(built, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(built / "art", art)
    model = onnx.load(str(art / "model.onnx"))
    widths = probe.vector_widths(model)
    norms = [n for n in model.graph.node if n.op_type in probe.NORMS and probe._hidden_width(n, widths) == 64]
    victim = norms[3]
    slot = 1 if victim.op_type == probe.NORMS[0] else 2
    init = next(i for i in model.graph.initializer if i.name == victim.input[slot])  # may be shared: a copy
    model.graph.initializer.append(onnx.numpy_helper.from_array(
        onnx.numpy_helper.to_array(init) * np.float32(1.5), "victim.scale"))
    victim.input[slot] = "victim.scale"
    onnx.save(model, str(art / "model.onnx"))
    rows = probe.probe(str(art), str(built / "g3"), 40, "cpu")["rows"]
    assert all(r["artifact_vs_fp32"] < 1e-5 for r in rows[:4])
    assert rows[4]["artifact_vs_fp32"] > 1e-2 and rows[-1]["artifact_vs_fp32"] > 1e-3


def test_the_bf16_emulation_runs_on_the_cpu_and_rounds_as_bf16(built, tmp_path):
    import bf16_emulation

    art16 = str(built / "art16")
    before = sorted(os.listdir(art16))
    emu = tmp_path / "emu"
    counts = bf16_emulation.emulated_dir(art16, str(emu))
    assert counts["initializers"] > 0 and counts["rounded"] > 20, counts
    model = onnx.load(str(emu / "model.onnx"))
    bf16 = onnx.TensorProto.BFLOAT16
    assert not [t.name for t in model.graph.initializer if t.data_type == bf16]
    assert all(v.type.tensor_type.elem_type != bf16 for v in (*model.graph.input, *model.graph.output))
    rounds = [n for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == bf16]
    assert len(rounds) == counts["rounded"] and all(n.output[0].endswith(".emulated_half") for n in rounds)
    result = probe.probe(str(emu), str(built / "g3"), 40, "cpu")
    assert result["dtype"] == "bfloat16" and result["taps"]["artifact"] == 10
    errs = [r["artifact_vs_fp32"] for r in result["rows"]]
    eager = [r["eager_vs_fp32"] for r in result["rows"]]
    assert 1e-3 < errs[-1] < 5e-2 and max(errs[1:]) < 3 * max(eager)  # rounded like bf16, not worse than eager
    assert sorted(os.listdir(art16)) == before


def test_a_bf16_graph_without_its_rounding_is_fp32_at_long_positions(tmp_path):
    """A bf16 build's graph computed in fp32 with no rounding at all (``bf16_emulation --no-rounding``)
    differs from fp32 eager of the same weights only by the constants it holds in bf16 (the rotary
    tables, as eager bf16 has them): a tiny Gemma 3 with 256-wide heads over a 600-token prompt stays
    at ~3.4e-3. Built with the RoPE frequencies rounded to bf16 (``.to(bf16)`` on the whole model, as
    builds did), every angle ``pos * inv_freq`` drifts with the position: 1.5e-2, eager bf16's whole
    error, before any rounding of the activations."""
    import bf16_emulation

    tiny_gemma3(head_dim=256, max_positions=1024, directory=tmp_path / "g3")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFEXPORT_ORT_CUDA_FUSIONS", "0")  # Q / K norms outside the attention: the CPU EP runs it
        code, log = run_cli(str(tmp_path / "g3"), "--target", "onnx", "--kv-cache", "buffer", "--max-context", "1024",
                            "--dtype", "bf16", "-o", str(tmp_path / "art"))
    assert code == 0, log
    assert bf16_emulation.emulated_dir(str(tmp_path / "art"), str(tmp_path / "emu"), rounding=False)["rounded"] == 0
    rows = probe.probe(str(tmp_path / "emu"), str(tmp_path / "g3"), 600, "cpu")["rows"]
    assert max(r["artifact_vs_fp32"] for r in rows) < 7e-3, rows[-1]
    assert rows[-1]["eager_vs_fp32"] > 1e-2  # eager bf16's own error, for scale
