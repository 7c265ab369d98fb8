"""Lower complex arithmetic to real arithmetic (Llama 4's RoPE: ``torch.polar``, ``view_as_complex``,
complex ``mul``, ``view_as_real``), which torch.onnx cannot translate.

A complex tensor ``z [*s]`` is carried as the real tensor ``view_as_real(z) [*s, 2]`` (real part,
imaginary part in the last dim): ``view_as_complex(x)`` becomes ``x`` itself and ``view_as_real(z)``
the pair tensor. Rewritten, per target:

    polar(r, theta)              stack([r cos theta, r sin theta], -1)
    mul(z, w)                    stack([zr wr - zi wi, zr wi + zi wr], -1)   (complex x complex)
    mul(z, s) / mul(z, x)        z * s, z * x[..., None]                     (complex x real)
    add / sub (complex, complex) elementwise on the pairs
    slice / unsqueeze / select / view / reshape / expand / permute / transpose / clone /
    to(complex dtype) / _to_copy  the same op on the pairs, dims counted from the front, shapes + [2]
    _assert_tensor_metadata      dropped (it asserts the complex dtype that no longer exists)

Find -> check -> replace: the complex nodes are those whose ``meta["val"]`` is complex; if any of
them (or a user of one) is an op outside this table the graph is left unchanged and the reason is
returned (the ONNX export then fails naming the op). Invariants: ``node.meta["val"]`` is set for
every new node (fake kernels in the graph's fake mode); no complex value remains after a successful
rewrite; values are those of the complex computation up to float rounding (complex mul as 4 real
products, as torch computes it on CPU).

Not covered: complex division, ``abs`` / ``angle`` / ``conj``, FFTs, complex graph inputs or outputs.
"""
from __future__ import annotations

import torch
from torch import fx

from effexport.passes._graph import aten, dead_code_elimination, fake_value, meta_val

REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}

_SAME = (aten.clone.default, aten.alias.default, aten.contiguous.default)
_DIM_OPS = (aten.slice.Tensor, aten.unsqueeze.default, aten.select.int)
_SHAPE_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)
_CASTS = (aten.to.dtype_layout, aten.to.dtype, aten._to_copy.default)
_MAKERS = (aten.polar.default, aten.view_as_complex.default)  # complex out of real inputs
SUPPORTED = (aten.polar.default, aten.view_as_complex.default, aten.view_as_real.default, aten.mul.Tensor,
             aten.add.Tensor, aten.sub.Tensor, aten.permute.default, aten.transpose.int,
             aten._assert_tensor_metadata.default, *_SAME, *_DIM_OPS, *_SHAPE_OPS, *_CASTS)


def _is_complex(node) -> bool:
    val = meta_val(node) if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_complex()


def find_complex(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes that produce or consume a complex tensor, in graph order."""
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and (_is_complex(n) or any(_is_complex(a) for a in n.all_input_nodes))]


def check_complex(nodes: list[fx.Node]) -> str:
    """"" if every node can be rewritten, else the reason."""
    for node in nodes:
        if node.target not in SUPPORTED:
            return f"complex value used by {node.target} ({node.name}), which has no real lowering here"
        if node.target not in _MAKERS and not any(_is_complex(a) for a in node.args[:2]):
            return f"{node.name}: {node.target} makes a complex tensor from real ones"
        if node.target in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor):
            if node.target is not aten.mul.Tensor and not all(_is_complex(a) for a in node.args[:2]):
                return f"{node.name}: {node.target} of a complex and a real tensor"
            if any(isinstance(a, complex) for a in node.args[:2]):
                return f"{node.name}: {node.target} with a complex Python scalar"
            if node.kwargs.get("alpha", 1) != 1:
                return f"{node.name}: {node.target} with alpha"
    return ""


def emit(graph: fx.Graph, target, args: tuple, kwargs: dict) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point (before the complex node
    being rewritten, so after all its inputs), with meta["val"] from the fake kernel."""
    node = graph.call_function(target, args, kwargs)
    node.meta["val"] = fake_value(graph, target, args, kwargs)
    return node


def _pair(graph, real, imag):
    """``stack([real, imag], -1)``."""
    return emit(graph, aten.stack.default, ([real, imag], -1), {})


def _parts(graph, z):
    return (emit(graph, aten.select.int, (z, -1, 0), {}), emit(graph, aten.select.int, (z, -1, 1), {}))


def _rewrite(graph: fx.Graph, node: fx.Node, real: dict) -> fx.Node | None:
    """The pair-tensor replacement of one complex node (None: dropped)."""
    t, args = node.target, node.args
    arg = real.get(args[0], args[0]) if args else None
    rank = meta_val(node.args[0]).dim() if args and isinstance(args[0], fx.Node) else 0
    if t is aten._assert_tensor_metadata.default:
        return None
    if t is aten.view_as_complex.default or t is aten.view_as_real.default:
        return arg
    if t is aten.polar.default:
        r, theta = args
        return _pair(graph, emit(graph, aten.mul.Tensor, (r, emit(graph, aten.cos.default, (theta,), {})), {}),
                     emit(graph, aten.mul.Tensor, (r, emit(graph, aten.sin.default, (theta,), {})), {}))
    if t is aten.mul.Tensor:
        a, b = args[:2]
        if _is_complex(a) and _is_complex(b):
            (ar, ai), (br, bi) = _parts(graph, real[a]), _parts(graph, real[b])
            mul = lambda x, y: emit(graph, aten.mul.Tensor, (x, y), {})  # noqa: E731
            return _pair(graph, emit(graph, aten.sub.Tensor, (mul(ar, br), mul(ai, bi)), {}),
                         emit(graph, aten.add.Tensor, (mul(ar, bi), mul(ai, br)), {}))
        z, other = (real[a], b) if _is_complex(a) else (real[b], a)
        if isinstance(other, fx.Node):
            other = emit(graph, aten.unsqueeze.default, (other, -1), {})
        return emit(graph, aten.mul.Tensor, (z, other), {})
    if t in (aten.add.Tensor, aten.sub.Tensor):
        return emit(graph, t, (real[args[0]], real[args[1]]), {})
    if t in _SAME:
        return emit(graph, t, (arg, *args[1:]), dict(node.kwargs))
    if t in _DIM_OPS:  # dims counted from the front: the pair dim stays last
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        out_rank = meta_val(node).dim()
        dim = dim % (out_rank if t is aten.unsqueeze.default else rank) if dim < 0 else dim
        return emit(graph, t, (arg, dim, *args[2:]), {k: v for k, v in node.kwargs.items() if k != "dim"})
    if t in _SHAPE_OPS:
        return emit(graph, t, (arg, [*args[1], 2], *args[2:]), dict(node.kwargs))
    if t is aten.permute.default:
        return emit(graph, t, (arg, [d % rank for d in args[1]] + [rank]), {})
    if t is aten.transpose.int:
        return emit(graph, t, (arg, args[1] % rank, args[2] % rank), {})
    # casts between complex dtypes -> the matching real dtype
    kwargs = dict(node.kwargs)
    if "dtype" in kwargs and kwargs["dtype"] in REAL_OF:
        kwargs["dtype"] = REAL_OF[kwargs["dtype"]]
    rest = tuple(REAL_OF.get(a, a) for a in args[1:])
    return emit(graph, t, (arg, *rest), kwargs)


def rewrite_complex(ctx) -> dict:
    """Pipeline pass: every complex value -> a real pair tensor. Counts the rewritten nodes; a graph
    with a complex op outside the table is left unchanged (``left_alone`` = 1, reason recorded)."""
    gm = ctx.program.gm
    nodes = find_complex(gm)
    if not nodes:
        return {"complex_nodes": 0, "left_alone": 0}
    why = check_complex(nodes)
    if why:
        ctx.analysis.left_alone.append(f"complex arithmetic: {why}")
        return {"complex_nodes": len(nodes), "left_alone": 1}
    graph, real = gm.graph, {}
    for node in nodes:
        with graph.inserting_before(node):
            new = _rewrite(graph, node, real)
        if node.target is aten.view_as_real.default:
            node.replace_all_uses_with(new)
        elif new is not None:
            real[node] = new
    for node in reversed(nodes):  # users first; every complex node is now unused
        if not node.users:
            graph.erase_node(node)
    dead_code_elimination(gm)
    gm.graph.lint()
    gm.recompile()
    left = [n.name for n in gm.graph.nodes if _is_complex(n)]
    if left:
        raise AssertionError(f"complex pass: complex values remain: {left}")
    return {"complex_nodes": len(nodes), "left_alone": 0}
