"""The torch engine on one GPU: decode ms per step and logit errors of the rewritten step run three
ways -- uncaptured, replayed from a CUDA graph, compiled by Inductor and replayed from a CUDA graph.

    python3 bench/torch_engine.py [--out DIR] [--tiny] [--real gemma4-e2b] [--dtypes fp32,bf16]
                                  [--contexts 4096,32768] [--batches 1,8] [--budget-s 480] [--device cuda]

Cases: every tiny preset at each of ``--dtypes`` (``--tiny``), and each ``--real`` preset at real size
in bf16 (random weights built on the GPU, as ``bench/decode_step.py`` does). Per case the model is
captured and rewritten on the device with ``cache_layout="buffer"`` (fixed caches: what a CUDA graph
replays on), then:

* errors: a prompt then ``--decode`` steps, teacher-forced with the fp32 eager model's greedy tokens,
  through every variant: ``eager`` (the sample in the case's dtype), ``rewritten`` (the rewritten step
  uncaptured, Triton kernels for the effexport ops), ``rewritten_graph`` (the same replayed from a CUDA
  graph by :class:`~effexport.exporter.backends.torch.TorchEngine`), ``compiled`` (Inductor, uncaptured)
  and ``compiled_graph`` (Inductor + CUDA graph). For each: the max relative error of the logits
  (``max|x - ref| / max|ref|`` over the prefill and every decode step) against fp32 eager and
  against eager in the case's dtype. If ``compiled_graph`` is no farther from fp32 eager than
  ``rewritten`` and ``eager`` are, the compiled-vs-uncompiled difference is bf16 rounding order, not
  a bug;
* timings, per context L and batch B: one decode step at position L-1 over random cache contents,
  median of ``--reps`` CUDA-event-timed calls: ``rewritten`` (launched from Python), ``rewritten_graph``
  and ``compiled_graph`` (``TorchEngine.step``: the replay plus copying the ids / position in and each
  present into its static cache, what a decode loop pays), and ``*_bare`` (a graph of the bare step
  without the copy-back, comparable with ``bench/decode_step.py``'s "graph" column).

Each case and each variant runs in try/except (the error is recorded, the others go on); cases and
timing rows that would start after ``--budget-s`` are recorded as skipped (keep it under the machine's
per-command limit: a real-size case alone spends minutes in capture and Inductor compiles). Writes
``torch_engine.json`` to ``--out`` (default ``$OUT``) after every stage of every case and prints a
table. ``--device cpu --tiny`` runs the same code on the
CPU (no graphs, no compile unless ``--cpu-compile``: Inductor's C++ compile takes minutes there), to
check the script end to end.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback

import torch

from effexport.samples import get_sample, preset_names

TINY_PRESETS = [n for n in preset_names(report_only=False) if n.endswith(":tiny")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("eager", "rewritten", "rewritten_graph", "compiled", "compiled_graph")


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


class Clock:
    """Median seconds of ``fn()``: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps

    def __call__(self, fn) -> float:
        with torch.no_grad():
            for _ in range(2):
                fn()
            times = []
            for _ in range(self.reps):
                if self.device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                else:
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
        return statistics.median(times)


def build_models(name: str, dtype: torch.dtype, device: torch.device, real: bool):
    """(fp32 eager model, the same weights in ``dtype``) on ``device``."""
    sample = get_sample(name)
    torch.manual_seed(0)
    if real:  # random init of ~5B parameters on the GPU (a CPU init is slow)
        with torch.device(device):
            model32 = sample.module.Model(sample.config)
        model32 = model32.float().eval()
    else:
        model32 = sample.build(device=device)
    model = model32 if dtype == torch.float32 else copy.deepcopy(model32).to(dtype).eval()
    return sample, model32, model


def rewrite(sample, model, device, max_context: int):
    from effexport.exporter.capture import capture_step
    from effexport.passes.pipeline import run_pipeline
    from effexport.samples._spec import capture_length

    gen = torch.Generator().manual_seed(1)
    length = capture_length(sample.config.layer_specs())
    ids = torch.randint(0, sample.config.vocab_size, (2, length), generator=gen).to(device)
    program, analysis = run_pipeline(capture_step(model, ids), max_context=max_context, cache_layout="buffer")
    return program, analysis


def engines(program, plan, device, cpu_compile: bool) -> dict:
    """Variant name -> a ``step(ids, pos, caches) -> (logits, caches)`` callable, or the error."""
    from effexport.exporter.backends.torch import TorchEngine

    cuda = device.type == "cuda"
    out: dict = {"rewritten": TorchEngine(program.gm, plan.entries, device, compile=False, cuda_graphs=False)}
    specs = {"rewritten_graph": (False, True), "compiled": (True, False), "compiled_graph": (True, True)}
    for key, (comp, graphs) in specs.items():
        if graphs and not cuda:
            out[key] = "skipped: CUDA graphs need a CUDA device"
        elif comp and not cuda and not cpu_compile:
            out[key] = "skipped: Inductor on the CPU takes minutes per shape (--cpu-compile to run it)"
        else:
            try:
                out[key] = TorchEngine(program.gm, plan.entries, device, compile=comp, cuda_graphs=graphs)
            except Exception as exc:  # noqa: BLE001
                out[key] = f"error: {_short(exc)}"
    return out


def errors(model32, model, runners: dict, plan, vocab: int, device, prompt: int, decode: int) -> dict:
    """Max relative logit errors of every variant vs fp32 eager and vs eager in the case's dtype,
    teacher-forced with fp32 eager's greedy tokens; greedy agreement with fp32 eager too."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (2, prompt), generator=gen).to(device)
    with torch.no_grad():
        ref32, past32 = model32(ids)
        refdt, pastdt = model(ids)
        toks, refs32, refsdt = [], [ref32], [refdt]
        for _ in range(decode):
            toks.append(refs32[-1][:, -1:].argmax(-1))
            r32, past32 = model32(toks[-1], past32)
            rdt, pastdt = model(toks[-1], pastdt)
            refs32.append(r32)
            refsdt.append(rdt)
    res = {"eager": {"vs_fp32": max(_err(a, b) for a, b in zip(refsdt, refs32)), "vs_dtype": 0.0,
                     "greedy_equal_fp32": all(torch.equal(a[:, -1].argmax(-1), b[:, -1].argmax(-1))
                                              for a, b in zip(refsdt, refs32))}}
    for key, runner in runners.items():
        if isinstance(runner, str):
            res[key] = {"error": runner}
            continue
        try:
            with torch.no_grad():
                logits, caches = runner.step(ids, 0, runner.initial_caches(2))
                outs = [logits.clone()]
                for t, tok in enumerate(toks):
                    logits, caches = runner.step(tok, prompt + t, caches)
                    outs.append(logits.clone())
            res[key] = {"vs_fp32": max(_err(a, b) for a, b in zip(outs, refs32)),
                        "vs_dtype": max(_err(a, b) for a, b in zip(outs, refsdt)),
                        "greedy_equal_fp32": all(torch.equal(a[:, -1].argmax(-1), b[:, -1].argmax(-1))
                                                 for a, b in zip(outs, refs32))}
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            res[key] = {"error": _short(exc)}
    return res


def _bare_graph_time(fn, clock) -> float:
    """A CUDA graph of the bare ``fn()`` (no copy-back), replay timed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn()
    try:
        return clock(graph.replay)
    finally:
        del graph


def timings(program, plan, runners: dict, vocab: int, device, contexts, batches, clock, rows: list,
            save, deadline: float) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    for ctx in contexts:
        for batch in batches:
            row = {"context": ctx, "batch": batch}
            if time.monotonic() > deadline:
                row["skipped"] = "time budget"
                rows.append(row)
                continue
            try:
                caches = [torch.randn(e.concrete_shape(batch, ctx - 1), device=device, generator=gen).to(
                    getattr(torch, e.dtype)) * 0.5 if getattr(torch, e.dtype).is_floating_point
                    else e.empty(batch, device) for e in plan.entries]
                ids1 = torch.randint(0, vocab, (batch, 1), device=device, generator=gen)
                pos = torch.tensor(ctx - 1, device=device)
                row["rewritten_s"] = clock(lambda: program.gm(ids1, pos, *caches))
                for key in ("rewritten_graph", "compiled_graph", "compiled"):
                    runner = runners.get(key)
                    if isinstance(runner, str) or runner is None:
                        row[f"{key}_s"] = runner
                        continue
                    try:
                        state = {"caches": [c.clone() for c in caches]}

                        def call(runner=runner, state=state):
                            state["logits"], state["caches"] = runner.step(ids1, ctx - 1, state["caches"])
                        row[f"{key}_s"] = clock(call)
                        if key.endswith("_graph"):
                            row[f"{key}_bare_s"] = _bare_graph_time(
                                lambda runner=runner: runner.fn(ids1, pos, *caches), clock)
                    except Exception as exc:  # noqa: BLE001
                        traceback.print_exc()
                        row[f"{key}_s"] = f"error: {_short(exc)}"
                    if device.type == "cuda":
                        runner.graphs.clear()
                        torch.cuda.empty_cache()
                del caches
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                row["error"] = _short(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            save()
            print(json.dumps(row), flush=True)
    return rows


def run_case(case: dict, args, device, clock, save, deadline: float) -> dict:
    """Fill ``case`` (preset, dtype, real_size) in place, calling ``save()`` after each stage."""
    name, dtype_name, real = case["preset"], case["dtype"], case["real_size"]
    t0 = time.monotonic()
    sample, model32, model = build_models(name, DTYPES[dtype_name], device, real)
    contexts = args.contexts if real else [args.tiny_context]
    batches = args.batches if real else [1, 2]
    program, analysis = rewrite(sample, model, device, max(contexts))
    case["capture_rewrite_s"] = time.monotonic() - t0
    case["constants"] = analysis.counts.get("constants")
    save()
    plan = analysis.plan
    runners = engines(program, plan, device, args.cpu_compile)
    t1 = time.monotonic()
    prompt = 64 if real else 40
    case["errors"] = errors(model32, model, runners, plan, sample.config.vocab_size, device, prompt, args.decode)
    case["errors_s"] = time.monotonic() - t1  # includes Inductor's compiles for the prompt and decode shapes
    save()
    if real:
        del model32
    if device.type == "cuda":
        for r in runners.values():
            if not isinstance(r, str):
                r.graphs.clear()
        torch.cuda.empty_cache()
    case["rows"] = []
    timings(program, plan, runners, sample.config.vocab_size, device, contexts, batches, clock, case["rows"],
            save, deadline)
    return case


def _ms(v) -> str:
    return f"{v * 1e3:.3f}" if isinstance(v, float) else "-" if v is None else "err" if "error" in str(v) else "skip"


def _e(d: dict, key: str, which: str) -> str:
    v = d.get(key, {})
    return f"{v[which]:.2e}" if which in v else "err" if "error" in v and "skipped" not in v["error"] else "-"


def table(cases: list) -> str:
    lines = ["| preset | dtype | L | B | rewritten ms | rewritten graph ms (bare) | compiled graph ms (bare) | "
             "err vs fp32: eager / rewritten / rewr. graph / compiled graph | err vs eager dtype: rewritten / compiled graph |",
             "|" + "---|" * 9]
    for c in cases:
        if "errors" not in c:
            lines.append(f"| {c['preset']} | {c.get('dtype')} | - | - | {c.get('error', c.get('skipped', ''))[:80]} | | | | |")
            continue
        e = c["errors"]
        errs = " / ".join(_e(e, k, "vs_fp32") for k in ("eager", "rewritten", "rewritten_graph", "compiled_graph"))
        errd = " / ".join(_e(e, k, "vs_dtype") for k in ("rewritten", "compiled_graph"))
        for r in c.get("rows") or [{"context": "-", "batch": "-"}]:
            lines.append(
                f"| {c['preset']} | {c['dtype']} | {r['context']} | {r['batch']} | {_ms(r.get('rewritten_s'))} | "
                f"{_ms(r.get('rewritten_graph_s'))} ({_ms(r.get('rewritten_graph_bare_s'))}) | "
                f"{_ms(r.get('compiled_graph_s'))} ({_ms(r.get('compiled_graph_bare_s'))}) | {errs} | {errd} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny presets (at each of --dtypes)")
    ap.add_argument("--presets", default=",".join(TINY_PRESETS), help="tiny presets to run with --tiny")
    ap.add_argument("--real", default="", help="real-size presets (bf16), e.g. gemma4-e2b")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tiny-context", type=int, default=128)
    ap.add_argument("--decode", type=int, default=8, help="decode steps of the error measurement")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no case or timing row after this many seconds")
    ap.add_argument("--cpu-compile", action="store_true", help="also run Inductor on the CPU (slow)")
    args = ap.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench/torch_engine.py: torch sees no CUDA device (pass --device cpu --tiny to check the script)",
                  file=sys.stderr)
            return 4
        from effexport.custom_ops import enable_triton
        enable_triton()
    clock = Clock(device, args.reps)
    plan = ([(p, d, False) for p in args.presets.split(",") if p for d in args.dtypes.split(",") if d]
            if args.tiny else [])
    plan += [(p, "bf16", True) for p in args.real.split(",") if p]
    start, cases = time.monotonic(), []
    deadline = start + args.budget_s
    os.makedirs(args.out, exist_ok=True)

    def save():
        with open(os.path.join(args.out, "torch_engine.json"), "w") as f:
            json.dump({"torch": torch.__version__, "device": str(device),
                       "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                       "elapsed_s": time.monotonic() - start, "cases": cases}, f, indent=1, default=str)
    for name, dtype_name, real in plan:
        case = {"preset": name, "dtype": dtype_name, "real_size": real}
        cases.append(case)
        if time.monotonic() > deadline:
            case["skipped"] = "time budget"
            save()
            continue
        print(f"== {name} {dtype_name}{' (real size)' if real else ''}", flush=True)
        try:
            run_case(case, args, device, clock, save, deadline)
        except Exception as exc:  # noqa: BLE001  (one case failing must not hide the others)
            traceback.print_exc()
            case["error"] = _short(exc)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    print(table(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
