"""A half-precision ONNX artifact's rounding, run on ONNX Runtime's CPU EP: the same graph in fp32
with every 16-bit value rounded where the artifact holds it in 16 bits.

    python3 bench/bf16_emulation.py ARTIFACT OUT      # then: bench/norm_error_probe.py OUT --model MODEL --device cpu

Every 16-bit initializer and constant becomes its exact fp32 value, every graph input / output and
value type fp32, and after every node output the artifact types as 16-bit a ``Cast`` to that type and
a ``Cast`` back to fp32 (the rounding, exact both ways); a ``Cast`` to 16 bits becomes that pair. So
each op computes in fp32 on fp32 operands that hold 16-bit values, and its result is rounded as the
artifact's would be. What it does not model: an op's own internal precision (a CUDA kernel's 16-bit
intermediates, e.g. the probabilities a fused attention rounds before multiplying the values; its
accumulation order). Comparing the emulation and the artifact against fp32 eager tells which of the
two, the graph's rounding points or the kernels, an artifact's half-precision error comes from.

The graph must run on the CPU EP in fp32: build the artifact without the CUDA-only fusions
(``EFFEXPORT_ORT_CUDA_FUSIONS=0``: Q / K norms inside GroupQueryAttention have no CPU kernel).
``OUT`` gets the converted step graph (weights as external data beside it) and the manifest with
fp32 caches and ``"emulates": "<dtype>"``; the artifact is not touched.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

HALF = {TensorProto.BFLOAT16: "bf16", TensorProto.FLOAT16: "fp16"}


def _value_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _widen(t: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)


def emulate(model: onnx.ModelProto, rounding: bool = True) -> dict:
    """Convert ``model`` in place (see the module docstring); returns what was changed. ``rounding``
    False: the same graph in fp32 with no rounding at all (what the artifact's structure computes
    without its dtype: against fp32 eager, a structural difference shows apart from the rounding)."""
    graph = model.graph
    types = _value_types(graph)
    counts = {"initializers": 0, "constants": 0, "casts": 0, "rounded": 0}
    for i, init in enumerate(graph.initializer):
        if init.data_type in HALF:
            graph.initializer[i].CopyFrom(_widen(init))
            counts["initializers"] += 1
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.type.tensor_type.elem_type in HALF:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in HALF:
                attr.t.CopyFrom(_widen(attr.t))
                counts["constants"] += 1
        added = []
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            to = next(a for a in node.attribute if a.name == "to")
            if to.i in HALF:
                types[node.output[0]] = to.i
                to.i = TensorProto.FLOAT
                counts["casts"] += 1
        for k, out in enumerate(node.output):
            half = types.get(out)
            if out and half in HALF and rounding:
                raw = f"{out}.emulated_fp32"
                node.output[k] = raw
                added += [onnx.helper.make_node("Cast", [raw], [f"{out}.emulated_half"], to=half),
                             onnx.helper.make_node("Cast", [f"{out}.emulated_half"], [out], to=TensorProto.FLOAT)]
                counts["rounded"] += 1
        nodes += [node, *added]
    del graph.node[:]
    graph.node.extend(nodes)
    return counts


def emulated_dir(artifact: str, out: str, rounding: bool = True) -> dict:
    """Write ``artifact``'s step graph, emulated, and its manifest (fp32 caches) to ``out``."""
    from effexport.exporter.backends.artifact import MANIFEST

    with open(os.path.join(artifact, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("target") != "onnx" or manifest.get("dtype") not in HALF.values():
        raise SystemExit(f"{artifact}: not a bf16 / fp16 ONNX artifact (dtype {manifest.get('dtype')!r})")
    step = manifest["files"]["step"]
    model = onnx.load(os.path.join(artifact, step))
    counts = emulate(model, rounding)
    os.makedirs(out, exist_ok=True)
    onnx.save(model, os.path.join(out, step), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{step}.data", size_threshold=1024)
    manifest["emulates"] = manifest["dtype"]
    manifest["dtype"] = "fp32"
    manifest["files"] = {"step": step}
    for entry in manifest["cache_plan"]["entries"]:
        if entry.get("dtype") in ("bfloat16", "float16"):
            entry["dtype"] = "float32"
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("out")
    ap.add_argument("--no-rounding", action="store_true",
                    help="the graph in fp32 without rounding: its structure's error apart from the dtype's")
    args = ap.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        raise SystemExit(f"{args.out}: exists and is not empty; name a new directory")
    print(json.dumps(emulated_dir(args.artifact, args.out, not args.no_rounding)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
