"""The torch engine on one GPU: decode ms per step and logit errors of the rewritten step run three
ways -- uncaptured, replayed from a CUDA graph, compiled by Inductor and replayed from a CUDA graph.

    python3 bench/torch_engine.py [--out DIR] [--tiny] [--real gemma4-e2b,laguna-xs2@8L,...] [--dtypes fp32,bf16]
                                  [--contexts 4096,32768] [--batches 1,8] [--budget-s 480] [--device cuda]
                                  [--inplace | --no-inplace] [--tune] [--hf-eager [--hf-attn eager,sdpa]]
                                  [--profile 4096:1,32768:8] [--compile-variants default,static,...] [--inductor K=V,...]
                                  [--no-variant-fp32-ref] [--no-errors]

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
engine measured); ``--tune`` compiles the engines with ``TorchEngine(tune=True)`` (Inductor's
coordinate-descent tuning; ``tune`` in the JSON); ``inplace`` in the JSON says which, ``inplace_caches`` per case which caches, and
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

Real-size cases: a full fp32 eager model is built where it fits next to the bf16 one (``--fp32-ref
auto``: fp32 + bf16 bytes under 80% of the free device memory); otherwise (or ``--fp32-ref streamed``)
the bf16 model, initialised in bf16, is also the fp32 reference: its weights upcast one decoder layer
at a time (:mod:`_reference`: ~4 GB more for a 40-layer Laguna XS.2, where a full copy needs 124 GB);
``--fp32-ref never`` measures against eager bf16 only. ``fp32_ref`` and ``reference`` say which.
Routing (``errors["routing"]``, MoE presets, with an fp32 reference): a random-weight router's top-k
has near-ties that bf16 rounding flips, and one flipped row moves the logits by O(1) -- so eager bf16
and the uncaptured rewritten step rerun with every ``topk`` pinned to fp32 eager's choice (the rewritten
graph's ``aten.topk`` nodes hooked), each with its error against fp32 eager and the rows whose own
choice differed: pinned errors at bf16's rounding with unpinned ones near 1 mean the difference is
routing flips, not a fault (a routing table is printed). The prompt of the error
measurement is prefilled once by the uncaptured rewritten step and its caches handed to every variant
(one Inductor compile less per case; ``prefill`` says which ran it). ``--no-errors`` leaves the error
measurement out and ``--contexts=`` (none) the timing rows: a call spent on ``--compile-variants``.
``compiled`` shares ``compiled_graph``'s ``torch.compile`` (one compile per shape for both). Per case: ``build_s``,
``capture_rewrite_s``, ``errors_s`` (which includes Inductor's compile of the decode shape: B=1 at
real size, where the prompt is one row) and,
per row and compiled variant, ``*_first_s`` (the first call at that shape: compile + graph capture).

HF transformers column (``--hf-eager``; Gemma 4 cases only, e.g. ``--real gemma4-e2b``): after the
case, Hugging Face transformers' own Gemma 4 text model (``transformers.Gemma4ForCausalLM``; the calls
used checked against transformers 5.17, the GPU machine's, and 5.25) is built from a
``Gemma4TextConfig`` mapped field by field from the sample's config (:func:`hf_gemma4_config`: every field of
``samples/gemma4.py``'s ``Gemma4Config`` maps, for every preset -- the JSON's ``config_unmatched``
names any that does not: ``num_global_key_value_heads`` other than None, which HF applies only with
K=V attention, an attention softcap or scaling other than 1.0, which HF Gemma 4 does not have, a
last layer not full, which HF forces full), random weights (HF's init, seed 0) in the case's dtype
on the device, and timed on one decode step per L and B: ``model(ids [B, 1], cache,
use_cache=True, logits_to_keep=1)`` with attention implementation ``eager`` and then ``sdpa``
(``--hf-attn``), on a ``DynamicCache(config=...)`` (what ``generate`` makes) holding L tokens: each
non-KV-shared layer's ``Cache.update`` fed random K/V ``[B, Hkv, L, d]`` (what a prefill of L
tokens stores; no prefill runs: an eager prefill's ``[B, H, L, L]`` scores do not fit at 32K), the
step undone after every timed call so L stays L. Median of ``--reps`` CUDA-event-timed calls after
two warm-ups, as above. ``hf_transformers`` in the case holds the transformers version, the mapped
config, the cache and step used, and per L and B ``hf_eager_ms`` / ``hf_sdpa_ms``, the case's own
``compiled_graph_ms`` (and ``rewritten_graph_ms`` / ``rewritten_ms``) and the ratios
``hf_eager_over_compiled_graph`` / ``hf_sdpa_over_compiled_graph`` (issue #21's criterion: >= 20x
at 32K, B=1); a second table prints them. A transformers without Gemma 4, or any failure of this
column, is recorded there (``error``) and the bench goes on.

Profile (``--profile L:B[,L:B]``; nothing changes without it): after the timing rows, per point the
``compiled_graph`` and ``rewritten_graph`` steps (on the CPU: ``compiled`` where it exists and
``rewritten``, uncaptured) run ``--profile-steps`` times under ``torch.profiler`` (CUDA activity; CUPTI
is started once before any graph is captured so the replays' kernels are reported, ``profiler_init``
in the JSON). ``case["profile"]`` holds per point and variant: ``kernels_per_step``,
``kernel_us_per_step`` (their sum), ``wall_us_per_step`` (the replay, median of ``--reps``) and
``gap_us_per_step`` (wall minus kernel time: launch gaps and host work), ``categories_us_per_step`` /
``categories_count_per_step`` (``gemm_cublas``, ``gemm_triton`` (Inductor templates), ``inductor_triton``
(``triton_poi_`` / ``red_`` / ``per_``), ``effexport_triton`` (our kernels), ``copy_memset``,
``aten_native``, ``other``: they sum to the total), ``top_kernels`` (25: count and us per step, us per
call, share, and for a GEMM kernel the bytes it reads per call and the GB/s it reaches), and
``gemm_shapes``: the ``aten::mm`` / ``addmm`` / ``bmm`` calls of an uncaptured profile of the same
program grouped by input shapes and dtypes (calls per step, us per call, bytes read, GB/s, kernels;
``gemm_bytes_per_step`` against ``gemm_roofline_us_per_step``). See ``bench/_engine_profile.py``.

Inductor variants (``--compile-variants NAME[,NAME]`` presets of ``_engine_profile.PRESETS`` and/or
``--inductor [NAME:]KEY=VALUE[,...]``, repeatable: ``torch._inductor.config`` keys, ``mode=`` (expanded
into its options; ``triton.cudagraphs`` forced off: the engine captures its own graph) and ``dynamic=``):
each a fresh ``torch.compile`` of the engine's step graph replayed from the engine's CUDA graph and
timed at ``--variant-points`` (default 4096:1,32768:8); ``default`` (always first) is the case's own
compiled engine. ``case["compile_variants"]["variants"]``: per variant its options (config keys the
installed torch lacks are listed in ``missing``, not passed) and per point ``compile_s``, ``first_s``
(capture), ``ms`` and ``err_vs_default`` / ``greedy_equal_default`` (first step's logits vs the default
variant's on the same inputs). A variant's compiles stop at ``--variant-limit-s`` (SIGALRM; recorded as
``skipped``), none starts with less than ``--variant-min-s`` of the budget left (``skipped: budget``).
The fp32 reference (``--variant-fp32-ref``, the default; ``--no-variant-fp32-ref`` leaves it out): a
compiled variant differing from the default compile says nothing by itself (bf16 rounds differently
in every fused kernel), so every variant, ``default`` included, also gets ``err_vs_fp32`` /
``greedy_equal_fp32``: its first step's logits against the same step computed in fp32 on the same
inputs -- the rewritten program with every 16-bit dtype fp32 (``_engine_profile.fp32_graph``: the
case's weights as they are, upcast where read; what the fp32 model holding them captures to),
uncompiled, over the point's random caches cast to fp32, same ids and position, TF32 off -- computed
once per point before any variant compiles and freed after (``case["compile_variants"]["fp32_ref"]``:
per point its time and the uncompiled step of the case's dtype against it, ``rewritten_err_vs_fp32``,
the bar a variant's error compares with). Both write ``engine_profile.md`` (tables) next to the JSON.

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
import _engine_profile  # noqa: E402
from _common import active_weight_bytes, add_common_args, copy_bandwidth, param_count, weight_bytes  # noqa: E402
from _reference import Fp32Eager, TopkLog, pin_topk, record_topk, topk_hooked  # noqa: E402
from _engine_profile import parse_points  # noqa: E402

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

    def __call__(self, fn, reset=None) -> float:
        """``reset()``, when given, runs untimed after every call (a cache put back to its length)."""
        reset = reset or (lambda: None)
        with torch.no_grad():
            for _ in range(2):
                fn()
                reset()
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
                reset()
        return statistics.median(times)


def release(device) -> None:
    """Collect what was just dropped and, on CUDA, hand the caching allocator's free blocks back (the
    next stage, or an ONNX Runtime session, may need them)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def fp32_fits(sample: Sample, device: torch.device, mode: str) -> tuple[str, str]:
    """How the fp32 reference is made (``full``: an fp32 copy next to the model, ``streamed``: the
    model's own weights upcast one layer at a time, :class:`_reference.Fp32Eager`, ``none``), and why.
    ``auto``: a full copy where fp32 + bf16 weights take under 80% of the free GPU memory, else streamed
    (on the CPU: a full copy)."""
    if mode != "auto" or device.type != "cuda":
        return {"always": "full", "never": "none"}.get(mode, "full" if mode == "auto" else mode), f"--fp32-ref {mode}"
    need = param_count(sample) * 6  # fp32 + bf16 copies
    free = torch.cuda.mem_get_info()[0]
    fits = need < 0.8 * free
    return ("full" if fits else "streamed",
            f"fp32 + bf16 weights {need / 1e9:.1f} GB {'<' if fits else '>='} 80% of {free / 1e9:.1f} GB free"
            + ("" if fits else ": fp32 streamed a layer at a time"))


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


def engines(program, plan, device, cpu_compile: bool, inplace: bool = True, tune: bool = False) -> dict:
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
        out["compiled"] = _engine(program.gm, plan, device, True, False, inplace, tune)
    if not cuda:
        out["compiled_graph"] = "skipped: CUDA graphs need a CUDA device"
    elif isinstance(out["compiled"], str):
        out["compiled_graph"] = out["compiled"]
    else:  # the compiled function itself (in place as its engine made it), replayed from graphs: no second compile
        out["compiled_graph"] = _engine(out["compiled"].fn, plan, device, False, True, inplace)
    return out


def _engine(program, plan, device, comp: bool, graphs: bool, inplace: bool = True, tune: bool = False):
    from effexport.exporter.backends.torch import TorchEngine

    try:
        return TorchEngine(program, plan.entries, device, compile=comp, cuda_graphs=graphs, inplace=inplace,
                           tune=tune)
    except Exception as exc:  # noqa: BLE001
        return f"error: {_short(exc)}"


def errors(model32, model, runners: dict, vocab: int, device, prompt: int, decode: int,
           shared_prefill: bool = False, batch: int = 2) -> dict:
    """Max relative logit errors of every variant vs fp32 eager (when ``model32`` is given: an fp32
    model or :class:`_reference.Fp32Eager`) and vs eager in the case's dtype, teacher-forced with the
    reference's greedy tokens (fp32 eager, else eager in the dtype); greedy agreement with the reference
    too. ``shared_prefill``: the prompt runs once through the uncaptured rewritten step and every variant
    decodes from copies of its caches. ``batch`` rows (1 for a real-size case: the timings' first shape,
    so Inductor compiles once less). With an fp32 reference, ``routing`` (:func:`routing_pinned`): the
    same runs with every ``topk`` choice pinned to fp32 eager's."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)
    ref_model = model32 if model32 is not None else model
    choices = TopkLog()  # fp32 eager's topk choices (routers), in call order
    with torch.no_grad():
        refdt, pastdt = model(ids)
        if model32 is not None:
            with record_topk(choices):
                ref32, past32 = ref_model(ids)
        else:
            ref32, past32 = refdt, None
        toks, refs32, refsdt = [], [ref32], [refdt]
        for _ in range(decode):
            toks.append(refs32[-1][:, -1:].argmax(-1))
            rdt, pastdt = model(toks[-1], pastdt)
            if model32 is not None:
                with record_topk(choices):
                    r32, past32 = ref_model(toks[-1], past32)
            else:
                r32 = rdt
            refs32.append(r32)
            refsdt.append(rdt)
    greedy = "greedy_equal_fp32" if model32 is not None else "greedy_equal_dtype"
    reference = {"full": "fp32 eager", "streamed": "fp32 eager (the weights upcast a layer at a time)"}
    res: dict = {"reference": reference["streamed" if isinstance(model32, Fp32Eager) else "full"]
                 if model32 is not None else "eager in the case's dtype (no fp32 copy)",
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
    if model32 is not None and choices.indices:
        res["routing"] = routing_pinned(model, runners.get("rewritten"), ids, toks, refs32, choices, device)
    return res


def routing_pinned(model, rewritten, ids, toks, refs32, choices: TopkLog, device) -> dict:
    """Eager in the case's dtype and the rewritten step (uncaptured, uncompiled, its ``aten.topk``
    hooked: :func:`_reference.topk_hooked`) rerun over the same tokens with every ``topk`` pinned to
    fp32 eager's choice (``choices``): per run its error against fp32 eager (``vs_fp32``: what is left
    once no routing decision differs) and how many of its own choices differed (``flipped_rows`` of
    ``rows``, ``calls_with_flips`` of ``calls``). Unpinned errors near 1 with pinned ones at the dtype's
    rounding (~1e-2) mean the difference is routing flips at near-ties, not a fault."""
    from effexport.exporter.backends.torch import TorchEngine

    out: dict = {"topk_calls": len(choices.indices)}
    prompt = ids.shape[1]
    try:
        with torch.no_grad(), pin_topk(choices) as log:
            logits, past = model(ids)
            outs = [logits]
            for tok in toks:
                logits, past = model(tok, past)
                outs.append(logits)
        out["eager_pinned"] = {"vs_fp32": max(_err(a, b) for a, b in zip(outs, refs32)), **log.summary()}
    except Exception as exc:  # noqa: BLE001
        out["eager_pinned"] = {"error": _short(exc)}
    if rewritten is None or isinstance(rewritten, str):
        return out
    try:
        gm, hooked = topk_hooked(rewritten.module)
        engine = TorchEngine(gm, rewritten.entries, device, compile=False, cuda_graphs=False, inplace=False,
                             pack=False)  # the rewritten engine's graph, in place and packed already
        with torch.no_grad(), pin_topk(choices) as log:
            logits, caches = engine.step(ids, 0, engine.initial_caches(ids.shape[0]))
            outs = [logits.clone()]
            for t, tok in enumerate(toks):
                logits, caches = engine.step(tok, prompt + t, caches)
                outs.append(logits.clone())
        out["rewritten_pinned"] = {"vs_fp32": max(_err(a, b) for a, b in zip(outs, refs32)),
                                   "hooked_topk_nodes": hooked, **log.summary()}
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        out["rewritten_pinned"] = {"error": _short(exc)}
    return out


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
    how, case["fp32_ref"] = fp32_fits(sample, device, args.fp32_ref) if real else ("full", "tiny")
    model32, model = build_models(sample, DTYPES[dtype_name], device, real, how == "full")
    if how == "streamed" and DTYPES[dtype_name] != torch.float32:
        model32 = Fp32Eager(model)
    case["build_s"] = time.monotonic() - t0
    case["params"] = sum(p.numel() for p in model.parameters())
    case["weight_bytes_all"] = weight_bytes(model)
    case["weight_bytes_active_b1"] = active_weight_bytes(model, 1)
    contexts = args.contexts if real else [args.tiny_context]
    batches = args.batches if real else [1, 2]
    t0 = time.monotonic()
    program, analysis = rewrite(sample, model, device, max(contexts + extra_contexts(args)))
    case["capture_rewrite_s"] = time.monotonic() - t0
    case["constants"] = analysis.counts.get("constants")
    save()
    plan = analysis.plan
    runners = engines(program, plan, device, args.cpu_compile, args.inplace, args.tune)
    case["inplace_caches"] = list(runners["rewritten"].inplace)
    t1 = time.monotonic()
    prompt = 64 if real else 40
    if args.errors:
        case["errors"] = errors(model32, model, runners, sample.config.vocab_size, device, prompt, args.decode,
                                shared_prefill=real, batch=1 if real else 2)
    else:
        case["errors"] = {"skipped": "--no-errors"}
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
    if args.profile:
        case["profile"] = []
        profile_points(program, plan, runners, sample.config.vocab_size, device, parse_points(args.profile), clock,
                       case["profile"], save, deadline, roofline, args.profile_steps, bw)
    if args.compile_variants or args.inductor:
        case["compile_variants"] = {}
        compile_variants(program, plan, runners, sample.config.vocab_size, device, args, clock,
                         case["compile_variants"], save, deadline)
    return case


# ------------------------------------------------------------------ --profile, --compile-variants / --inductor
def extra_contexts(args) -> list[int]:
    """The contexts of ``--profile`` and (when variants are asked for) ``--variant-points``: the caches
    are built for the largest of these and ``--contexts``."""
    pts = parse_points(args.profile or "")
    if args.compile_variants or args.inductor:
        pts += parse_points(args.variant_points)
    return [L for L, _ in pts]


def _point_inputs(plan, vocab: int, device, ctx: int, batch: int):
    """Random caches (seeded by L and B: every variant gets the same), ids [B, 1] and pos = L - 1."""
    gen = torch.Generator(device=device).manual_seed(1000 * ctx + batch)
    caches = [torch.randn(e.concrete_shape(batch, ctx - 1), device=device, generator=gen).to(
        getattr(torch, e.dtype)) * 0.5 if getattr(torch, e.dtype).is_floating_point
        else e.empty(batch, device) for e in plan.entries]
    ids = torch.randint(0, vocab, (batch, 1), device=device, generator=gen)
    return caches, ids, torch.tensor(ctx - 1, device=device)


def profile_points(program, plan, runners: dict, vocab: int, device, points, clock, out: list, save,
                   deadline: float, roofline, steps: int, bw) -> list:
    """``--profile``: per L:B, the compiled + CUDA-graph step and the uncompiled CUDA-graph step (on the
    CPU, where there are no graphs: the uncaptured ``compiled`` when it exists and ``rewritten``) run
    ``steps`` times under ``torch.profiler``; :func:`_engine_profile.summarize` of the kernels, with the
    wall time of a replay (the median of ``--reps``, timed first) and the GEMMs attributed by shape from
    ``steps`` uncaptured calls of the same program (``record_shapes``)."""
    keys = ("compiled_graph", "rewritten_graph") if device.type == "cuda" else ("compiled", "rewritten")
    for ctx, batch in points:
        point = {"context": ctx, "batch": batch, "kv_bytes": sum(e.nbytes(batch, ctx) for e in plan.entries)}
        if roofline is not None:
            point.update(roofline(batch, point["kv_bytes"]))
        out.append(point)
        if time.monotonic() > deadline:
            point["skipped"] = "time budget"
            save()
            continue
        print(f"-- profile L={ctx} B={batch}", flush=True)
        for key in keys:
            runner = runners.get(key)
            if runner is None or isinstance(runner, str):
                point[key] = {"error": runner or "no such variant"}
                continue
            if time.monotonic() > deadline:
                point[key] = {"error": "skipped: time budget"}
                continue
            try:
                caches, ids, pos = _point_inputs(plan, vocab, device, ctx, batch)
                state = {"caches": [c.clone() for c in caches]}

                def call(runner=runner, state=state, ids=ids):
                    state["logits"], state["caches"] = runner.step(ids, ctx - 1, state["caches"])
                first = clock.once(call)  # compile (a new batch size) and graph capture
                wall = clock(call)
                events, source = _engine_profile.device_events(_engine_profile.profile_calls(call, steps, device))
                gemms = _engine_profile.gemm_shapes(_engine_profile.profile_calls(
                    lambda runner=runner: runner.fn(ids, pos, *caches), steps, device, record_shapes=True), steps)
                summary = _engine_profile.summarize(events, steps, wall, gemms, bw=bw)
                summary.update(first_s=first, kernels_from=f"{source}, {steps} calls of the engine's step"
                               + (" (CUDA-graph replays)" if key.endswith("_graph") else " (uncaptured)"))
                if key.endswith("_graph") and device.type == "cuda" and not any(
                        e["activity"] == "kernel" for e in events):
                    summary["warning"] = "no kernel recorded in the replays (CUPTI did not see the graph's kernels)"
                point[key] = summary
                del caches, state
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                point[key] = {"error": _short(exc)}
            if device.type == "cuda":
                runner.graphs.clear()
                torch.cuda.empty_cache()
            save()
            s = point[key]
            print(json.dumps({"profile": [ctx, batch, key], **{k: s.get(k) for k in (
                "wall_us_per_step", "kernel_us_per_step", "gap_us_per_step", "kernels_per_step",
                "categories_us_per_step", "error")}}), flush=True)
    return out


def variant_list(args) -> list[tuple[str, dict]]:
    """``--compile-variants`` presets then each ``--inductor`` spec, ``default`` first (the reference
    of the errors; added when missing)."""
    out = [_engine_profile.parse_variant(n) for n in args.compile_variants.split(",") if n.strip()]
    out += [_engine_profile.parse_variant(s) for s in args.inductor]
    if not any(name == "default" for name, _ in out):
        out.insert(0, ("default", {}))
    out.sort(key=lambda v: v[0] != "default")
    return out


def fp32_references(program, plan, rewritten, vocab: int, device, points, inplace: bool, deadline: float,
                    out: dict, save) -> dict:
    """``--variant-fp32-ref``: per point, the first-step logits of :func:`_engine_profile.fp32_graph`
    of the step -- the same rewritten program in fp32, uncompiled and uncaptured, the weights as the
    case's dtype holds them, upcast -- over :func:`_point_inputs` (the inputs every variant gets: the
    same random caches, cast to fp32, same ids and position), TF32 off. ``{(L, B): logits}``, every
    point's computed before any variant compiles and the fp32 step freed after (its weight casts are
    transient, the fp32 caches live for one point). ``out["points"]`` records per point ``s`` and the
    uncompiled step of the case's dtype (``rewritten``, the same inputs) against it:
    ``rewritten_err_vs_fp32`` / ``rewritten_greedy_equal_fp32``, the rounding a variant's
    ``err_vs_fp32`` compares with."""
    from effexport.exporter.backends.torch import TorchEngine

    out.update(step="the rewritten step in fp32 (fp32_graph: 16-bit weights upcast where read, 16-bit dtype "
                    "arguments fp32), uncompiled, uncaptured, TF32 off; caches: the point's random caches cast "
                    "to fp32", points={})
    refs: dict = {}
    engine = TorchEngine(_engine_profile.fp32_graph(program.gm), plan.entries, device, compile=False,
                         cuda_graphs=False, inplace=inplace)
    try:
        for ctx, batch in points:
            r = out["points"][f"{ctx}:{batch}"] = {}
            if time.monotonic() > deadline:
                r["skipped"] = "time budget"
                continue
            try:
                t0 = time.monotonic()
                caches, ids, pos = _point_inputs(plan, vocab, device, ctx, batch)
                caches32 = [c.to(torch.float32, copy=True) if c.is_floating_point() else c.clone() for c in caches]
                with torch.no_grad(), _engine_profile.ieee_fp32():
                    ref = refs[(ctx, batch)] = engine.fn(ids, pos, *caches32)[0].float()
                del caches32
                if device.type == "cuda":
                    torch.cuda.synchronize()
                r["s"] = time.monotonic() - t0
                with torch.no_grad():
                    logits = rewritten.fn(ids, pos, *caches)[0].float()  # caches are this point's own
                r["rewritten_err_vs_fp32"] = _err(logits, ref)
                r["rewritten_greedy_equal_fp32"] = bool(torch.equal(logits[:, -1].argmax(-1), ref[:, -1].argmax(-1)))
                del caches, logits
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                r["error"] = _short(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
            print(json.dumps({"variant": "fp32 reference", "point": [ctx, batch], **r}), flush=True)
    finally:
        del engine
        release(device)
    return refs


def compile_variants(program, plan, runners: dict, vocab: int, device, args, clock, out: dict, save,
                     deadline: float) -> dict:
    """``--compile-variants`` / ``--inductor``: per variant a fresh ``torch.compile`` of the engine's
    (in-place) step graph with the variant's options, replayed from the engine's CUDA graphs, timed at
    each ``--variant-points`` L:B; ``default`` reuses the case's compiled engine (compiled already).
    Each point: ``compile_s`` (the first, uncaptured call: the compile of that shape, under a SIGALRM of
    what is left of ``--variant-limit-s``), ``ms`` (median of ``--reps`` ``TorchEngine.step`` calls),
    ``err_vs_default`` (the first step's logits against the default variant's, same inputs) and, with
    ``--variant-fp32-ref``, ``err_vs_fp32`` / ``greedy_equal_fp32`` against :func:`fp32_references`
    (``out["fp32_ref"]``), the default variant's included."""
    from effexport.exporter.backends.torch import TorchEngine

    points = parse_points(args.variant_points)
    cuda = device.type == "cuda"
    out.update(points=points, backend=args.variant_backend, limit_s=args.variant_limit_s, variants=[],
               torch=torch.__version__)
    reference: dict = {}
    fp32_refs: dict = {}
    if args.variant_fp32_ref:
        out["fp32_ref"] = {}
        print("-- variant fp32 reference", flush=True)
        try:
            fp32_refs = fp32_references(program, plan, runners["rewritten"], vocab, device, points, args.inplace,
                                        deadline, out["fp32_ref"], save)
        except Exception as exc:  # noqa: BLE001  (the variants are timed without it)
            traceback.print_exc()
            out["fp32_ref"]["error"] = _short(exc)
    for name, overrides in variant_list(args):
        v = {"name": name, "overrides": overrides, "points": {}}
        out["variants"].append(v)
        left = deadline - time.monotonic()
        if left < args.variant_min_s:
            v["skipped"] = f"budget ({max(left, 0):.0f} s left < --variant-min-s {args.variant_min_s:.0f})"
            save()
            continue
        print(f"-- variant {name} {overrides}", flush=True)
        t_start = time.monotonic()
        fn = runner = None
        try:
            kw, notes = _engine_profile.compile_kwargs(overrides, args.variant_backend)
            v["compile_kwargs"] = {k: val for k, val in kw.items() if k != "options"}
            v.update(notes)
            reuse = name == "default" and not overrides and not isinstance(runners.get("compiled"), (str, type(None)))
            if reuse and args.variant_backend == "inductor":
                fn = runners["compiled"].fn
                v["packed"] = runners["compiled"].packed
                v["source"] = "the case's compiled engine (torch.compile default mode; compiled already)"
            elif not cuda and not args.cpu_compile and args.variant_backend == "inductor":
                v["skipped"] = "Inductor on the CPU takes minutes per shape (--cpu-compile, or --variant-backend eager)"
                continue
            else:
                base = TorchEngine(program.gm, plan.entries, device, compile=False, cuda_graphs=False,
                                   inplace=args.inplace, pack=overrides.get("pack", True))
                v["packed"] = base.packed  # the linear calls its packed projections removed
                fn = torch.compile(base.module, **kw)  # a fresh graph copy: its own dynamo cache
            runner = TorchEngine(fn, plan.entries, device, compile=False, cuda_graphs=cuda, inplace=args.inplace)
            v["inplace_caches"] = len(runner.aliased)
            for ctx, batch in points:
                r = v["points"][f"{ctx}:{batch}"] = {}
                limit = min(args.variant_limit_s - (time.monotonic() - t_start), deadline - time.monotonic())
                if limit <= 0:
                    r["skipped"] = "budget" if deadline - time.monotonic() <= 0 else "variant limit"
                    continue
                try:
                    caches, ids, pos = _point_inputs(plan, vocab, device, ctx, batch)
                    work = [c.clone() for c in caches]
                    with _engine_profile.alarm(limit):
                        r["compile_s"] = clock.once(lambda fn=fn, work=work, ids=ids, pos=pos: fn(ids, pos, *work))
                    del work
                    state = {"caches": [c.clone() for c in caches]}

                    def call(runner=runner, state=state, ids=ids, ctx=ctx):
                        state["logits"], state["caches"] = runner.step(ids, ctx - 1, state["caches"])
                    r["first_s"] = clock.once(call)  # graph capture
                    logits = state["logits"].float().clone()
                    if name == "default":
                        reference[(ctx, batch)] = logits
                    elif (ctx, batch) in reference:
                        r["err_vs_default"] = _err(logits, reference[(ctx, batch)])
                        r["greedy_equal_default"] = bool(torch.equal(logits[:, -1].argmax(-1),
                                                                     reference[(ctx, batch)][:, -1].argmax(-1)))
                    if (ctx, batch) in fp32_refs:
                        r["err_vs_fp32"] = _err(logits, fp32_refs[(ctx, batch)])
                        r["greedy_equal_fp32"] = bool(torch.equal(logits[:, -1].argmax(-1),
                                                                  fp32_refs[(ctx, batch)][:, -1].argmax(-1)))
                    r["ms"] = clock(call) * 1e3
                    del caches, state, logits
                except _engine_profile.CompileTimeout as exc:
                    r["skipped"] = f"variant limit: {exc}"
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    cause = exc
                    while cause.__cause__ is not None and not isinstance(cause, _engine_profile.CompileTimeout):
                        cause = cause.__cause__
                    r["skipped" if isinstance(cause, _engine_profile.CompileTimeout) else "error"] = _short(cause)
                if cuda:
                    runner.graphs.clear()
                    torch.cuda.empty_cache()
                save()
                print(json.dumps({"variant": name, "point": [ctx, batch], **r}), flush=True)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            v["error"] = _short(exc)
        finally:
            v["total_s"] = time.monotonic() - t_start
            del fn, runner
            torch._dynamo.reset()  # the variant's compiled code (frozen weights included) goes
            release(device)
            save()
    return out


# ------------------------------------------------------------------ HF transformers eager (--hf-eager)
# our Gemma4Config field -> the Gemma4TextConfig keyword it maps to (rope fields: keys of rope_parameters)
HF_GEMMA4_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim",
    "global_head_dim": "global_head_dim (a __post_init__ keyword: per_layer_config[full].head_dim)",
    "sliding_window": "sliding_window (same convention: W keys including self)", "layer_types": "layer_types",
    "num_kv_shared_layers": "num_kv_shared_layers (same producer rule)", "use_double_wide_mlp": "use_double_wide_mlp",
    "hidden_size_per_layer_input": "hidden_size_per_layer_input",
    "vocab_size_per_layer_input": "vocab_size_per_layer_input",
    "sliding_rope_type": "rope_parameters['sliding_attention']['rope_type']",
    "sliding_rope_theta": "rope_parameters['sliding_attention']['rope_theta']",
    "full_rope_type": "rope_parameters['full_attention']['rope_type']",
    "full_rope_theta": "rope_parameters['full_attention']['rope_theta']",
    "full_partial_rotary_factor": "rope_parameters['full_attention']['partial_rotary_factor']",
    "final_logit_softcapping": "final_logit_softcapping", "rms_norm_eps": "rms_norm_eps",
    "hidden_activation": "hidden_activation ('gelu_tanh' -> 'gelu_pytorch_tanh')",
    "max_position_embeddings": "max_position_embeddings", "tie_word_embeddings": "tie_word_embeddings",
    "num_global_key_value_heads": "num_global_key_value_heads (a __post_init__ keyword; None: full layers use "
                                  "num_key_value_heads in both)",
    "attn_logit_softcapping": "none (HF Gemma 4 has no attention logit softcap; matches while ours is None)",
    "attention_scaling": "none (HF Gemma 4 hard-codes scaling 1.0; matches while ours is 1.0)",
}


def hf_gemma4_config(cfg) -> tuple[dict, dict]:
    """Our Gemma 4 sample config -> (``transformers.Gemma4TextConfig`` keywords, ``{field: why}`` of
    the fields HF cannot express: empty for every preset of ``samples/gemma4.py``). The rest of
    Gemma4TextConfig stays at its defaults, which are ours: no K=V attention, no MoE block, causal
    attention, no attention bias. ``name`` is not a model field."""
    kw = {k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "global_head_dim", "sliding_window", "num_kv_shared_layers",
        "use_double_wide_mlp", "hidden_size_per_layer_input", "vocab_size_per_layer_input",
        "final_logit_softcapping", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")}
    kw["layer_types"] = list(cfg.layer_types)
    full = {"rope_type": cfg.full_rope_type, "rope_theta": cfg.full_rope_theta}
    if cfg.full_rope_type == "proportional":
        full["partial_rotary_factor"] = cfg.full_partial_rotary_factor
    kw["rope_parameters"] = {"sliding_attention": {"rope_type": cfg.sliding_rope_type,
                                                   "rope_theta": cfg.sliding_rope_theta},
                             "full_attention": full}
    kw["hidden_activation"] = {"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.hidden_activation, cfg.hidden_activation)
    kw.update(attention_k_eq_v=False, enable_moe_block=False, attention_bias=False)
    unmatched = {}
    if cfg.num_global_key_value_heads is not None:
        kw["num_global_key_value_heads"] = cfg.num_global_key_value_heads
        unmatched["num_global_key_value_heads"] = ("HF applies it only with attention_k_eq_v (the K=V variant): "
                                                   "full layers get num_key_value_heads")
    if cfg.attn_logit_softcapping is not None:
        unmatched["attn_logit_softcapping"] = "HF Gemma 4 has no attention logit softcap (left out)"
    if cfg.attention_scaling != 1.0:
        unmatched["attention_scaling"] = "HF Gemma 4 hard-codes attention scaling 1.0"
    if cfg.layer_types[-1] != "full_attention":
        unmatched["layer_types"] = "HF forces the last layer to full attention"
    return kw, unmatched


def hf_gemma4_model(cfg, device, dtype, attn: str = "eager", seed: int = 0):
    """``(transformers.Gemma4ForCausalLM, unmatched)``: HF's own Gemma 4 text model with ``cfg``'s
    shapes, random weights (HF's init, seed ``seed``) built on ``device`` in ``dtype``. Raises
    ImportError (``transformers X has no gemma4``) where the installed transformers lacks it."""
    import transformers

    try:
        from transformers import Gemma4ForCausalLM, Gemma4TextConfig
    except ImportError as exc:
        raise ImportError(f"transformers {transformers.__version__} has no gemma4 ({exc})") from None
    kw, unmatched = hf_gemma4_config(cfg)
    config = Gemma4TextConfig(**kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Gemma4ForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval(), unmatched


def _hf_cache_kw(model) -> str:
    """The forward's cache keyword: ``cache`` (transformers 5.25) or ``past_key_values`` (5.17)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_random_cache(model, batch: int, context: int, gen: torch.Generator):
    """A ``DynamicCache(config=...)`` (what ``generate`` makes) holding ``context`` tokens: each
    non-KV-shared layer's ``Cache.update`` fed random K/V ``[B, Hkv, L, d]`` (the K/V a prefill of
    ``context`` tokens stores; sliding layers keep their last ``window - 1``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    param = next(model.parameters())
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if attn.is_kv_shared_layer:
            continue
        shape = (batch, attn.k_proj.out_features // attn.head_dim, context, attn.head_dim)
        k, v = (torch.randn(shape, generator=gen, device=param.device).to(param.dtype) * 0.5 for _ in "kv")
        cache.update(k, v, i)
        del k, v
    return cache


def _cache_state(cache) -> list:
    """What to put back so a decode step's ``update`` is undone (every update makes new tensors)."""
    return [dict(vars(layer)) for layer in cache.layers]


def _restore(cache, state) -> None:
    for layer, saved in zip(cache.layers, state):
        vars(layer).clear()
        vars(layer).update(saved)


def is_gemma4(spec: str) -> bool:
    """Whether a case spec (``PRESET[@NL][/flag]``) is a Gemma 4 sample: the cases ``--hf-eager`` times."""
    return get_sample(spec.partition("/")[0].partition("@")[0]).module.__name__.endswith(".gemma4")


def hf_eager_column(case: dict, sample: Sample, args, device, clock, deadline: float, save) -> dict:
    """``case["hf_transformers"]``: HF transformers' own Gemma 4 (``hf_gemma4_model``) timed on one
    decode step per L and B (see the module docstring), each attention implementation of
    ``--hf-attn``; ``rows`` hold ``hf_<attn>_ms`` (ms per step), the case's own ``<variant>_ms`` at the
    same L and B (``compiled_graph``, ``rewritten_graph``, ``rewritten``: those it timed) and
    ``hf_<attn>_over_<variant>``, the ratio (``hf_eager_over_compiled_graph``: issue #21's 20x)."""
    try:
        import transformers
        version = transformers.__version__
    except ImportError as exc:
        version = f"not installed ({exc})"
    dtype = DTYPES[case["dtype"]]
    real = case["real_size"]
    contexts = args.contexts if real else [args.tiny_context]
    batches = args.batches if real else [1, 2]
    out = case["hf_transformers"] = {"transformers": version, "dtype": case["dtype"], "rows": []}
    save()
    if time.monotonic() > deadline:
        out["skipped"] = "time budget"
        return out
    attns = [a for a in args.hf_attn.split(",") if a]
    t0 = time.monotonic()
    try:
        model, unmatched = hf_gemma4_model(sample.config, device, dtype, attns[0])
    except Exception as exc:  # noqa: BLE001  (the reason is the finding: no gemma4, out of memory, ...)
        traceback.print_exc()
        out["error"] = _short(exc)
        return out
    out.update(model=f"transformers.{type(model).__name__} (text only), random weights (HF init, seed 0) built on "
               f"{device.type}", config_fields=HF_GEMMA4_FIELDS, config_unmatched=unmatched or "none: every field maps",
               config=model.config.to_diff_dict(), attn_implementations=attns,
               cache="DynamicCache(config) (generate's default) filled by Cache.update with random K/V [B, Hkv, L, d] "
                     "per non-KV-shared layer (what a prefill of L tokens stores: no prefill run; an eager prefill's "
                     "[B, H, L, L] scores do not fit at 32K); each timed step is undone after it (L stays L)",
               step="model(input_ids [B, 1], cache, use_cache=True, logits_to_keep=1): one new token at position L, "
                    "median of --reps CUDA-event-timed calls after 2 warm-ups (perf_counter on the CPU)",
               params=sum(p.numel() for p in model.parameters()), build_s=time.monotonic() - t0)
    save()
    timed = {(r["context"], r["batch"]): r for r in case.get("rows", [])}
    kw = _hf_cache_kw(model)
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        for ctx in contexts:
            for batch in batches:
                row = {"context": ctx, "batch": batch}
                out["rows"].append(row)
                if time.monotonic() > deadline:
                    row["skipped"] = "time budget"
                    continue
                try:
                    cache = hf_random_cache(model, batch, ctx, gen)
                    state = _cache_state(cache)
                    ids = torch.randint(0, sample.config.vocab_size, (batch, 1), device=device, generator=gen)
                    for attn in attns:
                        try:
                            model.set_attn_implementation(attn)

                            def step(ids=ids, cache=cache):
                                model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
                            row[f"hf_{attn}_ms"] = clock(step, reset=lambda cache=cache, state=state:
                                                         _restore(cache, state)) * 1e3
                        except Exception as exc:  # noqa: BLE001
                            traceback.print_exc()
                            row[f"hf_{attn}_error"] = _short(exc)
                        _restore(cache, state)
                    del cache, state
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    row["error"] = _short(exc)
                ours = timed.get((ctx, batch), {})
                for variant in ("compiled_graph", "rewritten_graph", "rewritten"):
                    if isinstance(ours.get(f"{variant}_s"), float):
                        row[f"{variant}_ms"] = ours[f"{variant}_s"] * 1e3
                        for attn in attns:
                            if isinstance(row.get(f"hf_{attn}_ms"), float):
                                row[f"hf_{attn}_over_{variant}"] = row[f"hf_{attn}_ms"] / row[f"{variant}_ms"]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                save()
                print(json.dumps({"case": case["preset"], "hf_transformers": row}), flush=True)
    finally:
        del model
        release(device)
    return out


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


def routing_table(cases: list) -> str:
    """Per case with routing (``errors["routing"]``): errors against fp32 eager unpinned and with every
    ``topk`` pinned to fp32 eager's choice, and the rows whose choice differed."""
    lines = ["| preset | dtype | reference | eager vs fp32 | pinned | rewritten vs fp32 | pinned | "
             "flipped rows (eager / rewritten) | calls with flips |", "|" + "---|" * 9]
    for c in cases:
        e = c.get("errors", {})
        r = e.get("routing")
        if not r:
            continue
        ep, rp = r.get("eager_pinned", {}), r.get("rewritten_pinned", {})

        def flips(d):
            return f"{d['flipped_rows']} of {d['rows']}" if "rows" in d else "err" if "error" in d else "-"
        lines.append(f"| {c['preset']} | {c['dtype']} | {e.get('reference')} | {_e(e, 'eager', 'vs_fp32')} | "
                     f"{_e(r, 'eager_pinned', 'vs_fp32')} | {_e(e, 'rewritten', 'vs_fp32')} | "
                     f"{_e(r, 'rewritten_pinned', 'vs_fp32')} | {flips(ep)} / {flips(rp)} | "
                     f"{ep.get('calls_with_flips', '-')} of {r['topk_calls']} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def hf_table(cases: list) -> str:
    """``--hf-eager``: HF transformers' step time next to the compiled graph's, per case, L and B."""
    lines = ["| preset | transformers | L | B | HF eager ms | HF sdpa ms | compiled graph ms | "
             "HF eager / compiled graph | HF sdpa / compiled graph |", "|" + "---|" * 9]
    for c in cases:
        hf = c.get("hf_transformers")
        if hf is None:
            continue
        if not hf.get("rows"):
            lines.append(f"| {c['preset']} | {hf.get('transformers')} | - | - | "
                         f"{str(hf.get('error', hf.get('skipped', '')))[:80]} | | | | |")
        for r in hf.get("rows", []):
            def num(key, fmt):
                v = r.get(key)
                return format(v, fmt) if isinstance(v, float) else ("err" if any("error" in k for k in r) else "-")
            lines.append(f"| {c['preset']} | {hf['transformers']} | {r['context']} | {r['batch']} | "
                         f"{num('hf_eager_ms', '.3f')} | {num('hf_sdpa_ms', '.3f')} | {num('compiled_graph_ms', '.3f')} | "
                         f"{num('hf_eager_over_compiled_graph', '.1f')} | {num('hf_sdpa_over_compiled_graph', '.1f')} |")
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
    ap.add_argument("--fp32-ref", choices=("auto", "always", "never", "streamed"), default="auto",
                    help="real size: the fp32 reference -- a full fp32 copy (always), the bf16 weights upcast a "
                         "layer at a time (streamed), none; auto: a full copy where it fits next to bf16, else "
                         "streamed")
    ap.add_argument("--cpu-compile", action="store_true", help="also run Inductor on the CPU (slow)")
    ap.add_argument("--hf-eager", action="store_true",
                    help="also time HF transformers' own Gemma 4 (eager) on each Gemma 4 case's decode step")
    ap.add_argument("--hf-attn", default="eager,sdpa",
                    help="--hf-eager: attention implementations to time (eager first: the one the model is built with)")
    ap.add_argument("--tune", action=argparse.BooleanOptionalAction, default=False,
                    help="compile the case's engines with TorchEngine(tune=True): Inductor's coordinate-descent "
                    "tuning (longer compiles; 'tune' in the JSON)")
    ap.add_argument("--inplace", action=argparse.BooleanOptionalAction, default=True,
                    help="buffer caches updated in place by the engines (default; --no-inplace: the functional "
                    "attention_buffer, every present copied back)")
    ap.add_argument("--profile", default="", metavar="L:B[,L:B]",
                    help="torch.profiler of the compiled and uncompiled CUDA-graph steps at these points: kernel "
                    "time per name and category, kernels per step, wall vs kernel time, GEMM bytes "
                    "(JSON: case['profile']; markdown: engine_profile.md)")
    ap.add_argument("--profile-steps", type=int, default=10, help="--profile: steps under the profiler")
    ap.add_argument("--compile-variants", default="", metavar="NAME[,NAME]",
                    help="torch.compile variants to time (presets: " + ", ".join(_engine_profile.PRESETS) +
                    "; JSON: case['compile_variants'])")
    ap.add_argument("--inductor", action="append", default=[], metavar="[NAME:]KEY=VALUE[,KEY=VALUE]",
                    help="a variant of torch._inductor.config overrides (and mode= / dynamic=); repeatable")
    ap.add_argument("--variant-points", default="4096:1,32768:8", metavar="L:B[,L:B]",
                    help="where each compile variant is timed")
    ap.add_argument("--variant-limit-s", type=float, default=200.0,
                    help="a variant's compiles and timings stop after this many seconds (the rest: skipped)")
    ap.add_argument("--variant-min-s", type=float, default=45.0,
                    help="start no variant with less than this many seconds of the budget left")
    ap.add_argument("--variant-backend", default="inductor",
                    help="torch.compile backend of the variants (eager / aot_eager: a CPU check of the code path)")
    ap.add_argument("--variant-fp32-ref", action=argparse.BooleanOptionalAction, default=True,
                    help="each variant's logits also against the same step in fp32, uncompiled, on the same inputs "
                    "(err_vs_fp32; default on)")
    ap.add_argument("--errors", action=argparse.BooleanOptionalAction, default=True,
                    help="the case's error measurement (prompt + --decode steps through every engine; default on)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench/torch_engine.py: torch sees no CUDA device (pass --device cpu --tiny to check the script)",
                  file=sys.stderr)
            return 4
        from effexport.custom_ops import enable_triton
        enable_triton()
    profiler_init = _engine_profile.init_for_cuda_graphs() if args.profile and device.type == "cuda" else None
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
                       "copy_bw": bw, "inplace": args.inplace, "tune": args.tune, "elapsed_s": time.monotonic() - start, "cases": cases,
                       "mhc_overhead": mhc_overhead(cases),
                       **({"profiler_init": profiler_init} if profiler_init else {})}, f, indent=1, default=str)
        if args.profile or args.compile_variants or args.inductor:
            with open(os.path.join(args.out, "engine_profile.md"), "w") as f:
                f.write(_engine_profile.markdown(cases) + "\n")
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
        release(device)
        save()
        if args.hf_eager:  # after the case's memory is freed: HF's model is built fresh
            try:
                if is_gemma4(name):
                    hf_eager_column(case, real_sample(name) if real else get_sample(name), args, device, clock,
                                    deadline, save)
            except Exception as exc:  # noqa: BLE001  (a failure of the HF column must not stop the bench)
                traceback.print_exc()
                case.setdefault("hf_transformers", {})["error"] = _short(exc)
            release(device)
            save()
    print(f"buffer caches {'in place' if args.inplace else 'functional (--no-inplace)'}")
    print(table(cases))
    if routing_table(cases):
        print(routing_table(cases))
    if args.hf_eager:
        print(hf_table(cases))
    for m in mhc_overhead(cases):
        print("mHC overhead", json.dumps(m))
    if args.profile or args.compile_variants or args.inductor:
        print(_engine_profile.markdown(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
