"""Recognise manifold-constrained hyper-connections (mHC, DeepSeek V4) and fold them into one op each.

A captured mHC sub-layer is ~190 ATen nodes, ~120 of them the Sinkhorn projection unrolled (20
iterations of row / column normalisation). This pass replaces:

* pre-mixing (RMS-scaled linear over the flattened streams, sigmoid gates, Sinkhorn-projected residual
  mix, weighted sum of the streams) by ``effexport::mhc_pre``,
* post-mixing (``X'_j = post_j f + sum_i comb[i, j] X_i`` after the sub-layer) by ``effexport::mhc_post``,
* the head collapse (the same RMS-scaled linear with ``n`` rows, sigmoid gates, no Sinkhorn) by
  ``effexport::mhc_head``.

Recognition reads graph structure and numerics only, never module or attribute names:

1. *Mix projections*: ``linear(flatten(X [B, T, n, d]), fn [rows, n*d])`` multiplied by
   ``rsqrt(mean(xf^2, -1) + norm_eps)`` of the same flattened streams (``norm_eps`` read from the add),
   or the linear of the RMS-normalised flattened streams.
2. *Sinkhorn chains* (the anchor of a pre-mixing): ``softmax(L, -1) + eps`` followed by a chain of
   ``m / (sum(m, dim, keepdim) + eps)``; the op's schedule is column, then (row, column) pairs, so a
   chain of ``2k - 1`` normalisations is ``iters = k``. Any other schedule is left alone.
3. The mix projection feeding ``L`` (a bounded upward search) gives ``X`` and ``fn``; ``base`` and
   ``scale`` are the two parameters between it and ``L``, told apart by role (added vs multiplied) and
   shape (``[rows]`` vs ``[3]``, ``[n]`` vs ``[1]`` for the head).
4. Numerical proof before any rewrite: the chain alone on random logits far from convergence (so each
   iteration shows) against ``effexport::sinkhorn`` with the ``iters`` read from the graph; then every
   node computable from ``X`` and the parameters alone is evaluated on random streams, and the nodes equal
   (same dtype, fp32 rel <= 1e-5) to the op's ``u`` / ``post`` / ``comb`` are the ones replaced. Post-mixing
   is proven the same way from ``(X, f, post, comb)`` with random values for all four.

A candidate that fails a check is left alone and its reason lands in ``analysis.left_alone``.
Invariants: ``node.meta["val"]`` is set on every new node (the ops' fake kernels), the graph stays
topologically ordered and linted, no new aliasing (the ops are functional). Dead nodes are removed,
including ``_assert_tensor_metadata`` checks on values nothing else reads any more.

The RMS scaling may also come first, ``linear(flatten(X) * rsqrt(mean(flatten(X)^2) + norm_eps), fn)``
(the HF ``modeling_deepseek_v4`` form, transformers 5.24): the same values, so the linear is ``mu``.

Not covered: mixing whose parameters are not module attributes (``get_attr``), ``base``/``scale``
stored as several tensors (one tensor split in the graph is fine), streams of rank other than 4, and shapes computed from tensors outside the mixing region (e.g.
``view`` sizes read off ``input_ids``). A residual mix normalised otherwise -- softmax only, a Sinkhorn
started from a sigmoid (the HF ``modular_deepseek_v4`` variant at ``02356fe``) or another row / column
schedule -- is not the op's math: its mix projection is left alone with the reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

import effexport.custom_ops.mhc  # noqa: F401  (registers the ops)
from effexport.passes._graph import (PROBE_RTOL, TRANSPARENT, aten, attr_value, call_args, emit, is_call,
                                     meta_val, probe_call, rank, scalar, strip)

ops = torch.ops.effexport
SOFTMAX = (aten.softmax.int, aten._softmax.default)
FLATTEN = (aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default)
VIEWS = (*TRANSPARENT, aten.unsqueeze.default, aten.view.default, aten.reshape.default,
         aten._unsafe_view.default, aten.expand.default, aten.slice.Tensor, aten.select.int)
SPLITS = (aten.split_with_sizes.default, aten.split.Tensor, aten.unbind.int)  # (HF: base.split, scale.unbind)
ASSERT_META = aten._assert_tensor_metadata.default
PROBE_BT = (2, 3)          # batch and tokens of the random probes
PROBE_LOGIT_SCALE = 4.0    # Sinkhorn probe logits: far from convergence, so every iteration changes the result
SEARCH_LIMIT = 64          # nodes visited looking upwards from a gate for its mix projection


@dataclass
class MixProjection:
    """``mu = linear(flatten(x), fn) * rsqrt(mean(flatten(x)^2) + norm_eps)``; ``x`` is ``[B, T, n, d]``."""

    linear: fx.Node
    mu: fx.Node
    x: fx.Node
    fn: fx.Node
    n: int
    d: int
    rows: int
    norm_eps: float


@dataclass
class SinkhornChain:
    """``softmax(logits) + eps`` then alternating normalisations (``dims``: -1 row, -2 column)."""

    logits: fx.Node
    end: fx.Node
    dims: list[int]
    eps: float
    iters: int | None   # None when the schedule is not the op's
    reason: str = ""


# ---------------------------------------------------------------------------------- structure
def _arg(node: fx.Node, name: str):
    """An OpOverload call's argument by schema name."""
    return call_args(node)[name]


def _other(node: fx.Node, operand: fx.Node):
    """The other operand of a binary ``node`` (``self`` / ``other``) that has ``operand`` as one."""
    a = call_args(node)
    return a["other"] if a["self"] is operand else a["self"]


def _plus_const(node) -> tuple[fx.Node, float] | None:
    """``add(x, c)`` with a Python number ``c`` (alpha 1) -> (x, c), else None."""
    if not is_call(node, aten.add.Tensor):
        return None
    a = call_args(node)
    c = scalar(a["other"])
    return (a["self"], c) if c is not None and a["alpha"] == 1 else None


def _widening(node) -> bool:
    """A transparent op whose output holds every value of its input exactly (same or wider dtype)."""
    if not is_call(node, *TRANSPARENT):
        return False
    src, out = meta_val(_arg(node, "self")), meta_val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    return src.dtype == out.dtype or (src.dtype in (torch.bfloat16, torch.float16) and out.dtype == torch.float32)


def strip_exact(node):
    """Follow casts back to their source as long as no value changes (down-casts round: they stay)."""
    while _widening(node):
        node = _arg(node, "self")
    return node


def _rms_eps(node, flat: fx.Node) -> float | None:
    """``rsqrt(mean(flat^2, -1, keepdim) + eps)`` -> eps, else None."""
    node = strip(node)
    plus = _plus_const(strip(_arg(node, "self"))) if is_call(node, aten.rsqrt.default) else None
    mean = strip(plus[0]) if plus else None
    if not is_call(mean, aten.mean.dim):
        return None
    m = call_args(mean)
    sq = strip(m["self"])
    if is_call(sq, aten.square.default) or (is_call(sq, aten.pow.Tensor_Scalar) and _arg(sq, "exponent") == 2):
        src = _arg(sq, "self")
    elif is_call(sq, aten.mul.Tensor) and _arg(sq, "self") is _arg(sq, "other"):
        src = _arg(sq, "self")
    else:
        return None
    ok = strip(src) is flat and list(m["dim"] or []) in ([-1], [2]) and m["keepdim"]
    return plus[1] if ok else None


def mix_projection(node: fx.Node) -> MixProjection | None:
    """The mix projection computed by ``node`` (an ``aten.linear``), or None."""
    if not is_call(node, aten.linear.default):
        return None
    a = call_args(node)
    fn, flat = strip(a["weight"]), strip(a["input"])
    if a.get("bias") is not None or not isinstance(fn, fx.Node) or fn.op != "get_attr" or rank(fn) != 2:
        return None
    pre_eps = None
    if is_call(flat, aten.mul.Tensor):  # RMS-normalised before the projection (HF DeepSeek V4)
        pre_eps, flat = _pre_normalised(flat)
        if pre_eps is None:
            return None
    if not is_call(flat, *FLATTEN) or rank(flat) != 3:
        return None
    x = strip_exact(_arg(flat, "self"))
    if rank(x) != 4:
        return None
    n, d = meta_val(x).shape[2:]
    rows, cols = meta_val(fn).shape
    if not all(isinstance(v, int) for v in (n, d, rows, cols)) or cols != n * d or meta_val(flat).shape[-1] != n * d:
        return None
    if pre_eps is not None:  # linear(flat * rho, fn) == linear(flat, fn) * rho: mu is the linear
        return MixProjection(node, node, x, fn, n, d, rows, pre_eps)
    for user in node.users:
        if is_call(user, aten.mul.Tensor) and (eps := _rms_eps(_other(user, node), flat)) is not None:
            return MixProjection(node, user, x, fn, n, d, rows, eps)
    return None


def _pre_normalised(mul: fx.Node) -> tuple[float | None, fx.Node | None]:
    """``flat * rsqrt(mean(flat^2, -1, keepdim) + eps)`` -> (eps, flat), else (None, None)."""
    a = call_args(mul)
    for src, other in ((a["self"], a["other"]), (a["other"], a["self"])):
        if isinstance(src, fx.Node) and (eps := _rms_eps(other, strip(src))) is not None:
            return eps, strip(src)
    return None, None


def _normalisation(m: fx.Node, r: int) -> tuple[fx.Node, int, float] | None:
    """A user ``m / (sum(m, [dim], keepdim) + eps)`` of ``m`` -> (div, dim as -1/-2, eps)."""
    for user in m.users:
        if not (is_call(user, aten.div.Tensor) and _arg(user, "self") is m):
            continue
        plus = _plus_const(strip(_arg(user, "other")))
        s = strip(plus[0]) if plus else None
        if not is_call(s, aten.sum.dim_IntList) or strip(_arg(s, "self")) is not m:
            continue
        a = call_args(s)
        dims = list(a["dim"] or [])
        if len(dims) == 1 and a["keepdim"] and dims[0] % r in (r - 1, r - 2):
            return user, dims[0] % r - r, plus[1]
    return None


def sinkhorn_chain(softmax: fx.Node) -> SinkhornChain | None:
    """The Sinkhorn chain starting at ``softmax`` (None if it is not softmax + eps + >= 1 normalisation)."""
    a, r = call_args(softmax), rank(softmax)
    if r is None or r < 2 or a["dim"] % r != r - 1 or meta_val(softmax).shape[-1] != meta_val(softmax).shape[-2]:
        return None
    start = next((u for u in softmax.users if (p := _plus_const(u)) and p[0] is softmax), None)
    if start is None:
        return None
    m, dims, eps = start, [], {_plus_const(start)[1]}
    while (step := _normalisation(m, r)) is not None:
        m, dim, e = step
        dims.append(dim)
        eps.add(e)
    if not dims:
        return None
    chain = SinkhornChain(a["self"], m, dims, _plus_const(start)[1], None)
    if dims != [-2] + [-1, -2] * ((len(dims) - 1) // 2):
        names = "".join("r" if d == -1 else "c" for d in dims)
        chain.reason = (f"normalisation schedule {names!r} ({len(dims)} steps) is not the op's "
                        "column + (row, column)* Sinkhorn schedule")
    elif len(eps) != 1:
        chain.reason = f"Sinkhorn steps use different eps {sorted(eps)}"
    else:
        chain.iters = (len(dims) + 1) // 2
    return chain


def _search_up(start: fx.Node, stops: dict[fx.Node, MixProjection]):
    """Bounded upward search from ``start``: (mix projections reached, get_attr nodes seen, exhausted)."""
    seen, stack, found, attrs = set(), [start], [], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > SEARCH_LIMIT:
            return found, attrs, False
        if node in stops:
            found.append(stops[node])
        elif node.op == "get_attr":
            attrs.append(node)
        else:
            stack.extend(node.all_input_nodes)
    return found, attrs, True


def _role(attr: fx.Node) -> set[str]:
    """How a parameter enters the arithmetic, through slices, splits and casts: {"add"}, {"mul"}, ..."""
    roles, stack = set(), [attr]
    while stack:
        for user in stack.pop().users:
            if is_call(user, *VIEWS, *SPLITS, operator.getitem):
                stack.append(user)
            elif is_call(user, aten.add.Tensor):
                roles.add("add")
            elif is_call(user, aten.mul.Tensor):
                roles.add("mul")
            elif user.op == "call_function" and user.target is not ASSERT_META:
                roles.add(str(user.target))
    return roles


def _base_and_scale(attrs: list[fx.Node], rows: int, n_scale: int):
    """(base, scale) among ``attrs`` by role and shape, or a reason string."""
    base = [a for a in attrs if _role(a) == {"add"} and tuple(meta_val(a).shape) == (rows,)]
    scale = [a for a in attrs if _role(a) == {"mul"} and tuple(meta_val(a).shape) == (n_scale,)]
    if len(base) != 1 or len(scale) != 1:
        seen = ", ".join(f"{a.name}{tuple(meta_val(a).shape)} {sorted(_role(a))}" for a in attrs) or "none"
        return f"expected one added [{rows}] base and one multiplied [{n_scale}] scale; parameters seen: {seen}"
    return base[0], scale[0]


# ---------------------------------------------------------------------------------- numerics
def _closure(seeds) -> list[fx.Node]:
    """Pure call nodes (in an order that evaluates inputs first) whose inputs all come, transitively,
    from ``seeds`` only. Walks forward from the seeds' users, so the cost is the region's size, not the
    graph's (a probe per mixing over a whole-model graph would be quadratic in depth)."""
    inside, out = set(seeds), []
    stack = [u for s in seeds for u in s.users]
    while stack:
        node = stack.pop()
        if node in inside or node.op != "call_function" or node.is_impure():
            continue
        if all(i in inside for i in node.all_input_nodes):
            inside.add(node)
            out.append(node)
            stack.extend(node.users)
    return out


def _probe(gm: fx.GraphModule, feeds: dict[fx.Node, torch.Tensor], params: list[fx.Node]) -> dict:
    """Evaluate every node computable from ``feeds`` and ``params``; nodes that fail are dropped."""
    env: dict = dict(feeds)
    env.update({p: attr_value(gm, p.target) for p in params})
    env.update(_sizes_of(gm.graph, feeds))
    with torch.no_grad():
        for node in _closure(env):
            try:
                env[node] = probe_call(node, env)
            except Exception:  # noqa: BLE001  (a node that cannot run on probes is no candidate)
                continue
    return env


def _sizes_of(graph: fx.Graph, feeds: dict[fx.Node, torch.Tensor]) -> dict[fx.Node, int]:
    """Size nodes (SymInt values, e.g. ``sym_size`` of ``input_ids``) whose symbols are all dims of a
    fed node, evaluated at the fed values' sizes: a ``view(batch, seq, -1)`` inside the mixing then
    runs on the probes (HF reads batch and length off the hidden states' shape)."""
    bound = {}
    for node, value in feeds.items():
        fake = meta_val(node)
        for dim, size in enumerate(getattr(fake, "shape", ())):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                bound[size.node.expr] = int(value.shape[dim])
    out = {}
    for node in graph.nodes:
        val = meta_val(node)
        if node not in feeds and isinstance(val, torch.SymInt) and val.node.expr.free_symbols <= bound.keys():
            out[node] = int(val.node.expr.xreplace(bound))
    return out


def _same(got, want: torch.Tensor) -> bool:
    """Same dtype and shape, and max |got - want| <= PROBE_RTOL[dtype] * max |want|."""
    if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
        return False
    scale = want.double().abs().max().item()
    return (got.double() - want.double()).abs().max().item() <= PROBE_RTOL.get(want.dtype, 1e-5) * max(scale, 1e-30)


def _matching(env: dict, want: torch.Tensor, exclude) -> list[fx.Node]:
    """The probed nodes (not in ``exclude``) whose value equals ``want``."""
    return [n for n, v in env.items() if n not in exclude and _same(v, want)]


def _random(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded normal probe values."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


# ---------------------------------------------------------------------------------- matching
@dataclass
class _Match:
    """A proven rewrite: the op call and, per op output, the graph nodes that compute it."""

    op: object
    args: tuple
    kwargs: dict
    outputs: list[list[fx.Node]]   # per op output: the graph nodes it replaces


def verify_sinkhorn(gm: fx.GraphModule, chain: SinkhornChain, iters: int, n: int) -> str:
    """'' if the chain equals ``effexport::sinkhorn(iters, eps)`` on random far-from-converged logits."""
    val = meta_val(chain.logits)
    lead = (PROBE_BT + (1,) * val.dim())[: val.dim() - 2]
    logits = _random((*lead, n, n), val.dtype, seed=11, scale=PROBE_LOGIT_SCALE)
    env = _probe(gm, {chain.logits: logits}, [])
    want = ops.sinkhorn.default(logits.float(), iters=iters, eps=chain.eps)
    if chain.end not in env or not _same(env[chain.end].float(), want):
        return f"the chain does not compute Sinkhorn(iters={iters}, eps={chain.eps:g}) on random logits"
    return ""


def _match_pre(gm, chain: SinkhornChain, proj: MixProjection, attrs) -> _Match | str:
    n, d, rows = proj.n, proj.d, proj.rows
    if chain.iters is None:
        return chain.reason
    if rows != 2 * n + n * n:
        return f"mix projection has {rows} rows, mhc_pre needs 2n + n^2 = {2 * n + n * n}"
    if tuple(meta_val(chain.logits).shape[-2:]) != (n, n):
        return f"Sinkhorn logits are {tuple(meta_val(chain.logits).shape[-2:])}, streams n = {n}"
    params = _base_and_scale(attrs, rows, 3)
    if isinstance(params, str):
        return params
    base, scale = params
    if why := verify_sinkhorn(gm, chain, chain.iters, n):
        return why
    kwargs = dict(iters=chain.iters, eps=chain.eps, norm_eps=proj.norm_eps)
    x = _random((*PROBE_BT, n, d), meta_val(proj.x).dtype, seed=12)
    env = _probe(gm, {proj.x: x}, [proj.fn, base, scale])
    want = ops.mhc_pre.default(x, env[proj.fn], env[base], env[scale], **kwargs)
    seeds = {proj.x, proj.fn, base, scale}
    found = [_matching(env, w, seeds) for w in want]
    if chain.end not in found[2]:
        return "the Sinkhorn output does not equal mhc_pre's comb on random streams (mixing layout differs)"
    for name, nodes in zip(("u", "post"), found):
        if not nodes:
            return f"no node equals mhc_pre's {name} on random streams"
    return _Match(ops.mhc_pre.default, (proj.x, proj.fn, base, scale), kwargs, found)


def _post_inputs(post: fx.Node, d: int) -> list[fx.Node]:
    """Sub-layer output candidates ``f [B, T, d]``: the other factor of a product with (a view of)
    ``post``, and the ``[.., d]`` tensors it is a view or exact cast of, closest first."""
    out, stack, seen = [], [post], set()
    while stack:
        node = stack.pop()
        for user in set(node.users) - seen:
            seen.add(user)
            if is_call(user, *VIEWS):
                stack.append(user)
            elif is_call(user, aten.mul.Tensor):
                other = _other(user, node)
                while isinstance(other, fx.Node):  # every [.., d] view on the way back is a candidate
                    if rank(other) == 3 and meta_val(other).shape[-1] == d and other not in out:
                        out.append(other)
                    if not is_call(other, *VIEWS) or (is_call(other, *TRANSPARENT) and not _widening(other)):
                        break
                    other = _arg(other, "self")
    return out


def _match_post(gm, pre: fx.Node) -> _Match | str:
    outs = {u.args[1]: u for u in pre.users if u.target is operator.getitem}
    if 1 not in outs or 2 not in outs:
        return f"{pre.name}: post or comb is unused"
    x, post, comb = _arg(pre, "x"), outs[1], outs[2]
    n, d = meta_val(x).shape[2:]
    candidates = _post_inputs(post, d)
    for f in candidates:
        feeds = {x: _random((*PROBE_BT, n, d), meta_val(x).dtype, seed=13),
                 f: _random((*PROBE_BT, d), meta_val(f).dtype, seed=14),
                 post: _random((*PROBE_BT, n), meta_val(post).dtype, seed=15),
                 comb: _random((*PROBE_BT, n, n), meta_val(comb).dtype, seed=16).abs()}
        env = _probe(gm, feeds, [])
        want = ops.mhc_post.default(*(feeds[k] for k in (x, f, post, comb)))
        found = _matching(env, want, feeds)
        if found:
            return _Match(ops.mhc_post.default, (x, f, post, comb), {}, [found])
    return (f"{pre.name}: no node equals mhc_post(X, f, post, comb) on random inputs "
            f"(sub-layer outputs tried: {', '.join(c.name for c in candidates) or 'none'})")


def _match_head(gm, proj: MixProjection, stops) -> _Match | str:
    n, d = proj.n, proj.d
    if proj.rows != n:
        what = "no Sinkhorn chain on its residual mix" if proj.rows == 2 * n + n * n else "neither mhc_pre nor mhc_head"
        return f"mix projection {proj.linear.name} [{proj.rows} x {n * d}] over {proj.x.name}: {what}"
    sig = [u for u in _descendants(proj.mu, 6) if is_call(u, aten.sigmoid.default)]
    if len(sig) != 1:
        return f"mix projection {proj.linear.name}: expected one sigmoid gate, found {len(sig)}"
    eps = next((p[1] for u in sig[0].users if (p := _plus_const(u)) and p[0] is sig[0]), None)
    found, attrs, ok = _search_up(sig[0], stops)
    if eps is None or not ok or [p.mu for p in found] != [proj.mu]:
        return f"mix projection {proj.linear.name}: gate is not sigmoid(mu * scale + base) + eps"
    params = _base_and_scale(attrs, n, 1)
    if isinstance(params, str):
        return params
    base, scale = params
    kwargs = dict(eps=eps, norm_eps=proj.norm_eps)
    x = _random((*PROBE_BT, n, d), meta_val(proj.x).dtype, seed=17)
    env = _probe(gm, {proj.x: x}, [proj.fn, base, scale])
    want = ops.mhc_head.default(x, env[proj.fn], env[base], env[scale], **kwargs)
    nodes = _matching(env, want, {proj.x, proj.fn, base, scale})
    if not nodes:
        return f"mix projection {proj.linear.name}: no node equals mhc_head's u on random streams"
    return _Match(ops.mhc_head.default, (proj.x, proj.fn, base, scale), kwargs, [nodes])


def _descendants(node: fx.Node, depth: int) -> list[fx.Node]:
    """Users of ``node`` up to ``depth`` levels down."""
    out, frontier = [], [node]
    for _ in range(depth):
        frontier = [u for f in frontier for u in f.users if u not in out]
        out.extend(frontier)
    return out


# ---------------------------------------------------------------------------------- rewriting
def _apply(gm: fx.GraphModule, match: _Match) -> fx.Node:
    """Insert the op after its latest input and point every matched node's uses at its output(s)."""
    many = len(match.outputs) > 1
    new = emit(gm.graph, match.op, match.args, match.kwargs, n_out=len(match.outputs) if many else 0)
    outs = new if many else [new]
    for out, nodes in zip(outs, match.outputs):
        for node in nodes:
            node.replace_all_uses_with(out)
    return outs[0].args[0] if many else new


def prune(gm: fx.GraphModule) -> int:
    """Dead-code elimination that also drops ``_assert_tensor_metadata`` checks of dead values;
    lints and recompiles. Returns the number of nodes removed."""
    graph = gm.graph
    roots = [n for n in graph.nodes if n.op in ("output", "placeholder")
             or (n.is_impure() and n.target is not ASSERT_META)]
    live, stack = set(), roots
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    removed = 0
    for node in reversed(list(graph.nodes)):
        keep = node in live or (node.target is ASSERT_META and all(i in live for i in node.all_input_nodes))
        if not keep and not node.users:
            graph.erase_node(node)
            removed += 1
    graph.lint()
    gm.recompile()
    return removed


def rewrite_mhc(ctx) -> dict:
    """Pipeline pass: fold every recognised mHC pre / post / head mixing into its effexport op.

    ``ctx`` is a ``passes.pipeline.Context``; reasons for candidates left alone are appended to
    ``ctx.analysis.left_alone``. Returns counts (see the module docstring for what is matched)."""
    gm = ctx.program.gm
    counts = {"mhc_pre": 0, "mhc_post": 0, "mhc_head": 0, "left_alone": 0, "nodes_before": len(gm.graph.nodes)}

    def leave(why: str) -> None:
        counts["left_alone"] += 1
        ctx.analysis.left_alone.append(f"mhc: {why}")

    projections = {p.mu: p for n in gm.graph.nodes if (p := mix_projection(n)) is not None}
    claimed, pres = set(), []
    chains = [c for n in gm.graph.nodes if is_call(n, *SOFTMAX) and (c := sinkhorn_chain(n)) is not None]
    for chain in chains:
        found, attrs, ok = _search_up(chain.logits, projections)
        claimed.update(p.mu for p in found)
        where = f"Sinkhorn chain from {chain.logits.name} ({len(chain.dims)} normalisations)"
        if not ok or len(found) != 1:
            leave(f"{where}: {len(found)} mix projections within {SEARCH_LIMIT} nodes upstream, need 1")
            continue
        match = _match_pre(gm, chain, found[0], attrs)
        if isinstance(match, str):
            leave(f"{where}: {match}")
            continue
        pres.append(_apply(gm, match))
        counts["mhc_pre"] += 1
    prune(gm)
    for pre in pres:
        match = _match_post(gm, pre)
        if isinstance(match, str):
            leave(match)
            continue
        _apply(gm, match)
        counts["mhc_post"] += 1
    prune(gm)
    projections = {p.mu: p for n in gm.graph.nodes if (p := mix_projection(n)) is not None}
    for proj in projections.values():
        if proj.mu in claimed:
            continue
        match = _match_head(gm, proj, projections)
        if isinstance(match, str):
            leave(match)
            continue
        _apply(gm, match)
        counts["mhc_head"] += 1
    prune(gm)
    counts["nodes_after"] = len(gm.graph.nodes)
    return counts
