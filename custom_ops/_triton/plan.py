"""Launch planning for the split-K decode kernels (pure Python: no Triton, testable on CPU).

One decode step reads a *virtual sequence* of rows per (batch, KV head): the primary source (past
cache, ring, or DeepSeek's raw-entry ring), then an optional secondary source (the new token, or the
compressed entries). The rows are cut into ``splits`` chunks of ``chunk`` rows (a multiple of
``block_n``); each program reduces one chunk for ``block_g`` query heads of one KV head to a partial
``(max, denominator, accumulator)``, and a second kernel combines the partials with the sink.
"""
from __future__ import annotations

from dataclasses import dataclass

# Modes of the partial kernel (constexpr): how a row maps to a source, a position and a copy slot.
CACHE, RING, READ, READ_RING, SPARSE_HCA, SPARSE_CSA, BUFFER = range(7)
# Modes whose rows to reduce depend on ``pos`` (rows ``[0, pos]`` or the window ending there; HCA's
# ring plus the compressed entries visible at ``pos``) while the plan is sized for a static bound
# (the cache's rows): the kernel cuts the rows that are there into ``splits`` chunks at run time, so
# every program shares the work at any position (``CONFIG["dynamic_chunk"] = False``: the static
# cut of ``span`` rows, for comparison).
DYNAMIC = (READ, BUFFER, SPARSE_HCA)

# Tunables (the bench may override them; kept here so the bench and the ops use one set). None =
# the heuristic below.
CONFIG = {"programs_per_sm": 2, "max_head_dim": 512, "block_n": None, "num_stages": None,
          "num_warps": None, "smem_budget": 160 * 1024, "scratch_frac": 4.0, "min_chunk": 0,
          "dynamic_chunk": True, "buffer_store": "after_loop", "combine_one_pass": True, "pdl": False}
# ``buffer_store``: where ``BUFFER`` mode (attention_buffer_inplace) stores the new row -- "after_loop"
# (the default: one row loaded and stored by one program, the loop identical to the read-only kernel's)
# or "loop" (the first design: the program holding row pos stores it from its K/V tile, which makes
# every tile a non-dot use and measured 1.5x the read-only kernel's time; kept for the bench).
BUFFER_STORES = ("after_loop", "loop")
# ``combine_one_pass``: the combine loads every split at once when [splits, DV slice] <= 4096 fp32
# (False: blocks of 64 splits, a pass for the max then one for the sums, as before; for the bench).
# ``pdl``: launch the combine as a programmatic dependent launch of the partial kernel (sm_90+; its
# launch and scheduling overlap the partial kernel's tail, it waits for the partials with
# griddepcontrol.wait). Off by default until measured (bench kernel ``buffer_pdl``).


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class Plan:
    block_g: int     # query heads per program (>= 16: the tensor-core M dimension)
    num_gb: int      # head blocks per KV head
    block_n: int     # rows per inner iteration
    block_d: int     # padded q/k head dim
    block_dv: int    # padded v head dim
    splits: int      # chunks of the virtual sequence
    chunk: int       # rows per chunk (multiple of block_n)
    num_warps: int
    num_stages: int


def plan(groups: int, bh: int, span: int, d: int, dv: int, sm_count: int, elem_bytes: int = 2,
         kv_same: bool = False, copy: bool = False) -> Plan:
    """Blocks and splits for ``groups`` query heads per KV head, ``bh`` = batch * KV heads,
    ``span`` rows to reduce (static upper bound; the :data:`DYNAMIC` modes re-cut the rows that are
    there into ``splits`` chunks at run time, ``chunk`` is then unused), head dims ``d`` / ``dv``, cache elements of
    ``elem_bytes``; ``kv_same``: one tensor is both K and V (a row is read once); ``copy``: the
    kernel also writes every row it reads (measured faster with plain register loads, 1 stage)."""
    if groups < 1 or bh < 1 or d < 1 or dv < 1:
        raise ValueError(f"plan: need positive sizes, got groups={groups}, bh={bh}, d={d}, dv={dv}")
    block_d, block_dv = max(16, next_pow2(d)), max(16, next_pow2(dv))
    widest = max(block_d, block_dv)
    # registers: the q tile [G, D], the k and v tiles [N, D] and the fp32 accumulator [G, DV]
    g_cap = 64 if widest <= 128 else (32 if widest <= 256 else 16)
    block_g = min(max(16, next_pow2(groups)), g_cap)
    num_gb = -(-groups // block_g)
    # shared memory: one K (+ V) tile within half the budget (dot operands are staged there), and
    # num_stages tiles in flight within the budget (two at least, except for the copying kernels)
    row_bytes = (block_d + (0 if kv_same else block_dv)) * elem_bytes
    block_n = CONFIG["block_n"] or (64 if widest <= 256 else 32)
    min_stages = 1 if copy or CONFIG["num_stages"] == 1 else 2
    budget = CONFIG["smem_budget"]
    while block_n > 16 and (2 * block_n * row_bytes > budget or min_stages * block_n * row_bytes > budget):
        block_n //= 2
    num_stages = CONFIG["num_stages"] or (
        1 if copy else max(1, min(3, CONFIG["smem_budget"] // (block_n * row_bytes))))
    # splits: at most programs_per_sm programs per SM (one wave: a partial second wave costs up to
    # 2x), and the fp32 partials (G x DV per split) stay a small fraction of the K/V bytes each
    # split reads. (Sizing the wave from the pipeline's shared memory, one program per SM for the
    # d=512 read kernels, measured 1.2-1.6x slower on the H200: BENCHMARKS.md.)
    slots = max(1, sm_count * CONFIG["programs_per_sm"])
    span = max(1, span)
    min_chunk = groups * block_dv * 4 / (CONFIG["scratch_frac"] * row_bytes)
    max_splits = max(1, int(span // max(min_chunk, CONFIG["min_chunk"], 1.0)))
    splits = max(1, min(-(-span // block_n), slots // (bh * num_gb), max_splits))
    chunk = -(-(-(-span // splits)) // block_n) * block_n
    splits = -(-span // chunk)
    # H200 sweeps (BENCHMARKS.md): 4 warps for the read-only kernels, 8 for the copying ones
    num_warps = CONFIG["num_warps"] or (8 if copy else 4)
    return Plan(block_g, num_gb, block_n, block_d, block_dv, splits, chunk, num_warps, num_stages)
