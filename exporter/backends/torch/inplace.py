"""The torch engine's in-place buffer caches: each ``effexport::attention_buffer`` over two cache
inputs of the step becomes ``effexport::attention_buffer_inplace`` on those inputs, and the step's
presents of those caches become the inputs themselves.

The functional op returns new buffers: on CUDA its kernel copies both whole buffers every step (and
a runtime then copies each present back into the memory the next step reads), twice the buffers'
bytes for one written row. The in-place op writes rows ``pos..pos+T-1`` into the caller's buffers and
returns only the attention output, so a step moves the rows it reads and the rows it writes; a
present that *is* its cache input needs no copy-back (:class:`~.engine._DecodeGraph` skips it).

This is a rewrite of the engine's own copy of the step graph at load time, not of the artifact:
``program.pt2`` is the backend-neutral functional step that the ONNX and AOTInductor lowerings also
start from (presents returned, inputs untouched, what ``effexport.json``'s ``inputs`` / ``outputs``
and every numpy runtime promise), and ``torch.export`` does not return an output that aliases an
input. Mutating the caches is the engine's decision, about memory that the engine (or its caller,
told so by :class:`~.engine.TorchEngine`) owns.

Correctness of the rewritten graph:

* Order. A KV-sharing consumer (``attention_read``) read the owner's present, so it comes after the
  owner's op in the graph; it now reads the cache input, which the in-place op, earlier in the same
  order, has already written. A node runs in graph order in the eager GraphModule; under
  ``torch.compile`` AOTAutograd functionalises the mutation (the op's schema declares
  ``mutates_args=("k_buf", "v_buf")``), so every later read sees the written value, and Inductor
  re-inplaces it onto the input (an input mutation, written back by the compiled graph).
* Only caches read by nothing else are rewritten: a cache input whose other readers read more than
  its metadata (a size query, a metadata assert, ``torch.export``'s guard function) keeps the
  functional op, since a reader of the old contents could see the new rows.
* Only caches whose present is the op's own returned buffer are aliased (the present of the same
  cache, not another cache's slot and not a value computed from it).
* Prefill (T > 1) is the same op with T rows (the op handles any T that fits the buffer).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

import effexport.custom_ops.attention  # noqa: F401  (registers the ops named below)
from effexport.passes._graph import call_args, is_call

__all__ = ["aliased_caches", "inplace_buffers"]

aten = torch.ops.aten
BUFFER = torch.ops.effexport.attention_buffer.default
INPLACE = torch.ops.effexport.attention_buffer_inplace.default
_METADATA = (aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
             aten._assert_tensor_metadata.default)
"""Readers of a tensor that read no element of it."""
GUARDS = "_guards_fn"
"""The submodule in which ``ExportedProgram.module()`` checks its inputs' shapes (call_module)."""


def _metadata_only(user: fx.Node) -> bool:
    return is_call(user, *_METADATA) or (user.op == "call_module" and user.target == GUARDS)


def inplace_buffers(gm: fx.GraphModule, first_cache: int = 2) -> tuple[int, ...]:
    """Rewrite ``gm`` (``step(input_ids, pos, *caches) -> (logits, *presents)``; cache inputs from
    placeholder ``first_cache`` on) in place, as the module docstring says; returns the indices of
    the caches whose present is now the cache input itself (sorted; empty when nothing matched)."""
    graph = gm.graph
    caches = [n for n in graph.nodes if n.op == "placeholder"][first_cache:]
    index = {ph: i for i, ph in enumerate(caches)}
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    flat = output.args[0]
    if not isinstance(flat, (tuple, list)) or len(flat) != 1 + len(caches):
        return ()
    presents = list(flat[1:])
    aliased: list[int] = []
    for node in list(graph.nodes):
        if not is_call(node, BUFFER):
            continue
        a = call_args(node)
        k_buf, v_buf = a["k_buf"], a["v_buf"]
        if k_buf not in index or v_buf not in index or k_buf is v_buf:
            continue
        items = {u.args[1]: u for u in node.users if is_call(u, operator.getitem)}
        if len(items) != len(node.users) or 1 not in items or 2 not in items:
            continue
        if presents[index[k_buf]] is not items[1] or presents[index[v_buf]] is not items[2]:
            continue
        if not all(u is node or _metadata_only(u) for ph in (k_buf, v_buf) for u in ph.users):
            continue
        val = node.meta.get("val")
        with graph.inserting_before(node):
            new = graph.call_function(INPLACE, node.args, dict(node.kwargs))
        new.meta = {**node.meta, "val": val[0] if isinstance(val, (tuple, list)) else val}
        for i, replacement in ((0, new), (1, k_buf), (2, v_buf)):
            if i in items:
                items[i].replace_all_uses_with(replacement)
                graph.erase_node(items[i])
        graph.erase_node(node)
        aliased += [index[k_buf], index[v_buf]]
    if aliased:
        graph.lint()
        gm.recompile()
    return tuple(sorted(aliased))


def aliased_caches(module, first_cache: int = 2) -> tuple[int, ...]:
    """The indices of the caches whose present is the cache input itself in ``module``'s graph (a
    GraphModule, or a ``torch.compile`` of one); empty for anything else."""
    gm = getattr(module, "_orig_mod", module)
    if not isinstance(gm, fx.GraphModule):
        return ()
    caches = [n for n in gm.graph.nodes if n.op == "placeholder"][first_cache:]
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat = output.args[0]
    if not isinstance(flat, (tuple, list)) or len(flat) != 1 + len(caches):
        return ()
    return tuple(i for i, (ph, present) in enumerate(zip(caches, flat[1:])) if present is ph)
