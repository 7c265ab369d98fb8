"""Decode-attention kernels on one CUDA GPU: time, achieved bandwidth, and ratio to the eager ops.

    python3 bench/decode_attention.py [--out DIR] [--contexts 4096,32768,131072] [--batches 1,8]

Measures, in one run: the device copy bandwidth (a 2 GiB ``copy_``, bytes read + written), then for
each kernel, context L and batch B the median time of one decode call of the Triton kernel
(``effexport.custom_ops.enable_triton()``), of the op's eager reference on the same GPU, and of a
torch SDPA baseline where one applies, with the bytes each call must move (K/V read, caches written,
q and out) over the time as a fraction of the copy bandwidth. Shapes are the real presets': Gemma 4
E2B full layers (8 heads, 1 KV head, d 512) and sliding layers (d 256, W 512), DeepSeek V4 Flash
CSA / HCA layers (64 heads, d 512, window 128, ratio 4 top-512 / ratio 128); the in-place full cache
(``attention_buffer_inplace``: ``buffer`` in a buffer of L rows, ``buffer_short`` in one of 128K rows,
``buffer_d256`` with 2 KV heads of d 256; ``buffer_functional`` the functional op; ``buffer_inloop`` /
``buffer_d256_inloop`` the first in-place design as run 25 measured it, the new row stored from the
K/V tile inside the loop (``plan.CONFIG["buffer_store"] = "loop"``) and the two-pass combine
(``combine_one_pass`` off), for comparing both designs in one run; ``read_full_twopass`` the
read-only kernel with that combine; ``buffer_pdl`` the default with the combine launched as a
programmatic dependent launch, ``plan.CONFIG["pdl"]``) and
``read_full_short`` (the read-only kernel over a 128K-row cache at position L - 1), ``hca_short`` (HCA
with a 128K context's compressed entries allocated, L/128 of them visible). ``hca_vs_bytes``
in the JSON: whether HCA's time follows its bytes (:func:`bytes_model`). Calls are captured in a
CUDA graph (no launch overhead) and rotate over input sets of >= 256 MiB together, so the big cases
read HBM, not L2 (the small ring / sparse working sets stay L2-sized: they are latency-bound).
Writes ``bench.json`` and ``bench.md`` to ``--out`` (after every case: a run cut short keeps its rows).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from effexport.custom_ops import attention as attn_mod
from effexport.custom_ops import enable_triton
from effexport.custom_ops import sparse_attention as sparse_mod
from effexport.custom_ops._triton import plan

ops = torch.ops.effexport
DEV = "cuda"
BF16 = torch.bfloat16
ROTATE_BYTES = 256 << 20
BIG_CAPACITY = 131072  # the buffer rows of the *_short cases


def _time_graph(fn, sets, min_ms=150.0) -> tuple[float, str]:
    """Median seconds per call of ``fn(*set)`` rotating over ``sets``, CUDA-graph replays
    (falls back to an event-timed loop when capture fails)."""
    for s in sets:  # warm-up: compile, autotune, allocator
        fn(*s)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for s in sets:
                fn(*s)
        run, how = graph.replay, "graph"
    except Exception:  # noqa: BLE001  (report and time eagerly instead)
        torch.cuda.synchronize()

        def run():
            for s in sets:
                fn(*s)
        how = "eager-loop"
    run()
    torch.cuda.synchronize()
    reps = int(min(200, max(5, min_ms / 1e3 / max(_seconds(run), 1e-6))))
    return statistics.median(_seconds(run) for _ in range(reps)) / len(sets), how


def _seconds(fn) -> float:
    """Device time of one ``fn()`` between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _copy_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def copy(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)

    @triton.jit
    def read(X, S, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(S + tl.program_id(0), tl.sum(tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32), 0))
    return copy, read


def bandwidths() -> dict:
    """Device bandwidths over a 2 GiB bf16 buffer (bytes read + written): ``copy_`` timed eagerly
    and in a CUDA graph, a Triton copy kernel, and a Triton read-only sum (bytes read)."""
    x = torch.randn(1 << 30, device=DEV, dtype=BF16)  # 2 GiB
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    copy, read = _copy_kernel()
    block = 8192
    grid = (-(-x.numel() // block),)
    partial = torch.empty(grid[0], device=DEV, dtype=torch.float32)
    for _ in range(20):  # let the clocks ramp up before any number is taken
        y.copy_(x)
    res = {"copy_eager": 2 * nbytes / statistics.median(_seconds(lambda: y.copy_(x)) for _ in range(50)),
           "copy_graph": 2 * nbytes / _time_graph(lambda: y.copy_(x), [()])[0],
           "copy_triton": 2 * nbytes / _time_graph(lambda: copy[grid](x, y, x.numel(), BLOCK=block), [()])[0],
           "read_triton": nbytes / _time_graph(lambda: read[grid](x, partial, x.numel(), BLOCK=block), [()])[0]}
    res["copy"] = max(res["copy_eager"], res["copy_graph"], res["copy_triton"])
    del x, y
    torch.cuda.empty_cache()
    return res


def _sets(make, bytes_per_set: int) -> list:
    n = max(1, min(16, math.ceil(ROTATE_BYTES / max(1, bytes_per_set))))
    return [make() for _ in range(n)]


def _nb(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ------------------------------------------------------------------------------------- cases
def case_full(ctx, batch, gen):
    """Gemma 4 E2B full layer, attention_cache: reads past K/V, writes present, one new token."""
    h, hkv, d = 8, 1, 512

    def make():
        r = lambda *s: torch.randn(*s, device=DEV, dtype=BF16, generator=gen)  # noqa: E731
        return (r(batch, h, 1, d), r(batch, hkv, 1, d), r(batch, hkv, 1, d),
                r(batch, hkv, ctx - 1, d), r(batch, hkv, ctx - 1, d))
    nbytes = lambda q, kn, vn, kp, vp: 2 * _nb(kp, vp) + 2 * _nb(kn, vn) + 2 * _nb(q)  # noqa: E731
    kw = dict(scale=1.0)
    kern = lambda *a: ops.attention_cache(*a, **kw)  # noqa: E731
    ref = lambda *a: attn_mod.attention_cache._init_fn(*a, **kw)  # noqa: E731

    def sdpa(q, kn, vn, kp, vp):
        k, v = torch.cat([kp, kn], 2), torch.cat([vp, vn], 2)
        return F.scaled_dot_product_attention(q, k, v, scale=1.0, enable_gqa=True), k, v
    return make, nbytes, kern, ref, sdpa


def case_read_full(ctx, batch, gen):
    """Gemma 4 E2B full layer, KV-shared consumer (attention_read over the producer's full cache)."""
    h, hkv, d = 8, 1, 512

    def make():
        r = lambda *s: torch.randn(*s, device=DEV, dtype=BF16, generator=gen)  # noqa: E731
        return r(batch, h, 1, d), r(batch, hkv, ctx, d), r(batch, hkv, ctx, d), torch.tensor(ctx - 1, device=DEV)
    nbytes = lambda q, k, v, p: _nb(k, v) + 2 * _nb(q)  # noqa: E731
    kw = dict(scale=1.0)
    kern = lambda *a: ops.attention_read(*a, **kw)  # noqa: E731
    ref = lambda *a: attn_mod.attention_read._init_fn(*a, **kw)  # noqa: E731
    sdpa = lambda q, k, v, p: F.scaled_dot_product_attention(q, k, v, scale=1.0, enable_gqa=True)  # noqa: E731
    return make, nbytes, kern, ref, sdpa


def case_read_full_q32(ctx, batch, gen):
    """read_full with an fp32 query over the bf16 cache: what the rewritten Gemma graphs pass (the
    sample upcasts q for the score matmul); the kernel uses tf32x3 dots."""
    make, nbytes, kern, ref, sdpa = case_read_full(ctx, batch, gen)

    def make32():
        q, k, v, p = make()
        return q.float(), k, v, p
    return make32, nbytes, kern, ref, None


def _with_config(fn, **override):
    """``fn`` run with ``plan.CONFIG`` overridden (restored after each call): the launch reads the
    config, so the warm-up and the CUDA-graph capture get the override's kernel."""
    def run(*args):
        saved = {k: plan.CONFIG[k] for k in override}
        plan.CONFIG.update(override)
        try:
            return fn(*args)
        finally:
            plan.CONFIG.update(saved)
    return run


def _buffer_case(ctx, batch, gen, heads, kv_heads, d, capacity, inplace=True, store=None):
    """A full layer over a ``[B, Hkv, capacity, d]`` buffer at position ``ctx - 1``: rows ``0..ctx-2``
    read from the buffer, the new row read from k_new / v_new and (in place) written at ``ctx - 1``;
    ``store``: ``plan.CONFIG["buffer_store"]`` for the kernel (None: the default)."""
    def make():
        r = lambda *s: torch.randn(*s, device=DEV, dtype=BF16, generator=gen)  # noqa: E731
        return (r(batch, heads, 1, d), r(batch, kv_heads, 1, d), r(batch, kv_heads, 1, d),
                r(batch, kv_heads, capacity, d), r(batch, kv_heads, capacity, d), torch.tensor(ctx - 1, device=DEV))

    def nbytes(q, kn, vn, kb, vb, p):
        rows_read = _nb(kb, vb) * (ctx - 1) // capacity + _nb(kn, vn)  # rows 0..pos-1, the new row
        written = _nb(kn, vn) if inplace else _nb(kb, vb)  # the new row, or (functional) a whole copy
        copy_read = 0 if inplace else _nb(kb, vb)
        return rows_read + written + copy_read + 2 * _nb(q)
    kw = dict(scale=1.0)
    name = "attention_buffer_inplace" if inplace else "attention_buffer"
    kern = lambda *a: getattr(ops, name)(*a, **kw)  # noqa: E731
    if store is not None:  # the first design: also run 25's combine
        kern = _with_config(kern, buffer_store=store, combine_one_pass=store == "after_loop")
    ref = lambda *a: getattr(attn_mod, name)._init_fn(*a, **kw)  # noqa: E731
    return make, nbytes, kern, ref, None


def case_buffer(ctx, batch, gen):
    """Gemma 4 E2B full layer in place (attention_buffer_inplace): 8 heads, 1 KV head, d 512, a buffer
    of exactly ``ctx`` rows at position ctx - 1."""
    return _buffer_case(ctx, batch, gen, 8, 1, 512, ctx)


def case_buffer_d256(ctx, batch, gen):
    """attention_buffer_inplace with 8 heads over 2 KV heads of d 256 (GQA 4), ``ctx`` rows."""
    return _buffer_case(ctx, batch, gen, 8, 2, 256, ctx)


def case_buffer_inloop(ctx, batch, gen):
    """``buffer`` with the first in-place design: the program holding row pos stores it from its K/V
    tile inside the loop (``buffer_store = "loop"``; the default stores it after the loop)."""
    return _buffer_case(ctx, batch, gen, 8, 1, 512, ctx, store="loop")


def case_buffer_d256_inloop(ctx, batch, gen):
    """``buffer_d256`` with the first in-place design (the new row stored inside the loop)."""
    return _buffer_case(ctx, batch, gen, 8, 2, 256, ctx, store="loop")


def case_buffer_pdl(ctx, batch, gen):
    """``buffer`` with the combine kernel launched as a programmatic dependent launch of the partial
    kernel (``plan.CONFIG["pdl"]``, sm_90+): its launch overlaps the partial kernel's tail."""
    make, nbytes, kern, ref, sdpa = case_buffer(ctx, batch, gen)
    return make, nbytes, _with_config(kern, pdl=True), ref, None


def case_read_full_twopass(ctx, batch, gen):
    """``read_full`` with the combine of run 25 (blocks of 64 splits, two passes): what the combine's
    one round of loads (``combine_one_pass``, the default) saves."""
    make, nbytes, kern, ref, sdpa = case_read_full(ctx, batch, gen)
    return make, nbytes, _with_config(kern, combine_one_pass=False), ref, None


def case_buffer_short(ctx, batch, gen):
    """``buffer`` in a 128K-row buffer (a build's max context) at position ctx - 1: the rows that are
    there split over the GPU at run time (``plan.CONFIG["dynamic_chunk"]``)."""
    return _buffer_case(ctx, batch, gen, 8, 1, 512, max(ctx, BIG_CAPACITY))


def case_buffer_functional(ctx, batch, gen):
    """The functional attention_buffer on CUDA (a copy of both buffers, then the in-place kernel)."""
    return _buffer_case(ctx, batch, gen, 8, 1, 512, ctx, inplace=False)


def case_read_full_short(ctx, batch, gen):
    """read_full over a 128K-row cache (a buffer build's KV-shared consumer) at position ctx - 1."""
    h, hkv, d, rows = 8, 1, 512, max(ctx, BIG_CAPACITY)

    def make():
        r = lambda *s: torch.randn(*s, device=DEV, dtype=BF16, generator=gen)  # noqa: E731
        return r(batch, h, 1, d), r(batch, hkv, rows, d), r(batch, hkv, rows, d), torch.tensor(ctx - 1, device=DEV)
    nbytes = lambda q, k, v, p: _nb(k, v) * ctx // rows + 2 * _nb(q)  # noqa: E731
    kw = dict(scale=1.0)
    kern = lambda *a: ops.attention_read(*a, **kw)  # noqa: E731
    ref = lambda *a: attn_mod.attention_read._init_fn(*a, **kw)  # noqa: E731
    return make, nbytes, kern, ref, None


def case_ring(ctx, batch, gen):
    """Gemma 4 E2B sliding layer, attention_ring with W = 512 slots at position ctx - 1."""
    h, hkv, d, w = 8, 1, 256, 512

    def make():
        r = lambda *s: torch.randn(*s, device=DEV, dtype=BF16, generator=gen)  # noqa: E731
        return (r(batch, h, 1, d), r(batch, hkv, 1, d), r(batch, hkv, 1, d), r(batch, hkv, w, d),
                r(batch, hkv, w, d), torch.tensor(ctx - 1, device=DEV))
    nbytes = lambda q, kn, vn, kr, vr, p: 2 * _nb(kr, vr) + _nb(kn, vn) + 2 * _nb(q)  # noqa: E731
    kw = dict(scale=1.0, window=w)
    kern = lambda *a: ops.attention_ring(*a, **kw)  # noqa: E731
    ref = lambda *a: attn_mod.attention_ring._init_fn(*a, **kw)  # noqa: E731
    return make, nbytes, kern, ref, None


def case_read_ring(ctx, batch, gen):
    """Gemma 4 E2B sliding KV-shared consumer: attention_read over the producer's 512-slot ring."""
    h, hkv, d, w = 8, 1, 256, 512

    def make():
        r = lambda *s: torch.randn(*s, device=DEV, dtype=BF16, generator=gen)  # noqa: E731
        return r(batch, h, 1, d), r(batch, hkv, w, d), r(batch, hkv, w, d), torch.tensor(ctx - 1, device=DEV)
    nbytes = lambda q, k, v, p: _nb(k, v) + 2 * _nb(q)  # noqa: E731
    kw = dict(scale=1.0, window=w, ring=True)
    kern = lambda *a: ops.attention_read(*a, **kw)  # noqa: E731
    ref = lambda *a: attn_mod.attention_read._init_fn(*a, **kw)  # noqa: E731
    return make, nbytes, kern, ref, None


def _case_sparse(ctx, batch, gen, ratio, topk, capacity=0):
    h, d, w = 64, 512, 128
    ncomp = max(ctx, capacity) // ratio
    visible = ctx // ratio  # query at ctx - 1: entries i with ratio * (i + 1) <= ctx

    def make():
        r = lambda *s: torch.randn(*s, device=DEV, dtype=BF16, generator=gen)  # noqa: E731
        idx = None
        if topk:
            idx = torch.stack([torch.randperm(visible, device=DEV, generator=gen)[:topk]
                               for _ in range(batch)]).view(batch, 1, topk)
        return (r(batch, 1, h, d), r(batch, w, d), r(batch, ncomp, d), idx, r(h).float(),
                torch.tensor(ctx - 1, device=DEV))

    def nbytes(q, kv, comp, idx, sink, p):
        rows = w + (min(topk, visible) if topk else visible)
        return batch * rows * d * kv.element_size() + _nb(idx) + 2 * _nb(q)
    kw = dict(scale=d ** -0.5, window=w, ratio=ratio)
    kern = lambda *a: ops.sparse_attention_ring(*a, **kw)  # noqa: E731
    ref = lambda *a: sparse_mod.sparse_attention_ring._init_fn(*a, **kw)  # noqa: E731
    return make, nbytes, kern, ref, None


def case_hca(ctx, batch, gen):
    """DeepSeek V4 Flash HCA layer: 128-slot window ring + every visible ratio-128 entry + sink."""
    return _case_sparse(ctx, batch, gen, 128, 0)


def case_hca_short(ctx, batch, gen):
    """``hca`` with the compressed entries of a 128K context allocated (a fixed-size cache), of which
    the L/128 before ``pos`` are visible: the rows split over the GPU at run time."""
    return _case_sparse(ctx, batch, gen, 128, 0, BIG_CAPACITY)


def case_csa(ctx, batch, gen):
    """DeepSeek V4 Flash CSA layer: 128-slot window ring + top-512 of the ratio-4 entries + sink."""
    return _case_sparse(ctx, batch, gen, 4, 512)


CASES = {"full": case_full, "read_full": case_read_full, "read_full_q32": case_read_full_q32, "ring": case_ring,
         "read_ring": case_read_ring, "hca": case_hca, "csa": case_csa, "buffer": case_buffer,
         "buffer_d256": case_buffer_d256, "buffer_short": case_buffer_short,
         "buffer_functional": case_buffer_functional, "read_full_short": case_read_full_short,
         "hca_short": case_hca_short, "buffer_inloop": case_buffer_inloop,
         "buffer_d256_inloop": case_buffer_d256_inloop, "read_full_twopass": case_read_full_twopass,
         "buffer_pdl": case_buffer_pdl}


def run_case(name, ctx, batch, bw, gen, with_ref=True):
    make, nbytes, kern, ref, sdpa = CASES[name](ctx, batch, gen)
    probe = make()
    nb = nbytes(*probe)
    sets = _sets(make, _nb(*[t for t in probe if isinstance(t, torch.Tensor)]))
    sets[0] = probe
    # numerics on this exact input (bf16 kernel vs the fp32-internal eager reference)
    out, want = kern(*probe), ref(*probe)
    out, want = (out[0], want[0]) if isinstance(out, tuple) else (out, want)
    err = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
    row = {"kernel": name, "context": ctx, "batch": batch, "bytes": nb, "rel_err_vs_ref": err,
           "sets": len(sets)}
    row["t_triton"], row["timing"] = _time_graph(kern, sets)
    row["bw_frac"] = nb / row["t_triton"] / bw
    if with_ref:
        try:
            row["t_ref"], _ = _time_graph(ref, sets[:2])
            row["ref_speedup"] = row["t_ref"] / row["t_triton"]
        except torch.OutOfMemoryError:
            row["t_ref"] = None
        if sdpa is not None:
            row["t_sdpa"], _ = _time_graph(sdpa, sets)
            row["sdpa_speedup"] = row["t_sdpa"] / row["t_triton"]
    del sets, probe
    torch.cuda.empty_cache()
    return row


SWEEP_CASES = (("read_full", 32768, 1), ("read_full", 32768, 8), ("read_full", 131072, 1),
               ("read_full", 131072, 8), ("full", 32768, 1), ("full", 131072, 1))
SWEEP_CONFIGS = ({}, {"programs_per_sm": 4}, {"programs_per_sm": 1, "smem_budget": 200 * 1024, "num_stages": 3},
                 {"smem_budget": 200 * 1024, "num_stages": 3}, {"num_stages": 1}, {"block_n": 64},
                 # two 16-row staging buffers in the shared memory of one 32-row buffer (d 512: 82 KB,
                 # two programs per SM): the next tile's copy in flight while one is read
                 {"block_n": 16, "num_stages": 3})
# --sweep-dynamic: rows cut at run time from pos (the default) vs the static cut over the cache's rows
DYNAMIC_CASES = (("buffer_short", 4096, 1), ("buffer_short", 32768, 1), ("buffer_short", 32768, 8),
                 ("read_full_short", 4096, 1), ("read_full_short", 32768, 1), ("read_full_short", 32768, 8),
                 ("hca_short", 4096, 1), ("hca_short", 4096, 8), ("hca_short", 32768, 8))
DYNAMIC_CONFIGS = ({}, {"dynamic_chunk": False})


def sweep(bw, gen, cases=SWEEP_CASES, configs=SWEEP_CONFIGS) -> list:
    """Triton time of ``cases`` under launch-config overrides (plan.CONFIG), for tuning."""
    rows, default = [], dict(plan.CONFIG)
    for override in configs:
        plan.CONFIG.update(override)
        for name, ctx, batch in cases:
            try:
                row = run_case(name, ctx, batch, bw, gen, with_ref=False)
                row["override"] = override
                msg = f"{row['t_triton'] * 1e6:.1f} us {row['bw_frac'] * 100:.1f}%"
            except Exception as exc:  # noqa: BLE001
                row, msg = {"kernel": name, "context": ctx, "batch": batch, "override": override,
                            "error": repr(exc)[:200]}, "ERROR"
            rows.append(row)
            print(f"sweep {name} L={ctx} B={batch} {override}: {msg}", flush=True)
        plan.CONFIG.clear()
        plan.CONFIG.update(default)
    return rows


def bytes_model(rows: list, bw: float, kernel: str = "hca", slack: float = 0.10) -> list:
    """Does ``kernel``'s time follow its bytes? Per batch size: the fixed cost is the intercept of the
    smallest context, ``t - bytes / bw``; each row's bound is ``(1 + slack) * (fixed + bytes / bw)``.
    Needs two contexts or more of a batch size (the smallest one meets its bound by construction)."""
    out = []
    for batch in sorted({r["batch"] for r in rows if r.get("kernel") == kernel and "t_triton" in r}):
        mine = sorted((r for r in rows if r.get("kernel") == kernel and r["batch"] == batch and "t_triton" in r),
                      key=lambda r: r["context"])
        fixed = mine[0]["t_triton"] - mine[0]["bytes"] / bw
        for r in mine[1:]:
            bound = fixed + r["bytes"] / bw
            out.append({"kernel": kernel, "batch": batch, "context": r["context"], "t": r["t_triton"],
                        "bytes": r["bytes"], "fixed": fixed, "bytes_time": r["bytes"] / bw,
                        "ratio": r["t_triton"] / bound, "met": r["t_triton"] <= (1 + slack) * bound})
    return out


def _fmt(row):
    us = lambda t: "-" if t is None else f"{t * 1e6:.1f}"  # noqa: E731
    sp = lambda k: f"{row[k]:.1f}x" if row.get(k) else "-"  # noqa: E731
    return (f"| {row['kernel']} | {row['context'] // 1024}K | {row['batch']} | {row['bytes'] / 1e6:.1f} | "
            f"{us(row['t_triton'])} | {row['bw_frac'] * 100:.1f}% | {us(row.get('t_ref'))} | "
            f"{sp('ref_speedup')} | {us(row.get('t_sdpa'))} | {sp('sdpa_speedup')} | "
            f"{row['rel_err_vs_ref']:.1e} |")


HEADER = ("| kernel | L | B | MB moved | Triton us | % of copy BW | eager ref us | vs ref | "
          "SDPA us | vs SDPA | rel err |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--kernels", default=",".join(CASES))
    ap.add_argument("--sweep", action="store_true", help="also time launch-config overrides")
    ap.add_argument("--sweep-kernels", default="",
                    help="kernels the --sweep times at 32K and 128K, B 1 and 8 (default: read_full, full)")
    ap.add_argument("--sweep-dynamic", action="store_true",
                    help="also time the *_short cases with the rows cut statically (dynamic_chunk off)")
    ap.add_argument("--no-ref", action="store_true", help="time the Triton kernels only")
    args = ap.parse_args(argv)
    unknown = set(args.kernels.split(",") + [k for k in args.sweep_kernels.split(",") if k]) - set(CASES)
    if unknown:
        ap.error(f"unknown kernels {sorted(unknown)}; choose from {sorted(CASES)}")
    if not torch.cuda.is_available():
        print("bench/decode_attention.py needs a CUDA GPU", file=sys.stderr)
        return 4
    enable_triton()
    gen = torch.Generator(device=DEV).manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    bws = bandwidths()
    bw = bws["copy"]
    result = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "bandwidths": bws, "copy_bw": bw, "config": dict(plan.CONFIG), "rows": [], "sweep": []}
    print(f"{props.name}: " + ", ".join(f"{k} {v / 1e12:.3f} TB/s" for k, v in bws.items()), flush=True)
    print(HEADER)
    os.makedirs(args.out, exist_ok=True)
    for name in args.kernels.split(","):
        for ctx in map(int, args.contexts.split(",")):
            for batch in map(int, args.batches.split(",")):
                try:
                    row = run_case(name, ctx, batch, bw, gen, with_ref=not args.no_ref)
                except Exception as exc:  # noqa: BLE001  (one failing case must not hide the rest)
                    row = {"kernel": name, "context": ctx, "batch": batch, "error": repr(exc)[:300]}
                    print(f"| {name} | {ctx} | {batch} | ERROR {row['error']} |", flush=True)
                    torch.cuda.empty_cache()
                else:
                    print(_fmt(row), flush=True)
                result["rows"].append(row)
                _write(args.out, result, props.name, bw)  # what ran so far survives a timeout
    result["hca_vs_bytes"] = bytes_model(result["rows"], bw) + bytes_model(result["rows"], bw, "hca_short")
    for r in result["hca_vs_bytes"]:
        print(f"{r['kernel']} B={r['batch']} L={r['context']}: {r['t'] * 1e6:.1f} us vs fixed {r['fixed'] * 1e6:.1f} + "
              f"bytes {r['bytes_time'] * 1e6:.1f} us: {r['ratio']:.2f}x ({'met' if r['met'] else 'NOT met'})")
    if args.sweep:
        cases = SWEEP_CASES if not args.sweep_kernels else tuple(
            (name, ctx, batch) for name in args.sweep_kernels.split(",") for ctx in (32768, 131072) for batch in (1, 8))
        result["sweep"] = sweep(bw, gen, cases)
        _write(args.out, result, props.name, bw)
    if args.sweep_dynamic:
        result["sweep_dynamic"] = sweep(bw, gen, DYNAMIC_CASES, DYNAMIC_CONFIGS)
    _write(args.out, result, props.name, bw)
    return 0


def _write(out: str, result: dict, device: str, bw: float) -> None:
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(f"{device}, copy {bw / 1e12:.3f} TB/s\n\n{HEADER}\n")
        f.write("\n".join(_fmt(r) for r in result["rows"] if "error" not in r) + "\n")


if __name__ == "__main__":
    sys.exit(main())
