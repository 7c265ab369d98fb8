"""Run tensor-parallel step programs together: one process per rank over gloo (CPU), prefill then
one-token decode steps (the product's per-rank loop, ``exporter/backends/torch/sharded.py``
``rank_steps``), every rank's logits written back for the test to compare with eager."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from effexport.exporter.backends.torch.sharded import rank_steps

_RANKS: list = []  # the programs of the run in progress, inherited by the forked rank processes


def _rank_main(rank: int, world: int, directory: str, decode: int, ids: torch.Tensor, max_new: int | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    try:
        program, entries = _RANKS[rank]
        logits, caches, _ = rank_steps(program, entries, ids, decode, max_new)
        torch.save({"logits": logits, "caches": [tuple(c.shape) for c in caches]}, f"{directory}/out{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_sharded(ranks: list, ids: torch.Tensor, decode: int, directory: str,
                max_new: int | None = None) -> list[dict]:
    """``ranks``: per rank ``(graph module, cache entries)``; runs them together over gloo on
    ``ids [B, P + decode]`` (a prefill of P tokens, then ``decode`` one-token steps) and returns
    each rank's ``{"logits" [B, P + decode, V], "caches": final cache shapes}``; the prefill goes in
    pieces of ``max_new`` tokens when given (the program's ``max_new_tokens``)."""
    world = len(ranks)
    _RANKS[:] = ranks  # a GraphModule of an exported graph does not pickle: the ranks are forked
    try:
        mp.start_processes(_rank_main, args=(world, directory, decode, ids, max_new), nprocs=world, start_method="fork")
    finally:
        _RANKS.clear()
    return [torch.load(os.path.join(directory, f"out{r}.pt")) for r in range(world)]

