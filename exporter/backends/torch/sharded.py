"""Sharded ``--target torch`` artifacts (``--tp N``): one rank program per process, run together.

Layout (written by the build, :func:`effexport.exporter.build.build`)::

    DIR/effexport.json          the topology: target torch, ``sharded`` (world, tp, ep, per-rank files,
                                per-rank CachePlans and weight bytes, the ShardPlan's JSON); ``cache_plan``
                                is the unsharded plan
    DIR/rank{r}/program.pt2     rank r's step program (torch.export archive, ``_c10d_functional``
                                all-reduces on the default process group, "0")
    DIR/rank{r}/effexport.json  rank r's own torch manifest (its CachePlan: caches split by heads)
    DIR/report.json             as for any build, parity ``mode`` "sharded, gloo, N ranks"

``--target aoti --tp N`` writes the same layout with ``rank{r}/model.pt2``, rank r's program
compiled by AOTInductor (:mod:`effexport.exporter.backends.aoti`; its collectives called on the
process group named "0" at run time), and ``"aoti"`` in each rank's manifest; :func:`open_rank`
loads either kind, so the parity, ``effexport run`` and the torchrun launcher are the same.

:func:`rank_steps` is the one per-rank step loop (prefill in pieces of ``max_step_tokens``, then
one-token steps, teacher-forced or greedy); :func:`run_ranks` runs saved rank programs together in
spawned processes over gloo on the CPU (the build's and ``effexport check``'s parity);
:func:`launch` is one rank of a torchrun job (``effexport run DIR``: RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT from the environment, gloo on the CPU, nccl on CUDA).
"""
from __future__ import annotations

import os
import tempfile

import torch

from effexport.exporter.backends.artifact import MANIFEST, load_manifest, plan_entries
from effexport.exporter.errors import LoadError, UsageError, one_line

RANK_DIR = "rank{}"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_sharded(manifest: dict) -> bool:
    """The manifest is a sharded artifact's top-level one."""
    return isinstance(manifest.get("sharded"), dict)


def topology(directory: str, manifest: dict) -> list[tuple[str, list]]:
    """Per rank ``(program.pt2 path, cache entries)`` of the sharded artifact at ``directory``; every
    rank's files must be there (one-line :class:`LoadError` otherwise)."""
    ranks = manifest["sharded"].get("ranks")
    if not isinstance(ranks, list) or len(ranks) != manifest["sharded"].get("world"):
        raise LoadError(f"{directory!r}: effexport.json's 'sharded' entry does not list one entry per rank; "
                        "rebuild the artifact with --force")
    out = []
    for r, rank in enumerate(ranks):
        rank_dir = os.path.join(directory, RANK_DIR.format(r))
        rank_manifest = load_manifest(rank_dir)
        path = os.path.join(rank_dir, rank_manifest["files"]["step"])
        if not os.path.isfile(path):
            raise LoadError(f"{directory!r} lacks {os.path.relpath(path, directory)} (rank {r}'s program); "
                            "copy the whole artifact directory, or rebuild it with --force")
        out.append((path, plan_entries(rank_manifest)))
    return out


def open_rank(path: str, device: torch.device):
    """Rank program ``path`` as ``step(input_ids, pos, *caches) -> (logits, *presents)`` on ``device``:
    an AOTInductor package when the rank's manifest beside it has an ``"aoti"`` entry (loaded with the
    effexport ops registered; every input made contiguous and ``pos`` put where the package expects
    it), else the torch.export archive's module (moved to ``device`` when that is CUDA)."""
    import json

    manifest_path = os.path.join(os.path.dirname(path), MANIFEST)
    info = None
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            info = json.load(f).get("aoti")
    if info:
        from effexport.exporter.backends.aoti.runtime import load_package

        if torch.device(info["device"]).type != device.type:
            raise LoadError(f"{path} was compiled for {info['device']} and runs only there, not on {device.type}; "
                            f"rebuild the artifact with --target aoti on a {device.type} machine")
        model, pos_device = load_package(path, info["device"], info.get("weights")), torch.device(info["pos_device"])

        def step(input_ids, pos, *caches):
            return model(input_ids.contiguous(), pos.to(pos_device), *(c.contiguous() for c in caches))
        return step
    from effexport.exporter.backends.torch.engine import on_device
    from effexport.exporter.backends.torch.runtime import load_program

    ep = load_program(path)
    return (on_device(ep, device) if device.type == "cuda" else ep).module()


def rank_steps(program, entries: list, ids: torch.Tensor, decode: int, max_new: int | None = None,
               greedy: bool = False) -> tuple[torch.Tensor, list, torch.Tensor]:
    """This rank's steps: a prefill of ``ids`` (in pieces of ``max_new`` tokens when given: the
    program's ``max_step_tokens``), then ``decode`` one-token steps. Teacher-forced (``greedy``
    False): ``ids [B, P + decode]`` holds the decode tokens too. Greedy: ``ids [B, P]`` is the
    prompt and each decode token is the argmax of the last logits (the same on every rank: the
    all-reduced logits are). Returns ``(logits [B, P + decode, V] (greedy: P + decode - 1), final
    caches, tokens [B, P + decode])``."""
    device = ids.device
    prefill = ids.shape[1] - (0 if greedy else decode)
    caches = [e.empty(ids.shape[0], device) for e in entries]
    logits, tokens = [], ids
    with torch.no_grad():
        for start in range(0, prefill, max_new or prefill):
            end = min(prefill, start + (max_new or prefill))
            out = program(ids[:, start:end], torch.tensor(start, device=device), *caches)
            logits.append(out[0])
            caches = list(out[1:])
        for k in range(decode):
            pos = prefill + k
            if greedy:
                nxt = logits[-1][:, -1:].argmax(-1)
                tokens = torch.cat([tokens, nxt], 1)
                if k == decode - 1:
                    break
            else:
                nxt = ids[:, pos:pos + 1]
            out = program(nxt, torch.tensor(pos, device=device), *caches)
            logits.append(out[0])
            caches = list(out[1:])
    return torch.cat(logits, 1), caches, tokens


def _rank_main(rank: int, world: int, workdir: str, archives: list, ids: torch.Tensor, decode: int,
               max_new: int | None) -> None:
    """One spawned rank of :func:`run_ranks`: joins the gloo group, loads its archive, runs its steps."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world)
    try:
        path, entries = archives[rank]
        logits, caches, _ = rank_steps(open_rank(path, torch.device("cpu")), entries, ids, decode, max_new)
        torch.save({"logits": logits, "caches": [tuple(c.shape) for c in caches]},
                   os.path.join(workdir, f"out{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(archives: list, ids: torch.Tensor, decode: int, max_new: int | None = None) -> list[dict]:
    """Run saved rank programs together: ``archives`` per rank ``(program.pt2 path, cache entries)``,
    each rank a freshly spawned process (nothing inherited) over gloo on the CPU, teacher-forced on
    ``ids [B, P + decode]`` (:func:`rank_steps`). Returns per rank ``{"logits", "caches": final
    cache shapes}``. A rank that fails raises :class:`LoadError` naming it."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="effexport-ranks-") as workdir:
        try:
            mp.start_processes(_rank_main, args=(len(archives), workdir, archives, ids.cpu(), decode, max_new),
                               nprocs=len(archives), start_method="spawn")
        except mp.ProcessRaisedException as exc:
            last = (str(exc).strip().splitlines() or [""])[-1]
            raise LoadError(f"rank {exc.error_index} of {len(archives)} failed: {one_line(last, 200)}; rebuild "
                            "the artifact with --force") from None
        except mp.ProcessExitedException as exc:
            raise LoadError(f"rank {exc.error_index} of {len(archives)} exited with code {exc.exit_code}") from None
        return [torch.load(os.path.join(workdir, f"out{r}.pt")) for r in range(len(archives))]


def torchrun_env(world: int) -> tuple[int, int]:
    """``(rank, local rank)`` from torchrun's environment, checked against the artifact's ``world``;
    a missing or bad variable is a one-line :class:`UsageError`."""
    missing = [k for k in TORCHRUN_ENV if not os.environ.get(k)]
    if missing:
        raise UsageError(f"{', '.join(missing)} not set: start every rank under torchrun, e.g. 'torchrun "
                         f"--nproc-per-node {world} -m effexport.launch DIR ...', or drop torchrun's variables "
                         "altogether to let 'effexport run' start the ranks itself (gloo, CPU)")
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them)") from None
    if size != world:
        raise UsageError(f"WORLD_SIZE is {size} but the artifact has {world} ranks: start {world} processes "
                         f"(torchrun --nproc-per-node {world})")
    if not 0 <= rank < world:
        raise UsageError(f"RANK {rank} is outside 0..{world - 1}")
    return rank, local


def launch(directory: str, manifest: dict, ids: torch.Tensor, steps: int) -> torch.Tensor | None:
    """One rank of a torchrun job over the sharded artifact at ``directory``: initialise the default
    process group from the environment (nccl on CUDA, ``cuda:LOCAL_RANK``; gloo on the CPU), load
    this rank's program and generate ``steps`` greedy tokens after ``ids [B, P]``. Returns the tokens
    ``[B, P + steps]`` on rank 0, None on the others."""
    import torch.distributed as dist

    world = manifest["sharded"]["world"]
    rank, local = torchrun_env(world)
    path, entries = topology(directory, manifest)[rank]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=rank, world_size=world)
    try:
        _, _, tokens = rank_steps(open_rank(path, device), entries, ids.to(device), steps, manifest.get("max_step_tokens"),
                                  greedy=True)
    finally:
        dist.destroy_process_group()
    return tokens.cpu() if rank == 0 else None


def _spawned_rank(rank: int, world: int, port: int, directory: str, manifest: dict, ids: torch.Tensor,
                  steps: int, out: str) -> None:
    """One rank started by :func:`launch_local`: torchrun's variables set, then :func:`launch`."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    tokens = launch(directory, manifest, ids, steps)
    if tokens is not None:
        torch.save(tokens, out)


def launch_local(directory: str, manifest: dict, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """:func:`launch` on every rank of this machine without torchrun (spawned processes, a free local
    port, gloo on the CPU when no GPU is seen); returns rank 0's tokens."""
    import socket

    import torch.multiprocessing as mp

    world = manifest["sharded"]["world"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="effexport-run-") as workdir:
        out = os.path.join(workdir, "tokens.pt")
        try:
            mp.start_processes(_spawned_rank, args=(world, port, directory, manifest, ids.cpu(), steps, out),
                               nprocs=world, start_method="spawn")
        except mp.ProcessRaisedException as exc:
            last = (str(exc).strip().splitlines() or [""])[-1]
            raise LoadError(f"rank {exc.error_index} of {world} failed: {one_line(last, 200)}") from None
        return torch.load(out)
