"""Can ONNX Runtime replay an artifact's decode step from a CUDA graph, and what stops it?

    PYTHONPATH=/tmp/ortgpu python3 bench/ort_cuda_graph_probe.py DIR [DIR ...] --out OUT
        [--context 4096] [--batch 1] [--reps 20]

For each effexport ONNX artifact directory (``effexport.json`` + model): one decode step at position
``context - 1`` over random caches of the CachePlan's shapes, every input and output bound by device
pointer to fixed torch tensors (a ``buffer`` cache's present to its past's memory; other presents to
tensors of their past's shape), run

1. in a plain CUDA session (median ms of ``--reps`` runs; the reference logits), and
2. in a session with the CUDA EP's ``enable_cuda_graph``: whether ORT accepts it (it refuses when
   any node is not on the CUDA EP, and a graph with a growing cache has no fixed shapes to capture),
   whether a capture + replays run, their median ms and the replayed logits' max abs difference to
   the plain session's.

ORT's own profile of the plain session lists the nodes it placed on the CPU (by op type) and the
copies it inserted (with their inputs). The CUDA EP accepts a graph with CPU nodes (shape
sub-graphs) as long as no Memcpy node joins them to the GPU part: the copies are what has to go
before a graph can be captured (``--placement-log`` prints ORT's account of each). Writes
``ort_cuda_graph.json`` to ``--out``. A probe, not a benchmark of record: BENCHMARKS.md quotes it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ort_cuda import (ONNX_TYPES, TORCH_TYPES, _count, _median_s, bind_pos_host, device_inputs,  # noqa: E402
                      profile_steps)


def _feeds(manifest: dict, batch: int, context: int) -> list[torch.Tensor]:
    """ids [B, 1], pos, and one random tensor per CachePlan entry at ``context - 1`` cached tokens."""
    from effexport.exporter.backends.artifact import plan_entries

    gen = torch.Generator(device="cuda").manual_seed(0)
    caches = [torch.randn(e.concrete_shape(batch, context - 1), generator=gen, device="cuda").to(getattr(torch, e.dtype))
              * 0.5 for e in plan_entries(manifest)]
    return [torch.zeros(batch, 1, dtype=torch.long, device="cuda"), torch.tensor(context - 1, device="cuda"), *caches]


def _bound(session, feeds: list[torch.Tensor], kinds: list[str]):
    """An I/O binding over fixed tensors; returns (binding, logits tensor, kept tensors)."""
    binding = session.io_binding()
    for spec, tensor in zip(device_inputs(session), feeds):
        binding.bind_input(spec.name, "cuda", 0, ONNX_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
    bind_pos_host(binding, session, feeds[1])
    first, *rest = session.get_outputs()
    logits = torch.empty(feeds[0].shape[0], 1, int(first.shape[-1]), dtype=TORCH_TYPES[first.type], device="cuda")
    binding.bind_output(first.name, "cuda", 0, ONNX_TYPES[logits.dtype], list(logits.shape), logits.data_ptr())
    kept = [logits]
    for spec, past, kind in zip(rest, feeds[2:], kinds):
        present = past if kind == "buffer" else torch.empty_like(past)
        if kind == "full":  # a growing cache: its present has one more row
            shape = list(past.shape)
            shape[2] += 1
            present = torch.empty(shape, dtype=past.dtype, device="cuda")
        binding.bind_output(spec.name, "cuda", 0, ONNX_TYPES[present.dtype], list(present.shape), present.data_ptr())
        kept.append(present)
    return binding, logits, kept


def probe(directory: str, args) -> dict:
    import onnxruntime as ort

    with open(os.path.join(directory, "effexport.json")) as f:
        manifest = json.load(f)
    path = os.path.join(directory, manifest["files"]["step"])
    kinds = [e["kind"] for e in manifest["cache_plan"]["entries"]]
    res = {"artifact": directory, "cache_kinds": _count(kinds), "context": args.context, "batch": args.batch}
    feeds = _feeds(manifest, args.batch, args.context)
    plain = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    binding, logits, kept = _bound(plain, feeds, kinds)
    res["plain_ms"] = _median_s(lambda: plain.run_with_iobinding(binding), args.reps) * 1e3
    reference = logits.float().clone()
    del plain, binding, kept
    try:
        prof = profile_steps(path, feeds, "cuda", tuple(reference.shape), os.path.join(args.work, "graph_probe"),
                             tuple(f"present.{e['name']}" for e in manifest["cache_plan"]["entries"]
                                   if e["kind"] == "buffer"))
        res["profile"] = {k: prof[k] for k in ("nodes_per_step", "cpu_nodes_per_step", "cpu_ops", "wall_ms")}
        res["profile"]["copies"] = [{k: c[k] for k in ("node", "op", "inputs")} for c in prof["copies"]]
    except Exception as exc:  # noqa: BLE001
        res["profile_error"] = f"{type(exc).__name__}: {exc}"[:400]
    if args.placement_log:  # ORT's INFO log names every Memcpy it inserts and the nodes it puts on the CPU
        options = ort.SessionOptions()
        options.log_severity_level = 1
        ort.InferenceSession(path, options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    try:
        graphed = ort.InferenceSession(path, providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"}),
                                                        "CPUExecutionProvider"])
        res["cuda_graph_session"] = "created"
        binding, logits, kept = _bound(graphed, feeds, kinds)
        res["cuda_graph_ms"] = _median_s(lambda: graphed.run_with_iobinding(binding), args.reps) * 1e3
        res["cuda_graph_max_abs_vs_plain"] = (logits.float() - reference).abs().max().item()
    except Exception as exc:  # noqa: BLE001  (the refusal is the finding)
        res["cuda_graph_error"] = f"{type(exc).__name__}: {exc}"[:600]
        traceback.print_exc()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--work", default="/tmp/ort_cuda")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--placement-log", action="store_true",
                    help="also create a session at ORT log level INFO (stderr): which nodes went to the CPU, "
                         "which Memcpy nodes were inserted between what")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    results = []
    for directory in args.artifacts:
        try:
            results.append(probe(directory, args))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            results.append({"artifact": directory, "error": f"{type(exc).__name__}: {exc}"[:600]})
        print(json.dumps(results[-1]), flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ort_cuda_graph.json"), "w") as f:
            json.dump({"onnxruntime": ort.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
