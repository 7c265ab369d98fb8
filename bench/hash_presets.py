"""Build every tiny preset's ONNX artifact and print the sha256 of every file, one JSON line a build.

Usage: ``python bench/hash_presets.py WORKDIR > hashes.jsonl``; two trees' outputs compare with
``sort | diff``. Each build is ``effexport PRESET -o out --no-check --profile P --kv-cache K`` run
in-process from WORKDIR (the same relative output name every time, so the recorded command is
identical between trees). A change that keeps behaviour leaves every hash unchanged, provided both
trees are built from the same checkout path: ``model.onnx`` keeps torch.export's stack traces, which
name the samples' source files by absolute path. Lines are flushed as builds finish, so a run cut
short still reports what it built.
"""
import hashlib
import json
import os
import shutil
import sys

from effexport.exporter.cli import main
from effexport.samples import preset_names

VARIANTS = (("ort", "grow"), ("standard", "grow"), ("ort", "buffer"))


def _hashes(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _build(preset: str, profile: str, kv_cache: str) -> dict:
    shutil.rmtree("out", ignore_errors=True)
    code = main([preset, "-o", "out", "--no-check", "--profile", profile, "--kv-cache", kv_cache])
    return {"exit": code, "files": _hashes("out") if os.path.isdir("out") else {}}


def run(workdir: str, skip: set[str] = frozenset()) -> None:
    """Build and hash every (preset, variant) not in ``skip``; one JSON line per build on stdout."""
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    presets = [n for n in preset_names(report_only=False) if ":" in n]
    for profile, kv_cache in VARIANTS:  # every preset in the first variant first: the widest cover early
        for preset in presets:
            key = f"{preset} {profile} {kv_cache}"
            if key not in skip:
                print(json.dumps({"build": key, **_build(preset, profile, kv_cache)}, sort_keys=True), flush=True)


if __name__ == "__main__":
    run(sys.argv[1], set(sys.argv[2:]))
