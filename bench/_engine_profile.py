"""Where a decode step's time goes, and Inductor's levers: the pieces ``bench/torch_engine.py``'s
``--profile`` and ``--compile-variants`` / ``--inductor`` use (kept here so tests can run them on the CPU).

Profile: :func:`profile_calls` runs a callable under ``torch.profiler`` (CUDA activity on a GPU: CUPTI
reports each kernel of a CUDA-graph replay, given :func:`init_for_cuda_graphs` ran before the graphs
were captured -- gpt-fast's ``torch.profiler._utils._init_for_cuda_graphs()``); :func:`device_events`
takes its kernels / memcpys / memsets (on the CPU, where there are none: the leaf CPU ops, so the code
path runs end to end); :func:`summarize` aggregates them per kernel name and per :data:`CATEGORIES`,
per step, against the replay's wall time; :func:`gemm_shapes` attributes GEMM kernels to the
``aten::mm`` / ``addmm`` / ``bmm`` calls (input shapes and dtypes) of an *uncaptured* profile of the
same program, which gives the bytes each GEMM must read and the bandwidth it reaches.

Variants: :data:`PRESETS` (named sets of ``torch._inductor.config`` overrides and ``torch.compile``
arguments) and :func:`parse_variant` (``[NAME:]KEY=VALUE,...``), resolved by :func:`compile_kwargs`
against the installed torch (a key it does not have is reported, not passed); :func:`fp32_graph`, the
fp32 twin of a bf16 step graph every variant's logits are measured against.
"""
from __future__ import annotations

import ast
import bisect
import contextlib
import copy
import os
import re
import signal
from collections import defaultdict

import torch
from torch import fx

from effexport.passes._graph import attr

CATEGORIES = ("gemm_cublas", "gemm_triton", "inductor_triton", "effexport_triton", "copy_memset", "aten_native",
              "other")
"""Kernel categories: cuBLAS / cuBLASLt / CUTLASS GEMMs and GEMVs (``nvjet_*``, ``sm90_xmma_*``, ``gemv*``,
...; ``aten::mm`` & co. on the CPU), Inductor's Triton GEMM templates (``triton_tem_*``), Inductor's
generated Triton kernels (``triton_poi_`` / ``triton_red_`` / ``triton_per_`` / other ``triton_*``),
effexport's own Triton kernels (``custom_ops/_triton``: attention, CCA, mHC), copies and memsets
(memcpy / memset activities, copy kernels), ATen's native CUDA kernels (``at::native::...``: the
uncompiled step's elementwise and reductions), and the rest."""

_GEMM = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitk|^sm\d+_|aten::(mm|addmm|bmm|baddbmm|linear|matmul|"
                   r"_scaled_mm)$", re.I)
_COPY = re.compile(r"memcpy|memset|copy|aten::(copy_|clone|fill_|zero_|index_put_|to|_to_copy|cat)$", re.I)
MM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")
"""The CPU ops whose kernels :func:`gemm_shapes` attributes (what Inductor's ``extern_kernels`` and the
uncompiled step call)."""
DTYPE_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
               "signed char": 1, "unsigned char": 1, "bool": 1, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1,
               "float32": 4, "bfloat16": 2, "float16": 2}


def effexport_kernel_names(root: str | None = None) -> frozenset[str]:
    """The ``@triton.jit`` functions of ``custom_ops/_triton`` (read with ``ast``: no Triton needed)."""
    root = root or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "custom_ops", "_triton")
    names = set()
    for fname in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        if not fname.endswith(".py"):
            continue
        with open(os.path.join(root, fname)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return frozenset(names)


EFFEXPORT_KERNELS = effexport_kernel_names() or frozenset({"_partial", "_combine", "_cca_decode", "_sinkhorn",
                                                           "_mhc_pre", "_prefill"})


def category(name: str, activity: str = "kernel") -> str:
    """One of :data:`CATEGORIES` for a kernel (or, on the CPU, a leaf op) name."""
    if activity in ("gpu_memcpy", "gpu_memset"):
        return "copy_memset"
    if name.startswith("triton_tem_"):
        return "gemm_triton"
    if name in EFFEXPORT_KERNELS or name.startswith("effexport::"):
        return "effexport_triton"
    if name.startswith("triton_"):
        return "inductor_triton"
    if _GEMM.search(name):
        return "gemm_cublas"
    if _COPY.search(name):
        return "copy_memset"
    if "at::native" in name or name.startswith("aten::") or "elementwise" in name or "reduce_kernel" in name:
        return "aten_native"
    return "other"


def init_for_cuda_graphs() -> str:
    """Start and stop a profiler once before any CUDA graph is captured, so CUPTI reports the kernels
    of graph replays later (what gpt-fast's ``generate.py`` does before profiling). Also keeps CUPTI up
    between profiler sessions (``TEARDOWN_CUPTI=0``, unless set: torch sets it itself for Inductor's
    CUDA graphs on CUDA < 12.6, where a re-init after teardown crashed; the engine's graphs are its own)."""
    os.environ.setdefault("TEARDOWN_CUPTI", "0")
    try:
        from torch.profiler._utils import _init_for_cuda_graphs

        _init_for_cuda_graphs()
        return "torch.profiler._utils._init_for_cuda_graphs()"
    except Exception as exc:  # noqa: BLE001  (private API: absent or changed)
        try:
            with torch.profiler.profile():
                pass
            return f"torch.profiler.profile() started and stopped ({type(exc).__name__} from the private helper)"
        except Exception as exc2:  # noqa: BLE001
            return f"failed: {type(exc2).__name__}: {exc2}"


def profile_calls(fn, n: int, device: torch.device, record_shapes: bool = False):
    """The profiler's raw kineto events of ``n`` calls of ``fn()`` (synchronised after)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=acts, record_shapes=record_shapes) as prof:
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return list(prof.profiler.kineto_results.events())


def _act(e) -> str:
    """The kineto activity type (``kernel``, ``gpu_memcpy``, ``gpu_memset``, ``cuda_runtime``, ``cpu_op``,
    ``gpu_user_annotation`` (a range on the GPU timeline, not a kernel), ...); only where a torch has no
    ``activity_type`` does an event on a CUDA device count as a ``kernel``."""
    try:
        act = str(e.activity_type())
    except Exception:  # noqa: BLE001
        act = ""
    if not act:
        return "kernel" if str(e.device_type()).endswith("CUDA") else "cpu_op"
    return act


def device_events(events) -> tuple[list[dict], str]:
    """(``[{name, activity, start_us, dur_us}]``, source): the device activities (kernel / memcpy /
    memset) of a profile; where there are none (a CPU run) the leaf CPU ops -- those no other op of
    their thread starts inside -- so the summary is still one partition of the time."""
    dev = [e for e in events if _act(e) in ("kernel", "gpu_memcpy", "gpu_memset")]
    if dev:
        return [{"name": e.name(), "activity": _act(e), "start_us": e.start_ns() / 1e3, "dur_us": e.duration_ns() / 1e3}
                for e in dev], "device activities (CUPTI)"
    ops = [e for e in events if _act(e) == "cpu_op" and e.duration_ns() > 0]
    out = []
    by_thread = defaultdict(list)
    for e in ops:
        by_thread[e.start_thread_id()].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e.start_ns(), -e.duration_ns()))
        for i, e in enumerate(evs):
            if i + 1 < len(evs) and evs[i + 1].start_ns() < e.start_ns() + e.duration_ns():
                continue  # has a child
            out.append({"name": e.name(), "activity": "cpu_op", "start_us": e.start_ns() / 1e3,
                        "dur_us": e.duration_ns() / 1e3})
    return out, "leaf CPU ops (no device activity recorded)"


def _nbytes(shape, dtype: str) -> int | None:
    if not isinstance(shape, (list, tuple)) or not shape or not all(isinstance(d, int) for d in shape):
        return None
    size = DTYPE_BYTES.get(dtype)
    if size is None:
        return None
    n = 1
    for d in shape:
        n *= d
    return n * size


def gemm_shapes(events, n_steps: int) -> list[dict]:
    """The GEMM calls (:data:`MM_OPS`) of an uncaptured profile, grouped by op, input shapes and dtypes:
    calls per step, device us per call (their kernels' time, found through the launch's correlation id;
    the op's own time where no kernel was recorded), the kernels' names, ``bytes_read`` (every tensor
    input: activations + weight), ``weight_bytes`` (the largest input: the weight at M = B) and the
    bandwidth reached (``bytes_read / time``). Sorted by time per step."""
    ops = [e for e in events if _act(e) == "cpu_op" and e.name() in MM_OPS]
    runtime = sorted((e for e in events if _act(e) in ("cuda_runtime", "cuda_driver")), key=lambda e: e.start_ns())
    starts = [e.start_ns() for e in runtime]
    kernels: dict[int, list] = defaultdict(list)
    for e in events:
        if _act(e) == "kernel":
            kernels[e.correlation_id()].append(e)
    groups: dict[tuple, dict] = {}
    for op in ops:
        t0, t1 = op.start_ns(), op.start_ns() + op.duration_ns()
        ks = []
        for r in runtime[bisect.bisect_left(starts, t0):bisect.bisect_right(starts, t1)]:
            # the launches inside the op's time (one launching thread: the step's; the runtime events'
            # thread ids are the OS's, the ops' torch's own numbering, so they are not compared)
            ks += kernels.get(r.correlation_id(), [])
        us = sum(k.duration_ns() for k in ks) / 1e3 if ks else op.duration_ns() / 1e3
        shapes, dtypes = [list(s) for s in op.shapes()], list(op.dtypes())
        sizes = [b for b in (_nbytes(s, d) for s, d in zip(shapes, dtypes)) if b]
        key = (op.name(), repr(shapes), repr(dtypes))
        g = groups.setdefault(key, {"op": op.name(), "shapes": shapes, "dtypes": dtypes, "calls": 0, "total_us": 0.0,
                                    "kernels": set(), "bytes_read": sum(sizes) if sizes else None,
                                    "weight_bytes": max(sizes) if sizes else None,
                                    "device_time": "kernels" if ks else "cpu op (no kernel recorded)"})
        g["calls"] += 1
        g["total_us"] += us
        g["kernels"].update(k.name() for k in ks)
    out = []
    for g in groups.values():
        g["calls_per_step"] = g["calls"] / n_steps
        g["us_per_call"] = g["total_us"] / g["calls"]
        g["us_per_step"] = g["total_us"] / n_steps
        g["kernels"] = sorted(g["kernels"])
        if g["bytes_read"] and g["us_per_call"] > 0:
            g["gb_per_s"] = g["bytes_read"] / g["us_per_call"] / 1e3
        out.append(g)
    return sorted(out, key=lambda g: -g["us_per_step"])


def summarize(events: list[dict], n_steps: int, wall_s: float | None, gemms: list[dict] | None = None,
              top: int = 25, bw: float | None = None) -> dict:
    """Per step: kernel count, total kernel time, time per :data:`CATEGORIES` (which sum to the total),
    the wall time of one step (``wall_s``: the timed replay) and the part of it no kernel ran
    (``gap_us``: launch gaps and host work), and the ``top`` kernels by total time (count, total us,
    us per call, category; a GEMM kernel that ``gemms`` attributes gets its mean bytes read per call
    and the bandwidth it reaches, and with ``bw`` the fraction of the copy bandwidth)."""
    per: dict[str, dict] = {}
    cats = dict.fromkeys(CATEGORIES, 0.0)
    ncat = dict.fromkeys(CATEGORIES, 0)
    for e in events:
        c = category(e["name"], e["activity"])
        k = per.setdefault(e["name"], {"name": e["name"], "category": c, "count": 0, "total_us": 0.0})
        k["count"] += 1
        k["total_us"] += e["dur_us"]
        cats[c] += e["dur_us"]
        ncat[c] += 1
    total = sum(e["dur_us"] for e in events)
    span = (max(e["start_us"] + e["dur_us"] for e in events) - min(e["start_us"] for e in events)) if events else 0.0
    bytes_by_kernel: dict[str, list] = defaultdict(list)
    for g in gemms or ():
        if g.get("bytes_read"):
            for name in g["kernels"]:
                bytes_by_kernel[name] += [g["bytes_read"]] * g["calls"]
    kernels = sorted(per.values(), key=lambda k: -k["total_us"])
    rows = []
    for k in kernels[:top]:
        row = {"name": k["name"], "category": k["category"], "count_per_step": k["count"] / n_steps,
               "total_us_per_step": k["total_us"] / n_steps, "us_per_call": k["total_us"] / k["count"],
               "share": k["total_us"] / total if total else 0.0}
        if bytes_by_kernel.get(k["name"]):
            b = bytes_by_kernel[k["name"]]
            row["bytes_read_per_call"] = sum(b) / len(b)
            row["gb_per_s"] = row["bytes_read_per_call"] / row["us_per_call"] / 1e3 if row["us_per_call"] else None
            if bw and row["gb_per_s"]:
                row["of_copy_bw"] = row["gb_per_s"] * 1e9 / bw
        rows.append(row)
    out = {"steps": n_steps, "kernels_per_step": len(events) / n_steps, "distinct_kernels": len(per),
           "kernel_us_per_step": total / n_steps, "span_us_per_step": span / n_steps,
           "categories_us_per_step": {c: v / n_steps for c, v in cats.items()},
           "categories_count_per_step": {c: v / n_steps for c, v in ncat.items()},
           "top_kernels": rows}
    if wall_s is not None:
        out["wall_us_per_step"] = wall_s * 1e6
        out["gap_us_per_step"] = wall_s * 1e6 - out["kernel_us_per_step"]
        out["kernel_busy_fraction"] = out["kernel_us_per_step"] / out["wall_us_per_step"] if wall_s else None
    if gemms is not None:
        out["gemm_shapes"] = gemms
        out["gemm_bytes_per_step"] = sum((g["bytes_read"] or 0) * g["calls_per_step"] for g in gemms)
        out["gemm_us_per_step_uncaptured"] = sum(g["us_per_step"] for g in gemms)
        if bw:
            out["gemm_roofline_us_per_step"] = out["gemm_bytes_per_step"] / bw * 1e6
    return out


# ------------------------------------------------------------------------------ compile variants
PRESETS: dict[str, dict] = {
    "default": {},
    "static": {"dynamic": False},
    "cdt": {"coordinate_descent_tuning": True},
    "gptfast": {"coordinate_descent_tuning": True, "triton.unique_kernel_names": True, "fx_graph_cache": True},
    "freezing": {"freezing": True},
    "combo": {"combo_kernels": True},
    "decompose-mm": {"decompose_mem_bound_mm": True},
    "no-epilogue": {"epilogue_fusion": False},
    "autotune-gemm": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON,ATEN"},
    "max-autotune": {"mode": "max-autotune-no-cudagraphs"},
    "max-autotune-freezing": {"mode": "max-autotune-no-cudagraphs", "freezing": True},
    "nopack": {"pack": False},
}
"""Named variants (``--compile-variants``): ``torch._inductor.config`` keys, and the ``torch.compile``
arguments ``mode`` (expanded by ``torch._inductor.list_mode_options`` into its config keys) and
``dynamic``. ``default`` is the engine's own ``torch.compile`` (default mode, automatic dynamic shapes);
``static``: ``dynamic=False`` (B=8 gets its own static compile instead of a batch-dynamic one);
``cdt``: coordinate-descent tuning of the generated kernels' launch configs; ``gptfast``: gpt-fast's
``generate.py`` settings; ``freezing``: weights as constants (constant folding, and on CUDA the
freezing patterns that concatenate GEMMs sharing an input, e.g. q/k/v or gate/up); ``combo``:
horizontal fusion of independent kernels (fewer launches); ``decompose-mm``: memory-bound mm (M small)
decomposed into Triton reductions Inductor can fuse; ``no-epilogue``: what gpt-fast-derived recipes
often set; ``autotune-gemm``: Triton GEMM templates autotuned against cuBLAS, pointwise kernels as
default; ``max-autotune``: ``mode="max-autotune-no-cudagraphs"`` (the engine captures its own graph);
``nopack``: the default compile of the engine without its packed projections (``TorchEngine(pack=False)``:
one GEMM per projection, as the program has them).

Keys of :data:`ENGINE_ARGS` are the engine's, not Inductor's: ``pack`` (default True)."""

COMPILE_ARGS = ("mode", "dynamic", "fullgraph")
ENGINE_ARGS = ("pack",)


def _value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_variant(spec: str) -> tuple[str, dict]:
    """``[NAME:]KEY=VALUE,...`` -> (name, overrides). A comma piece without ``=`` continues the previous
    value (``max_autotune_gemm_backends=TRITON,ATEN``). A bare preset name is that preset. VALUE: true /
    false / none / int / float / string."""
    spec = spec.strip()
    if spec in PRESETS:
        return spec, dict(PRESETS[spec])
    name, sep, body = spec.partition(":")
    if not sep or "=" in name:
        name, body = spec, spec
    pairs: list[list[str]] = []
    for piece in body.split(","):
        if "=" in piece:
            pairs.append(piece.split("=", 1))
        elif pairs:
            pairs[-1][1] += "," + piece
        elif piece.strip():
            raise ValueError(f"--inductor {spec!r}: {piece!r} is neither KEY=VALUE nor a preset ({', '.join(PRESETS)})")
    return name, {k.strip(): _value(v) for k, v in pairs}


def _has_config(key: str) -> bool:
    import torch._inductor.config as cfg

    obj = cfg
    for part in key.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def compile_kwargs(overrides: dict, backend: str = "inductor") -> tuple[dict, dict]:
    """(``torch.compile`` keyword arguments, notes): ``mode`` expanded into its config options (the
    engine captures its own CUDA graph, so ``triton.cudagraphs`` is forced off unless given), the
    config keys the installed Inductor has passed as ``options``, the others listed in
    ``notes["missing"]`` (not passed). With a ``backend`` other than Inductor (a CPU test) the options
    are checked but not passed."""
    kw: dict = {k: overrides[k] for k in ("dynamic", "fullgraph") if k in overrides}
    options: dict = {}
    notes: dict = {}
    mode = overrides.get("mode")
    if mode:
        from torch._inductor import list_mode_options

        options.update(list_mode_options(mode))
        notes["mode"] = mode
    options.update({k: v for k, v in overrides.items() if k not in COMPILE_ARGS + ENGINE_ARGS})
    if options.get("triton.cudagraphs") and "triton.cudagraphs" not in overrides:
        notes["cudagraphs"] = "triton.cudagraphs forced off: the engine captures the step in its own CUDA graph"
    if "triton.cudagraphs" not in overrides:
        options.pop("triton.cudagraphs", None)
    missing = sorted(k for k in options if not _has_config(k))
    if missing:
        notes["missing"] = missing
    options = {k: v for k, v in options.items() if k not in missing}
    notes["options"] = options
    if backend != "inductor":
        kw["backend"] = backend
        if options:
            notes["options_not_passed"] = f"backend {backend!r} takes no Inductor options"
    elif options:
        kw["options"] = options
    return kw, notes


HALF_DTYPES = (torch.bfloat16, torch.float16)


def fp32_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """The step of ``gm`` (a rewritten bf16 / fp16 step graph) computed in fp32: a copy of its graph in
    which every 16-bit floating weight, buffer or constant it reads (``get_attr``) is cast to fp32
    right before each op reading it, and every 16-bit floating dtype argument (the model's ``.to(bf16)`` casts, the
    ``zeros(dtype=bf16)`` of its caches' first rows) is fp32; other dtypes stay. It is what the fp32
    model holding the bf16 weights (``model.float()``) captures and rewrites to, op for op (the CPU
    test checks the logits are equal), without a second capture. The weights stay ``gm``'s own (no
    copy is kept: a weight's fp32 copy lives through the one op that reads it, freed after as the
    graph's code frees every value after its last use; the largest, Gemma 4 E2B's per-layer embedding
    table, is 9.4 GB), and the effexport ops take fp32 as the fp32
    presets do (their Triton kernels: IEEE fp32 dots over fp32 caches)."""
    def fp32(arg):
        return torch.float32 if isinstance(arg, torch.dtype) and arg in HALF_DTYPES else arg

    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if node.op == "get_attr":
            value = attr(gm, node.target)
            if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES:
                for user in list(node.users):  # the get_attrs are at the top: the casts go where they are read
                    with graph.inserting_before(user):
                        up = graph.call_function(torch.ops.aten.to.dtype, (node, torch.float32))
                    user.replace_input_with(node, up)
        else:
            node.args, node.kwargs = fx.node.map_aggregate((node.args, node.kwargs), fp32)
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


@contextlib.contextmanager
def ieee_fp32():
    """fp32 matmuls and convolutions in IEEE fp32 (TF32 off, whatever the process set: Inductor
    suggests ``set_float32_matmul_precision("high")``), restored on exit."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class CompileTimeout(Exception):
    """A variant's compile ran past its limit (:func:`alarm`)."""


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise :class:`CompileTimeout` in the main thread after ``seconds`` (SIGALRM; a no-op where
    there is none, off the main thread, or with ``seconds`` <= 0 / None)."""
    usable = seconds and seconds > 0 and hasattr(signal, "SIGALRM")
    if usable:
        try:
            def fire(signum, frame):
                raise CompileTimeout(f"compile ran past {seconds:.0f} s")
            previous = signal.signal(signal.SIGALRM, fire)
        except ValueError:  # not the main thread
            usable = False
    if not usable:
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parse_points(text: str) -> list[tuple[int, int]]:
    """``"4096:1,32768:8"`` -> ``[(4096, 1), (32768, 8)]``."""
    out = []
    for piece in text.split(","):
        if piece.strip():
            ctx, _, batch = piece.partition(":")
            out.append((int(ctx), int(batch or 1)))
    return out


# ------------------------------------------------------------------------------ markdown
def _f(v, fmt=".1f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def markdown(cases: list) -> str:
    """The profile and variant tables of every case that has them."""
    out = []
    for c in cases:
        for p in c.get("profile", []):
            roof = p.get("roofline_all_s")
            out.append(f"\n### {c['preset']} {c['dtype']} L={p['context']} B={p['batch']}: where the step goes"
                       f" (roofline {_f(roof * 1e3 if roof else None, '.3f')} ms)\n")
            out.append("| variant | wall us | kernel us | gap us | kernels/step | " +
                       " | ".join(f"{k} us" for k in CATEGORIES) + " |")
            out.append("|" + "---|" * (5 + len(CATEGORIES)))
            summaries = {k: v for k, v in p.items() if isinstance(v, dict) and "kernel_us_per_step" in v}
            for key, s in summaries.items():
                cats = s["categories_us_per_step"]
                out.append(f"| {key} | {_f(s.get('wall_us_per_step'))} | {_f(s['kernel_us_per_step'])} | "
                           f"{_f(s.get('gap_us_per_step'))} | {_f(s['kernels_per_step'])} | " +
                           " | ".join(_f(cats[k]) for k in CATEGORIES) + " |")
            for key, v in p.items():
                if isinstance(v, dict) and "error" in v:
                    out.append(f"| {key} | {v['error'][:100]} |")
            for key, s in summaries.items():
                out.append(f"\n{key}: top kernels ({s.get('kernels_from', '')})\n")
                out.append("| kernel | category | count/step | us/step | us/call | share | bytes/call | GB/s |")
                out.append("|---|---|---|---|---|---|---|---|")
                for k in s["top_kernels"]:
                    out.append(f"| `{k['name'][:90]}` | {k['category']} | {_f(k['count_per_step'])} | "
                               f"{_f(k['total_us_per_step'])} | {_f(k['us_per_call'], '.2f')} | {_f(k['share'], '.3f')} | "
                               f"{_f(k.get('bytes_read_per_call'), '.3g')} | {_f(k.get('gb_per_s'), '.0f')} |")
                if s.get("gemm_shapes"):
                    out.append(f"\n{key}: GEMMs by shape (uncaptured profile; {_f(s['gemm_bytes_per_step'] / 1e6, '.1f')}"
                               f" MB read per step, {_f(s['gemm_us_per_step_uncaptured'])} us)\n")
                    out.append("| op | shapes | dtypes | calls/step | us/call | bytes/call | GB/s | kernels |")
                    out.append("|---|---|---|---|---|---|---|---|")
                    for g in s["gemm_shapes"][:25]:
                        out.append(f"| {g['op']} | {g['shapes']} | {','.join(d for d in g['dtypes'] if d)} | "
                                   f"{_f(g.get('calls_per_step'))} | {_f(g.get('us_per_call'), '.2f')} | "
                                   f"{_f(g.get('bytes_read'), '.3g')} | {_f(g.get('gb_per_s'), '.0f')} | "
                                   f"{' '.join(g['kernels'])[:80]} |")
        variants = c.get("compile_variants")
        if variants:
            points = variants.get("points", [])
            ref = variants.get("fp32_ref")
            out.append(f"\n### {c['preset']} {c['dtype']}: Inductor variants (ms per step, compiled + CUDA graph)\n")
            if ref is not None:
                out.append("err: max|x - ref| / max|ref| of the first step's logits, same inputs; ref: the "
                           "default variant's, or the same step in fp32 (the rewritten program uncompiled, the "
                           "weights upcast); `uncompiled (rewritten)`: the step of the case dtype, uncompiled, "
                           "against fp32 (the bar)"
                           + (f". fp32 reference failed: {ref['error']}" if "error" in ref else "") + "\n")
            out.append("| variant | " + " | ".join(f"L={L} B={B} ms | compile s | err vs default | err vs fp32"
                                                    for L, B in points) + " | notes |")
            out.append("|" + "---|" * (2 + 4 * len(points)))
            for v in variants.get("variants", []):
                cells = []
                for L, B in points:
                    r = v.get("points", {}).get(f"{L}:{B}", {})
                    cells.append(f"{_f(r.get('ms'), '.3f')} | {_f(r.get('compile_s'))} | "
                                 f"{_f(r.get('err_vs_default'), '.2e')} | {_f(r.get('err_vs_fp32'), '.2e')}")
                note = v.get("skipped") or v.get("error") or ", ".join(f"{k}={val}" for k, val in v.get("overrides", {}).items())
                out.append(f"| {v['name']} | " + " | ".join(cells) + f" | {str(note)[:120]} |")
            if ref is not None and "points" in ref:
                cells = []
                for L, B in points:
                    r = ref["points"].get(f"{L}:{B}", {})
                    cells.append(f"- | - | - | {_f(r.get('rewritten_err_vs_fp32'), '.2e')}")
                out.append("| uncompiled (rewritten) | " + " | ".join(cells) + " | not timed |")
    return "\n".join(out)
