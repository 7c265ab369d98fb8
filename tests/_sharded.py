"""Run tensor-parallel step programs together: one process per rank over gloo (CPU), prefill then
one-token decode steps, every rank's logits written back for the test to compare with eager."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


_RANKS: list = []  # the programs of the run in progress, inherited by the forked rank processes


def _rank_main(rank: int, world: int, directory: str, decode: int, ids: torch.Tensor, max_new: int | None,
               archives: list | None = None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    try:
        if archives is None:
            program, entries = _RANKS[rank]
        else:  # a fresh (spawned) process loads its rank's torch.export archive, as a launcher would
            from effexport.exporter.backends.torch.runtime import load_program

            path, entries = archives[rank]
            program = load_program(path).module()
        prefill = ids.shape[1] - decode
        caches = [e.empty(ids.shape[0]) for e in entries]
        logits = []
        piece = max_new or prefill  # a prefill longer than the graph's step bound goes in pieces
        starts = list(range(0, prefill, piece)) + list(range(prefill, ids.shape[1]))
        ends = starts[1:] + [ids.shape[1]]
        with torch.no_grad():
            for start, end in zip(starts, ends):
                out = program(ids[:, start:end], torch.tensor(start), *caches)
                logits.append(out[0])
                caches = list(out[1:])
        torch.save({"logits": torch.cat(logits, 1), "caches": [tuple(c.shape) for c in caches]},
                   f"{directory}/out{rank}.pt")
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


def run_archives(archives: list, ids: torch.Tensor, decode: int, directory: str,
                 max_new: int | None = None) -> list[dict]:
    """:func:`run_sharded` for saved rank programs: ``archives`` per rank ``(program.pt2 path, cache
    entries)``, each rank a spawned process that loads its archive (nothing inherited)."""
    mp.start_processes(_rank_main, args=(len(archives), directory, decode, ids, max_new, archives),
                       nprocs=len(archives), start_method="spawn")
    return [torch.load(os.path.join(directory, f"out{r}.pt")) for r in range(len(archives))]
