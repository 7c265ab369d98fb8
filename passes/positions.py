"""Make the step's position explicit: ``arange(P, P + T)`` -> ``arange(T) + pos``.

The captured graph derives the start position P from a cache tensor's length (the sample's naive,
full-length cache). Once caches become rings that length is W, not P, so every ``arange`` that
starts at a cache length is rewritten to start at the new ``pos`` input (a 0-d int64 tensor, the
position of the first new token). Any other reader of the past length (a layer left alone) is
pointed at a cache that still grows; if none is left, the rewrite fails naming the readers.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from effexport.passes.errors import RewriteError
from effexport.passes._graph import aten, call_args, emit, is_call, meta_val


def _cache_length(node, cache_placeholders) -> bool:
    """``sym_size(cache, d)`` where d is that cache's growing dim."""
    return (is_call(node, aten.sym_size.int) and node.args[0] in cache_placeholders
            and cache_placeholders[node.args[0]] == node.args[1])


def _arange_plus_length(node, cache_placeholders) -> bool:
    """``add(arange(T) [int64], sym_size(cache, d))``: positions counted from a cache length."""
    if not (is_call(node, aten.add.Tensor) and len(node.args) == 2 and is_call(node.args[0], aten.arange.default)
            and _cache_length(node.args[1], cache_placeholders)):
        return False
    return meta_val(node).dtype == torch.int64


def shift_aranges(graph: fx.Graph, pos: fx.Node, cache_placeholders: dict) -> int:
    """Rewrite every ``arange(len(cache), end)`` into ``arange(end - len(cache)) + pos`` and every
    ``arange(T) + len(cache)`` into ``arange(T) + pos``; returns how many. ``cache_placeholders``
    maps each growing cache placeholder to its growing dim."""
    count = 0
    for node in list(graph.nodes):
        if _arange_plus_length(node, cache_placeholders):  # arange(T) + len(cache), as transformers writes it
            node.replace_all_uses_with(emit(graph, aten.add.Tensor, (node.args[0], pos), {}))
            count += 1
            continue
        if not is_call(node, aten.arange.start, aten.arange.start_step):
            continue
        a = call_args(node)
        start, end = a["start"], a["end"]
        if a.get("step", 1) != 1 or not _cache_length(start, cache_placeholders):
            continue
        if is_call(end, operator.add) and start in end.args:
            length = end.args[1] if end.args[0] is start else end.args[0]
        else:
            with graph.inserting_before(node):
                length = graph.call_function(operator.sub, (end, start))
            length.meta["val"] = meta_val(end) - meta_val(start)
        kwargs = {k: v for k, v in node.kwargs.items() if k in ("device", "pin_memory", "layout")}
        kwargs["dtype"] = torch.int64
        ar = emit(graph, aten.arange.default, (length,), kwargs)
        shifted = emit(graph, aten.add.Tensor, (ar, pos), {})
        out_dtype = a.get("dtype") or torch.int64
        if out_dtype != torch.int64:
            shifted = emit(graph, aten.to.dtype, (shifted, out_dtype), {})
        node.replace_all_uses_with(shifted)
        count += 1
    return count


def rewrite_positions(gm: fx.GraphModule, pos: fx.Node, cache_placeholders: dict, rings: set) -> int:
    """Rewrite position ``arange``s; returns how many. Raises if a ring length is still read.

    ``cache_placeholders`` maps each growing cache placeholder to its growing dim."""
    graph = gm.graph
    count = shift_aranges(graph, pos, cache_placeholders)
    graph.eliminate_dead_code()
    live = [n for n in graph.nodes if is_call(n, aten.sym_size.int) and n.args[0] in rings
            and n.args[1] == cache_placeholders.get(n.args[0], 2) and n.users]
    # a layer left alone may still need the past length: read it from a cache that still grows
    full = [(ph, d) for ph, d in cache_placeholders.items() if ph not in rings]
    if live and full:
        ph, d = full[0]
        with graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1]):
            length = graph.call_function(aten.sym_size.int, (ph, d))
        length.meta["val"] = meta_val(ph).shape[d]
        for n in live:
            n.replace_all_uses_with(length)
        graph.eliminate_dead_code()
        live = []
    if live:
        users = ", ".join(sorted(u.name for n in live for u in n.users))
        raise RewriteError(f"positions pass: the length of a ring cache is still read by {users}; "
                           "the model derives more than RoPE positions and masks from its cache length")
    return count
