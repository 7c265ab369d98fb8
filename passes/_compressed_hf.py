"""The Hugging Face forms of DeepSeek V4's compressed attention (transformers 5.24
``modeling_deepseek_v4.py`` run through ``exporter/frontends/hf.py``'s step cache), for passes/compressed.py.
Recognised from graph structure and checked numerically against the effexport ops, like the
reference forms there:

    compressor   softmax over dim 2 of score blocks made from ``cat(state placeholder, projection)``,
                 zero-padded to whole windows, viewed as ``[B, n, r, coff*c]`` plus the position bias
                 ``ape [r, coff*c]`` -- as they are (HCA) or slice-*assigned* (``copy_`` into views of a
                 ``new_full(-inf)`` buffer, CSA: previous window's first half next to the current
                 window's second half, 2r rows) -- times value blocks built the same way, summed over
                 dim 2, then RMSNorm and interleaved RoPE; the entries (a slice of the RoPE'd windows)
                 are appended to an entry placeholder.
    indexer      ``where(i >= (t + 1) // r, -1, topk(masked_fill(sum_h relu(q @ keys^T) * s * w,
                 future, -inf), k).indices)`` over a compressor's entries (zero-padded).
    attention    a decomposed sink-column site (passes/sites.py: ``decomposed``) whose K = V is
                 ``cat(cat(raw-cache placeholder, new), entries)`` and whose additive mask is
                 ``cat(sliding mask, entry bias)``: the entry bias is visibility (HCA) or a scatter of
                 the indexer's picks (CSA). The window comes from classifying the sliding part
                 (passes/masks.py).

State layouts. The step cache keeps ``[B, 2r, coff*c]`` raw projections per compressor: rows
``[0, r)`` the last complete window, rows ``[r, r + P mod r)`` the open one, zeros after, the gate
without the position bias (positions < 0: first half -inf). ``kv_compress_step`` keeps
``[B, coff*r, coff*c]``: the open block in rows ``[-r:]``, with overlap the previous block in rows
``[:r]``, the gate *with* the bias, unfilled rows ``(0, -inf)``. The rewrite gives the state
placeholders the op's layout (they are step inputs and outputs of the rewritten graph only); the
check converts random op-layout states to the graph's layout and the graph's new states back.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from effexport.passes._graph import aten, call_args, is_call, meta_val, probe_tolerance, scalar, strip
from effexport.passes import compressed as C
from effexport.passes._compressed_write import FRESH, writes
from effexport.passes.sites import decomposed, joins_cache

ops = torch.ops.effexport
LAYOUT = (*C.MOVEMENT, aten.transpose.int, aten.permute.default)
NoMatch = C.NoMatch


# ------------------------------------------------------------------------------------ structure
def _sources(node, found: dict) -> None:
    """Leaves of a block tensor (``found["leaves"]``) and position biases added on the way
    (``found["bias"]``): through movement ops, cats, ``masked_fill``, ``+ [r, W]`` constants and fresh
    buffers (whose values are the ``copy_`` writes into their views)."""
    node = strip(node)
    if is_call(node, aten.cat.default):
        for t in node.args[0]:
            _sources(t, found)
    elif is_call(node, *FRESH):
        found.setdefault("buffers", []).append(node)
        for w in writes(node):
            if not is_call(w, aten.copy_.default):
                raise NoMatch(f"a block buffer is written by {w.target}, not copy_")
            _sources(w.args[1], found)
    elif is_call(node, aten.masked_fill.Scalar):
        _sources(node.args[0], found)
    elif is_call(node, aten.add.Tensor) and any(_is_bias(x) for x in node.args[:2]):
        bias, other = node.args[:2] if _is_bias(node.args[0]) else node.args[1::-1]
        found.setdefault("bias", []).append(strip(bias))
        _sources(other, found)
    elif is_call(node, *C.MOVEMENT):
        _sources(node.args[0], found)
    else:
        found.setdefault("leaves", []).append(node)


def _is_bias(x) -> bool:
    x = strip(x)
    return isinstance(x, fx.Node) and x.op == "get_attr" and len(C._shape(x)) == 2


def _split(leaves: list, what: str) -> tuple[fx.Node, fx.Node]:
    phs = {n for n in leaves if n.op == "placeholder"}
    new = {n for n in leaves if n.op != "placeholder"}
    if len(phs) != 1 or len(new) != 1:
        raise NoMatch(f"{what} blocks are not built from one state input and one projection")
    return phs.pop(), new.pop()


def match_compressor(gm: fx.GraphModule, sm: fx.Node) -> C.Compressor:
    """The compressor around the block softmax ``sm`` (see the module docstring); raises NoMatch."""
    a_blocks, pooled = C.pooling(sm)
    zs, as_ = {}, {}
    _sources(sm.args[0], zs)
    _sources(a_blocks, as_)
    state_z, z = _split(zs.get("leaves", []), "score")
    state_a, a = _split(as_.get("leaves", []), "value")
    biases = set(zs.get("bias", []))
    if len(biases) != 1 or as_.get("bias"):
        raise NoMatch("scores do not add one [r, W] position bias (or the values add one)")
    ape = biases.pop()
    ratio, width = C._shape(ape)
    c = C._shape(pooled)[-1]
    if width not in (c, 2 * c) or C._shape(z)[-1] != width or C._shape(a)[-1] != width:
        raise NoMatch(f"projection width {width} is neither the entry width {c} nor twice it")
    overlap = width == 2 * c
    if C._shape(state_z) != C._shape(state_a) or C._shape(state_z)[1:] != [2 * ratio, width]:
        raise NoMatch(f"states are not [B, 2r={2 * ratio}, {width}] (previous + open window)")
    present, comp, fin, post, weight, eps, freq = C.entries_of(gm, pooled)
    outs = [o for o in C._outputs(gm.graph) if isinstance(o, fx.Node) and C._shape(o) == C._shape(state_z)]
    out_z = [o for o in outs if _leaf_set(o) == {state_z, z}]
    out_a = [o for o in outs if _leaf_set(o) == {state_a, a}]
    if len(out_z) != 1 or len(out_a) != 1:
        raise NoMatch("the new states are not step outputs sliced from the padded windows")
    return C.Compressor(sm, ratio, overlap, a, z, ape, weight, freq, eps, 2 * C._shape(freq)[0], state_a, state_z,
                        comp, present, out_a[0], out_z[0], fin, post, layout="hf")


def _leaf_set(node) -> set:
    found: dict = {}
    try:
        _sources(node, found)
    except NoMatch:
        return set()
    return set(found.get("leaves", []))


# ------------------------------------------------------------------------------- state layouts
def _filled(p: int, r: int, overlap: bool) -> torch.Tensor:
    """Rows of the op's state that hold tokens after position ``p - 1``."""
    rows = torch.arange((2 if overlap else 1) * r)
    cur = rows - (r if overlap else 0)
    ok = (cur >= 0) & (cur < p % r)
    return ok | ((rows < r) & (p >= r)) if overlap else ok


def op_to_graph(sa, sz, ape, p: int, r: int, overlap: bool, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """An op-layout state at position ``p`` in the step cache's layout."""
    b, _, w = sa.shape
    held = p % r
    ga, gz = torch.zeros(b, 2 * r, w), torch.zeros(b, 2 * r, w)
    ga[:, r:r + held], gz[:, r:r + held] = sa[:, -r:][:, :held], sz[:, -r:][:, :held] - ape[:held]
    if overlap and p >= r:
        ga[:, :r], gz[:, :r] = sa[:, :r], sz[:, :r] - ape
    elif not overlap:  # the previous window: pooled into an entry the cache drops
        ga[:, :r], gz[:, :r] = (torch.randn(b, r, w, generator=gen) for _ in range(2))
    return ga, gz


def graph_to_op(ga, gz, ape, p: int, r: int, overlap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A step-cache state at position ``p`` in the op's layout (unfilled rows ``(0, -inf)``)."""
    b, _, w = ga.shape
    rows = (2 if overlap else 1) * r
    sa, sz = torch.zeros(b, rows, w), torch.full((b, rows, w), float("-inf"))
    held = p % r
    sa[:, rows - r:rows - r + held], sz[:, rows - r:rows - r + held] = ga[:, r:r + held], gz[:, r:r + held] + ape[:held]
    if overlap and p >= r:
        sa[:, :r], sz[:, :r] = ga[:, :r], gz[:, :r] + ape
    return sa, sz


def _state_rel(got, ref) -> float:
    """Relative error of two states with -inf rows: the -inf pattern must agree exactly."""
    if got.shape != ref.shape or not torch.equal(torch.isneginf(got), torch.isneginf(ref)):
        return float("inf")
    keep = ~torch.isneginf(ref)
    return C._rel(got[keep], ref[keep])


def verify_compressor(gm, m: C.Compressor, ratios: dict) -> None:
    """Region on random projections, bias, norm weight and op-layout states (converted to the
    graph's layout) vs ``kv_compress_step`` at (P, T) = (37, 3), (3r - 2, 3) (a window completes)
    and (1, 4) (the first window; CSA's block -1); entries and new states compared; raises NoMatch."""
    m.max_rel, r, tol = 0.0, m.ratio, 0.0
    for p, t in ((C.check_p(ratios), C.CHECK_T), (3 * r - 2, 3), (1, 4)):
        ev = C._Eval(gm, ratios, p, t)
        given = {m.comp: ev.placeholder(m.comp)}
        for n in (m.a, m.z, m.ape, m.norm_weight):
            given[n] = ev.randn(C._concrete(n, ev), meta_val(n).dtype)
        given[m.norm_weight] = 1 + 0.1 * given[m.norm_weight]
        rows, width = (2 if m.overlap else 1) * r, C._shape(m.ape)[1]
        fill = _filled(p, r, m.overlap)[:, None]
        sa = torch.where(fill, ev.randn([C.CHECK_B, rows, width]), 0.0)
        sz = torch.where(fill, ev.randn([C.CHECK_B, rows, width]), float("-inf"))
        given[m.state_a], given[m.state_z] = op_to_graph(sa, sz, given[m.ape], p, r, m.overlap, ev.gen)
        present, out_a, out_z, inv = ev([m.present, m.out_a, m.out_z, m.inv_freq], given)
        values = {**given, m.inv_freq: inv, m.state_a: sa, m.state_z: sz}
        buf = torch.zeros(C.CHECK_B, (p + t) // r + 1, C._shape(m.finish)[-1])
        with torch.no_grad():
            got, new_a, new_z = C._step_op(m, values, buf, torch.tensor(p))
        entries = got[:, p // r:(p + t) // r]
        if m.post:
            entries = C._apply_post(m, entries, gm)
        ga, gz = graph_to_op(out_a, out_z, given[m.ape], p + t, r, m.overlap)
        m.max_rel = max(m.max_rel, C._rel(entries, present[:, given[m.comp].shape[1]:]), _state_rel(new_a, ga),
                        _state_rel(new_z, gz))
        tol = max(tol, probe_tolerance(present, out_a, out_z))
    if not m.max_rel <= tol:
        raise NoMatch(f"sub-graph does not compute kv_compress_step (step-cache state layout): max rel error "
                      f"{m.max_rel:.2e}")


# --------------------------------------------------------------------------------- attention
def candidate(sm: fx.Node) -> dict | None:
    """The decomposed-site fields of a softmax whose K joins a raw cache with other entries."""
    fields, _ = decomposed(sm)
    return fields if fields is not None and joins_cache(fields["k"]) else None


def _to_entries(node, comps: dict):
    node = strip(node)
    while node not in comps and is_call(node, *LAYOUT):
        node = strip(node.args[0])
    return node if node in comps else None


def match_attention(gm, sm: fx.Node, comps: dict, fields: dict) -> C.Attention:
    """Window + compressed sink attention written as one matmul over ``cat(raw K=V, entries)``."""
    k = strip(fields["k"])
    if strip(fields["v"]) is not k:
        raise NoMatch("K and V are different tensors (not shared-KV attention)")
    raw, extra = k.args[0]
    src = C._cat_with_placeholder(raw)
    if src is None:
        raise NoMatch("raw keys are not cat(raw-cache placeholder, new entries)")
    sink = fields["sinks"]
    if sink is None or sink.op != "get_attr":
        raise NoMatch("no per-head sink parameter")
    mask = strip(fields["mask"]) if fields["mask_mode"] == "additive" else None
    if not (is_call(mask, aten.cat.default) and len(mask.args[0]) == 2 and call_args(mask)["dim"] in (-1, 3)):
        raise NoMatch("the additive mask is not cat(window mask, entry bias)")
    present = _to_entries(extra, comps)
    if present is None:
        raise NoMatch("the extra keys are not a recognised compressor's entries")
    att = C.Attention(sm, fields["q"], src[0], src[1], strip(raw), sink, float(fields["scale"]), fields["out"],
                      comp=comps[present], seq_dim=2, wmask=mask.args[0][0])
    att.idx = _picks(mask.args[0][1])
    return att


def _picks(bias):
    """The indexer output an entry bias is scattered from (None: a visibility bias, HCA). The walk
    skips the templates of fresh buffers (``new_full(x, ...)`` reads only x's dtype and device)."""
    seen, stack = set(), [bias]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if is_call(n, aten.where.self) and meta_val(n).dtype == torch.int64 and _topk_indices(n.args[2]):
            return n
        inputs = n.all_input_nodes
        if is_call(n, aten.new_zeros.default, aten.new_full.default, aten.new_empty.default):
            inputs = [i for i in inputs if i is not n.args[0]]
        stack.extend(inputs)
    return None


def _topk_indices(node) -> bool:
    return is_call(node, operator.getitem) and node.args[1] == 1 and is_call(node.args[0], aten.topk.default)


def match_indexer(idx: fx.Node, comps: dict) -> dict:
    """``where(invalid, -1, topk(masked_fill(sum_h relu(q @ k^T) * s * w), k).indices)``; raises NoMatch."""
    cond, fill, order = idx.args
    if not (is_call(fill, aten.full_like.default) and fill.args[1] == -1 and _topk_indices(order)):
        raise NoMatch("idx is not where(invalid, -1, topk indices)")
    tk = call_args(order.args[0])
    if tk["dim"] not in (-1, 2) or not tk["largest"]:
        raise NoMatch("indexer topk is not the largest over the entries")
    k = tk["k"]
    if is_call(k, torch.sym_min):
        k = next((x for x in k.args if isinstance(x, int)), None)
    if not isinstance(k, int):
        raise NoMatch("top-k width is not a constant")
    masked = strip(tk["self"])
    total = strip(masked.args[0]) if is_call(masked, aten.masked_fill.Scalar) else None
    if not (is_call(total, aten.sum.dim_IntList) and list(total.args[1]) in ([2], [-2])):
        raise NoMatch("indexer scores are not a masked head sum")
    prod = strip(total.args[0])
    if not is_call(prod, aten.mul.Tensor):
        raise NoMatch("indexer scores are not relu(q . k) * w")
    relu_side = [x for x in prod.args[:2] if _relu_of(x)[0] is not None]
    if len(relu_side) != 1:
        raise NoMatch("indexer scores are not relu(q . k) * w")
    relu, scale = _relu_of(relu_side[0])
    w = strip(next(x for x in prod.args[:2] if x is not relu_side[0]))
    w = strip(w.args[0]) if is_call(w, aten.unsqueeze.default) else w
    es = strip(relu.args[0])
    if not is_call(es, aten.matmul.default):
        raise NoMatch("indexer scores are not q @ keys^T")
    q, keys = strip(es.args[0]), _to_entries(es.args[1], comps)
    if keys is None:
        raise NoMatch("indexer keys are not a recognised compressor's entries")
    if len(C._shape(q)) != 4 or len(C._shape(w)) != 3:
        raise NoMatch("indexer q / weights are not [B, T, H, d] / [B, T, H]")
    return dict(q=q, w=w, keys=keys, comp=comps[keys], topk=k, where=idx, wscale=scale)


def _relu_of(node) -> tuple:
    """``relu(x) * s`` (s > 0) or ``relu(x)`` -> (relu node, s), else (None, 0)."""
    node = strip(node)
    if is_call(node, aten.mul.Tensor) and is_call(strip(node.args[0]), aten.relu.default):
        s = scalar(node.args[1])
        return (strip(node.args[0]), float(s)) if s is not None and s > 0 else (None, 0.0)
    return (node, 1.0) if is_call(node, aten.relu.default) else (None, 0.0)


def verify_attention(gm, att: C.Attention, ratios: dict, classifier) -> None:
    """Window from classifying the window mask; then the region on random q / raw K=V / entries /
    idx / sink vs ``sparse_attention``; raises NoMatch."""
    kind = classifier.classify(att.wmask, "additive")
    if kind.kind != "sliding":
        raise NoMatch(f"the window mask is {kind.kind}, not sliding: {kind.reason}")
    att.window = kind.window
    p, t, b = C.check_p(ratios), C.CHECK_T, C.CHECK_B
    ev = C._Eval(gm, ratios, p, t)
    _, h, _, d = C._shape(att.q)
    given = {att.q: ev.randn([b, h, t, d]), att.kv_present: ev.randn([b, 1, p + t, d]), att.sink: ev.randn([h])}
    comp = given[att.comp.present] = ev.randn([b, (p + t) // att.comp.ratio, d])
    ratio, idx = att.comp.ratio, None
    if att.idx is not None:
        idx = given[att.idx] = C._random_idx(ev, b, t, (p + t) // ratio, p, ratio, att.indexer["topk"])
    (out,) = ev([att.out], given)
    with torch.no_grad():
        ref = ops.sparse_attention(given[att.q].transpose(1, 2), given[att.kv_present][:, 0], comp, idx,
                                   given[att.sink], torch.tensor(p), scale=att.scale, window=att.window,
                                   ratio=ratio).transpose(1, 2)
    att.max_rel = C._rel(out, ref)
    if not att.max_rel <= probe_tolerance(out, ref):
        raise NoMatch(f"sub-graph does not compute sparse_attention (window {att.window}, ratio {ratio}): "
                      f"max rel error {att.max_rel:.2e}")
