"""The bad-input catalogue: every user mistake ends with one line ``effexport: error: ...`` naming the
problem and the fix, the exit code of its stage (2 usage/input, 3 capture/rewrite/lowering, 4 backend
missing, 5 output not written, 130 interrupted), no traceback, and nothing written.

Almost every case fails before capture (in-process ``main([...])``, cwd = an empty temporary
directory whose listing must not change). The build-stage failures reuse the session capture
(``rewritten``); the SIGINT case runs a subprocess and interrupts it during capture.
"""
import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from effexport.exporter.cli import main
from effexport.exporter.errors import LowerError

TINY = "gemma4-e2b:tiny"


# ------------------------------------------------------------------------------------------ inputs
def _bytes(n: int) -> bytes:
    return random.Random(0).randbytes(n)


def _state_dict(path="weights.pt"):
    torch.save({"w": torch.zeros(4, 4), "b": torch.zeros(4)}, path)


def _truncated_pt(path="model.pt"):
    torch.save({"w": torch.zeros(64, 64)}, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _module(path="model.pt"):
    torch.save(torch.nn.Linear(2, 2), path)


def _unimportable_module(path="model.pt"):
    """A pickled module whose class lives in a module that is gone when the file is loaded."""
    os.makedirs("userlib", exist_ok=True)
    with open("userlib/user_model.py", "w") as f:
        f.write("import torch\nclass UserModel(torch.nn.Module):\n    pass\n")
    sys.path.insert(0, os.path.abspath("userlib"))
    try:
        import user_model
        torch.save(user_model.UserModel(), path)
    finally:
        sys.path.pop(0)
        sys.modules.pop("user_model", None)


def _safetensors(path, tensors=(("w", (4, 4)),), cut: int = 0):
    """A safetensors file written by hand (no dependency): 8-byte header length, JSON header, data."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = 4 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    data = struct.pack("<Q", len(blob)) + blob + bytes(offset)
    with open(path, "wb") as f:
        f.write(data[:len(data) - cut] if cut else data)


def _hf_dir(path="hf", model_type="llama", weights="ok"):
    os.makedirs(path)
    if model_type is not None:
        config = {"model_type": model_type, "architectures": [f"{model_type.title()}ForCausalLM"]}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    target = os.path.join(path, "model.safetensors")
    if weights == "ok":
        _safetensors(target)
    elif weights == "truncated":
        _safetensors(target, cut=10)
    elif weights == "corrupt":
        open(target, "wb").write(_bytes(300))
    elif weights == "bin":
        _state_dict(os.path.join(path, "pytorch_model.bin"))
    elif weights == "missing-shard":
        _safetensors(os.path.join(path, "model-00001-of-00002.safetensors"))
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)


def _artifact(path="art", source=None, model=True, manifest=None):
    """A minimal artifact directory (what `effexport check` reads first)."""
    os.makedirs(path)
    if manifest is None:
        manifest = {"target": "onnx", "files": {"step": "model.onnx"}, "cache_plan": {"entries": []},
                    "inputs": [], "outputs": [], "dtype": "fp32",
                    "source": source or {"kind": "sample", "name": TINY, "weights": "random"}}
    with open(os.path.join(path, "effexport.json"), "w") as f:
        f.write(manifest if isinstance(manifest, str) else json.dumps(manifest))
    if model:
        open(os.path.join(path, "model.onnx"), "wb").write(model if isinstance(model, bytes) else b"")


def _pt2(path="model.pt2", valid=True):
    if valid:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive_format", "pt2")
    else:
        open(path, "wb").write(_bytes(100))


P = pytest.param
CASES = [
    # files and directories that are not models
    P(None, ["missing.pt", "-o", "out"], 2, "no such file or directory", id="missing-file"),
    P(None, ["models/none", "-o", "out"], 2, "no such file or directory", id="missing-directory"),
    P(None, ["meta-llama/Llama-3-8B", "-o", "out"], 2, "are not downloaded", id="hub-id-not-downloaded"),
    P(lambda: (os.makedirs("notes"), open("notes/a.txt", "w").close()), ["notes", "-o", "out"], 2,
      "not a model directory (no config.json)", id="directory-not-a-model"),
    P(lambda: _artifact("built"), ["built", "-o", "out"], 2, "is an effexport artifact", id="artifact-as-model"),
    P(lambda: open("model.txt", "w").close(), ["model.txt", "-o", "out"], 2, "unknown model file type",
      id="unknown-suffix"),
    P(lambda: open("model.onnx", "wb").close(), ["model.onnx", "-o", "out"], 2, "already an ONNX model",
      id="onnx-file"),
    # torch.save files
    P(_truncated_pt, ["model.pt", "-o", "out"], 2, "truncated or corrupt", id="truncated-pt"),
    P(lambda: open("model.pt", "wb").write(_bytes(200)), ["model.pt", "-o", "out"], 2, "truncated or corrupt",
      id="corrupt-pt"),
    P(lambda: open("model.pt", "wb").close(), ["model.pt", "-o", "out"], 2, "truncated or corrupt", id="empty-pt"),
    P(_state_dict, ["weights.pt", "-o", "out"], 2, "state dict (2 tensors) with no architecture",
      id="state-dict-pt"),
    P(_module, ["model.pt", "-o", "out"], 2, "pass --trust-pickle if you trust", id="pickle-without-trust"),
    P(_module, ["model.pt", "--trust-pickle", "-o", "out"], 2, "does not follow the step contract",
      id="trusted-pickle-not-a-step-model"),
    P(_unimportable_module, ["model.pt", "--trust-pickle", "-o", "out"], 2, "could not be unpickled",
      id="trusted-pickle-class-missing"),
    P(lambda: torch.save([1, 2, 3], "model.pt"), ["model.pt", "--trust-pickle", "-o", "out"], 2,
      "holds a list, not a torch.nn.Module", id="trusted-pickle-not-a-module"),
    P(lambda: _pt2(valid=False), ["model.pt2", "-o", "out"], 2, "not a readable torch.export archive",
      id="corrupt-pt2"),
    P(_pt2, ["model.pt2", "-o", "out"], 2, "pass the model itself", id="pt2-archive-refused"),
    P(lambda: _safetensors("model.safetensors"), ["model.safetensors", "-o", "out"], 2,
      "holds weights only", id="safetensors-file-alone"),
    # Hugging Face directories
    P(lambda: _hf_dir(model_type=None), ["hf", "-o", "out"], 2, "has weights but no config.json",
      id="hf-without-config"),
    P(lambda: (_hf_dir(), open("hf/config.json", "w").write("{model_type")), ["hf", "-o", "out"], 2,
      "is not valid JSON", id="hf-config-not-json"),
    P(lambda: _hf_dir(model_type="bert"), ["hf", "-o", "out"], 2, "is not a decoder-only causal LM",
      id="hf-unsupported-architecture"),
    P(lambda: _hf_dir(weights="none"), ["hf", "-o", "out"], 2, "has no *.safetensors weights",
      id="hf-without-weights"),
    P(lambda: _hf_dir(weights="bin"), ["hf", "-o", "out"], 2, "safe_serialization=True", id="hf-bin-weights-only"),
    P(lambda: _hf_dir(weights="truncated"), ["hf", "-o", "out"], 2, "truncated or corrupt",
      id="hf-truncated-safetensors"),
    P(lambda: _hf_dir(weights="corrupt"), ["hf", "-o", "out"], 2, "truncated or corrupt",
      id="hf-corrupt-safetensors"),
    P(lambda: _hf_dir(weights="missing-shard"), ["hf", "-o", "out"], 2,
      "model-00002-of-00002.safetensors named in model.safetensors.index.json is missing", id="hf-missing-shard"),
    # built-in samples
    P(None, ["gemma5-xl", "-o", "out"], 2, "built-in samples are: gemma4-e2b", id="unknown-sample"),
    P(None, ["deepseek-v3.2", "-o", "out"], 2, "report-only preset", id="report-only-preset"),
    P(None, ["gemma4-e4b", "-o", "out"], 2, "pass --weights none for a structure-only export",
      id="real-size-random-weights"),
    P(_state_dict, ["weights.pt", "--weights", "none", "-o", "out"], 2, "drop --weights none",
      id="weights-none-with-file"),
    # flags
    P(None, [TINY, "--weights", "zero", "-o", "out"], 2, "invalid choice: 'zero'", id="bad-weights"),
    P(None, [TINY, "--profile", "fast", "-o", "out"], 2, "invalid choice: 'fast'", id="bad-profile"),
    P(None, [TINY, "--dtype", "int3", "-o", "out"], 2, "invalid choice: 'int3'", id="bad-dtype"),
    P(None, [TINY, "--dtype", "bf16", "-o", "out"], 2, "build with --dtype fp32", id="dtype-ort-cpu-cannot-check"),
    P(None, [TINY, "--steps", "many", "-o", "out"], 2, "invalid number 'many'", id="steps-text"),
    P(None, [TINY, "--steps", "0", "-o", "out"], 2, "runs 1 to 4096 decode steps", id="steps-zero"),
    P(None, [TINY, "--steps", "-3", "-o", "out"], 2, "runs 1 to 4096 decode steps", id="steps-negative"),
    P(None, [TINY, "--max-context", "lots", "-o", "out"], 2, "invalid context length", id="max-context-text"),
    P(None, [TINY, "--max-context", "0", "-o", "out"], 2, "at least 1 token", id="max-context-zero"),
    P(None, [TINY, "--max-context", "10M", "-o", "out"], 2, "beyond gemma4-e2b:tiny's limit",
      id="max-context-beyond-limit"),
    P(None, [TINY, "--frobnicate", "-o", "out"], 2, "unrecognized arguments: --frobnicate", id="unknown-flag"),
    P(None, [TINY, "--dump-after", "nope", "-o", "out"], 2, "passes are: dead_code, cca, mhc, discover",
      id="unknown-dump-after-pass"),
    P(lambda: (os.makedirs("out"), open("out/keep", "w").close()), [TINY, "-o", "out"], 2,
      "pass --force to replace it", id="output-exists"),
    P(lambda: open("out", "w").close(), [TINY, "-o", "out"], 2, "pass --force to replace it",
      id="output-is-a-file"),
    # report
    P(None, ["report", "gemma5-xl"], 2, "built-in samples are: gemma4-e2b", id="report-unknown-model"),
    P(None, ["report", "gemma4-e2b", "--context", "abc"], 2, "invalid context length", id="context-text"),
    P(None, ["report", "gemma4-e2b", "--context", "0"], 2, "at least 1 token", id="context-zero"),
    P(None, ["report", "gemma4-e2b", "--context", "-5"], 2, "context", id="context-negative"),
    P(None, ["report", "gemma4-e2b", "--cache-dtype", "int3"], 2, "invalid choice", id="cache-dtype"),
    P(None, ["frobnicate"], 2, "unknown model 'frobnicate'", id="unknown-command"),
    # check
    P(None, ["check", "nothing"], 2, "not an effexport artifact", id="check-missing-directory"),
    P(lambda: os.makedirs("empty"), ["check", "empty"], 2, "not an effexport artifact", id="check-non-artifact"),
    P(lambda: _artifact(manifest="{oops"), ["check", "art"], 2, "is not valid JSON", id="check-corrupt-manifest"),
    P(lambda: _artifact(manifest={"target": "onnx"}), ["check", "art"], 2, "lacks 'files'",
      id="check-incomplete-manifest"),
    P(lambda: _artifact(model=False), ["check", "art"], 2, "lacks model.onnx", id="check-missing-model"),
    P(lambda: _artifact(model=_bytes(64)), ["check", "art"], 2, "ONNX Runtime cannot load model.onnx",
      id="check-corrupt-model"),
    P(lambda: _artifact(source={"kind": "sample", "name": TINY, "weights": "none"}), ["check", "art"], 2,
      "structure-only", id="check-structure-only"),
    P(lambda: _artifact(source={"kind": "pickle", "path": "m.pt"}), ["check", "art"], 2,
      "pass --trust-pickle", id="check-pickle-untrusted"),
    P(lambda: _artifact(source={"kind": "module", "class": "x.Y"}), ["check", "art"], 2,
      "check parity from Python", id="check-in-memory-module"),
]


def _listing(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs + [""])


def assert_one_line_error(err: str, needle: str):
    """Exactly one ``effexport: error:`` line, holding ``needle``; no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("effexport: error: ")]
    assert len(errors) == 1, err
    assert needle in errors[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("setup, argv, code, needle", CASES)
def test_bad_input(tmp_path, monkeypatch, capsys, setup, argv, code, needle):
    monkeypatch.chdir(tmp_path)
    if setup:
        setup()
    before = _listing(tmp_path)
    assert main(argv) == code
    assert_one_line_error(capsys.readouterr().err, needle)
    assert _listing(tmp_path) == before  # no partial output, no temporary directory


def test_catalogue_size():
    assert len(CASES) >= 30


# ------------------------------------------------------------------------------- missing backends
@pytest.mark.parametrize("module, argv, needle", [
    P("onnxruntime", [TINY, "-o", "out"], "pip install onnx onnxruntime", id="onnxruntime-build"),
    P("onnx", [TINY, "-o", "out"], "pip install onnx onnxruntime", id="onnx-build"),
    P("onnxruntime", ["check", "art"], "pip install onnxruntime", id="onnxruntime-check"),
    P("transformers", ["hf", "-o", "out"], "pip install 'effexport[hf]'", id="transformers-hf-directory"),
])
def test_backend_missing_is_exit_4(tmp_path, monkeypatch, capsys, module, argv, needle):
    """A module set to None in sys.modules cannot be imported: the same ImportError as not installed."""
    monkeypatch.chdir(tmp_path)
    _artifact()
    _hf_dir()
    before = _listing(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)
    assert main(argv) == 4
    assert_one_line_error(capsys.readouterr().err, needle)
    assert _listing(tmp_path) == before


# --------------------------------------------------------------------- failures during the build
def _fake_lowering(monkeypatch, rewritten, export_step):
    """Builds that skip capture (the session's shared capture of TINY) and lower with ``export_step``."""
    import effexport.exporter.capture as capture_mod
    import effexport.exporter.onnx.export as export_mod

    captured = rewritten(TINY).captured  # the same model and tokens the build would capture
    monkeypatch.setattr(capture_mod, "capture_step", lambda model, ids: captured)
    monkeypatch.setattr(export_mod, "export_step", export_step)


def test_force_replaces_an_existing_directory(tmp_path, monkeypatch, capsys, rewritten):
    import onnx

    def write_stub(program, plan, path, **kwargs):
        model = onnx.helper.make_model(onnx.helper.make_graph([], "stub", [], []))
        onnx.save(model, path)
        return model
    _fake_lowering(monkeypatch, rewritten, write_stub)
    monkeypatch.chdir(tmp_path)
    os.makedirs("out/old")
    open("out/old/stale.txt", "w").close()
    assert main([TINY, "-o", "out", "--no-check", "--force"]) == 0
    assert sorted(os.listdir("out")) == ["effexport.json", "model.onnx", "report.json"]
    assert os.listdir(tmp_path) == ["out"]
    assert json.load(open("out/effexport.json"))["command"][-1] == "--force"


@pytest.mark.parametrize("error, code, needle", [
    P(LowerError("lowering failed: op X has no translation (pass: rewrite)"), 3, "op X has no translation",
      id="lower-error"),
    P(OSError(errno.ENOSPC, "No space left on device"), 5, "No space left on device; free space", id="disk-full"),
    P(KeyboardInterrupt(), 130, "interrupted", id="interrupt"),
])
def test_failed_build_leaves_nothing(tmp_path, monkeypatch, capsys, rewritten, error, code, needle):
    """The failure strikes while model.onnx is being written (half a file is on disk)."""
    def fail_while_writing(program, plan, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\0" * 1024)
        raise error
    _fake_lowering(monkeypatch, rewritten, fail_while_writing)
    monkeypatch.chdir(tmp_path)
    assert main([TINY, "-o", "out", "--no-check"]) == code
    err = capsys.readouterr().err
    if code == 130:
        assert "effexport: interrupted" in err and "nothing was written" in err and "Traceback" not in err
    else:
        assert_one_line_error(err, needle)
    assert os.listdir(tmp_path) == []


def _interactive_sigint() -> None:
    """In the child before exec: Ctrl-C as in a terminal (default disposition, not blocked). A child
    inherits an ignored or blocked SIGINT, and Python then never raises KeyboardInterrupt (right for a
    background job). In two full pytest-xdist runs the build ran to the end and exited 0 while the
    test passed alone and under load; the presumed cause (not proven) is an earlier test in the same
    worker leaving SIGINT ignored or blocked. The failure message prints the worker's state."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_sigint_during_build_exits_130_and_leaves_nothing(tmp_path):
    """A real SIGINT to a running build (during capture): exit 130, one line, no traceback, no output."""
    proc = subprocess.Popen([sys.executable, "-m", "effexport.exporter", TINY, "-o", "out"], cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_interactive_sigint)
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        lines.append(line)
        if "capture" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    err = "".join(lines) + rest
    assert proc.returncode == 130, (f"this process: SIGINT handler {signal.getsignal(signal.SIGINT)}, blocked "
                                    f"{signal.pthread_sigmask(signal.SIG_BLOCK, [])}\n{err}")
    assert "effexport: interrupted" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_output_directory_gets_a_normal_mode(tmp_path):
    """The temporary directory (mkdtemp: 0700) is renamed into place with the mode of a new directory."""
    from effexport.exporter._io import atomic_directory

    umask = os.umask(0)
    os.umask(umask)
    with atomic_directory(str(tmp_path / "out")) as tmp:
        open(os.path.join(tmp, "f"), "w").close()
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask
