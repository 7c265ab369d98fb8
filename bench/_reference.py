"""References for a half-precision model whose fp32 copy does not fit, and its routing decisions.

* :func:`fp32_streamed` / :class:`Fp32Eager`: the same model computing in fp32 with one block's weights
  upcast at a time. Every module held in an ``nn.ModuleList`` (the decoder layers) is upcast just before
  its ``forward`` and put back just after; everything else (embeddings, final norm, LM head, small
  top-level tensors) is upcast for the whole call. Peak extra memory: the largest block in fp32 plus the
  rest of the model in fp32 -- a 40-layer Laguna XS.2 (62 GiB in bf16) needs ~4 GiB, where a full fp32
  copy (124 GiB) does not fit next to it on an 80 GB GPU. The weights are the half-precision ones
  upcast exactly, so the reference isolates the arithmetic's rounding from the weights' (a full copy
  made from an fp32 init holds the unrounded weights). Every tensor is restored to its own dtype and
  values afterwards (upcasting a 16-bit float and back is exact).
* :func:`record_topk` / :func:`pin_topk`: the discrete choices a model makes through ``topk`` (MoE
  routers, sparse-attention indexers) recorded on one run and replayed on another: a run pinned to a
  recording takes the recorded indices at every ``topk`` call, in call order, and its values are the
  given scores at those indices. ``pin_topk`` counts the rows whose index *set* differs from the one
  the run would have chosen itself. So eager in bf16 pinned to fp32 eager's routing says how much of
  its error against fp32 comes from routing flips at near-ties and how much from everything else.
  Python-level calls are seen (``torch.topk`` and ``Tensor.topk``), and an FX program's ``aten.topk``
  nodes once :func:`topk_hooked` has retargeted them (a copy of the graph over the same weights): the
  rewritten step run uncaptured and uncompiled can be pinned as eager is. (A compiled or captured
  program cannot: Inductor would trace through the hook.)
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn

_HALF = (torch.float16, torch.bfloat16)


def _tensors(module: nn.Module, recurse: bool) -> list[torch.Tensor]:
    return [t for t in (*module.parameters(recurse=recurse), *module.buffers(recurse=recurse))
            if t.dtype in _HALF]


def _upcast(tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.dtype]]:
    done = []
    for t in tensors:
        if t.dtype in _HALF:  # a tensor shared by two modules is upcast once
            done.append((t, t.dtype))
            t.data = t.data.float()
    return done


def _restore(done: list[tuple[torch.Tensor, torch.dtype]]) -> None:
    for t, dtype in reversed(done):
        t.data = t.data.to(dtype)


def streamed_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`fp32_streamed` upcasts one at a time: every child of every ``nn.ModuleList``
    that is not inside another such child."""
    blocks: list[nn.Module] = []
    seen: set[int] = set()

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                for block in child:
                    if id(block) not in seen:
                        seen.add(id(block))
                        blocks.append(block)
            else:
                walk(child)
    walk(model)
    return blocks


@contextlib.contextmanager
def fp32_streamed(model: nn.Module):
    """``model`` computes in fp32 inside the block; see the module docstring. Not re-entrant."""
    blocks = streamed_blocks(model)
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    rest = {id(t): t for m in model.modules() if id(m) not in in_blocks for t in _tensors(m, False)}
    outer = _upcast(list(rest.values()))  # first: a tensor a block shares with the rest stays fp32 throughout
    handles: list = []
    open_: dict = {}

    def pre(block, _args):
        open_[id(block)] = _upcast(_tensors(block, True))

    def post(block, _args, _out):
        _restore(open_.pop(id(block), []))

    try:
        for b in blocks:
            handles.append(b.register_forward_pre_hook(pre))
            handles.append(b.register_forward_hook(post))
        yield model
    finally:
        for h in handles:
            h.remove()
        for done in open_.values():  # a forward that raised
            _restore(done)
        _restore(outer)


class Fp32Eager:
    """``model`` called as fp32 eager through :func:`fp32_streamed`: ``(input_ids, past=None) ->
    (logits, past)`` like the samples' models (the past holds fp32 caches)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        with fp32_streamed(self.model), torch.no_grad():
            return self.model(*args, **kwargs)


@dataclass
class TopkLog:
    """The indices of every ``topk`` call of a recorded run, in order; after a pinned run, per call the
    rows whose selected set differed from the run's own choice (``flipped``) out of ``rows``."""
    indices: list[torch.Tensor] = field(default_factory=list)
    flipped: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        """Calls, rows, flipped rows (in all and the largest share in one call)."""
        rows, flipped = sum(self.rows), sum(self.flipped)
        worst = max((f / r for f, r in zip(self.flipped, self.rows) if r), default=0.0)
        return {"calls": len(self.rows) or len(self.indices), "rows": rows, "flipped_rows": flipped,
                "flipped_share": flipped / rows if rows else 0.0, "worst_call_share": worst,
                "calls_with_flips": sum(1 for f in self.flipped if f)}


_ACTIVE: list = []  # the recording / pinning call of the innermost open context


def graph_topk(x, k, dim=-1, largest=True, sorted=True):  # noqa: A002 - aten's names
    """What :func:`topk_hooked` graphs call in place of ``aten.topk``: the open context's call, else
    ``aten.topk`` itself."""
    if _ACTIVE:
        out = _ACTIVE[-1](x, k, dim, largest, sorted)
        return out.values, out.indices
    return torch.ops.aten.topk.default(x, k, dim, largest, sorted)


def topk_hooked(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm``'s graph over the same weights whose ``aten.topk`` nodes call :func:`graph_topk`,
    and how many there are."""
    graph = copy.deepcopy(gm.graph)
    hooked = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.topk.default:
            node.target = graph_topk
            hooked += 1
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__), hooked


@contextlib.contextmanager
def _patched_topk(replacement):
    original_fn, original_method = torch.topk, torch.Tensor.topk
    torch.topk = replacement

    def method(self, *args, **kwargs):
        return replacement(self, *args, **kwargs)
    torch.Tensor.topk = method
    _ACTIVE.append(replacement)
    try:
        yield
    finally:
        _ACTIVE.pop()
        torch.topk, torch.Tensor.topk = original_fn, original_method


def _topk_call(original, x, k, dim=-1, largest=True, sorted=True):  # noqa: A002 - torch's name
    return original(x, k, dim=dim, largest=largest, sorted=sorted)


@contextlib.contextmanager
def record_topk(log: TopkLog | None = None):
    """Every ``topk``'s indices while the block runs, appended to the yielded :class:`TopkLog` (``log``
    to go on with one: a run recorded over several calls)."""
    log, original = log if log is not None else TopkLog(), torch.topk

    def call(x, k, dim=-1, largest=True, sorted=True):  # noqa: A002
        out = _topk_call(original, x, k, dim, largest, sorted)
        log.indices.append(out.indices.detach().clone())
        return out
    with _patched_topk(call):
        yield log


@contextlib.contextmanager
def pin_topk(recorded: TopkLog):
    """Every ``topk`` takes the next of ``recorded``'s indices (the values: the given tensor at those
    indices); the yielded log counts, per call, the rows whose own choice would have differed. A call
    beyond the recording, or of another shape, raises: the two runs are not the same computation."""
    log, original = TopkLog(), torch.topk

    def call(x, k, dim=-1, largest=True, sorted=True):  # noqa: A002
        i = len(log.rows)
        own = _topk_call(original, x, k, dim, largest, sorted)
        if i >= len(recorded.indices) or recorded.indices[i].shape != own.indices.shape:
            raise RuntimeError(f"topk call {i} {tuple(own.indices.shape)} has no recorded twin "
                               f"({len(recorded.indices)} recorded): the pinned run is not the recorded computation")
        idx = recorded.indices[i].to(own.indices.device)
        d = dim % x.dim()
        same = (own.indices.sort(dim=d).values == idx.sort(dim=d).values).all(dim=d)
        log.rows.append(same.numel())
        log.flipped.append(int((~same).sum()))
        return torch.return_types.topk((x.gather(d, idx), idx))
    with _patched_topk(call):
        yield log
