"""KV sharing: attention sites that read the very same K and V nodes form one group.

The first site of a group in graph order is the owner; later sites are consumers of the owner's
layer. Sharing is decided by node identity only: two layers that compute equal K/V independently
are *not* shared (their caches could diverge, e.g. under different weights).
"""
from __future__ import annotations

from effexport.passes.sites import AttentionSite, layer_index


def group_sites(sites: list[AttentionSite]) -> list[list[AttentionSite]]:
    """Groups of sites sharing K and V (owner first), in graph order; sets role/reads on sites."""
    groups: dict[tuple, list[AttentionSite]] = {}
    for site in sites:
        groups.setdefault((site.k, site.v), []).append(site)
    out = []
    for members in groups.values():
        owner, consumers = members[0], members[1:]
        owner_layer = layer_index(owner.layer)
        owner.role = "owner" if consumers else "independent"
        owner.reads = owner_layer
        for c in consumers:
            c.role, c.reads = "consumer", owner_layer
        out.append(members)
    return out
