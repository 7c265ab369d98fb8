"""The weight GEMMs of one decode step, one at a time: cuBLAS against a Triton kernel written for
decode shapes, against the bytes.

    python3 bench/gemv_floor.py --out DIR [--preset gemma4-e2b] [--rows 1,8] [--inductor]

Why: the compiled torch engine's Gemma 4 E2B step spends 2.47 ms of its 3.5 ms in cuBLAS GEMMs that
read 4.56 GB (1.50 ms at the copy bandwidth; BENCHMARKS.md run 33a), and ONNX Runtime's step the same
in the same library: one row (or eight) per weight, where cuBLAS's kernels reach 6-85% of the
bandwidth by size. Is that the floor of the hardware or of the library? This times, per projection
shape of the preset's step (``nn.Linear`` modules, q/k/v and gate/up packed as the torch engine
packs them; ``count`` per step), for ``M`` rows of bf16 activations:

* ``cublas``: ``torch.nn.functional.linear`` (what the engine and, through its own calls, ORT run);
* ``cublas_tunable``: the same call under PyTorch's TunableOp (``torch.cuda.tunable``: every GEMM
  algorithm cuBLAS / cuBLASLt offers for the shape timed once, the fastest kept; ``--no-tunable``
  leaves it out) -- is cuBLAS's default choice the library's best at one row?
* ``triton``: :func:`effexport.custom_ops._triton.gemv.gemv` at each of a few launch configs
  (``BLOCK_N`` rows of the weight per program, ``BLOCK_K`` slice, tensor-core or multiply-sum path),
  the fastest kept (and which);
* ``inductor`` (``--inductor``, one row only): ``torch.compile`` of the same product written as a
  multiply and a sum over K (``(x[:, None, :] * w).sum(-1)`` in fp32, coordinate-descent tuning):
  Inductor's own reduction kernel, which it could fuse with a norm before it.

Each call runs in a CUDA graph of back-to-back calls over enough copies of the weight (>= 256 MB in
all) that every call reads its weight from memory, not the L2, as a step does; ``us`` = replay time /
calls, median of ``--reps`` replays. ``pct_bw``: the weight's bytes over that time against the
device-to-device copy bandwidth measured first. ``step``: per implementation, the sum over the step's
projections of ``count x us`` (the fastest Triton config per shape), against the bytes' floor.
Writes ``gemv_floor.json`` and prints a table. Errors of the Triton result against cuBLAS's (max
rel) are recorded per shape.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import copy_bandwidth  # noqa: E402

PACKED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Projections the torch engine runs as one GEMM per layer (``exporter/backends/torch/packing.py``)."""

CONFIGS = [  # (BLOCK_N, BLOCK_K, dot, num_warps, num_stages)
    (4, 256, False, 4, 3), (8, 256, False, 4, 3), (8, 512, False, 8, 3),
    (16, 128, True, 4, 3), (16, 256, True, 4, 4), (32, 128, True, 4, 3), (32, 256, True, 8, 3),
    (64, 128, True, 8, 3),
]


def step_projections(preset: str, lm_head: bool = True) -> list[dict]:
    """``[{"name", "K", "N", "count"}]``: the preset's ``nn.Linear`` shapes per decode step (built on
    the meta device), the :data:`PACKED` groups of one parent module as one GEMM, plus the tied LM head
    (``embed_tokens`` read whole) where the config ties it."""
    from effexport.samples import get_sample

    sample = get_sample(preset)
    with torch.device("meta"):
        model = sample.module.Model(sample.config)
    shapes = collections.Counter()
    for parent_name, parent in model.named_modules():
        linears = {n: m for n, m in parent.named_children() if isinstance(m, torch.nn.Linear)}
        for group in PACKED:
            present = [linears.pop(n) for n in group if n in linears]
            if present:
                shapes["+".join(n for n in group if n in dict(parent.named_children())),
                       present[0].in_features, sum(m.out_features for m in present)] += 1
        for n, m in linears.items():
            shapes[n, m.in_features, m.out_features] += 1
    if lm_head and getattr(sample.config, "tie_word_embeddings", False):
        emb = model.embed_tokens
        shapes["lm_head (tied)", emb.embedding_dim, emb.num_embeddings] += 1
    return [{"name": n, "K": k, "N": nn, "count": c} for (n, k, nn), c in sorted(shapes.items(), key=lambda i: i[0][1:])]


def time_calls(fn, weights: list[torch.Tensor], reps: int) -> float:
    """Microseconds per call of ``fn(w)``, one call per weight in ``weights`` (and round again up to
    32 calls) back to back in one CUDA graph, median of ``reps`` replays."""
    calls = [weights[i % len(weights)] for i in range(max(32, len(weights)))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights[:2]:
            fn(w)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in calls:
            fn(w)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def measure_shape(shape: dict, rows: list[int], bw: float, reps: int, inductor: bool, min_bytes: float,
                  tunable: bool = True) -> dict:
    from effexport.custom_ops._triton.gemv import gemv

    K, N = shape["K"], shape["N"]
    nbytes = K * N * 2
    copies = max(1, min(256, -(-int(min_bytes) // nbytes)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen) * K ** -0.5
               for _ in range(copies)]
    out = dict(shape, bytes=nbytes, copies=copies, rows={})
    for M in rows:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
        row = out["rows"][str(M)] = {}

        def record(name, us, **extra):
            row[name] = dict(us=round(us, 3), pct_bw=round(100 * nbytes / (us * 1e-6) / bw, 1) if bw else None, **extra)

        try:
            record("cublas", time_calls(lambda w: torch.nn.functional.linear(x, w), weights, reps))
        except Exception as exc:  # noqa: BLE001
            row["cublas"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        ref = torch.nn.functional.linear(x, weights[0])
        if tunable:
            try:
                torch.cuda.tunable.enable(True)
                torch.cuda.tunable.tuning_enable(True)
                err = rel_err(torch.nn.functional.linear(x, weights[0]), ref)  # tunes the shape
                record("cublas_tunable", time_calls(lambda w: torch.nn.functional.linear(x, w), weights, reps),
                       err_vs_cublas=float(f"{err:.3g}"))
            except Exception as exc:  # noqa: BLE001
                row["cublas_tunable"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                torch.cuda.tunable.tuning_enable(False)
                torch.cuda.tunable.enable(False)
        best = None
        for bn, bk, dot, warps, stages in CONFIGS:
            if dot and M > 16:
                continue
            try:
                def call(w, bn=bn, bk=bk, dot=dot, warps=warps, stages=stages):
                    return gemv(x, w, block_n=bn, block_k=bk, dot=dot, num_warps=warps, num_stages=stages)

                err = rel_err(call(weights[0]), ref)
                us = time_calls(call, weights, reps)
            except Exception as exc:  # noqa: BLE001
                row.setdefault("triton_errors", []).append(f"{(bn, bk, dot, warps, stages)}: {type(exc).__name__}: {exc}"[:200])
                continue
            if best is None or us < best[0]:
                best = (us, dict(config=[bn, bk, dot, warps, stages], err_vs_cublas=float(f"{err:.3g}")))
        if best:
            record("triton", best[0], **best[1])
        if inductor and M == 1:
            try:
                fn = torch.compile(lambda x, w: (x[:, None, :].float() * w.float()).sum(-1).to(x.dtype),
                                   dynamic=False, options={"coordinate_descent_tuning": True})
                err = rel_err(fn(x, weights[0]), ref)
                record("inductor", time_calls(lambda w: fn(x, w), weights, reps), err_vs_cublas=float(f"{err:.3g}"))
            except Exception as exc:  # noqa: BLE001
                row["inductor"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps({"name": shape["name"], "K": K, "N": N, "M": M, **row}), flush=True)
    del weights
    torch.cuda.empty_cache()
    return out


def step_totals(results: list[dict], rows: list[int], bw: float) -> dict:
    """Per row count and implementation: the step's ``sum(count x us)`` where every shape has a time."""
    totals = {}
    floor_us = sum(r["count"] * r["bytes"] for r in results) / bw * 1e6 if bw else None
    for M in rows:
        per = {}
        for impl in ("cublas", "cublas_tunable", "triton", "inductor"):
            times = [r["rows"].get(str(M), {}).get(impl, {}).get("us") for r in results]
            if all(t is not None for t in times):
                per[impl + "_us"] = round(sum(r["count"] * t for r, t in zip(results, times)), 1)
        both = [min(r["rows"][str(M)]["cublas"]["us"], r["rows"][str(M)]["triton"]["us"]) for r in results
                if "us" in r["rows"].get(str(M), {}).get("cublas", {}) and "us" in r["rows"][str(M)].get("triton", {})]
        if len(both) == len(results):
            per["best_of_cublas_triton_us"] = round(sum(r["count"] * t for r, t in zip(results, both)), 1)
        per["bytes_floor_us"] = round(floor_us, 1) if floor_us else None
        totals[str(M)] = per
    return totals


def table(out: dict) -> str:
    lines = [f"copy bandwidth {out['copy_bw'] / 1e12:.2f} TB/s" if out.get("copy_bw") else "", "",
             "| projection | K | N | per step | M | cuBLAS us (% bw) | TunableOp us (% bw) | Triton us (% bw) [config] | "
             "Inductor us (% bw) |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(d):
        return f"{d['us']:.2f} ({d['pct_bw']}%)" if d and "us" in d else (d or {}).get("error", "-")[:40]

    for r in out["shapes"]:
        for M, row in r["rows"].items():
            tri = row.get("triton")
            lines.append(f"| {r['name']} | {r['K']} | {r['N']} | {r['count']} | {M} | {cell(row.get('cublas'))} | "
                         f"{cell(row.get('cublas_tunable'))} | "
                         f"{cell(tri)}{' ' + str(tri['config']) if tri else ''} | {cell(row.get('inductor'))} |")
    lines += ["", "| M | " + " | ".join(k for k in next(iter(out["step"].values()), {})) + " |"]
    for M, per in out["step"].items():
        lines.append(f"| {M} | " + " | ".join(str(v) for v in per.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    ap.add_argument("--preset", default="gemma4-e2b")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--min-mb", type=float, default=256.0, help="weight copies per shape: at least this many MB")
    ap.add_argument("--inductor", action="store_true", help="also Inductor's multiply-sum reduction (one row)")
    ap.add_argument("--tunable", action=argparse.BooleanOptionalAction, default=True,
                    help="also cuBLAS under PyTorch's TunableOp")
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    os.makedirs(args.out, exist_ok=True)
    shapes = step_projections(args.preset)
    if not torch.cuda.is_available():
        print(json.dumps(shapes, indent=1))
        print("no CUDA device: the shapes above only", file=sys.stderr)
        return 0
    bw = copy_bandwidth(torch.device("cuda"))
    if args.tunable:
        if hasattr(torch.cuda.tunable, "write_file_on_exit"):  # torch <= 2.12
            torch.cuda.tunable.write_file_on_exit(False)
        torch.cuda.tunable.set_filename(os.path.join(args.out, "tunableop_results.csv"))
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
           "copy_bw": bw, "shapes": []}
    for shape in shapes:
        try:
            out["shapes"].append(measure_shape(shape, rows, bw, args.reps, args.inductor, args.min_mb * 1e6,
                                                    args.tunable))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            out["shapes"].append(dict(shape, error=f"{type(exc).__name__}: {exc}"[:400], rows={}))
        out["step"] = step_totals([s for s in out["shapes"] if s["rows"]], rows, bw)
        with open(os.path.join(args.out, "gemv_floor.json"), "w") as f:
            json.dump(out, f, indent=1)
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
