"""The torch engine on one GPU: decode ms per step and logit errors of the rewritten step run three
ways -- uncaptured, replayed from a CUDA graph, compiled by Inductor and replayed from a CUDA graph.

    python3 bench/torch_engine.py [--out DIR] [--tiny] [--real gemma4-e2b,laguna-xs2@8L,...] [--dtypes fp32,bf16]
                                  [--contexts 4096,32768] [--batches 1,8] [--budget-s 480] [--device cuda]
                                  [--inplace | --no-inplace]

Cases: every tiny preset at each of ``--dtypes`` (``--tiny``), and each ``--real`` case at real size
in bf16 (random weights built on the GPU, as ``bench/decode_step.py`` does). A ``--real`` case is
``PRESET[@NL][/nomhc]``: ``@NL`` cuts the preset to its first N layers (``Sample.with_layers``: real
widths, fewer layers, e.g. ``laguna-xs2@8L``), ``/nomhc`` replaces DeepSeek V4's hyper-connections by a
plain single-stream residual (``config.without_mhc()``); a case and its ``/nomhc`` twin give the mHC
cost (``mhc_overhead`` in the JSON: decode-step time ratio minus 1 per L, B and variant). Per case the model is
captured and rewritten on the device with ``cache_layout="buffer"`` (fixed caches: what a CUDA graph
replays on). Every engine runs its buffer caches in place (``--inplace``, the default:
``attention_buffer_inplace`` on the caches, no copy of the whole buffers in the op and no copy-back of
their presents, :mod:`effexport.exporter.backends.torch.inplace`) or, with ``--no-inplace``, the
functional ``attention_buffer`` as the artifact has it (what the issue #21 numbers before the in-place
engine measured); ``inplace`` in the JSON says which, ``inplace_caches`` per case which caches, and
``*_copy_backs`` per row and graph variant how many presents the captured step copies back. Then:

* errors: a prompt then ``--decode`` steps, teacher-forced with the fp32 eager model's greedy tokens,
  through every variant: ``eager`` (the sample in the case's dtype), ``rewritten`` (the rewritten step
  uncaptured, Triton kernels for the effexport ops), ``rewritten_graph`` (the same replayed from a CUDA
  graph by :class:`~effexport.exporter.backends.torch.TorchEngine`), ``compiled`` (Inductor, uncaptured)
  and ``compiled_graph`` (Inductor + CUDA graph). For each: the max relative error of the logits
  (``max|x - ref| / max|ref|`` over the prefill and every decode step) against fp32 eager and
  against eager in the case's dtype. If ``compiled_graph`` is no farther from fp32 eager than
  ``rewritten`` and ``eager`` are, the compiled-vs-uncompiled difference is bf16 rounding order, not
  a bug;
* roofline, per L and B: (weight bytes + the plan's KV bytes) / the copy bandwidth measured first.
  Two weight counts: ``all`` -- every parameter but gathered embeddings, what the samples' MoE reads
  (``StackedExperts`` computes every expert on every token) -- and ``active`` -- less the routed
  experts the B tokens leave unselected (``B * k`` distinct experts per layer, an upper bound), what
  a step computing only the selected experts would read;
* timings, per context L and batch B: one decode step at position L-1 over random cache contents,
  median of ``--reps`` CUDA-event-timed calls: ``rewritten`` (the engine's step graph launched from
  Python), ``rewritten_graph``
  and ``compiled_graph`` (``TorchEngine.step``: the replay plus copying the ids / position in and each
  present into its static cache, what a decode loop pays), and ``*_bare`` (a graph of the bare step
  without the copy-back, comparable with ``bench/decode_step.py``'s "graph" column).

Real-size cases: the fp32 eager model is built only where it fits next to the bf16 one (``--fp32-ref
auto``: fp32 + bf16 bytes under 80% of the free device memory); otherwise the errors are against eager
bf16 and ``reference`` says so (the bf16 model is then initialised in bf16). The prompt of the error
measurement is prefilled once by the uncaptured rewritten step and its caches handed to every variant
(one Inductor compile less per case; ``prefill`` says which ran it). ``compiled`` shares
``compiled_graph``'s ``torch.compile`` (one compile per shape for both). Per case: ``build_s``,
``capture_rewrite_s``, ``errors_s`` (which includes Inductor's compile of the decode shape: B=1 at
real size, where the prompt is one row) and,
per row and compiled variant, ``*_first_s`` (the first call at that shape: compile + graph capture).

Each case and each variant runs in try/except (the error is recorded, the others go on); cases and
timing rows that would start after ``--budget-s`` are recorded as skipped, and so is a real-size case
with less than ``--case-min-s`` left (keep it under the machine's
per-command limit: a real-size case alone spends minutes in capture and Inductor compiles). Writes
``torch_engine.json`` to ``--out`` (default ``$OUT``) after every stage of every case and prints a
table. ``--device cpu --tiny`` runs the same code on the
CPU (no graphs, no compile unless ``--cpu-compile``: Inductor's C++ compile takes minutes there), to
check the script end to end.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

from effexport.samples import Sample, get_sample, preset_names

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import active_weight_bytes, add_common_args, copy_bandwidth, weight_bytes  # noqa: E402

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

    def once(self, fn) -> float:
        """Seconds of one ``fn()`` (synchronised): a first call's compile and capture."""
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

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


def real_sample(spec: str) -> Sample:
    """``PRESET[@NL][/nomhc]`` -> the sample: cut to its first N layers, with a plain residual in
    place of mHC (DeepSeek V4)."""
    base, _, flag = spec.partition("/")
    name, _, layers = base.partition("@")
    sample = get_sample(name)
    if layers:
        sample = sample.with_layers(int(layers.rstrip("L")))
    if flag == "nomhc":
        if not hasattr(sample.config, "without_mhc"):
            raise ValueError(f"{spec}: /nomhc needs a DeepSeek V4 preset (a config with without_mhc())")
        sample = dataclasses.replace(sample, name=f"{sample.name}/nomhc", config=sample.config.without_mhc())
    elif flag:
        raise ValueError(f"{spec}: unknown flag /{flag} (known: /nomhc)")
    return sample


def param_count(sample: Sample) -> int:
    """Parameters of the sample's model (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return sum(p.numel() for p in sample.module.Model(sample.config).parameters())


def fp32_fits(sample: Sample, device: torch.device, mode: str) -> tuple[bool, str]:
    """Whether the fp32 reference is built next to the bf16 model, and why."""
    if mode != "auto" or device.type != "cuda":
        return mode != "never", f"--fp32-ref {mode}"
    need = param_count(sample) * 6  # fp32 + bf16 copies
    free = torch.cuda.mem_get_info()[0]
    fits = need < 0.8 * free
    return fits, f"fp32 + bf16 weights {need / 1e9:.1f} GB {'<' if fits else '>='} 80% of {free / 1e9:.1f} GB free"


def build_models(sample: Sample, dtype: torch.dtype, device: torch.device, real: bool, fp32: bool = True):
    """(fp32 eager model or None, the same weights in ``dtype``) on ``device``. Without ``fp32`` (a
    real-size model whose fp32 copy does not fit) the model is initialised in ``dtype`` directly."""
    torch.manual_seed(0)
    if real and not fp32:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = sample.module.Model(sample.config)
        finally:
            torch.set_default_dtype(previous)
        return None, model.to(dtype).eval()
    if real:  # random init of billions of parameters on the GPU (a CPU init is slow)
        with torch.device(device):
            model32 = sample.module.Model(sample.config)
        model32 = model32.float().eval()
    else:
        model32 = sample.build(device=device)
    model = model32 if dtype == torch.float32 else copy.deepcopy(model32).to(dtype).eval()
    return model32, model


def rewrite(sample, model, device, max_context: int):
    from effexport.exporter.capture import capture_step
    from effexport.passes.pipeline import run_pipeline
    from effexport.samples._spec import capture_length

    gen = torch.Generator().manual_seed(1)
    length = capture_length(sample.config.layer_specs())
    ids = torch.randint(0, sample.config.vocab_size, (2, length), generator=gen).to(device)
    program, analysis = run_pipeline(capture_step(model, ids), max_context=max_context, cache_layout="buffer")
    return program, analysis


def engines(program, plan, device, cpu_compile: bool, inplace: bool = True) -> dict:
    """Variant name -> a ``step(ids, pos, caches) -> (logits, caches)`` callable, or the error.
    ``compiled`` and ``compiled_graph`` share one ``torch.compile`` (one compile per shape).
    ``inplace``: the engines' buffer caches updated in place (``TorchEngine(inplace=...)``)."""
    from effexport.exporter.backends.torch import TorchEngine

    cuda = device.type == "cuda"
    out: dict = {"rewritten": TorchEngine(program.gm, plan.entries, device, compile=False, cuda_graphs=False,
                                          inplace=inplace)}
    if cuda:
        out["rewritten_graph"] = _engine(program.gm, plan, device, False, True, inplace)
    else:
        out["rewritten_graph"] = "skipped: CUDA graphs need a CUDA device"
    if not cuda and not cpu_compile:
        out["compiled"] = "skipped: Inductor on the CPU takes minutes per shape (--cpu-compile to run it)"
    else:
        out["compiled"] = _engine(program.gm, plan, device, True, False, inplace)
    if not cuda:
        out["compiled_graph"] = "skipped: CUDA graphs need a CUDA device"
    elif isinstance(out["compiled"], str):
        out["compiled_graph"] = out["compiled"]
    else:  # the compiled function itself (in place as its engine made it), replayed from graphs: no second compile
        out["compiled_graph"] = _engine(out["compiled"].fn, plan, device, False, True, inplace)
    return out


def _engine(program, plan, device, comp: bool, graphs: bool, inplace: bool = True):
    from effexport.exporter.backends.torch import TorchEngine

    try:
        return TorchEngine(program, plan.entries, device, compile=comp, cuda_graphs=graphs, inplace=inplace)
    except Exception as exc:  # noqa: BLE001
        return f"error: {_short(exc)}"


def errors(model32, model, runners: dict, vocab: int, device, prompt: int, decode: int,
           shared_prefill: bool = False, batch: int = 2) -> dict:
    """Max relative logit errors of every variant vs fp32 eager (when ``model32`` is given) and vs
    eager in the case's dtype, teacher-forced with the reference's greedy tokens (fp32 eager, else
    eager in the dtype); greedy agreement with the reference too. ``shared_prefill``: the prompt runs
    once through the uncaptured rewritten step and every variant decodes from copies of its caches.
    ``batch`` rows (1 for a real-size case: the timings' first shape, so Inductor compiles once less)."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)
    ref_model = model32 if model32 is not None else model
    with torch.no_grad():
        refdt, pastdt = model(ids)
        ref32, past32 = ref_model(ids) if model32 is not None else (refdt, None)
        toks, refs32, refsdt = [], [ref32], [refdt]
        for _ in range(decode):
            toks.append(refs32[-1][:, -1:].argmax(-1))
            rdt, pastdt = model(toks[-1], pastdt)
            r32, past32 = ref_model(toks[-1], past32) if model32 is not None else (rdt, None)
            refs32.append(r32)
            refsdt.append(rdt)
    greedy = "greedy_equal_fp32" if model32 is not None else "greedy_equal_dtype"
    res: dict = {"reference": "fp32 eager" if model32 is not None else "eager in the case's dtype (no fp32 copy)",
                 "prefill": "the uncaptured rewritten step, shared" if shared_prefill else "each variant"}
    if model32 is not None:
        res["eager"] = {"vs_fp32": max(_err(a, b) for a, b in zip(refsdt, refs32)), "vs_dtype": 0.0,
                        greedy: all(torch.equal(a[:, -1].argmax(-1), b[:, -1].argmax(-1))
                                    for a, b in zip(refsdt, refs32))}
    prefilled = None
    for key, runner in runners.items():
        if isinstance(runner, str):
            res[key] = {"error": runner}
            continue
        try:
            with torch.no_grad():
                if shared_prefill:
                    if prefilled is None:
                        base = runners["rewritten"]
                        logits, caches = base.step(ids, 0, base.initial_caches(batch))
                        prefilled = (logits.clone(), [c.clone() for c in caches])
                    logits, caches = prefilled[0], [c.clone() for c in prefilled[1]]
                else:
                    logits, caches = runner.step(ids, 0, runner.initial_caches(batch))
                outs = [logits.clone()]
                for t, tok in enumerate(toks):
                    logits, caches = runner.step(tok, prompt + t, caches)
                    outs.append(logits.clone())
            res[key] = {"vs_dtype": max(_err(a, b) for a, b in zip(outs, refsdt)),
                        greedy: all(torch.equal(a[:, -1].argmax(-1), b[:, -1].argmax(-1))
                                    for a, b in zip(outs, refs32))}
            if model32 is not None:
                res[key]["vs_fp32"] = max(_err(a, b) for a, b in zip(outs, refs32))
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
            save, deadline: float, roofline=None) -> list[dict]:
    """One decode step per L and B, every variant (see the module docstring); ``roofline(B, kv_bytes)``
    adds the roofline columns."""
    gen = torch.Generator(device=device).manual_seed(0)
    for ctx in contexts:
        for batch in batches:
            row = {"context": ctx, "batch": batch, "kv_bytes": sum(e.nbytes(batch, ctx) for e in plan.entries)}
            if roofline is not None:
                row.update(roofline(batch, row["kv_bytes"]))
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
                step_fn = runners["rewritten"].fn  # the engine's graph: in place under --inplace
                row["rewritten_s"] = clock(lambda: step_fn(ids1, pos, *caches))
                for key in ("rewritten_graph", "compiled", "compiled_graph"):
                    runner = runners.get(key)
                    if isinstance(runner, str) or runner is None:
                        row[f"{key}_s"] = runner
                        continue
                    try:
                        state = {"caches": [c.clone() for c in caches]}

                        def call(runner=runner, state=state):
                            state["logits"], state["caches"] = runner.step(ids1, ctx - 1, state["caches"])
                        row[f"{key}_first_s"] = clock.once(call)  # compile / capture of this shape
                        row[f"{key}_s"] = clock(call)
                        if key.endswith("_graph"):
                            row[f"{key}_copy_backs"] = len(runner.graphs[batch].copied)
                            row[f"{key}_bare_s"] = _bare_graph_time(
                                lambda runner=runner: runner.fn(ids1, pos, *caches), clock)
                    except Exception as exc:  # noqa: BLE001
                        traceback.print_exc()
                        row[f"{key}_s"] = f"error: {_short(exc)}"
                    if device.type == "cuda" and key != "compiled":  # compiled_graph, timed next, shares its fn
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


def run_case(case: dict, args, device, clock, save, deadline: float, bw: float | None = None) -> dict:
    """Fill ``case`` (preset, dtype, real_size) in place, calling ``save()`` after each stage."""
    name, dtype_name, real = case["preset"], case["dtype"], case["real_size"]
    t0 = time.monotonic()
    sample = real_sample(name) if real else get_sample(name)
    fp32, case["fp32_ref"] = fp32_fits(sample, device, args.fp32_ref) if real else (True, "tiny")
    model32, model = build_models(sample, DTYPES[dtype_name], device, real, fp32)
    case["build_s"] = time.monotonic() - t0
    case["params"] = sum(p.numel() for p in model.parameters())
    case["weight_bytes_all"] = weight_bytes(model)
    case["weight_bytes_active_b1"] = active_weight_bytes(model, 1)
    contexts = args.contexts if real else [args.tiny_context]
    batches = args.batches if real else [1, 2]
    t0 = time.monotonic()
    program, analysis = rewrite(sample, model, device, max(contexts))
    case["capture_rewrite_s"] = time.monotonic() - t0
    case["constants"] = analysis.counts.get("constants")
    save()
    plan = analysis.plan
    runners = engines(program, plan, device, args.cpu_compile, args.inplace)
    case["inplace_caches"] = list(runners["rewritten"].inplace)
    t1 = time.monotonic()
    prompt = 64 if real else 40
    case["errors"] = errors(model32, model, runners, sample.config.vocab_size, device, prompt, args.decode,
                            shared_prefill=real, batch=1 if real else 2)
    case["errors_s"] = time.monotonic() - t1  # includes Inductor's compile of the decode shape (B=1 at real size)
    save()
    del model32
    if device.type == "cuda":
        for r in runners.values():
            if not isinstance(r, str):
                r.graphs.clear()
        torch.cuda.empty_cache()

    def roofline(batch: int, kv: int) -> dict:
        active = active_weight_bytes(model, batch)
        out = {"weight_bytes_active": active}
        if bw:
            out.update(roofline_all_s=(case["weight_bytes_all"] + kv) / bw, roofline_active_s=(active + kv) / bw)
        return out
    case["rows"] = []
    timings(program, plan, runners, sample.config.vocab_size, device, contexts, batches, clock, case["rows"],
            save, deadline, roofline)
    return case


def mhc_overhead(cases: list) -> list[dict]:
    """Per ``/nomhc`` case and its mHC twin (same preset, layers, dtype): per L, B and timed variant,
    the mHC step time over the plain-residual one, minus 1."""
    by_name = {(c["preset"], c["dtype"]): c for c in cases}
    out = []
    for c in cases:
        twin = by_name.get((c["preset"].removesuffix("/nomhc"), c["dtype"])) if c["preset"].endswith("/nomhc") else None
        if twin is None:
            continue
        plain_rows = {(r["context"], r["batch"]): r for r in c.get("rows", [])}
        for r in twin.get("rows", []):
            p = plain_rows.get((r["context"], r["batch"]))
            if p is None:
                continue
            entry = {"preset": twin["preset"], "context": r["context"], "batch": r["batch"]}
            for key in ("rewritten", "rewritten_graph", "compiled_graph"):
                a, b = r.get(f"{key}_s"), p.get(f"{key}_s")
                if isinstance(a, float) and isinstance(b, float):
                    entry[key] = {"mhc_s": a, "plain_s": b, "overhead": a / b - 1}
            out.append(entry)
    return out


def _ms(v) -> str:
    return f"{v * 1e3:.3f}" if isinstance(v, float) else "-" if v is None else "err" if "error" in str(v) else "skip"


def _e(d: dict, key: str, which: str) -> str:
    v = d.get(key, {})
    return f"{v[which]:.2e}" if which in v else "err" if "error" in v and "skipped" not in v["error"] else "-"


def table(cases: list) -> str:
    lines = ["| preset | dtype | L | B | rewritten ms | rewritten graph ms (bare) | compiled graph ms (bare) | "
             "roofline ms all / active weights | "
             "err vs fp32: eager / rewritten / rewr. graph / compiled graph | err vs eager dtype: rewritten / compiled graph |",
             "|" + "---|" * 10]
    for c in cases:
        if "errors" not in c:
            lines.append(f"| {c['preset']} | {c.get('dtype')} | - | - | {c.get('error', c.get('skipped', ''))[:80]} | | | | | |")
            continue
        e = c["errors"]
        errs = " / ".join(_e(e, k, "vs_fp32") for k in ("eager", "rewritten", "rewritten_graph", "compiled_graph"))
        errd = " / ".join(_e(e, k, "vs_dtype") for k in ("rewritten", "compiled_graph"))
        for r in c.get("rows") or [{"context": "-", "batch": "-"}]:
            lines.append(
                f"| {c['preset']} | {c['dtype']} | {r['context']} | {r['batch']} | {_ms(r.get('rewritten_s'))} | "
                f"{_ms(r.get('rewritten_graph_s'))} ({_ms(r.get('rewritten_graph_bare_s'))}) | "
                f"{_ms(r.get('compiled_graph_s'))} ({_ms(r.get('compiled_graph_bare_s'))}) | "
                f"{_ms(r.get('roofline_all_s'))} / {_ms(r.get('roofline_active_s'))} | {errs} | {errd} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny presets (at each of --dtypes)")
    ap.add_argument("--presets", default=",".join(TINY_PRESETS), help="tiny presets to run with --tiny")
    ap.add_argument("--real", default="", help="real-size cases (bf16), PRESET[@NL][/nomhc], e.g. "
                    "zaya1-8b,laguna-xs2@8L,deepseek-v4-flash@2L,deepseek-v4-flash@2L/nomhc")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--tiny-context", type=int, default=128)
    ap.add_argument("--decode", type=int, default=8, help="decode steps of the error measurement")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no case or timing row after this many seconds")
    ap.add_argument("--case-min-s", type=float, default=120.0,
                    help="start no real-size case with less than this many seconds of the budget left")
    ap.add_argument("--fp32-ref", choices=("auto", "always", "never"), default="auto",
                    help="real size: build the fp32 reference (auto: where it fits next to bf16)")
    ap.add_argument("--cpu-compile", action="store_true", help="also run Inductor on the CPU (slow)")
    ap.add_argument("--inplace", action=argparse.BooleanOptionalAction, default=True,
                    help="buffer caches updated in place by the engines (default; --no-inplace: the functional "
                    "attention_buffer, every present copied back)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench/torch_engine.py: torch sees no CUDA device (pass --device cpu --tiny to check the script)",
                  file=sys.stderr)
            return 4
        from effexport.custom_ops import enable_triton
        enable_triton()
    clock = Clock(device, args.reps)
    bw = copy_bandwidth(device)
    plan = ([(p, d, False) for p in args.presets.split(",") if p for d in args.dtypes.split(",") if d]
            if args.tiny else [])
    plan += [(p, "bf16", True) for p in args.real.split(",") if p]  # in the order given: the budget cuts the tail
    start, cases = time.monotonic(), []
    deadline = start + args.budget_s
    os.makedirs(args.out, exist_ok=True)

    def save():
        with open(os.path.join(args.out, "torch_engine.json"), "w") as f:
            json.dump({"torch": torch.__version__, "device": str(device),
                       "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                       "copy_bw": bw, "inplace": args.inplace, "elapsed_s": time.monotonic() - start, "cases": cases,
                       "mhc_overhead": mhc_overhead(cases)}, f, indent=1, default=str)
    for name, dtype_name, real in plan:
        case = {"preset": name, "dtype": dtype_name, "real_size": real}
        cases.append(case)
        left = deadline - time.monotonic()
        if left <= 0 or (real and left < args.case_min_s):
            case["skipped"] = f"time budget ({max(left, 0):.0f} s left, a real-size case needs {args.case_min_s:.0f})"
            save()
            continue
        print(f"== {name} {dtype_name}{' (real size)' if real else ''}", flush=True)
        if device.type == "cuda":  # what the previous case left behind shows here
            case["cuda_free_gb_at_start"] = torch.cuda.mem_get_info()[0] / 1e9
        try:
            run_case(case, args, device, clock, save, deadline, bw)
        except Exception as exc:  # noqa: BLE001  (one case failing must not hide the others)
            traceback.print_exc()
            case["error"] = _short(exc)
        torch._dynamo.reset()  # compiled code of this case's program would keep its weights alive
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    print(f"buffer caches {'in place' if args.inplace else 'functional (--no-inplace)'}")
    print(table(cases))
    for m in mhc_overhead(cases):
        print("mHC overhead", json.dumps(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
