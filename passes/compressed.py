"""Recognise DeepSeek V4 compressed attention (CSA / HCA / window-only) and rewrite it into
``effexport::kv_compress_step``, ``indexer_topk`` and ``sparse_attention`` over a W-slot ring.

Patterns, as the captured step graph shows them (recognised from graph structure, shapes and
numerics, never from module or attribute names):

    compressor   softmax over dim 2 of ``[B, n, r(, 2r), c]`` score blocks that are padded / sliced
                 ``cat(score-state placeholder, z + ape[pos % r])``, times the value blocks
                 ``cat(kv-state placeholder, a)``, summed over dim 2 (CSA: the blocks are the
                 previous block's first half next to the current block's second half, 2r rows);
                 then RMSNorm(weight) and interleaved RoPE on the last dims (+ an optional per-entry
                 transform such as the indexer's Hadamard rotation); the entries are concatenated
                 to an entry placeholder (``present`` = that cat), the states are step outputs that
                 are slices of the padded cats.
    indexer      ``where(visible-gather, sort(masked_fill(sum_h relu(einsum(q, keys)) * w))[1][..., :k], -1)``
                 whose keys are a compressor's entries.
    attention    softmax(-1) over ``cat([window logits, (compressed logits), sink column])`` whose
                 output drops the sink column; window logits = ``scale * einsum(q, kv[:, -n:])``
                 with ``kv = cat(raw-kv placeholder, new)``; compressed logits read a compressor's
                 entries (HCA: all, masked by visibility; CSA: gathered by an indexer's ``idx``).

Check: each candidate's sub-graph is evaluated on random inputs (random weights where the op takes
them, random states / caches, a past length P = 37 and T = 3 new tokens) and compared with the op;
window, ratio, scale, eps and rope_dim come from the structure and are confirmed by this check.
A candidate that fails is left alone with the reason (``analysis.left_alone``).

Replacement and cache layout:

* raw K=V cache -> a ring of ``window`` slots (slot = position mod W, zero-initialised: negative
  positions are never read). The step unrolls the ring before the new tokens (positions
  ``pos-W .. pos-1``), runs ``sparse_attention`` over ``[ring, new]`` (exact for any T, so prefill
  and decode share the graph; ``sparse_attention_ring`` needs W >= window + T - 1 and is therefore
  not used), and writes the last W positions back by a gather (no duplicate scatter indices);
* compressed entries -> a fixed buffer of ``max_context // r`` slots written by
  ``kv_compress_step`` (the per-entry transform, e.g. Hadamard, is applied when the buffer is read);
* compressor states keep the sample's layout (it is the op's); rows that cannot be filled yet at
  ``pos`` are forced to ``-inf`` scores in the graph, so an all-zero initial state is exact;
* position ``arange``s that start at a raw-cache length start at ``pos``.

The same patterns as transformers' DeepSeek V4 writes them (a matmul over ``cat(raw K=V, entries)``
with an additive ``cat(window mask, entry bias)``, compressor windows built by slice assignment, the
step cache's state layout) are recognised and checked by passes/_compressed_hf.py; the rewrite is
the same, the states take the op's layout.

The pass runs after the attention ``rewrite`` (whose ``pos`` input it reuses; DeepSeek's einsum
attention yields no site there, transformers' CSA / HCA attention is handed over by discovery) and before ``positions`` / ``cache_plan``: rings are registered in
``ctx.rewriter.rings`` and buffers get ``seq_dims = None``, so the plan lists them as ring / state.

Files: this module holds the reference-form matchers with their numeric checks and the pass (over
the ~600-line guide: each matcher sits next to the check that confirms it);
passes/_compressed_write.py the replacement, passes/_compressed_hf.py the transformers forms.

Not covered: MLA or other layouts of the raw cache, per-batch positions, compressors without the
block softmax (left alone), FP8/FP4 simulation, and entry buffers larger than ``max_context // r``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

import effexport.custom_ops.indexer_topk  # noqa: F401  (registers the ops)
import effexport.custom_ops.kv_compress  # noqa: F401
import effexport.custom_ops.sparse_attention  # noqa: F401
from effexport.passes._graph import (TRANSPARENT, ancestors, aten, attr_value, call_args, concrete_shape,
                                     example_past, finish, free_symbols, is_call, meta_val, probe_call,
                                     probe_tolerance, strip)
from effexport.passes._compressed_write import Writer, clean, writes
from effexport.passes.positions import shift_aranges
from effexport.passes.sites import layer_label

ops = torch.ops.effexport
MOVEMENT = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
            aten.squeeze.dim, aten.expand.default, aten.slice.Tensor, aten.unflatten.int,
            aten.pad.default, aten.constant_pad_nd.default, *TRANSPARENT)
ASSERT = aten._assert_tensor_metadata.default
SOFTMAX = (aten.softmax.int, aten._softmax.default)
DEFAULT_MAX_CONTEXT = 4096
CHECK_B, CHECK_P, CHECK_T = 2, 37, 3  # sizes of the numeric check (P not a multiple of any ratio)


class NoMatch(Exception):
    """A candidate is not the pattern; the message is the reason."""


@dataclass
class Compressor:
    """One compressor: the op's argument nodes and the nodes it replaces."""

    anchor: fx.Node
    ratio: int
    overlap: bool
    a: fx.Node
    z: fx.Node
    ape: fx.Node
    norm_weight: fx.Node
    inv_freq: fx.Node
    eps: float
    rope_dim: int
    state_a: fx.Node
    state_z: fx.Node
    comp: fx.Node                    # entry placeholder
    present: fx.Node                 # cat(comp, entries)
    out_a: fx.Node
    out_z: fx.Node
    finish: fx.Node                  # entries before the per-entry transform
    post: list = field(default_factory=list)  # per-entry transform nodes, finish -> cat operand
    max_rel: float = 0.0
    layout: str = "ref"              # state layout: "ref" (the op's) | "hf" (passes/_compressed_hf.py)


@dataclass
class Attention:
    """One window (+ compressed) attention with sink."""

    anchor: fx.Node
    q: fx.Node
    kv_ph: fx.Node
    kv_new: fx.Node
    kv_present: fx.Node
    sink: fx.Node
    scale: float
    out: fx.Node
    comp: Compressor | None = None
    idx: fx.Node | None = None
    indexer: dict | None = None
    window: int = 0
    max_rel: float = 0.0
    seq_dim: int = 1                 # raw cache [B, S, D] (1) or Hugging Face's [B, 1, S, D] (2)
    wmask: fx.Node | None = None     # the window part of an additive mask (Hugging Face form)

    @property
    def kind(self) -> str:
        return "window_only" if self.comp is None else ("csa" if self.idx is not None else "hca")


# ------------------------------------------------------------------------------------- helpers
def _shape(node) -> list:
    val = meta_val(node)
    if not isinstance(val, torch.Tensor):
        raise NoMatch(f"{getattr(node, 'name', node)} has no tensor metadata")
    return list(val.shape)


def _leaves(node, path=()) -> list[fx.Node]:
    """Non-movement sources of a value (through views, slices, pads, casts and cats)."""
    node = strip(node)
    if is_call(node, aten.cat.default):
        return [x for t in node.args[0] for x in _leaves(t)]
    if is_call(node, *MOVEMENT):
        return _leaves(node.args[0])
    return [node]


def _is_const(node) -> bool:
    """True if no placeholder is among the node's ancestors (a constant of the model)."""
    return not any(n.op == "placeholder" for n in ancestors([node]))


def _cat_with_placeholder(node) -> tuple[fx.Node, fx.Node] | None:
    node = strip(node)
    if is_call(node, aten.cat.default) and len(node.args[0]) == 2 and call_args(node)["dim"] in (1, -2):
        ph = strip(node.args[0][0])
        if ph.op == "placeholder":
            return ph, node.args[0][1]
    return None


def _outputs(graph: fx.Graph) -> list:
    return list(next(n for n in graph.nodes if n.op == "output").args[0])


def _moved_from(node, source) -> bool:
    if node is source:
        return True
    if is_call(node, aten.cat.default):
        return any(_moved_from(t, source) for t in node.args[0])
    return is_call(node, *MOVEMENT) and _moved_from(node.args[0], source)


# -------------------------------------------------------------------------------- evaluation
class Sizes(dict):
    """Entry placeholder -> ratio r (its length is ``P // r``); ``full`` maps the raw caches an
    earlier pass already made rings to their seq dim (they are evaluated at length P: the graph
    still reads their length as the past length)."""

    def __init__(self, ratios: dict, full: dict | None = None):
        super().__init__(ratios)
        self.full = dict(full or {})
        self.p = CHECK_P  # past length of the numeric checks (find_compressed sets :func:`check_length`)


def check_p(ratios) -> int:
    """The numeric checks' past length for these sizes (:data:`CHECK_P` for a plain dict)."""
    return getattr(ratios, "p", CHECK_P)


def check_length(gm: fx.GraphModule, ratios) -> int:
    """Past length P of the numeric checks: at least the capture's example past length
    (:func:`~effexport.passes._graph.example_past`: the graph is only right from there on), never
    below :data:`CHECK_P`, and not a multiple of any ratio (a partial block stays in the window state)."""
    p = example_past(gm, CHECK_P)
    while any(p % r == 0 for r in set(ratios.values())):
        p += 1
    return p


class _Eval:
    """Evaluate graph nodes on concrete inputs: placeholders get random tensors whose symbolic
    sizes are batch B, tokens T, past length P (``P // r`` for entry placeholders of ratio r).
    :meth:`dim` gives a node's size from those sizes without computing the node (at real width
    that can mean evaluating whole decoder layers on random stand-in weights)."""

    def __init__(self, gm: fx.GraphModule, ratios: dict, p: int, t: int, seed: int = 0):
        self.gm, self.ratios, self.p, self.t = gm, ratios, p, t
        self.full = getattr(ratios, "full", {})
        self.gen = torch.Generator().manual_seed(seed)
        self._sizes: dict | None = None  # size symbol -> its value here (from every placeholder), lazily

    def randn(self, shape, dtype=torch.float32):
        return torch.randn(shape, generator=self.gen, dtype=torch.float32).to(dtype)

    def shape(self, node) -> list[int]:
        """The concrete shape a placeholder gets at this evaluation's B, T, P."""
        shape = []
        for i, d in enumerate(meta_val(node).shape):
            if not isinstance(d, torch.SymInt):
                shape.append(int(d))
            elif i == 0:
                shape.append(CHECK_B)
            elif node.name == "input_ids":
                shape.append(self.t)
            else:
                shape.append(self.p // self.ratios.get(node, 1))
        if node in self.full:
            shape[self.full[node]] = self.p
        return shape

    def placeholder(self, node):
        shape, dtype = self.shape(node), meta_val(node).dtype
        if dtype == torch.int64:
            return torch.randint(0, 2, shape, generator=self.gen)
        return self.randn(shape, dtype)

    def dim(self, node, i: int) -> int | None:
        """Size ``i`` of ``node``'s value at this evaluation, from the placeholders' sizes (None when
        it has a symbol no placeholder defines)."""
        if self._sizes is None:
            self._sizes = {}
            for ph in self.gm.graph.nodes:
                if ph.op == "placeholder" and isinstance(ph.meta.get("val"), torch.Tensor):
                    for sym, size in zip(meta_val(ph).shape, self.shape(ph)):
                        if isinstance(sym, torch.SymInt) and sym.node.expr.is_Symbol:
                            self._sizes.setdefault(sym.node.expr, size)
        d = meta_val(node).shape[i]
        if not free_symbols(d) <= set(self._sizes):
            return None
        return concrete_shape(meta_val(node), self._sizes)[i]

    def __call__(self, outputs: list, given: dict) -> list:
        values = dict(given)
        need, stack = [], list(outputs)
        seen = set()
        while stack:
            n = stack.pop()
            if n in seen or n in values:
                continue
            seen.add(n)
            need.append(n)
            stack.extend(n.all_input_nodes)
            stack.extend(writes(n))  # in-place writes into views of n change its value
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        with torch.no_grad():
            for n in sorted(need, key=order.__getitem__):
                if n.op == "placeholder":
                    values[n] = self.placeholder(n)
                elif n.op == "get_attr":
                    values[n] = attr_value(self.gm, n.target)
                else:
                    values[n] = probe_call(n, values)
        return [values[o] for o in outputs]


def _rel(got, ref) -> float:
    if got.shape != ref.shape:
        return float("inf")
    if got.dtype in (torch.int64, torch.bool):
        return 0.0 if torch.equal(got, ref) else float("inf")
    diff = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    return diff / max(ref.double().abs().max().item() if ref.numel() else 0.0, 1e-30)


# ------------------------------------------------------------------------------- compressors
def pooling(sm: fx.Node) -> tuple[fx.Node, fx.Node]:
    """``sum(values * softmax(scores, dim=2) [cast], dim=2)`` around the block softmax ``sm`` ->
    (values, the sum); raises NoMatch."""
    if call_args(sm)["dim"] != 2 or len(_shape(sm)) != 4:
        raise NoMatch("softmax is not over dim 2 of a [B, n, r, c] block tensor")
    weights = sm
    while len(weights.users) == 1 and is_call(next(iter(weights.users)), aten.to.dtype, aten._to_copy.default):
        weights = next(iter(weights.users))
    muls = [u for u in weights.users if is_call(u, aten.mul.Tensor)]
    if len(weights.users) != 1 or len(muls) != 1:
        raise NoMatch("block softmax does not weight exactly one value tensor")
    mul = muls[0]
    sums = [u for u in mul.users if is_call(u, aten.sum.dim_IntList) and list(u.args[1]) in ([2], [-2])]
    if len(mul.users) != 1 or not sums:
        raise NoMatch("weighted values are not summed over the block dim")
    return (mul.args[0] if mul.args[1] is weights else mul.args[1]), sums[0]


def match_compressor(gm: fx.GraphModule, sm: fx.Node) -> Compressor:
    """Structure of one compressor around the block softmax ``sm``; raises NoMatch."""
    a_blocks, pooled = pooling(sm)
    zin = strip(sm.args[0])
    overlap = is_call(zin, aten.cat.default) and call_args(zin)["dim"] == 2
    rows = _shape(sm)[2]
    if not isinstance(rows, int):
        raise NoMatch("block size is symbolic")
    ratio = rows // 2 if overlap else rows
    z_src, a_src = _leaves(sm.args[0]), _leaves(a_blocks)
    zph = {n for n in z_src if n.op == "placeholder"}
    aph = {n for n in a_src if n.op == "placeholder"}
    znew = {n for n in z_src if n.op != "placeholder"}
    anew = {n for n in a_src if n.op != "placeholder"}
    if len(zph) != 1 or len(aph) != 1 or len(znew) != 1 or len(anew) != 1:
        raise NoMatch("score / value blocks are not built from one state input and one projection each")
    z_full, a = znew.pop(), anew.pop()
    if not is_call(z_full, aten.add.Tensor):
        raise NoMatch("scores are not projection + positional bias")
    ape = z = None
    for x, y in (z_full.args[:2], z_full.args[1::-1]):
        ix = strip(x)
        if is_call(ix, aten.index.Tensor) and strip(ix.args[0]).op == "get_attr" and len(_shape(ix.args[0])) == 2:
            ape, z = strip(ix.args[0]), y
    if ape is None or _shape(ape)[0] != ratio:
        raise NoMatch(f"no [r={ratio}, c] positional bias indexed by position mod r added to the scores")
    present, comp, fin, post, weight, eps, freq = entries_of(gm, pooled)
    outs = [o for o in _outputs(gm.graph) if isinstance(o, fx.Node)]
    out_z = [o for o in outs if _moved_from(o, _pad_of(sm.args[0])) and _shape(o) == _shape(next(iter(zph)))]
    out_a = [o for o in outs if _moved_from(o, _pad_of(a_blocks)) and _shape(o) == _shape(next(iter(aph)))]
    if len(out_z) != 1 or len(out_a) != 1:
        raise NoMatch("the new states are not step outputs sliced from the padded blocks")
    return Compressor(sm, ratio, overlap, a, z, ape, weight, freq, eps, 2 * _shape(freq)[0],
                      aph.pop(), zph.pop(), comp, present, out_a[0], out_z[0], fin, post)


def entries_of(gm: fx.GraphModule, pooled: fx.Node) -> tuple:
    """After the pooled blocks: (present = cat(entry placeholder, entries), the placeholder, the RoPE
    cat, the per-entry transform nodes in order, RMSNorm weight, eps, RoPE inv_freq); raises NoMatch."""
    # the first cat of a placeholder with a value computed from pooled
    present, order = None, {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in list(gm.graph.nodes)[order[pooled]:]:
        cp = _cat_with_placeholder(n) if is_call(n, aten.cat.default) else None
        if cp and pooled in _ancestors_until(cp[1], pooled):
            present = n
            break
    if present is None:
        raise NoMatch("pooled entries are not appended to an entry cache")
    comp, entries = _cat_with_placeholder(present)
    post, fin = [], _rope_cat_through_movement(entries)
    while not (is_call(fin, aten.cat.default) and call_args(fin)["dim"] in (-1, 2)):
        ins = [i for i in fin.all_input_nodes if not _is_const(i)]
        if len(ins) != 1 or fin.op != "call_function":
            raise NoMatch("entries are not RoPE'd (a last-dim cat) before a per-entry transform")
        post.append(fin)
        fin = strip(ins[0])
    region = _ancestors_until(fin, pooled)
    freqs = [x for n in region if is_call(n, aten.mul.Tensor) and all(isinstance(y, fx.Node) for y in n.args[:2])
             for x, y in (n.args[:2], n.args[1::-1]) if len(_shape(x)) == 1 and len(_shape(y)) >= 2
             and _is_const(x) and meta_val(x).dtype.is_floating_point
             and pooled not in _ancestors_until(y, pooled)]  # positions[..., None] * inv_freq, not the norm
    tables = set(ancestors(freqs[:1]))  # a frequency buffer is no norm weight
    weights = [n for n in region if n.op == "get_attr" and len(_shape(n)) == 1 and n not in tables]
    eps = [float(n.args[1]) for n in region if is_call(n, aten.add.Tensor) and isinstance(n.args[1], float)
           and any(is_call(u, aten.rsqrt.default) for u in n.users)]
    if len(weights) != 1 or len(eps) != 1 or not freqs:
        raise NoMatch(f"no RMSNorm weight / eps / RoPE frequencies after pooling ({len(weights)}, {len(eps)}, "
                      f"{len(freqs)})")
    return present, comp, fin, post[::-1], weights[0], eps[0], freqs[0]


def _rope_cat_through_movement(entries):
    """The last-dim (RoPE) cat under ``entries`` when only movement ops lie between (Hugging Face:
    ``cat(...).squeeze(1)[:, 1:-1]``), else ``strip(entries)``."""
    node = strip(entries)
    while is_call(node, *MOVEMENT) and not is_call(node, aten.pad.default, aten.constant_pad_nd.default):
        node = strip(node.args[0])
    return node if is_call(node, aten.cat.default) and call_args(node)["dim"] in (-1, 2) else strip(entries)


def _pad_of(node):
    """The padded cat (before unflatten) under a block tensor."""
    node = strip(node)
    while not is_call(node, aten.pad.default, aten.constant_pad_nd.default):
        if is_call(node, aten.cat.default):
            node = strip(node.args[0][0])
        elif is_call(node, *MOVEMENT):
            node = strip(node.args[0])
        else:
            raise NoMatch("block tensor is not a padded cat of state and projection")
    return node


def _ancestors_until(node, stop) -> set:
    return set(ancestors([node], boundary=[stop]))


def _step_op(m: Compressor, v: dict, comp_buf, pos):
    return ops.kv_compress_step(v[m.a], v[m.z], v[m.ape], v[m.norm_weight], v[m.inv_freq], comp_buf, v[m.state_a],
                                v[m.state_z], pos, ratio=m.ratio, overlap=m.overlap, eps=m.eps,
                                rope_dim=m.rope_dim)


def verify_compressor(gm, m: Compressor, ratios: dict) -> None:
    """Region on random a, z, ape, norm weight and states vs ``kv_compress_step`` at (P, T) = (37, 3)
    and at (3r - 2, 3) (a block completes, so entries are compared too); raises NoMatch."""
    m.max_rel, tol = 0.0, 0.0
    for p, t in ((check_p(ratios), CHECK_T), (3 * m.ratio - 2, 3)):
        ev = _Eval(gm, ratios, p, t)
        given = {n: ev.placeholder(n) for n in (m.state_a, m.state_z, m.comp)}
        for n in (m.a, m.z, m.ape, m.norm_weight):
            given[n] = ev.randn(_concrete(n, ev), meta_val(n).dtype)
        given[m.norm_weight] = 1 + 0.1 * given[m.norm_weight]
        present, out_a, out_z, inv = ev([m.present, m.out_a, m.out_z, m.inv_freq], given)
        given[m.inv_freq] = inv
        buf = torch.zeros(CHECK_B, (p + t) // m.ratio + 1, _shape(m.finish)[-1])
        with torch.no_grad():
            got, sa, sz = _step_op(m, given, buf, torch.tensor(p))
        entries = got[:, p // m.ratio:(p + t) // m.ratio]
        if m.post:  # the graph's entries carry the per-entry transform: apply it to the op's entries
            entries = _apply_post(m, entries, gm)
        m.max_rel = max(m.max_rel, _rel(entries, present[:, given[m.comp].shape[1]:]), _rel(sa, out_a),
                        _rel(sz.nan_to_num(neginf=-1e30), out_z.nan_to_num(neginf=-1e30)))
        tol = max(tol, probe_tolerance(present, out_a, out_z))
    if not m.max_rel <= tol:
        raise NoMatch(f"sub-graph does not compute kv_compress_step: max rel error {m.max_rel:.2e}")


def _concrete(node, ev) -> list:
    shape = []
    for i, d in enumerate(_shape(node)):
        if isinstance(d, torch.SymInt):
            shape.append(CHECK_B if i == 0 else ev.t)
        else:
            shape.append(int(d))
    return shape


def _apply_post(m: Compressor, entries, gm):
    """Evaluate the per-entry transform nodes on concrete entries."""
    ev = _Eval(gm, {}, CHECK_P, CHECK_T)
    values = {m.finish: entries.to(meta_val(m.finish).dtype)}  # the op's entries in the graph's dtype
    for n in m.post:
        consts = [i for i in n.all_input_nodes if i not in values]
        for c, val in zip(consts, ev(consts, {})):
            values[c] = val
        values[n] = probe_call(n, values)
    return values[m.post[-1]]


# ---------------------------------------------------------------------------------- attention
def match_attention(gm, sm: fx.Node, comps: dict) -> Attention:
    """Window (+ compressed) sink attention around softmax ``sm``; ``comps`` maps entry caches
    (present cats) to their compressors. Raises NoMatch."""
    if call_args(sm)["dim"] not in (-1, 3) or len(_shape(sm)) != 4:
        raise NoMatch("softmax is not over the last dim of [B, T, H, S]")
    x = strip(sm.args[0])
    drop = [u for u in sm.users if is_call(u, aten.slice.Tensor) and call_args(u)["end"] == -1]
    if not is_call(x, aten.cat.default) or len(x.args[0]) != 2 or len(sm.users) != 1 or not drop:
        raise NoMatch("softmax input is not cat(scores, sink column) with the sink column dropped after")
    scores, col = x.args[0]
    sink = _leaves(col)
    if len(sink) != 1 or sink[0].op != "get_attr" or len(_shape(sink[0])) != 1:
        raise NoMatch("the extra column is not a per-head sink parameter")
    blocks = list(scores.args[0]) if is_call(scores, aten.cat.default) else [scores]
    logits = []
    for b in blocks:
        b = strip(b)
        if not is_call(b, aten.masked_fill.Scalar):
            raise NoMatch("a score block is not masked")
        m = strip(b.args[0])
        if not (is_call(m, aten.mul.Tensor) and isinstance(m.args[1], float) and is_call(m.args[0], aten.einsum.default)):
            raise NoMatch("a score block is not scale * einsum(q, keys)")
        logits.append((b, m.args[1], m.args[0]))
    (_, scale, win_es), comp_blocks = logits[0], logits[1:]
    q, kv = (strip(t) for t in win_es.args[1])
    kv_cat = strip(kv)
    while not is_call(kv_cat, aten.cat.default) and is_call(kv_cat, *MOVEMENT):
        kv_cat = strip(kv_cat.args[0])
    src = _cat_with_placeholder(kv_cat)
    if src is None:
        raise NoMatch("window keys are not a slice of cat(raw-cache placeholder, new entries)")
    att = Attention(sm, q, src[0], src[1], kv_cat, sink[0], float(scale), _attention_out(drop[0]))
    if len(comp_blocks) > 1:
        raise NoMatch("more than one compressed score block")
    if comp_blocks:
        keys = strip(comp_blocks[0][2].args[1][1])
        if is_call(keys, aten.index.Tensor):  # CSA: entries gathered by idx
            att.idx = strip(keys.args[1][-1])
            att.idx = strip(att.idx.args[0]) if is_call(att.idx, aten.clamp.default) else att.idx
            keys = strip(keys.args[0])
        if keys not in comps:
            raise NoMatch("compressed keys are not a recognised compressor's entries")
        att.comp = comps[keys]
    return att


def _attention_out(drop: fx.Node) -> fx.Node:
    """The value sum after the dropped sink column: einsum (+ einsum), before casts."""
    sums = [n for n in _descendants(drop, 4) if is_call(n, aten.einsum.default)]
    out = sums[-1] if sums else None
    for n in _descendants(drop, 5):
        if is_call(n, aten.add.Tensor) and all(is_call(strip(a), aten.einsum.default) for a in n.args[:2]):
            out = n
    if out is None:
        raise NoMatch("no probs @ values einsum after the softmax")
    return out


def _descendants(node, depth) -> list:
    found, frontier = [], [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users if not is_call(u, ASSERT)]
        found += frontier
    return found


def match_indexer(att: Attention, comps: dict) -> dict:
    """``idx = where(gather(visible), sort(masked scores)[1][..., :k], -1)``; raises NoMatch."""
    w_ = att.idx
    if not is_call(w_, aten.where.self):
        raise NoMatch("idx is not where(visible, order, -1)")
    order = strip(w_.args[1])
    if not is_call(order, aten.slice.Tensor) or not is_call(order.args[0], operator.getitem):
        raise NoMatch("idx is not a slice of sort indices")
    srt = order.args[0].args[0]
    if not is_call(srt, aten.sort.stable, aten.sort.default):
        raise NoMatch("idx does not come from a sort")
    masked = strip(srt.args[0])
    total = strip(masked.args[0]) if is_call(masked, aten.masked_fill.Scalar) else None
    if not is_call(total, aten.sum.dim_IntList):
        raise NoMatch("sorted scores are not a head sum")
    prod = strip(total.args[0])
    relu = [strip(a) for a in prod.args[:2] if is_call(strip(a), aten.relu.default)]
    if not is_call(prod, aten.mul.Tensor) or len(relu) != 1:
        raise NoMatch("indexer scores are not relu(q . k) * w")
    w = strip(next(a for a in prod.args[:2] if strip(a) is not relu[0]))
    w = strip(w.args[0]) if is_call(w, aten.unsqueeze.default) else w
    es = strip(relu[0].args[0])
    q, keys = (strip(t) for t in es.args[1])
    entry = next((c for c in comps.values() if keys is strip(c.present)), None)
    if entry is None:
        raise NoMatch("indexer keys are not a recognised compressor's entries")
    return dict(q=q, w=w, keys=keys, comp=entry, topk=_topk_of(order), where=w_)


def _topk_of(order: fx.Node) -> int:
    end = call_args(order)["end"]
    if isinstance(end, int):
        return end
    if is_call(end, torch.sym_min):
        ints = [a for a in end.args if isinstance(a, int)]
        if ints:
            return ints[0]
    raise NoMatch("top-k width is not a constant")


def verify_attention(gm, att: Attention, ratios: dict) -> None:
    """Window from the mask at P = 1024, then the region on random q / kv / entries / idx / sink
    vs ``sparse_attention``; raises NoMatch."""
    blocks = strip(att.anchor.args[0]).args[0][0]
    first = strip(strip(blocks).args[0][0]) if is_call(strip(blocks), aten.cat.default) else strip(blocks)
    mask = first.args[1]
    (hid,) = _Eval(gm, ratios, max(1024, check_p(ratios)), 1)([mask], {})
    att.window = int((~hid.reshape(hid.shape[0], -1)[-1].bool()).sum())
    if att.window < 1:
        raise NoMatch("the window mask hides every key")
    p, t, b = check_p(ratios), CHECK_T, CHECK_B
    ev = _Eval(gm, ratios, p, t)
    h, d = _shape(att.q)[2], _shape(att.q)[3]
    given = {att.q: ev.randn([b, t, h, d]), att.kv_present: ev.randn([b, p + t, d]),
             att.sink: ev.randn([h])}
    comp = torch.zeros(b, 0, d)
    idx, ratio = None, 0
    if att.comp is not None:
        ratio = att.comp.ratio
        n = ev.dim(att.comp.present, 1)  # the length the graph expects
        if n is None:
            (present,) = ev([att.comp.present], {})
            n = present.shape[1]
        comp = given[att.comp.present] = ev.randn([b, n, d])
    if att.idx is not None:
        idx = given[att.idx] = _random_idx(ev, b, t, (p + t) // ratio, p, ratio, att.indexer["topk"])
    (out,) = ev([att.out], given)
    with torch.no_grad():
        ref = ops.sparse_attention(given[att.q], given[att.kv_present], comp, idx, given[att.sink],
                                   torch.tensor(p), scale=att.scale, window=att.window, ratio=ratio)
    att.max_rel = _rel(out, ref)
    if not att.max_rel <= probe_tolerance(out, ref):
        raise NoMatch(f"sub-graph does not compute sparse_attention (window {att.window}, ratio {ratio}): "
                      f"max rel error {att.max_rel:.2e}")


def _random_idx(ev, b, t, n, p, ratio, k):
    """Random distinct visible entries per query (best first), -1 padded."""
    idx = torch.full((b, t, k), -1, dtype=torch.int64)
    for j in range(t):
        vis = (p + j + 1) // ratio
        for i in range(b):
            perm = torch.randperm(vis, generator=ev.gen)[:k]
            idx[i, j, :len(perm)] = perm
    return idx


def verify_indexer(gm, att: Attention, ratios: dict) -> None:
    """The idx region on random q / w / keys vs ``indexer_topk``; raises NoMatch."""
    p, t = check_p(ratios), CHECK_T
    ix, ev = att.indexer, _Eval(gm, ratios, p, t)
    ratio = ix["comp"].ratio
    qs = _concrete(ix["q"], ev)
    given = {ix["q"]: ev.randn(qs), ix["w"]: ev.randn(qs[:3]),
             ix["keys"]: ev.randn([CHECK_B, (p + t) // ratio, qs[3]])}
    (got,) = ev([ix["where"]], given)
    w = given[ix["w"]] * ix.get("wscale", 1.0)
    with torch.no_grad():
        ref = ops.indexer_topk(given[ix["q"]], w, given[ix["keys"]], torch.tensor(p), ratio=ratio, topk=ix["topk"])
        scores = (torch.einsum("bthd,bnd->bthn", given[ix["q"]], given[ix["keys"]]).relu() * w[..., None]).sum(2)
    if not _same_picks(got, ref, scores):
        raise NoMatch("sub-graph does not compute indexer_topk (selected indices differ)")


def _same_picks(got, ref, scores) -> bool:
    """Equal selections up to the order of exactly tied scores (random keys can tie at relu = 0;
    ``torch.topk`` leaves their order unspecified, indexer_topk puts the lower index first).
    A graph whose top-k width is ``min(topk, entries)`` picks fewer columns than ``indexer_topk``'s
    ``topk`` when the probe holds fewer entries than top-k (DeepSeek V4-Flash: top-k 512, 10 entries
    at the probe length): its picks are compared with ``ref``'s first columns, the rest of ``ref``
    must be padding (-1)."""
    width = got.shape[-1]
    if got.shape[:-1] == ref.shape[:-1] and width < ref.shape[-1] and bool((ref[..., width:] < 0).all()):
        ref = ref[..., :width]
    if got.shape != ref.shape or not torch.equal(got < 0, ref < 0):
        return False
    at = [scores.gather(-1, x.clamp(min=0)).masked_fill(x < 0, 0.0) for x in (got, ref)]
    return torch.equal(*at) and all(len(set(row.tolist()) - {-1}) == int((row >= 0).sum()) for row in got.flatten(0, 1))


# ---------------------------------------------------------------------------------------- pass
def find_compressed(gm: fx.GraphModule, full: dict | None = None,
                    classifier=None) -> tuple[list[Attention], list[str], dict]:
    """Every verified layer (attention with its compressors / indexer), the reasons of the
    candidates left alone, and the counts. Each pattern is tried in its reference form (this
    module) and in its Hugging Face form (passes/_compressed_hf.py). ``full``: rings made by an
    earlier pass -> seq dim (see :class:`Sizes`); ``classifier``: the pipeline's mask classifier
    (its cached verdicts are kept)."""
    from effexport.passes import _compressed_hf as hf
    from effexport.passes.masks import MaskClassifier

    comps, reasons = {}, []
    for n in list(gm.graph.nodes):
        if is_call(n, *SOFTMAX) and call_args(n)["dim"] == 2 and len(_shape(n)) == 4:
            try:
                m = match_compressor(gm, n)
            except NoMatch as why:
                try:
                    m = hf.match_compressor(gm, n)
                except NoMatch as why_hf:
                    reasons.append(f"compressor candidate {n.name} [{layer_label(n)}]: {why} (slice-assigned "
                                   f"form: {why_hf})")
                    continue
            comps[strip(m.present)] = m
    ratios = Sizes({m.comp: m.ratio for m in comps.values()}, full)
    ratios.p = check_length(gm, ratios)
    for m in list(comps.values()):
        try:
            (hf.verify_compressor if m.layout == "hf" else verify_compressor)(gm, m, ratios)
        except (NoMatch, RuntimeError, ValueError, IndexError) as why:
            reasons.append(f"compressor {m.anchor.name} [{layer_label(m.anchor)}]: {why}")
            del comps[strip(m.present)]
    layers = []
    for n in list(gm.graph.nodes):
        if not (is_call(n, *SOFTMAX) and call_args(n)["dim"] in (-1, 3) and len(_shape(n)) == 4):
            continue
        x = strip(n.args[0])
        fields = None if is_call(x, aten.cat.default) and len(x.args[0]) == 2 else hf.candidate(n)
        if fields is None and not (is_call(x, aten.cat.default) and len(x.args[0]) == 2):
            continue  # not a sink attention candidate (mHC Sinkhorn, plain softmax, attention sites)
        try:
            att = match_attention(gm, n, comps) if fields is None else hf.match_attention(gm, n, comps, fields)
            if att.idx is not None:
                att.indexer = match_indexer(att, comps) if fields is None else hf.match_indexer(att.idx, comps)
                verify_indexer(gm, att, ratios)
            if fields is None:
                verify_attention(gm, att, ratios)
            else:
                classifier = classifier or MaskClassifier(gm)
                hf.verify_attention(gm, att, ratios, classifier)
            layers.append(att)
        except (NoMatch, RuntimeError, ValueError, IndexError) as why:
            reasons.append(f"sparse-attention candidate {n.name} [{layer_label(n)}]: {why}")
    used = {id(c) for a in layers for c in (a.comp, a.indexer and a.indexer["comp"]) if c}
    for m in comps.values():
        if id(m) not in used:
            reasons.append(f"compressor {m.anchor.name} [{layer_label(m.anchor)}]: its entries feed no "
                           "recognised sparse attention / indexer; left alone")
    return layers, reasons, comps


def rewrite_compressed(ctx, max_context: int | None = None) -> dict:
    """Pipeline pass: rewrite every verified DeepSeek V4 attention layer (see the module docstring).

    ``ctx`` is a ``passes.pipeline.Context``; ``max_context`` (default ``ctx.max_context`` if set,
    else 4096) sizes the entry buffers. Returns ``{"csa", "hca", "window_only", "left_alone", ...}``."""
    gm, prog = ctx.program.gm, ctx.program
    max_context = max_context or getattr(ctx, "max_context", None) or DEFAULT_MAX_CONTEXT
    earlier = getattr(ctx.rewriter, "rings", None) or {}
    layers, reasons, _ = find_compressed(gm, {ph: 2 for ph in earlier}, getattr(ctx, "classifier", None))
    ctx.analysis.left_alone.extend(reasons)
    counts = {"csa": 0, "hca": 0, "window_only": 0, "left_alone": len(reasons)}
    if ctx.pos is None:
        first = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name != "input_ids")
        with gm.graph.inserting_before(first):
            ctx.pos = gm.graph.placeholder("pos")
        with meta_val(first).fake_mode:
            ctx.pos.meta["val"] = torch.empty((), dtype=torch.int64)
    writer = Writer(gm, ctx.pos, max_context)
    rings = getattr(ctx.rewriter, "rings", None)
    rings = rings if rings is not None else {}
    names = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder" and n is not ctx.pos], prog.inputs))
    dims = {}  # ring placeholder -> its seq dim
    for att in layers:
        comp_read = idx = None
        if att.comp is not None:
            _, comp_read = writer.compressor(att.comp)
            prog.seq_dims[names[att.comp.comp]] = None
            ctx.compressed[att.comp.comp] = att.comp.ratio
        if att.indexer is not None:
            ix = att.indexer
            _, keys = writer.compressor(ix["comp"])
            prog.seq_dims[names[ix["comp"].comp]] = None
            ctx.compressed[ix["comp"].comp] = ix["comp"].ratio
            w = ix["w"] if ix.get("wscale", 1.0) == 1.0 else writer.e(aten.mul.Tensor, ix["w"], ix["wscale"])
            idx = writer.e(ops.indexer_topk.default, ix["q"], w, keys, ctx.pos, ratio=ix["comp"].ratio,
                           topk=ix["topk"])
        writer.attention(att, comp_read, idx)
        rings[att.kv_ph] = att.window
        dims[att.kv_ph] = att.seq_dim
        counts[att.kind] += 1
    counts["positions"] = shift_aranges(gm.graph, ctx.pos, {ph: dims.get(ph, 1) for ph in rings})
    clean(gm)
    finish(gm)
    live = [u.name for n in gm.graph.nodes if is_call(n, aten.sym_size.int) and n.args[0] in rings
            and n.args[1] == dims.get(n.args[0], 1) for u in n.users]
    if live:
        ctx.analysis.left_alone.append(f"ring cache length still read by {', '.join(sorted(live))}")
    ctx.compressed_rings = rings
    return counts
