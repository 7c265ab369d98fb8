"""Fold the conversions of constant data that a step graph would repeat at every call.

A model often builds a constant table on the host and moves it to the step's device inside
``forward``: the samples' RoPE frequencies are computed in float64 on the CPU (so that ``.to(bf16)``
of the weights never rounds them) and ``rope_cos_sin`` does ``inv_freq.to(positions.device,
float32)``; DeepSeek V4 even recomputes its tables from ``arange`` in every layer; Hugging Face's
rotary modules do ``inv_freq[...].float().to(x.device)`` and norms do ``weight.float()``. Captured,
each of these is a ``to`` / ``_to_copy`` node whose input depends on nothing but module attributes
and literal factories (``arange(0, d, 2, dtype=float64, device="cpu")``). On a GPU such a node is
a host-to-device copy at every step, which also makes the step impossible to capture in a CUDA
graph (a copy from pageable host memory is not allowed while a stream captures); in half precision
it is a conversion kernel per step.

:func:`fold_constant_conversions` evaluates every such conversion once, when the pass runs, and
replaces it by a ``get_attr`` of a new non-persistent buffer of the graph module holding the
converted value (``folded_<source>_<dtype>``; equal values share one buffer). Buffers move with the
module (``gm.to(device)``, torch.export's ``move_to_device_pass``), so a program moved to another
device carries its constants there once, at the move. What stays in the graph: everything that
depends on an input -- the product of the positions with the folded frequencies, the gather by
position -- because ``pos`` is not constant.

A conversion that returns its input unchanged (``weight.float()`` of an fp32 weight, ``.to(device)``
of a tensor already there) is replaced by its input: no buffer. Not folded (counted):

* ``meta``: a value on the meta device (a structure-only build has no values to convert; the graph
  keeps the conversion, as written);
* ``large``: a same-device dtype conversion whose result would add more than
  :data:`MAX_DTYPE_FOLD_BYTES` (a second copy of a large weight costs more memory than the per-step
  cast costs time). Device moves are folded whatever their size.
"""
from __future__ import annotations

import operator
import re

import torch
from torch import fx

from effexport.passes._graph import attr

aten, prims = torch.ops.aten, torch.ops.prims

CONVERSIONS = frozenset({aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.to.other,
                         aten._to_copy.default, prims.convert_element_type.default})
"""Nodes that copy a tensor to another device and / or dtype."""

MAX_DTYPE_FOLD_BYTES = 64 << 20
"""A same-device dtype conversion of a constant is folded when its result takes at most this."""

_DEDUP_BYTES = 1 << 20  # equal folded values up to this size share one buffer


def _pure(node: fx.Node) -> bool:
    """A call that computes a value from its arguments alone: an aten / prims op without mutation or
    randomness (``operator.getitem`` of such a call too)."""
    if node.op != "call_function":
        return False
    target = node.target
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target.namespace not in ("aten", "prims"):
        return False
    schema = target._schema
    if schema.is_mutable or not schema.returns:
        return False
    return torch.Tag.nondeterministic_seeded not in target.tags


def constant_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on no placeholder: ``get_attr`` nodes and pure calls of them and of
    literals (a factory such as ``arange(8)``). A size read from an input (``sym_size``) is not
    constant, so neither is anything shaped by it."""
    const: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (_pure(node) and all(a in const for a in node.all_input_nodes)):
            const.add(node)
    return const


def constant_conversions(graph: fx.Graph) -> list[fx.Node]:
    """The conversion nodes (:data:`CONVERSIONS`) whose input is constant: what the step would
    convert again at every call. Empty after :func:`fold_constant_conversions` (meta and large
    conversions aside)."""
    const = constant_nodes(graph)
    return [n for n in graph.nodes if n.op == "call_function" and n.target in CONVERSIONS and n in const]


def _device_of(node: fx.Node) -> torch.device | None:
    val = node.meta.get("val")
    return val.device if isinstance(val, torch.Tensor) else None


def _source_name(node: fx.Node) -> str:
    """The first module attribute a constant node reads (for the buffer's name), else its op."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            return str(n.target)
        todo.extend(n.all_input_nodes)
    return "table"


def fold_constant_conversions(gm: fx.GraphModule) -> dict[str, int]:
    """Fold every constant conversion of ``gm`` (see the module docstring), in place; returns
    ``{"folded", "buffers", "noop", "meta", "large", "host_to_device"}``: conversions replaced by a
    buffer, buffers created, conversions that were the identity, left alone on meta, left alone
    as too large, and how many of the folded ones moved data to another device."""
    graph = gm.graph
    convs = constant_conversions(graph)
    counts = {"folded": 0, "buffers": 0, "noop": 0, "meta": 0, "large": 0, "host_to_device": 0}
    if not convs:
        return counts
    values: dict[fx.Node, object] = {}

    def value(node: fx.Node):
        if node not in values:
            if node.op == "get_attr":
                values[node] = attr(gm, str(node.target))
            else:
                args = fx.node.map_arg(node.args, value)
                kwargs = fx.node.map_arg(node.kwargs, value)
                values[node] = node.target(*args, **kwargs)
        return values[node]

    def on_meta(node: fx.Node) -> bool:
        todo, seen = [node], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            dev = _device_of(n)
            if dev is not None and dev.type == "meta":
                return True
            if n.op == "get_attr":
                v = attr(gm, str(n.target))
                if isinstance(v, torch.Tensor) and v.is_meta:
                    return True
            todo.extend(n.all_input_nodes)
        return False

    made: list[tuple[str, torch.Tensor]] = []
    names = {name for name, _ in gm.named_buffers()} | {name for name, _ in gm.named_parameters()}
    for node in convs:
        src = node.all_input_nodes[0]
        if on_meta(node):
            counts["meta"] += 1
            continue
        with torch.no_grad():
            result = value(node)
        source = value(src)
        if not isinstance(result, torch.Tensor) or not isinstance(source, torch.Tensor):
            continue
        moves = source.device != result.device
        if result is source:  # the identity: the conversion had nothing to do
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            counts["noop"] += 1
            continue
        nbytes = result.numel() * result.element_size()
        if not moves and nbytes > MAX_DTYPE_FOLD_BYTES:
            counts["large"] += 1
            continue
        result = result.detach().contiguous()
        name = next((n for n, t in made if nbytes <= _DEDUP_BYTES and t.dtype == result.dtype
                     and t.device == result.device and t.shape == result.shape and torch.equal(t, result)), None)
        if name is None:
            stem = "folded_" + re.sub(r"\W", "_", _source_name(node)) + "_" + str(result.dtype).replace("torch.", "")
            name, i = stem, 1
            while name in names or hasattr(gm, name):
                name, i = f"{stem}_{i}", i + 1
            gm.register_buffer(name, result, persistent=False)
            names.add(name)
            made.append((name, result))
            counts["buffers"] += 1
        with graph.inserting_before(node):
            getter = graph.get_attr(name)
        getter.meta = dict(node.meta)
        node.replace_all_uses_with(getter)
        graph.erase_node(node)
        counts["folded"] += 1
        counts["host_to_device"] += int(moves)
    return counts
