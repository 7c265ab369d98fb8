"""Graph-level workarounds for the bf16 deepseek-v4-flash:tiny failure on ONNX Runtime's CUDA EP.

    OUT=out/variants bash -c 'source bench/_ortgpu_env.sh; timeout 150 python3 bench/ds_bf16_variants.py \\
        --artifacts probe_results/artifacts --budget 120 --out "$OUT"'
    python3 bench/ds_bf16_variants.py --device cpu --artifacts DIR --out /tmp/variants   # fp32, ORT CPU

What ``bench/ds_bf16_probe.py`` found (onnxruntime-gpu 1.31.1, H100): in the third
``kv_compress_step`` body of the prefill (batch 1, 3 tokens) the CUDA ``Range(0, T)`` behind
``z + ape[positions mod r]`` made 2 positions, not 3, at every optimization level; with the session's
``enable_mem_reuse`` off the step ran. ``T`` is ``Squeeze(Shape(a, 1, 2))``: the ``Shape`` runs on
the CUDA EP with its output in host memory, the ``Squeeze`` on the CPU EP, which runs it as an alias
of that output. The CPU EP's nodes ran ahead of the CUDA ones (node trace): right after ``T`` it
computed ``nblk = T // r + 2`` (2 here, r = 16) and the other host scalars of the body, while the
CUDA ``Range`` nodes that read ``T`` on the host ran 17 and 32 nodes later; the last one read 2. So
``T``'s buffer evidently went to another 8-byte host scalar before its last reader (with the CPU
arena off the failure moves to ``Squeeze(Range(T, T + 1))``: an empty range, its two bounds read
inconsistent). Two ways the planner may get there, which the variants tell apart: the alias (the
reuse of an aliased buffer counted by the Shape output's own readers), or a plan made over one node
order while the two EPs' nodes run in another. The fp32 graph has the same body, the same 143 CPU
nodes and node order; its 189 fewer CUDA nodes (the bf16 casts) change which freed buffer goes where.

This script edits the built artifacts (onnx, on the CPU) into variants that change how a body reads
a dimension, and runs each the way the failing test does (``OrtRuntime.generate``: prefill of the
test's 3-token prompt + 15 greedy steps): the fp32 artifact first (the reference tokens), the bf16
artifact's emulation (``ds_bf16_probe.emulate_bf16``: fp32 kernels, bf16 roundings; the tokens bf16
should give), the bf16 variants, the bf16 artifact itself, then the fp32 variants:

* ``gather_kv``: every ``kv_compress_step`` body reads its dims as ``Gather(Shape(x), k)``, a tensor
  of its own (the exporter's lowering since this script; an artifact built before is edited to it);
* ``squeeze_kv``: the same bodies as ``Squeeze(Shape(x, k, k + 1))``, the lowering before (an
  artifact built since is edited back to it: the failing structure, as control);
* ``gather_all``: every dim read of every body and of the main graph by ``Gather``;
* ``reducemax_kv``: the ``kv_compress_step`` dims by ``ReduceMax(Shape(x, k, k + 1))`` (another
  op that writes a tensor of its own: is it the alias, not ``Gather``?);
* ``squeeze_kv_positions_cumsum``: ``squeeze_kv`` with the positions' ``Range(0, T)`` made
  ``CumSum(Expand(1, Shape(a, 1, 2))) - 1`` (no host scalar between ``Shape`` and its CUDA reader):
  does the failure move on to the next CUDA reader of ``T``, ``Squeeze(Range(T, T + 1))``?
* ``squeeze_kv_priority_order``: ``squeeze_kv`` in ORT's priority-based node order (the memory
  plan is made over one node order; the CPU EP's nodes ran ahead of the CUDA readers of ``T``);
* ``squeeze_kv_no_mem_reuse``: ``squeeze_kv`` with the session's buffer reuse off (known to run).

Each run is caught and recorded (ok / error, tokens, whether they equal the fp32 artifact's and the
emulation's, the largest logit difference to the first run of the same dtype); the JSON is rewritten after each, and
runs that would start after ``--budget`` seconds are skipped as such. On the CPU only the fp32
artifact runs (ORT CPU has no bf16 kernels): every fp32 variant must give the artifact's logits
(``tests/test_bench_ds_bf16_variants.py``), as each edit changes how a count is read, not its value.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ds_bf16_probe import _error, _ids, build, emulated  # noqa: E402

NEW_TOKENS = 16
# name: (form of every 0-d dim read, where: "kv" the kv_compress_step bodies / "all" every body and
# the main graph, SessionOptions attributes, the bodies' token positions without Range); the
# exporter's lowering first
VARIANTS = {
    "gather_kv": ("gather", "kv", {}, False),
    "squeeze_kv": ("squeeze", "kv", {}, False),
    "gather_all": ("gather", "all", {}, False),
    "reducemax_kv": ("reducemax", "kv", {}, False),
    "squeeze_kv_positions_cumsum": ("squeeze", "kv", {}, True),
    "squeeze_kv_priority_order": ("squeeze", "kv", {"execution_order": "PRIORITY_BASED"}, False),
    "squeeze_kv_no_mem_reuse": ("squeeze", "kv", {"enable_mem_reuse": False}, False),
}


# ------------------------------------------------------------------------------------ graph edits
def _constants(nodes, initializers=()) -> dict:
    """{value name: numpy value} of the Constant nodes in ``nodes`` and of ``initializers``."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in initializers}
    for node in nodes:
        if node.op_type == "Constant" and not node.domain:
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name == "value_int":
                values[node.output[0]] = np.array(attr.i, dtype=np.int64)
            elif attr.name == "value_ints":
                values[node.output[0]] = np.array(list(attr.ints), dtype=np.int64)
    return values


def _shape_slice(node) -> tuple[int, int | None]:
    """A Shape node's (start, end) attributes (end None: to the last dim)."""
    attrs = {a.name: a.i for a in node.attribute}
    return attrs.get("start", 0), attrs.get("end")


def _dim_read(node, producers: dict, constants: dict):
    """``(x, k)`` when ``node`` reads ``x.shape[k]`` as a 0-d tensor: ``Squeeze(Shape(x, k, k + 1)[, [0]])``
    (``k = -1``: ``Shape(x, -1)``), ``Gather(Shape(x), k)`` or ``Gather(Shape(x, k, k + 1), 0)`` with a
    0-d index, ``ReduceMax(Shape(x, k, k + 1), keepdims=0)``; else None."""
    if node.domain or node.op_type not in ("Squeeze", "Gather", "ReduceMax") or not node.input:
        return None
    shape = producers.get(node.input[0])
    if shape is None or shape.op_type != "Shape" or shape.domain:
        return None
    start, end = _shape_slice(shape)
    one = end == start + 1 or (start == -1 and end is None)
    if node.op_type == "Squeeze":  # axes [0], or none (every size-1 dim: the one dim here)
        axes = constants.get(node.input[1]).tolist() if len(node.input) > 1 and node.input[1] in constants else None
        return (shape.input[0], start) if one and (len(node.input) == 1 or axes == [0]) else None
    if node.op_type == "ReduceMax":
        keep = {a.name: a.i for a in node.attribute}.get("keepdims", 1)
        return (shape.input[0], start) if one and len(node.input) == 1 and keep == 0 else None
    index = constants.get(node.input[1])
    if index is None or index.ndim != 0 or {a.name: a.i for a in node.attribute}.get("axis", 0) != 0:
        return None
    if start == 0 and end is None:
        return shape.input[0], int(index)
    return (shape.input[0], start) if one and int(index) == 0 else None


def _read_as(form: str, x: str, k: int, out: str, tag: str) -> list:
    """The nodes that read ``x.shape[k]`` into ``out`` (0-d) in ``form``; new names start with ``tag``."""
    from onnx import helper

    window = {"start": k} if k == -1 else {"start": k, "end": k + 1}
    if form == "gather":
        return [helper.make_node("Shape", [x], [f"{tag}_shape"], name=f"{tag}_shape"),
                helper.make_node("Constant", [], [f"{tag}_k"], name=f"{tag}_k", value_int=k),
                helper.make_node("Gather", [f"{tag}_shape", f"{tag}_k"], [out], name=f"{tag}_read", axis=0)]
    if form == "squeeze":
        return [helper.make_node("Shape", [x], [f"{tag}_shape"], name=f"{tag}_shape", **window),
                helper.make_node("Constant", [], [f"{tag}_axes"], name=f"{tag}_axes", value_ints=[0]),
                helper.make_node("Squeeze", [f"{tag}_shape", f"{tag}_axes"], [out], name=f"{tag}_read")]
    assert form == "reducemax", form
    return [helper.make_node("Shape", [x], [f"{tag}_shape"], name=f"{tag}_shape", **window),
            helper.make_node("ReduceMax", [f"{tag}_shape"], [out], name=f"{tag}_read", keepdims=0)]


def _rewrite_dims(nodes: list, form: str, outputs: set, initializers=()) -> tuple[list, int]:
    """``nodes`` with every 0-d dim read in another form than ``form`` rewritten to it (same output
    name), and the ``Shape`` nodes left without a reader (nor in ``outputs``) dropped; the count."""
    producers = {o: n for n in nodes for o in n.output}
    constants = _constants(nodes, initializers)
    done, edits = [], 0
    for node in nodes:
        read = _dim_read(node, producers, constants)
        current = {"Squeeze": "squeeze", "Gather": "gather", "ReduceMax": "reducemax"}.get(node.op_type)
        if read is None or current == form:
            done.append(node)
            continue
        edits += 1
        done += _read_as(form, read[0], read[1], node.output[0], f"{node.output[0]}__{form}")
    while True:  # the old Shape (and its Constant) nodes that nothing reads any more
        read = {i for n in done for i in n.input} | outputs
        dead = [n for n in done if n.op_type in ("Shape", "Constant") and not n.domain
                and not any(o in read for o in n.output)]
        if not dead:
            return done, edits
        done = [n for n in done if n not in dead]


def _positions_by_cumsum(nodes: list, a: str) -> tuple[list, int]:
    """``nodes`` with each ``Range(0, a.shape[1], 1)`` (the token positions' base) made
    ``CumSum(Expand(1, Shape(a, 1, 2))) - 1``: the CUDA ``Expand`` reads ``Shape``'s host output
    directly, no host scalar between them; the count."""
    from onnx import helper

    producers = {o: n for n in nodes for o in n.output}
    constants = _constants(nodes)
    done, edits = [], 0
    for node in nodes:
        bounds = [constants.get(i) for i in node.input] if node.op_type == "Range" else []
        if not (bounds and bounds[0] is not None and bounds[0].tolist() == 0 and bounds[2] is not None
                and bounds[2].tolist() == 1 and node.input[1] in producers
                and _dim_read(producers[node.input[1]], producers, constants) == (a, 1)):
            done.append(node)
            continue
        edits += 1
        tag, out = f"{node.output[0]}__cumsum", node.output[0]
        done += [helper.make_node("Shape", [a], [f"{tag}_n"], name=f"{tag}_n", start=1, end=2),
                 helper.make_node("Constant", [], [f"{tag}_one"], name=f"{tag}_one", value_int=1),
                 helper.make_node("Constant", [], [f"{tag}_axis"], name=f"{tag}_axis", value_int=0),
                 helper.make_node("Expand", [f"{tag}_one", f"{tag}_n"], [f"{tag}_ones"], name=f"{tag}_ones"),
                 helper.make_node("CumSum", [f"{tag}_ones", f"{tag}_axis"], [f"{tag}_sum"], name=f"{tag}_sum"),
                 helper.make_node("Sub", [f"{tag}_sum", f"{tag}_one"], [out], name=f"{tag}_sub")]
    return done, edits


def variant(model, form: str, where: str, positions: bool = False) -> tuple[object, int]:
    """A copy of ``model`` whose dim reads (in the ``kv_compress_step`` bodies, or ``where="all"``
    everywhere) are in ``form``, with ``positions`` the bodies' ``Range(0, T)`` by
    :func:`_positions_by_cumsum`; and how many nodes changed."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    edits = 0
    for fn in model.functions:
        if where == "all" or fn.name == "kv_compress_step":
            nodes, n = _rewrite_dims(list(fn.node), form, set(fn.output))
            if positions and fn.name == "kv_compress_step":
                nodes, k = _positions_by_cumsum(nodes, fn.input[0])
                n += k
            del fn.node[:]
            fn.node.extend(nodes)
            edits += n
    if where == "all":
        graph = model.graph
        nodes, n = _rewrite_dims(list(graph.node), form, {o.name for o in graph.output}, graph.initializer)
        del graph.node[:]
        graph.node.extend(nodes)
        edits += n
    return model, edits


# ------------------------------------------------------------------------------------ runs
def generate(directory: str, device: str, knobs: dict) -> dict:
    """The test's case (``OrtRuntime.generate``, the 3-token prompt, 16 tokens) with ``knobs`` set on
    the SessionOptions (``execution_order`` by its ``ort.ExecutionOrder`` name); the logits of every
    step come back under ``"logits"`` (not written out)."""
    import onnxruntime as ort

    from effexport.runtime import OrtRuntime

    try:
        so = ort.SessionOptions()
        for name, value in knobs.items():
            setattr(so, name, getattr(ort.ExecutionOrder, value) if name == "execution_order" else value)
        tokens, logits = OrtRuntime(directory, device=device, session_options=so).generate(_ids(), NEW_TOKENS)
        return {"ok": True, "tokens": tokens[0].tolist(), "logits": [np.asarray(x, dtype=np.float32) for x in logits]}
    except Exception as exc:  # noqa: BLE001  (a failure is the finding)
        return _error(exc)


def _artifact_copy(directory: str, model, work: str) -> str:
    """``directory``'s files in a new folder under ``work``, its ``model.onnx`` replaced by ``model``."""
    import onnx

    target = tempfile.mkdtemp(dir=work)
    for name in os.listdir(directory):
        if name != "model.onnx" and os.path.isfile(os.path.join(directory, name)):
            shutil.copy(os.path.join(directory, name), target)
    onnx.save(model, os.path.join(target, "model.onnx"))
    return target


def run_variants(root: str, device: str, out: str, budget: float = 140.0, names=None) -> dict:
    """Every variant (``names``: those only) of each artifact under ``root`` that ``device`` runs: the
    fp32 artifact (the reference tokens), bf16's variants and the bf16 artifact (CUDA only), fp32's
    variants, each recorded in ``out/ds_bf16_variants.json`` as it ends; returns the report with
    every run's logits under ``"logits"``."""
    import onnx
    import onnxruntime as ort

    t0 = time.perf_counter()
    dtypes = [d for d in (("fp32", "bf16") if device == "cuda" else ("fp32",))
              if os.path.exists(os.path.join(root, d, "model.onnx"))]
    report = {"device": device, "onnxruntime": ort.__version__, "artifacts": os.path.abspath(root), "runs": {}}
    logits: dict = {}

    def record(key: str, result: dict) -> None:
        if "logits" in result:
            logits[key] = result.pop("logits")
            reference = next(v for k, v in logits.items() if k.split("/")[0] == key.split("/")[0])
            result["logits_max_diff"] = float(max(np.abs(a - b).max() for a, b in zip(logits[key], reference)))
        for ref in ("fp32/artifact", "bf16/emulated"):
            tokens = report["runs"].get(ref, {}).get("tokens")
            if result.get("ok") and tokens is not None and ref != key:
                result[f"same_tokens_as_{ref.replace('/', '_')}"] = result["tokens"] == tokens
        report["runs"][key] = result
        report["elapsed_s"] = round(time.perf_counter() - t0, 1)
        with open(os.path.join(out, "ds_bf16_variants.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)

    models = {d: onnx.load(os.path.join(root, d, "model.onnx")) for d in dtypes}
    chosen = [n for n in VARIANTS if names is None or n in names]
    plan = [("fp32", "artifact"), ("bf16", "emulated"), *(("bf16", n) for n in chosen), ("bf16", "artifact"),
            *(("fp32", n) for n in chosen)]
    with tempfile.TemporaryDirectory() as work:
        for d, name in plan:
            key = f"{d}/{name}"
            if d not in models:
                continue
            if time.perf_counter() - t0 > budget:
                record(key, {"skipped": "budget"})
                continue
            if name == "artifact":
                record(key, generate(os.path.join(root, d), device, {}))
                continue
            if name == "emulated":  # the bf16 graph's arithmetic in fp32 kernels: bf16's expected tokens
                record(key, emulated(os.path.join(root, d), device, inline=False))
                continue
            form, where, knobs, positions = VARIANTS[name]
            try:
                model, edits = variant(models[d], form, where, positions)
                result = generate(_artifact_copy(os.path.join(root, d), model, work), device, knobs)
            except Exception as exc:  # noqa: BLE001
                result, edits = _error(exc), None
            record(key, {"form": form, "where": where, "knobs": knobs, "edits": edits, **result})
    report["logits"] = logits
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--artifacts", help="DIR/bf16 and DIR/fp32, as bench/ds_bf16_probe.py builds them; "
                                        "without it both are built into OUT/artifacts first")
    ap.add_argument("--budget", type=float, default=140.0,
                    help="seconds (from the first run) after which the remaining variants are skipped")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    root = args.artifacts
    if not root:
        root = os.path.join(args.out, "artifacts")
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(args.out, "build.json"), "w") as f:
            json.dump(build(root, "CLI, --kv-cache buffer, --max-context 64, --no-check"), f, indent=1)
    if args.device == "cuda":
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
    report = run_variants(root, args.device, args.out, args.budget)
    print(json.dumps({k: v.get("ok", v.get("skipped")) for k, v in report["runs"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
