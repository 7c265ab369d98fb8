"""What one node costs ONNX Runtime's CUDA EP at decode sizes, replayed from a CUDA graph.

    PYTHONPATH=/tmp/ortgpu python3 bench/ort_kernel_floor.py --out DIR [--chain 64] [--reps 200]
    python3 bench/ort_kernel_floor.py --device cpu --out DIR       # the script itself, on ORT CPU (fp32)

A decode step of Gemma 4 E2B in the ``ort`` profile is ~1,000 nodes of one row each (BENCHMARKS.md
run 34): at that size a kernel's time is its launch and tail, not its bytes, so the step's floor is
the per-node cost times the node count. This measures that cost per op the step uses, and the
alternatives a lowering could choose between, each as a chain of ``--chain`` identical nodes (each
reads the previous one's output, so nothing overlaps) in bf16, bound once with I/O binding and
replayed from one CUDA graph (``enable_cuda_graph``): ``us_per_node`` = (replay time) / chain.

Cases (``[1, 1, H]`` activations, H = 1536 as Gemma 4 E2B's hidden size; weights random):

* ``norm``: ``SimplifiedLayerNormalization`` over H; ``skip_norm``: ``SkipSimplifiedLayerNormalization``
  with a skip input of zeros (the same result through ORT's skip-norm kernels: is it the cheaper one
  at one row?); ``skip_norm_sum``: the same with its sum output read by the next node.
* ``add`` / ``mul``: elementwise ``[1, 1, H]`` (the launch floor of a trivial kernel); ``fast_gelu``.
* ``matmul_{N}``: ``MatMul`` ``[1, 1, H] x [H, N]`` followed by a ``MatMul`` ``[1, 1, N] x [N, H]``
  back (so the chain stays ``[1, 1, H]``), per pair: N = 256 (Gemma 4's K / V and per-layer-input
  widths), 2048 (Q), 6144 (gate or up), 12288 (gate and up packed); ``us_per_node`` is per pair here,
  and ``gbps`` the pair's weight bytes over its time, against ``copy_bw`` (device-to-device copy).
  (A ``Split`` -- what packing two projections adds in ONNX -- is a trivial copy kernel: ``add``'s floor.)
* ``tmatmul_{N}``: the same pairs with the weights stored ``[N, H]`` / ``[H, N]`` and read transposed
  (``com.microsoft.FusedMatMul``, ``transB=1``): torch's ``Linear`` layout, where cuBLAS computes each
  output as a dot product over a contiguous row -- is a one-row GEMM cheaper that way than over the
  ``[H, N]`` layout the exported ``MatMul`` reads?

Writes ``ort_kernel_floor.json`` (one entry per case: ``us_per_node``, the replay's ms, errors caught
per case) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: _common

HIDDEN = 1536
BF16 = TensorProto.BFLOAT16
FLOAT = TensorProto.FLOAT


def _tensor(name: str, array: np.ndarray, dtype: int) -> onnx.TensorProto:
    """An initializer of ``array`` in ``dtype`` (bf16 through ml_dtypes, which onnx ships with)."""
    if dtype == BF16:
        import ml_dtypes

        return helper.make_tensor(name, BF16, array.shape, array.astype(ml_dtypes.bfloat16).view(np.uint16).tobytes(),
                                  raw=True)
    return helper.make_tensor(name, dtype, array.shape, array.astype(np.float32).tobytes(), raw=True)


def chain_model(case: str, chain: int, dtype: int, seed: int = 0) -> onnx.ModelProto:
    """The ``case``'s chain of ``chain`` nodes (pairs for ``matmul_*``, a norm and an add for
    ``skip_norm_sum``): input ``x``
    ``[1, 1, H]``, output ``y`` of the same shape."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    if case in ("norm", "skip_norm", "skip_norm_sum"):
        inits.append(_tensor("w", 1.0 + 0.1 * rng.standard_normal(HIDDEN), dtype))
        if case != "norm":
            inits.append(_tensor("zeros", np.zeros((1, 1, HIDDEN)), dtype))
    elif case in ("add", "mul"):
        inits.append(_tensor("c", 1.0 + 1e-3 * rng.standard_normal(HIDDEN), dtype))
    for i in range(chain):
        y = f"h{i}" if i < chain - 1 else "y"
        if case == "norm":
            nodes.append(helper.make_node("SimplifiedLayerNormalization", [x, "w"], [y], axis=-1, epsilon=1e-6,
                                          stash_type=1))
        elif case == "skip_norm":
            nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, "zeros", "w"], [y],
                                          domain="com.microsoft", epsilon=1e-6))
        elif case == "skip_norm_sum":
            nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, "zeros", "w"],
                                          [f"n{i}", "", "", f"s{i}"], domain="com.microsoft", epsilon=1e-6))
            nodes.append(helper.make_node("Add", [f"n{i}", f"s{i}"], [y]))
        elif case in ("add", "mul"):
            nodes.append(helper.make_node(case.capitalize(), [x, "c"], [y]))
        elif case == "fast_gelu":
            nodes.append(helper.make_node("FastGelu", [x], [y], domain="com.microsoft"))
        elif case.startswith("matmul_"):
            n = int(case.split("_")[1])
            scale = 1.0 / np.sqrt(HIDDEN)
            inits += [_tensor(f"a{i}", scale * rng.standard_normal((HIDDEN, n)), dtype),
                      _tensor(f"b{i}", (1.0 / np.sqrt(n)) * rng.standard_normal((n, HIDDEN)), dtype)]
            nodes += [helper.make_node("MatMul", [x, f"a{i}"], [f"m{i}"]),
                      helper.make_node("MatMul", [f"m{i}", f"b{i}"], [y])]
        elif case.startswith("tmatmul_"):  # the same pair, weights stored [out, in] (torch's Linear layout)
            n = int(case.split("_")[1])
            inits += [_tensor(f"a{i}", (1.0 / np.sqrt(HIDDEN)) * rng.standard_normal((n, HIDDEN)), dtype),
                      _tensor(f"b{i}", (1.0 / np.sqrt(n)) * rng.standard_normal((HIDDEN, n)), dtype)]
            nodes += [helper.make_node("FusedMatMul", [x, f"a{i}"], [f"m{i}"], domain="com.microsoft", transB=1),
                      helper.make_node("FusedMatMul", [f"m{i}", f"b{i}"], [y], domain="com.microsoft", transB=1)]
        else:
            raise ValueError(f"unknown case {case!r}")
        x = y
    io = [helper.make_tensor_value_info(n, dtype, [1, 1, HIDDEN]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, case, [io[0]], [io[1]], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # onnx 1.23 writes IR 14, which ONNX Runtime 1.31 refuses ("max supported IR version: 13")
    return model


CASES = ("norm", "skip_norm", "skip_norm_sum", "add", "mul", "fast_gelu", "matmul_256", "matmul_2048",
         "matmul_6144", "matmul_12288", "tmatmul_256", "tmatmul_2048", "tmatmul_6144", "tmatmul_12288")


def weight_bytes(case: str) -> int:
    """Weight bytes one unit (node, or pair for ``matmul_*``) of ``case`` reads in bf16."""
    return 2 * 2 * HIDDEN * int(case.split("_")[1]) if case.startswith(("matmul_", "tmatmul_")) else 0


def run_case(path: str, device: str, reps: int) -> dict:
    """Replay time of the chain at ``path``: CUDA graph on ``cuda``; plain runs with I/O binding on
    ``cpu`` (fp32; checks the model runs and the output is finite)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if device == "cuda":
        import torch

        providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1",
                                                "arena_extend_strategy": "kSameAsRequested"})]
        session = ort.InferenceSession(path, opts, providers=providers)
        x = torch.randn(1, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        binding = session.io_binding()
        for name, t in (("x", x), ("y", y)):
            kind = binding.bind_input if name == "x" else binding.bind_output
            # the ONNX element type as an int (numpy has no bf16; a uint16 buffer is refused as uint16)
            kind(name, "cuda", 0, BF16 if t.dtype == torch.bfloat16 else FLOAT, list(t.shape), t.data_ptr())
        for _ in range(3):  # the first runs capture the graph
            session.run_with_iobinding(binding)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            session.run_with_iobinding(binding)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / reps * 1e3
        finite = bool(torch.isfinite(y.float()).all())
    else:
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {"x": np.random.default_rng(0).standard_normal((1, 1, HIDDEN)).astype(np.float32)}
        session.run(None, feed)
        start = time.perf_counter()
        for _ in range(reps):
            out = session.run(None, feed)[0]
        ms = (time.perf_counter() - start) / reps * 1e3
        finite = bool(np.isfinite(out).all())
    return {"ms": ms, "finite": finite}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--chain", type=int, default=64)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and args.device == "cuda":
        ort.preload_dlls()
    dtype = BF16 if args.device == "cuda" else FLOAT
    bw = None
    if args.device == "cuda":
        import torch

        from _common import copy_bandwidth

        bw = copy_bandwidth(torch.device("cuda"))
    results = {"onnxruntime": ort.__version__, "device": args.device, "chain": args.chain, "hidden": HIDDEN,
               "copy_bw": bw, "cases": {}}
    for case in args.cases.split(","):
        entry = results["cases"][case] = {}
        try:
            path = os.path.join(args.out, f"floor_{case}.onnx")
            onnx.save(chain_model(case, args.chain, dtype), path)
            entry.update(run_case(path, args.device, args.reps))
            entry["us_per_node"] = entry["ms"] * 1e3 / args.chain
            if weight_bytes(case):
                entry["gbps"] = weight_bytes(case) / (entry["us_per_node"] * 1e-6) / 1e9
                if bw:
                    entry["of_copy_bw"] = entry["gbps"] * 1e9 / bw
            os.remove(path)
        except Exception as exc:  # noqa: BLE001  (a case that fails is a finding)
            entry["error"] = f"{type(exc).__name__}: {exc}"[:600]
            traceback.print_exc()
        print(json.dumps({case: entry}), flush=True)
        with open(os.path.join(args.out, "ort_kernel_floor.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("| case | us per node (pair for matmul) | GB/s | of copy bw | error |\n|---|---|---|---|---|")
    for case, e in results["cases"].items():
        print(f"| {case} | {e.get('us_per_node', float('nan')):.2f} | {e.get('gbps', float('nan')):.0f} | "
              f"{e.get('of_copy_bw', float('nan')):.2f} | {e.get('error', '')[:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
