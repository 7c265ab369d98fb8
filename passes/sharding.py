"""Tensor- and expert-parallel sharding of the rewritten step program: one ordinary graph per rank.

Runs after the pipeline, on the rewritten :class:`StepProgram` and its fixed :class:`CachePlan`.
:func:`plan_sharding` decides once, for all ranks, what is split; :func:`shard_rank` writes one
rank's program and CachePlan from that decision (collectives: ``_c10d_functional.all_reduce`` +
``wait_tensor`` on a named process group, so the rank program is an ordinary graph that
``torch.export`` keeps as it is).

What is split (Megatron-style tensor parallelism):

* attention: every effexport attention op's query heads split evenly across the ``N`` ranks (rank r
  holds the r-th block of ``H / N`` heads; per-layer head counts are read per op). KV heads split the
  same way when ``Hkv >= N``; when ``Hkv < N`` each KV head is replicated on ``N / Hkv`` ranks and
  every rank holds exactly the KV head its query heads read (the cache of that head is then kept on
  ``N / Hkv`` ranks: the per-rank cache bytes sum to more than the unsharded plan by that factor).
  KV-sharing consumers read their producer's cache on the rank holding their heads' KV, which is
  the same block because heads are split the same way in every layer. The projections feeding q /
  k / v (and whatever else feeds the output projection per head, e.g. Laguna's per-head output gate)
  are column-parallel (rows of the weight sliced), the output projection row-parallel (columns
  sliced): its output is a partial sum.
* ZAYA1's CCA (``effexport::cca`` feeding a standard attention op): the attention, its K/V caches
  and the output projection split as above; the ``cca`` op itself runs on all heads on every rank
  (q/k/v down-projections, both convs, temperature, conv and value-shift state replicated) and the
  attention reads the rank's heads of its q/k/v (narrowed). Its convs are per head (depthwise per
  channel, then one group of ``d`` channels per q or k head) and q-k residuals stay within a KV group,
  so the q/k part is per KV group; but the value shift lays ``concat(x W_vc, x[t-1] W_vd)`` out as
  the KV heads (ZAYA1's Hk = 2: head 0 is the current half, head 1 the delayed half), so one rank's
  heads cannot be fed to one op call.
* DeepSeek V4's sparse attention (``sparse_attention`` / ``sparse_attention_ring``): its query heads
  (``wq_b`` column-parallel, per-head sink sliced) split like the above; the grouped output
  projection ``einsum(btgd,grd->btgr)`` with ``wo_a.weight.view(g, r, -1)`` slices ``wo_a`` by groups
  and ``wo_b`` is row-parallel. With fewer groups than ranks (g < N, N % g == 0) each rank holds
  part of a group: ``wo_a`` is sliced by group and by the rank's columns within it, and the einsum
  gives a partial sum of the group's block, which ``wo_b`` takes like any row-parallel input. One
  K=V head is shared by every query head (MQA), so its projection, window cache, the compressor
  (``kv_compress*``: one compressed head) and the lightning indexer (``indexer_topk``: its top-k
  ranks entries by the score summed over all indexer heads, so split heads would need an all-reduce
  of a score per compressed entry before the selection, inside the fused op) stay replicated.
* MLPs: a linear whose input is a pointwise function of other linears only, in a region feeding
  nothing else (``down(act(gate(x)) * up(x))``), is row-parallel and those linears column-parallel,
  when the hidden width divides by N; otherwise the MLP stays replicated (recorded in the plan).
* experts: an einsum over stacked expert weights ``[E, ...]`` computes the rank's E / N experts (the
  weights sliced on E); a replicated operand indexed by E (the router's combine weights) is narrowed
  to the rank's experts, and the contraction over E leaves a partial sum (the combine).
* partial sums flow through ops linear in them (sums of partial sums, scaling by a whole value,
  reshapes, same-dtype casts) and are all-reduced once, where they first meet any other op: one
  all-reduce per attention block and one per MLP / MoE block. In a bf16 / fp16 program the ops
  computing partial sums (``ShardPlan.sums``) read fp32 operands: the partial sums, the all-reduce
  and the bias are fp32, rounded once to the program's dtype after the all-reduce, as eager rounds
  the whole contraction once (:func:`_sums_in_fp32`).
* everything else (embeddings, norms, the LM head, routers, mHC's mixes, attention fed through
  effexport ops without a rule here) is replicated.

Soundness: after the seeds are chosen, one forward propagation over the graph tracks for every value
which dimension holds which block (or that it is a partial sum), and accepts only ops whose rule
keeps "the local value is block b of the global value" true (pointwise ops broadcasting over the
split dim, views, unflatten / flatten / stack that keep the block structure, transposes, reductions
and slices over other dims, the attention ops with a consistent GQA head mapping, the sparse
attention with only its query split, einsums over the split letter). A split value
reaching any other op, a program output other than a cache, or a contraction over blocks that are
replicated is refused with :class:`ShardingError` naming the layer and the op: a refused program is
never written wrong.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

import effexport.custom_ops  # noqa: F401  (registers the ops)
from effexport.passes._graph import TRANSPARENT, call_args, fake_mode_of, is_call, meta_val
from effexport.passes.cache_plan import CachePlan
from effexport.passes.errors import EXIT_USAGE, RewriteError
from effexport.passes.program import StepProgram
from effexport.passes.sites import layer_index, layer_label

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
ops = torch.ops.effexport

# attention op -> (new K argument or the read cache, the cache arguments)
ATTENTION_OPS = {
    ops.attention.default: ("k", ()),
    ops.attention_cache.default: ("k_new", ("k_past", "v_past")),
    ops.attention_ring.default: ("k_new", ("k_ring", "v_ring")),
    ops.attention_buffer.default: ("k_new", ("k_buf", "v_buf")),
    ops.attention_read.default: ("k_cache", ("k_cache", "v_cache")),
}
# effexport ops whose inputs must stay whole (replicated); the sparse attention's rule takes a split query first
OPAQUE = tuple(getattr(ops, name).default for name in ("cca", "mhc_pre", "mhc_post", "mhc_head", "kv_compress_step",
                                                        "indexer_topk", "sparse_attention", "sparse_attention_ring", "kv_compress", "sinkhorn")
)
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)
# DeepSeek V4's attention: query heads over one shared K=V latent (window, compressed entries, selection)
SPARSE_ATTENTION_OPS = (ops.sparse_attention.default, ops.sparse_attention_ring.default)
REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
              aten.softmax.int, aten._softmax.default, aten._log_softmax.default, aten.var.correction,
              aten.argmax.default)
DIM_OPS = (aten.slice.Tensor, aten.select.int, aten.chunk.default, aten.split.Tensor,
           aten.split_with_sizes.default, aten.narrow.default)


class ShardingError(RewriteError):
    """The program cannot be split across ranks as asked (exit 3); the message names the layer and op."""

    stage = "shard"


class ShardCountError(ShardingError):
    """The rank count does not divide a head count or width the model needs split (exit 2)."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Split:
    """A value split along ``dim`` into ``nblocks`` blocks; rank r holds block ``r // replicas``.

    With ``sub``, the ``replicas`` ranks holding a block do not hold copies: each holds sub-block
    ``r % replicas`` of dim ``sub`` too (heads finer than the groups a reshape gathers them in). With
    ``partial``, each of them holds a partial sum of the block (a contraction over such a sub dim),
    which a row-parallel linear may still take: every rank's share then counts once."""

    dim: int
    nblocks: int
    replicas: int = 1
    sub: int | None = None
    partial: bool = False

    def block(self, rank: int) -> int:
        return rank // self.replicas

    def to_json(self) -> dict:
        """dim, nblocks, replicas, and sub / partial where set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("sub", "partial") or v}

    @property
    def pieces(self) -> int:
        """Into how many pieces the value is cut (each rank holds one)."""
        return self.nblocks * (self.replicas if self.sub is not None else 1)

    def moved(self, dim: int) -> "Split":
        return dataclasses.replace(self, dim=dim)


PARTIAL = "partial"  # a value that is the sum of the ranks' local values (before its all-reduce)
# ops linear in a partial-sum operand (the other operands whole): the sum can wait for the all-reduce
SUM_LINEAR = (aten.add.Tensor, aten.sub.Tensor)
SCALE_LINEAR = (aten.mul.Tensor, aten.div.Tensor)
SHAPE_LINEAR = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
                aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.alias.default,
                aten.clone.default, aten.contiguous.default, aten.neg.default)


@dataclass
class ShardPlan:
    """What :func:`plan_sharding` decided, for all ranks: weights to slice, view sizes to divide,
    linears to all-reduce, caches split by heads, and per module what was split and why."""

    world: int
    weights: dict[str, Split] = field(default_factory=dict)     # get_attr target -> split of the tensor
    views: dict[str, dict[int, int]] = field(default_factory=dict)  # view node -> {size index: divisor}
    # all-reduces: producer of partial sums -> the consumers reading the reduced value (None: every user)
    reduces: dict[str, list[str] | None] = field(default_factory=dict)
    # the ops computing a rank's partial sums (row-parallel linears, einsums contracting a split letter):
    # in a bf16 / fp16 program they compute in fp32, so a partial sum is rounded once, after its all-reduce
    sums: list[str] = field(default_factory=list)
    values: dict[str, object] = field(default_factory=dict)      # node -> Split (tuple: per output) of its value
    # replicated values a consumer reads as its rank's block: consumer -> input node -> split
    narrows: dict[str, dict[str, Split]] = field(default_factory=dict)
    caches: dict[str, Split] = field(default_factory=dict)       # cache name ("3.k") -> split
    notes: dict[str, list[str]] = field(default_factory=dict)    # module path -> what, why

    def note(self, where: str, text: str) -> None:
        lines = self.notes.setdefault(where or "model", [])
        if "." in text.split(":")[0]:  # a weight path: its last two parts name it within the layer
            text = ".".join(text.split(":")[0].split(".")[-3:-1]) + ":" + text.split(":", 1)[1]
        if text not in lines:
            lines.append(text)

    def describe(self) -> str:
        lines = [f"tensor parallel over {self.world} ranks: {len(self.reduces)} all-reduces per step, "
                 f"{len(self.weights)} weights sliced, {len(self.caches)} caches split by heads"]
        for where in sorted(self.notes, key=lambda w: (layer_index(w) is None, layer_index(w) or 0, w)):
            lines.extend(f"  {where}: {text}" for text in self.notes[where])
        return "\n".join(lines)

    def weight_bytes(self, program: StepProgram) -> dict[str, int]:
        """Bytes of the weights the step reads (every ``get_attr`` tensor, from shapes: works on meta):
        ``whole`` unsharded, ``per_rank`` on each rank (the same on every rank), ``split`` the part
        of ``whole`` that is sliced, ``replicated`` the part every rank holds whole."""
        sizes = {}
        for node in program.gm.graph.nodes:
            if node.op == "get_attr":
                value = _get(program.gm, node.target)
                if isinstance(value, torch.Tensor):
                    sizes[node.target] = value.numel() * value.element_size()
        split = sum(b for t, b in sizes.items() if t in self.weights)
        per_rank = sum(b // self.weights[t].pieces if t in self.weights else b for t, b in sizes.items())
        return {"whole": sum(sizes.values()), "per_rank": per_rank, "split": split,
                "replicated": sum(sizes.values()) - split}

    def to_json(self) -> dict:
        return {"world": self.world, "all_reduces": len(self.reduces),
                "weights": {k: v.to_json() for k, v in sorted(self.weights.items())},
                "caches": {k: v.to_json() for k, v in self.caches.items()},
                "notes": {k: list(v) for k, v in sorted(self.notes.items())}}


def _where(node: fx.Node) -> str:
    """``layer N`` (the module path's first index) where the node comes from a layer, else its path
    or name: what notes and errors name."""
    label = layer_label(node)
    if label.startswith("_"):
        label = ""
    for n in [node] + ([] if label else node.all_input_nodes):
        index = layer_index(layer_label(n) or "")
        if index is not None:
            return f"layer {index}"
    return label or node.name


def _shape(node) -> tuple:
    val = meta_val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _same(a, b) -> bool:
    return str(a) == str(b)


def _is_pointwise(node: fx.Node) -> bool:
    target = node.target
    return target in TRANSPARENT or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)


def _backward_linears(start: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """Linears reached walking back from ``start`` (not past linears, attention ops or effexport ops
    without a tensor-parallel rule), and those rule-less ops met on the way."""
    seen, found, blocked, stack = set(), [], [], [start]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if is_call(n, aten.linear.default):
            found.append(n)
        elif is_call(n, *OPAQUE):
            blocked.append(n)
        elif n.op == "call_function" and not is_call(n, *ATTENTION_OPS) \
                and not (n.target is operator.getitem and is_call(n.args[0], *ATTENTION_OPS)):
            stack.extend(n.all_input_nodes)
    return found, blocked


def _output_projection(op: fx.Node) -> fx.Node | None:
    """The first linear reached forward from the attention output (the output projection)."""
    out = op if is_call(op, ops.attention.default, ops.attention_read.default, *SPARSE_ATTENTION_OPS) else next(
        (u for u in op.users if u.target is operator.getitem and u.args[1] == 0), None)
    seen, queue = set(), [out] if out is not None else []
    while queue:
        n = queue.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if is_call(n, aten.linear.default):
            return n
        queue.extend(n.users)
    return None


def _divides(world: int, count: int, what: str, where: str) -> None:
    if count % world:
        raise ShardCountError(f"{where}: {count} {what} do not split across {world} ranks; "
                              f"pass a rank count that divides {count}")


def _seed_output_projection(op: fx.Node, seed, seeds: dict, world: int) -> None:
    """Whatever else feeds the output projection per query head (e.g. Laguna's output gate) is
    column-parallel like the query."""
    oproj = _output_projection(op)
    if oproj is not None:
        for linear in _backward_linears(oproj.args[0])[0]:
            if linear not in seeds:
                seed(linear, Split(-1, world), f"{linear.args[1].target}: column-parallel (per query head, "
                     "feeds the output projection)")


def _sparse_shared(args: dict) -> list[str]:
    """What a DeepSeek V4 sparse attention's query heads share (replicated on every rank), for the notes."""
    comp, idx = args.get("comp"), args.get("idx")
    shared = ["the one K=V head (its projection, norm and window cache)"]
    if isinstance(comp, fx.Node) and comp.target is operator.getitem \
            and is_call(comp.args[0], ops.kv_compress.default, ops.kv_compress_step.default):
        shared.append("the compressor (one compressed K=V head, its state and entries)")
    if is_call(idx, ops.indexer_topk.default):
        shared.append(f"the indexer ({_shape(idx.args[0])[2]} heads, its key compressor and cache: its top-k "
                      "ranks entries by the score summed over all its heads)")
    return shared


def _cca_outputs(args: dict, blocked: set) -> dict[str, fx.Node] | None:
    """``{argument: node}`` when the attention's q / k / v are all read straight from one
    ``effexport::cca`` (ZAYA1), else None."""
    fed = {name: args[name] for name in ("q", "k", "v", "k_new", "v_new") if name in args}
    ccas = {n.args[0] for n in fed.values() if n.target is operator.getitem and is_call(n.args[0], ops.cca.default)}
    if len(ccas) != 1 or blocked != ccas or not all(n.target is operator.getitem and n.args[0] in ccas
                                                   for n in fed.values()):
        return None
    return fed


def _kv_split(world: int, heads: int, kv_heads: int, where: str) -> Split:
    _divides(world, heads, "query heads", where)
    if kv_heads >= world:
        if kv_heads % world:
            raise ShardCountError(f"{where}: {kv_heads} KV heads do not split across {world} ranks; "
                                  f"pass a rank count that divides {kv_heads}")
        return Split(1, world, 1)
    if world % kv_heads:
        raise ShardCountError(f"{where}: {kv_heads} KV heads cannot be replicated evenly on {world} ranks; "
                              f"pass a rank count that is a multiple of {kv_heads} or divides it")
    return Split(1, kv_heads, world // kv_heads)


def _check_gqa(world: int, heads: int, kv_heads: int, q: Split, k: Split, where: str) -> None:
    """Every rank's local query head i reads local KV head ``i // (local H / local Hkv)`` in the op;
    that must be the KV head global head ``h`` reads, ``h // (H / Hkv)``."""
    hl, kl = heads // q.nblocks, kv_heads // k.nblocks
    if hl % kl:
        raise ShardingError(f"{where}: {hl} local query heads over {kl} local KV heads is not a GQA grouping")
    for r in range(world):
        for i in range(hl):
            h = q.block(r) * hl + i
            if k.block(r) * kl + i // (hl // kl) != h // (heads // kv_heads):
                raise ShardingError(f"{where}: rank {r}'s query head {h} would read the wrong KV head")


def plan_sharding(program: StepProgram, plan: CachePlan, world: int) -> ShardPlan:
    """Decide the tensor-parallel split of the rewritten ``program`` over ``world`` ranks (see the
    module docstring); raises :class:`ShardingError` / :class:`ShardCountError` naming the layer and
    op it cannot split."""
    if world < 1:
        raise ShardCountError(f"--tp must be at least 1, got {world}")
    gm = program.gm
    shard = ShardPlan(world)
    seeds: dict[fx.Node, Split] = {}
    cache_ph: dict[fx.Node, Split] = {}
    names = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], program.inputs))
    attention = [n for n in gm.graph.nodes if is_call(n, *ATTENTION_OPS, *SPARSE_ATTENTION_OPS)]
    narrows: dict[fx.Node, dict[fx.Node, Split]] = {}  # consumer -> replicated input read as the rank's block

    def seed(linear: fx.Node, split: Split, why: str) -> None:
        old = seeds.get(linear)
        if old is not None and old != split:
            raise ShardingError(f"{_where(linear)}: {linear.name} feeds heads split two ways ({old}, {split})")
        seeds[linear] = split
        shard.note(_where(linear), why)

    for op in attention:
        args = call_args(op)
        caches = [names[a] for a in op.all_input_nodes if a.op == "placeholder" and a in names]
        index = layer_index(caches[0][len("past."):]) if caches else None
        where = f"layer {index}" if index is not None else _where(args["q"])
        op_name = op.target.__name__.split(".")[0]
        if is_call(op, *SPARSE_ATTENTION_OPS):
            heads = _shape(args["q"])[2]
            _divides(world, heads, "query heads", where)
            linears, blocked = _backward_linears(args["q"])
            if blocked or not linears:
                shard.note(where, f"{op_name} replicated: its query comes from "
                                  f"{', '.join(sorted({b.target.__name__.split('.')[0] for b in blocked})) or 'no linear'}")
                continue
            shard.note(where, f"{op_name}: {heads} query heads -> {heads // world} per rank; replicated, shared by "
                              f"every query head: {'; '.join(_sparse_shared(args))}")
            for linear in linears:
                seed(linear, Split(-1, world), f"{linear.args[1].target}: column-parallel (query heads)")
            _seed_output_projection(op, seed, seeds, world)
            continue
        kv_arg, cache_args = ATTENTION_OPS[op.target]
        heads, kv_heads = _shape(args["q"])[1], _shape(args[kv_arg])[1]
        inputs = {name: _backward_linears(args[name]) for name in ("q", "k", "v", "k_new", "v_new") if name in args}
        blocked = {b for _, bs in inputs.values() for b in bs}
        cca = _cca_outputs(args, blocked)
        if blocked and cca is None:
            shard.note(where, f"{op_name} replicated: its query / keys come from "
                              f"{', '.join(sorted({b.target.__name__.split('.')[0] for b in blocked}))}, "
                              "which has no tensor-parallel rule yet")
            continue
        kv = _kv_split(world, heads, kv_heads, where)
        q = Split(1, world, 1)
        _check_gqa(world, heads, kv_heads, q, kv, where)
        kv_text = (f"{kv_heads} KV heads -> {kv_heads // world} per rank" if kv.replicas == 1 else
                   f"{kv_heads} KV heads, each replicated on {kv.replicas} ranks")
        shard.note(where, f"{op_name}: {heads} query heads -> {heads // world} per rank, {kv_text}")
        if cca is not None:  # every rank runs the op on all heads and reads its own heads' q / k / v
            shard.note(where, "cca replicated (q/k projections, convs, value shift, conv/shift state): its value "
                              "shift lays the current and delayed halves out as whole KV heads, so one op call "
                              "cannot compute one rank's heads; the attention reads the rank's heads of its q/k/v")
            for name, node in cca.items():
                narrows.setdefault(op, {})[node] = q if name == "q" else kv
        for linear in inputs["q"][0]:
            seed(linear, Split(-1, world), f"{linear.args[1].target}: column-parallel (query heads)")
        for name in ("k", "v", "k_new", "v_new"):
            for linear in inputs[name][0] if name in inputs else ():
                seed(linear, Split(-1, kv.nblocks, kv.replicas), f"{linear.args[1].target}: column-parallel "
                     f"(KV heads{'' if kv.replicas == 1 else ', replicated'})")
        for name in cache_args:
            ph = args[name]
            if ph.op == "placeholder":
                if cache_ph.get(ph, kv) != kv:
                    raise ShardingError(f"{where}: cache {names[ph]} is read with two different head splits")
                cache_ph[ph] = kv
        _seed_output_projection(op, seed, seeds, world)
    _seed_mlps(gm, world, seeds, shard)
    _propagate(gm, world, seeds, cache_ph, narrows, names, program.outputs, shard)
    for ph, split in cache_ph.items():
        shard.caches[names[ph][len("past."):]] = split
    known = {e.name for e in plan.entries}
    missing = set(shard.caches) - known
    if missing:
        raise ShardingError(f"caches {sorted(missing)} are split but not in the CachePlan")
    return shard


def _pointwise_leaves(node: fx.Node, down: fx.Node) -> list[fx.Node] | None:
    """The linears ``node`` is a pointwise function of (with scalar constants), when that region is
    closed (the linears and every node between them and ``down`` feed only the region and ``down``),
    or None: splitting them then changes nothing outside the block."""
    found, seen, stack = [], set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_call(n, aten.linear.default):
            found.append(n)
        elif n.op == "call_function" and _is_pointwise(n):
            stack.extend(n.all_input_nodes)
        elif n.op == "get_attr" and math.prod(_shape(n)) == 1:
            seen.discard(n)
        else:
            return None
    if not found or any(set(n.users) - seen - {down} for n in seen):
        return None
    return found


def _seed_mlps(gm: fx.GraphModule, world: int, seeds: dict, shard: ShardPlan) -> None:
    for down in [n for n in gm.graph.nodes if is_call(n, aten.linear.default) and n not in seeds]:
        ups = _pointwise_leaves(down.args[0], down)
        if not ups or any(u in seeds for u in ups):
            continue
        width = _shape(down.args[0])[-1]
        where = _where(down)
        if width % world:
            shard.note(where, f"MLP replicated: hidden width {width} does not split across {world} ranks")
            continue
        for up in ups:
            seeds[up] = Split(-1, world)
            shard.note(where, f"{up.args[1].target}: column-parallel (MLP, {width} -> {width // world} per rank)")


def _view_split(node: fx.Node, p: int, split: Split) -> tuple[Split, dict[int, int]]:
    """The split of a view/reshape/expand of a value split along dim ``p``, and its sizes' divisors."""
    src, out = _shape(node.args[0]), _shape(node)
    if len(out) > p and all(_same(src[i], out[i]) for i in range(p + 1)):
        return split, {p: split.nblocks}
    if node.target is aten.expand.default:
        return split.moved(p + len(out) - len(src)), {p + len(out) - len(src): split.nblocks}
    inner = src[p + 1:]
    if not all(isinstance(d, int) for d in inner):
        raise ShardingError(f"{_where(node)}: {node.name} reshapes a split dim with symbolic inner sizes")
    outer = math.prod(inner) * src[p]
    acc = 1
    for j in range(len(out) - 1, -1, -1):
        if not isinstance(out[j], int):
            break
        if acc * out[j] == outer and [str(d) for d in src[:p]] == [str(d) for d in out[:j]]:
            if out[j] % split.nblocks == 0:
                return split.moved(j), {j: split.nblocks}
            # heads gathered in fewer groups than blocks (DeepSeek's grouped output projection over more
            # ranks than groups): rank r holds group r // (N / g) and its heads' part of the group's width
            if j == len(out) - 2 and split.nblocks % out[j] == 0 and split.replicas == 1 and split.sub is None \
                    and not split.partial and out[j + 1] % (split.nblocks // out[j]) == 0:
                per = split.nblocks // out[j]
                return Split(j, out[j], per, sub=j + 1), {j: out[j], j + 1: per}
        acc *= out[j]
        if acc > outer:
            break
    raise ShardingError(f"{_where(node)}: {node.name} reshapes {list(src)} -> {list(out)}, which does not keep "
                        f"the blocks of dim {p} split {split.nblocks} ways")


def _dim_arg(node: fx.Node, value_rank: int) -> list[int]:
    a = call_args(node)
    dims = a.get("dim")
    if dims is None:
        return list(range(value_rank))
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return [d % value_rank for d in dims]


def _propagate(gm: fx.GraphModule, world: int, seeds: dict, cache_ph: dict, narrows: dict, names: dict,
               outputs: list[str], shard: ShardPlan) -> None:
    """One forward pass: the split of every value; records weight slices, view sizes and reduces."""
    state: dict[fx.Node, object] = {ph: s for ph, s in cache_ph.items()}
    weight_users: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            weight_users[n.target] = weight_users.get(n.target, 0) + len(n.users)

    def slice_weight(node: fx.Node, split: Split, where: str) -> None:
        if node.op != "get_attr":
            raise ShardingError(f"{where}: the weight {node.name} is computed, not a parameter; cannot slice it")
        if weight_users[node.target] != 1:
            raise ShardingError(f"{where}: the weight {node.target} is used {weight_users[node.target]} times "
                                "(tied); a split copy would change its other uses")
        old = shard.weights.get(node.target)
        if old is not None and old != split:
            raise ShardingError(f"{where}: the weight {node.target} is split two ways")
        shard.weights[node.target] = split

    done: set[fx.Node] = set()  # the nodes visited: their split is decided
    for node in gm.graph.nodes:
        done.add(node)
        if node.op != "call_function":
            if node.op == "output":
                for out in node.args[0]:
                    if state.get(out) == PARTIAL:
                        shard.reduces.setdefault(out.name, []).append(node.name)
                        state[out] = None
                _check_outputs(node, state, outputs, {names[ph][len("past."):]: sp for ph, sp in cache_ph.items()})
            continue
        where = _where(node)
        inputs = {a: state[a] for a in node.all_input_nodes if state.get(a) is not None}
        for a, split in narrows.get(node, {}).items():  # a replicated input read as the rank's block
            if a in inputs:
                raise ShardingError(f"{where}: {a.name} is split already; it cannot be narrowed to a block")
            inputs[a] = split
            shard.narrows.setdefault(node.name, {})[a.name] = split
        if is_call(node, aten.linear.default) and not inputs:
            split = seeds.get(node)
            if split is not None:
                out_rank = len(_shape(node))
                a = call_args(node)
                for w in (a["weight"], a.get("bias")):
                    if w is not None:
                        slice_weight(w, Split(0, split.nblocks, split.replicas), where)
                state[node] = split.moved(out_rank - 1)
                shard.values[node.name] = state[node]
            continue
        partial = [a for a, s in inputs.items() if s == PARTIAL]
        if partial:
            if is_call(node, aten.sym_size.int):  # the sizes of a partial sum are the sum's
                continue
            if _keeps_partial(node, inputs):
                state[node] = PARTIAL
                continue
            for a in partial:  # reduced here, for this and every later consumer (it is whole from now on)
                shard.reduces[a.name] = [u.name for u in a.users if u is node or u not in done]
                state[a] = None
                del inputs[a]
        if not inputs:
            if is_call(node, aten.einsum.default):
                state[node] = _expert_seed(node, world, where, slice_weight, shard)
                if state[node] is not None:
                    shard.values[node.name] = state[node]
            continue
        state[node] = _rule(node, inputs, world, where, slice_weight, shard)
        if isinstance(state[node], (Split, tuple)):
            shard.values[node.name] = state[node]


def _keeps_partial(node: fx.Node, inputs: dict) -> bool:
    """True when ``node`` is linear in its partial-sum operands, so its result is a partial sum too:
    a sum of partial sums, a partial sum scaled by a whole value, a reshape, a cast to its own dtype."""
    if any(s != PARTIAL for s in inputs.values()):
        return False
    if node.target in SUM_LINEAR:  # partial + partial; a whole or scalar term would be added N times
        return all(isinstance(a, fx.Node) and a in inputs for a in node.args[:2]) \
            and call_args(node).get("alpha", 1) == 1
    if node.target in SCALE_LINEAR:
        return len(inputs) == 1 and node.args[0] in inputs
    if node.target in SHAPE_LINEAR or node.target in TRANSPARENT:
        return node.target not in TRANSPARENT or _keeps_dtype(node)
    return False


def _keeps_dtype(node: fx.Node) -> bool:
    """A cast / copy to its input's own dtype and device (linear in a partial sum)."""
    src = meta_val(node.args[0])
    return src is not None and src.dtype == meta_val(node).dtype and src.device == meta_val(node).device


def _check_outputs(node: fx.Node, state: dict, outputs: list[str], shard_caches: dict) -> None:
    """The logits leave whole; every present cache leaves split as its past input came in."""
    for name, out in zip(outputs, node.args[0]):
        split = state.get(out) if isinstance(out, fx.Node) else None
        if not name.startswith("present."):
            if split is not None:
                raise ShardingError(f"output {name} leaves split across ranks ({split}); only caches may "
                                    "(the LM head must see the all-reduced hidden state)")
        elif split != shard_caches.get(name[len("present."):]):
            raise ShardingError(f"cache {name[len('present.'):]} leaves split as {split}, but comes in as "
                                f"{shard_caches.get(name[len('present.'):])}")


def _rule(node, inputs, world, where, slice_weight, shard: ShardPlan):
    """The split of ``node``'s value from its split inputs, or raise naming the op."""
    target = node.target
    what = f"{where}: {node.name} ({getattr(target, '__name__', target)})"
    if target is operator.getitem:
        src = inputs[node.args[0]]
        return src[node.args[1]] if isinstance(src, tuple) else src
    finer = [s for s in inputs.values() if s != PARTIAL and (s.sub is not None or s.partial)]
    if finer and not (target is aten.einsum.default if any(s.sub is not None for s in finer) else
                      target in (aten.linear.default, aten.flatten.using_ints, *VIEWS[:3])
                      or (target in TRANSPARENT and _keeps_dtype(node))):
        raise ShardingError(f"{what}: no sharding rule for this op on heads split finer than their groups ({finer[0]})")
    if is_call(node, aten.linear.default):
        a = call_args(node)
        x = inputs.get(a["input"])
        if x is None or set(inputs) != {a["input"]}:
            raise ShardingError(f"{what}: a split weight or bias reaches a linear")
        in_rank = len(_shape(a["input"]))
        if x.dim != in_rank - 1:
            raise ShardingError(f"{what}: the input is split along dim {x.dim}, not its features")
        if (x.replicas != 1 or x.nblocks != world) and not x.partial:
            raise ShardingError(f"{what}: the input's blocks are replicated ({x}); an all-reduce would count "
                                "them more than once")
        slice_weight(a["weight"], Split(1, x.nblocks, x.replicas), where)
        shard.note(where, f"{a['weight'].target}: row-parallel, its partial sums all-reduced")
        shard.sums.append(node.name)
        if a.get("bias") is not None:  # the bias is added once, after the all-reduce
            shard.reduces[node.name] = None
            return None
        return PARTIAL
    if is_call(node, *ATTENTION_OPS):
        a = call_args(node)
        kv_arg, cache_args = ATTENTION_OPS[target]
        q, k = inputs.get(a["q"]), inputs.get(a[kv_arg])
        if q is None or k is None or q.dim != 1 or k.dim != 1:
            raise ShardingError(f"{what}: query and keys must both be split by heads (got {q}, {k})")
        for name in ("v", "v_new", *cache_args):
            if name in a and inputs.get(a[name]) != k:
                raise ShardingError(f"{what}: {name} is split differently from the keys")
        if a.get("sinks") is not None:
            slice_weight(a["sinks"], Split(0, q.nblocks, q.replicas), where)
        return q if not cache_args or target is ops.attention_read.default else (q, k, k)
    if is_call(node, *SPARSE_ATTENTION_OPS):
        a = call_args(node)
        q = inputs.get(a["q"])
        if q is None or q.dim != 2 or set(inputs) != {a["q"]}:
            raise ShardingError(f"{what}: only the query heads may be split (the K=V latent, compressed entries "
                                f"and selection are one head shared by all); got {sorted(x.name for x in inputs)}")
        slice_weight(a["sink"], Split(0, q.nblocks, q.replicas), where)
        shard.note(where, f"{a['sink'].target.rsplit('.', 1)[-1]} (one logit per query head): sliced")
        return q
    shape = _shape(node)
    if _is_pointwise(node):
        # right-aligned (broadcast) position of the split dim, the same in every split operand
        aligned = {(s.dim - len(_shape(a)), s.nblocks, s.replicas) for a, s in inputs.items()}
        if len(aligned) != 1:
            raise ShardingError(f"{what}: operands split differently ({sorted(map(str, inputs.values()))})")
        neg = next(iter(aligned))[0]
        for arg in node.all_input_nodes:
            s = _shape(arg)
            if arg not in inputs and len(s) >= -neg and not _same(s[neg], 1):
                raise ShardingError(f"{what}: combines a tensor split by heads with {arg.name}, which is "
                                    f"whole along that dim ({list(s)}); split it too or keep it replicated")
        return next(iter(inputs.values())).moved(len(shape) + neg)
    if target is aten.einsum.default:
        return _einsum_rule(node, inputs, world, what, slice_weight, shard)
    src_node = node.args[0]
    if target is aten.sym_size.int:
        if node.args[1] % len(_shape(src_node)) == inputs[src_node].dim:
            raise ShardingError(f"{what}: reads the size of the split dim (a head count taken from the graph)")
        return None
    if isinstance(src_node, (list, tuple)):
        if not is_call(node, aten.cat.default, aten.stack.default):
            raise ShardingError(f"{what}: no sharding rule for a list of split tensors")
        splits = {inputs.get(t) for t in src_node}
        if len(splits) != 1 or None in splits:
            raise ShardingError(f"{what}: concatenates tensors split differently")
        split, d = next(iter(splits)), call_args(node)["dim"] % len(shape)
        if target is aten.stack.default:  # a new dim at d
            return split.moved(split.dim + (d <= split.dim))
        if d == split.dim:
            raise ShardingError(f"{what}: concatenates along the split dim")
        return split
    src = inputs.get(src_node)
    if src is None or len(inputs) != 1 or is_call(node, *OPAQUE):
        raise ShardingError(f"{what}: no sharding rule for this op on a tensor split across ranks "
                            f"({', '.join(a.name for a in inputs)}); this layer cannot be tensor-parallel yet")
    in_rank = len(_shape(src_node))
    p = src.dim
    if target in VIEWS:
        split, divisors = _view_split(node, p, src)
        size = node.args[1]  # ``size`` (view, expand) / ``shape`` (reshape)
        for j in divisors:
            if isinstance(size[j], fx.Node):
                raise ShardingError(f"{what}: the split dim's size is computed ({size[j].name}), not a constant")
        shard.views[node.name] = divisors  # a -1 elsewhere absorbs the change; a -1 here follows the input
        return split
    if target is aten.unflatten.int:
        d, sizes = node.args[1] % in_rank, list(node.args[2])
        if d != p:
            return src.moved(p if p < d else p + len(sizes) - 1)
        if not isinstance(sizes[0], int) or sizes[0] < 1 or sizes[0] % src.nblocks:
            raise ShardingError(f"{what}: unflattens the split dim into {sizes}, whose outer size does not "
                                f"hold its {src.nblocks} blocks")
        shard.views[node.name] = {0: src.nblocks}
        return src  # the outermost new dim holds the blocks
    if target is aten.flatten.using_ints:
        a = call_args(node)
        start, end = a["start_dim"] % in_rank, a["end_dim"] % in_rank
        if p < start:
            return src
        if p > end:
            return src.moved(p - (end - start))
        if not all(_same(_shape(src_node)[i], 1) for i in range(start, p)):
            raise ShardingError(f"{what}: flattens the split dim under other dims")
        return src.moved(start)
    if target is aten.transpose.int:
        d0, d1 = (d % in_rank for d in node.args[1:3])
        return src.moved(d1 if p == d0 else d0 if p == d1 else p)
    if target is aten.permute.default:
        return src.moved([d % in_rank for d in node.args[1]].index(p))
    if target is aten.unsqueeze.default:
        d = node.args[1] % len(shape)
        return src.moved(p + 1 if d <= p else p)
    if target in (aten.squeeze.dim, aten.squeeze.dims):
        dims = _dim_arg(node, in_rank)
        if p in dims:
            raise ShardingError(f"{what}: squeezes the split dim")
        return src.moved(p - sum(d < p for d in dims))
    if target in REDUCTIONS:
        dims = _dim_arg(node, in_rank)
        if p in dims:
            raise ShardingError(f"{what}: reduces over the split dim (heads); the result would need an "
                                "all-reduce inside the block")
        keep = target in (aten.softmax.int, aten._softmax.default, aten._log_softmax.default) or \
            call_args(node).get("keepdim", False)
        return src.moved(p if keep else p - sum(d < p for d in dims))
    if target in DIM_OPS:
        d = call_args(node)["dim"] % in_rank
        if d == p:
            raise ShardingError(f"{what}: slices along the split dim")
        if target is aten.select.int:
            return src.moved(p - (d < p))
        if target in (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default):
            return tuple(src for _ in (meta_val(node) or ()))
        return src
    raise ShardingError(f"{what}: no sharding rule for this op on a tensor split by heads "
                        f"({', '.join(a.name for a in inputs)}); this layer cannot be tensor-parallel yet")


def _einsum_letters(node: fx.Node, what: str) -> tuple[list[str], str]:
    equation = node.args[0].replace(" ", "")
    if "..." in equation or "->" not in equation:
        raise ShardingError(f"{what}: einsum {equation!r} (ellipsis or implicit output) has no sharding rule")
    inputs, output = equation.split("->")
    return inputs.split(","), output


def _expert_seed(node: fx.Node, world: int, where: str, slice_weight, shard: ShardPlan) -> Split | None:
    """Expert parallel: an einsum of stacked expert weights ``[E, ...]`` (a parameter whose leading
    letter is kept in the output, e.g. ``nd,ehd->neh``) computes rank r's block of E / N experts."""
    operands, output = _einsum_letters(node, where)
    for letters, arg in zip(operands, node.args[1]):
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr" and len(letters) >= 3
                and letters[0] in output and all(letters[0] not in o for o in operands if o is not letters)):
            continue
        experts = _shape(arg)[0]
        if experts % world:
            shard.note(where, f"{arg.target}: {experts} experts replicated (do not split across {world} ranks)")
            return None
        slice_weight(arg, Split(0, world), where)
        shard.note(where, f"{arg.target}: expert-parallel, {experts} experts -> {experts // world} per rank")
        return Split(output.index(letters[0]), world)
    return None


def _einsum_rule(node, inputs, world, what, slice_weight, shard: ShardPlan):
    """An einsum over a split letter: parameters holding that letter are sliced (also through a view
    of one, e.g. DeepSeek's ``wo_a.weight.view(g, r, -1)``), replicated activations holding it narrowed
    to the rank's block; a contracted split letter leaves a partial sum, all-reduced (the combine of
    expert parallelism). A split with a ``sub`` dim splits two letters; contracting only the sub letter
    leaves each group's block a partial sum over the ranks sharing the group."""
    operands, output = _einsum_letters(node, what)

    def letters_of(ops_: str, s: Split) -> tuple[str, str | None]:
        return ops_[s.dim], (ops_[s.sub] if s.sub is not None else None)

    letters = {letters_of(ops_, s) for a, s in inputs.items() for ops_, arg in zip(operands, node.args[1]) if arg is a}
    blocks = {(s.nblocks, s.replicas) for s in inputs.values()}
    if len(letters) != 1 or len(blocks) != 1:
        raise ShardingError(f"{what}: einsum operands split along different letters or blocks")
    (letter, sub), (nblocks, replicas) = next(iter(letters)), next(iter(blocks))
    for ops_, arg in zip(operands, node.args[1]):
        if arg in inputs:
            if letters_of(ops_, inputs[arg]) != (letter, sub):
                raise ShardingError(f"{what}: einsum operands split along different letters")
            continue
        if letter not in ops_:
            if sub is not None and sub in ops_:
                raise ShardingError(f"{what}: an operand holds the split sub letter {sub!r} without {letter!r}")
            continue
        split = Split(ops_.index(letter), nblocks, replicas,
                      sub=ops_.index(sub) if sub is not None and sub in ops_ else None)
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            slice_weight(arg, split, what)
        elif not _slice_weight_view(arg, split, what, slice_weight, shard):
            shard.narrows.setdefault(node.name, {})[arg.name] = split
    if letter in output:
        if sub is None or sub in output:
            return Split(output.index(letter), nblocks, replicas, sub=output.index(sub) if sub is not None else None)
        shard.note(_where(node), f"einsum {node.args[0]}: {nblocks} groups over {world} ranks: each rank's heads "
                                 f"give a partial sum of their group's {letter!r} block, added by the all-reduce")
        shard.sums.append(node.name)
        return Split(output.index(letter), nblocks, replicas, partial=True)
    if (replicas != 1 or nblocks != world) and (sub is None or sub in output):
        raise ShardingError(f"{what}: contracts a letter whose blocks are replicated; an all-reduce would "
                            "count them more than once")
    shard.note(_where(node), f"einsum {node.args[0]}: partial sums over the split experts, all-reduced (combine)")
    shard.sums.append(node.name)
    return PARTIAL


def _slice_weight_view(arg, split: Split, what: str, slice_weight, shard: ShardPlan) -> bool:
    """A view of a parameter read by one einsum (``w.view(g, r, -1)``): slice the parameter where each
    split dim of the view is the outer part of one parameter dim, and divide the view's sizes."""
    if not (is_call(arg, *VIEWS[:3]) and arg.args[0].op == "get_attr" and len(arg.users) == 1):
        return False
    weight, view = _shape(arg.args[0]), _shape(arg)

    def weight_dim(v: int) -> int | None:
        return next((k for k in range(len(weight)) if math.prod(view[:v]) == math.prod(weight[:k])
                     and weight[k] % view[v] == 0), None)

    dims = [split.dim] + ([split.sub] if split.sub is not None else [])
    found = [weight_dim(v) for v in dims]
    if None in found or len(set(found)) != len(found):
        return False
    slice_weight(arg.args[0], Split(found[0], split.nblocks, split.replicas,
                                    sub=found[1] if split.sub is not None else None), what)
    shard.note(_where(arg), f"{arg.args[0].target}: sliced by its view {list(view)}'s dims "
                            f"{', '.join(map(str, dims))} (the rank's heads)")
    shard.views[arg.name] = {split.dim: split.nblocks, **({split.sub: split.replicas} if split.sub is not None else {})}
    shard.values[arg.name] = split
    return True


def _set_weight(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    *path, name = target.split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def _narrowing(split: Split, shape, rank: int) -> list[tuple[int, int, int]]:
    """``(dim, block size, block index)`` per narrowed dim of rank ``rank``'s block of ``shape``."""
    out = [(split.dim, shape[split.dim] // split.nblocks, split.block(rank))]
    if split.sub is not None:
        out.append((split.sub, shape[split.sub] // split.replicas, rank % split.replicas))
    return out


def _slice(t: torch.Tensor, split: Split, rank: int) -> torch.Tensor:
    for dim, size, index in _narrowing(split, t.shape, rank):
        t = t.narrow(dim, index * size, size)
    return t.clone()


def shard_rank(program: StepProgram, plan: CachePlan, shard: ShardPlan, rank: int,
               group_name: str) -> tuple[StepProgram, CachePlan]:
    """Rank ``rank``'s step program and CachePlan: sliced weights, divided head counts, split caches,
    an all-reduce over ``group_name`` (a torch.distributed process group name, ``"0"`` for the
    default group) after every row-parallel linear. The input program is not changed."""
    if not 0 <= rank < shard.world:
        raise ShardCountError(f"rank {rank} is outside 0..{shard.world - 1}")
    gm = fx.GraphModule(program.gm, copy.deepcopy(program.gm.graph))
    graph = gm.graph
    for target, split in shard.weights.items():
        _set_weight(gm, target, _slice(_get(gm, target), split, rank))
    nodes = {n.name: n for n in graph.nodes}
    for name, divisors in shard.views.items():
        node = nodes[name]
        at = 2 if node.target is aten.unflatten.int else 1  # the sizes argument
        size = list(node.args[at])
        for j, div in divisors.items():
            if size[j] != -1:  # a -1 follows the input
                size[j] = size[j] // div
        node.args = (*node.args[:at], size, *node.args[at + 1:])
    for name, inputs in shard.narrows.items():
        node = nodes[name]
        for source, split in inputs.items():
            local = nodes[source]
            with graph.inserting_before(node):
                for dim, size, index in _narrowing(split, _shape(local), rank):
                    local = graph.call_function(aten.narrow.default, (local, dim, index * size, size))
            local.meta["val"] = _local(meta_val(nodes[source]), split)
            node.replace_input_with(nodes[source], local)
    upcast = _sums_in_fp32(graph, [nodes[name] for name in shard.sums])
    for name, consumers in shard.reduces.items():
        producer = nodes[name]
        bias = call_args(producer).get("bias") if consumers is None else None
        if bias is not None:
            producer.args, producer.kwargs = (producer.args[0], producer.args[1]), {}
        with graph.inserting_after(producer):
            reduced = graph.call_function(c10d.all_reduce.default, (producer, "sum", group_name))
        with graph.inserting_after(reduced):
            last = graph.call_function(c10d.wait_tensor.default, (reduced,))
        if bias is not None:
            with graph.inserting_after(last):
                last = graph.call_function(aten.add.Tensor, (last, bias))
        dtype = upcast.get(producer, meta_val(producer).dtype)
        if upcast and dtype in HALF:  # the fp32 sum (plus bias) rounded once to the program's dtype
            reduced.meta["val"] = _cast_val(meta_val(producer), torch.float32)
            with graph.inserting_after(last):
                last = graph.call_function(aten._to_copy.default, (last,), {"dtype": dtype})
        if consumers is None:
            producer.replace_all_uses_with(last, delete_user_cb=lambda u, r=reduced: u is not r)
        else:
            for consumer in consumers:
                nodes[consumer].replace_input_with(producer, last)
    entries = []
    for e in plan.entries:
        split = shard.caches.get(e.name)
        if split is not None:
            shape = list(e.shape)
            shape[split.dim] = shape[split.dim] // split.nblocks
            e = dataclasses.replace(e, shape=tuple(shape))
        entries.append(e)
    _refresh_meta(gm, program, shard)
    graph.lint()
    gm.recompile()
    return (StepProgram(gm, list(program.inputs), list(program.outputs), dict(program.seq_dims),
                        program.capture_seconds, dict(program.fills), program.max_new_tokens),
            CachePlan(entries, list(plan.layers)))


HALF = (torch.bfloat16, torch.float16)


def _sums_in_fp32(graph: fx.Graph, sums: list[fx.Node]) -> dict[fx.Node, torch.dtype]:
    """In a bf16 / fp16 program, every op computing a rank's partial sum (``shard.sums``) reads its
    operands cast to fp32, so the partial sum stays fp32 through the ops linear in it and the
    all-reduce, and is rounded once afterwards (:func:`shard_rank`). Rounded per rank instead, each
    of the N partial sums of a row-parallel output and their sum are rounded separately where eager
    rounds the whole contraction once: measured on gemma4-e2b:tiny over 2 ranks in bf16, the build's
    prefill logits were 7.4e-2 max rel from fp32 eager against eager bf16's own 3.7e-2 (the parity
    check failed); summing in fp32 gives eager bf16's error. Returns the ops changed, with their dtype."""
    changed = {}
    for node in sums:
        val = meta_val(node)
        if val is None or val.dtype not in HALF:
            continue
        for source in node.all_input_nodes:
            src = meta_val(source)
            if src is None or src.dtype not in HALF:
                continue
            with graph.inserting_before(node):
                up = graph.call_function(aten._to_copy.default, (source,), {"dtype": torch.float32})
            up.meta["val"] = _cast_val(src, torch.float32)
            node.replace_input_with(source, up)
        node.meta["val"] = _cast_val(val, torch.float32)
        changed[node] = val.dtype
    return changed


def _cast_val(val, dtype):
    """``val`` (a fake tensor) in ``dtype``, under its fake mode."""
    mode = getattr(val, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        return val.to(dtype)


def _get(gm: fx.GraphModule, target: str) -> torch.Tensor:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _local(val, split):
    """The fake value of one rank's block of ``val`` (tuples per output)."""
    if isinstance(split, tuple):
        return tuple(_local(v, sp) for v, sp in zip(val, split))
    if split is None:
        return val
    for dim, size, _ in _narrowing(split, val.shape, 0):
        val = val.narrow(dim, 0, size)
    return val


def _refresh_meta(gm: fx.GraphModule, program: StepProgram, shard: ShardPlan) -> None:
    """Every split value's fake value becomes its block (placeholders: the split caches; new nodes:
    the all-reduced value, the shape of their linear's): shapes and dtypes stay right without
    re-running the graph through fake tensors (~20 ms a node with symbolic shapes)."""
    graph = gm.graph
    mode = fake_mode_of(graph)
    names = dict(zip([n for n in graph.nodes if n.op == "placeholder"], program.inputs))
    with mode:
        for node in graph.nodes:
            if node.op == "placeholder" and names[node].startswith("past."):
                split = shard.caches.get(names[node][len("past."):])
                if split is not None:
                    node.meta["val"] = _local(meta_val(node), split)
            elif node.op == "get_attr" and node.target in shard.weights:
                node.meta["val"] = mode.from_tensor(_get(gm, node.target), static_shapes=True)
            elif node.name in shard.values:
                node.meta["val"] = _local(meta_val(node), shard.values[node.name])
            elif node.op == "call_function" and node.target in (c10d.all_reduce.default, c10d.wait_tensor.default,
                                                                 aten.add.Tensor) and "val" not in node.meta:
                node.meta["val"] = meta_val(node.args[0])
            elif node.op == "call_function" and node.target is aten._to_copy.default and "val" not in node.meta:
                node.meta["val"] = meta_val(node.args[0]).to(node.kwargs["dtype"])
