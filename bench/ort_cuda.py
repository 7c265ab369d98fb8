"""ONNX Runtime CUDA, one decode step: the effexport ``ort`` ONNX artifact against the stock
``torch.onnx.export`` of the same eager sample (issue #8's ">= 4x faster than the stock export").

    PYTHONPATH=/tmp/ortgpu python3 bench/ort_cuda.py --out DIR [--presets gemma4-e2b]
        [--contexts 4096,32768] [--batches 1,8] [--dtype bf16]
    python3 bench/ort_cuda.py --device cpu --presets gemma4-e2b:tiny --contexts 64 --batches 1 --dtype fp32
        # the same script end to end on ONNX Runtime CPU (a smoke run of the code path, not a benchmark)

onnxruntime-gpu is not in the GPU machine's image: ``../shared/tools/stage-ort-gpu`` stages it (see
BENCHMARKS.md for the device calls). Per preset:

1. the sample with random weights (seed 0) in ``--dtype`` on the device (``decode_step.build``);
2. **effexport**: ``capture_step`` + ``run_pipeline`` + ``export_step(profile="ort")`` (weights as
   external data) -> ``DIR/effexport/model.onnx``; parity: ``effexport.runtime.OrtRuntime`` (I/O
   binding) prefill 16 tokens + 4 greedy decode steps against the eager model on the device (max rel
   error of the logits);
3. **stock**: ``torch.onnx.export(model, (ids, past), dynamic_shapes=<as the capture>, dynamo=True)``
   of the eager sample, what a user gets without effexport: every layer's cache at full length ->
   ``DIR/stock/model.onnx``; parity: one decode step against eager on the same random past;
4. per context L and batch B: one decode step at position L-1 over random caches, both models
   through I/O binding (inputs bound by device pointer, the logits into a torch tensor, the caches
   allocated by ORT on the device),
   median of ``--reps`` runs (``run_with_iobinding`` returns when the step is done).

Writes ``ort_cuda.json`` / ``ort_cuda.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_step  # noqa: E402  (bench/ is a script folder, not a package)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.int64: 7}
TORCH_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16}


def _session(path: str, device: str):
    import onnxruntime as ort

    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, providers=providers)


def _bind_run(session, feeds: list[torch.Tensor], device: str, logits_shape: tuple):
    """Bind every input by pointer (tensors on ``device``), the logits to a torch tensor of
    ``logits_shape`` (read back after a run; numpy cannot hold bf16) and the other outputs to
    ORT-allocated device memory; returns a callable running one step, and the logits tensor."""
    binding = session.io_binding()
    for spec, tensor in zip(session.get_inputs(), feeds):
        tensor = tensor.contiguous()
        binding.bind_input(spec.name, device, 0, ONNX_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
    first, *rest = session.get_outputs()
    logits = torch.empty(logits_shape, dtype=TORCH_TYPES[first.type], device=device)
    binding.bind_output(first.name, device, 0, ONNX_TYPES[logits.dtype], list(logits.shape), logits.data_ptr())
    for spec in rest:
        binding.bind_output(spec.name, device)

    def run():
        session.run_with_iobinding(binding)
    return run, logits


def _median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float().cpu(), ref.float().cpu()
    return ((x - ref).abs().max() / ref.abs().max()).item()


def export_effexport(model, out: str, dtype, max_context: int) -> tuple:
    from effexport.exporter.capture import capture_step
    from effexport.exporter.onnx.export import export_step, step_io_names
    from effexport.exporter.runtime import MANIFEST
    from effexport.passes.pipeline import run_pipeline

    ids = torch.randint(0, model.config.vocab_size, (2, 40), device=decode_step.DEV)
    captured = capture_step(model, ids)
    program, analysis = run_pipeline(captured, max_context=max_context)
    os.makedirs(out, exist_ok=True)
    export_step(program, analysis.plan, os.path.join(out, "model.onnx"), profile="ort")
    inputs, outputs = step_io_names(analysis.plan)
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump({"target": "onnx", "profile": "ort", "files": {"step": "model.onnx"}, "inputs": inputs,
                   "outputs": outputs, "cache_plan": analysis.plan.to_json()}, f)
    return captured, analysis.plan


def export_stock(model, captured, out: str) -> None:
    """``torch.onnx.export`` of the eager sample as a user would call it (dynamo exporter, weights as
    external data), with the capture's dynamic dims."""
    from effexport.exporter.capture import dynamic_spec

    os.makedirs(out, exist_ok=True)
    past = decode_step.eager_past(model, captured.seq_dims, 2, 37, torch.Generator(device=decode_step.DEV))
    ids = torch.zeros(2, 3, dtype=torch.long, device=decode_step.DEV)
    seq_dims = {k[len("past."):]: v for k, v in captured.seq_dims.items()}
    ids_name, past_name = list(inspect.signature(model.forward).parameters)[:2]
    spec = dict(zip((ids_name, past_name), dynamic_spec(seq_dims)))
    # the past dict goes in kwargs: torch.onnx.export reads a trailing dict in args as keyword arguments
    program = torch.onnx.export(model, (ids,), kwargs={past_name: past}, dynamic_shapes=spec, dynamo=True)
    program.save(os.path.join(out, "model.onnx"), external_data=True)


def effexport_parity(model, directory: str, device: str) -> float:
    """Prefill 16 + 4 greedy decode steps through ``OrtRuntime`` (I/O binding) vs eager."""
    from effexport.exporter.runtime import OrtRuntime

    runtime = OrtRuntime(directory, device=device, io_binding=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device=decode_step.DEV)
    worst = 0.0
    with torch.no_grad():
        ref, past = model(ids)
        result = runtime.step(ids.cpu().numpy(), 0, runtime.initial_caches(1))
        worst = _rel(torch.from_numpy(result.logits), ref)
        tok = ref[:, -1:].argmax(-1)
        for i in range(4):
            ref, past = model(tok, past)
            result = runtime.step(tok.cpu().numpy(), 16 + i, result.caches)
            worst = max(worst, _rel(torch.from_numpy(result.logits), ref))
            tok = ref[:, -1:].argmax(-1)
    return worst


def run_preset(name: str, args, dtype) -> dict:
    from effexport.samples import get_sample

    sample = get_sample(name)
    res: dict = {"preset": name, "dtype": args.dtype, "rows": []}
    gen = torch.Generator(device=decode_step.DEV).manual_seed(0)
    model = decode_step.build(sample, dtype)
    res["weight_bytes"] = decode_step.weight_bytes(model)
    t0 = time.monotonic()
    eff_dir, stock_dir = os.path.join(args.work, name, "effexport"), os.path.join(args.work, name, "stock")
    captured, plan = export_effexport(model, eff_dir, dtype, max(args.contexts))
    res["effexport_export_s"] = time.monotonic() - t0
    print(f"{name}: effexport ONNX in {res['effexport_export_s']:.0f}s", flush=True)
    try:
        res["effexport_parity_max_rel"] = effexport_parity(model, eff_dir, args.device)
    except Exception as exc:  # noqa: BLE001  (report why, keep the timings)
        res["effexport_parity_error"] = f"{type(exc).__name__}: {exc}"[:400]
        traceback.print_exc()
    t0 = time.monotonic()
    try:
        export_stock(model, captured, stock_dir)
        res["stock_export_s"] = time.monotonic() - t0
        stock = _session(os.path.join(stock_dir, "model.onnx"), args.device)
    except Exception as exc:  # noqa: BLE001
        res["stock_error"] = f"{type(exc).__name__}: {exc}"[:400]
        traceback.print_exc()
        stock = None
    eff = _session(os.path.join(eff_dir, "model.onnx"), args.device)
    print(f"{name}: {json.dumps({k: v for k, v in res.items() if k != 'rows'})}", flush=True)
    for ctx in args.contexts:
        for batch in args.batches:
            row = {"context": ctx, "batch": batch, "kv_bytes": sum(e.nbytes(batch, ctx) for e in plan.entries)}
            ids1 = torch.randint(0, sample.config.vocab_size, (batch, 1), device=decode_step.DEV)
            pos = torch.tensor(ctx - 1, device=decode_step.DEV)
            try:
                caches = decode_step.plan_caches(plan, batch, ctx - 1, gen)
                run, _ = _bind_run(eff, [ids1, pos, *caches], args.device, (batch, 1, sample.config.vocab_size))
                row["effexport_s"] = _median_s(run, args.reps)
                del caches, run
            except Exception as exc:  # noqa: BLE001
                row["effexport_error"] = f"{type(exc).__name__}: {exc}"[:400]
                traceback.print_exc()
            if stock is not None:
                try:
                    past = decode_step.eager_past(model, captured.seq_dims, batch, ctx - 1, gen)
                    row["stock_kv_bytes"] = sum(t.numel() * t.element_size() for t in past.values())
                    run, logits = _bind_run(stock, [ids1, *past.values()], args.device, (batch, 1, sample.config.vocab_size))
                    row["stock_s"] = _median_s(run, args.reps)
                    with torch.no_grad():
                        ref, _ = model(ids1, past)
                    row["stock_max_rel_vs_eager"] = _rel(logits, ref)
                    del past, run, logits
                except Exception as exc:  # noqa: BLE001
                    row["stock_error"] = f"{type(exc).__name__}: {exc}"[:400]
                    traceback.print_exc()
            if "effexport_s" in row and "stock_s" in row:
                row["stock_over_effexport"] = row["stock_s"] / row["effexport_s"]
            if args.device == "cuda":
                torch.cuda.empty_cache()
            res["rows"].append(row)
            print(json.dumps({"preset": name, **row}), flush=True)
    return res


def table(results: list) -> str:
    lines = ["| preset | dtype | L | B | KV GB (plan) | KV GB (stock) | effexport ms | stock ms | stock / effexport | stock max rel vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res.get("rows", []):
            ms = {k: f"{r[k] * 1e3:.2f}" if k in r else "-" for k in ("effexport_s", "stock_s")}
            ratio = f"{r['stock_over_effexport']:.1f}x" if "stock_over_effexport" in r else "-"
            stock_gb = f"{r['stock_kv_bytes'] / 1e9:.3f}" if "stock_kv_bytes" in r else "-"
            err = f"{r['stock_max_rel_vs_eager']:.1e}" if "stock_max_rel_vs_eager" in r else "-"
            lines.append(f"| {res['preset']} | {res['dtype']} | {r['context'] // 1024 if r['context'] >= 1024 else r['context']}"
                         f"{'K' if r['context'] >= 1024 else ''} | {r['batch']} | {r['kv_bytes'] / 1e9:.3f} | {stock_gb} | "
                         f"{ms['effexport_s']} | {ms['stock_s']} | {ratio} | {err} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--work", default="/tmp/ort_cuda", help="where the two ONNX models are written")
    ap.add_argument("--presets", default="gemma4-e2b")
    ap.add_argument("--contexts", default="4096,32768", type=lambda s: [int(c) for c in s.split(",")])
    ap.add_argument("--batches", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    ap.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/ort_cuda.py: no CUDA device (pass --device cpu for a smoke run)", file=sys.stderr)
        return 4
    decode_step.DEV = args.device
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}", flush=True)
    results = []
    for name in args.presets.split(","):
        try:
            results.append(run_preset(name, args, DTYPES[args.dtype]))
        except Exception as exc:  # noqa: BLE001  (one preset failing must not hide the others)
            traceback.print_exc()
            results.append({"preset": name, "dtype": args.dtype, "error": f"{type(exc).__name__}: {exc}"[:600]})
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ort_cuda.json"), "w") as f:
            json.dump({"onnxruntime": ort.__version__, "torch": torch.__version__, "results": results}, f,
                      indent=1, default=str)
        with open(os.path.join(args.out, "ort_cuda.md"), "w") as f:
            f.write(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
