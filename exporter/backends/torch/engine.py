"""``TorchEngine``: run a rewritten step program in torch -- eager, or compiled by Inductor -- and, on
CUDA, replay one-token decode steps from CUDA graphs.

The program is ``step(input_ids [B, T], pos (0-d int64), *caches) -> (logits, *presents)`` (a
GraphModule, or an ``ExportedProgram`` whose ``module()`` is one). ``compile=True`` wraps it in
``torch.compile`` (Inductor, default mode): Inductor generates kernels for the aten ops and the
``effexport`` ops stay opaque calls of the registered custom ops, which on CUDA dispatch to their
Triton kernels once :func:`effexport.custom_ops.enable_triton` ran (the engine calls it on CUDA when
Triton is installed). Shapes that change (a prefill's length, a growing cache) recompile as
``torch.compile`` does (automatic dynamic shapes after the second size).

In-place buffers (``inplace=True``, the default): the engine runs its own copy of the step graph in
which every ``effexport::attention_buffer`` over two cache inputs is ``attention_buffer_inplace`` on
them and the step's presents of those caches are the cache inputs (:mod:`.inplace`, which says why
this is the engine's rewrite and not the artifact's). A step then writes the new rows into the
``buffer`` caches it is given and returns those very tensors (:attr:`TorchEngine.inplace` names
them); a caller that keeps an earlier step's caches clones them first. Other caches (ring, state,
...) stay functional. ``inplace=False`` runs the program as it is.

Packed projections (``pack=True``, the default): in the same copy, the ``linear`` calls that read one
input with constant weights (a layer's Q / K / V, its gate / up) become one GEMM over the
concatenated weights, split into views (:mod:`.packing`, which says why and what it costs).

Tuned compile (``tune=True``, off by default; with ``compile`` only): Inductor's
``coordinate_descent_tuning`` (:data:`TUNED`, the lever of gpt-fast's settings), which tunes the launch
configuration of every Triton kernel Inductor generates against the shapes it is compiled for.
Measured on an H100 (Gemma 4 E2B real size, bf16, compiled + CUDA graph, 32K B1): 3.18 / 3.31 ms per
step against 3.53 / 3.51 ms (two calls, -10% / -6%), its logits 5.2e-2 from the same step in fp32
where the default compile's are 1.1e-1 (the uncompiled bf16 step's: 1.0e-1) -- closer to fp32, not
farther. The cost is compile time: 86-160 s per compiled shape against 45-90 s.

CUDA graphs (``cuda_graphs=True``, CUDA only): one graph per batch size, captured at the first
one-token step of that batch size after a warm-up on a side stream (which is also where a compiled
program compiles for that shape). The engine owns static memory for the graph -- ``input_ids [B, 1]``,
``pos``, one tensor per cache -- and the captured work is the step followed by copying each present
into its static cache -- except a present that is its static cache (an in-place buffer, which the
step has written already; :attr:`_DecodeGraph.copied` lists the caches copied) -- so a replay leaves
the next step's caches in place. :meth:`TorchEngine.step`
returns the static caches and the static logits: a caller that passes the returned caches back
(the usual loop) copies nothing; other caches are copied in first. The logits tensor is overwritten
by the next replay of that batch size (clone it to keep it). Prefill and other multi-token steps run
uncaptured. Graphs need caches of fixed shape: an artifact with growing (``full``) caches runs every
step uncaptured (:attr:`TorchEngine.graph_reason` says why); build with ``--kv-cache buffer``.
A replay writes ``max_context``-row buffers past their end without a check (the op's own check reads
``pos`` on the host, which a captured step cannot), so :meth:`step` refuses such a position first.

Memory: per captured batch size, the static caches plus the graph's own pool (the presents before
they are copied back): about twice the caches of that batch size, less the in-place buffers' second
copy.
"""
from __future__ import annotations

import copy
import importlib.util

import torch
from torch import fx

from effexport.exporter.backends.torch.inplace import aliased_caches, inplace_buffers
from effexport.exporter.backends.torch.packing import pack_projections
from effexport.exporter.errors import BackendMissingError, LoadError
from effexport.passes.cache_plan import CacheEntry

TUNED = {"coordinate_descent_tuning": True}
"""The Inductor options ``TorchEngine(tune=True)`` compiles with."""

FIXED_KINDS = ("ring", "chunk", "buffer", "compressed", "state")
"""Cache kinds whose shape does not change from step to step (what a CUDA graph replays on)."""


def on_device(ep: torch.export.ExportedProgram, device: torch.device) -> torch.export.ExportedProgram:
    """``ep`` with its weights, constants and the device arguments in its graph on ``device``
    (``torch.export.passes.move_to_device_pass``; in place, returned)."""
    from torch.export.passes import move_to_device_pass

    if device.type == "cuda" and device.index is None:
        # a bare "cuda" would be written into the graph's _assert_tensor_metadata checks, which cuda:0
        # tensors then fail ("Expected: cuda, Got: cuda:0")
        device = torch.device("cuda", torch.cuda.current_device())
    return move_to_device_pass(ep, device)


def _graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule running a copy of ``gm``'s graph (``Graph.__deepcopy__``: new nodes, the metadata
    shared) over ``gm``'s own parameters and submodules."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are the same memory seen the same way (a present that is its cache)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device)


def copy_backs(caches: list[torch.Tensor], presents: list[torch.Tensor]) -> tuple[int, ...]:
    """The indices of the presents a captured step copies into their caches: every present but those
    that are their cache (the in-place buffers of :mod:`.inplace`)."""
    return tuple(i for i, (c, p) in enumerate(zip(caches, presents)) if not _same_view(c, p))


class _DecodeGraph:
    """One captured one-token step of batch ``B``: static inputs, static caches, the graph, and
    ``copied``, the indices of the caches whose present the captured step copies back."""

    def __init__(self, fn, input_ids: torch.Tensor, pos: torch.Tensor, caches: list[torch.Tensor]):
        self.ids = input_ids.clone()
        self.pos = pos.clone()
        self.caches = [c.clone() for c in caches]
        saved = [c.clone() for c in self.caches]  # the warm-up also writes the in-place buffers' row
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # compiles (torch.compile) and warms the allocator outside the capture
                fn(self.ids, self.pos, *self.caches)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        storages = {c.untyped_storage().data_ptr() for c in self.caches}
        with torch.cuda.graph(self.graph), torch.no_grad():
            outs = fn(self.ids, self.pos, *self.caches)
            self.copied = copy_backs(self.caches, list(outs[1:]))
            # a present that is a view of another cache's static memory would be overwritten by that
            # cache's copy before its own: such presents are copied out first
            presents = [p.clone() if i in self.copied and p.untyped_storage().data_ptr() in storages else p
                        for i, p in enumerate(outs[1:])]
            for i in self.copied:
                self.caches[i].copy_(presents[i])
        self.logits = outs[0]
        for static, value in zip(self.caches, saved):  # the capture ran nothing; be exact anyway
            static.copy_(value)
        del saved


class TorchEngine:
    """A step program run by torch (eager or Inductor), with CUDA-graph decode on CUDA, (``inplace``)
    the buffer caches updated in place, (``pack``) the projections that read one input packed into
    one GEMM each (:mod:`.packing`) and (``tune``) Inductor's kernels tuned (:data:`TUNED`).
    :attr:`inplace`: the names of the caches whose present is the cache passed in; :attr:`aliased`:
    their indices; :attr:`packed`: the ``linear`` calls packing removed."""

    def __init__(self, program, entries: list[CacheEntry], device: str | torch.device = "cpu",
                 compile: bool | None = None, cuda_graphs: bool | None = None, inplace: bool = True,
                 pack: bool = True, tune: bool = False):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendMissingError("the torch engine was asked for CUDA and torch sees no CUDA device")
            if importlib.util.find_spec("triton") is not None:
                from effexport.custom_ops import enable_triton

                enable_triton()
        self.entries = list(entries)
        owned = isinstance(program, torch.export.ExportedProgram)
        if owned:
            program = program.module()  # a new module: the engine's own to rewrite
        self.packed = 0
        if (inplace or pack) and isinstance(program, fx.GraphModule):
            if not owned:  # the caller's graph stays as it is; the weights are shared
                program = _graph_copy(program)
            if inplace:
                inplace_buffers(program)
            if pack:
                self.packed = pack_projections(program)
        self.module = program
        self.aliased = aliased_caches(program)
        self.inplace = tuple(self.entries[i].name for i in self.aliased)
        cuda = self.device.type == "cuda"
        self.compiled = cuda if compile is None else bool(compile)
        if tune and not self.compiled:
            raise ValueError("tune=True tunes Inductor's kernels: it needs compile=True (the default on CUDA)")
        self.tuned = bool(tune)
        if not self.compiled:
            self.fn = program
        else:
            self.fn = torch.compile(program, options=dict(TUNED)) if tune else torch.compile(program)
        growing = [e.name for e in self.entries if e.kind not in FIXED_KINDS]
        want = cuda if cuda_graphs is None else bool(cuda_graphs)
        if want and not cuda:
            raise LoadError("CUDA graphs need a CUDA device; pass cuda_graphs=False on the CPU")
        if not want:
            self.graph_reason = "CUDA graphs off" if cuda else "CUDA graphs need a CUDA device"
        elif growing:
            self.graph_reason = (f"caches {', '.join(growing[:3])} grow every step: decode runs uncaptured "
                                 "(rebuild with --kv-cache buffer)")
        else:
            self.graph_reason = None
        self.cuda_graphs = self.graph_reason is None
        self.capacity = min((e.concrete_shape(1, 0)[2] for e in self.entries if e.kind == "buffer"), default=None)
        self.graphs: dict[int, _DecodeGraph] = {}

    def initial_caches(self, batch: int) -> list[torch.Tensor]:
        """The plan's prefill caches on the engine's device."""
        return [e.empty(batch, self.device) for e in self.entries]

    def step(self, input_ids: torch.Tensor, pos, caches: list[torch.Tensor]
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step: ``input_ids [B, T]`` at positions ``pos..pos+T-1`` (an int or 0-d tensor) over
        ``caches`` -> (logits, the caches for the next step). A one-token step replays the batch
        size's CUDA graph when graphs are on (see the module docstring for what it returns); an
        uncaptured step writes the :attr:`inplace` caches given (when on the engine's device) and
        returns them."""
        batch, new = input_ids.shape
        if self.capacity is not None and not isinstance(pos, torch.Tensor) and pos + new > self.capacity:
            raise ValueError(f"positions {pos}..{pos + new - 1} do not fit the caches' {self.capacity} rows "
                             "(build with a larger --max-context)")
        input_ids = input_ids.to(self.device, torch.int64)
        if self.cuda_graphs and new == 1:
            return self._replay(input_ids, pos, caches)
        pos_t = torch.as_tensor(pos, dtype=torch.int64).to(self.device)
        caches = [c.to(self.device) for c in caches]
        with torch.no_grad():
            outs = self.fn(input_ids.contiguous(), pos_t, *caches)
        return outs[0], list(outs[1:])

    def _replay(self, input_ids, pos, caches):
        batch = input_ids.shape[0]
        graph = self.graphs.get(batch)
        if graph is None:
            pos_t = torch.as_tensor(pos, dtype=torch.int64).to(self.device)
            graph = self.graphs[batch] = _DecodeGraph(self.fn, input_ids, pos_t, [c.to(self.device) for c in caches])
        graph.ids.copy_(input_ids)
        if isinstance(pos, torch.Tensor):
            graph.pos.copy_(pos)
        else:
            graph.pos.fill_(int(pos))  # a fill kernel: no host-to-device copy
        for static, cache in zip(graph.caches, caches):
            if static.data_ptr() != cache.data_ptr():
                static.copy_(cache)
        graph.graph.replay()
        return graph.logits, graph.caches
