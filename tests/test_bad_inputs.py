"""The bad-input catalogue: every user mistake ends with one line ``effexport: error: ...`` naming the
problem and the fix, the exit code of its stage (2 usage/input, 3 capture/rewrite/lowering, 4 backend
missing, 5 output not written, 70 a bug, 128+N stopped by signal N), no traceback, and nothing written.

Almost every case fails before capture (in-process ``main([...])``, cwd = an empty temporary
directory whose listing must not change; hostile inputs too: devices, FIFOs, dangling and looping
symlinks, configs sized to exhaust memory, malformed safetensors headers and artifact manifests,
``--force`` aimed at what it must never replace). The build-stage failures reuse the session capture
(``rewritten``); the signal cases interrupt a build in-process and, for SIGINT and SIGTERM, a real
subprocess during capture. ``tests/test_fuzz_inputs.py`` generates malformed inputs of the same classes.

The file is long on purpose: ``CASES`` is one table, so every bad input is read next to its exit code
and message, and the build-stage cases share one capture.
"""
import errno
import importlib.util
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


def _config(path="hf", **fields):
    """A Hugging Face directory whose config.json sets ``fields`` over a tiny Llama's (valid weights file)."""
    _hf_dir(path)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    config.update(fields)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(json.dumps(config) if not isinstance(fields.get("raw"), str) else fields["raw"])


def _header(header, path="hf/model.safetensors", data=b""):
    """A Hugging Face directory whose one shard has ``header`` (any JSON, or raw bytes) over ``data``."""
    _hf_dir(os.path.dirname(path) or ".")
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def _tensor(**info):
    return {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], **info}}


def _nested(depth=100_000) -> str:
    return "[" * depth + "]" * depth


def _fifo(path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path)


def _link(target, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)


def _manifest(**fields):
    """An artifact whose valid-looking manifest has ``fields`` replaced."""
    manifest = {"target": "onnx", "files": {"step": "model.onnx"}, "cache_plan": {"entries": []},
                "inputs": [], "outputs": [], "dtype": "fp32", "max_context": 4096,
                "source": {"kind": "sample", "name": TINY, "weights": "random"}}
    manifest.update(fields)
    _artifact(manifest=manifest)


def _contents(path="out") -> dict:
    return {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}


def _old_artifact(path="out"):
    """A directory a build wrote (its manifest), to be replaced by --force."""
    _artifact(path)


def _nested_cwd():
    """cwd = art/sub inside an artifact directory ``art``."""
    _artifact("art")
    os.makedirs("art/sub")
    os.chdir("art/sub")


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
    P(None, [TINY, "--dtype", "bf16", "--target", "aoti", "-o", "out"], 2, "builds fp32 only",
      id="dtype-half-not-onnx"),
    P(None, [TINY, "--steps", "many", "-o", "out"], 2, "invalid number 'many'", id="steps-text"),
    P(None, [TINY, "--steps", "0", "-o", "out"], 2, "runs 1 to 4096 decode steps", id="steps-zero"),
    P(None, [TINY, "--steps", "-3", "-o", "out"], 2, "runs 1 to 4096 decode steps", id="steps-negative"),
    P(None, [TINY, "--max-context", "lots", "-o", "out"], 2, "invalid context length", id="max-context-text"),
    P(None, [TINY, "--max-context", "0", "-o", "out"], 2, "at least 1 token", id="max-context-zero"),
    P(None, [TINY, "--max-context", "10M", "-o", "out"], 2, "beyond gemma4-e2b:tiny's limit",
      id="max-context-beyond-limit"),
    P(None, [TINY, "--frobnicate", "-o", "out"], 2, "unrecognized arguments: --frobnicate", id="unknown-flag"),
    P(None, [TINY, "--dump-after", "nope", "-o", "out"], 2, "passes are: complex, dead_code, cca, mhc, discover",
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
    # --force replaces only an artifact directory, never what holds the cwd or the input
    P(lambda: (os.makedirs("out"), open("out/keep", "w").close()), [TINY, "-o", "out", "--force"], 2,
      "replaces only an effexport artifact", id="force-not-an-artifact"),
    P(lambda: open("out", "w").close(), [TINY, "-o", "out", "--force"], 2, "is not a directory",
      id="force-output-is-a-file"),
    P(lambda: open("effexport.json", "w").close(), [TINY, "-o", ".", "--force"], 2, "is the current directory",
      id="force-current-directory"),
    P(_nested_cwd, [TINY, "-o", "..", "--force"], 2, "is the current directory or contains it",
      id="force-ancestor-of-cwd"),
    P(_hf_dir, ["hf", "-o", "hf", "--force"], 2, "the model being exported", id="force-input-dir-as-output"),
    P(lambda: (_artifact("models"), _module("models/model.pt")),
      ["models/model.pt", "--trust-pickle", "-o", "models", "--force"], 2, "inside the model being exported",
      id="force-output-holds-the-input"),
    P(lambda: (_artifact("real"), os.symlink("real", "out")), [TINY, "-o", "out", "--force"], 2,
      "is a symbolic link", id="force-output-is-a-symlink"),
    # model paths that are not regular files
    P(lambda: _link("/dev/zero", "model.pt"), ["model.pt", "-o", "out"], 2, "not a regular file",
      id="model-is-dev-zero"),
    P(lambda: _fifo("model.pt"), ["model.pt", "-o", "out"], 2, "not a regular file", id="model-is-a-fifo"),
    P(lambda: _link("nowhere.pt", "model.pt"), ["model.pt", "-o", "out"], 2, "symbolic link to nothing",
      id="model-dangling-symlink"),
    P(lambda: (_link("b.pt", "a.pt"), _link("a.pt", "b.pt")), ["a.pt", "-o", "out"], 2, "symbolic link to nothing",
      id="model-looping-symlink"),
    P(lambda: (_hf_dir(), _fifo("hf/config.json")), ["hf", "-o", "out"], 2, "not a regular file",
      id="hf-config-is-a-fifo"),
    P(lambda: (_hf_dir(), _link("/dev/zero", "hf/config.json")), ["hf", "-o", "out"], 2, "not a regular file",
      id="hf-config-is-dev-zero"),
    P(lambda: (_hf_dir(), _link("gone.json", "hf/config.json")), ["hf", "-o", "out"], 2, "symbolic link to nothing",
      id="hf-config-dangling-symlink"),
    P(lambda: (_config(), os.unlink("hf/model.safetensors"), os.makedirs("hf/model.safetensors")),
      ["hf", "-o", "out"], 2, "is a directory", id="hf-shard-is-a-directory"),
    P(lambda: (_config(), _link("gone", "hf/model.safetensors")), ["hf", "-o", "out"], 2,
      "symbolic link to nothing", id="hf-shard-dangling-symlink"),
    P(lambda: (_config(), _fifo("hf/model.safetensors")), ["hf", "-o", "out"], 2, "not a regular file",
      id="hf-shard-is-a-fifo"),
    # configs that would allocate without bound or make no sense
    P(lambda: _config(num_hidden_layers=10**9), ["hf", "-o", "out"], 2, "num_hidden_layers = 1000000000 is outside",
      id="config-layers-1e9"),
    P(lambda: _config(num_hidden_layers=-2), ["hf", "-o", "out"], 2, "num_hidden_layers = -2 is outside",
      id="config-layers-negative"),
    P(lambda: _config(num_hidden_layers="12"), ["hf", "-o", "out"], 2, "num_hidden_layers is '12', not a whole",
      id="config-layers-string"),
    P(lambda: _config(num_hidden_layers=2.5), ["hf", "-o", "out"], 2, "num_hidden_layers is 2.5, not a whole",
      id="config-layers-float"),
    P(lambda: _config(sliding_window=10**9), ["hf", "-o", "out"], 2, "sliding_window = 1000000000 is outside",
      id="config-window-1e9"),
    P(lambda: _config(vocab_size=10**10), ["hf", "-o", "out"], 2, "vocab_size = 10000000000 is outside",
      id="config-vocab-1e10"),
    P(lambda: _config(text_config={"hidden_size": 1 << 30}), ["hf", "-o", "out"], 2, "text_config.hidden_size",
      id="config-nested-text-config"),
    P(lambda: _config(hidden_size=66), ["hf", "-o", "out"], 2, "not divisible by num_attention_heads",
      id="config-heads-do-not-divide-hidden"),
    P(lambda: _config(num_key_value_heads=3), ["hf", "-o", "out"], 2, "not a multiple of num_key_value_heads",
      id="config-kv-heads-do-not-divide-heads"),
    P(lambda: _config(architectures="LlamaForCausalLM"), ["hf", "-o", "out"], 2,
      "'architectures' must be a list", id="config-architectures-not-a-list"),
    P(lambda: _config(model_type=["llama"]), ["hf", "-o", "out"], 2, "has no 'model_type'",
      id="config-model-type-not-a-string"),
    P(lambda: _config(raw=_nested()), ["hf", "-o", "out"], 2, "nested too deeply", id="config-nested-json"),
    P(lambda: _config(raw="\u0000" * 10), ["hf", "-o", "out"], 2, "is not valid JSON", id="config-binary"),
    P(lambda: _config(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
      ["hf", "-o", "out"], 4, "pip install bitsandbytes", id="config-bitsandbytes-missing",
      marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None,
                               reason="bitsandbytes is installed here")),
    P(lambda: _config(quantization_config="4bit"), ["hf", "-o", "out"], 2, "quantization_config has no",
      id="config-quantization-not-an-object"),
    # safetensors index and headers
    P(lambda: (_config(), open("hf/model.safetensors.index.json", "w").write(_nested())), ["hf", "-o", "out"], 2,
      "nested too deeply", id="index-nested-json"),
    P(lambda: (_config(), open("hf/model.safetensors.index.json", "w").write('{"weight_map": "model"}')),
      ["hf", "-o", "out"], 2, "not a valid safetensors index", id="index-weight-map-not-an-object"),
    P(lambda: (_config(), open("hf/model.safetensors.index.json", "w").write(
        '{"weight_map": {"w": "../elsewhere.safetensors"}}')), ["hf", "-o", "out"], 2,
      "outside the model directory", id="index-shard-outside"),
    P(lambda: _header(_tensor(data_offsets="0,16"), data=bytes(16)), ["hf", "-o", "out"], 2, "has no data_offsets",
      id="safetensors-string-offsets"),
    P(lambda: _header(_tensor(data_offsets=[-16, 0]), data=bytes(16)), ["hf", "-o", "out"], 2,
      "has data_offsets [-16, 0]", id="safetensors-negative-offsets"),
    P(lambda: _header(_tensor(shape=[1 << 40], data_offsets=[0, 4 << 40])), ["hf", "-o", "out"], 2,
      "the header describes", id="safetensors-huge-claimed-tensor"),
    P(lambda: _header(_tensor(dtype="F64"), data=bytes(16)), ["hf", "-o", "out"], 2,
      "F64 [4] needs 32 bytes, data_offsets span 16", id="safetensors-dtype-vs-length"),
    P(lambda: _header(_tensor(dtype="Q3"), data=bytes(16)), ["hf", "-o", "out"], 2, "unknown dtype",
      id="safetensors-unknown-dtype"),
    P(lambda: _header(_tensor(shape="4"), data=bytes(16)), ["hf", "-o", "out"], 2, "not a list of sizes",
      id="safetensors-shape-not-a-list"),
    P(lambda: _header({"w": [0, 16]}, data=bytes(16)), ["hf", "-o", "out"], 2, "not described by an object",
      id="safetensors-entry-not-an-object"),
    P(lambda: _header(_nested(50_000).encode()), ["hf", "-o", "out"], 2, "nested too deeply",
      id="safetensors-nested-header"),
    # report --plot paths
    P(None, ["report", "gemma4-e2b", "--plot", "kv.txt"], 2, "cannot draw a .txt file", id="plot-unknown-suffix"),
    P(None, ["report", "gemma4-e2b", "--plot", "."], 2, "is a directory", id="plot-directory"),
    P(None, ["report", "gemma4-e2b", "--plot", "missing/dir/kv.png"], 2, "'missing/dir' does not exist",
      id="plot-missing-directory"),
    # parity past --max-context, messages
    P(None, [TINY, "--max-context", "16", "--steps", "16", "-o", "out"], 2, "go past --max-context 16",
      id="steps-past-max-context"),
    P(None, ["report", "gemma4-e2b", "--context", "9" * 5000], 2, "invalid context length", id="huge-echo"),
    P(None, [], 2, "give a MODEL to export or a command", id="no-arguments"),
    # check: the manifest is untrusted
    P(lambda: (_manifest(files={"step": "../elsewhere/model.onnx"}), os.makedirs("elsewhere"),
               open("elsewhere/model.onnx", "wb").close()), ["check", "art"], 2, "outside the artifact directory",
      id="check-manifest-path-escape"),
    P(lambda: _manifest(files={"step": "/etc/passwd"}), ["check", "art"], 2, "outside the artifact directory",
      id="check-manifest-absolute-path"),
    P(lambda: (_manifest(files={"step": "link.onnx"}), os.makedirs("elsewhere"),
               open("elsewhere/model.onnx", "wb").close(), _link("../elsewhere/model.onnx", "art/link.onnx")),
      ["check", "art"], 2, "outside the artifact directory", id="check-manifest-symlink-escape"),
    P(lambda: _manifest(files=["model.onnx"]), ["check", "art"], 2, "no 'files' object", id="check-files-not-a-dict"),
    P(lambda: _manifest(files={"step": 3}), ["check", "art"], 2, "no 'files' object", id="check-files-step-not-a-name"),
    P(lambda: _manifest(dtype="int3"), ["check", "art"], 2, "unknown dtype 'int3'", id="check-unknown-dtype"),
    P(lambda: _manifest(target="tpu"), ["check", "art"], 2, "unknown target 'tpu'", id="check-unknown-target"),
    P(lambda: _manifest(inputs="input_ids"), ["check", "art"], 2, "not a list of names", id="check-inputs-not-a-list"),
    P(lambda: _manifest(source="gemma"), ["check", "art"], 2, "'source' that is not an object",
      id="check-source-not-an-object"),
    P(lambda: _manifest(cache_plan={"entries": [{"name": "k"}]}), ["check", "art"], 2, "malformed CachePlan entry",
      id="check-cache-entry-malformed"),
    P(lambda: _manifest(cache_plan={"entries": [{"name": "k", "layer": 0, "kind": "full", "dtype": "float32",
                                                 "shape": ["batch", 1 << 20, 1 << 20]}]}), ["check", "art"], 2,
      "GiB", id="check-cache-entry-huge"),
    P(lambda: _artifact(manifest=_nested()), ["check", "art"], 2, "nested too deeply", id="check-nested-manifest"),
    P(lambda: _artifact(manifest="[1, 2]"), ["check", "art"], 2, "is not a JSON object", id="check-manifest-a-list"),
    P(lambda: (_artifact(manifest=False), os.unlink("art/effexport.json"), _fifo("art/effexport.json")),
      ["check", "art"], 2, "not a regular file", id="check-manifest-is-a-fifo"),
    P(lambda: _manifest(), ["check", "art", "--steps", "0"], 2, "runs 1 to 4096 decode steps", id="check-steps-zero"),
    P(lambda: _manifest(), ["check", "art", "--steps", "-1"], 2, "runs 1 to 4096", id="check-steps-negative"),
    P(lambda: _manifest(), ["check", "art", "--steps", "1000000000"], 2, "runs 1 to 4096", id="check-steps-1e9"),
    P(lambda: _manifest(max_context=16), ["check", "art", "--steps", "16"], 2, "go past --max-context 16",
      id="check-steps-past-max-context"),
]


def _listing(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs + [""])


def assert_one_line_error(err: str, needle: str):
    """Exactly one ``effexport: error:`` line, holding ``needle``, of bounded length, no ANSI escape, no
    internal function name; no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("effexport: error: ")]
    assert len(errors) == 1, err
    assert needle in errors[0], err
    assert len(errors[0]) <= 620, errors[0]
    assert "Traceback" not in err and "\x1b" not in err
    assert "parse_tokens" not in err and "_int value" not in err


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
    assert len(CASES) >= 120


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
    """Builds that skip capture (the session's shared capture of TINY) and lower with ``export_step``
    (in place of ``export_steps``, the backend's entry point: no decode graph)."""
    import effexport.exporter.capture as capture_mod
    import effexport.exporter.backends.onnx.export as export_mod

    def export_steps(program, plan, path, *args, decode_path=None, **kwargs):
        return export_step(program, plan, path, **kwargs), None

    captured = rewritten(TINY).captured  # the same model and tokens the build would capture
    monkeypatch.setattr(capture_mod, "capture_step", lambda model, ids, *args: captured)
    monkeypatch.setattr(export_mod, "export_steps", export_steps)


def _write_stub(program, plan, path, **kwargs):
    import onnx

    model = onnx.helper.make_model(onnx.helper.make_graph([], "stub", [], []))
    onnx.save(model, path)
    return model


def test_force_replaces_an_existing_artifact(tmp_path, monkeypatch, capsys, rewritten):
    _fake_lowering(monkeypatch, rewritten, _write_stub)
    monkeypatch.chdir(tmp_path)
    _old_artifact("out")
    os.makedirs("out/old")
    open("out/old/stale.txt", "w").close()
    assert main([TINY, "-o", "out", "--no-check", "--force"]) == 0
    assert sorted(os.listdir("out")) == ["effexport.json", "model.onnx", "report.json"]
    assert os.listdir(tmp_path) == ["out"]  # the old one renamed aside was deleted
    assert json.load(open("out/effexport.json"))["command"][-1] == "--force"


@pytest.fixture
def default_signals():
    """SIGINT, SIGTERM, SIGHUP as in a terminal for the test (a test worker may ignore some), restored."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _fail_while_writing(error):
    """An ``export_step`` that writes half a model.onnx and then raises ``error`` (an exception, or a
    signal number sent to this process)."""
    def export_step(program, plan, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\0" * 1024)
        if isinstance(error, int):
            os.kill(os.getpid(), error)
            time.sleep(5)  # the handler raises at the next bytecode
        raise error
    return export_step


def test_force_keeps_the_old_artifact_when_the_build_fails(tmp_path, monkeypatch, capsys, rewritten):
    _fake_lowering(monkeypatch, rewritten, _fail_while_writing(LowerError("op X has no translation")))
    monkeypatch.chdir(tmp_path)
    _old_artifact("out")
    before = _contents()
    assert main([TINY, "-o", "out", "--no-check", "--force"]) == 3
    assert _contents() == before
    assert os.listdir(tmp_path) == ["out"]


def test_force_puts_the_old_artifact_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch, capsys,
                                                                         rewritten):
    """The swap renames the old artifact aside before the new one moves in: when that rename fails, the
    old artifact is back in place, whole (it used to be deleted first)."""
    _fake_lowering(monkeypatch, rewritten, _write_stub)
    monkeypatch.chdir(tmp_path)
    _old_artifact("out")
    before = _contents()
    replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        name = os.path.basename(str(src))
        if name.startswith(".effexport-") and not name.startswith(".effexport-old-") and str(dst) == "out":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return replace(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", failing_replace)
    assert main([TINY, "-o", "out", "--no-check", "--force"]) == 5
    assert _contents() == before
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("error, code, needle", [
    P(LowerError("lowering failed: op X has no translation (pass: rewrite)"), 3, "op X has no translation",
      id="lower-error"),
    P(OSError(errno.ENOSPC, "No space left on device"), 5, "No space left on device; free space", id="disk-full"),
    P(KeyboardInterrupt(), 130, "interrupted", id="interrupt"),
    P(signal.SIGINT, 130, "interrupted", id="sigint"),
    P(signal.SIGTERM, 143, "stopped by SIGTERM", id="sigterm"),
    P(signal.SIGHUP, 129, "stopped by SIGHUP", id="sighup"),
])
def test_failed_build_leaves_nothing(tmp_path, monkeypatch, capsys, rewritten, default_signals, error, code,
                                    needle):
    """The failure strikes while model.onnx is being written (half a file is on disk), into an output
    whose parent directories the build created: they are removed again."""
    _fake_lowering(monkeypatch, rewritten, _fail_while_writing(error))
    monkeypatch.chdir(tmp_path)
    assert main([TINY, "-o", "new/deeper/out", "--no-check"]) == code
    err = capsys.readouterr().err
    if code > 128:
        assert needle in err and "nothing was written" in err and "Traceback" not in err
    else:
        assert_one_line_error(err, needle)
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored for the embedding program


def test_a_bug_exits_70_with_the_traceback_in_a_log(tmp_path, monkeypatch, capsys, rewritten):
    """An uncaught exception is not parity failure (1): exit 70, one line naming the log file that holds
    the traceback, nothing written."""
    import tempfile

    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))
    monkeypatch.delenv("EFFEXPORT_DEBUG", raising=False)
    _fake_lowering(monkeypatch, rewritten, _fail_while_writing(ZeroDivisionError("boom")))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main([TINY, "-o", "out", "--no-check"]) == 70
    err = capsys.readouterr().err
    assert "this is a bug, please report" in err and "Traceback" not in err
    (log,) = logs.iterdir()
    assert str(log) in err and "ZeroDivisionError: boom" in log.read_text() and "Traceback" in log.read_text()
    assert os.listdir(work) == []


# --------------------------------------------------------------------------- Hugging Face weights
@pytest.fixture(scope="module")
def llama_tensors(tmp_path_factory):
    """A tiny Llama saved once: (its directory, its tensors by name)."""
    from safetensors.torch import load_file

    sys.path.insert(0, os.path.dirname(__file__))
    from models import hf_tiny

    path = tmp_path_factory.mktemp("llama") / "llama"
    hf_tiny.build("llama").save_pretrained(path)
    return path, load_file(path / "model.safetensors")


def _llama_dir(llama_tensors, edit):
    """``hf``: the tiny Llama's config.json with ``edit(tensors)`` as its weights."""
    from safetensors.torch import save_file

    path, tensors = llama_tensors
    os.makedirs("hf")
    with open(path / "config.json") as src, open("hf/config.json", "w") as dst:
        dst.write(src.read())
    tensors = dict(tensors)
    edit(tensors)
    save_file(tensors, "hf/model.safetensors", metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("edit, needle", [
    P(lambda t: t.pop(Q), f"1 missing ({Q})", id="missing-some"),
    P(lambda t: (t.clear(), t.update(w=torch.zeros(4))), "21 missing (lm_head.weight, model.embed_tokens.weight",
      id="missing-all"),
    P(lambda t: t.update({"extra.weight": torch.zeros(3)}), "1 unexpected (extra.weight)", id="unexpected"),
    P(lambda t: t.update({Q: torch.zeros(2, 2)}), f"1 mismatched ({Q}: file [2, 2], model [64, 64])",
      id="mismatched-shape"),
])
def test_hf_weights_that_do_not_match_are_refused(tmp_path, monkeypatch, capsys, llama_tensors, edit, needle):
    """Without --allow-missing-weights a directory whose safetensors do not fit the model is exit 2
    naming the tensors (it used to build with random weights and pass parity against itself)."""
    monkeypatch.chdir(tmp_path)
    _llama_dir(llama_tensors, edit)
    before = _listing(tmp_path)
    assert main(["hf", "-o", "out"]) == 2
    assert_one_line_error(capsys.readouterr().err, needle)
    assert _listing(tmp_path) == before


def test_hf_config_far_larger_than_its_weights_is_refused_before_allocating(tmp_path, monkeypatch, capsys,
                                                                           llama_tensors):
    """A config within every field bound but describing ~1e11 parameters over 90k stored ones: refused
    from the meta-device count, before transformers allocates it."""
    monkeypatch.chdir(tmp_path)
    _llama_dir(llama_tensors, lambda t: None)
    config = json.load(open("hf/config.json"))
    config.update(vocab_size=1 << 22, hidden_size=1 << 14, num_hidden_layers=1)
    json.dump(config, open("hf/config.json", "w"))
    assert main(["hf", "-o", "out"]) == 2
    assert_one_line_error(capsys.readouterr().err, "most weights are missing")


def test_allow_missing_weights_builds_and_records_them(tmp_path, monkeypatch, capsys, rewritten, llama_tensors):
    """--allow-missing-weights: the build goes on (capture and lowering faked) and report.json records
    the flag and the tensors that were missing."""
    _fake_lowering(monkeypatch, rewritten, _write_stub)
    monkeypatch.chdir(tmp_path)
    _llama_dir(llama_tensors, lambda t: t.pop(Q))
    assert main(["hf", "-o", "out", "--no-check", "--allow-missing-weights"]) == 0
    report = json.load(open("out/report.json"))
    assert report["allow_missing_weights"] and report["missing_weights"] == {"missing": [Q]}


def test_flash_attention_in_config_falls_back(tmp_path, monkeypatch, llama_tensors):
    """A config asking for flash-attention (not installed here) loads with transformers' default."""
    from effexport.exporter.frontends.hf import load_hf_directory

    monkeypatch.chdir(tmp_path)
    _llama_dir(llama_tensors, lambda t: None)
    config = json.load(open("hf/config.json"))
    config["attn_implementation"] = "flash_attention_2"
    json.dump(config, open("hf/config.json", "w"))
    assert load_hf_directory("hf").source["attn_implementation"] in ("sdpa", "eager")


# ---------------------------------------------------------------------------------- check, report
def test_check_of_a_swapped_model_says_it_does_not_match(tmp_path, monkeypatch, capsys):
    """A loadable ONNX model that is not the manifest's (other inputs): one line, not ORT's traceback."""
    import onnx
    from onnx import TensorProto, helper

    monkeypatch.chdir(tmp_path)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    _manifest(inputs=["input_ids", "pos"], outputs=["logits"])
    onnx.save(model, "art/model.onnx")
    before = _listing(tmp_path)
    assert main(["check", "art", "--steps", "2"]) == 2
    assert_one_line_error(capsys.readouterr().err, "does not match its manifest")
    assert _listing(tmp_path) == before


def test_plot_without_a_suffix_is_a_png_of_that_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "gemma4-e2b", "--context", "4096", "--plot", "kv"]) == 0
    assert os.listdir(tmp_path) == ["kv"]
    assert open("kv", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_root_cause_leads_and_escapes_are_stripped():
    """torch.onnx wraps the real cause in a generic error and colours its text."""
    from effexport.exporter.errors import one_line, root_cause

    try:
        try:
            raise NotImplementedError("\x1b[1mno ONNX translation\x1b[0m for aten.unsqueeze on a complex tensor\nmore")
        except NotImplementedError as exc:
            raise RuntimeError("\x1b[31mFailed to convert the exported program\x1b[0m") from exc
    except RuntimeError as exc:
        assert root_cause(exc) == "NotImplementedError: no ONNX translation for aten.unsqueeze on a complex tensor"
    assert len(one_line("x" * 5000)) <= 600


# A child inherits an ignored or blocked signal across exec, and Python then never raises
# KeyboardInterrupt (right for a background job); a pytest-xdist worker may run with SIGINT ignored or
# blocked. The child therefore sets Ctrl-C's terminal behaviour itself before running the CLI; no
# preexec_fn (unsafe in a process with threads, as a test worker is).
_CHILD = ("import runpy, signal, sys\n"
          "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})\n"
          "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
          "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
          "sys.argv = ['effexport'] + sys.argv[1:]\n"
          "runpy.run_module('effexport.exporter', run_name='__main__')\n")


def _read_until(proc, marker: str, deadline: float) -> str:
    """stderr of ``proc`` up to the first line holding ``marker`` (or EOF, or ``deadline``)."""
    import selectors

    text, fd = b"", proc.stderr.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while marker.encode() not in text and time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                text += chunk
    return text.decode(errors="replace")


@pytest.mark.parametrize("sig, code, needle", [
    P(signal.SIGINT, 130, "effexport: interrupted", id="sigint"),
    P(signal.SIGTERM, 143, "effexport: stopped by SIGTERM", id="sigterm"),
])
def test_signal_during_build_cleans_up(tmp_path, sig, code, needle):
    """A real signal to a running build (during capture, its temporary directory not yet made): exit
    128 + the signal, one line, no traceback, no output. One deadline bounds the whole test."""
    deadline = time.monotonic() + 240
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, TINY, "-o", "out"], cwd=tmp_path,
                            stderr=subprocess.PIPE)
    try:
        err = _read_until(proc, "capture", deadline)
        assert "capture" in err, err
        proc.send_signal(sig)
        rest = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err += rest.decode(errors="replace")
    assert proc.returncode == code, err
    assert needle in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_output_directory_gets_a_normal_mode(tmp_path):
    """The temporary directory (mkdtemp: 0700) is renamed into place with the mode of a new directory."""
    from effexport.exporter._io import atomic_directory

    umask = os.umask(0)
    os.umask(umask)
    with atomic_directory(str(tmp_path / "out")) as tmp:
        open(os.path.join(tmp, "f"), "w").close()
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask
