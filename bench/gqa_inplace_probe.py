"""Why ``tests/test_kv_buffer.py::test_bf16_buffer_on_cuda_in_place[gqa]`` fails on the CUDA EP:
its one-op GroupQueryAttention graph, rebuilt by hand and varied one condition at a time.

The test (H 4, Hkv 2, d 64, B 2, a 16-row random bf16 buffer, pos 11, scale 0.3, past and present
bound to one memory) failed at max rel 1.50 on an H100 (onnxruntime-gpu 1.31.1), with the new row not
written at ``pos`` and earlier rows changed; whole models with the same lowering and every standalone
graph of ``bench/ort_attention.py`` passed. The hypothesis this probe tests: in the test's graph (T
static 1) ``total_sequence_length`` was computed from ``pos_host`` and constants only (``Where(true,
C, pos_host + 1)``, then ``Max(Min(pos_host + 1, C), C)``). ONNX Runtime's CUDA EP keeps a node on the
host only where it reads the host output of another node (``GetCpuPreferredNodes`` in
onnxruntime/core/framework/fallback_cpu_capability.cc starts from ``Shape`` / ``Size`` outputs; a graph
input does not start anything), so that arithmetic ran on the GPU and reached GroupQueryAttention's
host input 6 through a ``MemcpyToHost`` node, which the kernel read wrong. A model's general step
reads ``T`` from a ``Shape`` (its chain stays on the host); the standalone graphs bound the total as a
graph input. The fix under test: a one-token graph's total is an int32 initializer (``const``).

Variants (``--list``), each one change from ``test_graph`` (the exact failing graph):
``total`` (how total_sequence_length is made: ``minmax_pos_host`` as failing, ``where_pos_host`` the
lowering before it, ``const`` the fix, ``input_host`` / ``input_device`` a graph input (``input_host_identity``: through
an ``Identity``, so copied to the GPU and back by Memcpy nodes with no arithmetic),
``shape_anchored`` the failing chain made to read a ``Shape`` so ORT keeps it on the host,
``minmax_pos_device`` the chain from the device ``pos``), static batch, dynamic T, ``seqlens_k`` from a
constant batch, no unused ``sinks`` input, present bound to separate memory, ``pos`` bound on the host,
no ``torch.cuda.synchronize()`` before the run (as the test ran), ``ORT_ENABLE_XQA=0``, fp16, d 128,
effexport's own lowering (as fixed, and with main's ``_buffer_lengths`` patched back in) and
``bench/ort_attention.py``'s standalone graph.

Per variant, three runs (pos 11, 5, 11; fresh buffers each): ``max_rel`` against the fp32 reference
on the same half-precision data, where the new K row landed (``landing``: rows equal to ``k_new``, per
batch row and KV head), which rows changed, ``rows_before_kept`` / ``rows_after_kept``; the kernel ORT
says it chose (``ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO=1``, its stdout captured); where each node ran
and which Memcpy nodes ORT inserted (session profiling: ``placement``, ``memcpy``). Every exception is
caught and recorded. Results: ``$OUT/gqa_inplace_probe.json`` (``--out``), rewritten after each
variant.

    python bench/gqa_inplace_probe.py                 # CUDA EP (onnxruntime-gpu), < 60 s
    python bench/gqa_inplace_probe.py --device cpu    # CPU EP: fp32 / fp16 variants (no bf16 kernel)
    python bench/gqa_inplace_probe.py --only test_graph,total_const --isolate

``--isolate`` runs each variant in its own process (a sticky CUDA error then spoils one variant only;
slower: each process starts CUDA). Needs numpy, onnx, onnxruntime(-gpu), torch; effexport (the repo's
``effexport`` package) only for the ``exporter_*`` variants.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

H, HKV, C, SCALE, SEED = 4, 2, 16, 0.3, 3
POSITIONS = (11, 5, 11)
FLOAT, FLOAT16, BFLOAT16, INT32, INT64 = 1, 10, 16, 6, 7

BASE = dict(dtype="bf16", d=64, batch=2, batch_dim="dynamic", t_dim="static", seqlens="shape",
            total="minmax_pos_host", sinks_input=True, present="shared", pos_bind="device", sync=True,
            env={}, graph="hand")
"""``test_graph``: the graph tests/test_kv_buffer.py's gpu test built on main (effexport's ``ort``
lowering of ``attention_buffer`` with T static 1), bound as the test binds it (plus a sync)."""

VARIANTS: dict[str, dict] = {
    "test_graph": {},
    "test_graph_nosync": {"sync": False},  # as the test ran: torch's copies unsynchronised with ORT's stream
    "total_const": {"total": "const"},  # the fix: an int32 initializer = C
    "total_where_pos_host": {"total": "where_pos_host"},  # the lowering before main's (also 1.50)
    "total_input_host": {"total": "input_host"},
    "total_input_device": {"total": "input_device"},
    "total_input_host_identity": {"total": "input_host_identity"},  # no arithmetic, still a Memcpy pair
    "total_shape_anchored": {"total": "shape_anchored"},  # failing chain + a Shape read: host placement
    "total_minmax_pos_device": {"total": "minmax_pos_device"},
    "batch_static": {"batch_dim": "static"},
    "t_dynamic": {"t_dim": "dynamic"},
    "seqlens_const": {"seqlens": "const"},
    "no_sinks_input": {"sinks_input": False},
    "present_separate": {"present": "separate"},
    "pos_on_host": {"pos_bind": "host"},
    "no_xqa": {"env": {"ORT_ENABLE_XQA": "0"}},
    "no_xqa_total_const": {"env": {"ORT_ENABLE_XQA": "0"}, "total": "const"},
    "fp16": {"dtype": "fp16"},
    "fp16_total_const": {"dtype": "fp16", "total": "const"},
    "d128": {"d": 128},
    "d128_total_const": {"d": 128, "total": "const"},
    "b1": {"batch": 1},
    "standalone_bench": {"graph": "standalone"},  # bench/ort_attention.py build_gqa: passed on the H100
    # last: torch.export + the lowering take seconds of CPU
    "exporter_main": {"graph": "exporter_main"},  # effexport's lowering, main's _buffer_lengths
    "exporter_fixed": {"graph": "exporter"},  # effexport's lowering as it is (the fix)
}


# --------------------------------------------------------------------------------------- graphs
def _onnx():
    import onnx
    from onnx import helper
    return onnx, helper


class _G:
    def __init__(self):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []

    def node(self, op, inputs, outputs, name, domain=None, **attrs):
        _, helper = _onnx()
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0]

    def init(self, name, elem, dims, values):
        _, helper = _onnx()
        self.inits.append(helper.make_tensor(name, elem, dims, values))
        return name

    def model(self):
        _, helper = _onnx()
        graph = helper.make_graph(self.nodes, "gqa_inplace_probe", self.inputs, self.outputs, self.inits)
        return helper.make_model(graph, ir_version=10, producer_name="gqa_inplace_probe",
                                 opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def build_hand(s: dict):
    """The test's graph as effexport's ``ort`` lowering emitted it on main (node for node), with the
    variant's change."""
    _, helper = _onnx()
    elem = {"bf16": BFLOAT16, "fp16": FLOAT16, "fp32": FLOAT}[s["dtype"]]
    d = s["d"]
    batch = "batch" if s["batch_dim"] == "dynamic" else s["batch"]
    t = "t" if s["t_dim"] == "dynamic" else 1
    g = _G()
    vi = helper.make_tensor_value_info
    g.inputs += [vi("q", elem, [batch, H, t, d]), vi("k_new", elem, [batch, HKV, t, d]),
                 vi("v_new", elem, [batch, HKV, t, d]), vi("k_buf", elem, [batch, HKV, C, d]),
                 vi("v_buf", elem, [batch, HKV, C, d]), vi("pos", INT64, [])]
    if s["total"] in ("minmax_pos_host", "where_pos_host", "shape_anchored"):
        g.inputs.append(vi("pos_host", INT64, []))
    if s["total"] in ("input_host", "input_device", "input_host_identity"):
        g.inputs.append(vi("total", INT32, []))
    if s["sinks_input"]:
        g.inputs.append(vi("sinks", elem, [H]))  # unused, as in the exporter's graph
    # seqlens_k = pos + T - 1 (T = 1), [B] int32, on the device
    if s["seqlens"] == "shape":
        g.node("Add", ["pos", g.init("zero", INT64, [], [0])], ["pos_t"], "seq_add")
        g.node("Reshape", ["pos_t", g.init("one_1d", INT64, [1], [1])], ["pos_1"], "seq_reshape")
        g.node("Shape", ["q"], ["q_batch"], "seq_shape", start=0, end=1)
        g.node("Expand", ["pos_1", "q_batch"], ["seq_b"], "seq_expand")
    else:
        g.node("Reshape", ["pos", g.init("one_1d", INT64, [1], [1])], ["pos_1"], "seq_reshape")
        g.node("Expand", ["pos_1", g.init("b_1d", INT64, [1], [s["batch"]])], ["seq_b"], "seq_expand")
    g.node("Cast", ["seq_b"], ["seqlens_k"], "seq_cast", to=INT32)
    total = s["total"]
    if total in ("minmax_pos_host", "minmax_pos_device", "shape_anchored"):
        src = "pos" if total == "minmax_pos_device" else "pos_host"
        g.init("one", INT64, [], [1])
        g.init("cap", INT64, [], [C])
        if total == "shape_anchored":  # + 0 * batch: a Shape output read, so ORT keeps the chain on the host
            g.node("Shape", ["q"], ["anchor_shape"], "tot_shape", start=0, end=1)
            g.node("Squeeze", ["anchor_shape", g.init("axis0", INT64, [1], [0])], ["anchor_b"], "tot_squeeze")
            g.node("Mul", ["anchor_b", g.init("zero_t", INT64, [], [0])], ["anchor_0"], "tot_mul")
            g.node("Add", [src, "anchor_0"], ["tot_src"], "tot_anchor")
            src = "tot_src"
        g.node("Add", [src, "one"], ["tot_add"], "tot_add")
        g.node("Min", ["tot_add", "cap"], ["tot_min"], "tot_min")
        g.node("Max", ["tot_min", "cap"], ["tot_max"], "tot_max")
        g.node("Cast", ["tot_max"], ["total_seq"], "tot_cast", to=INT32)
    elif total == "where_pos_host":
        g.node("Add", ["pos_host", g.init("one", INT64, [], [1])], ["tot_add"], "tot_add")
        g.node("Where", [g.init("true", 9, [], [True]), g.init("cap", INT64, [], [C]), "tot_add"], ["tot_where"],
               "tot_where")
        g.node("Cast", ["tot_where"], ["total_seq"], "tot_cast", to=INT32)
    elif total == "const":
        g.init("total_seq", INT32, [], [C])
    elif total == "input_host_identity":  # a host input through a CUDA Identity: a Memcpy pair, no arithmetic
        g.node("Identity", ["total"], ["total_seq"], "tot_identity")
    elif total not in ("input_host", "input_device"):
        raise ValueError(total)
    shape3 = g.init("heads_last", INT64, [3], [0, 0, -1])
    for x in ("q", "k_new", "v_new"):
        g.node("Transpose", [x], [f"{x}_t"], f"{x}_transpose", perm=[0, 2, 1, 3])
        g.node("Reshape", [f"{x}_t", shape3], [f"{x}_3d"], f"{x}_reshape")
    total_name = "total" if total in ("input_host", "input_device") else "total_seq"
    g.node("GroupQueryAttention", ["q_3d", "k_new_3d", "v_new_3d", "k_buf", "v_buf", "seqlens_k", total_name],
           ["gqa_out", "k_out", "v_out"], "gqa", domain="com.microsoft", local_window_size=-1, scale=SCALE,
           kv_num_heads=HKV, softcap=0.0, num_heads=H)
    g.node("Reshape", ["gqa_out", g.init("heads_split", INT64, [4], [0, 0, H, d])], ["gqa_4d"], "out_reshape")
    g.node("Transpose", ["gqa_4d"], ["out"], "out_transpose", perm=[0, 2, 1, 3])
    g.outputs += [vi("out", elem, [batch, H, t, d]), vi("k_out", elem, [batch, HKV, C, d]),
                  vi("v_out", elem, [batch, HKV, C, d])]
    return g.model()


def build_standalone(s: dict):
    """bench/ort_attention.py's ``build_gqa`` (static shapes, total a host graph input): the graph
    that passed on the H100."""
    _, helper = _onnx()
    elem = {"bf16": BFLOAT16, "fp16": FLOAT16, "fp32": FLOAT}[s["dtype"]]
    B, d = s["batch"], s["d"]
    g = _G()
    vi = helper.make_tensor_value_info
    g.inputs += [vi("q", elem, [B, H, 1, d]), vi("k_new", elem, [B, HKV, 1, d]), vi("v_new", elem, [B, HKV, 1, d]),
                 vi("k_buf", elem, [B, HKV, C, d]), vi("v_buf", elem, [B, HKV, C, d]), vi("pos", INT64, []),
                 vi("total", INT32, [])]
    g.node("Reshape", ["pos", g.init("one_1d", INT64, [1], [1])], ["pos_1"], "seq_reshape")
    g.node("Expand", ["pos_1", g.init("b_1d", INT64, [1], [B])], ["seq_b"], "seq_expand")
    g.node("Cast", ["seq_b"], ["seqlens_k"], "seq_cast", to=INT32)
    shape3 = g.init("heads_last", INT64, [3], [0, 0, -1])
    for x in ("q", "k_new", "v_new"):
        g.node("Transpose", [x], [f"{x}_t"], f"{x}_transpose", perm=[0, 2, 1, 3])
        g.node("Reshape", [f"{x}_t", shape3], [f"{x}_3d"], f"{x}_reshape")
    g.node("GroupQueryAttention", ["q_3d", "k_new_3d", "v_new_3d", "k_buf", "v_buf", "seqlens_k", "total"],
           ["gqa_out", "k_out", "v_out"], "gqa", domain="com.microsoft", num_heads=H, kv_num_heads=HKV, scale=SCALE)
    g.node("Reshape", ["gqa_out", g.init("heads_split", INT64, [4], [0, 0, H, d])], ["gqa_4d"], "out_reshape")
    g.node("Transpose", ["gqa_4d"], ["out"], "out_transpose", perm=[0, 2, 1, 3])
    g.outputs += [vi("out", elem, [B, H, 1, d]), vi("k_out", elem, [B, HKV, C, d]), vi("v_out", elem, [B, HKV, C, d])]
    return g.model()


def _main_buffer_lengths(pos, t_len, capacity, batch_of):
    """``attention._buffer_lengths`` as on main (03ed934): the failing one-token form."""
    from onnxscript import opset18 as op

    from effexport.exporter.backends.onnx import _build as b
    from effexport.exporter.backends.onnx import attention as A

    seqlens = A._seqlens(b.plus(pos, op.Sub(t_len, b.i64(1))), batch_of)
    if b.known_dim(batch_of, 2) == 1:
        total = op.Max(op.Min(op.Add(pos, t_len), b.i64(capacity)), b.i64(capacity))
    else:
        total = op.Where(op.Equal(t_len, b.i64(1)), b.i64(capacity), op.Add(pos, t_len))
    return seqlens, op.Cast(total, to=6)


def _import_effexport() -> None:
    """``effexport`` installed, or this checkout's folders mapped under that name (setup.py's layout:
    the namespace root in exporter/_root, each top-level folder a sub-package)."""
    try:
        import effexport  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("effexport", os.path.join(root, "exporter", "_root", "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["effexport"] = module
    spec.loader.exec_module(module)


def build_exporter(s: dict, torch, main: bool):
    """effexport's ``ort`` lowering of the test's module (``lower`` as tests/test_kv_buffer.py calls it);
    ``main``: with main's ``_buffer_lengths`` patched in."""
    _import_effexport()
    import effexport.custom_ops  # noqa: F401  (registers the ops)
    from effexport.exporter.backends.onnx import attention as A
    from effexport.exporter.backends.onnx.export import lower

    ops = torch.ops.effexport

    class Buffer(torch.nn.Module):
        def forward(self, q, k_new, v_new, k_buf, v_buf, pos, sinks):
            return ops.attention_buffer(q, k_new, v_new, k_buf, v_buf, pos, None, scale=SCALE, window=0, softcap=0.0)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[s["dtype"]]
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in make_inputs(torch, s["batch"], 11, s["d"]))
    bt = {0: torch.export.Dim("batch")}
    saved = A._buffer_lengths
    if main:
        A._buffer_lengths = _main_buffer_lengths
    try:
        return lower(Buffer(), args, "ort", dynamic_shapes=(bt, bt, bt, bt, bt, None, None))
    finally:
        A._buffer_lengths = saved


# ------------------------------------------------------------------------------------ running
def make_inputs(torch, batch: int, pos: int, d: int):
    """tests/test_kv_buffer.py's ``_inputs(batch, 1, pos, seed=3, d)``: q, k_new, v_new, k_buf, v_buf, pos, sinks."""
    g = torch.Generator().manual_seed(SEED)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return (r(batch, H, 1, d), r(batch, HKV, 1, d), r(batch, HKV, 1, d), r(batch, HKV, C, d), r(batch, HKV, C, d),
            torch.tensor(pos), r(H))


def reference(torch, q, k_new, v_new, k_buf, v_buf, pos: int):
    """fp32 attention of q over [buffer rows < pos | the new row] (the eager op's result)."""
    keys = torch.cat([k_buf[:, :, :pos].float(), k_new.float()], dim=2)
    values = torch.cat([v_buf[:, :, :pos].float(), v_new.float()], dim=2)
    rep = H // HKV
    keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    scores = q.float() @ keys.transpose(-1, -2) * SCALE
    return torch.softmax(scores, dim=-1) @ values


# the environment and fd-1 capture helpers of the attention bench (bench/ is a script folder)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ort_attention import captured_stdout as captured_fd1  # noqa: E402
from ort_attention import environment  # noqa: E402


def environ(values: dict):
    """:func:`ort_attention.environment` with values of any type (written as strings)."""
    return environment({k: str(v) for k, v in values.items()})


def _elem(torch, dtype):
    return {torch.float32: FLOAT, torch.float16: FLOAT16, torch.bfloat16: BFLOAT16, torch.int64: INT64,
            torch.int32: INT32}[dtype]


def bind(torch, fn, name, tensor):
    assert tensor.is_contiguous(), name
    fn(name, tensor.device.type, tensor.device.index or 0, _elem(torch, tensor.dtype), list(tensor.shape),
       tensor.data_ptr())


def placement_from_profile(path: str) -> dict:
    """Provider of each node that ran (ORT's profile), the Memcpy nodes among them."""
    with open(path) as f:
        events = json.load(f)
    nodes = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args:
            name = e.get("name", "").removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix(
                "_fence_after")
            nodes[name] = f"{args.get('op_name')}@{args['provider'].replace('ExecutionProvider', '')}"
    return {"placement": nodes, "memcpy": sorted(n for n, v in nodes.items() if v.startswith("Memcpy"))}


def run_variant(name: str, spec: dict, device: str, ort, torch, tmp: str) -> dict:
    s = {**BASE, **spec}
    cuda = device == "cuda"
    if not cuda:
        if s["dtype"] == "bf16":
            s["dtype"] = "fp32"  # ORT's CPU GroupQueryAttention: float / float16 kernels
        if s["pos_bind"] == "device" or s["total"] == "input_device":
            s["pos_bind"] = "host"
            if s["total"] == "input_device":
                return {"variant": name, "skipped": "CPU EP: every input is on the host"}
        s["env"] = {}
    res: dict = {"variant": name, "spec": {k: v for k, v in s.items()}}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[s["dtype"]]
    if s["graph"] == "hand":
        model = build_hand(s)
    elif s["graph"] == "standalone":
        model = build_standalone(s)
    else:
        model = build_exporter(s, torch, main=s["graph"] == "exporter_main")
    res["graph"] = {"inputs": [i.name for i in model.graph.input], "nodes": [n.op_type for n in model.graph.node],
                    "gqa_inputs": next(list(n.input) for n in model.graph.node if n.op_type == "GroupQueryAttention"),
                    "initializers": {t.name: _onnx()[0].numpy_helper.to_array(t).tolist()
                                     for t in model.graph.initializer if t.data_type in (INT32, INT64, 9)}}
    try:  # effexport's offline simulation of the CUDA EP's partitioning, to set against ``memcpy`` below
        if not cuda:
            raise RuntimeError("CUDA EP only")
        _import_effexport()
        from effexport.exporter.backends.onnx.cuda_kernels import memcpy_edges
        res["predicted_memcpy"] = [str(e) for e in memcpy_edges(model)]
    except Exception as e:  # noqa: BLE001
        res["predicted_memcpy_error"] = f"{type(e).__name__}: {e}"[:300]
    env = {"ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO": "1", **s["env"]}
    with environ(env):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, name)
        providers = [("CUDAExecutionProvider", {}), "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        res["providers"] = session.get_providers()
        runs = []
        for k, pos in enumerate(POSITIONS):
            runs.append(_one_run(torch, session, s, dtype, device, pos))
            if k == 0:
                try:
                    res.update(placement_from_profile(session.end_profiling()))
                except Exception as e:  # noqa: BLE001
                    res["placement_error"] = repr(e)
    res["runs"] = runs
    tol = 1e-4 if s["dtype"] == "fp32" else 2e-2
    res["passed"] = all(r.get("max_rel", math.inf) < tol and r.get("row_written") and r.get("rows_before_kept")
                        for r in runs)
    return res


def _one_run(torch, session, s: dict, dtype, device: str, pos: int) -> dict:
    run: dict = {"pos": pos}
    try:
        q, k_new, v_new, k_buf, v_buf, _, sinks = (a.to(dtype) if a.is_floating_point() else a
                                                   for a in make_inputs(torch, s["batch"], pos, s["d"]))
        want = reference(torch, q, k_new, v_new, k_buf, v_buf, pos)
        dev = {n: t.to(device).contiguous() for n, t in
               dict(q=q, k_new=k_new, v_new=v_new, k_buf=k_buf, v_buf=v_buf, sinks=sinks).items()}
        pos_dev = torch.tensor(pos, dtype=torch.int64, device=device if s["pos_bind"] == "device" else "cpu")
        host_pos = torch.tensor(pos, dtype=torch.int64)  # pos_host: alive until the run ends
        total_value = torch.tensor(C, dtype=torch.int32, device="cpu" if s["total"] != "input_device" else device)
        feeds = {**dev, "pos": pos_dev, "pos_host": host_pos, "total": total_value}
        out = torch.full((s["batch"], H, 1, s["d"]), float("nan"), dtype=dtype, device=device)
        if not s["sync"]:  # as the test: clones on torch's stream, launched just before ORT's run
            dev["k_buf"], dev["v_buf"] = dev["k_buf"].clone(), dev["v_buf"].clone()
            feeds.update(k_buf=dev["k_buf"], v_buf=dev["v_buf"])
        if s["present"] == "shared":
            k_present, v_present = dev["k_buf"], dev["v_buf"]
        else:
            k_present, v_present = torch.zeros_like(dev["k_buf"]), torch.zeros_like(dev["v_buf"])
        binding = session.io_binding()
        for meta in session.get_inputs():
            bind(torch, binding.bind_input, meta.name, feeds[meta.name])
        for meta, buf in zip(session.get_outputs(), (out, k_present, v_present)):
            bind(torch, binding.bind_output, meta.name, buf)
        if s["sync"] and device == "cuda":
            torch.cuda.synchronize()
        printed: list = []
        with captured_fd1(printed):
            session.run_with_iobinding(binding)
            if device == "cuda":
                torch.cuda.synchronize()
        info = " ".join(line for line in printed[0].splitlines() if "Operator=" in line or "SdpaKernel" in line)
        if info:
            run["kernel_info"] = " ".join(info.replace("\x1b[36m", "").replace("\x1b[0m", "").split())[:300]
        got = out.float().cpu()
        run["out_finite"] = bool(torch.isfinite(got).all())
        run["max_rel"] = float((got - want).abs().max() / want.abs().max()) if run["out_finite"] else math.inf
        k_after = k_present.cpu()
        run["landing"] = [[[r for r in range(C) if torch.equal(k_after[b, h, r], k_new[b, h, 0])]
                           for h in range(HKV)] for b in range(s["batch"])]
        run["row_written"] = bool(torch.equal(k_after[:, :, pos], k_new[:, :, 0])
                                  and torch.equal(v_present.cpu()[:, :, pos], v_new[:, :, 0]))
        run["rows_before_kept"] = bool(torch.equal(k_after[:, :, :pos], k_buf[:, :, :pos]))
        if s["present"] == "shared":
            run["rows_after_kept"] = bool(torch.equal(k_after[:, :, pos + 1:], k_buf[:, :, pos + 1:]))
            run["rows_changed"] = [r for r in range(C) if not torch.equal(k_after[:, :, r], k_buf[:, :, r])]
        if not run["out_finite"] or run["max_rel"] > 2e-2:
            # what the output is closest to: attention over the first n rows (n = 1..C) of the buffer as it
            # is after the run, i.e. which key count the kernel used
            v_after = v_present.cpu()
            errs = []
            for n in range(1, C + 1):
                ref = reference(torch, q, k_after[:, :, n - 1:n], v_after[:, :, n - 1:n], k_after, v_after, n - 1)
                errs.append(float((got - ref).abs().max() / ref.abs().max()))
            run["best_key_count"] = int(np.argmin(errs)) + 1
            run["best_key_count_rel"] = min(errs)
        del binding
    except Exception as e:  # noqa: BLE001
        run["error"] = f"{type(e).__name__}: {e}"[:2000]
        run["traceback"] = traceback.format_exc()[-3000:]
    return run


# ----------------------------------------------------------------------------------------- main
def meta(ort, torch, device: str) -> dict:
    m = {"onnxruntime": ort.__version__, "torch": torch.__version__, "python": platform.python_version(),
         "providers": ort.get_available_providers(), "device": device}
    if device == "cuda":
        try:
            m["gpu"] = torch.cuda.get_device_name()
            m["capability"] = list(torch.cuda.get_device_capability())
            m["torch_cuda"] = torch.version.cuda
        except Exception as e:  # noqa: BLE001
            m["gpu_error"] = f"{type(e).__name__}: {e}"
    return m


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of gqa_inplace_probe.json (default $OUT)")
    p.add_argument("--only", default="", help="comma-separated variant names")
    p.add_argument("--budget-s", type=float, default=55.0, help="variants left when it is spent are skipped")
    p.add_argument("--isolate", action="store_true", help="one process per variant")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _write(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def _summary(r: dict) -> str:
    if "skipped" in r or "error" in r:
        return f"{r['variant']:26s} {r.get('skipped') or r.get('error', '')[:90]}"
    runs = r.get("runs", [])
    cols = []
    for run in runs:
        if "error" in run:
            cols.append("ERR " + run["error"][:40])
            continue
        cols.append(f"pos {run['pos']:2d} rel {run['max_rel']:.2e} row {'ok' if run['row_written'] else 'NO'}"
                    f"{'' if run['rows_before_kept'] else ' before-changed'}")
    memcpy = ",".join(r.get("placement", {}).get(m, m) for m in r.get("memcpy", []))
    return f"{r['variant']:26s} {'PASS' if r.get('passed') else 'FAIL'} | " + " | ".join(cols) + (
        f" | memcpy: {memcpy}" if memcpy else "")


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore")  # torch.export's, in the exporter_* variants
    if args.list:
        for name, spec in VARIANTS.items():
            print(f"{name:26s} {spec}")
        return 0
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variants: {unknown} (--list)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    if args.worker:  # one variant, one process: its record as JSON on the last stdout line
        return _worker(args)
    start = time.monotonic()
    path = os.path.join(args.out, "gqa_inplace_probe.json")
    doc: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv, "results": []}
    if not args.isolate:
        import torch  # before onnxruntime: torch's CUDA libraries first

        import onnxruntime as ort
        if args.device == "cuda" and hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):
                ort.preload_dlls()
        doc["meta"] = meta(ort, torch, args.device)
        if args.device == "cuda" and ("CUDAExecutionProvider" not in ort.get_available_providers()
                                      or not torch.cuda.is_available()):
            doc["error"] = ("no CUDAExecutionProvider (onnxruntime-gpu?) or no CUDA torch; "
                            "--device cpu for the CPU EP")
            _write(path, doc)
            print(doc["error"], file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if time.monotonic() - start > args.budget_s:
                doc["results"].append({"variant": name, "skipped": f"budget ({args.budget_s:.0f} s) spent"})
            elif args.isolate:
                doc["results"].append(_isolated(args, name))
            else:
                t0 = time.monotonic()
                try:
                    r = run_variant(name, VARIANTS[name], args.device, ort, torch, tmp)
                except Exception as e:  # noqa: BLE001
                    r = {"variant": name, "error": f"{type(e).__name__}: {e}"[:2000],
                         "traceback": traceback.format_exc()[-3000:]}
                r["seconds"] = round(time.monotonic() - t0, 2)
                doc["results"].append(r)
            print(_summary(doc["results"][-1]), flush=True)
            doc["elapsed_s"] = round(time.monotonic() - start, 1)
            _write(path, doc)
    ran = {r["variant"]: r for r in doc["results"]}
    if "graph" in ran.get("test_graph", {}) and "graph" in ran.get("exporter_main", {}):
        # the hand-built test_graph is the exporter's graph on main, node for node
        doc["replica_matches_exporter_main"] = ran["test_graph"]["graph"]["nodes"] == ran["exporter_main"]["graph"]["nodes"]
        _write(path, doc)
    print(f"wrote {path} ({doc['elapsed_s']} s)")
    return 0


def _isolated(args, name: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--out", args.out, "--worker", name]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return json.loads(p.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        return {"variant": name, "error": f"worker: {type(e).__name__}: {e}"[:1000]}


def _worker(args) -> int:
    import torch

    import onnxruntime as ort
    if args.device == "cuda" and hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            r = run_variant(args.worker, VARIANTS[args.worker], args.device, ort, torch, tmp)
        except Exception as e:  # noqa: BLE001
            r = {"variant": args.worker, "error": f"{type(e).__name__}: {e}"[:2000],
                 "traceback": traceback.format_exc()[-3000:]}
    r["seconds"] = round(time.monotonic() - t0, 2)
    r["meta"] = meta(ort, torch, args.device)
    print(json.dumps(r, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
