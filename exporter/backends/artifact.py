"""The artifact contract every backend writes and every runtime reads: ``effexport.json`` (the
manifest: target, files, I/O names, dtype, CachePlan, ...; docs/ARCHITECTURE.md) and the step result.

:func:`load_manifest` checks the manifest's shape; which targets exist is the registry's to say
(:func:`effexport.exporter.backends.registry.read_manifest`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from effexport.exporter.errors import LoadError
from effexport.passes.cache_plan import CacheEntry

MANIFEST = "effexport.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--dtype`` / the manifest's ``dtype`` -> the dtype the model is captured, lowered and deployed in."""
MAX_MANIFEST_BYTES = 64 << 20


def load_manifest(artifact_dir: str) -> dict:
    """Read ``effexport.json`` and check its shape (:func:`check_manifest`); every problem is a
    one-line :class:`LoadError`."""
    from effexport.exporter.frontends.inputs import read_json

    path = os.path.join(artifact_dir, MANIFEST)
    if not os.path.lexists(path):
        raise LoadError(f"{artifact_dir!r} is not an effexport artifact (no {MANIFEST}); "
                        "build one with 'effexport MODEL --target onnx -o DIR'")
    manifest = read_json(path, "rebuild the artifact", MAX_MANIFEST_BYTES)
    check_manifest(manifest, path, artifact_dir)
    return manifest


def refuse_sharded(artifact_dir: str, manifest: dict) -> None:
    """A one-process runtime (torch, aoti) refuses a sharded artifact or one of its ranks
    (:class:`LoadError` saying how its ranks run)."""
    if "sharded" in manifest or "rank" in manifest:
        top = artifact_dir if "sharded" in manifest else os.path.dirname(os.path.abspath(artifact_dir))
        raise LoadError(f"{artifact_dir!r} is {'a rank of ' if 'rank' in manifest else ''}a sharded (--tp) "
                        f"artifact: its ranks run together, one process each: 'effexport run {top}' (or under "
                        f"torchrun: 'torchrun --nproc-per-node N -m effexport.launch {top}'); "
                        f"'effexport check {top}' checks it")


def check_manifest(manifest, path: str, artifact_dir: str) -> None:
    """The manifest is an object with every key a runtime reads, of the right type; its dtype is
    known; every ``files`` entry names a file inside ``artifact_dir`` (after resolving
    symlinks); the CachePlan's entries are well formed and their prefill caches fit this machine's memory."""
    def bad(why: str):
        return LoadError(f"{path} {why}; rebuild the artifact with this effexport version")
    if not isinstance(manifest, dict):
        raise bad("is not a JSON object")
    for key in ("target", "files", "cache_plan", "inputs", "outputs"):
        if key not in manifest:
            raise bad(f"lacks {key!r}")
    if not isinstance(manifest.get("dtype", "fp32"), str) or manifest.get("dtype", "fp32") not in DTYPES:
        raise bad(f"names an unknown dtype {str(manifest.get('dtype'))[:40]!r} (dtypes: {', '.join(DTYPES)})")
    files = manifest["files"]
    if not isinstance(files, dict) or not isinstance(files.get("step"), str):
        raise bad("has no 'files' object naming the step model ('step')")
    root = os.path.realpath(artifact_dir)
    for key, name in files.items():
        if not isinstance(name, str) or not name:
            raise bad(f"has a non-file entry files.{key}")
        real = os.path.realpath(os.path.join(artifact_dir, name))
        if os.path.isabs(name) or not real.startswith(root + os.sep):
            raise bad(f"names files.{key} = {name[:80]!r} outside the artifact directory")
    for key in ("inputs", "outputs"):
        if not isinstance(manifest[key], list) or not all(isinstance(n, str) for n in manifest[key]):
            raise bad(f"has {key!r} that is not a list of names")
    source = manifest.get("source")
    if source is not None and not isinstance(source, dict):
        raise bad("has a 'source' that is not an object")
    limit = manifest.get("max_step_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise bad(f"has a 'max_step_tokens' that is not a positive integer ({str(limit)[:40]!r})")
    plan = manifest["cache_plan"]
    if not isinstance(plan, dict) or not isinstance(plan.get("entries"), list):
        raise bad("has a 'cache_plan' without a list of 'entries'")
    try:
        entries = plan_entries(manifest)
        size = sum(e.nbytes(2, 0) for e in entries if _sane_entry(e))
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError):
        raise bad("has a malformed CachePlan entry") from None
    if len(entries) != sum(_sane_entry(e) for e in entries):
        raise bad("has a CachePlan entry with an unknown dtype or a shape that is not sizes, 'batch' and 'seq'")
    memory = _physical_memory()
    if memory and size > memory:
        raise bad(f"has a CachePlan whose prefill caches at batch 2 would take {size / 2**30:,.0f} GiB, more "
                  f"than this machine's {memory / 2**30:,.0f} GiB")


def _physical_memory() -> int | None:
    """Bytes of physical memory (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _sane_entry(entry: CacheEntry) -> bool:
    return (isinstance(entry.name, str) and isinstance(entry.dtype, str)
            and isinstance(getattr(torch, entry.dtype, None), torch.dtype)
            and all(d in ("batch", "seq") or (type(d) is int and 0 <= d < 1 << 31) for d in entry.shape))


@dataclass
class StepResult:
    """Logits ``[B, T, V]`` and the caches to pass to the next step (numpy arrays, or
    ``onnxruntime.OrtValue`` tensors on the device with I/O binding)."""

    logits: np.ndarray
    caches: list


def pieces_needed(manifest: dict, input_ids) -> bool:
    """Whether ``input_ids [B, T]`` has more new tokens than the manifest's ``max_step_tokens``
    (a runtime then feeds it :func:`in_pieces`)."""
    limit = manifest.get("max_step_tokens")
    return bool(limit) and np.shape(input_ids)[1] > limit


def in_pieces(step, limit: int | None, input_ids, pos: int, caches: list) -> StepResult:
    """``step(input_ids, pos, caches)`` with at most ``limit`` new tokens per call (the manifest's
    ``max_step_tokens``: the step graph was captured for steps that long, e.g. Qwen3-Next's chunked
    gated delta rule unrolled over one 64-token chunk); longer inputs run piece by piece, each piece
    on the caches the previous one returned, logits concatenated (numpy arrays, or torch tensors where
    the step returns them). None or a short input: one call. ``step`` returns a :class:`StepResult`."""
    new = np.shape(input_ids)[1]
    if not limit or new <= limit:
        return step(input_ids, pos, caches)
    logits = []
    for start in range(0, new, limit):
        result = step(input_ids[:, start:start + limit], pos + start, caches)
        caches = result.caches
        logits.append(result.logits)
    if isinstance(logits[0], torch.Tensor):
        return StepResult(torch.cat(logits, dim=1), caches)
    return StepResult(np.concatenate(logits, axis=1), caches)


def plan_entries(manifest: dict) -> list[CacheEntry]:
    """The CachePlan entries recorded in an artifact's manifest."""
    return [CacheEntry(**{**e, "shape": tuple(e["shape"])}) for e in manifest["cache_plan"]["entries"]]


def numpy_caches(entries: list[CacheEntry], batch: int) -> list[np.ndarray]:
    """The plan's prefill caches as numpy arrays (zero-length full caches, zero rings and states)."""
    return [e.empty(batch).numpy() for e in entries]
