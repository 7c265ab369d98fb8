"""``effexport MODEL --target torch --tp N`` (issue #23, the user-facing half): one ``program.pt2`` per
rank and a topology manifest, the build's parity of the ranks run together over gloo on the CPU,
``effexport check`` of the sharded artifact, ``effexport run`` / ``python -m effexport.launch`` (torchrun's
environment) generating eager's greedy tokens, ``effexport report --tp`` per-rank bytes adding up to
the unsharded plan, and bad values refused with one line, exit 2, nothing written.

Built once: gemma4-e2b:tiny over 2 ranks (4 query heads, 1 KV head: replicated on both ranks),
prefill of 8 tokens + 4 decode steps; about a minute on 2 CPU cores.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from _helpers import greedy, run_cli
from effexport.exporter.backends.artifact import plan_entries
from effexport.exporter.backends.torch.runtime import TorchRuntime
from effexport.exporter.cli import main
from effexport.exporter.errors import LoadError
from effexport.samples import get_sample

MODEL, TP, STEPS = "gemma4-e2b:tiny", 2, 4
PROMPT = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "gemma"
    code, log = run_cli(MODEL, "--target", "torch", "--tp", str(TP), "-o", str(out), "--steps", str(STEPS))
    return code, out, log


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt") / "ids.json"
    path.write_text(json.dumps(PROMPT))
    return path


def _json(path) -> dict:
    return json.loads(path.read_text())


def _expected_tokens(steps: int) -> list:
    prompt = torch.tensor(PROMPT)
    model = get_sample(MODEL).build()
    return torch.cat([prompt, torch.from_numpy(greedy(model, prompt, steps))], 1).tolist()


def test_build_writes_one_program_per_rank_and_the_topology(artifact):
    code, out, log = artifact
    assert code == 0, log
    assert sorted(os.listdir(out)) == ["effexport.json", "rank0", "rank1", "report.json"]
    m = _json(out / "effexport.json")
    top = m["sharded"]
    assert (top["world"], top["tp"], top["ep"], top["process_group"]) == (TP, TP, TP, "0")
    assert m["files"]["step"] == "rank0/program.pt2" and m["files"]["rank1.step"] == "rank1/program.pt2"
    assert "torch" not in m  # the program tables are per rank
    for r in range(TP):
        assert sorted(os.listdir(out / f"rank{r}")) == ["effexport.json", "program.pt2"]
        rank = _json(out / f"rank{r}" / "effexport.json")
        assert rank["rank"] == {"rank": r, "world": TP, "process_group": "0"} and rank["target"] == "torch"
        assert rank["cache_plan"] == top["ranks"][r]["cache_plan"]
        assert top["ranks"][r]["weight_bytes"] == top["weight_bytes"]["per_rank"]
        ep = torch.export.load(str(out / f"rank{r}" / "program.pt2"))
        held = sum(t.numel() * t.element_size() for t in [*ep.state_dict.values(), *ep.constants.values()]
                   if isinstance(t, torch.Tensor))
        assert held == top["weight_bytes"]["per_rank"]
    # the one KV head is replicated: every rank's caches have the unsharded shapes' KV dim (1)
    whole = plan_entries(m)
    for r in range(TP):
        for e, mine in zip(whole, plan_entries(top["ranks"][r])):
            split = top["shard_plan"]["caches"].get(e.name)
            assert mine.shape[1] == (e.shape[1] // split["nblocks"] if split else e.shape[1])
    assert top["shard_plan"]["world"] == TP and top["vocab_size"] == get_sample(MODEL).config.vocab_size
    parity = _json(out / "report.json")["parity"]
    assert parity["passed"] and parity["mode"] == f"sharded, gloo, {TP} ranks" and parity["steps"] == STEPS
    assert max(o["max_rel"] for o in parity["outputs"]) < 1e-5
    assert "[4/6] shard (tensor + expert parallel over 2 ranks)" in log and "PARITY PASSED" in log


def test_check_runs_the_ranks_together(artifact, tmp_path, capsys):
    _, out, _ = artifact
    assert main(["check", str(out), "--steps", "3", "--json", str(tmp_path / "c.json")]) == 0
    result = _json(tmp_path / "c.json")
    assert result["passed"] and result["mode"] == "sharded, gloo, 2 ranks"
    assert result["execution_provider"] == "torch cpu (uncompiled, 2 ranks over gloo)"


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_check_of_a_damaged_rank_is_a_load_error(artifact, tmp_path, capsys, damage):
    _, out, _ = artifact
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    program = copy / "rank1" / "program.pt2"
    if damage == "delete":
        program.unlink()
    else:
        program.write_bytes(program.read_bytes()[:4096])
    assert main(["check", str(copy), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("rank1/program.pt2" in err or "rank 1 of 2 failed" in err), err


def test_one_process_runtime_refuses_a_sharded_artifact(artifact):
    _, out, _ = artifact
    for where in (out, out / "rank0"):
        with pytest.raises(LoadError, match="sharded .*effexport run"):
            TorchRuntime(str(where), device="cpu")


def test_run_starts_the_ranks_and_generates_eagers_tokens(artifact, prompt_file, capsys):
    _, out, _ = artifact
    assert main(["run", str(out), "--prompt-ids", str(prompt_file), "--steps", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == _expected_tokens(5)


def test_launch_under_torchrun_environment(artifact, prompt_file):
    """Two processes given torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as
    ``torchrun --nproc-per-node 2 -m effexport.launch DIR`` starts them: rank 0 prints the tokens."""
    import socket

    _, out, _ = artifact
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(TP):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(TP),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "effexport.launch", str(out), "--prompt-ids",
                                       str(prompt_file), "--steps", "3"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert json.loads(results[0][0])["tokens"] == _expected_tokens(3)
    assert results[1][0] == ""  # only rank 0 prints


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "WORLD_SIZE is 3 but the artifact has 2 ranks"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT not set"),
    ({"RANK": "5", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK 5 is outside 0..1"),
])
def test_run_with_a_wrong_torchrun_environment(artifact, prompt_file, monkeypatch, capsys, env, message):
    _, out, _ = artifact
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["run", str(out), "--prompt-ids", str(prompt_file), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_run_bad_prompt_and_steps(artifact, tmp_path, capsys):
    _, out, _ = artifact
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 99999]")
    assert main(["run", str(out), "--prompt-ids", str(bad)]) == 2
    assert "outside the model's vocabulary" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text("[1, 2]")
    assert main(["run", str(out), "--prompt-ids", str(good), "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
    assert main(["run", str(out / "rank1"), "--prompt-ids", str(good)]) == 2
    assert "is one rank of a sharded artifact: pass the directory above it" in capsys.readouterr().err


BAD = [
    (["--tp", "0"], "--tp 0: give the number of ranks, 2 to 1024"),
    (["--tp", "-2"], "--tp -2: give the number of ranks"),
    (["--tp", "1"], "--tp 1 is the unsharded build: drop --tp"),
    (["--tp", "2", "--ep", "4"], "--ep 4 with --tp 2: expert parallelism uses the same ranks"),
    (["--ep", "2"], "--ep 2 needs --tp"),
    (["--tp", "2", "--target", "onnx"], "use --target torch (--target onnx has no sharded build yet)"),
    (["--tp", "2", "--dtype", "bf16"], "sharded builds are fp32 only"),
    (["--tp", "2", "--weights", "none"], "--weights none"),
    (["--tp", "3"], "--tp 3: layer 0: 4 query heads do not split across 3 ranks; pass a rank count that divides 4"),
]


@pytest.mark.parametrize("flags, message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_parallel_flags_are_refused(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    target = [] if "--target" in flags else ["--target", "torch"]
    assert main([MODEL, *target, *flags, "-o", "out"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") <= 8, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("tp", [2, 4])
def test_report_per_rank_bytes_add_up(tp, capsys):
    """laguna-xs2:tiny: 2 KV heads -- split evenly over 2 ranks (the caches add up to the unsharded
    plan), replicated on 2 of 4 ranks each (the sum is the plan plus one copy of every split cache);
    over 2 ranks the weights add up to the replicated part on every rank plus the split part once
    (over 4, the replicated KV heads' projections count on both of their ranks)."""
    assert main(["report", "laguna-xs2:tiny", "--context", "256", "--tp", str(tp), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["sharded"]
    ranks, whole = data["ranks"], data["unsharded"]
    assert len(ranks) == tp and data["dtype"] == "bf16"
    assert data["sum"]["cache_bytes"] == sum(r["cache_bytes"] for r in ranks)
    assert data["sum"]["cache_bytes"] == whole["cache_bytes"] + data["replicated_kv_bytes"]
    assert (data["replicated_kv_bytes"] == 0) == (tp == 2)
    once = tp * data["weights"]["replicated"] + data["weights"]["split"]
    if tp == 2:
        assert data["sum"]["weight_bytes"] == once
    else:  # the KV projections of a replicated KV head are held by each of its ranks too
        assert data["sum"]["weight_bytes"] > once
    assert whole["weight_bytes"] == data["weights"]["replicated"] + data["weights"]["split"]
    assert all(r["cache_bytes"] < whole["cache_bytes"] for r in ranks) and "expert-parallel" in data["shard_plan"]


def test_report_matches_the_built_ranks(artifact, capsys):
    """``report --tp`` (captured on meta) and the build agree on every rank's cache bytes."""
    _, out, _ = artifact
    assert main(["report", MODEL, "--context", "64", "--tp", str(TP), "--cache-dtype", "fp32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["sharded"]
    top = _json(out / "effexport.json")["sharded"]
    for r in range(TP):
        assert data["ranks"][r]["cache_bytes"] == sum(e.nbytes(1, 64) for e in plan_entries(top["ranks"][r]))
    assert data["ranks"][0]["weight_bytes"] == top["weight_bytes"]["per_rank"]
    assert main(["report", MODEL, "--tp", str(TP)]) == 0
    assert "   sum " in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--tp", "3"], "--tp 3: layer 0: 4 query heads do not split across 3 ranks"),
    (["--tp", "2", "--cache-dtype", "published"], "--tp with --cache-dtype published"),
])
def test_report_bad_tp(capsys, flags, message):
    assert main(["report", MODEL, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
