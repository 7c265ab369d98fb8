"""The replacement half of passes/compressed.py: the nodes that take the place of a verified
compressor (``kv_compress_step`` into a fixed entry buffer, the states in the op's layout) and of a
verified attention (a W-slot ring unrolled before the new tokens, ``sparse_attention``, the ring
written back by a gather), and the clean-up of what they leave dead (including in-place writes into
buffers nobody reads any more, e.g. transformers' slice-assigned compressor windows).
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

from effexport.passes._graph import aten, emit, fake_value, insert_point, is_call, meta_val, strip

if TYPE_CHECKING:
    from effexport.passes.compressed import Attention, Compressor

ops = torch.ops.effexport
ASSERT = aten._assert_tensor_metadata.default
FRESH = (aten.new_zeros.default, aten.new_full.default, aten.zeros.default, aten.full.default,
         aten.zeros_like.default, aten.full_like.default, aten.empty.memory_format, aten.new_empty.default)
VIEWS = (aten.slice.Tensor, aten.view.default, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim,
         aten.transpose.int, aten.permute.default, aten.expand.default, aten.alias.default)


def writes(node) -> list:
    """In-place ops (``copy_``, ``fill_``, ...) whose destination is ``node`` or a view of it."""
    found, stack = [], [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if not (u.op == "call_function" and u.args and u.args[0] is n):
                continue
            if is_call(u, *VIEWS):
                stack.append(u)
            elif isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable:
                found.append(u)
    return found


def _dead_write(node) -> bool:
    """An unused in-place write into (a view of) a fresh buffer that is never read."""
    if node.users or not (isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable):
        return False
    base = node.args[0]
    while is_call(base, *VIEWS):
        base = base.args[0]
    if not is_call(base, *FRESH):
        return False
    stack = [base]
    while stack:
        for u in stack.pop().users:
            if is_call(u, *VIEWS) and not u.users:
                continue
            if is_call(u, *VIEWS):
                stack.append(u)
            elif not (isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable and not u.users):
                return False
    return True



# -------------------------------------------------------------------------------- replacement
class Writer:
    """Emits the replacement nodes of one graph (``pos`` input, index arithmetic)."""

    def __init__(self, gm: fx.GraphModule, pos: fx.Node, max_context: int):
        self.gm, self.graph, self.pos, self.max_context = gm, gm.graph, pos, max_context
        self.last_ph = [n for n in self.graph.nodes if n.op == "placeholder"][-1]

    def e(self, target, *args, n_out=0, **kwargs):
        """Insert ``target(*args, **kwargs)`` after its latest input (after the placeholders if it
        has none); meta["val"] from the fake kernel; ``n_out`` > 0 returns the getitem outputs."""
        inputs: list[fx.Node] = []
        fx.node.map_arg((args, kwargs), inputs.append)
        if inputs and n_out == 0 and not any(isinstance(a, (list, tuple)) for a in args):
            return emit(self.graph, target, args, kwargs)
        after = insert_point(self.graph, inputs) if inputs else self.last_ph
        with self.graph.inserting_after(after):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["val"] = fake_value(self.graph, target, args, kwargs)
        if not n_out:
            return node
        outs, prev = [], node
        for i in range(n_out):
            with self.graph.inserting_after(prev):
                prev = self.graph.call_function(operator.getitem, (node, i))
            prev.meta["val"] = node.meta["val"][i]
            outs.append(prev)
        return outs

    def arange(self, n: int, like: fx.Node):
        """``arange(n)`` on the device of ``like`` (the tensor it indexes; ``pos`` is a 0-d CPU scalar,
        which mixes with any device, an index tensor does not)."""
        return self.e(aten.arange.default, n, dtype=torch.int64, device=meta_val(like).device)

    def resize(self, ph: fx.Node, dim: int, size: int) -> None:
        val = meta_val(ph)
        shape = list(val.shape)
        shape[dim] = size
        with val.fake_mode:
            ph.meta["val"] = torch.empty(shape, dtype=val.dtype, device=val.device)

    def compressor(self, m: Compressor) -> tuple[fx.Node, fx.Node]:
        """kv_compress_step into a fixed buffer; returns (new buffer, buffer as readers see it)."""
        e, pos, r = self.e, self.pos, m.ratio
        self.resize(m.comp, 1, self.max_context // r)
        off = r if m.overlap else 0
        if m.layout == "hf":  # the states take the op's layout (passes/_compressed_hf.py)
            self.resize(m.state_a, 1, (2 if m.overlap else 1) * r)
            self.resize(m.state_z, 1, (2 if m.overlap else 1) * r)
        rows = self.arange((2 if m.overlap else 1) * r, like=m.comp)
        cur = e(aten.sub.Tensor, rows, off)
        ok = e(aten.logical_and.default, e(aten.ge.Scalar, cur, 0), e(aten.lt.Tensor, cur, e(aten.remainder.Scalar, pos, r)))
        if m.overlap:  # the previous block's rows exist once a block is complete
            ok = e(aten.logical_or.default, ok, e(aten.logical_and.default, e(aten.lt.Scalar, rows, off),
                                                  e(aten.ge.Scalar, pos, r)))
        hide = e(aten.unsqueeze.default, e(aten.logical_not.default, ok), -1)
        sz = e(aten.masked_fill.Scalar, m.state_z, hide, float("-inf"))
        buf, sa, sz_new = e(ops.kv_compress_step.default, m.a, m.z, m.ape, m.norm_weight, m.inv_freq, m.comp,
                            m.state_a, sz, pos, n_out=3, ratio=r, overlap=m.overlap, eps=m.eps, rope_dim=m.rope_dim)
        read = buf
        for n in m.post:  # the per-entry transform, applied to the whole buffer
            args = fx.node.map_arg(n.args, lambda x: read if x is (m.finish if n is m.post[0] else prev) else x)
            prev, read = n, e(n.target, *args, **n.kwargs)
        self.replace_output({m.present: buf, m.out_a: sa, m.out_z: sz_new})
        return buf, read

    def replace_output(self, mapping: dict) -> None:
        out = next(n for n in self.graph.nodes if n.op == "output")
        out.args = (tuple(mapping.get(o, mapping.get(strip(o), o)) if isinstance(o, fx.Node) else o
                          for o in out.args[0]),)

    def attention(self, att: Attention, comp_read, idx) -> None:
        """The ring over the raw cache's seq dim ``d`` (1: ``[B, S, D]``; 2: ``[B, 1, S, D]`` with q
        and the output ``[B, H, T, D]``) and ``sparse_attention``."""
        e, pos, w, d = self.e, self.pos, att.window, att.seq_dim
        self.resize(att.kv_ph, d, w)
        ar = self.arange(w, like=att.kv_ph)
        unrolled = e(aten.index_select.default, att.kv_ph, d, e(aten.remainder.Scalar, e(aten.add.Tensor, ar, pos), w))
        new = att.kv_new
        if meta_val(new).dtype != meta_val(att.kv_ph).dtype:
            new = e(aten.to.dtype, new, meta_val(att.kv_ph).dtype)
        seq = e(aten.cat.default, [unrolled, new], d)  # positions pos-W .. pos+T-1
        t = e(aten.sym_size.int, new, d)
        # (t + arange(w) + pos) % w with t (a shape, read on the host) inside the arange: ONNX's Range
        # reads its bounds on the host and writes on the device, where pos is, so ONNX Runtime inserts
        # no copy node (a Memcpy node keeps the step out of a CUDA graph)
        shifted = e(aten.arange.start, t, e(operator.add, t, w), dtype=torch.int64, device=meta_val(att.kv_ph).device)
        slots = e(aten.remainder.Scalar, e(aten.add.Tensor, shifted, pos), w)
        ring = e(aten.index_copy.default, att.kv_ph, d, slots, e(aten.slice.Tensor, seq, d, t))
        q = att.q
        if d == 2:
            seq, q = e(aten.squeeze.dim, seq, 1), e(aten.transpose.int, q, 1, 2)
        if comp_read is None:
            comp_read = e(aten.slice.Tensor, seq, 1, 0, 0)
        o = e(ops.sparse_attention.default, q, seq, comp_read, idx, att.sink, pos, scale=att.scale,
              window=w, ratio=att.comp.ratio if att.comp else 0)
        if d == 2:
            o = e(aten.transpose.int, o, 1, 2)
        if meta_val(o).dtype != meta_val(att.out).dtype:
            o = e(aten.to.dtype, o, meta_val(att.out).dtype)
        att.out.replace_all_uses_with(o)
        self.replace_output({att.kv_present: ring})


def clean(gm: fx.GraphModule) -> None:
    """Drop metadata asserts on otherwise-dead values and in-place writes into buffers nobody
    reads, then dead code."""
    changed = True
    while changed:
        changed = False
        for n in list(gm.graph.nodes):
            if is_call(n, ASSERT) and all(is_call(u, ASSERT) for u in n.args[0].users) or _dead_write(n):
                gm.graph.erase_node(n)
                changed = True
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        changed = changed or len(gm.graph.nodes) != before
