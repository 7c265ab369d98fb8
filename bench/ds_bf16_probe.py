"""Why does the bf16 deepseek-v4-flash:tiny step fail on ONNX Runtime's CUDA EP?

    OUT=out/probe bash -c 'source bench/_ortgpu_env.sh; timeout 170 python3 bench/ds_bf16_probe.py --out "$OUT"'
    python3 bench/ds_bf16_probe.py --device cpu --out /tmp/probe     # the code path on ORT CPU (fp32 only)

``tests/test_graph_runtime.py::test_cuda_graph_replay_equals_uncaptured[deepseek-v4-flash:tiny]``
fails in the *uncaptured* runtime (onnxruntime-gpu 1.31.1, H100): batch 1, a 3-token prompt, ORT
reports an ``Add`` inside an inlined ``kv_compress_step`` body with operands ``{1,3,32}`` and
``{2,32}`` (``z + ape[positions mod r]``, the positions ``Range(0, T) + pos`` two long for three
tokens). What is known off the GPU: the fp32 artifact generates on ORT CPU (1.31.1 and 1.32) but was
never run on the CUDA EP (before this probe the test failed earlier, at the CUDA-graph session's
refusal); bf16 cannot run on ORT CPU (no bf16 kernels), and an fp32 copy that rounds every bf16 value
through bf16 (:func:`emulate_bf16`) runs on ORT CPU with the fp32 artifact's tokens, so what fails
is on the CUDA EP's side of the session (placement, host / device copies, kernels, memory planning),
not in the graph's arithmetic. This probe gathers what cannot be seen off the GPU:

1. builds both artifacts with the CLI as the test does (``--kv-cache buffer``, ``--max-context 64``,
   bf16 and fp32, in parallel subprocesses; their op counts and ``model_*.onnx`` are kept, to diff
   against a build made elsewhere);
2. runs the test's first case (``OrtRuntime(device=...).generate(ids [1, 3], 16)``) on each, alone
   and, as the test does, with a ``CudaGraphRuntime`` session opened beside it;
3. one prefill of each with ORT's profiler on: the profile records every node that ran before the
   failure with its provider and its input / output shapes (the graph is not changed, so the
   failure is not disturbed); the ``kv_compress_step`` nodes, the Memcpy nodes and the last nodes
   before the failure go into the JSON, the whole trace into ``nodes_<tag>.json``;
   then, for the failing artifact (the bf16 one if none fails):
4. the session's optimized graph as ORT saves it (``optimized_model_filepath``: its own inlining,
   fusions, CPU fallbacks and Memcpy nodes) and its verbose log's placement lines;
5. the graph inlined by ``onnx.inliner`` with the values behind each body's ``z + ape[positions mod
   r]`` added as graph outputs (Range, its bounds, the positions: their values at the failing step),
   then as is (does ORT's own inliner matter?), then with every int64 value of the
   ``kv_compress_step`` bodies as outputs (outputs keep nodes from fusions, so they may hide the
   failure; that is recorded as such);
6. one prefill each with the memory planner's buffer reuse, memory patterns or the CPU arena off
   (a host count read after its buffer went to another value would show as a wrong count);
7. one prefill per lower graph optimization level (extended, basic, disabled);
8. the emulated-bf16 copy (fp32 arithmetic, every bf16 value rounded through a Cast pair) on the
   same device, its functions kept for ORT to inline and inlined beforehand: bf16 kernels and their
   placement out, the graph's structure kept;
9. if a lower level runs where ``all`` fails, one prefill per ORT transformer disabled
   (``disabled_optimizers``), to name the one that breaks it.

Every phase is caught and recorded (a failure is data); ``ds_bf16_probe.json`` is rewritten after
each phase, so a run cut short by ``timeout`` still leaves what it found. The builds dominate (each
~75 s of one CPU core here, run side by side); phases 5-9 start only before ``--budget`` seconds
(default 80, counted from the start), so a 90-second run gets phases 1-4 and ``timeout 170`` all
of them; ``--artifacts DIR`` reuses ``DIR/bf16`` and ``DIR/fp32`` instead of building.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

PRESET = "deepseek-v4-flash:tiny"
CONTEXT = 64
LEVELS = ("all", "extended", "basic", "disabled")
# ORT transformers that touch shape arithmetic, Range / Gather or half-precision casts
# (onnxruntime/core/optimizer/graph_transformer_utils.cc; a name one ORT version lacks is recorded as
# such), tried one at a time in phase 9
TRANSFORMERS = ("ConstantFolding", "CommonSubexpressionElimination", "ConstantSharing", "Level1_RuleBasedTransformer",
                "Level2_RuleBasedTransformer", "GatherToSliceFusion", "GatherSliceToSplitFusion", "GatherToSplitFusion",
                "SimplifiedLayerNormFusion", "LayerNormFusion", "SkipLayerNormFusion", "ReshapeFusion",
                "TransposeOptimizer", "MatMulScaleFusion", "MatmulTransposeFusion", "BiasSoftmaxFusion",
                "GroupQueryAttentionFusion", "QuickGeluFusion", "FastGeluFusion", "GeluFusion", "MatMulAddFusion",
                "BiasGeluFusion", "CastElimination", "NoopElimination")


# ------------------------------------------------------------------------------------ helpers
class Report:
    """The JSON written to ``--out`` after every phase."""

    def __init__(self, out: str):
        self.out, self.data, self.t0 = out, {"phases": {}}, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def put(self, key: str, value) -> None:
        self.data["phases"][key] = value
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        with open(os.path.join(self.out, "ds_bf16_probe.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=str)


def _error(exc: BaseException) -> dict:
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}


def _ids(batch: int = 1, length: int = 3, seed: int = 1) -> np.ndarray:
    """The test's prompt (tests/test_graph_runtime.py ``_ids``)."""
    return np.random.RandomState(seed).randint(0, 128, (batch, length))


@contextlib.contextmanager
def _stderr_to(path: str):
    """Redirect the process's fd 2 (ONNX Runtime's C++ log) into ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _options(ort, level: str = "all", profile: str | None = None, optimized: str | None = None, verbose: bool = False):
    """SessionOptions at an optimization level, with ORT's profiler (``profile``: the trace's file
    prefix), the optimized graph saved to ``optimized``, or the verbose log (placement lines)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    if optimized:
        so.optimized_model_filepath = optimized
    if verbose:
        so.log_severity_level = 0
        so.log_verbosity_level = 1
    return so


def _providers(device: str) -> list:
    """OrtRuntime's providers for ``device`` (CUDA first, the CPU for what it does not take)."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------------ phases
def build(out: str, device_note: str) -> dict:
    """Both artifacts with the CLI (the test's ``_build``), in parallel subprocesses."""
    code = ("import sys; from effexport.exporter.cli import main; sys.exit(main(sys.argv[1:]))")
    procs = {}
    for dtype in ("bf16", "fp32"):
        target = os.path.join(out, dtype)
        shutil.rmtree(target, ignore_errors=True)
        args = [PRESET, "--target", "onnx", "-o", target, "--max-context", str(CONTEXT), "--no-check",
                "--kv-cache", "buffer"] + (["--dtype", "bf16"] if dtype == "bf16" else [])
        log = open(os.path.join(out, f"build_{dtype}.log"), "w")
        procs[dtype] = (subprocess.Popen([sys.executable, "-c", code, *args], stdout=log, stderr=subprocess.STDOUT),
                        log, time.perf_counter())
    result = {"note": device_note}
    for dtype, (proc, log, t0) in procs.items():
        rc = proc.wait()
        log.close()
        with open(log.name) as f:
            tail = f.read()[-1500:]
        result[dtype] = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "log_tail": tail}
    return result


def graph_summary(directory: str) -> dict:
    """Op counts of the main graph and of every ``kv_compress_step`` body (to compare with a CPU build)."""
    import collections

    import onnx

    model = onnx.load(os.path.join(directory, "model.onnx"), load_external_data=False)
    bodies = {f"{f.name}:{f.overload}": dict(collections.Counter(n.op_type for n in f.node))
              for f in model.functions if f.name == "kv_compress_step"}
    return {"nodes": len(model.graph.node), "ops": dict(collections.Counter(n.op_type for n in model.graph.node)),
            "kv_compress_step_bodies": bodies,
            "kv_compress_step_nodes": [{"name": n.name, "inputs": list(n.input), "overload": n.overload}
                                       for n in model.graph.node if n.op_type == "kv_compress_step"]}


def generate(directory: str, device: str, as_the_test: bool = False) -> dict:
    """The test's first case on the plain runtime; ``as_the_test``: with the test's
    ``CudaGraphRuntime`` session opened beside it first (does a second session change the first?)."""
    from effexport.runtime import CudaGraphRuntime, OrtRuntime

    try:
        plain = OrtRuntime(directory, device=device)
        beside = CudaGraphRuntime(directory, device=device) if as_the_test else None  # noqa: F841  (kept open)
        tokens, logits = plain.generate(_ids(), 16)
        return {"ok": True, "tokens": tokens.tolist(), "logits_absmax": [float(np.abs(x).max()) for x in logits[:3]]}
    except Exception as exc:  # noqa: BLE001  (a failure is the finding)
        return _error(exc)


def _trace_nodes(path: str) -> list[dict]:
    with open(path) as f:
        events = json.load(f)
    nodes = []
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        nodes.append({"node": e["name"][:-len("_kernel_time")], "op": args.get("op_name"),
                      "provider": args.get("provider", "").replace("ExecutionProvider", ""),
                      "in": args.get("input_type_shape"), "out": args.get("output_type_shape")})
    return nodes


def profiled_prefill(directory: str, device: str, level: str, out: str, tag: str, disabled: tuple = (),
                     knobs: dict | None = None) -> dict:
    """One prefill (the test's prompt) with ORT's profiler; the kv_compress_step nodes' shapes.
    ``knobs``: SessionOptions attributes to set (``enable_mem_reuse``, ``enable_mem_pattern``,
    ``enable_cpu_mem_arena``): whether the memory planner's buffer reuse is involved."""
    import onnxruntime as ort

    from effexport.runtime import OrtRuntime

    prefix = os.path.join(out, f"trace_{tag}")
    res: dict = {"level": level, "disabled": list(disabled), "knobs": knobs or {}}
    runtime = None
    try:
        so = _options(ort, level, profile=prefix)
        for name, value in (knobs or {}).items():
            setattr(so, name, value)
        runtime = OrtRuntime(directory, device=device, session_options=so)
        if disabled:  # the same runtime (bindings, caches) over a session without those transformers
            runtime.session.end_profiling()
            runtime.session = ort.InferenceSession(os.path.join(directory, "model.onnx"), so,
                                                   providers=_providers(device), disabled_optimizers=list(disabled))
        runtime.step(_ids(), 0, runtime.initial_caches(1))
        res["ok"] = True
    except Exception as exc:  # noqa: BLE001
        res.update(_error(exc))
    if runtime is not None:
        try:
            trace = runtime.session.end_profiling()
            nodes = _trace_nodes(trace)
            with open(os.path.join(out, f"nodes_{tag}.json"), "w") as f:
                json.dump(nodes, f)
            os.remove(trace)
            res["nodes_run"] = len(nodes)
            res["cpu_nodes"] = sum(1 for n in nodes if n["provider"] == "CPU")
            res["memcpy_nodes"] = [n for n in nodes if (n["op"] or "").startswith("Memcpy")]
            res["last_nodes"] = nodes[-25:]
            if not disabled:
                res["kv_compress_step_nodes"] = [n for n in nodes if "kv_compress_step" in n["node"]]
        except Exception as exc:  # noqa: BLE001
            res["trace_error"] = f"{type(exc).__name__}: {exc}"
    return res


def optimized_graph(directory: str, device: str, out: str, tag: str) -> dict:
    """ORT's optimized graph for this device (level all) and the placement lines of its verbose log."""
    import onnxruntime as ort

    path, log = os.path.join(out, f"optimized_{tag}.onnx"), os.path.join(out, f"ort_verbose_{tag}.log")
    res: dict = {"file": os.path.basename(path)}
    try:
        with _stderr_to(log):
            ort.InferenceSession(os.path.join(directory, "model.onnx"),
                                 _options(ort, "all", optimized=path, verbose=True), providers=_providers(device))
        res["ok"] = True
    except Exception as exc:  # noqa: BLE001
        res.update(_error(exc))
    try:
        import gzip

        with open(log, errors="replace") as f:
            lines = f.readlines()
        keys = ("Force fallback to CPU", "placed on", "Memcpy", "InlineFunctions", "fallback", "CUDA kernel not")
        keep, placement = [], False
        for ln in lines:  # the placement summary lists node names on the lines after "placed on"
            placement = "placed on" in ln or (placement and ln.startswith(" "))
            if placement or any(k in ln for k in keys):
                keep.append(ln.rstrip()[-300:])
        with open(os.path.join(out, f"placement_{tag}.txt"), "w") as f:
            f.write("\n".join(keep))
        with open(log, "rb") as src, gzip.open(log + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(log)
        res.update(log_lines=len(lines), placement_file=f"placement_{tag}.txt", placement_lines=len(keep),
                   memcpy_lines=[ln for ln in keep if "Memcpy" in ln][:40],
                   cpu_fallback_lines=[ln for ln in keep if "Force fallback" in ln][:40])
    except OSError as exc:
        res["log_error"] = str(exc)
    try:
        import collections

        import onnx

        model = onnx.load(path, load_external_data=False)
        res["ops"] = dict(collections.Counter(n.op_type for n in model.graph.node))
        if os.path.getsize(path) > 20 << 20:  # keep what comes back small: the graph without weights
            onnx.save(model, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
            os.remove(path + ".data")
    except Exception as exc:  # noqa: BLE001
        res["read_error"] = f"{type(exc).__name__}: {exc}"
    return res


def _feeds_ortvalues(ort, session, manifest: dict, device: str) -> dict:
    """Prefill feeds as OrtValues on the host (bf16 caches as int16 bits), by input name."""
    from effexport.exporter.backends.artifact import plan_entries

    import torch

    feeds = {"input_ids": ort.OrtValue.ortvalue_from_numpy(_ids().astype(np.int64)),
             "pos": ort.OrtValue.ortvalue_from_numpy(np.array(0, dtype=np.int64))}
    names = [n for n in manifest["inputs"] if n not in ("input_ids", "pos", "pos_host")]
    declared = {i.name: i.type for i in session.get_inputs()}
    for name, entry in zip(names, plan_entries(manifest)):
        cache = entry.empty(1)
        if declared.get(name) == "tensor(bfloat16)":
            feeds[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(cache.view(torch.int16).numpy(), 16)
        else:
            feeds[name] = ort.OrtValue.ortvalue_from_numpy(cache.float().numpy())
    if "pos_host" in manifest["inputs"]:
        feeds["pos_host"] = ort.OrtValue.ortvalue_from_numpy(np.array(0, dtype=np.int64))
    return feeds


def _ape_chain(flat, producers: dict) -> list[str]:
    """The values behind each kv_compress_step body's ``z + ape[positions mod r]`` (the failing Add):
    the Gather's indices, the Mod, the positions Add, the Range and the Range's three inputs."""
    names = []
    for node in flat.graph.node:
        if not (node.name.startswith("kv_compress_step/") and node.op_type == "Add"):
            continue
        gather = producers.get(node.input[1])
        if gather is None or gather.op_type != "Gather":
            continue
        names += [node.input[0], node.input[1]]
        todo = [gather.input[1]]
        while todo:  # Mod <- Add <- Range <- (start, limit, delta)
            name = todo.pop()
            names.append(name)
            src = producers.get(name)
            if src is not None and src.op_type in ("Mod", "Add", "Range", "Squeeze", "Shape"):
                todo += [i for i in src.input if i and (src.op_type != "Add" or i != "pos")]
    return names


def inlined_values(directory: str, device: str, out: str, mode: str) -> dict:
    """The model inlined by onnx.inliner (``mode`` "none": as is, does ORT's own inlining matter?);
    "minimal": the values behind each body's ``z + ape[...]`` become graph outputs (:func:`_ape_chain`);
    "all": every int64 / bool value of the kv_compress_step bodies too (named
    ``kv_compress_step/<node>`` before inlining). Outputs keep their nodes from fusions, so "all" may
    hide the failure that "none" shows: that is recorded as such."""
    import onnx
    import onnxruntime as ort
    from onnx import inliner

    res: dict = {"mode": mode}
    try:
        model = onnx.load(os.path.join(directory, "model.onnx"))
        for fn in model.functions:
            for i, node in enumerate(fn.node):
                node.name = f"{fn.name}/{node.name or f'{node.op_type}_{i}'}"
        flat = onnx.shape_inference.infer_shapes(inliner.inline_local_functions(model))
        types = {v.name: v.type.tensor_type.elem_type for v in flat.graph.value_info}
        extra = []
        have = {o.name for o in flat.graph.output}
        if mode == "minimal":
            producers = {o: n for n in flat.graph.node for o in n.output}
            for name in _ape_chain(flat, producers):
                if name not in have and name in producers and producers[name].op_type != "Constant":
                    extra.append(name)
                    have.add(name)
        if mode == "all":
            for node in flat.graph.node:
                if node.name.startswith("kv_compress_step/") and node.op_type != "Constant":
                    for o in node.output:
                        if o and o not in have and types.get(o) in (onnx.TensorProto.INT64, onnx.TensorProto.BOOL):
                            extra.append(o)
                            have.add(o)
                    if node.op_type == "Add":  # the failing op: its inputs' shapes
                        for i in node.input:
                            if i and i not in have:
                                extra.append(i)
                                have.add(i)
        for name in extra:
            flat.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
        producers = {o: n for n in flat.graph.node for o in n.output}
        path = os.path.join(tempfile.mkdtemp(), "inlined.onnx")
        onnx.save(flat, path)
        session = ort.InferenceSession(path, _options(ort), providers=_providers(device))
        with open(os.path.join(directory, "effexport.json")) as f:
            manifest = json.load(f)
        feeds = _feeds_ortvalues(ort, session, manifest, device)
        names = [o.name for o in session.get_outputs()]
        try:
            values = session.run_with_ort_values(names, feeds)
        except Exception as exc:  # noqa: BLE001
            res.update(_error(exc))
            return res
        res["ok"] = True
        got = {}
        for name, value in zip(names, values):
            if name not in extra:
                continue
            entry = {"shape": list(value.shape()), "by": f"{producers[name].op_type} {producers[name].name}"
                     if name in producers else "input"}
            if value.data_type() in ("tensor(int64)", "tensor(bool)") and int(np.prod(value.shape())) <= 64:
                try:  # a device value comes back through ORT's copy to the host
                    entry["value"] = value.numpy().tolist()
                except Exception as exc:  # noqa: BLE001
                    entry["value_error"] = f"{type(exc).__name__}: {exc}"
            got[name] = entry
        res["values"] = got
    except Exception as exc:  # noqa: BLE001
        res.update(_error(exc))
    return res


def _fp32(tensor):
    """A bf16 TensorProto as fp32 (the same numbers); any other tensor as it is."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_type != TensorProto.BFLOAT16:
        return tensor
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def _rounded(nodes, types: dict) -> list:
    """``nodes`` with bf16 constants made fp32, each ``Cast(to=BFLOAT16)`` made a cast to fp32, and
    after every node whose output ``types`` says is bf16 (and every such cast) the pair
    ``Cast(to=BFLOAT16) -> Cast(to=FLOAT)`` that rounds it as the original stores it."""
    import onnx
    from onnx import TensorProto, helper

    out = []
    for node in nodes:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                a.t.CopyFrom(_fp32(a.t))
        rounded = [k for k, o in enumerate(node.output) if o and types.get(o) == TensorProto.BFLOAT16]
        if node.op_type == "Cast" and not node.domain and node.attribute[0].i == TensorProto.BFLOAT16:
            node.attribute[0].i = TensorProto.FLOAT
            rounded = [0]
        out.append(node)
        for k in rounded:
            name = node.output[k]
            node.output[k] = f"{name}__unrounded"
            out.append(helper.make_node("Cast", [f"{name}__unrounded"], [f"{name}__bf16"], to=TensorProto.BFLOAT16,
                                        name=f"{name}__to_bf16"))
            out.append(helper.make_node("Cast", [f"{name}__bf16"], [name], to=TensorProto.FLOAT, name=f"{name}__to_fp32"))
    return out


def emulate_bf16(model, inline: bool = True):
    """An fp32 copy of a bf16 ONNX model that keeps its bf16 roundings: every bf16 type, initializer
    and constant made fp32, and every value the original computes in bf16 rounded through
    ``Cast(to=BFLOAT16) -> Cast(to=FLOAT)`` where it is made (ONNX Runtime CPU has those two casts and
    the fp32 kernels, not the bf16 ones). ``inline``: the local functions inlined first (every value
    typed by shape inference, value_info dropped); else the functions stay for ORT to inline as it
    does the original, with the main graph's value_info kept (retyped) -- inside a body only the
    explicit casts to bf16 round, as a body's values carry no declared type."""
    import onnx
    from onnx import TensorProto, inliner

    model = onnx.shape_inference.infer_shapes(inliner.inline_local_functions(model)) if inline else model
    graph = model.graph
    typed = list(graph.input) + list(graph.output) + list(graph.value_info)
    types = {v.name: v.type.tensor_type.elem_type for v in typed}
    types.update({t.name: t.data_type for t in graph.initializer})
    for v in typed:
        if v.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    inits = [_fp32(t) for t in graph.initializer]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    nodes = _rounded(list(graph.node), types)
    del graph.node[:]
    graph.node.extend(nodes)
    for fn in model.functions:
        nodes = _rounded(list(fn.node), {})
        del fn.node[:]
        fn.node.extend(nodes)
    if inline:
        del graph.value_info[:]  # the intermediate types changed; ORT infers them again
    return model


def emulated(directory: str, device: str, inline: bool) -> dict:
    """The emulated-bf16 copy (:func:`emulate_bf16`): prefill + 16 greedy steps (fp32 caches), on ``device``."""
    import onnx
    import onnxruntime as ort

    from effexport.exporter.backends.artifact import plan_entries

    res: dict = {}
    try:
        model = emulate_bf16(onnx.load(os.path.join(directory, "model.onnx")), inline=inline)
        path = os.path.join(tempfile.mkdtemp(), "emulated.onnx")
        onnx.save(model, path)
        session = ort.InferenceSession(path, _options(ort), providers=_providers(device))
        with open(os.path.join(directory, "effexport.json")) as f:
            manifest = json.load(f)
        names = [n for n in manifest["inputs"] if n not in ("input_ids", "pos", "pos_host")]
        caches = [e.empty(1).float().numpy() for e in plan_entries(manifest)]
        ids, pos, tokens = _ids(), 0, []
        for _ in range(17):
            feeds = {"input_ids": ids.astype(np.int64), "pos": np.array(pos, dtype=np.int64), **dict(zip(names, caches))}
            if "pos_host" in manifest["inputs"]:
                feeds["pos_host"] = feeds["pos"]
            outs = session.run(manifest["outputs"], feeds)
            pos += ids.shape[1]
            ids, caches = outs[0][:, -1].argmax(-1)[:, None], outs[1:]
            tokens.append(int(ids[0, 0]))
        res.update(ok=True, tokens=tokens[:16])
    except Exception as exc:  # noqa: BLE001
        res.update(_error(exc))
    return res


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--artifacts", help="reuse DIR/bf16 and DIR/fp32 instead of building")
    ap.add_argument("--budget", type=float, default=80.0,
                    help="seconds (from the start, builds included) after which optional phases are skipped")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    report = Report(args.out)
    import onnxruntime as ort

    report.data.update(device=args.device, onnxruntime=ort.__version__, providers=ort.get_available_providers(),
                       python=sys.version.split()[0])
    try:
        import torch

        report.data.update(torch=torch.__version__,
                           gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception as exc:  # noqa: BLE001
        report.data["torch_error"] = str(exc)
    if args.device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()

    root = args.artifacts or os.path.join(args.out, "artifacts")
    if not args.artifacts:
        os.makedirs(root, exist_ok=True)
        report.put("build", build(root, "CLI, --kv-cache buffer, --max-context 64, --no-check"))
    dirs = {d: os.path.join(root, d) for d in ("bf16", "fp32") if os.path.exists(os.path.join(root, d, "model.onnx"))}
    # the bf16 graph runs only where its kernels are (CUDA); on the CPU the fp32 one stands in
    runnable = dict(dirs) if args.device == "cuda" else {k: v for k, v in dirs.items() if k == "fp32"}
    report.put("graphs", {d: graph_summary(p) for d, p in dirs.items()})
    for d, p in dirs.items():  # the graphs as built here, for an offline diff against a CPU build
        shutil.copy(os.path.join(p, "model.onnx"), os.path.join(args.out, f"model_{d}.onnx"))

    runs = {d: generate(p, args.device) for d, p in runnable.items()}
    report.put("generate", runs)
    for d, p in runnable.items():
        runs[f"{d}/as_the_test"] = generate(p, args.device, as_the_test=True)
        report.put("generate", runs)
    # most telling first: the budget cuts the tail, not the head
    levels: dict = {}
    for d, p in runnable.items():
        levels[f"{d}/all"] = profiled_prefill(p, args.device, "all", args.out, f"{d}_all")
        report.put("prefill_by_level", levels)
    # the artifacts to dig into: those whose prefill failed (the bf16 one where none did)
    failing = [d for d in runnable if levels[f"{d}/all"].get("ok") is False] or [d for d in runnable if d == "bf16"]
    focus = {d: runnable[d] for d in failing} or dict(runnable)
    graphs: dict = {}
    for d in [*focus, *(d for d in runnable if d not in focus)]:
        graphs[d] = (optimized_graph(runnable[d], args.device, args.out, d)
                     if d in focus or report.elapsed() < args.budget else {"skipped": "budget"})
        report.put("optimized_graph", graphs)
    half = next(iter(focus))
    inlined: dict = {}
    for mode in ("minimal", "none", "all"):
        if report.elapsed() > args.budget:
            inlined[mode] = {"skipped": "budget"}
            continue
        inlined[mode] = inlined_values(focus[half], args.device, args.out, mode)
        report.put("inlined", inlined)
    knobs: dict = {}
    for d, p in focus.items():  # the memory planner: buffer reuse, patterns, the CPU arena
        for name in ("enable_mem_reuse", "enable_mem_pattern", "enable_cpu_mem_arena"):
            if report.elapsed() > args.budget:
                knobs[f"{d}/{name}=False"] = {"skipped": "budget"}
                continue
            r = profiled_prefill(p, args.device, "all", args.out, f"{d}_no_{name}", knobs={name: False})
            knobs[f"{d}/{name}=False"] = {k: r.get(k) for k in ("ok", "error", "nodes_run", "memcpy_nodes")}
            report.put("session_knobs", knobs)
    for d, p in focus.items():
        for level in LEVELS[1:]:
            if report.elapsed() > args.budget:
                levels[f"{d}/{level}"] = {"skipped": "budget"}
                continue
            levels[f"{d}/{level}"] = profiled_prefill(p, args.device, level, args.out, f"{d}_{level}")
            report.put("prefill_by_level", levels)
    emulations: dict = {}
    for inline in (False, True):  # ORT's own inlining of the bodies first, as in the real session
        if "bf16" in dirs and report.elapsed() < args.budget:
            emulations["onnx_inlined" if inline else "functions_kept"] = emulated(dirs["bf16"], args.device, inline)
            report.put("emulated_bf16", emulations)
    passing = [lv for lv in LEVELS[1:] if levels.get(f"{half}/{lv}", {}).get("ok")]
    bisect: dict = {}
    if levels[f"{half}/all"].get("ok") is False and passing:
        for name in TRANSFORMERS:
            if report.elapsed() > args.budget:
                bisect[name] = {"skipped": "budget"}
                continue
            r = profiled_prefill(focus[half], args.device, "all", args.out, f"{half}_no_{name}", disabled=(name,))
            bisect[name] = {"ok": r.get("ok"), "error": r.get("error", "")[:300]}
            report.put("disabled_optimizers", bisect)
    report.put("done", {"elapsed_s": round(report.elapsed(), 1)})
    print(json.dumps({k: (v.get("ok") if isinstance(v, dict) else v)
                      for k, v in report.data["phases"].get("generate", {}).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
