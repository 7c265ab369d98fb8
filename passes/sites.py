"""Discover attention sites: SDPA calls and decomposed ``matmul -> scale -> softcap -> mask -> sink ->
softmax -> matmul`` chains, with GQA by ``repeat_interleave`` or ``expand + reshape``.

One rule with tagged alternatives (form "sdpa" | "decomposed"); a node that looks like attention
but fails a check is reported with the reason (``--explain``). Recognition uses graph structure and
shapes only -- no module or attribute names.

Sinks: a per-head ``[H]`` column concatenated to the logits before softmax and sliced off after it
(gpt-oss / DeepSeek V4 in transformers, which also subtracts the row max before softmax -- an
overflow guard softmax does not see -- and keeps an eval-mode ``dropout``: both are looked through).
A site whose K is ``cat(cat(past, new), other entries)`` (DeepSeek V4's raw window next to its
compressed entries) is rejected here and left to passes/compressed.py.

Not covered: attention written with ``einsum`` or ``bmm`` on 3-D tensors, dropout in training,
ALiBi-style additive biases that are not masks (they classify as "unknown" masks and the site is
left alone).
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field

import torch
from torch import fx

from effexport.passes._graph import aten, call_args, is_call, meta_val, rank, scalar, strip

SOFTMAX = (aten.softmax.int, aten._softmax.default)
MATMUL = (aten.matmul.default, aten.bmm.default)


@dataclass
class AttentionSite:
    """One attention computation found in the graph.

    q ``[B, H, T, d]``, k ``[B, Hkv, S, d]``, v ``[B, Hkv, S, dv]`` are the nodes *before* GQA
    expansion; ``out`` is the node whose value is the attention output ``[B, H, T, dv]``; ``nodes``
    the site's own nodes (removed when it is rewritten)."""

    index: int
    form: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    scale: float
    softcap: float = 0.0
    sinks: fx.Node | None = None
    mask: fx.Node | None = None
    mask_mode: str = "visible"  # "visible" (bool, True = attend) | "hidden" (bool, True = masked) | "additive"
    causal_flag: bool = False
    layer: str = ""
    nodes: list[fx.Node] = field(default_factory=list)
    # filled by later passes
    mask_kind: str = ""
    window: int = 0  # W of a sliding mask, C of a chunked one
    reason: str = ""
    role: str = ""
    reads: int | None = None
    cache: str = ""

    def describe(self) -> str:
        """One line for --explain."""
        what = self.mask_kind + (f"({'C' if self.mask_kind == 'chunked' else 'W'}={self.window})" if self.window else "")
        heads = f"H={_dim(self.q, 1)} Hkv={_dim(self.k, 1)} d={_dim(self.q, -1)}"
        extra = "".join([f" softcap={self.softcap:g}" if self.softcap else "", " sinks" if self.sinks else ""])
        role = f" {self.role}" + (f" of layer {self.reads}" if self.role == "consumer" else "") if self.role else ""
        return f"site {self.index} [{self.layer or '?'}] {self.form}: {what} {heads} scale={self.scale:g}{extra}{role}"


def _dim(node, i):
    val = meta_val(node)
    return val.shape[i] if isinstance(val, torch.Tensor) else "?"


@dataclass
class Rejected:
    """A softmax/SDPA node that was not accepted as an attention site, and why."""

    node: str
    reason: str


def layer_label(node: fx.Node) -> str:
    """The module path that produced ``node`` (for reports only; recognition never uses it)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    return paths[-1] if paths else ""


def layer_index(label: str) -> int | None:
    """First integer component of a module path (``layers.17.self_attn`` -> 17)."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", label)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------- GQA expansion
def unexpand_kv(node: fx.Node) -> tuple[fx.Node, int, list[fx.Node]]:
    """Undo GQA head expansion: returns (base [B, Hkv, S, d], groups, expansion nodes)."""
    node = strip(node)
    if is_call(node, aten.repeat_interleave.self_int):
        a = call_args(node)
        if a["dim"] in (1, -3) and isinstance(a["repeats"], int):
            return strip(a["self"]), a["repeats"], [node]
    if is_call(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        src = strip(node.args[0])
        if is_call(src, aten.expand.default) and rank(src) == 5:
            base = strip(src.args[0])
            used = [node, src]
            while is_call(base, aten.unsqueeze.default, aten.slice.Tensor) and rank(base) == 5:
                used.append(base)
                base = strip(base.args[0])
            if rank(base) == 4:
                groups = meta_val(src).shape[2]
                return base, int(groups), used
    if is_call(node, aten.expand.default) and rank(node) == 4:
        base = strip(node.args[0])
        if rank(base) == 4 and meta_val(base).shape[1] == 1:
            return base, int(meta_val(node).shape[1]), [node]
    return node, 1, []


def _untranspose_k(node: fx.Node) -> fx.Node | None:
    """``k^T`` (transpose of the last two dims) -> k, else None."""
    node = strip(node)
    if is_call(node, aten.transpose.int):
        dims = sorted(d % 4 for d in node.args[1:3])
        if dims == [2, 3] and rank(node) == 4:
            return node.args[0]
    if is_call(node, aten.permute.default) and list(node.args[1]) in ([0, 1, 3, 2], [0, 1, -1, -2]):
        return node.args[0]
    return None


# ------------------------------------------------------------------------------------- discovery
def decomposed(softmax: fx.Node) -> tuple[dict | None, str]:
    """Match the chain around one softmax node; returns (fields, "") or (None, reason)."""
    a = call_args(softmax)
    if a["dim"] not in (-1, 3):
        return None, "softmax is not over the last dim"
    nodes = [softmax]
    probs_users = list(softmax.users)
    # ---- downstream: [slice off the sink column] -> [cast] -> matmul(probs, v)
    sink_sliced = False
    cur = softmax
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if is_call(user, aten.slice.Tensor) and call_args(user)["dim"] in (-1, 3) and call_args(user)["end"] == -1:
            sink_sliced = True
        elif not (is_call(user, aten.to.dtype, aten._to_copy.default, aten.contiguous.default) or _no_dropout(user)):
            break
        nodes.append(user)
        cur = user
    pv = [u for u in cur.users if is_call(u, *MATMUL) and u.args[0] is cur]
    if len(pv) != 1 or len(cur.users) != 1:
        return None, f"softmax output feeds {len(probs_users)} users, not one probs @ V matmul"
    pv = pv[0]
    nodes.append(pv)
    out = pv
    if len(out.users) == 1 and is_call(next(iter(out.users)), aten.to.dtype, aten._to_copy.default):
        out = next(iter(out.users))
        nodes.append(out)
    v, v_groups, v_exp = unexpand_kv(pv.args[1])
    nodes += v_exp
    # ---- upstream: [cat sink] <- [mask] <- [softcap] <- [scale] <- matmul(q, k^T)
    x = _unshift(a["self"], nodes)
    sinks = None
    if is_call(x, aten.cat.default):
        parts, dim = call_args(x)["tensors"], call_args(x)["dim"]
        if len(parts) == 2 and dim in (-1, 3) and sink_sliced:
            nodes.append(x)
            sinks = _sink_source(parts[1], nodes)
            if sinks is None:
                return None, "a column is concatenated before softmax but it is not a per-head sink"
            x = parts[0]
    elif sink_sliced:
        return None, "softmax output is sliced but no sink column was concatenated"
    mask, mode = None, "visible"
    if is_call(x, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        fill = x.args[2]
        if not (isinstance(fill, float) and fill < -1e30):
            return None, "masked_fill with a value that is not -inf"
        m = x.args[1]
        nodes.append(x)
        if is_call(m, aten.bitwise_not.default, aten.logical_not.default):
            nodes.append(m)
            mask = m.args[0]
        else:
            mask, mode = m, "hidden"
        x = x.args[0]
    elif is_call(x, aten.where.self):
        cond, kept, fill = x.args
        fill_value = scalar(fill)
        if fill_value is None and is_call(fill, aten.full_like.default, aten.scalar_tensor.default):
            fill_value = scalar(fill.args[1] if fill.target is aten.full_like.default else fill.args[0])
        if fill_value is None or fill_value > -1e30:
            return None, "where() before softmax does not fill with -inf"
        nodes.append(x)
        mask, x = cond, kept
    elif is_call(x, aten.add.Tensor) and all(isinstance(t, fx.Node) for t in x.args[:2]):
        add_node, (s0, s1) = x, x.args[:2]
        # the additive mask is the operand that does not come from the scores chain
        if _is_scores_chain(s0):
            mask, x = s1, s0
        elif _is_scores_chain(s1):
            mask, x = s0, s1
        else:
            return None, "softmax input is a sum whose operands are not scores + mask"
        mode = "additive"
        nodes.append(add_node)
    softcap = 0.0
    if is_call(x, aten.mul.Tensor) and scalar(x.args[1]) and is_call(x.args[0], aten.tanh.default):
        c = scalar(x.args[1])
        inner = x.args[0].args[0]
        if is_call(inner, aten.div.Tensor) and scalar(inner.args[1]) == c:
            softcap = c
        elif is_call(inner, aten.mul.Tensor) and scalar(inner.args[1]) and abs(scalar(inner.args[1]) * c - 1) < 1e-6:
            softcap = c
        else:
            return None, "tanh before softmax is not a softcap c*tanh(x/c)"
        nodes += [x, x.args[0], inner]
        x = inner.args[0]
    scale = 1.0
    while is_call(x, aten.mul.Tensor, aten.div.Tensor) and scalar(x.args[1]) is not None:
        s = scalar(x.args[1])
        scale = scale * s if x.target is aten.mul.Tensor else scale / s
        nodes.append(x)
        x = x.args[0]
    x = strip(x)
    if not is_call(x, *MATMUL):
        return None, "softmax input does not come from a q @ k^T matmul"
    nodes.append(x)
    q, kt = x.args[0], x.args[1]
    k_node = _untranspose_k(kt)
    if k_node is None:
        return None, "the second matmul operand is not a transposed K"
    nodes.append(strip(kt))
    k, k_groups, k_exp = unexpand_kv(k_node)
    nodes += k_exp
    q = strip(q)
    while is_call(q, aten.mul.Tensor) and scalar(q.args[1]) is not None:  # scale folded into q
        scale *= scalar(q.args[1])
        q = strip(q.args[0])
    if rank(q) != 4 or rank(k) != 4 or rank(v) != 4:
        return None, "q/k/v are not 4-D [B, H, T, d]"
    return dict(q=q, k=k, v=v, out=out, scale=scale, softcap=softcap, sinks=sinks, mask=mask,
                mask_mode=mode, nodes=nodes, form="decomposed"), ""


JOINED = "K = cat(cache, other entries): compressed attention, left to the compressed pass"


def _no_dropout(node) -> bool:
    """``dropout(x, p, train)`` that returns x: p = 0 or not training (eval-mode HF code keeps it)."""
    if not is_call(node, aten.dropout.default):
        return False
    a = call_args(node)
    return a["p"] == 0 or a["train"] is False


def _unshift(x: fx.Node, nodes: list) -> fx.Node:
    """``x - max(x, -1, keepdim)`` (an overflow guard softmax does not see) -> x."""
    if not is_call(x, aten.sub.Tensor) or not isinstance(x.args[1], fx.Node):
        return x
    m = x.args[1]
    if is_call(m, operator.getitem) and m.args[1] == 0 and is_call(m.args[0], aten.max.dim):
        red = m.args[0]
    elif is_call(m, aten.amax.default):
        red = m
    else:
        return x
    a = call_args(red)
    dims = a["dim"] if isinstance(a["dim"], (list, tuple)) else [a["dim"]]
    if red.args[0] is not x.args[0] or list(dims) not in ([-1], [3]) or not a["keepdim"]:
        return x
    nodes += [x, m] + ([red] if red is not m else [])
    return x.args[0]


def joins_cache(k: fx.Node) -> bool:
    """K is ``cat([cat(past placeholder, new), extra], seq)``: a cache joined with other entries."""
    k = strip(k)
    if not (is_call(k, aten.cat.default) and len(k.args[0]) == 2 and call_args(k)["dim"] in (2, -2)):
        return False
    first = strip(k.args[0][0])
    return (is_call(first, aten.cat.default) and call_args(first)["dim"] in (2, -2)
            and strip(first.args[0][0]).op == "placeholder")


def _is_scores_chain(node) -> bool:
    node = strip(node)
    for _ in range(6):
        if is_call(node, *MATMUL):
            return True
        if is_call(node, aten.mul.Tensor, aten.div.Tensor, aten.tanh.default):
            node = strip(node.args[0])
            continue
        return False
    return False


def _sink_source(col: fx.Node, nodes: list) -> fx.Node | None:
    """The ``[H]`` tensor behind a sink column ``[B, H, T, 1]`` (through view/expand/casts)."""
    cur = col
    while True:
        cur = strip(cur)
        if is_call(cur, aten.expand.default, aten.view.default, aten.reshape.default, aten.unsqueeze.default):
            nodes.append(cur)
            cur = cur.args[0]
            continue
        break
    val = meta_val(cur)
    if isinstance(val, torch.Tensor) and val.dim() == 1:
        return cur
    return None


def _sdpa(node: fx.Node) -> tuple[dict | None, str]:
    a = call_args(node)
    if a.get("dropout_p", 0.0):
        return None, "SDPA with dropout"
    k, groups, k_exp = unexpand_kv(a["key"])
    v, _, v_exp = unexpand_kv(a["value"])
    q = strip(a["query"])
    if rank(q) != 4 or rank(k) != 4:
        return None, "SDPA q/k are not 4-D"
    d = meta_val(q).shape[-1]
    scale = a.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(int(d))
    mask = a.get("attn_mask")
    mode = "additive" if isinstance(mask, fx.Node) and meta_val(mask).dtype != torch.bool else "visible"
    return dict(q=q, k=k, v=v, out=node, scale=scale, mask=mask, mask_mode=mode,
                causal_flag=bool(a.get("is_causal")), nodes=[node] + k_exp + v_exp, form="sdpa"), ""


def find_sites(gm: fx.GraphModule) -> tuple[list[AttentionSite], list[Rejected]]:
    """All attention sites in graph order, and the candidates that were rejected (with reasons)."""
    sites, rejected = [], []
    for node in gm.graph.nodes:
        if is_call(node, aten.scaled_dot_product_attention.default):
            fields, why = _sdpa(node)
        elif is_call(node, *SOFTMAX):
            fields, why = decomposed(node)
        else:
            continue
        if fields is not None and joins_cache(fields["k"]):
            fields, why = None, JOINED
        if fields is None:
            rejected.append(Rejected(node.name, why))
            continue
        label = layer_label(node)
        sites.append(AttentionSite(index=len(sites), layer=label, **fields))
    return sites, rejected
