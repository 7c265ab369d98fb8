"""Run tensor-parallel step programs together: one process per rank over gloo (CPU), prefill then
one-token decode steps, every rank's logits written back for the test to compare with eager."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


_RANKS: list = []  # the programs of the run in progress, inherited by the forked rank processes


def _rank_main(rank: int, world: int, directory: str, decode: int, ids: torch.Tensor) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    try:
        program, entries = _RANKS[rank]
        prefill = ids.shape[1] - decode
        caches = [e.empty(ids.shape[0]) for e in entries]
        logits = []
        with torch.no_grad():
            out = program(ids[:, :prefill], torch.tensor(prefill * 0), *caches)
            logits.append(out[0])
            for t in range(prefill, ids.shape[1]):
                caches = list(out[1:])
                out = program(ids[:, t:t + 1], torch.tensor(t), *caches)
                logits.append(out[0])
        torch.save({"logits": torch.cat(logits, 1), "caches": [tuple(c.shape) for c in out[1:]]},
                   f"{directory}/out{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_sharded(ranks: list, ids: torch.Tensor, decode: int, directory: str) -> list[dict]:
    """``ranks``: per rank ``(graph module, cache entries)``; runs them together over gloo on
    ``ids [B, P + decode]`` (a prefill of P tokens, then ``decode`` one-token steps) and returns
    each rank's ``{"logits" [B, P + decode, V], "caches": final cache shapes}``."""
    world = len(ranks)
    _RANKS[:] = ranks  # a GraphModule of an exported graph does not pickle: the ranks are forked
    try:
        mp.start_processes(_rank_main, args=(world, directory, decode, ids), nprocs=world, start_method="fork")
    finally:
        _RANKS.clear()
    return [torch.load(os.path.join(directory, f"out{r}.pt")) for r in range(world)]
