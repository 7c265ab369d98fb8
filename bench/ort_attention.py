"""The attention lowerings ONNX Runtime's CUDA EP offers for one decode step over a fixed KV buffer,
timed and checked against a torch fp32 reference, so the exporter can pick the fastest (issue #20).

GPU run: device call 6 after the five staging calls of BENCHMARKS.md (call 6 carries ``.ortgpu6``;
``_ortgpu_env.sh`` installs onnxruntime-gpu 1.31.1 into /tmp/ortgpu, puts it on PYTHONPATH and maps
the checkout as ``effexport``). The script stops itself after ``--budget-s`` (default 130 s; its
worker is killed 8 s later at most), so the run takes <= 140 s after the install:

    source bench/_ortgpu_env.sh && timeout 150 python3 bench/ort_attention.py --out "$OUT" 2>&1 \\
        | tee "$OUT/ort_attention.log" | tail -n 120

Results: ``$OUT/ort_attention.json`` (every number), ``ort_attention.md`` (the tables),
``ort_attention.jsonl`` (the event log). A second run can pin ORT's attention kernels per candidate,
e.g. ``--candidates gqa,gqa+no_cudnn_auto,gqa+sdpa_flash --heads 256 --no-check`` (:data:`KNOBS`).

CPU smoke test (CPU EP, fp32, small shapes, no CUDA graphs; ``tests/test_bench_ort_attention.py``):

    python bench/ort_attention.py --smoke --out /tmp/ort_attention

Each case is one decode token (T = 1) of one attention layer: query heads ``Hq``, KV heads ``Hkv``
(``--q-heads 8 --kv-heads 1``: Gemma 4 E2B), head size ``d`` (``--heads 512,256``), a K/V buffer of
``Lmax`` rows ``[B, Hkv, Lmax, d]`` (bf16 on CUDA) with the new token at row ``pos``
(``--contexts Lmax:pos,...``; a bare ``L`` is ``L:L-1``), batch ``B`` (``--batches``). The buffer
rows after ``pos`` hold random values, so a candidate that reads them shows in the parity. Every
candidate is one tiny ONNX model (onnx.helper, fixed shapes) whose graph inputs are ``q [B,Hq,1,d]``,
``k_new / v_new [B,Hkv,1,d]`` (equal to buffer row ``pos``), the buffers and ``pos`` (a device int64
scalar, as in effexport's step), and whose outputs are ``out [B,Hq,1,d]`` and the buffers, bound to
the same memory (in place). The device memory is torch tensors allocated once per case (freed after
it) and bound by pointer (``bind_input`` / ``bind_output`` with ``data_ptr()``, as effexport's
``CudaGraphRuntime`` binds its caches) rather than ``OrtValue``s: the fp32 reference and the
checks read the very memory ORT wrote. The candidates:

* ``decomp``: what ``exporter/backends/onnx/attention.py`` emits for heads GroupQueryAttention does
  not take (``_attention_buffer`` -> ``attend_decomposed``): a ScatterND of the new row into each
  buffer, then per KV head one batched MatMul of ``q [B,Hkv,G*T,d]`` by the transposed buffer (q's
  dtype), Cast to fp32, Mul by the scale, a Where mask ``k_pos <= q_pos`` built from ``pos``
  (``_build.visible``), fp32 Softmax, Cast back and a second MatMul with V: every one of the Lmax
  rows is read.
* ``gqa`` / ``gqa_cap``: ``com.microsoft.GroupQueryAttention`` in its shared-buffer form (past and
  present bound to one buffer: ORT writes the new row in place), ``seqlens_k = pos`` computed on the
  device, ``total_sequence_length`` an int32 CPU input: ``pos + 1`` (``gqa``) or ``Lmax``
  (``gqa_cap``: the exporter's one-token convention, a constant a CUDA graph can keep). ORT may refuse
  head 512; the error string is the result.
* ``attn24``: ai.onnx ``Attention`` (opset 24) over the whole buffer as K/V (4-D BNSH, no
  past_key), ``nonpad_kv_seqlen = pos + 1`` (int64 ``[B]``), ``is_causal = 0``; ``q_num_heads`` /
  ``kv_num_heads`` left out (the spec wants them for 3-D inputs only), ``softmax_precision`` left
  out (ORT's CUDA kernels refused it; they accumulate in fp32). ``attn24_bool`` / ``attn24_add``:
  the same with a boolean / additive (``-1e30``) ``attn_mask [1,1,Tq,Lmax]`` built from ``pos``
  instead of ``nonpad_kv_seqlen``. ORT's CUDA Attention (as of its 2025-26 sources) takes
  ``Hq != Hkv`` only as 3-D inputs and masks it by ``nonpad_kv_seqlen`` through flash (head <= 256),
  so two more layouts, each a binding of the same memory under another shape (:func:`shapes`):
  ``attn24_3d``: 3-D ``Q [B,1,Hq*d]``, ``K/V [B,Lmax,Hkv*d]`` (sequence-major: the BNSH buffer
  itself when Hkv = 1), ``q_num_heads`` / ``kv_num_heads``, ``nonpad_kv_seqlen``;
  ``attn24_fold`` / ``attn24_fold_bool`` / ``attn24_fold_add``: the G query heads of a KV head as
  its query rows, ``Q [B,Hkv,G,d]`` (Hq = Hkv for ORT: its MHA path, any head size), with
  ``nonpad_kv_seqlen`` / a bool / an additive mask. ``attn23_bool`` (by ``--candidates`` only): the
  boolean mask at opset 23, what the exporter's ``standard`` profile emits. All after the ScatterND
  write (in the candidate's layout).
* ``mha`` / ``mha_bias``: ``com.microsoft.MultiHeadAttention`` with the buffer as BNSH key / value.
  MHA has no KV-head grouping (key heads = ``num_heads``), so the ``G`` query heads of a KV head go
  into its query sequence (``query [B, G, Hkv*d]``, ``num_heads = Hkv``, not causal): the same
  grouping as ``decomp``, no copy of the cache. Rows after ``pos`` are hidden by ``key_padding_mask =
  pos + 1`` (int32 ``[B]``: right padding) or an additive ``attention_bias [1,1,G,Lmax]``
  (``mha_bias``). After the ScatterND write.

Per case and candidate: the output's max abs error over the largest reference value (``max_rel``)
against torch fp32 attention over rows ``0..pos`` of the same bf16 data, the ONNX nodes ORT did not
place on the CUDA EP (its profiler; a Memcpy or CPU node breaks CUDA graphs), whether the buffers
kept their values (``buffers_intact``: the row written in place is the row they already held), and
the time per call: ``uncaptured_us`` (``run_with_iobinding`` N times, then a synchronize; wall
time, ORT's own per-run synchronization included), ``graph_us`` (the same, replayed from a CUDA
graph: a second session with ``enable_cuda_graph = 1`` and the same bindings; ORT captures on an
early run, later runs replay; its output is checked too, ``graph_max_rel``) and ``gpu_us``: the
device time of the kernels one uncaptured call launched (torch's CUPTI profiler, which sees ORT's
kernels; ``kernels`` names the largest), what the call costs inside a whole captured step.
``bytes`` is what the step needs to read: ``(pos + 1) * Hkv * d * 2 bytes * 2 (K and V) * B``;
``*_frac`` is ``bytes / time`` over the device copy bandwidth measured here (torch ``copy_`` of
1 GiB, bytes read + written per second, as the other benchmarks' roofline). Cases whose K/V
(``Lmax`` rows) fit the 50 MB L2 are marked ``l2``: their calls re-read data the previous call left
in L2, so ``frac`` can pass 1.

Section ``consumer`` (``--candidates`` names its ``consumer_*`` like the sweep's; all three by default,
measured after the copy bandwidth and before the sweep, in the sweep's worker): the KV-sharing
*consumer* layers of Gemma 4 E2B, which read a sliding-window cache an earlier *producer* layer
wrote in the same step. Shapes (:data:`CONSUMER_SHAPES`): Hq 8, Hkv 1, d 256, W 512, bf16, B as
``--batches``, one decode token at p = 100 (window not full) and p = 4095 (full, evicting); smoke: Hq
4, Hkv 1, d 32, W 16, p 5 and 40. Each is checked against torch fp32 attention over positions
``p-W+1..p`` (those >= 0) and timed as the sweep's candidates; ``nodes`` / ``node_types``: the
candidate graph's nodes (every candidate, the sweep's too). The K / V rows that hold no position are
random (:class:`ConsumerCase`), and ``buffers_intact`` checks that no candidate wrote the producer's
cache.

* ``consumer_decomp``: the exporter's own ``ort`` lowering of ``attention_read(..., ring=True,
  window=W)`` over the producer's slot ring (``slot_rings``, as ``export_step`` lowers the rings
  consumers read: slot ``t mod W`` holds position t): the decomposition the step runs today.
* ``consumer_gqa_unshared``: GroupQueryAttention with ``sliding_window_cache = 1``,
  ``local_window_size = W`` over the producer's *pre-step* window (rows ``[0, L)`` = positions
  ``p-L..p-1``) plus the step's new K / V row, ``seqlens_k = p``, ``total_sequence_length = p + 1``,
  its presents not bound to the past (no graph outputs: ORT allocates and drops them): the consumer
  redoes the producer's window update in scratch memory. Whether ORT's CUDA kernel accepts a
  windowed cache whose present is not its past (capacity == W) is part of the result.
* ``consumer_mha_window``: MultiHeadAttention over the producer's *post-step* window (rows ``[0, L)``
  = positions ``p-L+1..p``, ``L = min(p + 1, W)``), the 8 query heads folded into the query sequence
  (``num_heads = 1``, ``query [B, 8, 256]``: a binding of q's memory), ``key_padding_mask = L``,
  not causal. Exact for one-token steps only.

``seqlens_k``, ``total`` and ``key_padding_mask`` are graph inputs (a step computes them once,
shared with the producer), so the node counts are the consumer's own.

Section ``gqa_check``: the GroupQueryAttention shared-buffer case that failed on the GPU
(``tests/test_kv_buffer.py::test_bf16_buffer_on_cuda_in_place[gqa]``: Hq 4, Hkv 2, d 64, B 2, a
16-row random bf16 buffer, pos 11, scale 0.3, ``seqlens_k = pos``, ``total_sequence_length`` =
capacity as the exporter emits it; max rel 1.50 against < 2e-2) rebuilt standalone, then variants
that each change one condition: the capacity (16 / 64 / 4096), pos at the last row or 0, zero rows
after pos, ``total_sequence_length = pos + 1`` (``seqlens_k = total - 1``) or bound on the device,
B 1, ``do_rotary``, fp16, d 128, present not bound to the past (ORT allocates it: no shared-buffer
fast path), ORT's kernel switches one at a time (``knob_*``: XQA off, flash fast-decode off, cuDNN
SDPA's SM90 auto-preference off, all three, ``sdpa_kernel`` pinned to flash / efficient / cuDNN /
math), and the exporter's own lowering of the test (``exporter_graph``, where effexport imports).
Each records ``max_rel`` against torch, whether the row landed at ``pos`` and the other rows stayed,
and ``kernel_info``: the kernel ORT says it chose (``ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO=1``,
its C++ stdout captured).

The measurements run in worker processes: the check, then the copy bandwidth, the consumer section
and the sweep, then ``exporter_graph``, one process each (ORT's switches and debug output, and
whatever the failing case does to the CUDA context, stay out of the sweep); a worker that dies (a sticky CUDA error) is
restarted on the items left, the item it died in recorded as its error. ``--budget-s`` stops the worker before
its next item once the time is spent (the items left are recorded as skipped) and the parent kills
it a few seconds after. ``ort_attention.json`` (and ``.md``) in ``--out`` are rewritten after every
item.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CANDIDATES = ("decomp", "attn24", "attn24_bool", "attn24_add", "attn24_3d", "attn24_fold", "attn24_fold_bool",
              "attn24_fold_add", "mha", "mha_bias", "gqa", "gqa_cap")
EXTRA = ("attn23_bool",)  # by --candidates only
CONSUMER_CANDIDATES = ("consumer_decomp", "consumer_gqa_unshared", "consumer_mha_window")  # section ``consumer``
# the consumer section's shapes: Gemma 4 E2B's sliding layers (GPU), a small stand-in on the CPU (smoke)
CONSUMER_SHAPES = {"cuda": dict(hq=8, hkv=1, d=256, window=512, positions=(100, 4095)),
                   "smoke": dict(hq=4, hkv=1, d=32, window=16, positions=(5, 40))}
L2_BYTES = 50 << 20  # H100 / H200 L2
NEG = -1e30  # the additive masks' "hidden" (finite: no -inf arithmetic in the kernels)
FLOAT, FLOAT16, BFLOAT16, INT32, INT64 = 1, 10, 16, 6, 7  # onnx.TensorProto element types
GRACE_S = 8.0  # the parent kills a worker this long after the budget is spent
KNOBS = {  # ORT's attention-kernel switches: a candidate "gqa+sdpa_flash" runs gqa with that one
    "no_xqa": {"env": {"ORT_ENABLE_XQA": "0"}},  # GQA's XQA decode kernel (fp16 / bf16, on by default)
    "no_flash_decode": {"env": {"ORT_DISABLE_FLASH_DECODE": "1"}},  # GQA's flash fast-decode (shared buffer)
    "no_cudnn_auto": {"env": {"ORT_ENABLE_CUDNN_FLASH_ATTENTION": "0"}},  # cuDNN SDPA, auto-preferred on SM >= 90
    "no_fast_paths": {"env": {"ORT_ENABLE_XQA": "0", "ORT_DISABLE_FLASH_DECODE": "1",
                              "ORT_ENABLE_CUDNN_FLASH_ATTENTION": "0"}},
    "sdpa_flash": {"sdpa_kernel": "1"},  # the CUDA EP's sdpa_kernel bitmask pins the kernels (no cuDNN auto)
    "sdpa_efficient": {"sdpa_kernel": "2"},
    "sdpa_cudnn": {"sdpa_kernel": "8"},
    "sdpa_math": {"sdpa_kernel": "16"},
}


def split_candidate(name: str) -> tuple[str, str | None]:
    """``"gqa+sdpa_flash"`` -> ``("gqa", "sdpa_flash")``."""
    base, _, knob = name.partition("+")
    return base, knob or None


# ---------------------------------------------------------------------------------- arguments
def contexts(text: str) -> list[tuple[int, int]]:
    """``"32768:4095,4096"`` -> ``[(32768, 4095), (4096, 4095)]`` (buffer rows, position)."""
    out = []
    for part in filter(None, text.split(",")):
        rows, _, pos = part.partition(":")
        out.append((int(rows), int(pos) if pos else int(rows) - 1))
    for rows, pos in out:
        if not 0 <= pos < rows:
            raise argparse.ArgumentTypeError(f"position {pos} outside a buffer of {rows} rows")
    return out


def ints(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]`` (``_common.ints``, without importing torch in the parent)."""
    return [int(x) for x in text.split(",") if x]


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    ap.add_argument("--contexts", type=contexts, default=None,
                    help="Lmax:pos pairs (default 32768:4095,32768:32767,4096:4095; smoke 64:20,64:63)")
    ap.add_argument("--batches", type=ints, default=None, help="default 8,1: B 8 first (smoke 1,2)")
    ap.add_argument("--heads", type=ints, default=None, help="head sizes (default 512,256; smoke 64,32)")
    ap.add_argument("--q-heads", type=int, default=None, help="query heads (default 8; smoke 4)")
    ap.add_argument("--kv-heads", type=int, default=None, help="KV heads (default 1; smoke 2)")
    ap.add_argument("--candidates", default=",".join(CANDIDATES + CONSUMER_CANDIDATES),
                    help="sweep candidates (each optionally +KNOB) and the consumer section's consumer_*")
    ap.add_argument("--no-write", action="store_true", help="drop the ScatterND write of the non-GQA candidates")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--no-check", action="store_true", help="skip the gqa_check section")
    ap.add_argument("--check-only", action="store_true", help="the gqa_check section alone")
    ap.add_argument("--no-kernels", action="store_true", help="skip the CUDA kernel times (torch's CUPTI profiler)")
    ap.add_argument("--target-ms", type=float, default=None, help="time of each timing (3 loops; default 30; smoke 10)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop cleanly after this long (default 130; smoke 240)")
    ap.add_argument("--smoke", action="store_true", help="CPU EP, fp32, small shapes (a CPU-only machine)")
    ap.add_argument("--inline", action="store_true", help="measure in this process (no worker; debugging)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the items file of a worker
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # time.time() to stop at
    args = ap.parse_args(argv)
    smoke = args.smoke
    defaults = dict(contexts=[(64, 20), (64, 63)] if smoke else [(32768, 4095), (32768, 32767), (4096, 4095)],
                    batches=[1, 2] if smoke else [8, 1], heads=[64, 32] if smoke else [512, 256],
                    q_heads=4 if smoke else 8, kv_heads=2 if smoke else 1, target_ms=10.0 if smoke else 30.0,
                    budget_s=240.0 if smoke else 130.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.candidates = [c for c in args.candidates.split(",") if c]
    unknown = {c for c in args.candidates if c not in CONSUMER_CANDIDATES and (
        split_candidate(c)[0] not in CANDIDATES + EXTRA or split_candidate(c)[1] not in (None, *KNOBS))}
    if unknown:
        ap.error(f"unknown candidates {sorted(unknown)}; known: {', '.join(CANDIDATES + EXTRA)}, each optionally "
                 f"+KNOB, KNOB one of {', '.join(KNOBS)}; {', '.join(CONSUMER_CANDIDATES)}")
    if args.q_heads % args.kv_heads:
        ap.error("--q-heads must be a multiple of --kv-heads")
    return args


def plan_items(args) -> list[list[dict]]:
    """Every measurement of the run, in order, in groups that run in separate worker processes (so
    ORT's attention switches and debug output the check sets cannot reach the sweep's sessions, and
    a context the failing case might corrupt is not the sweep's): the GQA check (its plain variants,
    then the kernel switches), the copy bandwidth, the consumer section (its positions, batches and
    candidates) and the sweep (head sizes as given, the first one first), then the check's ``exporter_graph`` (a torch.export: seconds of CPU, and the standalone
    ``test_case`` is its graph)."""
    checks = [] if args.no_check else [{"kind": "gqa_check", "variant": name} for name in CHECK_VARIANTS]
    last = [c for c in checks if c["variant"] == "exporter_graph"]
    checks = [c for c in checks if c not in last]
    sweep = [] if args.check_only else [{"kind": "copy_bw"}]
    consumers = [c for c in args.candidates if c in CONSUMER_CANDIDATES]
    shape = CONSUMER_SHAPES["smoke" if args.smoke else "cuda"]
    for pos in [] if args.check_only or not consumers else shape["positions"]:  # before the sweep: the
        for batch in args.batches:  # budget may run out in the sweep's long tail, not here
            for cand in consumers:
                sweep.append({"kind": "consumer", **{k: shape[k] for k in ("d", "hq", "hkv", "window")},
                              "pos": pos, "batch": batch, "candidate": cand})
    for d in [] if args.check_only else args.heads:
        for rows, pos in args.contexts:
            for batch in args.batches:
                for cand in [c for c in args.candidates if c not in CONSUMER_CANDIDATES]:
                    sweep.append({"kind": "sweep", "d": d, "hq": args.q_heads, "hkv": args.kv_heads, "rows": rows,
                                  "pos": pos, "batch": batch, "candidate": cand})
    return [group for group in (checks, sweep, last) if group]


def item_key(item: dict) -> str:
    return "/".join(f"{k}={item[k]}" for k in sorted(item))


# ------------------------------------------------------------------------------------ devices
class Env:
    """The device of a worker: ``cuda`` (bf16, CUDA graphs) or ``cpu`` (the smoke test: fp32)."""

    def __init__(self, smoke: bool):
        import torch  # before onnxruntime, as bench/ort_graphs.py: torch's CUDA libraries first

        import onnxruntime as ort

        if not smoke and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # onnxruntime-gpu: CUDA / cuDNN from the pip wheels torch brought
        self.ort, self.torch = ort, torch
        self.cuda = not smoke
        self.no_profiler = False  # set when torch's CUPTI profiler failed once
        if self.cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"no CUDAExecutionProvider in onnxruntime {ort.__version__} "
                               f"({ort.get_available_providers()}); PYTHONPATH=/tmp/ortgpu? (--smoke for the CPU)")
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.onnx_type = {torch.float32: FLOAT, torch.float16: FLOAT16, torch.bfloat16: BFLOAT16}

    def meta(self) -> dict:
        torch = self.torch
        return {"onnxruntime": self.ort.__version__, "torch": torch.__version__,
                "providers": self.ort.get_available_providers(), "ep": self.provider_name(),
                "device": torch.cuda.get_device_name() if self.cuda else "cpu", "dtype": str(self.dtype)}

    def provider_name(self) -> str:
        return "CUDAExecutionProvider" if self.cuda else "CPUExecutionProvider"

    def session(self, model, graph: bool = False, profile_dir: str | None = None, knob: str | None = None):
        """A session of ``model`` on the device's EP (``graph``: CUDA graphs on; ``knob``: one of
        :data:`KNOBS`, environment variables set while the session and its kernels are made)."""
        knob = KNOBS.get(knob, {}) if knob else {}
        with environment(knob.get("env", {})):
            return self._session(model, graph, profile_dir, {k: v for k, v in knob.items() if k != "env"})

    def _session(self, model, graph: bool, profile_dir: str | None, cuda_options: dict):
        opts = self.ort.SessionOptions()
        opts.log_severity_level = 3
        if profile_dir:
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(profile_dir, "p")
        if self.cuda:
            options = {**cuda_options, **({"enable_cuda_graph": "1"} if graph else {})}
            providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        session = self.ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        if self.cuda and session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"the session fell back to {session.get_providers()}")
        return session

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def bind(self, bind, name: str, tensor) -> None:
        """``bind_input`` / ``bind_output`` of ``name`` to a torch tensor's memory."""
        torch = self.torch
        elem = {torch.float32: FLOAT, torch.float16: FLOAT16, torch.bfloat16: BFLOAT16, torch.int64: INT64,
                torch.int32: INT32}[tensor.dtype]
        assert tensor.is_contiguous(), name
        bind(name, tensor.device.type, tensor.device.index or 0, elem, list(tensor.shape), tensor.data_ptr())

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()


@contextlib.contextmanager
def environment(variables: dict):
    """``os.environ`` updated by ``variables`` inside (ORT reads its attention switches when a session
    makes its kernels), restored after."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def captured_stdout(sink: list):
    """What the process writes to file descriptor 1 inside (ORT's C++ ``std::cout``: the kernel
    choice ``ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO=1`` prints) appended to ``sink`` as one string."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))


def copy_bandwidth(env: Env) -> dict:
    """Bytes read + written per second of a 1 GiB device copy (torch ``copy_``, best of 3 loops of 10;
    the roofline's denominator, as ``_common.copy_bandwidth``); None on the CPU."""
    if not env.cuda:
        return {"copy_bw": None}
    torch = env.torch
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    for _ in range(5):
        y.copy_(x)
    best = math.inf
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            y.copy_(x)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / 10)
    nbytes = 2 * x.numel() * x.element_size()
    del x, y
    env.free()
    return {"copy_bw": nbytes / best, "copy_bytes": nbytes}


# ------------------------------------------------------------------------------------- graphs
class Graph:
    """A small onnx.helper graph under construction."""

    def __init__(self, dtype: int):
        self.dtype, self.nodes, self.inits, self.inputs, self.outputs, self.n = dtype, [], [], [], [], 0

    def name(self, stem: str) -> str:
        self.n += 1
        return f"{stem}_{self.n}"

    def input(self, name: str, elem: int, shape) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def output(self, name: str, elem: int, shape) -> None:
        from onnx import helper

        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))

    def const(self, values, elem: int = INT64, shape=None, stem: str = "c") -> str:
        from onnx import helper

        values = np.asarray(values)
        name = self.name(stem)
        dims = list(values.shape) if shape is None else list(shape)
        flat = values.reshape(-1).tolist()
        self.inits.append(helper.make_tensor(name, elem, dims, flat))
        return name

    def fconst(self, value: float, elem: int | None = None) -> str:
        """A 0-d float constant of ``elem`` (default: the graph's dtype)."""
        return self.const(np.array(value, dtype=np.float64), self.dtype if elem is None else elem, [])

    def op(self, op_type: str, *inputs, outputs: int = 1, domain: str = "", out=None, **attrs):
        from onnx import helper

        names = list(out) if out else [self.name(op_type.lower()) for _ in range(outputs)]
        inputs = list(inputs)
        while inputs and inputs[-1] is None:  # trailing optional inputs left out
            inputs.pop()
        self.nodes.append(helper.make_node(op_type, [i if i is not None else "" for i in inputs], names,
                                           domain=domain or None, **attrs))
        return names[0] if outputs == 1 else names

    def model(self, opset: int = 18, ms: bool = False):
        from onnx import helper

        graph = helper.make_graph(self.nodes, "attention", self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
        ir = max(8, helper.find_min_ir_version_for(opsets[:1]))
        return helper.make_model(graph, opset_imports=opsets, ir_version=ir, producer_name="ort_attention")


def shapes(s: dict, layout: str = "bnsh") -> dict:
    """The shapes a candidate's graph declares for q / out, k_new / v_new and the buffers.

    ``bnsh``: the step's own ``[B, Hq, 1, d]`` / ``[B, Hkv, 1, d]`` / ``[B, Hkv, Lmax, d]``. ``fold``:
    the ``G = Hq / Hkv`` query heads of a KV head as its query rows, ``[B, Hkv, G, d]`` (the same
    memory as ``[B, Hq, 1, d]`` at T = 1). ``bsnh``: 3-D ``[B, 1, Hq*d]`` / ``[B, 1, Hkv*d]`` /
    ``[B, Lmax, Hkv*d]`` (a cache kept sequence-major: the same memory as the BNSH buffer when
    Hkv = 1, a copy of it otherwise). A layout is a binding of the same device memory under another
    shape, not a node: the exporter would declare its graph inputs that way."""
    B, hq, hkv, L, d = s["batch"], s["hq"], s["hkv"], s["rows"], s["d"]
    if layout == "bsnh":
        return {"q": [B, 1, hq * d], "new": [B, 1, hkv * d], "buf": [B, L, hkv * d]}
    q = [B, hkv, hq // hkv, d] if layout == "fold" else [B, hq, 1, d]
    return {"q": q, "new": [B, hkv, 1, d], "buf": [B, hkv, L, d]}


def _common_inputs(g: Graph, s: dict, layout: str = "bnsh") -> dict:
    """q, k_new, v_new, k_buf, v_buf (shaped by ``layout``), pos (device int64 scalar) as graph inputs."""
    shape = shapes(s, layout)
    return {"q": g.input("q", g.dtype, shape["q"]), "k_new": g.input("k_new", g.dtype, shape["new"]),
            "v_new": g.input("v_new", g.dtype, shape["new"]), "k_buf": g.input("k_buf", g.dtype, shape["buf"]),
            "v_buf": g.input("v_buf", g.dtype, shape["buf"]), "pos": g.input("pos", INT64, [])}


def _write(g: Graph, s: dict, x: dict, write: bool, layout: str = "bnsh") -> tuple[str, str]:
    """The exporter's ``_buffer_written``: one ScatterND per buffer at ``(b, h, pos)`` (``(b, pos)``
    for a ``bsnh`` buffer; outputs ``k_out`` / ``v_out``, bound to the buffers' memory: ORT writes in
    place); without ``write`` the buffers pass through Identity (outputs still bound to that memory)."""
    B, hkv = s["batch"], s["hkv"]
    if not write:
        return (g.op("Identity", x["k_buf"], out=["k_out"]), g.op("Identity", x["v_buf"], out=["v_out"]))
    if layout == "bsnh":
        batch = g.const(np.arange(B).reshape(B, 1, 1))
        row = g.op("Add", x["pos"], g.const(np.zeros((B, 1, 1), dtype=np.int64)))  # [B, 1, 1]
        index = g.op("Concat", batch, row, axis=-1)  # [B, 1, 2]
    else:
        batch = g.const(np.broadcast_to(np.arange(B).reshape(B, 1, 1, 1), (B, hkv, 1, 1)))
        head = g.const(np.broadcast_to(np.arange(hkv).reshape(1, hkv, 1, 1), (B, hkv, 1, 1)))
        row = g.op("Add", x["pos"], g.const(np.zeros((B, hkv, 1, 1), dtype=np.int64)))  # [B, Hkv, 1, 1]
        index = g.op("Concat", batch, head, row, axis=-1)  # [B, Hkv, 1, 3]
    return (g.op("ScatterND", x["k_buf"], index, x["k_new"], out=["k_out"]),
            g.op("ScatterND", x["v_buf"], index, x["v_new"], out=["v_out"]))


def _outputs(g: Graph, s: dict, layout: str = "bnsh") -> None:
    """``out`` and the buffers' ``k_out`` / ``v_out`` (written by the nodes under those names)."""
    shape = shapes(s, layout)
    g.output("out", g.dtype, shape["q"])
    g.output("k_out", g.dtype, shape["buf"])
    g.output("v_out", g.dtype, shape["buf"])


def _keys_visible(g: Graph, s: dict, x: dict, q_rows: int = 1) -> str:
    """bool ``[1, 1, q_rows, Lmax]``: rows ``<= pos`` (ORT wants the mask's query dimension equal to
    the query length, not broadcast; constants as initializers: no Reshape / Cast, whose opset-24
    versions a CUDA EP may lack)."""
    rows = g.const(np.arange(s["rows"]).reshape(1, 1, 1, -1))
    visible = g.op("Less", rows, g.op("Add", x["pos"], g.const(1, shape=[])))
    return visible if q_rows == 1 else g.op("Expand", visible, g.const([1, 1, q_rows, s["rows"]]))


def build_decomp(s: dict, dtype: int, write: bool = True):
    """``attend_decomposed`` over the whole buffer with ``_build.visible``'s mask, after the write."""
    g = Graph(dtype)
    x = _common_inputs(g, s)
    hq, hkv, L, d, scale = s["hq"], s["hkv"], s["rows"], s["d"], s["scale"]
    groups = hq // hkv
    k, v = _write(g, s, x, write)
    qg = g.op("Reshape", x["q"], g.const([0, hkv, -1, d]))  # [B, Hkv, G*T, d]
    scores = g.op("MatMul", qg, g.op("Transpose", k, perm=[0, 1, 3, 2]))  # [B, Hkv, G*T, L] in q's dtype
    if dtype != FLOAT:
        scores = g.op("Cast", scores, to=FLOAT)
    scores = g.op("Mul", scores, g.fconst(scale, FLOAT))
    scores = g.op("Reshape", scores, g.const([0, hkv, groups, -1, L]))  # [B, Hkv, G, T, L]
    # _build.positions / visible: q_pos = Range(0, T) + pos, k_pos = Range(0, L), mask = q - k >= 0
    q_pos = g.op("Add", g.op("Range", g.const(0, shape=[]), g.const(1, shape=[]), g.const(1, shape=[])), x["pos"])
    k_pos = g.op("Range", g.const(0, shape=[]), g.const(L, shape=[]), g.const(1, shape=[]))
    diff = g.op("Sub", g.op("Unsqueeze", q_pos, g.const([1])), g.op("Unsqueeze", k_pos, g.const([0])))
    mask = g.op("GreaterOrEqual", diff, g.const(0, shape=[]))  # [T, L]
    scores = g.op("Where", mask, scores, g.fconst(-math.inf, FLOAT))
    probs = g.op("Softmax", scores, axis=-1)
    probs = g.op("Reshape", probs, g.const([0, hkv, -1, L]))  # [B, Hkv, G*T, L]
    if dtype != FLOAT:
        probs = g.op("Cast", probs, to=dtype)
    out = g.op("MatMul", probs, v)  # [B, Hkv, G*T, d]
    g.op("Reshape", out, g.const([0, hq, -1, d]), out=["out"])
    _outputs(g, s)
    return g.model(18)


def build_gqa(s: dict, dtype: int, rotary: bool = False, max_pos: int = 0):
    """``com.microsoft.GroupQueryAttention`` over the shared buffer: the exporter's ``attend_gqa``
    (``_heads_last`` layouts) with ``seqlens_k = pos`` from the device ``pos`` and
    ``total_sequence_length`` an int32 CPU graph input; ``rotary`` adds ``do_rotary`` with cos / sin
    caches of ``max_pos`` rows as graph inputs."""
    g = Graph(dtype)
    x = _common_inputs(g, s)
    B, hq, hkv, d = s["batch"], s["hq"], s["hkv"], s["d"]
    total = g.input("total", INT32, [])
    cos = sin = None
    if rotary:
        cos, sin = g.input("cos_cache", dtype, [max_pos, d // 2]), g.input("sin_cache", dtype, [max_pos, d // 2])

    def heads_last(t):  # [B, H, T, d] -> [B, T, H*d]
        return g.op("Reshape", g.op("Transpose", t, perm=[0, 2, 1, 3]), g.const([0, 0, -1]))

    seqlens = g.op("Cast", g.op("Expand", g.op("Reshape", x["pos"], g.const([1])), g.const([B])), to=INT32)
    out = g.op("GroupQueryAttention", heads_last(x["q"]), heads_last(x["k_new"]), heads_last(x["v_new"]),
               x["k_buf"], x["v_buf"], seqlens, total, cos, sin, domain="com.microsoft", outputs=3,
               out=[g.name("gqa_out"), "k_out", "v_out"], num_heads=hq, kv_num_heads=hkv, scale=float(s["scale"]),
               **({"do_rotary": 1} if rotary else {}))[0]
    g.op("Transpose", g.op("Reshape", out, g.const([0, 0, hq, d])), perm=[0, 2, 1, 3], out=["out"])
    _outputs(g, s)
    return g.model(18, ms=True)


def build_attention(s: dict, dtype: int, mask: str = "nonpad", write: bool = True, opset: int = 24,
                    layout: str = "bnsh"):
    """ai.onnx ``Attention`` (opset 24, or 23 without ``nonpad_kv_seqlen``) with the buffer as K / V
    (in ``layout``: :func:`shapes`); rows after ``pos`` hidden by ``nonpad_kv_seqlen`` or a bool /
    additive ``attn_mask [1, 1, 1, Lmax]``. 3-D inputs carry ``q_num_heads`` / ``kv_num_heads``."""
    g = Graph(dtype)
    x = _common_inputs(g, s, layout)
    k, v = _write(g, s, x, write, layout)
    attn_mask = nonpad = None
    if mask == "nonpad":
        nonpad = g.op("Expand", g.op("Add", x["pos"], g.const(1, shape=[])), g.const([s["batch"]]))  # int64 [B]
    else:
        attn_mask = _keys_visible(g, s, x, shapes(s, layout)["q"][2] if layout != "bsnh" else 1)  # [1,1,Tq,L]
        if mask == "add":
            attn_mask = g.op("Where", attn_mask, g.fconst(0.0), g.fconst(NEG))
    heads = {"q_num_heads": s["hq"], "kv_num_heads": s["hkv"]} if layout == "bsnh" else {}
    g.op("Attention", x["q"], k, v, attn_mask, None, None, nonpad, out=["out"], is_causal=0,
         scale=float(s["scale"]), **heads)
    _outputs(g, s, layout)
    return g.model(opset)


def build_mha(s: dict, dtype: int, bias: bool = False, write: bool = True):
    """``com.microsoft.MultiHeadAttention`` with the buffer as BNSH key / value, the G query heads of
    each KV head in the query sequence (``num_heads = Hkv``, not causal); ``key_padding_mask = pos + 1``
    per batch row, or an additive ``attention_bias [1, 1, G, L]``."""
    g = Graph(dtype)
    x = _common_inputs(g, s)
    B, hq, hkv, d = s["batch"], s["hq"], s["hkv"], s["d"]
    groups = hq // hkv
    k, v = _write(g, s, x, write)
    query = g.op("Reshape", g.op("Transpose", g.op("Reshape", x["q"], g.const([B, hkv, groups, d])), perm=[0, 2, 1, 3]),
                 g.const([B, groups, hkv * d]))  # [B, G, Hkv*d]
    padding = attention_bias = None
    if bias:
        visible = _keys_visible(g, s, x, groups)  # [1, 1, G, L]
        attention_bias = g.op("Where", visible, g.fconst(0.0), g.fconst(NEG))
    else:
        padding = g.op("Cast", g.op("Expand", g.op("Add", x["pos"], g.const(1, shape=[])), g.const([B])), to=INT32)
    out = g.op("MultiHeadAttention", query, k, v, None, padding, attention_bias, domain="com.microsoft",
               num_heads=hkv, scale=float(s["scale"]), unidirectional=0)  # [B, G, Hkv*d]
    out = g.op("Transpose", g.op("Reshape", out, g.const([B, groups, hkv, d])), perm=[0, 2, 1, 3])
    g.op("Reshape", out, g.const([B, hq, 1, d]), out=["out"])
    _outputs(g, s)
    return g.model(18, ms=True)


def layout_of(candidate: str) -> str:
    return "bsnh" if candidate == "attn24_3d" else "fold" if candidate.startswith("attn24_fold") else "bnsh"


def build(candidate: str, s: dict, dtype: int, write: bool):
    if candidate == "decomp":
        return build_decomp(s, dtype, write)
    if candidate in ("gqa", "gqa_cap"):
        return build_gqa(s, dtype)
    if candidate == "attn23_bool":
        return build_attention(s, dtype, "bool", write, opset=23)
    if candidate.startswith("attn24"):
        mask = "nonpad" if candidate in ("attn24", "attn24_3d", "attn24_fold") else candidate.rsplit("_", 1)[1]
        return build_attention(s, dtype, mask, write, layout=layout_of(candidate))
    if candidate.startswith("mha"):
        return build_mha(s, dtype, candidate == "mha_bias", write)
    raise ValueError(candidate)


# ------------------------------------------------------------------------- the consumer section
def _consumer_inputs(g: Graph, s: dict, layout: str = "bnsh") -> dict:
    """q ``[B, Hq, 1, d]`` (``fold``: ``[B, G, Hkv*d]``) and the K / V window ``[B, Hkv, W, d]``."""
    B, hq, hkv, d, W = s["batch"], s["hq"], s["hkv"], s["d"], s["window"]
    q = [B, hq // hkv, hkv * d] if layout == "fold" else [B, hq, 1, d]
    return {"q": g.input("q", g.dtype, q), "k_win": g.input("k_win", g.dtype, [B, hkv, W, d]),
            "v_win": g.input("v_win", g.dtype, [B, hkv, W, d])}


def build_consumer_gqa(s: dict, dtype: int):
    """``consumer_gqa_unshared``: ``com.microsoft.GroupQueryAttention`` with ``sliding_window_cache = 1``,
    ``local_window_size = W`` over the producer's *pre-step* window (``k_win``: rows ``[0, L)`` =
    positions ``p-L..p-1``, ``L = min(p, W)``, GQA's windowed layout), the step's new K / V row
    (``k_new / v_new``: the row the producer appended), ``seqlens_k = p`` (int32 ``[B]``, a device
    input: the producer's), ``total_sequence_length = p + 1`` (int32 CPU input). The presents are no
    graph outputs (ORT allocates them and they are dropped): the consumer redoes the producer's window
    update in scratch memory and attends. ORT's CUDA kernel may refuse a windowed cache whose present
    is not its past (the error string is the result)."""
    g = Graph(dtype)
    x = _consumer_inputs(g, s)
    B, hq, hkv, d, W = s["batch"], s["hq"], s["hkv"], s["d"], s["window"]
    k_new, v_new = g.input("k_new", dtype, [B, hkv, 1, d]), g.input("v_new", dtype, [B, hkv, 1, d])
    seqlens, total = g.input("seqlens_k", INT32, [B]), g.input("total", INT32, [])

    def heads_last(t):  # [B, H, T, d] -> [B, T, H*d]
        return g.op("Reshape", g.op("Transpose", t, perm=[0, 2, 1, 3]), g.const([0, 0, -1]))

    out = g.op("GroupQueryAttention", heads_last(x["q"]), heads_last(k_new), heads_last(v_new), x["k_win"],
               x["v_win"], seqlens, total, domain="com.microsoft", outputs=3, num_heads=hq, kv_num_heads=hkv,
               scale=float(s["scale"]), local_window_size=W, sliding_window_cache=1)[0]
    g.op("Transpose", g.op("Reshape", out, g.const([0, 0, hq, d])), perm=[0, 2, 1, 3], out=["out"])
    g.output("out", dtype, [B, hq, 1, d])
    return g.model(18, ms=True)


def build_consumer_mha(s: dict, dtype: int):
    """``consumer_mha_window``: ``com.microsoft.MultiHeadAttention`` over the producer's *post-step*
    window (``k_win``: rows ``[0, L)`` = positions ``p-L+1..p``, ``L = min(p + 1, W)``) as BNSH key /
    value, the G query heads of a KV head folded into its query sequence (``query [B, G, Hkv*d]``,
    ``num_heads = Hkv``: Gemma 4's ``[B, 8, 256]`` with one head), ``key_padding_mask = L`` per batch
    row (int32 ``[B]``, right padding, a device input), not causal. With Hkv = 1 the fold is the
    memory of ``q [B, Hq, 1, d]`` bound under another shape (no node: the graph is the one
    MultiHeadAttention); more KV heads need a Transpose in and out (as ``mha``).

    Valid for one-token steps only: with T > 1 the earlier queries of a chunk would see the later
    keys (no causal mask inside the window), and the window has already dropped the oldest positions
    they still need."""
    g = Graph(dtype)
    B, hq, hkv, d = s["batch"], s["hq"], s["hkv"], s["d"]
    groups = hq // hkv
    x = _consumer_inputs(g, s, "fold" if hkv == 1 else "bnsh")
    query = x["q"]
    if hkv > 1:  # [B, Hq, 1, d] -> [B, G, Hkv*d]
        query = g.op("Reshape", g.op("Transpose", g.op("Reshape", query, g.const([B, hkv, groups, d])),
                                     perm=[0, 2, 1, 3]), g.const([B, groups, hkv * d]))
    padding = g.input("key_padding_mask", INT32, [B])
    out = g.op("MultiHeadAttention", query, x["k_win"], x["v_win"], None, padding, domain="com.microsoft",
               out=["out"] if hkv == 1 else None, num_heads=hkv, scale=float(s["scale"]), unidirectional=0)
    if hkv > 1:
        out = g.op("Transpose", g.op("Reshape", out, g.const([B, groups, hkv, d])), perm=[0, 2, 1, 3])
        g.op("Reshape", out, g.const([B, hq, 1, d]), out=["out"])
    g.output("out", dtype, [B, groups, d] if hkv == 1 else [B, hq, 1, d])
    return g.model(18, ms=True)


_LOWERED: dict = {}  # the exporter's consumer graphs of this worker, by shape and dtype (batch dynamic)


def build_consumer_decomp(torch, s: dict, dtype):
    """``consumer_decomp``: effexport's ``ort`` lowering of a KV-sharing consumer's read of the
    producer's slot ring: ``attention_read(q, k_cache, v_cache, pos, ring=True, window=W)`` with the
    caches named in :func:`slot_rings` (as ``export_step`` names the rings consumers read: slot
    ``p mod W`` holds the newest position ``<= p`` with that residue), batch dynamic. Graph inputs
    ``q``, ``k_cache``, ``v_cache``, ``pos`` (device int64), output ``attention_read``. One
    torch.export per worker (seconds of CPU)."""
    key = (s["hq"], s["hkv"], s["d"], s["window"], s["scale"], str(dtype))
    if key in _LOWERED:
        return _LOWERED[key]
    import effexport.custom_ops  # noqa: F401  (registers the ops)
    from effexport.exporter.backends.onnx.attention import slot_rings
    from effexport.exporter.backends.onnx.export import lower

    ops = torch.ops.effexport
    W = s["window"]

    class Read(torch.nn.Module):
        def forward(self, q, k_cache, v_cache, pos):
            return ops.attention_read(q, k_cache, v_cache, pos, None, scale=s["scale"], window=W, ring=True)

    args = (torch.zeros(2, s["hq"], 1, s["d"], dtype=dtype), torch.zeros(2, s["hkv"], W, s["d"], dtype=dtype),
            torch.zeros(2, s["hkv"], W, s["d"], dtype=dtype), torch.tensor(W - 1))
    bt = {0: torch.export.Dim("batch")}
    with slot_rings({"k_cache", "v_cache"}):
        _LOWERED[key] = lower(Read(), args, "ort", dynamic_shapes=(bt, bt, bt, None))
    return _LOWERED[key]


# ------------------------------------------------------------------------------- reference
def reference(torch, q, k, v, scale: float, rows: int):
    """fp32 attention of the one-token queries ``q [B, Hq, 1, d]`` over rows ``0..rows-1`` of
    ``k / v [B, Hkv, S, d]`` (query head h reads KV head h // (Hq / Hkv)) -> fp32 ``[B, Hq, 1, d]``."""
    B, hq, _, d = q.shape
    hkv = k.shape[1]
    qg = q.float().reshape(B, hkv, hq // hkv, d)
    kf, vf = k[:, :, :rows].float(), v[:, :, :rows].float()
    probs = torch.softmax(qg @ kf.transpose(-1, -2) * scale, dim=-1)
    return (probs @ vf).reshape(B, hq, 1, -1)


def max_rel(torch, got, want) -> float:
    """max |got - want| / max |want| (NaN when ``got`` has one)."""
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def finite(x):
    return x if x is None or math.isfinite(x) else str(x)


def rotate(torch, x, cos, sin):
    """GroupQueryAttention's non-interleaved rotary (rotate-half) of ``x [..., d]`` by ``cos / sin
    [d/2]`` (fp32)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ----------------------------------------------------------------------------------- timings
def time_runs(env: Env, run, target_s: float, min_iters: int = 3, max_iters: int = 400) -> dict:
    """Seconds per ``run()`` (each one synchronous, as ORT's Run is): 3 loops of N calls, N from one
    timed call so the loops take ``target_s`` together; the median loop's mean."""
    env.sync()
    t0 = time.perf_counter()
    run()
    env.sync()
    once = time.perf_counter() - t0
    n = int(min(max_iters, max(min_iters, target_s / 3 / max(once, 1e-6))))
    loops = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        env.sync()
        loops.append((time.perf_counter() - t0) / n)
    return {"s": sorted(loops)[1], "iters": 3 * n, "spread": (max(loops) - min(loops)) / sorted(loops)[1]}


def kernel_times(env: Env, run, calls: int = 3) -> dict:
    """Device time per ``run()`` of the CUDA kernels (and copies) it launched, from torch's CUPTI
    profiler (it records every kernel of the process, ORT's too): ``gpu_us`` their sum, ``kernels``
    the largest ``[name, us per call, launches per call]``."""
    from torch.profiler import ProfilerActivity, profile

    run()
    env.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        env.sync()
    kernels = sorted(((e.key, e.device_time_total / calls, e.count / calls) for e in prof.key_averages()
                      if e.device_time_total > 0), key=lambda k: -k[1])
    return {"gpu_us": sum(k[1] for k in kernels),
            "kernels": [[name[:100], round(us, 2), round(n, 2)] for name, us, n in kernels[:6]]}


def placement(env: Env, session) -> dict:
    """Nodes ORT ran on another EP than the session's first (from a profiled run's trace), Memcpy
    nodes included; empty when everything ran on the CUDA EP."""
    path = session.end_profiling()
    try:
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.remove(path)
    elsewhere, memcpy = set(), set()
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        a = e.get("args", {})
        if a.get("provider") and a.get("provider") != env.provider_name():
            elsewhere.add(f"{a.get('op_name')}@{a.get('provider')}")
        if "Memcpy" in a.get("op_name", ""):
            memcpy.add(a.get("op_name"))
    return {"other_ep_nodes": sorted(elsewhere), "memcpy_nodes": sorted(memcpy)}


# ----------------------------------------------------------------------------------- the sweep
def _start(case, env: "Env", s: dict, seed: int):
    """A case's common start: ``case.torch / env / s`` set; returns torch and a sampler of random
    tensors of the case's dtype on its device (one seeded generator)."""
    torch = case.torch = env.torch
    case.env, case.s = env, s
    gen = torch.Generator(device=env.device).manual_seed(seed)
    return torch, lambda *shape: torch.randn(*shape, generator=gen, device=env.device, dtype=env.dtype)


def _checked(case, pairs) -> dict:
    """``max_rel`` of a case's output against its reference and whether each buffer still equals its
    kept copy (``pairs`` of (buffer, copy); restored if not)."""
    torch = case.torch
    err = max_rel(torch, case.out, case.want)
    intact = all(torch.equal(buf, keep) for buf, keep in pairs)
    if not intact:
        for buf, keep in pairs:
            buf.copy_(keep)
        case.env.sync()
    return {"max_rel": finite(err), "buffers_intact": intact}


class Case:
    """The device data of one (d, Hq, Hkv, Lmax, pos, B): random q and buffers (``k_new / v_new`` =
    buffer row ``pos``), a copy of the buffers to check they kept their values, the fp32 reference."""

    def __init__(self, env: Env, s: dict):
        torch, r = _start(self, env, s, seed=0)
        B, hq, hkv, L, d, pos = s["batch"], s["hq"], s["hkv"], s["rows"], s["d"], s["pos"]
        self.q, self.k_buf, self.v_buf = r(B, hq, 1, d), r(B, hkv, L, d), r(B, hkv, L, d)
        self.k_new = self.k_buf[:, :, pos:pos + 1].clone()
        self.v_new = self.v_buf[:, :, pos:pos + 1].clone()
        self.k_keep, self.v_keep = self.k_buf.clone(), self.v_buf.clone()
        self.seq_major = []  # (buffer, its copy) of K and V kept sequence-major, for the bsnh layout
        self.pos = torch.tensor(pos, dtype=torch.int64, device=env.device)
        self.out = torch.empty(B, hq, 1, d, dtype=env.dtype, device=env.device)
        self.want = reference(torch, self.q, self.k_buf, self.v_buf, s["scale"], pos + 1)
        self.totals = {"gqa": np.array(pos + 1, dtype=np.int32), "gqa_cap": np.array(L, dtype=np.int32)}
        env.sync()  # written on torch's stream; ORT runs on its own

    def buffers(self, layout: str):
        """The K / V buffers as ``layout`` binds them: the BNSH buffers, or for ``bsnh`` their
        ``[B, Lmax, Hkv*d]`` view (Hkv = 1) or sequence-major copies (made once, checked like them)."""
        if layout != "bsnh":
            return self.k_buf, self.v_buf
        B, hkv, L, d = self.s["batch"], self.s["hkv"], self.s["rows"], self.s["d"]
        if hkv == 1:
            return self.k_buf.view(B, L, d), self.v_buf.view(B, L, d)
        if not self.seq_major:
            for buf in (self.k_buf, self.v_buf):
                copy = buf.transpose(1, 2).reshape(B, L, hkv * d).contiguous()
                self.seq_major.append((copy, copy.clone()))
            self.env.sync()
        return self.seq_major[0][0], self.seq_major[1][0]

    def binding(self, session, candidate: str):
        env, b = self.env, session.io_binding()
        candidate = split_candidate(candidate)[0]
        layout = layout_of(candidate)
        shape = shapes(self.s, layout)
        k_buf, v_buf = self.buffers(layout)
        feeds = {"q": self.q.view(shape["q"]), "k_new": self.k_new.view(shape["new"]),
                 "v_new": self.v_new.view(shape["new"]), "k_buf": k_buf, "v_buf": v_buf, "pos": self.pos}
        for meta in session.get_inputs():
            if meta.name == "total":
                b.bind_cpu_input("total", self.totals[candidate])
            else:
                env.bind(b.bind_input, meta.name, feeds[meta.name])
        outs = {"out": self.out.view(shape["q"]), "k_out": k_buf, "v_out": v_buf}
        for meta in session.get_outputs():
            env.bind(b.bind_output, meta.name, outs[meta.name])
        return b

    def check(self) -> dict:
        """``max_rel`` of the output (reset to NaN before the run) and whether the buffers kept their
        values (restored if not)."""
        return _checked(self, [(self.k_buf, self.k_keep), (self.v_buf, self.v_keep)] + self.seq_major)

    def model(self, candidate: str, args):
        return build(candidate, self.s, self.env.onnx_type[self.env.dtype], not args.no_write)

    def measure(self, candidate: str, args) -> dict:
        env = self.env
        base, knob = split_candidate(candidate)
        model = self.model(base, args)
        res = {"nodes": len(model.graph.node),
               "node_types": dict(collections.Counter(n.op_type for n in model.graph.node).most_common())}
        with tempfile.TemporaryDirectory() as tmp:
            session = env.session(model, profile_dir=tmp, knob=knob)
            binding = self.binding(session, candidate)
            self.out.fill_(math.nan)
            env.sync()
            session.run_with_iobinding(binding)
            env.sync()
            res.update(placement(env, session))
        res.update(self.check())
        t = time_runs(env, lambda: session.run_with_iobinding(binding), args.target_ms / 1e3)
        res["uncaptured_us"], res["uncaptured_iters"], res["uncaptured_spread"] = t["s"] * 1e6, t["iters"], t["spread"]
        if env.cuda and not args.no_kernels and not env.no_profiler:
            try:
                res.update(kernel_times(env, lambda: session.run_with_iobinding(binding)))
            except Exception as exc:  # noqa: BLE001  (once: the profiler will not work later either)
                res["kernels_error"] = f"{type(exc).__name__}: {exc}"[:300]
                env.no_profiler = True
        res.update({f"after_timing_{k}": v for k, v in self.check().items()})
        del binding, session
        env.free()
        if env.cuda and not args.no_graph:
            try:
                session = env.session(model, graph=True, knob=knob)
                binding = self.binding(session, candidate)
                for _ in range(4):  # ORT runs a few uncaptured, captures, then replays
                    session.run_with_iobinding(binding)
                self.out.fill_(math.nan)
                env.sync()
                session.run_with_iobinding(binding)  # a replay
                env.sync()
                res.update({f"graph_{k}": v for k, v in self.check().items()})
                t = time_runs(env, lambda: session.run_with_iobinding(binding), args.target_ms / 1e3)
                res["graph_us"], res["graph_iters"], res["graph_spread"] = t["s"] * 1e6, t["iters"], t["spread"]
            except Exception as exc:  # noqa: BLE001  (the reason is the finding)
                res["graph_error"] = f"{type(exc).__name__}: {exc}"[:600]
                self.check()  # restore the buffers if the failed capture touched them
            finally:
                binding = session = None
                env.free()
        return res


class ConsumerCase(Case):
    """The device data of one consumer case (d, Hq, Hkv, W, pos, B): the K / V of positions
    ``max(0, p-W)..p`` (random; the new row ``k_new / v_new`` is position p's, the row the producer
    appended), laid out three ways, each ``[B, Hkv, W, d]`` with random values in the rows that hold no
    position (a candidate that reads them shows in the parity): ``ring`` (the eager op's slot ring
    after the step: slot ``t mod W`` holds position t), ``pre`` (GQA's windowed layout before the step:
    rows ``[0, L)`` = positions ``p-L..p-1``, ``L = min(p, W)``) and ``post`` (after it: rows ``[0, L)``
    = positions ``p-L+1..p``, ``L = min(p + 1, W)``). The reference: torch fp32 attention over
    positions ``p-W+1..p`` (those >= 0)."""

    def __init__(self, env: Env, s: dict):
        torch, r = _start(self, env, s, seed=1)
        B, hq, hkv, d, W, p = s["batch"], s["hq"], s["hkv"], s["d"], s["window"], s["pos"]
        first = max(0, p - W)  # the oldest position any layout holds
        k_hist, v_hist = r(B, hkv, p + 1 - first, d), r(B, hkv, p + 1 - first, d)  # positions first..p
        self.q = r(B, hq, 1, d)
        self.k_new, self.v_new = k_hist[:, :, -1:].clone(), v_hist[:, :, -1:].clone()
        self.layouts = {}
        for name in ("ring", "pre", "post"):
            k, v = r(B, hkv, W, d), r(B, hkv, W, d)
            if name == "ring":
                for t in range(max(0, p - W + 1), p + 1):
                    k[:, :, t % W], v[:, :, t % W] = k_hist[:, :, t - first], v_hist[:, :, t - first]
            else:
                end = p - 1 if name == "pre" else p  # the last position the window holds
                n = min(end + 1, W)
                k[:, :, :n], v[:, :, :n] = k_hist[:, :, end + 1 - n - first:end + 1 - first], \
                    v_hist[:, :, end + 1 - n - first:end + 1 - first]
            self.layouts[name] = (k, v, k.clone(), v.clone())
        self.rows = min(p + 1, W)  # the positions attended: p-rows+1..p
        self.want = reference(torch, self.q, k_hist[:, :, -self.rows:], v_hist[:, :, -self.rows:], s["scale"],
                              self.rows)
        self.pos = torch.tensor(p, dtype=torch.int64, device=env.device)
        self.seqlens = torch.full((B,), p, dtype=torch.int32, device=env.device)
        self.padding = torch.full((B,), self.rows, dtype=torch.int32, device=env.device)
        self.total = np.array(p + 1, dtype=np.int32)
        self.out = torch.empty(B, hq, 1, d, dtype=env.dtype, device=env.device)
        self.seq_major = []
        env.sync()

    def model(self, candidate: str, args):
        dtype = self.env.onnx_type[self.env.dtype]
        if candidate == "consumer_decomp":
            return build_consumer_decomp(self.torch, self.s, self.env.dtype)
        if candidate == "consumer_gqa_unshared":
            return build_consumer_gqa(self.s, dtype)
        if candidate == "consumer_mha_window":
            return build_consumer_mha(self.s, dtype)
        raise ValueError(candidate)

    def binding(self, session, candidate: str):
        env, b = self.env, session.io_binding()
        layout = {"consumer_decomp": "ring", "consumer_gqa_unshared": "pre", "consumer_mha_window": "post"}[candidate]
        k, v = self.layouts[layout][:2]
        B, hq, hkv, d = self.s["batch"], self.s["hq"], self.s["hkv"], self.s["d"]
        q = self.q.view(B, hq, d) if candidate == "consumer_mha_window" and hkv == 1 else self.q
        feeds = {"q": q, "k_cache": k, "v_cache": v, "k_win": k, "v_win": v, "pos": self.pos, "k_new": self.k_new,
                 "v_new": self.v_new, "seqlens_k": self.seqlens, "key_padding_mask": self.padding}
        for meta in session.get_inputs():
            if meta.name == "total":
                b.bind_cpu_input("total", self.total)
            else:
                env.bind(b.bind_input, meta.name, feeds[meta.name])
        (out,) = session.get_outputs()
        env.bind(b.bind_output, out.name, self.out.view(q.shape))
        return b

    def check(self) -> dict:
        return _checked(self, [(buf, keep) for k, v, k_keep, v_keep in self.layouts.values()
                               for buf, keep in ((k, k_keep), (v, v_keep))])


def consumer_bytes(s: dict, itemsize: int) -> dict:
    """What a consumer step needs to read: the ``min(p + 1, W)`` attended rows of K and V."""
    rows = min(s["pos"] + 1, s["window"])
    full = s["window"] * s["hkv"] * s["d"] * itemsize * 2 * s["batch"]
    return {"bytes": rows * s["hkv"] * s["d"] * itemsize * 2 * s["batch"], "bytes_all_rows": full,
            "l2": full <= L2_BYTES}

def sweep_bytes(s: dict, itemsize: int) -> dict:
    needed = (s["pos"] + 1) * s["hkv"] * s["d"] * itemsize * 2 * s["batch"]
    full = s["rows"] * s["hkv"] * s["d"] * itemsize * 2 * s["batch"]
    return {"bytes": needed, "bytes_all_rows": full, "l2": full <= L2_BYTES}


# ------------------------------------------------------------------------------- the GQA check
CHECK_BASE = dict(d=64, hq=4, hkv=2, batch=2, rows=16, pos=11, scale=0.3, beyond="random", total="capacity",
                  total_on="cpu", rotary=False, dtype="bf16", shared=True, knob=None)
CHECK_VARIANTS = {
    "test_case": {},  # the failing test: seqlens_k = pos, total_sequence_length = capacity
    "total_pos1": {"total": "pos+1"},
    "cap64": {"rows": 64},
    "cap64_total_pos1": {"rows": 64, "total": "pos+1"},
    "cap4096": {"rows": 4096},
    "cap4096_total_pos1": {"rows": 4096, "total": "pos+1"},
    "pos_last": {"pos": 15},  # capacity = pos + 1: both conventions agree
    "pos0": {"pos": 0},
    "zeros_beyond": {"beyond": "zero"},
    "zeros_beyond_total_pos1": {"beyond": "zero", "total": "pos+1"},
    "b1": {"batch": 1},
    "b1_total_pos1": {"batch": 1, "total": "pos+1"},
    "total_on_device": {"total_on": "device"},
    "rotary": {"rotary": True},
    "rotary_total_pos1": {"rotary": True, "total": "pos+1"},
    "fp16": {"dtype": "fp16"},
    "d128": {"d": 128},
    "unshared": {"shared": False},
    "unshared_total_pos1": {"shared": False, "total": "pos+1"},
    # which kernel: ORT's switches (KNOBS) on the failing case
    **{f"knob_{k}": {"knob": k} for k in KNOBS},
    "exporter_graph": {"exporter": True},  # effexport's own lowering of the test, bound as the test binds it
}


def check_spec(name: str, cuda: bool) -> dict:
    s = {**CHECK_BASE, **CHECK_VARIANTS[name]}
    if not cuda:
        s["dtype"] = "fp32"  # the smoke test's CPU EP: fp32 everywhere
    return s


def gqa_check(env: Env, name: str) -> dict:
    torch = env.torch
    s = check_spec(name, env.cuda)
    if not env.cuda and s["total_on"] == "device":
        return {"variant": name, "skipped": "CPU EP: every input is on the host"}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[s["dtype"]]
    B, hq, hkv, C, d, pos = s["batch"], s["hq"], s["hkv"], s["rows"], s["d"], s["pos"]
    g = torch.Generator().manual_seed(3)  # the test's _inputs(2, 1, 11, seed=3, d=64): q, k_new, v_new, k_buf, v_buf
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    q, k_new, v_new, k_buf, v_buf = r(B, hq, 1, d), r(B, hkv, 1, d), r(B, hkv, 1, d), r(B, hkv, C, d), r(B, hkv, C, d)
    if s["beyond"] == "zero":
        k_buf[:, :, pos:] = 0
        v_buf[:, :, pos:] = 0
    q, k_new, v_new, k_buf, v_buf = (t.to(dtype) for t in (q, k_new, v_new, k_buf, v_buf))
    res = {"variant": name, **{k: v for k, v in s.items() if k != "exporter"}}
    # the expected result: fp32 attention over [buffer rows < pos | the new row], rotated where asked
    max_pos = max(C, 64)
    cos = sin = None
    q_ref, k_row = q.float(), k_new.float()
    if s["rotary"]:
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None]
        cos, sin = torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)
        q_ref = rotate(torch, q, cos[pos].float(), sin[pos].float())
        k_row = rotate(torch, k_new, cos[pos].float(), sin[pos].float())
    keys = torch.cat([k_buf[:, :, :pos].float(), k_row], dim=2)
    values = torch.cat([v_buf[:, :, :pos].float(), v_new.float()], dim=2)
    want = reference(torch, q_ref, keys, values, s["scale"], pos + 1)
    dev = env.device
    qd, knd, vnd, kbd, vbd = (t.to(dev).contiguous() for t in (q, k_new, v_new, k_buf, v_buf))
    out = torch.full((B, hq, 1, d), math.nan, dtype=dtype, device=dev)
    posd = torch.tensor(pos, dtype=torch.int64, device=dev)
    debug = {"ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO": "1"} if env.cuda else {}
    if s.get("exporter"):
        with environment(debug):
            session, binding = _exporter_session(env, s, dtype, dict(q=qd, k_new=knd, v_new=vnd, k_buf=kbd,
                                                                     v_buf=vbd, pos=posd, out=out))
    else:
        spec = dict(batch=B, hq=hq, hkv=hkv, rows=C, d=d, scale=s["scale"])
        model = build_gqa(spec, env.onnx_type[dtype], rotary=s["rotary"], max_pos=max_pos)
        with environment(debug):  # the kernels print the attention kernel they choose (CUDA EP)
            session = env.session(model, knob=s["knob"])
        binding = session.io_binding()
        feeds = dict(q=qd, k_new=knd, v_new=vnd, k_buf=kbd, v_buf=vbd, pos=posd)
        if s["rotary"]:
            feeds.update(cos_cache=cos.to(dev).contiguous(), sin_cache=sin.to(dev).contiguous())
        total = pos + 1 if s["total"] == "pos+1" else C
        res["seqlens_k"], res["total_sequence_length"] = pos, total
        for meta in session.get_inputs():
            if meta.name != "total":
                env.bind(binding.bind_input, meta.name, feeds[meta.name])
            elif s["total_on"] == "cpu":
                binding.bind_cpu_input("total", np.array(total, dtype=np.int32))
            else:
                env.bind(binding.bind_input, "total", torch.tensor(total, dtype=torch.int32, device=dev))
        env.bind(binding.bind_output, "out", out)
        for name_, buf in (("k_out", kbd), ("v_out", vbd)):
            if s["shared"]:
                env.bind(binding.bind_output, name_, buf)
            else:
                binding.bind_output(name_, dev)
    env.sync()
    printed = []
    with captured_stdout(printed):
        session.run_with_iobinding(binding)
        env.sync()
    info = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", printed[0]).split())
    if info:
        res["kernel_info"] = info[:400]
    res["max_rel"] = finite(max_rel(torch, out.cpu(), want))
    if s["shared"]:
        k_after = kbd.cpu()
        want_row = k_row if s["rotary"] else k_new.float()  # rotary: ORT rotates in its own precision
        tol = 0.0 if not s["rotary"] else 1e-5 if dtype == torch.float32 else 2e-2
        row_diff = (k_after[:, :, pos:pos + 1].float() - want_row).abs().max().item()
        res["row_written"] = bool(row_diff <= tol * want_row.abs().max().item()
                                  and torch.equal(vbd.cpu()[:, :, pos:pos + 1], v_new))
        res["rows_before_kept"] = bool(torch.equal(k_after[:, :, :pos], k_buf[:, :, :pos]))
        res["rows_after_kept"] = bool(torch.equal(k_after[:, :, pos + 1:], k_buf[:, :, pos + 1:]))
        if row_diff:
            res["row_max_abs_diff"] = finite(row_diff)
    del binding, session
    env.free()
    return res


def _exporter_session(env: Env, s: dict, dtype, feeds: dict):
    """The failing test's graph: effexport's ``ort`` lowering of ``attention_buffer`` (scale 0.3,
    batch dynamic), bound the way the test binds it (``pos_host`` from the host)."""
    torch = env.torch
    import effexport.custom_ops  # noqa: F401  (registers the ops)
    from effexport.exporter.backends.onnx.export import lower

    ops = torch.ops.effexport

    class Buffer(torch.nn.Module):
        def forward(self, q, k_new, v_new, k_buf, v_buf, pos, sinks):
            return ops.attention_buffer(q, k_new, v_new, k_buf, v_buf, pos, None, scale=s["scale"], window=0,
                                        softcap=0.0)

    cpu = {k: v.cpu() for k, v in feeds.items() if k != "out"}
    args = (cpu["q"], cpu["k_new"], cpu["v_new"], cpu["k_buf"], cpu["v_buf"], cpu["pos"],
            torch.zeros(s["hq"], dtype=dtype))
    bt = {0: torch.export.Dim("batch")}
    model = lower(Buffer(), args, "ort", dynamic_shapes=(bt, bt, bt, bt, bt, None, None))
    session = env.session(model)
    binding = session.io_binding()
    feeds = {**feeds, "sinks": torch.zeros(s["hq"], dtype=dtype, device=env.device)}
    host = np.array(s["pos"], dtype=np.int64)  # kept alive with the binding (it may hold the address)
    binding.effexport_host_inputs = [host]
    for meta in session.get_inputs():
        if meta.name == "pos_host":
            binding.bind_cpu_input("pos_host", host)
        else:
            env.bind(binding.bind_input, meta.name, feeds[meta.name])
    for meta, buf in zip(session.get_outputs(), (feeds["out"], feeds["k_buf"], feeds["v_buf"])):
        env.bind(binding.bind_output, meta.name, buf)
    return session, binding


# ------------------------------------------------------------------------------------ worker
def worker(args) -> int:
    """Measure the items of ``args.worker`` (a JSON list) in order, one JSON line per event in
    ``ort_attention.jsonl``: ``start`` before an item, ``result`` after (an exception is its result),
    ``skipped`` for every item left once ``--deadline`` passes."""
    with open(args.worker) as f:
        items = json.load(f)
    log = os.path.join(args.out, "ort_attention.jsonl")

    def emit(record: dict) -> None:
        with open(log, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    env = Env(args.smoke)
    emit({"event": "meta", **env.meta(),
          "build_info": env.ort.get_build_info() if hasattr(env.ort, "get_build_info") else None})
    case, case_id = None, None
    for i, item in enumerate(items):
        key = item_key(item)
        if args.deadline and time.time() > args.deadline:
            for rest in items[i:]:
                emit({"event": "skipped", "key": item_key(rest), "item": rest, "reason": "budget"})
            break
        emit({"event": "start", "key": key, "item": item})
        if os.environ.get("ORT_ATTENTION_CRASH_AT") and os.environ["ORT_ATTENTION_CRASH_AT"] == key:
            os._exit(3)  # the tests' stand-in for a worker killed by a sticky CUDA error
        t0 = time.perf_counter()
        try:
            if item["kind"] == "copy_bw":
                res = copy_bandwidth(env)
            elif item["kind"] == "gqa_check":
                res = gqa_check(env, item["variant"])
            else:
                consumer = item["kind"] == "consumer"
                s = {k: item[k] for k in ("d", "hq", "hkv", "window" if consumer else "rows", "pos", "batch")}
                s["scale"] = 1.0 / math.sqrt(s["d"])
                this = (item["kind"], *sorted(s.items()))
                if this != case_id:  # the buffers of a case, once for all its candidates
                    case = None
                    env.free()
                    case, case_id = (ConsumerCase if consumer else Case)(env, s), this
                counted = (consumer_bytes if consumer else sweep_bytes)(s, case.q.element_size())
                res = {**counted, **case.measure(item["candidate"], args)}
        except Exception as exc:  # noqa: BLE001  (the reason is the finding)
            res = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            if item["kind"] == "gqa_check":
                res.update({k: v for k, v in check_spec(item["variant"], env.cuda).items() if k != "exporter"})
            elif item["kind"] in ("sweep", "consumer") and case is not None and case_id == (item["kind"],
                                                                                            *sorted(s.items())):
                with contextlib.suppress(Exception):  # a run that failed midway may have written the buffers
                    res["buffers_intact"] = case.check()["buffers_intact"]
            traceback.print_exc()
        res["wall_s"] = round(time.perf_counter() - t0, 3)
        emit({"event": "result", "key": key, "item": item, "result": res})
        print(line(item, res), flush=True)
        write_report(args.out)
    case = None
    env.free()
    return 0


def line(item: dict, res: dict) -> str:
    """One stdout line per item."""
    if "error" in res:
        tail = "ERROR " + res["error"][:300]
    elif item["kind"] in ("sweep", "consumer"):
        tail = (f"max_rel {res.get('max_rel')} uncaptured {_f(res.get('uncaptured_us'))} us gpu "
                f"{_f(res.get('gpu_us'))} us graph "
                f"{_f(res.get('graph_us')) if 'graph_error' not in res else 'ERROR ' + res['graph_error'][:200]}"
                f"{' other EP ' + str(res['other_ep_nodes']) if res.get('other_ep_nodes') else ''}")
    else:
        tail = json.dumps({k: v for k, v in res.items() if k not in CHECK_BASE}, default=str)
    what = {k: v for k, v in item.items() if k != "kind"}
    return f"[{item['kind']}] {json.dumps(what)} {tail}"


def _f(x, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def _pct(frac) -> str:
    return f"{100 * frac:.0f}%" if isinstance(frac, (int, float)) else "-"


def _kernel(info: str) -> str:
    """The kernel an ORT debug line names (``SdpaKernel=...`` or ``..._ATTENTION=1`` flags), else ``-``."""
    found = re.findall(r"SdpaKernel=(\w+)|(\w+_ATTENTION|XQA\w*)=1", info)
    names = [a or b for a, b in found]
    return ",".join(dict.fromkeys(names))[:60] if names else ("?" if info else "-")


def _e(x) -> str:
    """An error for the tables: ``1.2e-03``, a string as it is (``nan``), ``-`` for none."""
    return x if isinstance(x, str) else f"{x:.1e}" if isinstance(x, (int, float)) else "-"


# ------------------------------------------------------------------------------------ report
def read_events(out: str) -> list[dict]:
    path = os.path.join(out, "ort_attention.jsonl")
    if not os.path.exists(path):
        return []
    events = []
    with open(path) as f:
        for text in f:
            try:
                events.append(json.loads(text))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
    return events


def collect(out: str) -> dict:
    """``ort_attention.json``'s content from the event log: the last result of every item."""
    events = read_events(out)
    results = {"meta": {}, "args": {}, "copy_bw": None, "gqa_check": [], "sweep": [], "consumer": [], "skipped": [], "crashed": []}
    seen = {}
    for e in events:
        if e["event"] == "plan":
            results["args"] = e["args"]
        elif e["event"] == "meta":
            results["meta"] = {k: v for k, v in e.items() if k != "event"}
        elif e["event"] in ("result", "crashed"):
            seen[e["key"]] = e
        elif e["event"] == "skipped" and e["key"] not in seen:
            seen[e["key"]] = e
    bw = next((e["result"].get("copy_bw") for e in seen.values() if e["event"] == "result"
               and e["item"]["kind"] == "copy_bw"), None)
    results["copy_bw"] = bw
    for e in seen.values():
        item = e["item"]
        if e["event"] == "skipped":
            results["skipped"].append(item)
            continue
        res = e.get("result", {})
        if e["event"] == "crashed":
            results["crashed"].append(item)
        if item["kind"] == "gqa_check":
            results["gqa_check"].append({**res, "variant": item["variant"]})
        elif item["kind"] in ("sweep", "consumer"):
            row = {**{k: v for k, v in item.items() if k != "kind"}, **res}
            for mode in ("uncaptured", "graph", "gpu"):
                t = row.get(f"{mode}_us")
                if t and bw and row.get("bytes"):
                    row[f"{mode}_frac"] = row["bytes"] / (t * 1e-6) / bw
            results[item["kind"]].append(row)
    return results


def _timings(r: dict) -> str:
    """A sweep / consumer row's columns from ``graph us`` on."""
    note = []
    if "error" in r:
        note.append(r["error"][:160])
    if "graph_error" in r:
        note.append("graph: " + r["graph_error"][:120])
    if r.get("other_ep_nodes"):
        note.append("off the EP: " + ",".join(r["other_ep_nodes"])[:120])
    if r.get("memcpy_nodes"):
        note.append("memcpy")
    if r.get("buffers_intact") is False or r.get("graph_buffers_intact") is False:
        note.append("BUFFERS CHANGED")
    if r.get("l2"):
        note.append("l2")
    err = r.get("graph_max_rel", r.get("max_rel"))
    top = f"{r['kernels'][0][0][:48]} ({r['kernels'][0][1]:.0f})" if r.get("kernels") else "-"
    return (f"{_f(r.get('graph_us'))} | {_f(r.get('uncaptured_us'))} | {_f(r.get('gpu_us'))} | "
            f"{_f(r['bytes'] / 1e6, 2) if r.get('bytes') else '-'} | {_pct(r.get('gpu_frac'))} | "
            f"{_pct(r.get('graph_frac'))} | {_e(err)} | {top.replace('|', '/')} | "
            f"{'; '.join(note).replace('|', '/')} |")


def table(results: dict) -> str:
    bw = results.get("copy_bw")
    lines = [f"{results['meta'].get('device', '?')}, onnxruntime {results['meta'].get('onnxruntime', '?')}, "
             f"{results['meta'].get('dtype', '?')}; copy bandwidth "
             + (f"{bw / 1e12:.2f} TB/s" if bw else "n/a"), "",
             "graph / uncaptured us: wall time per run_with_iobinding (a CUDA-graph replay / the nodes launched one "
             "by one), ORT's per-run overhead included; gpu us: the device time of the kernels one call launched; "
             "% bw: MB needed / time as a percentage of the copy bandwidth", "",
             "| d | Lmax | pos | B | candidate | graph us | uncaptured us | gpu us | MB needed | gpu % bw | graph % bw "
             "| max_rel | top kernel (us) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["sweep"]:
        lines.append(f"| {r['d']} | {r['rows']} | {r['pos']} | {r['batch']} | {r['candidate']} | " + _timings(r))
    if results.get("consumer"):
        lines += ["", "KV-sharing consumers: one decode token over a W-row sliding window another layer wrote "
                  "(consumer_decomp: the exporter's slot-ring read; consumer_gqa_unshared: GQA windowed, presents "
                  "not bound to the past; consumer_mha_window: MHA over the post-step window); MB needed: the "
                  "min(pos+1, W) rows of K and V", "",
                  "| d | W | pos | B | candidate | nodes | graph us | uncaptured us | gpu us | MB needed | gpu % bw | "
                  "graph % bw | max_rel | top kernel (us) | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["consumer"]:
            lines.append(f"| {r['d']} | {r['window']} | {r['pos']} | {r['batch']} | {r['candidate']} | "
                         f"{r.get('nodes', '-')} | " + _timings(r))
    if results["gqa_check"]:
        lines += ["", "GroupQueryAttention shared-buffer check (bf16 unless the variant says; expected < 2e-2)", "",
                  "| variant | C | pos | B | d | total_seq_len | max_rel | row written | other rows kept | kernel | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["gqa_check"]:
            err = r.get("max_rel")
            lines.append(f"| {r['variant']} | {r.get('rows', '-')} | {r.get('pos', '-')} | {r.get('batch', '-')} | "
                         f"{r.get('d', '-')} | {r.get('total_sequence_length', r.get('total', '-'))} | "
                         f"{_e(err)} | {r.get('row_written', '-')} | "
                         f"{(r.get('rows_before_kept'), r.get('rows_after_kept')) if 'rows_before_kept' in r else '-'} | "
                         f"{_kernel(r.get('kernel_info', ''))} | "
                         f"{(r.get('error') or r.get('skipped') or '')[:160].replace('|', '/')} |")
    if results["skipped"]:
        lines += ["", f"{len(results['skipped'])} items skipped (budget)"]
    if results["crashed"]:
        lines += ["", f"{len(results['crashed'])} items killed their worker: "
                  + "; ".join(item_key(i) for i in results["crashed"])[:600]]
    return "\n".join(lines)


def write_report(out: str) -> dict:
    results = collect(out)
    with open(os.path.join(out, "ort_attention.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out, "ort_attention.md"), "w") as f:
        f.write(table(results) + "\n")
    return results


# ------------------------------------------------------------------------------------ parent
def _worker_argv(args, items_file: str, deadline: float) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", items_file, "--deadline", str(deadline),
            "--out", args.out, "--target-ms", str(args.target_ms)]
    for flag in ("smoke", "no_write", "no_graph", "no_kernels"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv


def orchestrate(args, groups: list[list[dict]]) -> int:
    """Run each group of items in worker processes until every item has a result, a crash record or
    the budget is spent: a worker that dies (say a sticky CUDA error) is replaced, its current item
    recorded as ``crashed`` with the worker's last output."""
    deadline = time.time() + args.budget_s
    for items in groups:
        run_group(args, items, deadline)
    results = write_report(args.out)
    print(table(results), flush=True)
    return 0


def run_group(args, items: list[dict], deadline: float) -> None:
    remaining = list(items)
    log = os.path.join(args.out, "ort_attention.jsonl")
    while remaining and time.time() < deadline:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(remaining, f)
            items_file = f.name
        proc = subprocess.Popen(_worker_argv(args, items_file, deadline), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []

        def pump():
            for text in proc.stdout:
                if "CleanUnusedInitializers" in text:
                    continue
                sys.stdout.write(text)
                sys.stdout.flush()
                tail.append(text)
                del tail[:-30]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        killed = False
        try:
            code = proc.wait(timeout=max(1.0, deadline + GRACE_S - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code, killed = proc.wait(), True
        reader.join(timeout=5)
        os.remove(items_file)
        events = read_events(args.out)
        finished = {e["key"] for e in events if e["event"] in ("result", "skipped", "crashed")}
        started = [e for e in events if e["event"] == "start" and e["key"] not in finished]
        for e in started:  # the item the worker died in (or was killed in when the budget ran out)
            record = ({"event": "skipped", "reason": "budget: killed mid-item"} if killed else
                      {"event": "crashed", "result": {"error": f"worker exit {code}: " + "".join(tail)[-700:]}})
            with open(log, "a") as f:
                f.write(json.dumps({**record, "key": e["key"], "item": e["item"]}) + "\n")
            finished.add(e["key"])
        remaining = [i for i in remaining if item_key(i) not in finished]
        if code == 0 or time.time() > deadline:
            break
        print(f"worker exited with {code}; restarting on the {len(remaining)} items left", flush=True)
    if remaining:  # the budget ran out before a worker could record them
        with open(log, "a") as f:
            for item in remaining:
                f.write(json.dumps({"event": "skipped", "key": item_key(item), "item": item, "reason": "budget"}) + "\n")


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        return worker(args)
    log = os.path.join(args.out, "ort_attention.jsonl")
    groups = plan_items(args)
    with open(log, "w") as f:  # a fresh log: the run's arguments first
        f.write(json.dumps({"event": "plan", "args": {k: v for k, v in vars(args).items() if k not in
                                                      ("worker", "deadline")},
                            "items": sum(len(g) for g in groups)}) + "\n")
    if args.inline:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([item for group in groups for item in group], f)
        args.worker, args.deadline = f.name, time.time() + args.budget_s
        try:
            worker(args)
        finally:
            os.remove(f.name)
        results = write_report(args.out)
        print(table(results), flush=True)
        return 0
    return orchestrate(args, groups)


if __name__ == "__main__":
    sys.exit(main())
