"""End-to-end decode step of a real-size preset on one CUDA GPU: eager sample vs the rewritten program.

    python3 bench/decode_step.py [--out DIR] [--presets gemma4-e2b] [--contexts 4096,32768] [--batches 1,8]

For each preset: random bf16 weights built on the GPU; ``capture_step`` + ``run_pipeline`` of that
GPU model (torch.export on CUDA); the rewritten program then runs with the Triton decode kernels
(``effexport.custom_ops.enable_triton()``). Checked first: prefill of 64 tokens plus 4 decode steps
of the rewritten program against the eager model (max relative error of the logits, greedy tokens).
Then, per context L and batch B, one decode step at position L-1 with random cache contents:

* ``eager``: the sample's own forward with its full-length past (``torch.cat`` caches, SDPA-free
  matmul attention as written in ``samples/``), launched from Python;
* ``rewritten``: the rewritten step graph (CachePlan caches: rings for sliding layers, full caches
  only for full owners, read-only consumers) launched from Python, and replayed as a CUDA graph;
* ``aoti`` (with ``--aoti``): the same rewritten program compiled by AOTInductor
  (``effexport.exporter.backends.aoti.aoti_step``, what ``--target aoti`` builds), the effexport ops still
  dispatching to the Triton decode kernels; launched and graph-replayed like ``rewritten``.

Roofline = (weight bytes a step reads + owned KV bytes) / copy bandwidth measured in the same run;
weight bytes are every parameter except embedding tables that are only gathered (the tied LM head is
counted). Writes ``step.json`` / ``step.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

from effexport.samples import get_sample

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_common_args, copy_bandwidth, param_count, weight_bytes  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16


def _median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _timed(fn, reps: int = 7) -> dict:
    """Python-launched median, then the same call replayed from a CUDA graph (or why not)."""
    with torch.no_grad():
        fn()
        fn()
        torch.cuda.synchronize()
        res = {"eager_launch_s": _median_seconds(fn, reps)}
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            torch.cuda.synchronize()
            res["graph_s"] = _median_seconds(graph.replay, reps)
            del graph
        except Exception as exc:  # noqa: BLE001  (report why, keep the launched number)
            res["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            torch.cuda.synchronize()
    return res


def init_dtype(sample, dtype: torch.dtype, device_bytes: int) -> torch.dtype:
    """The dtype :func:`build` initialises ``sample``'s model in: fp32 unless its fp32 weights exceed
    80% of the GPU's ``device_bytes`` (its total memory, so that every process on one machine -- a
    build's subprocess and the bench that compares against its eager model -- makes the same choice
    and gets the same weights; counted on the meta device: no memory, no init)."""
    if dtype == torch.float32:
        return dtype
    return dtype if param_count(sample) * 4 > 0.8 * device_bytes else torch.float32


def build(sample, dtype=BF16) -> torch.nn.Module:
    """The sample's model with its random init run on the GPU (CPU init of ~5B params is slow): in
    fp32, then cast, unless the fp32 weights would not fit in 80% of the GPU's memory (Laguna XS.2:
    134 GB; :func:`init_dtype`) -- then the init runs in ``dtype`` itself (other random values;
    nothing compares them with an fp32 init's)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    if torch.cuda.is_available() and str(DEV).startswith("cuda"):
        torch.set_default_dtype(init_dtype(sample, dtype, torch.cuda.mem_get_info()[1]))
    try:
        with torch.device(DEV):
            model = sample.module.Model(sample.config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    if torch.cuda.is_available() and str(DEV).startswith("cuda"):
        # the fp32 init's blocks stay reserved by torch's caching allocator otherwise (55 GB for the
        # DeepSeek V4 Flash cut), out of reach of an ONNX Runtime session opened next
        torch.cuda.empty_cache()
    return model


def eager_past(model, seq_dims: dict, batch: int, length: int, gen) -> dict:
    """The sample's past at ``length`` tokens, random contents (shapes from a short prefill)."""
    with torch.no_grad():
        _, past = model(torch.zeros(batch, 8, dtype=torch.long, device=DEV))
    out = {}
    for name, t in past.items():
        shape = list(t.shape)
        dim = seq_dims.get(f"past.{name}")
        if dim is not None:
            shape[dim] = length
        out[name] = torch.randn(shape, device=DEV, dtype=t.dtype, generator=gen) * 0.5
    return out


def plan_caches(plan, batch: int, length: int, gen) -> list:
    caches = []
    for e in plan.entries:
        dtype = getattr(torch, e.dtype)
        caches.append(torch.randn(e.concrete_shape(batch, length), device=DEV, dtype=dtype, generator=gen) * 0.5)
    return caches


def parity(name: str, model, program, plan, vocab: int, gen) -> dict:
    """Prefill 64 tokens + 4 greedy decode steps of the rewritten program (bf16, Triton decode) and
    of the eager bf16 model, each against the eager model in fp32 (same weights): max relative error
    of the logits (``max|x - ref| / max|ref|``), and whether the greedy tokens match the fp32 ones."""
    ref_model = build(get_sample(name), torch.float32)
    ids = torch.randint(0, vocab, (2, 64), device=DEV, generator=gen)
    worst = {"rewritten": 0.0, "eager_bf16": 0.0}
    same = {"rewritten": True, "eager_bf16": True}

    def err(x, ref):
        return ((x.float() - ref).abs().max() / ref.abs().max()).item()
    with torch.no_grad():
        ref, past32 = ref_model(ids)
        got, past = model(ids)
        outs = program.gm(ids, torch.tensor(0, device=DEV), *plan.empty_caches(2, DEV))
        worst = {"rewritten": err(outs[0], ref), "eager_bf16": err(got, ref)}
        caches = list(outs[1:])
        tok = ref[:, -1:].argmax(-1)
        for step in range(4):
            ref, past32 = ref_model(tok, past32)
            got, past = model(tok, past)
            outs = program.gm(tok, torch.tensor(64 + step, device=DEV), *caches)
            caches = list(outs[1:])
            for key, x in (("rewritten", outs[0]), ("eager_bf16", got)):
                worst[key] = max(worst[key], err(x, ref))
                same[key] = same[key] and torch.equal(x[:, -1].argmax(-1), ref[:, -1].argmax(-1))
            tok = ref[:, -1:].argmax(-1)
    del ref_model
    return {"max_rel_err_vs_fp32": worst, "greedy_tokens_equal_fp32": same}


def _profile(fn, top: int = 15) -> str:
    """Kernel table (self device time) of one launched call, for where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=70)


def compile_aoti(program, plan, name: str, res: dict):
    """The rewritten program as an AOTInductor package (in a temporary directory), or None with
    ``res["aoti_error"]`` saying why."""
    import tempfile

    from effexport.exporter.backends.aoti import aoti_step

    t0 = time.monotonic()
    try:
        step = aoti_step(program, plan, os.path.join(tempfile.mkdtemp(), f"{name}.pt2"), DEV)
    except Exception as exc:  # noqa: BLE001  (report why, keep the other columns)
        res["aoti_error"] = f"{type(exc).__name__}: {exc}"[:400]
        traceback.print_exc()
        return None
    res["aoti_compile_s"] = time.monotonic() - t0
    return step


def run_preset(name: str, contexts, batches, bw: float, gen, profile_at=(), aoti: bool = False) -> dict:
    from effexport.exporter.capture import capture_step
    from effexport.passes.pipeline import run_pipeline

    sample = get_sample(name)
    res = {"preset": name, "rows": []}
    t0 = time.monotonic()
    model = build(sample)
    res["build_s"] = time.monotonic() - t0
    res["weight_bytes"] = weight_bytes(model)
    res["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = sample.config.vocab_size
    t0 = time.monotonic()
    ids = torch.randint(0, vocab, (2, 40), device=DEV, generator=gen)
    captured = capture_step(model, ids)
    program, analysis = run_pipeline(captured, max_context=max(contexts))
    res["capture_rewrite_s"] = time.monotonic() - t0
    res["counts"] = {k: v for k, v in analysis.counts.items()}
    plan = analysis.plan
    try:
        res["parity"] = parity(name, model, program, plan, vocab, gen)
    except Exception as exc:  # noqa: BLE001
        res["parity"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        traceback.print_exc()
    aoti_fn = compile_aoti(program, plan, name, res) if aoti else None
    print(f"{name}: build {res['build_s']:.0f}s, capture+rewrite {res['capture_rewrite_s']:.0f}s, "
          f"parity {res['parity']}", flush=True)
    for ctx in contexts:
        for batch in batches:
            row = {"context": ctx, "batch": batch}
            kv = sum(e.nbytes(batch, ctx) for e in plan.entries)
            row["kv_bytes"] = kv
            row["roofline_s"] = (res["weight_bytes"] + kv) / bw
            ids1 = torch.randint(0, vocab, (batch, 1), device=DEV, generator=gen)
            try:
                caches = None
                caches = plan_caches(plan, batch, ctx - 1, gen)
                pos = torch.tensor(ctx - 1, device=DEV)
                row["rewritten"] = _timed(lambda: program.gm(ids1, pos, *caches))
                if aoti_fn is not None:
                    row["aoti"] = _timed(lambda: aoti_fn(ids1, pos, *caches))
            except Exception as exc:  # noqa: BLE001
                row["rewritten"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
                traceback.print_exc()
            if (ctx, batch) in profile_at and "error" not in row["rewritten"]:
                row["rewritten_profile"] = _profile(lambda: program.gm(ids1, pos, *caches))
                print(row["rewritten_profile"], flush=True)
            del caches
            torch.cuda.empty_cache()
            try:
                past = eager_past(model, captured.seq_dims, batch, ctx - 1, gen)
                row["eager_kv_bytes"] = sum(t.numel() * t.element_size() for t in past.values())
                row["eager"] = _timed(lambda: model(ids1, past))
                if (ctx, batch) in profile_at:
                    row["eager_profile"] = _profile(lambda: model(ids1, past))
                    print(row["eager_profile"], flush=True)
                del past
            except Exception as exc:  # noqa: BLE001
                row["eager"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            torch.cuda.empty_cache()
            res["rows"].append(row)
            print(json.dumps({"preset": name, **row}), flush=True)
    del model, program, captured
    torch.cuda.empty_cache()
    return res


def _us(d: dict, key: str) -> str:
    return f"{d[key] * 1e3:.2f}" if key in d else "-"


def table(results: list, bw: float) -> str:
    lines = [f"copy bandwidth {bw / 1e12:.3f} TB/s",
             "| preset | L | B | weights GB | KV GB (plan) | KV GB (eager) | roofline ms | eager ms (launched) | "
             "eager ms (graph) | rewritten ms (launched) | rewritten ms (graph) | rewritten graph / roofline | "
             "eager / rewritten |", "|" + "---|" * 13]
    for res in results:
        for r in res.get("rows", []):
            rw, eg = r.get("rewritten", {}), r.get("eager", {})
            best_rw = rw.get("graph_s", rw.get("eager_launch_s"))
            best_eg = eg.get("graph_s", eg.get("eager_launch_s"))
            lines.append(
                f"| {res['preset']} | {r['context'] // 1024}K | {r['batch']} | {res['weight_bytes'] / 1e9:.2f} | "
                f"{r['kv_bytes'] / 1e9:.3f} | {r.get('eager_kv_bytes', 0) / 1e9:.3f} | {r['roofline_s'] * 1e3:.2f} | "
                f"{_us(eg, 'eager_launch_s')} | {_us(eg, 'graph_s')} | {_us(rw, 'eager_launch_s')} | "
                f"{_us(rw, 'graph_s')} | "
                f"{(best_rw / r['roofline_s']) if best_rw else float('nan'):.2f}x | "
                f"{(best_eg / best_rw) if best_rw and best_eg else float('nan'):.1f}x |")
    return "\n".join(lines)


def aoti_table(results: list) -> str:
    """The ``aoti`` column (``--aoti``) next to the rewritten graph it was compiled from."""
    lines = ["| preset | L | B | rewritten ms (graph) | aoti ms (launched) | aoti ms (graph) | rewritten / aoti |",
             "|" + "---|" * 7]
    for res in results:
        for r in res.get("rows", []):
            rw, ao = r.get("rewritten", {}), r.get("aoti", {})
            best_rw, best_ao = rw.get("graph_s", rw.get("eager_launch_s")), ao.get("graph_s", ao.get("eager_launch_s"))
            lines.append(f"| {res['preset']} | {r['context'] // 1024}K | {r['batch']} | {_us(rw, 'graph_s')} | "
                         f"{_us(ao, 'eager_launch_s')} | {_us(ao, 'graph_s')} | "
                         f"{(best_rw / best_ao) if best_rw and best_ao else float('nan'):.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--presets", default="gemma4-e2b")
    ap.add_argument("--profile", default="", help="L:B pairs (e.g. 4096:1,32768:8): kernel table of the rewritten step")
    ap.add_argument("--aoti", action="store_true", help="also time the rewritten program compiled by AOTInductor")
    args = ap.parse_args(argv)
    profile_at = {tuple(int(x) for x in p.split(":")) for p in args.profile.split(",") if p}
    if not torch.cuda.is_available():
        print("bench/decode_step.py needs a CUDA GPU", file=sys.stderr)
        return 4
    from effexport.custom_ops import enable_triton
    enable_triton()
    gen = torch.Generator(device=DEV).manual_seed(0)
    bw = copy_bandwidth(torch.device(DEV))
    contexts, batches = args.contexts, args.batches
    results = []
    for name in args.presets.split(","):
        try:
            results.append(run_preset(name, contexts, batches, bw, gen, profile_at, args.aoti))
        except Exception as exc:  # noqa: BLE001  (one preset failing must not hide the others)
            traceback.print_exc()
            results.append({"preset": name, "error": f"{type(exc).__name__}: {exc}"[:600]})
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "step.json"), "w") as f:
            json.dump({"copy_bw": bw, "torch": torch.__version__, "results": results}, f, indent=1, default=str)
        md = table(results, bw) + (("\n\n" + aoti_table(results)) if args.aoti else "")
        with open(os.path.join(args.out, "step.md"), "w") as f:
            f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
