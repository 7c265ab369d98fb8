"""Parity of a sharded ONNX artifact (``--target onnx --tp N``) without a collective runtime.

The rank models' ``com.microsoft::AllReduce`` runs only in an ONNX Runtime CUDA build with NCCL
(:mod:`.collectives`); no installable package has it. So the build checks every rank graph another
way: :func:`compose` joins the N rank models into one ONNX model that ONNX Runtime CPU runs --

* every name of rank r (values, initializers, nodes, caches) gets the prefix ``r{r}/``; the step's
  shared inputs (``input_ids``, ``pos``, ``pos_host``) are one graph input read by every rank;
* each rank keeps its own cache inputs and outputs (``past.r{r}/NAME`` / ``present.r{r}/NAME``);
* the k-th ``AllReduce`` of every rank (in graph order; the ranks' graphs have the same structure)
  is replaced by one ``Sum`` of the N ranks' k-th inputs, whose result feeds every rank's consumers
  (an ``Identity`` per rank, under the rank's old output name);
* the outputs are ``logits`` (rank 0's), every rank's presents, then ``r{r}/logits`` of the other
  ranks (all computed from the same all-reduced values: they must equal rank 0's).

:func:`write_composed` writes it with a manifest :class:`~.runtime.OrtRuntime` runs (the ranks'
CachePlans concatenated, entries renamed), so the build's parity is the ordinary
:func:`~effexport.exporter.verify.parity.check_parity` of that runtime against unsharded eager.
What it verifies: every rank's graph -- its sliced weights, divided head counts, split caches, the
place of each all-reduce -- computes the unsharded model when the all-reduces sum. What it does not:
the collective itself (NCCL, the kernel, its communicator setup), which was not run.
"""
from __future__ import annotations

import json
import os
from collections import deque

import onnx
from onnx import helper

from effexport.exporter.backends.onnx.collectives import ALL_REDUCE
from effexport.exporter.backends.onnx._schemas import MSFT_DOMAIN
from effexport.exporter.errors import LoadError

__all__ = ["compose", "write_composed", "COMPOSED_MODE", "SHARED_INPUTS", "rank_prefix"]

SHARED_INPUTS = ("input_ids", "pos", "pos_host")
COMPOSED_MODE = ("composed graph on ONNX Runtime CPU: the {world} rank models joined into one, each "
                 "com.microsoft::AllReduce replaced by one Sum of the ranks' inputs; the collective itself was not "
                 "run (no installable ONNX Runtime build has it)")
"""report.json's parity ``mode`` of a sharded ONNX build."""


def rank_prefix(rank: int) -> str:
    return f"r{rank}/"


def _renamer(rank: int):
    prefix = rank_prefix(rank)
    return lambda name: name if not name or name in SHARED_INPUTS else prefix + name


def _rename_graph(graph: onnx.GraphProto, rename) -> None:
    """Every value, initializer and node name of ``graph`` (and its subgraphs) through ``rename``."""
    for node in graph.node:
        node.name = rename(node.name) if node.name else node.name
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_graph(sub, rename)
    for values in (graph.input, graph.output, graph.value_info):
        for v in values:
            v.name = rename(v.name)
    for init in graph.initializer:
        init.name = rename(init.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = rename(sparse.values.name)


def _needs(node: onnx.NodeProto) -> set[str]:
    """The outer values ``node`` reads: its inputs and what its subgraphs read from outside them."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            local = {v.name for v in sub.input} | {i.name for i in sub.initializer}
            for inner in sub.node:
                names |= _needs(inner) - local
                local |= set(inner.output)
    return names


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every input is produced before it is read (Kahn, stable)."""
    waiting, consumers, ready = {}, {}, deque()
    for i, node in enumerate(nodes):
        missing = _needs(node) - available
        waiting[i] = len(missing)
        for name in missing:
            consumers.setdefault(name, []).append(i)
        if not missing:
            ready.append(i)
    out = []
    while ready:
        i = ready.popleft()
        out.append(nodes[i])
        for name in nodes[i].output:
            for j in consumers.pop(name, ()):
                waiting[j] -= 1
                if not waiting[j]:
                    ready.append(j)
    if len(out) != len(nodes):
        stuck = next(n for i, n in enumerate(nodes) if waiting[i])
        raise LoadError(f"composing the rank models: {stuck.op_type} node {stuck.name!r} reads a value no node "
                        "produces (the rank graphs do not have the same all-reduces)")
    return out


def all_reduces(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The ``com.microsoft::AllReduce`` nodes of ``graph``, in graph order."""
    return [n for n in graph.node if n.op_type == ALL_REDUCE and n.domain == MSFT_DOMAIN]


def compose(models: list[onnx.ModelProto]) -> onnx.ModelProto:
    """One model computing every rank of ``models`` (rank r's model at index r; module docstring).
    The rank models must each hold the same number of AllReduce nodes, one input and output each."""
    counts = [len(all_reduces(m.graph)) for m in models]
    if len(set(counts)) != 1:
        raise LoadError(f"the rank models hold different numbers of AllReduce nodes ({counts}); rebuild the artifact")
    nodes, inputs, outputs, inits, sparse, infos, extra = [], [], [], [], [], [], []
    reduced: list[list[tuple[str, str]]] = []   # per rank, per all-reduce: (input, output)
    seen_shared = set()
    for rank, model in enumerate(models):
        graph = onnx.GraphProto()
        graph.CopyFrom(model.graph)
        _rename_graph(graph, _renamer(rank))
        pairs = []
        for node in graph.node:
            if node.op_type == ALL_REDUCE and node.domain == MSFT_DOMAIN:
                if len(node.input) != 1 or len(node.output) != 1:
                    raise LoadError(f"rank {rank}'s AllReduce {node.name!r} has {len(node.input)} inputs; the "
                                    "composed check takes one")
                pairs.append((node.input[0], node.output[0]))
            else:
                nodes.append(node)
        reduced.append(pairs)
        for v in graph.input:
            if v.name in SHARED_INPUTS:
                if v.name not in seen_shared:
                    seen_shared.add(v.name)
                    inputs.append(v)
            else:
                inputs.append(v)
        for v in graph.output:
            if v.name == rank_prefix(rank) + "logits":
                if rank == 0:
                    v.name = "logits"  # rank 0's logits under the step's name
                    nodes.append(helper.make_node("Identity", [rank_prefix(0) + "logits"], ["logits"],
                                                  name="r0/logits_out"))
                    outputs.insert(0, v)
                else:
                    extra.append(v)
            else:
                renamed = _present_name(v, rank)
                outputs.append(renamed)
                nodes.append(helper.make_node("Identity", [v.name], [renamed.name], name=f"{v.name}_out"))
        inits.extend(graph.initializer)
        sparse.extend(graph.sparse_initializer)
        infos.extend(graph.value_info)
    for k in range(counts[0]):
        total = f"allreduce{k}/sum"
        nodes.append(helper.make_node("Sum", [pairs[k][0] for pairs in reduced], [total], name=f"allreduce{k}"))
        for rank, pairs in enumerate(reduced):
            nodes.append(helper.make_node("Identity", [total], [pairs[k][1]], name=f"allreduce{k}/r{rank}"))
    available = {v.name for v in inputs} | {i.name for i in inits} | {s.values.name for s in sparse} | {""}
    graph = helper.make_graph(_toposort(nodes, available), "composed_ranks", inputs, outputs + extra, inits,
                              value_info=infos, sparse_initializer=sparse)
    first = models[0]
    functions = {}
    for rank, model in enumerate(models):
        for f in model.functions:  # model-local bodies (effexport ops): one copy serves every rank
            kept = functions.setdefault((f.domain, f.name, getattr(f, "overload", "")), f)
            if kept.SerializeToString() != f.SerializeToString():
                raise LoadError(f"rank {rank}'s function {f.domain}::{f.name} differs from rank 0's; the composed "
                                "check needs one body per function name")
    opsets = {}
    for model in models:
        for o in model.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    opsets.setdefault("", max(opsets.values(), default=18))
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                            functions=list(functions.values()), producer_name="effexport (composed ranks)")
    out.ir_version = first.ir_version
    return out


def _present_name(value: onnx.ValueInfoProto, rank: int) -> onnx.ValueInfoProto:
    """Rank ``rank``'s ``r{r}/present.NAME`` output renamed ``present.r{r}/NAME`` (what a manifest's
    renamed CachePlan entry ``r{r}/NAME`` is read back as); the graph keeps the old name inside."""
    renamed = onnx.ValueInfoProto()
    renamed.CopyFrom(value)
    renamed.name = _cache_name(value.name, rank)
    return renamed


def _cache_name(name: str, rank: int) -> str:
    """``r{r}/past.X`` -> ``past.r{r}/X`` (and present)."""
    prefix = rank_prefix(rank)
    bare = name[len(prefix):] if name.startswith(prefix) else name
    kind, _, entry = bare.partition(".")
    return f"{kind}.{prefix}{entry}"


def write_composed(directory: str, manifest: dict, out: str) -> dict:
    """The sharded ONNX artifact at ``directory`` (its top-level ``manifest``) composed into
    ``out/model.onnx`` with an ``effexport.json`` :class:`~.runtime.OrtRuntime` runs; returns
    ``{"all_reduces": per rank count, "nodes": composed node count}``."""
    from effexport.exporter.backends.artifact import MANIFEST, load_manifest
    from effexport.exporter.backends.onnx.host_positions import IN_PLACE

    ranks = manifest["sharded"]["ranks"]
    models, rank_manifests = [], []
    for r, rank in enumerate(ranks):
        rank_dir = os.path.join(directory, rank["directory"])
        rank_manifest = load_manifest(rank_dir)
        path = os.path.join(rank_dir, rank_manifest["files"]["step"])
        if not os.path.isfile(path):
            raise LoadError(f"{directory!r} lacks {os.path.relpath(path, directory)} (rank {r}'s model); copy the "
                            "whole artifact directory, or rebuild it with --force")
        models.append(onnx.load(path))
        rank_manifests.append(rank_manifest)
    counts = [len(all_reduces(m.graph)) for m in models]
    composed = compose(models)
    metas = [{p.key: p.value for p in model.metadata_props} for model in models]
    # rank 0's metadata (device positions, ...); the caches bound in place: every rank's, renamed
    bound = [_cache_name(rank_prefix(r) + name, r) for r, meta in enumerate(metas)
             for name in json.loads(meta.get(IN_PLACE, "[]"))]
    for key, value in {**metas[0], IN_PLACE: json.dumps(bound)}.items():
        composed.metadata_props.add(key=key, value=value)
    _rename_cache_io(composed, len(models))
    os.makedirs(out, exist_ok=True)
    onnx.save_model(composed, os.path.join(out, "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=1024)
    entries = [{**e, "name": rank_prefix(r) + e["name"]}
               for r, rank_manifest in enumerate(rank_manifests) for e in rank_manifest["cache_plan"]["entries"]]
    inputs = [n for n in SHARED_INPUTS if n in rank_manifests[0]["inputs"]] + [f"past.{e['name']}" for e in entries]
    outputs = ["logits"] + [f"present.{e['name']}" for e in entries]
    composed_manifest = {"target": "onnx", "profile": rank_manifests[0].get("profile"), "dtype": manifest["dtype"],
                         "files": {"step": "model.onnx"}, "inputs": inputs, "outputs": outputs,
                         "cache_plan": {"entries": entries, "layers": []},
                         **({"max_step_tokens": manifest["max_step_tokens"]} if manifest.get("max_step_tokens") else {})}
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(composed_manifest, f, indent=1, sort_keys=True)
    return {"all_reduces": counts, "nodes": len(composed.graph.node)}


def _rename_cache_io(model: onnx.ModelProto, world: int) -> None:
    """Cache inputs ``r{r}/past.X`` become graph inputs ``past.r{r}/X`` (Identity-free: the readers
    are renamed); outputs were renamed by :func:`compose`."""
    graph = model.graph
    renames = {}
    for v in graph.input:
        for r in range(world):
            if v.name.startswith(rank_prefix(r) + "past."):
                renames[v.name] = _cache_name(v.name, r)
    for v in graph.input:
        v.name = renames.get(v.name, v.name)
    _rename_graph_inputs(graph, renames)


def _rename_graph_inputs(graph: onnx.GraphProto, renames: dict) -> None:
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_graph_inputs(sub, renames)
    for v in graph.value_info:
        v.name = renames.get(v.name, v.name)
