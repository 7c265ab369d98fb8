"""The two ONNX Runtime runtimes of one artifact, side by side, with and without ORT's buffer reuse.

    source bench/_ortgpu_env.sh; python3 bench/runtime_pair_probe.py --preset deepseek-v4-flash:tiny \\
        --dtype bf16 --out "$OUT/pair"                        # builds the artifact (CLI, --kv-cache buffer)
    python3 bench/runtime_pair_probe.py --artifact DIR --device cpu --out /tmp/pair   # an fp32 artifact, ORT CPU

Why: ``tests/test_graph_runtime.py::test_cuda_graph_replay_equals_uncaptured[deepseek-v4-flash:tiny]``
(bf16, CUDA EP) gives equal tokens at batch 2 but prefill logits 7.0e-3 apart (max rel) between
``OrtRuntime`` (ORT allocates the presents it does not write in place) and ``CudaGraphRuntime`` (every
present bound to the runtime's own memory), where the test allows 1e-3; on ORT's CPU EP (fp32) the two
are bit-identical (BENCHMARKS.md run 35b). The same artifact's bf16 prefill failed outright while ORT's
memory planner reused a host scalar's buffer before its last reader (``enable_mem_reuse=False`` made it
run; run 34). So: is the batch-2 difference that planner again (it goes away with buffer reuse off in
both runtimes), or the two runtimes' bindings picking other kernels (it stays)?

Per configuration -- ``reuse`` (ORT's default) and ``no_reuse`` (``SessionOptions.enable_mem_reuse =
False`` in both runtimes' sessions) -- and per case (batch 1 with a 3-token prompt, batch 2 with a
10-token one: the failing test's prompts, ``--tokens`` greedy tokens): whether the two runtimes'
tokens are equal and the max relative difference of their logits per step (``max|a - b| / max|a|``),
plus each runtime's logits against its own ``reuse`` run (``<runtime>_vs_reuse``: does buffer reuse
change what one runtime computes?). Writes ``runtime_pair_probe.json``; each configuration is caught and
recorded on its own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

import numpy as np

CASES = ((1, 3), (2, 10))
"""(batch, prompt tokens): the failing test's two cases."""


def build(preset: str, dtype: str, out: str, max_context: int = 64) -> str:
    """``effexport PRESET --target onnx --kv-cache buffer --dtype DTYPE --no-check`` into ``out``."""
    from effexport.exporter.cli import main

    code = main([preset, "--target", "onnx", "--kv-cache", "buffer", "--dtype", dtype, "--max-context",
                 str(max_context), "--no-check", "-o", out])
    if code != 0:
        raise SystemExit(f"the build of {preset} failed (exit {code})")
    return out


def _options(ort, reuse: bool):
    options = ort.SessionOptions()
    options.enable_mem_reuse = reuse
    return options


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-30))


def run_pair(artifact: str, device: str, reuse: bool, tokens: int) -> dict:
    """Both runtimes over :data:`CASES` with buffer reuse on or off: tokens and logits per case."""
    import onnxruntime as ort

    from effexport.runtime import CudaGraphRuntime, OrtRuntime

    plain = OrtRuntime(artifact, device=device, session_options=_options(ort, reuse))
    graphs = CudaGraphRuntime(artifact, device=device, session_options=_options(ort, reuse))
    out = {}
    for batch, prompt in CASES:
        ids = np.random.RandomState(batch).randint(0, 128, (batch, prompt))
        out[f"B{batch}"] = {"ort": plain.generate(ids, tokens), "graph": graphs.generate(ids, tokens)}
    return out


def compare(runs: dict) -> dict:
    """The JSON summary of :func:`run_pair`'s results per configuration (see the module docstring)."""
    summary: dict = {}
    base = runs.get("reuse") if isinstance(runs.get("reuse"), dict) else None
    for config, result in runs.items():
        if not isinstance(result, dict):
            summary[config] = result
            continue
        summary[config] = {}
        for case, pair in result.items():
            (ta, la), (tb, lb) = pair["ort"], pair["graph"]
            entry = {"tokens_equal": bool(np.array_equal(ta, tb)),
                     "max_rel_per_step": [_rel(a, b) for a, b in zip(la, lb)]}
            entry["max_rel"] = max(entry["max_rel_per_step"])
            if base is not None and config != "reuse":
                for runtime in ("ort", "graph"):
                    entry[f"{runtime}_vs_reuse"] = max(_rel(a, b) for a, b in zip(base[case][runtime][1],
                                                                                   pair[runtime][1]))
            summary[config][case] = entry
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    ap.add_argument("--artifact", default="", help="an artifact built with --kv-cache buffer (default: build one)")
    ap.add_argument("--preset", default="deepseek-v4-flash:tiny")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pair-") as tmp:
        artifact = args.artifact or build(args.preset, args.dtype, os.path.join(tmp, "artifact"))
        runs: dict = {}
        for config, reuse in (("reuse", True), ("no_reuse", False)):
            try:
                runs[config] = run_pair(artifact, args.device, reuse, args.tokens)
            except Exception as exc:  # noqa: BLE001  (the failure is the finding)
                traceback.print_exc()
                runs[config] = f"error: {type(exc).__name__}: {exc}"[:600]
    summary = {"artifact": args.artifact or f"{args.preset} ({args.dtype}, built here)", "device": args.device,
               "configs": compare(runs)}
    with open(os.path.join(args.out, "runtime_pair_probe.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary["configs"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
