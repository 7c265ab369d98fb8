"""Graph helpers shared by the passes: schema-normalised arguments, transparent-op stripping,
ancestor sub-graphs and their evaluation at probe sizes, inserting a node with its fake value
(:func:`emit`, :func:`fake_value`), and closing a pass (:func:`finish`: dead code, lint, recompile).

Everything compares targets to ``OpOverload`` handles and reads arguments by schema name, never by
position or string (docs/ARCHITECTURE.md, "Pass invariants").
"""
from __future__ import annotations

import operator
import zlib
from typing import Any, Callable, Iterable

import torch
from torch import fx

aten = torch.ops.aten

# casts and layout no-ops that do not change values a pattern cares about
TRANSPARENT = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
    aten.contiguous.default, aten.clone.default, aten.alias.default,
}


def is_call(node: Any, *targets) -> bool:
    """True if ``node`` is a call_function of one of ``targets`` (OpOverloads or callables)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def call_args(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (OpOverload targets only)."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


FULL_SLICE_END = 2 ** 62


def is_full_slice(node: Any) -> bool:
    """``x[:, :]``-style no-op slices (start 0, step 1, end >= 2^62) that export keeps from indexing."""
    if not is_call(node, aten.slice.Tensor):
        return False
    a = call_args(node)
    return (a.get("start") in (None, 0) and a.get("step", 1) == 1
            and isinstance(a.get("end"), int) and a["end"] >= FULL_SLICE_END)


def is_noop_pad(node: Any) -> bool:
    """``pad(x, [0, 0, ...])``: a pad by zero widths (Hugging Face pads states to a size they have)."""
    if not is_call(node, aten.pad.default, aten.constant_pad_nd.default):
        return False
    widths = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    return isinstance(widths, (list, tuple)) and all(isinstance(w, int) and w == 0 for w in widths)


def rounds(node: fx.Node) -> bool:
    """A cast from one float dtype to another that cannot hold every value of the first (fp32 ->
    bf16, fp16 <-> bf16): its output is a rounded copy, not the value it was given."""
    src, out = meta_val(node.args[0]) if node.args else None, meta_val(node)
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)):
        return False
    if src.dtype == out.dtype or not (src.dtype.is_floating_point and out.dtype.is_floating_point):
        return False
    return torch.finfo(out.dtype).bits <= torch.finfo(src.dtype).bits


def strip(node: Any) -> Any:
    """Follow transparent ops (exact casts, contiguous, no-op slices and pads) back to the value they
    forward. A rounding float cast (:func:`rounds`) stops the walk: in a bf16 model ``q.float()``
    strips to the bf16 query, not through its ``.to(bf16)`` to the fp32 RoPE arithmetic before it."""
    while ((is_call(node, *TRANSPARENT) and not rounds(node)) or is_full_slice(node)
           or is_noop_pad(node)):
        node = node.args[0]
    return node


def meta_val(node: Any):
    """``node.meta["val"]`` (a FakeTensor / SymInt) or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def rank(node: Any) -> int | None:
    """Tensor rank from the node's meta value, if known."""
    val = meta_val(node)
    return val.dim() if isinstance(val, torch.Tensor) else None


def scalar(value: Any) -> float | None:
    """A Python number argument as float (None for nodes / tensors)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def ancestors(nodes: Iterable[fx.Node], boundary: Iterable[fx.Node] = ()) -> list[fx.Node]:
    """All nodes the given nodes depend on (themselves included), in graph order; the walk does not
    go past ``boundary`` nodes (they are included, their inputs are not)."""
    seen: set[fx.Node] = set()
    stop = set(boundary)
    stack = [n for n in nodes if isinstance(n, fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in stop:
            stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(next(iter(seen)).graph.nodes)} if seen else {}
    return sorted(seen, key=order.__getitem__)


def extract(graph_module: fx.GraphModule, outputs: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A new GraphModule computing ``outputs`` from the placeholders they depend on.

    Returns the module and the original placeholders in its argument order."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = []
    for node in ancestors(outputs):
        if node.op == "placeholder":
            placeholders.append(node)
        env[node] = new.node_copy(node, lambda n: env[n])
    new.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(graph_module, new), placeholders


def uses_parameters(nodes: Iterable[fx.Node]) -> bool:
    """True if any node reads a module attribute (weights or buffers)."""
    return any(n.op == "get_attr" for n in nodes)


def concrete_shape(val: torch.Tensor, env: dict) -> list[int]:
    """Substitute symbol values into a fake tensor's (possibly symbolic) shape."""
    out = []
    for d in val.shape:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            out.append(int(expr.subs({s: env.get(s, 1) for s in expr.free_symbols})))  # unset symbols: 1
        else:
            out.append(int(d))
    return out


def free_symbols(val: Any) -> set:
    """Sympy symbols in a fake tensor's shape or a SymInt."""
    syms: set = set()
    dims = val.shape if isinstance(val, torch.Tensor) else [val]
    for d in dims:
        if isinstance(d, torch.SymInt):
            syms |= set(d.node.expr.free_symbols)
    return syms


def insert_point(graph: fx.Graph, inputs: Iterable[Any]) -> fx.Node:
    """The latest node among ``inputs`` in graph order (new nodes go right after it)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = [n for n in inputs if isinstance(n, fx.Node)]
    return max(nodes, key=order.__getitem__)


_SEEDED_BUT_PURE = (aten.scaled_dot_product_attention.default,)


def dead_code_elimination(gm: fx.GraphModule) -> int:
    """Remove unused side-effect-free nodes; returns how many were removed.

    Export's ``_assert_tensor_metadata`` checks (one per ``.to()``) count as side effects and would
    keep dead masks alive; they only re-assert dtypes the fake tensors already carry, so they go.
    So do unused SDPA calls without dropout (fx counts the op as impure for its dropout RNG), e.g.
    the sites a rewrite replaced in an SDPA-based (Hugging Face) model, and eval-mode dropouts
    (``dropout(x, p, train=False)`` is ``x``; Hugging Face's eager attention keeps one per site)."""
    before = len(gm.graph.nodes)
    for node in list(gm.graph.nodes):
        if is_call(node, aten._assert_tensor_metadata.default):
            gm.graph.erase_node(node)
        elif is_call(node, *_SEEDED_BUT_PURE) and not node.users and not call_args(node).get("dropout_p"):
            gm.graph.erase_node(node)  # fx keeps dropout-capable ops alive; without dropout they are pure
        elif is_call(node, aten.dropout.default) and (not call_args(node)["train"] or call_args(node)["p"] == 0):
            node.replace_all_uses_with(call_args(node)["input"])  # eval-mode / p=0 dropout: the identity
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    return before - len(gm.graph.nodes)


SYM_OPS: dict[Callable, Callable] = {operator.add: operator.add, operator.sub: operator.sub,
                                     operator.mul: operator.mul, operator.floordiv: operator.floordiv}


def attr(module: torch.nn.Module, target: str) -> Any:
    """The module attribute a ``get_attr`` node with ``target`` reads (dotted path)."""
    for part in target.split("."):
        module = getattr(module, part)
    return module


def attr_value(module: torch.nn.Module, target: str) -> Any:
    """A CPU copy of :func:`attr` for numeric probes, which never touch the real parameter and run on
    the CPU whatever the model's device (:func:`probe_call`; the probes' random inputs are CPU
    tensors). A tensor without values (a model built on the meta device) becomes a stand-in seeded
    from ``target``: normal floats, zero integers / booleans. A probe that proves a sub-graph computes
    an op for random parameter values proves it for the real ones when the computation is the same."""
    value = attr(module, target)
    if not isinstance(value, torch.Tensor):
        return value
    if not value.is_meta:
        return value.detach().to("cpu", copy=True)
    if not value.dtype.is_floating_point:
        return torch.zeros(tuple(value.shape), dtype=value.dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(target.encode()))
    return torch.randn(tuple(value.shape), generator=gen).to(value.dtype)


PROBE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-2}
"""Relative tolerance of a numeric probe (a sub-graph against the op that replaces it) by the dtype
the graph computes in: half precision rounds every intermediate, so a bf16 model's sub-graph and the
op's reference differ at the 1e-2 level where fp32 agrees to 1e-6; a sub-graph that computes
something else is off at the 1e-1 to 1e0 level in any dtype."""


def probe_tolerance(*tensors: torch.Tensor) -> float:
    """The loosest :data:`PROBE_RTOL` over the floating dtypes of ``tensors`` (the graph's values)."""
    return max((PROBE_RTOL.get(t.dtype, 1e-5) for t in tensors if t.dtype.is_floating_point), default=1e-5)


def probe_call(node: fx.Node, values: dict) -> Any:
    """Run ``node`` on probe ``values`` (``{input node: value}``), on the CPU: a ``device`` argument
    the graph recorded (``meta`` for a model built without weights, ``cuda``) is replaced."""
    cpu = torch.device("cpu")
    args = tuple(cpu if isinstance(a, torch.device) else a for a in fx.node.map_arg(node.args, values.__getitem__))
    kwargs = {k: cpu if isinstance(v, torch.device) else v
              for k, v in fx.node.map_arg(node.kwargs, values.__getitem__).items()}
    return node.target(*args, **kwargs)


def example_past(gm: fx.GraphModule, minimum: int = 0) -> int:
    """The past length the graph was captured at: the largest size hint (the example value torch.export
    recorded) of a placeholder's dynamic non-batch dim. ``torch.export`` kept only the branches of
    the size comparisons that example took, so probes and re-exports should not go below it."""
    hints = [int(d.node.hint or 0) for n in gm.graph.nodes if n.op == "placeholder" and n.name != "input_ids"
             and isinstance(n.meta.get("val"), torch.Tensor) for d in n.meta["val"].shape[1:]
             if isinstance(d, torch.SymInt)]
    return max([minimum, *hints])


def fake_mode_of(graph: fx.Graph):
    """The FakeTensorMode the graph's meta values were traced under."""
    for node in graph.nodes:
        val = meta_val(node)
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    raise ValueError("graph has no fake tensor metadata")


def fake_value(graph: fx.Graph, target, args, kwargs):
    """meta["val"] of a new node ``target(*args, **kwargs)`` of ``graph``: the call on its inputs'
    fake values (nested in lists too) in the graph's FakeTensorMode."""
    fargs, fkwargs = fx.node.map_arg((args, kwargs), meta_val)
    with fake_mode_of(graph):
        return fake_call(target, list(fargs), fkwargs)


def fake_call(target, args, kwargs):
    """``target(*args, **kwargs)`` on fake values (inside their FakeTensorMode), for a new node's
    meta["val"]. torch 2.11's ``aten.matmul`` of a >= 3-d tensor with a symbolic batch and a 2-d
    matrix calls ``numel()`` and raises ("Cannot call numel() on tensor with symbolic sizes"; torch
    2.13 does not): its value is then computed as the broadcast product summed over k, which has the
    same shape and dtype."""
    try:
        return target(*args, **kwargs)
    except RuntimeError as exc:
        left, right = (list(args) + [None, None])[:2]
        if (target is not aten.matmul.default or "symbolic sizes" not in str(exc)
                or not isinstance(left, torch.Tensor) or not isinstance(right, torch.Tensor)
                or left.dim() < 2 or right.dim() != 2):
            raise
        return matmul_2d_value(left, right)


def matmul_2d_value(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left [..., n, k] @ right [k, m]`` as a broadcast product summed over k: the same shape,
    dtype and device as ``aten.matmul`` (used for fake values only: it materializes ``[..., n, k, m]``)."""
    return (left.unsqueeze(-1) * right).sum(-2)


def emit(graph: fx.Graph, target, args: tuple, kwargs: dict, n_out: int = 0):
    """Insert ``target(*args, **kwargs)`` after its latest input; returns the node, or its
    ``getitem`` outputs when ``n_out`` > 0. Sets meta["val"] from the fake kernel."""
    after = insert_point(graph, [a for a in args if isinstance(a, fx.Node)])
    with graph.inserting_after(after):
        node = graph.call_function(target, args, kwargs)
    node.meta["val"] = fake_value(graph, target, args, kwargs)
    if not n_out:
        return node
    outs, prev = [], node
    for i in range(n_out):
        with graph.inserting_after(prev):
            item = graph.call_function(operator.getitem, (node, i))
        item.meta["val"] = node.meta["val"][i]
        outs.append(item)
        prev = item
    return outs


def count_linear(gm: fx.GraphModule) -> int:
    """Number of linear/matmul projections in the graph (for dead-projection accounting)."""
    return sum(1 for n in gm.graph.nodes if is_call(n, aten.linear.default))


def finish(gm: fx.GraphModule) -> int:
    """Dead-code elimination + lint + recompile; returns removed node count."""
    removed = dead_code_elimination(gm)
    gm.graph.lint()
    gm.recompile()
    return removed
