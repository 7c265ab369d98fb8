"""ONNX Runtime CUDA, one decode step: the effexport ``ort`` ONNX artifact against the stock
``torch.onnx.export`` of the same eager sample (issue #8's ">= 4x faster than the stock export").

    PYTHONPATH=/tmp/ortgpu python3 bench/ort_cuda.py --out DIR [--presets gemma4-e2b]
        [--contexts 4096,32768] [--batches 1,8] [--dtype bf16] [--kv-cache grow,buffer]
        [--config global_head_dim=256]
    python3 bench/ort_cuda.py --device cpu --presets gemma4-e2b:tiny --contexts 64 --batches 1 --dtype fp32
        # the same script end to end on ONNX Runtime CPU (a smoke run of the code path, not a benchmark)

onnxruntime-gpu is not in the GPU machine's image: it is staged as six pieces of the pip-downloaded wheel (``.ortgpu1`` .. ``.ortgpu6``) (see
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
   allocated by ORT on the device; a ``buffer`` cache's present bound to its past's memory, so
   GroupQueryAttention writes it in place), median of ``--reps`` runs (``run_with_iobinding``
   returns when the step is done).

``--kv-cache grow,buffer`` builds one effexport artifact per full-cache layout (``--kv-cache`` of the
CLI; buffers of ``max(--contexts)`` rows) and times each in the same run; ``--config k=v,...``
overrides sample config fields (e.g. ``global_head_dim=256``: Gemma 4 E2B's full layers at Gemma 3's
head size, which GroupQueryAttention's fast CUDA kernels take).

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
from effexport.exporter.backends.onnx.graph_runtime import TORCH_TYPES  # noqa: E402,F401  (also ort_cuda_graph_probe's)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.int64: 7}


def _session(path: str, device: str, profile_prefix: str | None = None):
    import onnxruntime as ort

    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, options, providers=providers)


def gpu_kernels(path: str, feeds: list, logits_shape: tuple, in_place: tuple = (), steps: int = 5) -> dict:
    """The GPU side of ``steps`` decode steps: every CUDA kernel and copy ONNX Runtime launched, timed
    on the device by CUPTI through ``torch.profiler`` (ORT's own profile times the CPU side only), summed
    per kernel name; shows what grows with the context when the launches are hidden behind it."""
    from torch.profiler import ProfilerActivity, profile

    session = _session(path, "cuda")
    run, _ = _bind_run(session, feeds, "cuda", logits_shape, in_place)
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    per: dict = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        count, us = per.get(e.name, (0, 0.0))
        per[e.name] = (count + 1, us + e.time_range.elapsed_us() / steps)
    total = sum(us for _, us in per.values())  # already per step
    top = sorted(per.items(), key=lambda kv: -kv[1][1])[:20]
    return {"gpu_ms_per_step": total / 1e3, "kernels_per_step": sum(c for c, _ in per.values()) / steps,
            "top": [{"kernel": k[:120], "per_step": c / steps, "ms_per_step": us / 1e3} for k, (c, us) in top]}


def profile_steps(path: str, feeds: list, device: str, logits_shape: tuple, prefix: str, in_place: tuple = (),
                  steps: int = 5) -> dict:
    """ONNX Runtime's own profile of ``steps`` decode steps (after one warm-up): per step the nodes
    run, the summed node time (kernel launch + execution as ORT times it), the wall time, and per
    op type and provider the node count and time; tells launch overhead from kernel work and shows
    which nodes ran on the CPU."""
    session = _session(path, device, prefix)
    run, _ = _bind_run(session, feeds, device, logits_shape, in_place)
    run()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    wall = (time.perf_counter() - t0) / steps
    with open(session.end_profiling()) as f:
        events = json.load(f)
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = nodes[-len(nodes) * steps // (steps + 1):] if nodes else []  # drop the warm-up run's nodes
    per_node: dict = {}  # node name -> its op, provider, inputs and time per step
    for e in last:
        name = e["name"][:-len("_kernel_time")]
        entry = per_node.setdefault(name, {"node": name, "op": e["args"].get("op_name", "?"),
                                           "provider": e["args"].get("provider", "?").replace("ExecutionProvider", ""),
                                           "inputs": e["args"].get("input_type_shape"), "us": 0.0})
        entry["us"] += e.get("dur", 0) / steps
    by_type: dict = {}  # "op@provider" -> (nodes, us) per step, from the per-node table
    for n in per_node.values():
        count, us = by_type.get(f"{n['op']}@{n['provider']}", (0, 0.0))
        by_type[f"{n['op']}@{n['provider']}"] = (count + 1, us + n["us"])
    top = sorted(by_type.items(), key=lambda kv: -kv[1][1])[:15]
    slowest = sorted(per_node.values(), key=lambda n: -n["us"])[:25]
    return {"wall_ms": wall * 1e3, "nodes_per_step": len(last) / steps,
            "node_time_ms_per_step": sum(e.get("dur", 0) for e in last) / steps / 1e3,
            "model_run_ms": statistics.median(e["dur"] for e in runs[1:]) / 1e3 if len(runs) > 1 else None,
            "cpu_nodes_per_step": sum(1 for e in last if "CPU" in e["args"].get("provider", "")) / steps,
            "cpu_ops": _count(n["op"] for n in per_node.values() if n["provider"] == "CPU"),
            "top": [{"op": k, "nodes_per_step": c, "ms_per_step": us / 1e3} for k, (c, us) in top],
            "slowest_nodes": slowest,
            "copies": [n for n in per_node.values() if n["op"].startswith("Memcpy")]}


def _count(items) -> dict:
    """{item: occurrences}, most frequent first."""
    from collections import Counter

    return dict(Counter(items).most_common())


def device_inputs(session) -> list:
    """The step's inputs a caller binds on the device: all but ``pos_host`` (the host copy of ``pos``
    an ``ort`` build with shared-buffer caches reads for GroupQueryAttention's total length)."""
    return [spec for spec in session.get_inputs() if spec.name != "pos_host"]


def bind_pos_host(binding, session, pos: torch.Tensor) -> None:
    """Bind ``pos_host`` (when the step has it) to the value of ``pos``, in host memory."""
    if any(spec.name == "pos_host" for spec in session.get_inputs()):
        binding.bind_cpu_input("pos_host", pos.cpu().numpy())


def _bind_run(session, feeds: list[torch.Tensor], device: str, logits_shape: tuple, in_place: tuple = ()):
    """Bind every input by pointer (tensors on ``device``), the logits to a torch tensor of
    ``logits_shape`` (read back after a run; numpy cannot hold bf16), the presents named in
    ``in_place`` to their past's memory and the other outputs to ORT-allocated device memory;
    returns a callable running one step, and the logits tensor."""
    binding = session.io_binding()
    bound = [tensor.contiguous() for tensor in feeds]  # kept alive by run(): ORT holds raw pointers
    by_name = {}
    for spec, tensor in zip(device_inputs(session), bound):
        binding.bind_input(spec.name, device, 0, ONNX_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        by_name[spec.name] = tensor
    bind_pos_host(binding, session, bound[1])
    first, *rest = session.get_outputs()
    logits = torch.empty(logits_shape, dtype=TORCH_TYPES[first.type], device=device)
    binding.bind_output(first.name, device, 0, ONNX_TYPES[logits.dtype], list(logits.shape), logits.data_ptr())
    for spec in rest:
        past = by_name.get("past." + spec.name[len("present."):]) if spec.name in in_place else None
        if past is not None:
            binding.bind_output(spec.name, device, 0, ONNX_TYPES[past.dtype], list(past.shape), past.data_ptr())
        else:
            binding.bind_output(spec.name, device)

    def run():
        session.run_with_iobinding(binding)
    run.buffers = (bound, logits)  # the bound memory lives as long as run does (a caller may drop logits)
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


def _in_place(plan) -> tuple:
    """Present names of the plan's ``buffer`` caches (bound to their past's memory)."""
    return tuple(f"present.{e.name}" for e in plan.entries if e.kind == "buffer")


def export_effexport(model, out: str, dtype, max_context: int, kv_cache: str = "grow", captured=None) -> tuple:
    """The ``ort`` artifact the CLI writes (``--target onnx --kv-cache KV``) from ``model`` already on the
    device: the ONNX backend's ``lower`` (so a ``buffer`` build gets its one-token ``decode.onnx`` beside
    ``model.onnx``) and a manifest naming its files."""
    import types

    from effexport.exporter.backends.artifact import MANIFEST
    from effexport.exporter.backends.onnx.backend import lower
    from effexport.exporter.backends.onnx.export import step_io_names
    from effexport.exporter.capture import capture_step
    from effexport.passes.pipeline import run_pipeline

    if captured is None:
        ids = torch.randint(0, model.config.vocab_size, (2, 40), device=decode_step.DEV)
        captured = capture_step(model, ids)
    program, analysis = run_pipeline(captured, max_context=max_context, cache_layout=kv_cache)
    os.makedirs(out, exist_ok=True)
    lowered = lower(program, analysis.plan, out, types.SimpleNamespace(profile="ort", kv_cache=kv_cache))
    inputs, outputs = [v.name for v in lowered.model_proto.graph.input], step_io_names(analysis.plan)[1]
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump({"target": "onnx", "profile": "ort", "files": lowered.files, "inputs": inputs,
                   "outputs": outputs, "cache_plan": analysis.plan.to_json()}, f)
    print(f"[export] {out}: {lowered.summary}", flush=True)
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
    from effexport.exporter.backends.onnx.runtime import OrtRuntime

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
    import dataclasses

    from effexport.samples import get_sample

    sample = get_sample(name)
    if args.config:
        sample = dataclasses.replace(sample, config=dataclasses.replace(sample.config, **args.config))
    res: dict = {"preset": name, "config": args.config, "dtype": args.dtype, "rows": []}
    gen = torch.Generator(device=decode_step.DEV).manual_seed(0)
    model = decode_step.build(sample, dtype)
    res["weight_bytes"] = decode_step.weight_bytes(model)
    stock_dir = os.path.join(args.work, name, "stock")
    layouts, captured = {}, None  # kv-cache layout -> (directory, plan, session)
    for layout in args.kv_cache:
        t0 = time.monotonic()
        eff_dir = os.path.join(args.work, name, f"effexport-{layout}")
        captured, plan = export_effexport(model, eff_dir, dtype, max(args.contexts), layout, captured)
        res[f"effexport_{layout}_export_s"] = time.monotonic() - t0
        print(f"{name}: effexport ONNX ({layout}) in {res[f'effexport_{layout}_export_s']:.0f}s", flush=True)
        try:
            res[f"effexport_{layout}_parity_max_rel"] = effexport_parity(model, eff_dir, args.device)
        except Exception as exc:  # noqa: BLE001  (report why, keep the timings)
            res[f"effexport_{layout}_parity_error"] = f"{type(exc).__name__}: {exc}"[:400]
            traceback.print_exc()
        layouts[layout] = (eff_dir, plan, _session(os.path.join(eff_dir, "model.onnx"), args.device))
    t0 = time.monotonic()
    stock = None
    try:
        if not args.no_stock:
            export_stock(model, captured, stock_dir)
            res["stock_export_s"] = time.monotonic() - t0
            stock = _session(os.path.join(stock_dir, "model.onnx"), args.device)
    except Exception as exc:  # noqa: BLE001
        res["stock_error"] = f"{type(exc).__name__}: {exc}"[:400]
        traceback.print_exc()
    print(f"{name}: {json.dumps({k: v for k, v in res.items() if k != 'rows'})}", flush=True)
    for ctx in args.contexts:
        for batch in args.batches:
            grow_plan = layouts[args.kv_cache[0]][1]
            row = {"context": ctx, "batch": batch, "kv_bytes": sum(e.nbytes(batch, ctx) for e in grow_plan.entries)}
            ids1 = torch.randint(0, sample.config.vocab_size, (batch, 1), device=decode_step.DEV)
            pos = torch.tensor(ctx - 1, device=decode_step.DEV)
            for layout, (_, plan, eff) in layouts.items():
                key = "effexport_s" if layout == args.kv_cache[0] else f"effexport_{layout}_s"
                try:
                    caches = decode_step.plan_caches(plan, batch, ctx - 1, gen)
                    run, _ = _bind_run(eff, [ids1, pos, *caches], args.device, (batch, 1, sample.config.vocab_size),
                                       _in_place(plan))
                    row[key] = _median_s(run, args.reps)
                    del caches, run
                except Exception as exc:  # noqa: BLE001
                    row[f"{key[:-2]}_error"] = f"{type(exc).__name__}: {exc}"[:400]
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
            if (ctx, batch) in args.profile_at:
                shape = (batch, 1, sample.config.vocab_size)
                runs = [(f"effexport_{layout}", path, plan) for layout, (path, plan, _) in layouts.items()]
                runs += [("stock", stock_dir, None)] if stock is not None else []
                for which, path, plan in runs:
                    try:
                        feeds = ([ids1, pos, *decode_step.plan_caches(plan, batch, ctx - 1, gen)] if plan is not None
                                 else [ids1, *decode_step.eager_past(model, captured.seq_dims, batch, ctx - 1, gen).values()])
                        in_place = _in_place(plan) if plan is not None else ()
                        row[f"{which}_profile"] = profile_steps(os.path.join(path, "model.onnx"), feeds, args.device,
                                                                shape, os.path.join(args.work, f"{which}_profile"), in_place)
                        if args.device == "cuda":
                            row[f"{which}_gpu"] = gpu_kernels(os.path.join(path, "model.onnx"), feeds, shape, in_place)
                        del feeds
                    except Exception as exc:  # noqa: BLE001
                        row[f"{which}_profile_error"] = f"{type(exc).__name__}: {exc}"[:400]
                        traceback.print_exc()
            if args.device == "cuda":
                torch.cuda.empty_cache()
            res["rows"].append(row)
            print(json.dumps({"preset": name, **row}), flush=True)
    return res


def table(results: list) -> str:
    lines = ["| preset | dtype | L | B | KV GB (plan) | KV GB (stock) | effexport ms | effexport buffer ms | stock ms | "
             "stock / effexport | stock max rel vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res.get("rows", []):
            ms = {k: f"{r[k] * 1e3:.2f}" if k in r else "-" for k in ("effexport_s", "effexport_buffer_s", "stock_s")}
            ratio = f"{r['stock_over_effexport']:.1f}x" if "stock_over_effexport" in r else "-"
            stock_gb = f"{r['stock_kv_bytes'] / 1e9:.3f}" if "stock_kv_bytes" in r else "-"
            err = f"{r['stock_max_rel_vs_eager']:.1e}" if "stock_max_rel_vs_eager" in r else "-"
            lines.append(f"| {res['preset']} | {res['dtype']} | {r['context'] // 1024 if r['context'] >= 1024 else r['context']}"
                         f"{'K' if r['context'] >= 1024 else ''} | {r['batch']} | {r['kv_bytes'] / 1e9:.3f} | {stock_gb} | "
                         f"{ms['effexport_s']} | {ms['effexport_buffer_s']} | {ms['stock_s']} | {ratio} | {err} |")
    return "\n".join(lines)


def profile_table(results: list) -> str:
    """Per profiled (L, B): nodes per step, CPU nodes, summed node time vs wall time, top op types."""
    lines = []
    for res in results:
        for r in res.get("rows", []):
            for which in sorted(k[:-len("_profile")] for k in r if k.endswith("_profile")):
                prof = r.get(f"{which}_profile")
                if not prof:
                    continue
                top = ", ".join(f"{t['op']} {t['nodes_per_step']:.0f}x {t['ms_per_step']:.2f} ms" for t in prof["top"][:8])
                lines.append(f"- {res['preset']} {which} L={r['context']} B={r['batch']}: {prof['nodes_per_step']:.0f} "
                             f"nodes/step ({prof['cpu_nodes_per_step']:.0f} on CPU), node time "
                             f"{prof['node_time_ms_per_step']:.2f} ms of {prof['wall_ms']:.2f} ms wall; top: {top}")
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
    ap.add_argument("--profile-at", default="32768,1",
                    type=lambda s: [tuple(int(v) for v in p.split(",")) for p in s.split(";")],
                    help="L,B[;L,B...] at which both models also run under ORT's profiler (per-op-type node time)")
    ap.add_argument("--no-stock", action="store_true", help="effexport only (no stock export, no ratio)")
    ap.add_argument("--kv-cache", default="grow", type=lambda s: s.split(","),
                    help="full-cache layouts to build and time, e.g. grow,buffer (the first is the baseline)")
    ap.add_argument("--config", default={}, type=lambda s: {k: int(v) for k, v in (kv.split("=") for kv in s.split(","))},
                    help="sample config overrides k=v,... (ints), e.g. global_head_dim=256")
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
            f.write(table(results) + "\n\n" + profile_table(results) + "\n")
    print(table(results))
    print(profile_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
