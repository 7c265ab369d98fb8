"""What one ``effexport check`` run measured and how: the parity report plus the runtime, execution
provider and dtype that ran it, the prompt (its seed or file) and the tolerances with their sources.

:class:`CheckRun` is what ``effexport check --json`` prints and the pytest plugin
(:mod:`effexport.exporter.pytest_plugin`) turns into test items; :mod:`effexport.exporter.verify.junit`
writes it as JUnit XML. ``--json``'s object is the object ``report.json`` holds under ``parity``
(``passed``, ``steps``, ``tolerance``, ``tokens_equal``, ``outputs``, ``detail``, ``mode`` when set,
``tolerances``) with these keys added: ``artifact``, ``model``, ``target``, ``dtype``, ``runtime``,
``execution_provider``, ``device``, ``tolerance_sources``, ``prompt``.

:func:`load_prompt` reads ``--prompt-ids FILE``: a JSON list of token ids (one row) or a list of
equal-length lists (a batch), or a text file, tokenized with the tokenizer of the Hugging Face
directory the artifact was built from when it has one. Every problem is one line, exit 2.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from effexport.exporter.errors import UsageError

MAX_PROMPT_BYTES = 16 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass
class CheckRun:
    """One check of one artifact."""

    artifact: str
    manifest: dict
    parity: object                      # ParityReport
    runtime: str                        # "onnxruntime 1.22.0", "AOTInductor", "TensorRT"
    execution_provider: str             # "CPUExecutionProvider", "CUDAExecutionProvider", ...
    device: str                         # "cpu" / "cuda"
    prompt: dict = field(default_factory=dict)
    tolerance_sources: dict = field(default_factory=dict)
    seconds: float = 0.0                # wall time of the check (JUnit only: the JSON stays deterministic)

    @property
    def dtype(self) -> str:
        return self.manifest.get("dtype", "fp32")

    def to_json(self) -> dict:
        """report.json's ``parity`` object plus what ran the check (module docstring)."""
        return {**self.parity.to_json(), "artifact": self.artifact, "model": self.manifest.get("model"),
                "target": self.manifest.get("target"), "dtype": self.dtype, "runtime": self.runtime,
                "execution_provider": self.execution_provider, "device": self.device,
                "tolerance_sources": dict(self.tolerance_sources), "prompt": dict(self.prompt)}

    def summary(self) -> str:
        """One line: what ran the check."""
        return (f"checked {self.artifact} ({self.manifest.get('target')}, {self.dtype}) on {self.runtime}, "
                f"{self.execution_provider}; prompt {_prompt_text(self.prompt)}")


def _prompt_text(prompt: dict) -> str:
    where = f"seed {prompt.get('seed')}" if prompt.get("source") == "seed" else f"{prompt.get('path')}"
    return f"{prompt.get('batch')}x{prompt.get('length')} tokens ({where})"


def runtime_info(runtime, manifest: dict) -> tuple[str, str, str]:
    """(runtime, execution provider, device) of a loaded artifact runtime."""
    session = getattr(runtime, "session", None)
    if session is not None and hasattr(session, "get_providers"):
        import onnxruntime as ort

        provider = session.get_providers()[0]
        return f"onnxruntime {ort.__version__}", provider, "cuda" if provider.startswith("CUDA") else "cpu"
    target = manifest.get("target")
    if target == "aoti":
        device = str((manifest.get("aoti") or {}).get("device", "cpu"))
        return "AOTInductor", f"AOTInductor {device}", device
    if target == "tensorrt":
        return "TensorRT", "TensorRT", "cuda"
    if target == "onnx" and runtime is None and "sharded" in manifest:  # its rank models composed into one graph
        import onnxruntime as ort

        world = manifest["sharded"]["world"]
        return (f"onnxruntime {ort.__version__}", f"CPUExecutionProvider (the {world} rank models composed, "
                "AllReduce as Sum)", "cpu")
    if target == "torch" and runtime is None:  # a sharded artifact: its ranks spawned over gloo
        import torch

        world = manifest["sharded"]["world"]
        return f"torch {torch.__version__}", f"torch cpu (uncompiled, {world} ranks over gloo)", "cpu"
    if target == "torch":
        engine = runtime.engine
        how = ("Inductor" if engine.compiled else "uncompiled") + (" + CUDA graphs" if engine.cuda_graphs else "")
        import torch

        return f"torch {torch.__version__}", f"torch {engine.device.type} ({how})", engine.device.type
    return type(runtime).__name__, "unknown", "unknown"


def seeded_prompt(loaded, length: int, seed: int):
    """The default prompt: ``length`` tokens at batch 2 drawn with ``seed`` (``LoadedModel.example_ids``)."""
    if not 0 <= seed < 1 << 63:
        raise UsageError(f"--seed {seed}: give a whole number from 0 to 2**63 - 1, e.g. 2 (the build's prompt)")
    return loaded.example_ids(2, length, seed=seed), {"source": "seed", "seed": seed, "batch": 2, "length": length}


def load_prompt(path: str, loaded, manifest: dict, steps: int, max_context: int | None):
    """``(ids [B, T] int64 tensor, record)`` from ``--prompt-ids FILE`` (module docstring)."""
    ids, record = prompt_ids(path, manifest, loaded.vocab_size, steps, max_context)
    return ids.to(loaded.device), record


def prompt_ids(path: str, manifest: dict, vocab: int, steps: int, max_context: int | None):
    """:func:`load_prompt` against a vocabulary size (no model loaded): ``(ids on the CPU, record)``."""
    import torch

    from effexport.exporter.frontends.inputs import regular_file

    fix = "give a JSON list of token ids, e.g. [1, 2, 3], or a text file"
    try:
        regular_file(path, "prompt file")
    except Exception as exc:  # noqa: BLE001 - LoadError with the reason; the flag is named here
        raise UsageError(f"--prompt-ids: {exc}") from None
    size = os.path.getsize(path)
    if size > MAX_PROMPT_BYTES:
        raise UsageError(f"--prompt-ids: {path} is {size:,} bytes, more than {MAX_PROMPT_BYTES >> 20} MiB; {fix}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--prompt-ids: {path} is neither UTF-8 text nor JSON; {fix}") from None
    if text.lstrip().startswith("["):
        rows, kind = _json_ids(path, text), "json"
    else:
        rows, kind = _tokenize(path, text, manifest), "text"
    bad = next((t for row in rows for t in row if not 0 <= t < vocab), None)
    if bad is not None:
        raise UsageError(f"--prompt-ids: {path} holds token id {bad}, outside the model's vocabulary of "
                         f"{vocab} (0 to {vocab - 1})")
    length = len(rows[0])
    if max_context is not None and length + steps > max_context:
        raise UsageError(f"--prompt-ids: {path}'s {length} tokens + {steps} decode steps go past the artifact's "
                         f"max_context {max_context}; shorten the prompt or pass fewer --steps")
    ids = torch.tensor(rows, dtype=torch.int64)
    return ids, {"source": "file", "path": path, "format": kind, "batch": len(rows), "length": length}


def _json_ids(path: str, text: str) -> list[list[int]]:
    import json

    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"--prompt-ids: {path} is not valid JSON ({str(exc)[:80]}); "
                         "give a JSON list of token ids, e.g. [1, 2, 3]") from None
    rows = value if value and all(isinstance(r, list) for r in value) else [value]
    ok = all(isinstance(r, list) and r and all(type(t) is int for t in r) for r in rows)
    if not ok or not rows:
        raise UsageError(f"--prompt-ids: {path} is not a non-empty list of integer token ids (or a list of such "
                         "lists); give e.g. [1, 2, 3] or [[1, 2], [3, 4]]")
    if len({len(r) for r in rows}) != 1:
        lengths = ", ".join(str(len(r)) for r in rows[:4])
        raise UsageError(f"--prompt-ids: {path}'s rows have different lengths ({lengths}); a batch's rows must be "
                         "equally long")
    return rows


def _tokenize(path: str, text: str, manifest: dict) -> list[list[int]]:
    """``text`` tokenized by the tokenizer of the HF directory the artifact was built from."""
    source = manifest.get("source") or {}
    directory = source.get("path") if source.get("kind") == "hf" else None
    if not directory:
        built = f"{source.get('kind', 'a model')} {source.get('name') or source.get('path') or ''}".rstrip()
        what = f"the artifact was built from {built}, not a Hugging Face directory with a tokenizer"
    elif not any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES):
        what = f"the model directory {directory} has no tokenizer ({', '.join(TOKENIZER_FILES)})"
    else:
        what = ""
    if what:
        raise UsageError(f"--prompt-ids: {path} is text (not a JSON list), and {what}; "
                         "give the prompt as token ids, e.g. [1, 2, 3]")
    if not text.strip():
        raise UsageError(f"--prompt-ids: {path} is empty; give a prompt text or a JSON list of token ids")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        ids = tokenizer(text.rstrip("\n"))["input_ids"]
    except Exception as exc:  # noqa: BLE001 - transformers / tokenizers raise their own types
        raise UsageError(f"--prompt-ids: the tokenizer of {directory} could not encode {path} "
                         f"({type(exc).__name__}: {str(exc)[:100]}); give token ids as JSON instead") from None
    if not ids:
        raise UsageError(f"--prompt-ids: {path} tokenizes to no tokens; give a longer prompt")
    return [list(ids)]
