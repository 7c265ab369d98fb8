"""``effexport MODEL --target aoti``: an AOTInductor package of the rewritten step, built once on the CPU
(gemma4-e2b:tiny, parity over prefill + 8 decode steps), then: parity numbers, the package's structure
(the ``effexport`` op calls it makes, its I/O = the CachePlan's caches), ``AotiRuntime`` (numpy and
torch paths, greedy generation against eager), ``effexport check`` / ``list``, and the target's bad
inputs; and ``effexport.export(module, target="aoti")`` of a two-layer step-contract module (a second,
smaller compile, ~30-70 s). One module-scoped build: the AOTInductor C++ compile dominates (~1-2 min on 2 cores).

Not covered here: CUDA packages (no GPU; the same code path with ``device="cuda"``), the DeepSeek V4
ops (a second compile would double the time; see the README for the one-off check), and byte-identical
rebuilds (AOTInductor packages are not, see :mod:`effexport.exporter.backends.aoti.package`).
"""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch
from _helpers import greedy

from effexport.exporter.backends.aoti import PACKAGE_FILE, custom_op_calls
from effexport.exporter.backends.aoti.runtime import AotiRuntime
from effexport.exporter.cli import main
from effexport.exporter.errors import LoadError, LowerError
from effexport.passes.pipeline import PASS_NAMES
from effexport.samples import get_sample

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                                reason="no C++ compiler (g++ or $CXX) for AOTInductor")
MODEL = "gemma4-e2b:tiny"
STEPS = 8
LAST_PASS = PASS_NAMES[-1]  # its dump is the rewritten step program the package was compiled from


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti") / "gemma"
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        code = main([MODEL, "--target", "aoti", "-o", str(out), "--steps", str(STEPS), "--dump-after", LAST_PASS])
    return code, out, log.getvalue()


@pytest.fixture(scope="module")
def runtime(artifact):
    return AotiRuntime(str(artifact[1]))


def _json(path) -> dict:
    return json.loads(path.read_text())


def test_build_passes_parity_within_fp32(artifact):
    code, out, log = artifact
    assert code == 0, log
    assert sorted(os.listdir(out)) == ["effexport.json", f"graph-after-{LAST_PASS}.py", "model.pt2", "report.json"]
    assert os.listdir(out.parent) == ["gemma"]  # no temporary directory left behind
    if not torch.cuda.is_available():
        assert "compile with AOTInductor for cpu (torch sees no CUDA device: this is a CPU package)" in log
    parity = _json(out / "report.json")["parity"]
    assert parity["passed"] and parity["tokens_equal"] and parity["steps"] == STEPS
    assert {o["name"] for o in parity["outputs"]} == {"logits/prefill", "logits/decode"}
    assert all(o["max_rel"] <= 1e-5 for o in parity["outputs"]), parity


def test_manifest_names_the_package_and_device(artifact):
    _, out, _ = artifact
    m = _json(out / "effexport.json")
    assert m["target"] == "aoti" and m["files"] == {"step": PACKAGE_FILE}
    assert m["opset"] is None and m["ir_version"] is None and m["profile"] is None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert m["aoti"]["device"] == device and m["aoti"]["metadata"]["AOTI_DEVICE_KEY"] == device
    names = [e["name"] for e in m["cache_plan"]["entries"]]
    assert m["inputs"] == ["input_ids", "pos"] + [f"past.{n}" for n in names]
    assert m["outputs"] == ["logits"] + [f"present.{n}" for n in names]


def test_package_calls_the_effexport_ops(artifact):
    """Every effexport op call of the rewritten step program is one call in the compiled package
    (through AOTInductor's proxy executor), none decomposed or dropped: gemma4-e2b:tiny has 4 ring
    and 1 full owner, 4 consumers of ring layers (attention_ring over the producer's ring) and one of
    the full layer (attention_read)."""
    _, out, _ = artifact
    code = (out / f"graph-after-{LAST_PASS}.py").read_text()
    in_program = Counter(f"effexport::{m}" for m in re.findall(r"torch\.ops\.effexport\.(\w+)\.default\(", code))
    calls = custom_op_calls(str(out / PACKAGE_FILE))
    assert calls == in_program
    assert dict(calls) == {"effexport::attention_ring": 8, "effexport::attention_cache": 1,
                           "effexport::attention_read": 1}
    passes = _json(out / "report.json")["passes"]
    assert passes["rewrite"]["ring"] + passes["rewrite"]["full"] + passes["kv_sharing"]["consumers"] == 10
    with zipfile.ZipFile(out / PACKAGE_FILE) as zf:
        wrapper = next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".wrapper.cpp"))
    assert wrapper.count("aoti_torch_proxy_executor_call_function(proxy_executor") == sum(calls.values())


def test_caches_are_exactly_the_cache_plan(runtime):
    """The package takes and returns exactly the plan's caches: count, dtype and shape after a
    prefill and after decode steps past the window (rings stay W slots, full caches grow by one)."""
    batch, prompt = 2, 8
    caches = runtime.initial_caches_torch(batch)
    assert len(caches) == len(runtime.entries) > 0
    ids = torch.randint(0, 64, (batch, prompt))
    logits, caches = runtime.step_torch(ids, 0, caches)
    length = prompt
    for i in range(STEPS):
        logits, caches = runtime.step_torch(logits[:, -1:].argmax(-1), length, caches)
        length += 1
    assert logits.shape[:2] == (batch, 1)
    kinds = Counter()
    for entry, cache in zip(runtime.entries, caches, strict=True):
        assert tuple(cache.shape) == tuple(entry.concrete_shape(batch, length)), entry.name
        assert cache.dtype == getattr(torch, entry.dtype) and cache.device == runtime.device
        kinds["seq" in entry.shape] += 1
    assert kinds[True] and kinds[False]  # full caches grew to `length`; rings did not


def test_generate_equals_eager_greedy(runtime):
    sample = get_sample(MODEL)
    model = sample.build()
    prompt = torch.randint(0, sample.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    tokens, logits = runtime.generate(prompt.numpy(), 10)
    assert np.array_equal(tokens, greedy(model, prompt, 10))
    assert len(logits) == 10




def test_torch_and_numpy_paths_agree_and_views_are_made_contiguous(runtime):
    """A strided view fed to the compiled code directly gives wrong numbers (it assumes the
    example's contiguous strides); the runtime makes every input contiguous."""
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(4))
    view = ids[:, :8]
    assert not view.is_contiguous()
    from_view, _ = runtime.step_torch(view, 0, runtime.initial_caches_torch(2))
    from_numpy = runtime.step(view.numpy(), 0, runtime.initial_caches(2))
    from_copy, _ = runtime.step_torch(view.clone(), 0, runtime.initial_caches_torch(2))
    assert torch.equal(from_view, from_copy)
    assert np.array_equal(from_numpy.logits, from_copy.cpu().numpy())


def test_check_reruns_parity_through_the_package(artifact, capsys):
    _, out, _ = artifact
    assert main(["check", str(out), "--steps", "4"]) == 0
    assert "PARITY PASSED" in capsys.readouterr().out


def test_list_shows_the_target(capsys):
    assert main(["list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("aoti"))
    assert line.endswith("-- available") and "AOTInductor" in line


def test_loading_needs_the_effexport_ops_registered(artifact):
    """The package resolves the effexport ops in the dispatcher at load: a process that has not
    imported effexport.custom_ops cannot load it (why AotiRuntime imports them first)."""
    _, out, _ = artifact
    code = f"import torch; torch._inductor.aoti_load_package({str(out / PACKAGE_FILE)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Could not find schema for effexport::" in proc.stderr


# --- bad inputs: one line, the exit code of exporter/errors.py, nothing written ---------------------

def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("effexport: error: ") and "Traceback" not in err
    return err


def test_missing_compiler_exits_4_and_list_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert main([MODEL, "--target", "aoti", "-o", str(tmp_path / "out")]) == 4
    assert "needs a C++ compiler" in _one_line_error(capsys) and not (tmp_path / "out").exists()
    assert main(["list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("aoti"))
    assert "-- unavailable: the aoti target needs a C++ compiler" in line


def test_gpu_machine_is_refused_with_the_workaround(tmp_path, monkeypatch, capsys):
    """Where torch sees a GPU the build would compile a CUDA package, which torch's loader crashed on
    (README): exit 4 naming the workarounds, nothing written; the opt-in lets it through the check."""
    import effexport.exporter.backends.aoti.package as pkg

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(pkg.CUDA_OPT_IN, raising=False)
    assert main([MODEL, "--target", "aoti", "-o", str(tmp_path / "out")]) == 4
    err = _one_line_error(capsys)
    assert "CUDA_VISIBLE_DEVICES=''" in err and pkg.CUDA_OPT_IN in err and not (tmp_path / "out").exists()
    monkeypatch.setenv(pkg.CUDA_OPT_IN, "1")
    pkg.check_cuda()  # no error


def test_structure_only_is_refused(tmp_path, capsys):
    assert main([MODEL, "--target", "aoti", "--weights", "none", "-o", str(tmp_path / "out")]) == 2
    assert "--weights none" in _one_line_error(capsys) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", [pytest.param("truncate", id="truncated-package"),
                                    pytest.param("delete", id="missing-package")])
def test_check_of_a_damaged_package_exits_2(artifact, tmp_path, capsys, damage):
    _, out, _ = artifact
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    package = copy / PACKAGE_FILE
    if damage == "delete":
        package.unlink()
    else:
        package.write_bytes(package.read_bytes()[:4096])
    assert main(["check", str(copy)]) == 2
    err = _one_line_error(capsys)
    assert ("lacks model.pt2" if damage == "delete" else "AOTInductor cannot load model.pt2") in err


def test_runtime_refuses_another_device(artifact):
    _, out, _ = artifact
    other = "cpu" if torch.cuda.is_available() else "cuda"
    with pytest.raises(LoadError, match="runs only on that device"):
        AotiRuntime(str(out), device=other)


def test_compile_failure_is_a_lower_error_and_leaves_no_file(tmp_path, monkeypatch):
    """A failing AOTInductor compile (here: the C++ compiler) is one LowerError line (exit 3) and the
    half-written package is removed."""
    import effexport.exporter.backends.aoti.package as pkg

    def fail(ep, package_path, inductor_configs):
        with open(package_path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("C++ compile failed: boom\nlong compiler output")
    monkeypatch.setattr(pkg, "_program_for", lambda *args: None)
    monkeypatch.setattr(pkg, "_weights_apart", lambda ep: False)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail)
    path = tmp_path / PACKAGE_FILE
    message = r"could not compile the step program: RuntimeError: C\+\+ compile failed: boom$"
    with pytest.raises(LowerError, match=message) as exc:
        pkg.compile_package(None, None, str(path), "cpu")
    assert exc.value.exit_code == 3 and not path.exists()


@pytest.mark.slow
def test_weights_beside_the_package_above_the_limit(tmp_path, monkeypatch, capsys):
    """Above ``WEIGHTS_IN_SO_LIMIT`` (real-size models; here the limit is set to 0) the package is
    compiled without its weights, which go to ``model.weights.pt`` and are loaded with
    ``load_constants``: parity as with embedded weights, and a missing weights file is a load error
    naming it (exit 2), not a crash."""
    import effexport.exporter.backends.aoti.package as pkg

    monkeypatch.setattr(pkg, "WEIGHTS_IN_SO_LIMIT", 0)
    out = tmp_path / "apart"
    assert main([MODEL, "--target", "aoti", "-o", str(out), "--steps", str(STEPS)]) == 0
    manifest = _json(out / "effexport.json")
    assert manifest["files"] == {"step": PACKAGE_FILE, "weights": pkg.WEIGHTS_FILE}
    assert manifest["aoti"]["weights"] == pkg.WEIGHTS_FILE
    weights = torch.load(out / pkg.WEIGHTS_FILE, weights_only=True)
    fqns = AotiRuntime(str(out)).model.get_constant_fqns()  # the constants the package must be given
    assert fqns and set(fqns) <= set(weights)
    parity = _json(out / "report.json")["parity"]
    assert parity["passed"] and all(o["max_rel"] <= 1e-5 for o in parity["outputs"]), parity
    os.remove(out / pkg.WEIGHTS_FILE)
    capsys.readouterr()
    assert main(["check", str(out)]) == 2
    assert f"lacks {pkg.WEIGHTS_FILE}" in _one_line_error(capsys)


def test_python_export_to_aoti(tmp_path):
    """``effexport.export(module, target="aoti")`` of a step-contract module (the two-layer causal
    model of ``models.negatives``): the returned directory holds an AOTInductor package whose build
    passed parity (prefill + 4 steps), and its runtime's greedy tokens are the module's. A second
    compile (~30 s on one core), of a model with one op kind."""
    import effexport
    from models import negatives

    model = negatives.build(negatives.NegConfig(layers=2, vocab=40))
    out = effexport.export(model, target="aoti", output=str(tmp_path / "neg"), name="neg", steps=4)
    assert out == str(tmp_path / "neg")
    manifest = _json(tmp_path / "neg" / "effexport.json")
    assert manifest["target"] == "aoti" and manifest["files"] == {"step": PACKAGE_FILE}
    parity = _json(tmp_path / "neg" / "report.json")["parity"]
    assert parity["passed"] and parity["steps"] == 4
    prompt = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(5))
    tokens, _ = AotiRuntime(out).generate(prompt.numpy(), 5)
    assert np.array_equal(tokens, greedy(model, prompt, 5))
