"""Structure-only export (``--weights none``): meta weights become ONNX external-data references with
no data written; the graph passes ``onnx.checker`` (full check); the build reports time and peak memory.

The unit tests lower a small module on the meta device (seconds); one CLI build of a tiny preset
with ``--weights none`` covers the whole path. A real-size build costs ~6 CPU-minutes on a 2-core
machine (README, "Scale", has every preset's numbers): its test runs only with EFFEXPORT_REALSIZE=1.
"""
import json
import os

import onnx
import pytest
import torch

from effexport.exporter.cli import main
from effexport.exporter.backends.onnx.export import lower
from effexport.exporter.backends.onnx.structure_only import DATA_LOCATION, check_structure, external_bytes


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 64, bias=False)
        self.down = torch.nn.Linear(64, 16, bias=False)
        self.norm = torch.nn.Parameter(torch.ones(16))   # small: the optimizer would read and fold it
        self.scale = torch.nn.Parameter(torch.ones(()))  # a scalar

    def forward(self, x):
        return self.down(torch.relu(self.up(x * (1 + self.norm)))) * self.scale


def test_meta_weights_become_external_references(tmp_path, caplog):
    with torch.device("meta"):
        model = Small().eval()
    proto = lower(model, (torch.zeros(2, 16, device="meta"),), profile="standard")
    external = [i for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    params = dict(model.named_parameters())
    assert [i.name for i in external] == list(params)  # nothing folded away, nothing deduplicated
    offset = 0
    for init in external:
        info = {e.key: e.value for e in init.external_data}
        assert not init.raw_data
        assert info == {"location": DATA_LOCATION, "offset": str(offset),
                        "length": str(params[init.name].numel() * 4)}
        assert list(init.dims) == list(params[init.name].shape)
        offset += params[init.name].numel() * 4
    assert external_bytes(proto) == sum(p.numel() * 4 for p in params.values())
    path = tmp_path / "model.onnx"
    onnx.save(proto, path)
    check_structure(str(path))  # onnx.checker full check with a sparse stand-in for the data
    assert os.listdir(tmp_path) == ["model.onnx"]
    assert not [r for r in caplog.records if "External data" in r.getMessage()]  # one per weight otherwise


def test_real_weights_are_left_alone():
    proto = lower(Small().eval(), (torch.zeros(2, 16),), profile="standard")
    assert external_bytes(proto) == 0
    assert all(i.data_location == onnx.TensorProto.DEFAULT for i in proto.graph.initializer)


@pytest.fixture(scope="module")
def structure_build(tmp_path_factory):
    """``effexport MODEL --weights none`` of a tiny preset: the whole CLI path of a structure-only build."""
    out = tmp_path_factory.mktemp("structure") / "out"
    return out, main([TINY, "--weights", "none", "-o", str(out)])


TINY = "gemma4-e2b:tiny"
REAL_SIZE = "gemma4-e2b"  # the fastest real-size preset (README "Scale" has every preset's numbers)


def _check_structure_artifact(out, name: str) -> dict:
    """The artifact of a structure-only build: no weight data, every weight referenced, the CachePlan of
    the model's layer specs, resources in report.json; returns report.json."""
    from effexport.samples import get_sample

    assert sorted(os.listdir(out)) == ["effexport.json", "model.onnx", "report.json"]  # no weight data
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    sample = get_sample(name)
    params = sample.build("meta").param_counts()["total"]
    assert external_bytes(proto) == pytest.approx(params * 4, rel=0.01)
    assert all(not i.raw_data for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL)
    manifest = json.loads((out / "effexport.json").read_text())
    assert manifest["weights"] == "none" and manifest["source"] == {"kind": "sample", "name": name, "weights": "none"}
    assert [i.name for i in proto.graph.input] == manifest["inputs"]
    owned = {(l.index, t.name) for l in sample.config.layer_specs() for t in l.cache}
    assert {(e["layer"], e["name"].split(".", 1)[1]) for e in manifest["cache_plan"]["entries"]} == owned
    report = json.loads((out / "report.json").read_text())
    resources = report["resources"]
    assert 0 < resources["peak_rss_bytes"] < 8 << 30 and resources["seconds"] > 0 and resources["cpu_seconds"] > 0
    assert "parity" not in report
    return report


@pytest.mark.slow  # a whole build (capture on meta + ONNX lowering)
def test_tiny_structure_only_build(structure_build, capsys):
    out, code = structure_build
    assert code == 0
    _check_structure_artifact(out, TINY)
    assert os.listdir(out.parent) == ["out"]  # no sparse stand-in or temporary directory left


@pytest.mark.slow  # a whole build (capture on meta + ONNX lowering)
def test_structure_only_artifact_is_refused_by_check(structure_build, capsys):
    out, _ = structure_build
    assert main(["check", str(out)]) == 2
    assert "structure-only" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EFFEXPORT_REALSIZE") != "1",
                    reason="real-size structure-only build takes ~6 CPU-minutes: set EFFEXPORT_REALSIZE=1")
def test_real_size_structure_only_build(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([REAL_SIZE, "--weights", "none", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "BUILT (structure only)" in err and "peak memory" in err and "no parity check" in err
    assert os.path.getsize(out / "model.onnx") < 64 << 20
    print(f"{REAL_SIZE} structure-only: {_check_structure_artifact(out, REAL_SIZE)['resources']}")
