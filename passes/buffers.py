"""The ``buffers`` pass: full caches as fixed-capacity buffers written in place by the runtime.

With ``cache_layout="buffer"`` every ``effexport::attention_cache`` whose past K and V are step
inputs of their own becomes ``effexport::attention_buffer`` over a ``[B, Hkv, max_context, d]``
buffer: the step's past and present of that cache have one fixed shape, so a runtime binds them to
one device buffer that the attention writes in place (ONNX Runtime's GroupQueryAttention shared-buffer
mode), instead of a present that grows by a copy of the whole cache every step, and a CUDA graph can
be captured over fixed shapes. Readers of the cache (KV-sharing consumers' ``attention_read``) take
the buffer unchanged: they mask every row past ``pos + T - 1``.

The default layout ``"grow"`` changes nothing. A cache with another reader of its past (anything but
the one ``attention_cache`` and size queries of its batch or head dims) keeps the growing layout; the count of such caches is returned as
``kept``. Ring, compressed and state caches are fixed-size already and are not touched.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from effexport.passes._graph import call_args, emit, is_call
from effexport.passes.attention import resize_cache

__all__ = ["CACHE_LAYOUTS", "buffer_full_caches"]

ops, aten = torch.ops.effexport, torch.ops.aten
CACHE_LAYOUTS = ("grow", "buffer")
"""``grow``: full caches are ``cat(past, new)`` each step; ``buffer``: fixed ``max_context`` rows."""


def _only_read_by(ph, node: fx.Node) -> bool:
    """``ph`` is a placeholder whose only readers are ``node`` and size queries of dims the buffer keeps
    (torch.export reads the batch size off whichever input has it)."""
    return isinstance(ph, fx.Node) and ph.op == "placeholder" and all(
        user is node or (is_call(user, aten.sym_size.int) and user.args[1] not in (2, -2)) for user in ph.users)


def buffer_full_caches(gm: fx.GraphModule, pos: fx.Node, capacity: int) -> tuple[set[fx.Node], int]:
    """Rewrite each owned full cache's ``attention_cache`` into ``attention_buffer`` of ``capacity`` rows.

    Returns (the past placeholders of every buffered K and V, number of full caches kept growing
    because their past has another reader)."""
    graph, buffers, kept = gm.graph, set(), 0
    for node in list(graph.nodes):
        if not is_call(node, ops.attention_cache.default):
            continue
        a = call_args(node)
        pasts = (a["k_past"], a["v_past"])
        if not all(_only_read_by(p, node) for p in pasts):
            kept += 1
            continue
        for ph in pasts:
            resize_cache(ph, capacity)
            buffers.add(ph)
        outs = emit(graph, ops.attention_buffer.default,
                    (a["q"], a["k_new"], a["v_new"], a["k_past"], a["v_past"], pos, a["sinks"]),
                    dict(scale=a["scale"], window=a["window"], softcap=a["softcap"]), n_out=3)
        for user in list(node.users):
            if is_call(user, operator.getitem):
                user.replace_all_uses_with(outs[user.args[1]])
    return buffers, kept
