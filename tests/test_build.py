"""``effexport MODEL --target onnx``: the artifact, its contract, parity, ``check``, and clean failures."""
import json
import os

import onnx
import pytest

from effexport.exporter import build as build_mod
from effexport.exporter.cli import main
from effexport.exporter.errors import LowerError

MODEL = "gemma4-e2b:tiny"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "gemma"
    code = main([MODEL, "--target", "onnx", "-o", str(out), "--explain"])
    return code, out


def test_build_succeeds_and_writes_only_the_artifact(artifact):
    code, out = artifact
    assert code == 0
    assert sorted(os.listdir(out)) == ["effexport.json", "model.onnx", "report.json"]
    assert os.listdir(out.parent) == ["gemma"]  # no temporary directory left behind


def test_manifest_contract(artifact):
    _, out = artifact
    m = json.loads((out / "effexport.json").read_text())
    assert m["target"] == "onnx" and m["profile"] == "ort" and m["model"] == MODEL
    assert m["inputs"][:2] == ["input_ids", "pos"]
    names = [e["name"] for e in m["cache_plan"]["entries"]]
    assert m["inputs"][2:] == [f"past.{n}" for n in names]
    assert m["outputs"] == ["logits"] + [f"present.{n}" for n in names]
    assert m["command"][:2] == ["effexport", MODEL]
    assert m["versions"]["torch"] and m["versions"]["onnxruntime"]
    assert m["ir_version"] <= 10


def test_decode_graph_caches_are_the_plan(artifact):
    _, out = artifact
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    m = json.loads((out / "effexport.json").read_text())
    graph_inputs = [i.name for i in model.graph.input]
    assert graph_inputs == m["inputs"]
    # consumer layers (5-9) own no cache; sliding owners keep rings of W = 8 slots
    layers = {e["layer"] for e in m["cache_plan"]["entries"]}
    assert layers == {0, 1, 2, 3, 4}
    for inp in model.graph.input:
        entry = next((e for e in m["cache_plan"]["entries"] if f"past.{e['name']}" == inp.name), None)
        if entry and entry["kind"] == "ring":
            assert inp.type.tensor_type.shape.dim[2].dim_value == 8


def test_cache_bytes_equal_the_analytic_minimum(artifact):
    from effexport.passes.cache_plan import CacheEntry
    from effexport.samples import get_sample

    _, out = artifact
    m = json.loads((out / "effexport.json").read_text())
    entries = [CacheEntry(**{**e, "shape": tuple(e["shape"])}) for e in m["cache_plan"]["entries"]]
    context = 1000
    plan_bytes = sum(e.nbytes(1, context) for e in entries)
    specs = get_sample(MODEL).config.layer_specs()
    analytic = sum(t.num_entries(context, "ring") * t.elements * 4 for l in specs for t in l.cache)
    assert plan_bytes == analytic
    baseline = sum(t.num_entries(context, "ring") * t.elements * 4
                   for l in get_sample(MODEL).config.layer_specs(baseline=True) for t in l.cache)
    assert plan_bytes < baseline / 2


def test_report_json_has_parity(artifact):
    _, out = artifact
    r = json.loads((out / "report.json").read_text())
    p = r["parity"]
    assert p["passed"] and p["tokens_equal"] and p["steps"] == 16
    assert all(o["max_rel"] <= 1e-4 for o in p["outputs"])
    assert r["passes"]["rewrite"]["ring"] == 4 and r["kv_bytes"]["ring"]["model"] > 0


def test_check_reruns_parity(artifact, capsys):
    _, out = artifact
    assert main(["check", str(out), "--steps", "4"]) == 0
    assert "PARITY PASSED" in capsys.readouterr().out


def test_existing_output_needs_force(artifact, capsys):
    _, out = artifact
    assert main([MODEL, "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_check_of_a_non_artifact_is_exit_2(tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 2
    assert "not an effexport artifact" in capsys.readouterr().err


@pytest.mark.parametrize("error, code", [
    pytest.param(LowerError("lowering failed: op X has no translation (pass: rewrite)"), 3, id="lower-error"),
    pytest.param(KeyboardInterrupt(), 130, id="interrupt"),
])
def test_failed_build_leaves_nothing(tmp_path, monkeypatch, capsys, rewritten, error, code):
    import effexport.exporter.capture as capture_mod
    import effexport.exporter.onnx.export as export_mod

    def boom(*args, **kwargs):
        raise error
    captured = rewritten(MODEL).captured  # the same model and tokens the build would capture
    monkeypatch.setattr(capture_mod, "capture_step", lambda model, ids: captured)
    monkeypatch.setattr(export_mod, "export_step", boom)
    out = tmp_path / "x"
    assert main([MODEL, "-o", str(out), "--no-check"]) == code
    assert os.listdir(tmp_path) == []
    assert "Traceback" not in capsys.readouterr().err


def test_real_size_with_random_weights_is_refused(capsys):
    assert main(["gemma4-e4b", "-o", "unused"]) == 2
    err = capsys.readouterr().err
    assert "gemma4-e4b:tiny" in err and not os.path.exists("unused")


def test_tensorrt_missing_is_exit_4(tmp_path, capsys):
    assert main([MODEL, "--target", "tensorrt", "-o", str(tmp_path / "t")]) == 4
    err = capsys.readouterr().err
    assert "pip install 'effexport[tensorrt]'" in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_targets_listed_with_availability():
    assert set(build_mod.TARGETS) == {"onnx", "tensorrt"}
