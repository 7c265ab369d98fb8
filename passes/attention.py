"""Rewrite attention sites into effexport attention ops, with the cache layout they allow.

Per KV group (an owner site and the consumer sites reading the very same K/V nodes):

* K and V are ``cat(past placeholder, new)`` (the captured step graph's naive cache):
    - owner sliding(W), every consumer sliding with the same W  ->  ``attention_ring`` with a
      ring of W slots (the placeholder becomes the ring); consumers run ``attention_ring`` over the
      owner's ring *before* this step plus the owner's new K/V and discard the ring it returns
      (exact for any number of new tokens, unlike a read of the updated ring);
    - owner chunked(C), every consumer chunked with the same C  ->  ``attention_ring(chunked=True)``
      with a chunk-local cache of C slots (the same ring layout, the chunk mask), consumers as above;
    - owner causal or sliding otherwise  ->  ``attention_cache`` (full, concatenated cache);
      consumers ``attention_read(ring=False)`` over the owner's present K/V.
* K and V computed in the graph (no cache): every site becomes ``attention``.

A group with any site left unknown is left alone, with the reason; so is a chunked site that has no
cache or shares it with sites of another mask (no op form: ``attention`` and ``attention_cache`` have
no chunked mode). Invariants kept:
``node.meta["val"]`` is set for every new node (computed with the ops' fake kernels under the
graph's fake mode); the rewritten graph is topologically ordered; no new aliasing (the ops are
functional). Dead nodes (the old masks, expansions and any K/V projections consumers no longer
need) are removed.
"""
from __future__ import annotations

import torch
from torch import fx

import effexport.custom_ops.attention  # noqa: F401  (registers the ops)
from effexport.passes._graph import aten, emit, is_call, meta_val, strip
from effexport.passes.sites import AttentionSite

ops = torch.ops.effexport


def resize_cache(ph: fx.Node, rows: int) -> None:
    """Give a past K/V placeholder ``[B, Hkv, S, d]`` a fixed ``rows`` along the sequence (its meta
    value; the batch stays symbolic): a ring's slots, a fixed buffer's capacity."""
    val = meta_val(ph)
    shape = list(val.shape)
    shape[2] = rows
    with val.fake_mode:
        ph.meta["val"] = torch.empty(shape, dtype=val.dtype, device=val.device)


def cache_source(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``cat([past placeholder, new], dim=seq)`` -> (placeholder, new), else None."""
    node = strip(node)
    if not is_call(node, aten.cat.default):
        return None
    tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if len(tensors) != 2 or dim not in (2, -2):
        return None
    past, new = strip(tensors[0]), tensors[1]
    if isinstance(past, fx.Node) and past.op == "placeholder":
        return past, new
    return None


def _replace_output(site: AttentionSite, new: fx.Node, graph: fx.Graph) -> None:
    out_val = meta_val(site.out)
    if out_val is not None and out_val.dtype != meta_val(new).dtype:
        new = emit(graph, aten.to.dtype, (new, out_val.dtype), {})
    site.out.replace_all_uses_with(new)


def _common(site: AttentionSite) -> dict:
    return dict(scale=float(site.scale), softcap=float(site.softcap))


def _retarget_cache(cat: fx.Node, new: fx.Node, graph: fx.Graph) -> None:
    """Point the uses of a ``cat`` cache node that come after ``new`` (graph outputs, later
    readers) at ``new``. Earlier users are the rewritten sites' own nodes, dead from now on."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    cat.replace_all_uses_with(new, delete_user_cb=lambda user: order[user] > order[new])


class AttentionRewriter:
    """Applies the rules above to the groups found by the sharing pass."""

    def __init__(self, gm: fx.GraphModule, pos: fx.Node):
        self.gm, self.graph, self.pos = gm, gm.graph, pos
        self.rings: dict[fx.Node, int] = {}  # past placeholder -> ring slots
        self.chunked: set[fx.Node] = set()  # the rings that are chunk-local caches

    def ring_placeholder(self, ph: fx.Node, window: int) -> None:
        """Turn a full-length past placeholder into a ring of ``window`` slots (meta updated)."""
        resize_cache(ph, window)
        self.rings[ph] = window

    def rewrite_group(self, owner: AttentionSite, consumers: list[AttentionSite]) -> str:
        """Rewrite one KV group; returns the cache kind used ("ring", "chunk", "full", "plain"), or a
        reason starting with "left alone" when the group cannot be rewritten."""
        k_src, v_src = cache_source(owner.k), cache_source(owner.v)
        sites = [owner, *consumers]
        chunked = [s for s in sites if s.mask_kind == "chunked"]
        if chunked and (k_src is None or v_src is None):
            return f"left alone: site {chunked[0].index} is chunked attention without a cache"
        if chunked and not all(s.mask_kind == "chunked" and s.window == owner.window for s in sites):
            return f"left alone: site {chunked[0].index} is chunked but its KV group mixes masks"
        if k_src is None or v_src is None:
            for site in sites:
                out = emit(self.graph, ops.attention.default, (site.q, site.k, site.v, site.sinks),
                           dict(causal=site.mask_kind != "full", window=site.window, **_common(site)))
                _replace_output(site, out, self.graph)
                site.cache = "plain"
            return "plain"
        (k_past, k_new), (v_past, v_new) = k_src, v_src
        full = [s for s in (owner, *consumers) if s.mask_kind == "full"]
        if full:
            return f"left alone: site {full[0].index} is bidirectional (full mask) over a cache"
        ring = owner.mask_kind in ("sliding", "chunked") and all(
            c.mask_kind == owner.mask_kind and c.window == owner.window for c in consumers)
        mode = dict(chunked=True) if chunked else {}
        if ring:
            self.ring_placeholder(k_past, owner.window)
            self.ring_placeholder(v_past, owner.window)
            if chunked:
                self.chunked |= {k_past, v_past}
            out, k_pres, v_pres = emit(
                self.graph, ops.attention_ring.default,
                (owner.q, k_new, v_new, k_past, v_past, self.pos, owner.sinks),
                dict(window=owner.window, **_common(owner), **mode), n_out=3)
        else:
            out, k_pres, v_pres = emit(
                self.graph, ops.attention_cache.default, (owner.q, k_new, v_new, k_past, v_past, owner.sinks),
                dict(window=owner.window, **_common(owner)), n_out=3)
        _replace_output(owner, out, self.graph)
        owner.cache = "chunk" if chunked else "ring" if ring else "full"
        for site in consumers:
            if ring:  # the owner's ring before this step + its new K/V: exact for any T, writes nothing
                read = emit(self.graph, ops.attention_ring.default,
                            (site.q, k_new, v_new, k_past, v_past, self.pos, site.sinks),
                            dict(window=site.window, **_common(site), **mode), n_out=3)[0]
            else:
                read = emit(self.graph, ops.attention_read.default,
                            (site.q, k_pres, v_pres, self.pos, site.sinks),
                            dict(window=site.window, **_common(site)))
            _replace_output(site, read, self.graph)
            site.cache = "none"
        k_cat, v_cat = strip(owner.k), strip(owner.v)
        _retarget_cache(k_cat, k_pres, self.graph)
        _retarget_cache(v_cat, v_pres, self.graph)
        return owner.cache
