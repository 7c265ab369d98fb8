"""``effexport MODEL --target aoti --tp N`` (issue #23): one AOTInductor package per rank
(``rank{r}/model.pt2``, the ``_c10d_functional`` all-reduces compiled in as calls of the collective
on the process group named "0") and the topology manifest; the build's parity runs the N rank
packages together over gloo on the CPU against unsharded fp32 eager, the same check as
``--target torch --tp N``; ``effexport run`` / ``effexport check`` load the packages the same way.

One slow test builds gemma4-e2b:tiny over 2 ranks (two AOTInductor compiles, ~2-3 min on 2 cores);
the fast tests cover the bad flags (exit 2, one line, nothing written), the compile-time process
group and a package for another device.
"""
import contextlib
import io
import json
import os
import shutil
import zipfile

import pytest
import torch
from _helpers import greedy

from effexport.exporter.backends.aoti.package import compile_group
from effexport.exporter.backends.aoti.runtime import AotiRuntime
from effexport.exporter.backends.torch.sharded import open_rank
from effexport.exporter.cli import main
from effexport.exporter.errors import LoadError
from effexport.samples import get_sample

MODEL, TP, STEPS = "gemma4-e2b:tiny", 2, 8
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                                    reason="no C++ compiler (g++ or $CXX) for AOTInductor")


def _json(path) -> dict:
    return json.loads(path.read_text())


def _all_reduces(package) -> int:
    """Calls of the all-reduce in the package's generated C++ wrapper."""
    with zipfile.ZipFile(package) as zf:
        return sum(zf.read(n).decode().count("_c10d_functional_all_reduce")
                   for n in zf.namelist() if n.endswith(".wrapper.cpp"))


@needs_compiler
@pytest.mark.slow
def test_aoti_rank_packages_build_run_and_check(tmp_path, capsys):
    out = tmp_path / "gemma"
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        code = main([MODEL, "--target", "aoti", "--tp", str(TP), "--ep", str(TP), "-o", str(out),
                     "--steps", str(STEPS)])
    assert code == 0, log.getvalue()
    assert sorted(os.listdir(out)) == ["effexport.json", "rank0", "rank1", "report.json"]
    m = _json(out / "effexport.json")
    top = m["sharded"]
    assert m["target"] == "aoti" and (top["world"], top["tp"], top["ep"], top["process_group"]) == (TP, TP, TP, "0")
    assert m["files"]["step"] == "rank0/model.pt2" and m["files"]["rank1.step"] == "rank1/model.pt2"
    reduces = []
    for r in range(TP):
        assert sorted(os.listdir(out / f"rank{r}")) == ["effexport.json", "model.pt2"]
        rank = _json(out / f"rank{r}" / "effexport.json")
        assert rank["rank"] == {"rank": r, "world": TP, "process_group": "0"} and rank["target"] == "aoti"
        assert rank["aoti"]["device"] == "cpu" and rank["cache_plan"] == top["ranks"][r]["cache_plan"]
        reduces.append(_all_reduces(out / f"rank{r}" / "model.pt2"))
    assert reduces[0] > 0 and len(set(reduces)) == 1, reduces
    # the build's parity: the rank packages together over gloo, against unsharded fp32 eager
    parity = _json(out / "report.json")["parity"]
    assert parity["passed"] and parity["tokens_equal"] and parity["mode"] == f"sharded, gloo, {TP} ranks"
    assert parity["steps"] == STEPS and all(o["max_rel"] <= 1e-5 for o in parity["outputs"]), parity
    # effexport run: greedy tokens of the ranks together equal eager's
    prompt = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    (tmp_path / "ids.json").write_text(json.dumps(prompt))
    capsys.readouterr()
    assert main(["run", str(out), "--prompt-ids", str(tmp_path / "ids.json"), "--steps", "5"]) == 0
    expected = torch.cat([torch.tensor(prompt), torch.from_numpy(greedy(get_sample(MODEL).build(),
                                                                        torch.tensor(prompt), 5))], 1)
    assert json.loads(capsys.readouterr().out)["tokens"] == expected.tolist()
    assert main(["check", str(out), "--steps", "2"]) == 0
    assert "sharded, gloo, 2 ranks" in "".join(capsys.readouterr())
    for where in (out, out / "rank0"):  # a rank's package alone has no process group to call
        with pytest.raises(LoadError, match="sharded .*effexport run"):
            AotiRuntime(str(where))


BAD = [
    (["--dtype", "bf16"], "--target aoti builds fp32 only"),
    (["--weights", "none"], "--target aoti compiles kernels around real weights"),
    (["--ep", "4"], "--ep 4 with --tp 2: expert parallelism uses the same ranks"),
    (["--kv-cache", "buffer"], "--tp with --kv-cache buffer: sharded builds use growing caches only"),
    (["--stream-weights"], "--target aoti --tp 2 compiles each rank from the model loaded whole"),
]


@pytest.mark.parametrize("flags, message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_aoti_parallel_flags_are_refused(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    assert main([MODEL, "--target", "aoti", "--tp", "2", *flags, "-o", "out"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == []


def test_compile_group_is_a_fake_default_group_named_0():
    """The compile resolves the collectives' group "0" by name (its world size too); none is left behind."""
    import torch.distributed as dist

    with compile_group(None):
        assert not dist.is_initialized()
    for world in (2, 4):
        with compile_group(world):
            assert dist.group.WORLD.group_name == "0" and dist.get_world_size() == world
        assert not dist.is_initialized()


def test_a_rank_package_for_another_device_is_refused(tmp_path):
    (tmp_path / "effexport.json").write_text(json.dumps({"aoti": {"device": "cuda", "pos_device": "cpu"}}))
    with pytest.raises(LoadError, match="compiled for cuda and runs only there"):
        open_rank(str(tmp_path / "model.pt2"), torch.device("cpu"))
