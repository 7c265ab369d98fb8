"""Recognise compressed convolutional attention (ZAYA1 CCA / CCGQA) and rewrite it into ``effexport::cca``.

Pattern (spec section 3.3 steps 2-6, as a captured step graph shows it; recognised from graph
structure, weight shapes and numerics, never from module or attribute names):

    anchor      conv0 = conv1d(cat([conv state placeholder [B, C, P], X], dim=-1))   depthwise:
                weight [C, 1, K0], groups C; its only user conv1 = conv1d(conv0) grouped: weight
                [C, d, K1], groups C/d = Hq+Hk; stride 1, no padding, no dilation; P = K0+K1-2
    conv input  X = transpose(cat([q~ [B, T, Hq*d], k~ [B, T, Hk*d]], -1), 1, 2)
    outputs     the q and the new K/V of the first attention site (``passes.sites``) whose K is
                computed from conv1; V is data movement only of ``v_cur``, ``v_del_src`` and a
                ``[B, Dv]`` shift state placeholder (the cat holding the state names ``v_del_src``);
                the new conv / shift states are the step outputs that are data movement of the
                conv input cat / of ``v_del_src``
    side inputs everything else the outputs read must be a RoPE table (a tensor computed from
                positions, traced back through views to ``[T, rot]``; two, shared by q and k), one
                ``[Hk]`` constant (the key temperature), other constants, or sizes

Check: the sub-graph between those inputs and the five outputs is evaluated on random inputs,
random conv weights and temperature (so the check is independent of trained values and works for
weights on the meta device) and compared with :func:`cca_reference`; which table is cos and which
is sin is decided by this comparison. A candidate that fails any step is left alone with the
reason (``analysis.left_alone``, shown by ``--explain``).

Replacement: one ``effexport::cca`` node; its q/k/v replace the attention's inputs (the attention
pass then turns ``cat(past K/V, new)`` into ``attention_cache``), its states replace the
``present`` conv/shift outputs, so the conv/shift placeholders stay as ``state`` cache entries.

Order: this pass runs **before** attention ``discover``: afterwards the sites' q/k/v are plain
outputs of the op, nothing the attention pass holds (sites, masks, KV groups) points into the
removed sub-graph, and attention needs no knowledge of CCA. (After ``rewrite`` it would have to
patch ``attention_cache`` arguments and the sites' recorded nodes.)

Invariants kept: every new node has ``meta["val"]`` (``passes._graph.emit``), the graph is
topologically ordered and linted, dead nodes (the old convs, norms, RoPE and the
``_assert_tensor_metadata`` checks on them) are removed; no new aliasing (the op is functional).

Not covered: padding masks (pads must not reach the conv), conv tables computed per batch row
(``cos [B, T, rot]``), models without a key temperature, convs written as ``unfold``/matmul, and
the prefill value ``0 W_vd + b`` of the shift state when the delayed projection has a bias (the
plan's zero state is exact only without that bias).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.passes.tools_common import legalize_graph

import effexport.custom_ops.cca  # noqa: F401  (registers the op)
from effexport.custom_ops.cca import cca_reference
from effexport.passes._graph import (TRANSPARENT, ancestors, aten, attr, call_args, emit, extract, finish,
                                     is_call, meta_val, rank, strip)
from effexport.passes.attention import cache_source
from effexport.passes.cache_plan import stateful_layers
from effexport.passes.sites import Rejected, find_sites, layer_index, layer_label

CONV = (aten.conv1d.default, aten.convolution.default)
# ops that only move or re-view data (values pass through unchanged)
MOVEMENT = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
            aten.squeeze.dim, aten.expand.default, aten.transpose.int, aten.permute.default,
            aten.slice.Tensor, aten.select.int, aten.cat.default, aten.clone.default,
            aten.contiguous.default, aten.alias.default, aten.to.dtype, aten._to_copy.default)
ASSERTS = (aten._assert_tensor_metadata.default,)
TRANSPARENT_CALLS = tuple(TRANSPARENT)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 3e-2}
EVAL_BATCH, EVAL_TOKENS = 2, 5  # sizes of dynamic dims in the numeric check


class NoMatch(Exception):
    """A candidate is not CCA; the message is the reason."""


@dataclass
class CCAMatch:
    """One recognised CCA layer: the op's argument nodes, the five nodes it replaces, the region."""

    conv0: fx.Node
    args: dict[str, fx.Node | None]          # effexport::cca argument name -> node
    outputs: dict[str, fx.Node]              # q, k, v, conv_state, shift_state -> replaced node
    region: list[fx.Node] = field(default_factory=list)
    dims: dict[str, int] = field(default_factory=dict)
    max_rel: float = 0.0                     # worst relative error of the numeric check


def _shape(node) -> list:
    val = meta_val(node)
    if not isinstance(val, torch.Tensor):
        raise NoMatch(f"{getattr(node, 'name', node)} has no tensor metadata")
    return list(val.shape)


def _static(dim, what: str) -> int:
    if not isinstance(dim, int):
        raise NoMatch(f"{what} is symbolic ({dim}); CCA needs it static")
    return dim


def _conv_args(node: fx.Node) -> dict:
    """A conv node's arguments by schema name; rejects strides, padding, dilation, transposed."""
    a = call_args(node)
    if node.target is aten.convolution.default and (a["transposed"] or any(a["output_padding"])):
        raise NoMatch(f"{node.name} is a transposed convolution")
    if list(a["stride"]) != [1] or list(a["padding"]) != [0] or list(a["dilation"]) != [1]:
        raise NoMatch(f"{node.name} has stride {list(a['stride'])}, padding {list(a['padding'])}, dilation "
                      f"{list(a['dilation'])}; a causal conv over a state needs 1, 0, 1")
    return a


def _state_cat(conv0: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``conv1d(cat([state placeholder, X], -1))`` -> (cat, state, X), else None."""
    if not is_call(conv0, *CONV):
        return None
    cat = strip(call_args(conv0)["input"])
    if not is_call(cat, aten.cat.default) or len(cat.args[0]) != 2 or rank(cat) != 3:
        return None
    if call_args(cat)["dim"] not in (-1, 2):
        return None
    state, x = strip(cat.args[0][0]), cat.args[0][1]
    return (cat, state, x) if state.op == "placeholder" else None


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_call(u, *ASSERTS)]


def _match_convs(conv0: fx.Node, cat: fx.Node, state: fx.Node, x: fx.Node) -> dict:
    """Structure and weight-shape checks of the conv pair; returns dims and argument nodes."""
    a0 = _conv_args(conv0)
    w0 = _shape(a0["weight"])
    channels = _static(_shape(cat)[1], "conv channels")
    if len(w0) != 3 or w0[:2] != [channels, 1] or a0["groups"] != channels:
        raise NoMatch(f"first conv is not depthwise (weight {w0}, groups {a0['groups']}, {channels} channels)")
    users = _users(conv0)
    if len(users) != 1 or not is_call(users[0], *CONV) or strip(call_args(users[0])["input"]) is not conv0:
        raise NoMatch(f"the depthwise conv feeds {[u.name for u in users]}, not one second conv1d")
    conv1 = users[0]
    a1 = _conv_args(conv1)
    w1 = _shape(a1["weight"])
    groups = a1["groups"]
    if len(w1) != 3 or w1[0] != channels or groups < 2 or w1[1] * groups != channels:
        raise NoMatch(f"second conv is not grouped per head (weight {w1}, groups {groups}, {channels} channels)")
    d, k0, k1 = w1[1], w0[2], w1[2]
    p = _static(_shape(state)[-1], "conv state length")
    if _shape(state)[1] != channels or p != k0 + k1 - 2:
        raise NoMatch(f"conv state {_shape(state)} does not hold the P = K0+K1-2 = {k0 + k1 - 2} columns "
                      "the two convs need")
    x = strip(x)
    if is_call(x, aten.transpose.int) and sorted(d_ % 3 for d_ in x.args[1:3]) == [1, 2]:
        qk = strip(x.args[0])
    elif is_call(x, aten.permute.default) and list(x.args[1]) == [0, 2, 1]:
        qk = strip(x.args[0])
    else:
        raise NoMatch("the conv input is not a channels-first transpose of the activations")
    if not is_call(qk, aten.cat.default) or len(qk.args[0]) != 2 or call_args(qk)["dim"] not in (-1, 2):
        raise NoMatch("the conv input is not concat(q~, k~) along channels")
    qd, kd = (strip(t) for t in qk.args[0])
    wq, wk = _static(_shape(qd)[-1], "q~ width"), _static(_shape(kd)[-1], "k~ width")
    hq, hk = wq // d, wk // d
    if wq % d or wk % d or hq + hk != groups or hk == 0 or hq % hk:
        raise NoMatch(f"concat widths {wq} + {wk} are not Hq*d + Hk*d with Hq+Hk = {groups} groups of d={d} "
                      "and Hq a multiple of Hk")
    return dict(conv1=conv1, qd=qd, kd=kd, w0=a0["weight"], b0=a0["bias"], w1=a1["weight"], b1=a1["bias"],
                dims=dict(hq=hq, hk=hk, d=d, k0=k0, k1=k1, p=p, channels=channels))


def _movement_leaves(node: fx.Node, path: tuple = ()) -> list[tuple[fx.Node, tuple]]:
    """Non-movement nodes a value is re-viewed / concatenated from, each with its path of cats."""
    node = strip(node)
    if is_call(node, aten.cat.default):
        return [leaf for t in node.args[0] for leaf in _movement_leaves(t, path + (node,))]
    if is_call(node, *MOVEMENT):
        return _movement_leaves(node.args[0], path)
    return [(node, path)]


def _match_values(v_new: fx.Node, dims: dict) -> dict:
    """v = data movement of (v_cur, v_del_src, shift state); the cat holding the state names v_del_src."""
    leaves = _movement_leaves(v_new)
    states = [(n, p) for n, p in leaves if n.op == "placeholder" and len(_shape(n)) == 2]
    others = [(n, p) for n, p in leaves if n.op != "placeholder"]
    if len(states) != 1 or len(others) != 2 or len(leaves) != 3:
        raise NoMatch(f"V is not built from two projections and one shift-state input "
                      f"(from {[n.name for n, _ in leaves]})")
    (shift, shift_path), ((a, a_path), (b, b_path)) = states[0], others
    delayed = [n for n, p in ((a, a_path), (b, b_path)) if p and shift_path and p[-1] is shift_path[-1]]
    if len(delayed) != 1:
        raise NoMatch("no concatenation of the shift state with exactly one projection (the delayed values)")
    v_del = delayed[0]
    v_cur = b if v_del is a else a
    dv = _static(_shape(shift)[-1], "shift state width")
    if _shape(v_cur)[-1] != dv or _shape(v_del)[-1] != dv or 2 * dv != dims["hk"] * dims["d"]:
        raise NoMatch(f"value halves {_shape(v_cur)}, {_shape(v_del)} and shift state width {dv} do not split "
                      f"Hk*d = {dims['hk'] * dims['d']} in two")
    dims["dv"] = dv
    return dict(v_cur=v_cur, v_del_src=v_del, shift_state=shift)


def _moved_from(node: fx.Node, source: fx.Node) -> bool:
    """True if ``node`` is ``source`` re-viewed / sliced / concatenated (data movement only)."""
    node = strip(node)
    if node is source:
        return True
    if is_call(node, aten.cat.default):
        return any(_moved_from(t, source) for t in node.args[0])
    return is_call(node, *MOVEMENT, *TRANSPARENT_CALLS) and _moved_from(node.args[0], source)


def _state_output(graph: fx.Graph, source: fx.Node, shape: list, what: str) -> fx.Node:
    """The step output that is data movement of ``source`` with the state's shape."""
    outputs = [a for a in next(n for n in graph.nodes if n.op == "output").args[0] if isinstance(a, fx.Node)]
    found = [o for o in outputs if [str(s) for s in _shape(o)] == [str(s) for s in shape]
             and _moved_from(o, source)]
    if len(found) != 1:
        raise NoMatch(f"{len(found)} step outputs are the new {what} state (expected 1)")
    return found[0]


def _region(outputs: list[fx.Node], boundary: set) -> tuple[list[fx.Node], set]:
    """Nodes between ``boundary`` and ``outputs`` (graph order) and the other nodes they read."""
    region: list[fx.Node] = []
    inside = set(boundary)
    for n in ancestors(outputs, boundary):
        if isinstance(meta_val(n), (torch.SymInt, int)):
            continue  # sizes stay outside: the check substitutes probe sizes for their symbols
        if n not in boundary and any(i in inside for i in n.all_input_nodes):
            region.append(n)
            inside.add(n)
    leaves = {i for n in region for i in n.all_input_nodes if i not in inside}
    return region, leaves


def _base(node: fx.Node, want: int) -> fx.Node | None:
    """Follow views/casts back; the deepest node of rank ``want`` on the way (None if none)."""
    found = None
    while True:
        if rank(node) == want:
            found = node
        if is_call(node, *MOVEMENT) and not is_call(node, aten.cat.default):
            node = node.args[0]
            continue
        return found


def _batch1_table(node: fx.Node) -> fx.Node | None:
    """A RoPE table ``[1, T, rot]`` behind views (positions ``[1, T]``, as Hugging Face builds them):
    the first such node on the way back, as layers share everything before it."""
    while rank(node) != 3:
        if not is_call(node, *MOVEMENT) or is_call(node, aten.cat.default):
            return None
        node = node.args[0]
    return node if _shape(node)[0] == 1 else None


def _has_placeholder(node: fx.Node) -> bool:
    return any(n.op == "placeholder" for n in ancestors([node]))


def _side_inputs(leaves: set, dims: dict, t_size) -> dict:
    """RoPE tables (two ``[T, rot]`` tensors computed from positions) and the ``[Hk]`` temperature."""
    tables, temps = set(), set()
    for leaf in leaves:
        val = meta_val(leaf)
        if not isinstance(val, torch.Tensor):
            continue
        if _has_placeholder(leaf):
            base = _base(leaf, 2) or _batch1_table(leaf)
            if base is None or str(_shape(base)[-2]) != str(t_size):
                raise NoMatch(f"q/k/v read {leaf.name} {_shape(leaf)}, which is neither a projection, a state "
                              "nor a [T, rot] RoPE table")
            tables.add(base)
        else:
            base = _base(leaf, 1)
            if base is not None and _shape(base) == [dims["hk"]]:
                temps.add(base)
    if len(tables) != 2:
        raise NoMatch(f"found {len(tables)} RoPE tables for q and k, expected one shared cos/sin pair")
    if len(temps) != 1:
        raise NoMatch(f"found {len(temps)} [Hk={dims['hk']}] constants for the key temperature, expected 1")
    rot = _static(_shape(next(iter(tables)))[-1], "rotary dims")
    if rot % 2 or rot > dims["d"] or any(_shape(t)[-1] != rot for t in tables):
        raise NoMatch(f"RoPE tables {[_shape(t) for t in tables]} do not rotate an even number <= d of dims")
    dims["rot"] = rot
    return dict(tables=sorted(tables, key=lambda n: n.name), temperature=temps.pop())


def _concrete(val, env: dict):
    """A meta shape / SymInt with symbols replaced by probe sizes; unknown symbols reject."""
    if isinstance(val, torch.SymInt):
        expr = val.node.expr
        missing = expr.free_symbols - env.keys()
        if missing:
            raise NoMatch(f"the CCA sub-graph depends on sizes {sorted(map(str, missing))} other than batch and tokens")
        return int(expr.subs(env))
    return val


def _verify(match: CCAMatch, leaves: set, tables: list[fx.Node]) -> None:
    """Evaluate the region on random inputs and compare with the reference; fixes cos vs sin."""
    args = match.args
    qd_shape = _shape(args["q_down"])
    env = {}
    for dim, size in ((qd_shape[0], EVAL_BATCH), (qd_shape[1], EVAL_TOKENS)):
        if isinstance(dim, torch.SymInt) and len(dim.node.expr.free_symbols) == 1 and dim.node.expr.is_Symbol:
            env[dim.node.expr] = size
    gen = torch.Generator().manual_seed(0)
    dtype = meta_val(args["q_down"]).dtype
    values: dict[fx.Node, object] = {}
    for node in [n for n in args.values() if n is not None] + tables:
        if node in values:
            continue
        shape = [_concrete(s, env) for s in _shape(node)]
        values[node] = torch.randn(shape, generator=gen, dtype=torch.float32).to(meta_val(node).dtype)
    values[args["temperature"]] = 1 + 0.2 * values[args["temperature"]]
    for leaf in leaves:
        val = meta_val(leaf)
        if not isinstance(val, torch.Tensor):
            values[leaf] = _concrete(val, env)
        else:  # a constant of the model (not a weight of the op): its real value
            sub, phs = extract(leaf.graph.owning_module, [leaf])
            if phs or any(n.op == "get_attr" and attr(sub, n.target).is_meta for n in sub.graph.nodes):
                raise NoMatch(f"cannot evaluate {leaf.name}: it is not a constant with known values")
            values[leaf] = sub()[0]
    with torch.no_grad():
        for node in match.region:
            a = fx.node.map_arg(node.args, values.__getitem__)
            kw = fx.node.map_arg(node.kwargs, values.__getitem__)
            values[node] = node.target(*a, **kw)
        got = [values[match.outputs[k]] for k in ("q", "k", "v", "conv_state", "shift_state")]
        best, best_err = None, float("inf")
        for cos, sin in (tables, tables[::-1]):
            ref_args = {k: values[n] if n is not None else None for k, n in args.items() if k not in ("cos", "sin")}
            cos_t, sin_t = (values[n].reshape(-1, values[n].shape[-1]) for n in (cos, sin))  # [T, rot]
            ref = cca_reference(cos=cos_t, sin=sin_t, **ref_args)
            err = max(_rel(g, r) for g, r in zip(got, ref))
            if err < best_err:
                best, best_err = (cos, sin), err
    match.max_rel = best_err
    if not best_err <= TOLERANCE.get(dtype, 1e-4):
        raise NoMatch(f"the sub-graph does not compute effexport::cca: max rel error {best_err:.2e} on random inputs")
    args["cos"], args["sin"] = best


def _rel(got, ref) -> float:
    """max |got - ref| / max |ref| (inf on a shape mismatch)."""
    if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
        return float("inf")
    diff = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    return diff / max(ref.double().abs().max().item() if ref.numel() else 0.0, 1e-30)


def match_cca(gm: fx.GraphModule, conv0: fx.Node) -> CCAMatch:
    """Match one candidate (a conv1d over ``cat(state placeholder, X)``); raises NoMatch with the reason."""
    cat, state, x = _state_cat(conv0)
    found = _match_convs(conv0, cat, state, x)
    dims = found["dims"]
    site = next((s for s in find_sites(gm)[0] if found["conv1"] in ancestors([_new(s.k)])), None)
    if site is None:
        raise NoMatch("the grouped conv's output reaches no attention site's K")
    q, k, v = strip(site.q), _new(site.k), _new(site.v)
    b, t = _shape(found["qd"])[:2]
    for name, node, heads in (("q", q, dims["hq"]), ("k", k, dims["hk"]), ("v", v, dims["hk"])):
        if [str(s) for s in _shape(node)] != [str(b), str(heads), str(t), str(dims["d"])]:
            raise NoMatch(f"attention {name} {_shape(node)} is not [B, {heads}, T, {dims['d']}]")
    values = _match_values(v, dims)
    outputs = dict(q=q, k=k, v=v, conv_state=_state_output(gm.graph, cat, _shape(state), "conv"),
                   shift_state=_state_output(gm.graph, values["v_del_src"], _shape(values["shift_state"]), "shift"))
    args = dict(q_down=found["qd"], k_down=found["kd"], v_cur=values["v_cur"], v_del_src=values["v_del_src"],
                conv0_weight=found["w0"], conv1_weight=found["w1"], temperature=None, cos=None, sin=None,
                conv_state=state, shift_state=values["shift_state"], conv0_bias=found["b0"],
                conv1_bias=found["b1"])
    boundary = {n for n in args.values() if n is not None}
    _, leaves = _region(list(outputs.values()), boundary)
    side = _side_inputs(leaves, dims, t)
    args["temperature"] = side["temperature"]
    region, leaves = _region(list(outputs.values()), boundary | {side["temperature"], *side["tables"]})
    match = CCAMatch(conv0, args, outputs, region, dims)
    region_set = set(region) | set(outputs.values())
    for node in region:
        if node not in outputs.values() and any(u not in region_set for u in _users(node)):
            raise NoMatch(f"intermediate {node.name} is also used outside the CCA sub-graph")
    _verify(match, leaves, side["tables"])
    return match


def _new(node: fx.Node) -> fx.Node:
    """The new tokens' K or V of an attention input (``cat(past, new)`` -> new)."""
    src = cache_source(node)
    return strip(src[1]) if src else strip(node)


def find_cca(gm: fx.GraphModule, stateful: frozenset = frozenset()) -> tuple[list[CCAMatch], list[Rejected]]:
    """Every CCA candidate of the graph: the matches and the rejected candidates with reasons. A
    conv over a state in one of the ``stateful`` layers (layers that keep fixed-size states and no
    growing cache: linear attention / state-space, not attention) is no candidate."""
    matches, rejected = [], []
    for node in list(gm.graph.nodes):
        if _state_cat(node) is None or layer_index(layer_label(node)) in stateful:
            continue
        try:
            matches.append(match_cca(gm, node))
        except NoMatch as why:
            label = layer_label(node)
            rejected.append(Rejected(f"{node.name}" + (f" [{label}]" if label else ""), str(why)))
    return matches, rejected


def _replace(graph: fx.Graph, match: CCAMatch) -> None:
    """Insert the op and point every user outside the region at its outputs."""
    a = match.args
    order = ("q_down", "k_down", "v_cur", "v_del_src", "conv0_weight", "conv1_weight", "temperature",
             "cos", "sin", "conv_state", "shift_state", "conv0_bias", "conv1_bias")
    for key in ("cos", "sin"):  # a [1, T, rot] table (positions [1, T], as Hugging Face builds them)
        if rank(a[key]) == 3:
            a[key] = emit(graph, aten.squeeze.dim, (a[key], 0), {})
    new = emit(graph, torch.ops.effexport.cca.default, tuple(a[k] for k in order), {}, n_out=5)
    region = set(match.region)
    for name, node in zip(("q", "k", "v", "conv_state", "shift_state"), new):
        old = match.outputs[name]
        if meta_val(old).dtype != meta_val(node).dtype:
            node = emit(graph, aten.to.dtype, (node, meta_val(old).dtype), {})
        old.replace_all_uses_with(node, delete_user_cb=lambda user: user not in region)
    for node in match.region:  # metadata asserts on the removed values would keep them alive
        for user in [u for u in node.users if is_call(u, *ASSERTS) and not u.users]:
            graph.erase_node(user)


def rewrite_cca(ctx) -> dict:
    """Pipeline pass: rewrite every recognised CCA layer into ``effexport::cca`` (see module doc).

    ``ctx`` is a ``passes.pipeline.Context``; rejected candidates go to ``ctx.analysis.left_alone``, the
    layers that keep only fixed-size states to ``ctx.analysis.stateful`` (they hold no candidate)."""
    gm = ctx.program.gm
    ctx.analysis.stateful = stateful_layers(ctx.program)  # not attention: no candidates there
    matches, rejected = find_cca(gm, frozenset(ctx.analysis.stateful))
    for r in rejected:
        ctx.analysis.left_alone.append(f"CCA candidate {r.node}: {r.reason}")
    for match in matches:
        _replace(gm.graph, match)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    if any(order[i] > order[n] for n in gm.graph.nodes for i in n.all_input_nodes):
        legalize_graph(gm)  # an attention read q before the value projections the op also needs
    finish(gm)
    return {"cca": len(matches), "left_alone": len(rejected)}
