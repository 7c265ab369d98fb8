"""TensorRT backend without TensorRT: route coverage of every effexport op, the plugin interfaces
derived from the schemas, the plugin kernel adapter against the eager ops, argument binding by
schema name, the optimization profiles, the ``tensorrt`` ONNX profile's lint (negative cases on
hand-built models; the plugin variant of CCA / indexer / sparse attention / mHC on an op-level
export), and the CLI (exit 4, nothing written, ``effexport list``).

Tests marked ``tensorrt`` build engines and run them; they are skipped with a reason where
TensorRT is not installed (every machine of this project). Whole-model lint and ONNX Runtime
parity of the profile: tests/test_tensorrt_profile.py.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import effexport.custom_ops as custom_ops
from effexport.exporter.cli import main
from effexport.exporter.backends.onnx import tensorrt_profile as tp
from effexport.exporter.backends.tensorrt import converters, engine, specs
from effexport.exporter.backends.tensorrt.plugins import call_kernel

ops = torch.ops.effexport
MODEL = "gemma4-e2b:tiny"


# ------------------------------------------------------------------------------ coverage / specs
def test_every_op_has_a_converter_or_plugin():
    """Every op in ALL_OPS has a route; layer routes have a converter, plugin routes a spec."""
    routes = specs.route_table()
    assert set(routes) == set(custom_ops.ALL_OPS)
    layers = {op for op, r in routes.items() if r == "layers"}
    assert {op._schema.name.split("::")[-1] for op in layers} == set(converters._LAYERS)
    assert set(specs.plugin_specs()) == {op for op, r in routes.items() if r == "plugin"}
    assert {op._schema.name.split("::")[-1] for op in layers} == {
        "attention", "attention_cache", "attention_ring", "attention_read", "attention_buffer"}


def test_plugin_specs_follow_the_schemas():
    """Tensor inputs in schema order, optional ones flagged, fields int32/float32 as the parser makes them."""
    by_name = {s.name: s for s in specs.plugin_specs().values()}
    cca = by_name["cca"]
    assert cca.tensors[:2] == ("q_down", "k_down") and cca.optional == ("conv0_bias", "conv1_bias")
    assert cca.fields == (("has_conv0_bias", "int32"), ("has_conv1_bias", "int32")) and cca.num_outputs == 5
    assert by_name["kv_compress_step"].fields == (("ratio", "int32"), ("overlap", "int32"), ("eps", "float32"),
                                                  ("rope_dim", "int32"))
    assert by_name["sparse_attention_ring"].field_names == ("scale", "window", "ratio", "has_idx")
    assert by_name["mhc_pre"].num_outputs == 3 and by_name["mhc_post"].fields == ()


def test_plugin_kernel_adapter_matches_the_ops():
    """``call_kernel`` (the plugin's kernel and shape function) maps fields and has_* back to the op call."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    spec = specs.plugin_spec(ops.sparse_attention_ring.default)
    q, kv, comp, sink, pos = r(1, 2, 4, 8), r(1, 6, 8), r(1, 5, 8), r(4), torch.tensor(7)
    got = call_kernel(spec, [q, kv, comp, specs.placeholder(), sink, pos],
                      {"scale": 0.3, "window": 4, "ratio": 4, "has_idx": 0})
    ref = ops.sparse_attention_ring(q, kv, comp, None, sink, pos, scale=0.3, window=4, ratio=4)
    assert torch.equal(got[0], ref)
    spec = specs.plugin_spec(ops.mhc_pre.default)
    x, fn, base, scale = r(2, 3, 4, 8), r(24, 32) * 0.1, r(24), torch.rand(3, generator=g)
    got = call_kernel(spec, [x, fn, base, scale], {"iters": 5, "eps": 1e-6, "norm_eps": 1e-6})
    for a, b in zip(got, ops.mhc_pre(x, fn, base, scale, iters=5, eps=1e-6, norm_eps=1e-6)):
        assert torch.equal(a, b)


def test_bind_reads_arguments_by_schema_name():
    op = ops.attention_read.default
    bound = converters.bind(op, ("q", "k", "v", "pos"), {"scale": 0.5, "ring": True, "window": 4})
    assert bound == {"q": "q", "k_cache": "k", "v_cache": "v", "pos": "pos", "sinks": None, "scale": 0.5,
                     "window": 4, "softcap": 0.0, "ring": True}
    with pytest.raises(TypeError, match="scale"):
        converters.bind(op, ("q", "k", "v", "pos"), {})


def test_shape_profiles_cover_prefill_and_decode(rewritten):
    plan = rewritten(MODEL).analysis.plan
    shapes, values = engine.shape_profiles(plan, max_batch=4, max_context=256)
    assert shapes["input_ids"] == ((1, 1), (1, 1), (4, 256)) and shapes["pos"] == ((), (), ())
    assert values["pos"] == ((0,), (128,), (255,))
    assert set(shapes) == {"input_ids", "pos", *(f"past.{e.name}" for e in plan.entries)}
    for e in plan.entries:
        lo, opt, hi = shapes[f"past.{e.name}"]
        assert lo[0] == 1 and hi[0] == 4
        if "seq" in e.shape:  # full caches grow 0 .. max_context; rings and states are static
            i = e.shape.index("seq")
            assert (lo[i], opt[i], hi[i]) == (0, 128, 256)
        else:
            assert lo[1:] == opt[1:] == hi[1:]
    with pytest.raises(ValueError):
        engine.shape_profiles(plan, max_batch=2, opt_batch=3)


# ---------------------------------------------------------------------------------------- lint
def _model(nodes, inputs, outputs, opset=18, initializers=(), functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))
    model.ir_version = 10
    return model


def _f(name, *shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def test_lint_accepts_a_clean_graph():
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
             helper.make_node("Softmax", ["s"], ["y"], axis=-1)]
    assert tp.lint(_model(nodes, [_f("x", 2, 3)], [_f("y", 2, 1)], initializers=[axes])) == []


@pytest.mark.parametrize("case", ["contrib", "dynamic_axes", "topk_unsorted", "opset", "double", "unknown_op"])
def test_lint_rejects(case):
    """One construct the TensorRT parser rejects per case, each named in the problems."""
    x, y = [_f("x", 2, 3)], [_f("y", 2, 3)]
    if case == "contrib":
        model = _model([helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], x, y)
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        want = "com.microsoft::Gelu"
    elif case == "dynamic_axes":
        nodes = [helper.make_node("Shape", ["x"], ["a"], start=0, end=1),
                 helper.make_node("Sub", ["a", "a"], ["axes"]),
                 helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)]
        model, want = _model(nodes, x, [_f("y", 1, 3)]), "must be a build-time constant"
    elif case == "topk_unsorted":
        k = helper.make_tensor("k", TensorProto.INT64, [1], [2])
        model = _model([helper.make_node("TopK", ["x", "k"], ["y", "i"], sorted=0)], x,
                       [_f("y", 2, 2), _f("i", 2, 2, dtype=TensorProto.INT64)], initializers=[k])
        want = "sorted=1"
    elif case == "opset":
        model, want = _model([helper.make_node("Relu", ["x"], ["y"])], x, y, opset=23), "opset 23"
    elif case == "double":
        model = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)], x,
                       [_f("y", 2, 3, dtype=TensorProto.DOUBLE)])
        want = "DOUBLE"
    else:
        model, want = _model([helper.make_node("Det", ["x"], ["y"])], [_f("x", 3, 3)], [_f("y")]), "Det is not"
    problems = tp.lint(model)
    assert any(want in p for p in problems), problems


def test_make_parser_safe_gives_functions_unique_names():
    """Two overloads of one function and a function named like a built-in get distinct, safe names."""
    def fn(name, overload):
        f = helper.make_function("effexport", name, ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                 [helper.make_opsetid("", 18)])
        f.overload = overload
        return f
    nodes = [helper.make_node("cca", ["x"], ["m"], domain="effexport", overload="o1"),
             helper.make_node("cca", ["m"], ["n"], domain="effexport", overload="o2"),
             helper.make_node("Relu", ["n"], ["y"], domain="effexport")]
    model = _model(nodes, [_f("x", 2)], [_f("y", 2)], functions=[fn("cca", "o1"), fn("cca", "o2"), fn("Relu", "")])
    model.opset_import.append(helper.make_opsetid("effexport", 1))
    assert any("share a name" in p for p in tp.lint(model))
    tp.make_parser_safe(model)
    names = [f.name for f in model.functions]
    assert len(set(names)) == 3 and "Relu" not in names and all(not f.overload for f in model.functions)
    assert [n.op_type for n in model.graph.node] == names
    assert tp.lint(model) == []


class _AllOps(torch.nn.Module):
    """Every op family side by side, built from the ONNX op tests' modules: CCA, mHC (pre, post,
    head, sinkhorn), indexer, ring sparse attention (CSA / HCA / window only), the compressor step,
    and the attention forms (ring with sinks + softcap, ring read, windowed cache, causal prefill)."""

    def __init__(self, base, extra):
        super().__init__()
        self.cca, self.mhc, self.idx = extra._Cca(), base._Mhc(), extra._Indexer()
        self.sparse, self.compress = extra._Sparse(True), extra._Compress(True)
        self.attn = torch.nn.ModuleList([base._Attn("ring", 0, 30.0, True), base._Attn("read", 0, 0.0, False, ring=True),
                                         base._Attn("cache", base.W, 0.0, True), base._Attn("attention", 0, 0.0, False)])

    def forward(self, cca_args, mhc_args, idx_args, sparse_args, compress_args, attn_args):
        outs = (*self.cca(*cca_args), *self.mhc(*mhc_args), self.idx(*idx_args), *self.sparse(*sparse_args),
                *self.compress(*compress_args))
        for attn in self.attn:
            out = attn(*attn_args)
            outs += tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return outs


@pytest.fixture(scope="module")
def op_level():
    """(eager module, args, {variant: ModelProto}) -- one op-level export per variant."""
    sys.path.insert(0, os.path.dirname(__file__))
    import test_onnx_ops as base  # noqa: E402  (the op-level modules and inputs of the ONNX tests)
    import test_onnx_ops_extra as extra  # noqa: E402

    from effexport.exporter.backends.onnx.export import lower

    module = _AllOps(base, extra).eval().float()  # the compressor test module keeps inv_freq in fp64
    args = (extra._cca_inputs(2, 3, 0, 0), base._mhc_inputs(2, 3), extra._indexer_inputs(2, 3, 5, 4, 0),
            extra._sparse_inputs(2, 2, extra.SLOTS, 5, 7, 0), (*extra._tokens(2, 3, 0), *extra._empty(2), torch.tensor(5)),
            base._inputs(2, 1, base.W, 6))  # one query: a ring read is exact for T = 1
    models = {v: lower(module, args, v) for v in ("tensorrt", "tensorrt-plugins")}
    tp.make_parser_safe(models["tensorrt"])
    return module, args, models


def test_default_variant_lint_and_ort_parity(op_level):
    """Function-bodied nodes with unique names, lint clean, and ORT equals the eager ops (fp32)."""
    import onnxruntime as ort
    from _helpers import assert_close

    module, args, models = op_level
    model = models["tensorrt"]
    assert tp.lint(model) == []
    names = [f.name for f in model.functions]
    assert len(names) == len(set(names)) and not set(names) & set(tp.SUPPORTED_OPS)
    feeds = [t for group in args for t in group]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(model.graph.input, feeds) if i.name in wanted})
    with torch.no_grad():
        ref = module(*args)
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        g = torch.from_numpy(g)
        if r.dtype == torch.int64:
            assert torch.equal(g, r), f"output {i}"
            continue
        finite = torch.isfinite(r)  # compressor states hold -inf pads: those must match exactly
        assert torch.equal(g[~finite], r[~finite]), f"output {i}: non-finite entries differ"
        assert_close(g[finite], r[finite], rtol=1e-4, what=f"output {i}")


def test_plugin_variant_nodes_carry_the_plugin_fields(op_level):
    """``tensorrt-plugins``: one plugin node per call of an op with no parser equivalent, with
    plugin_version / plugin_namespace and the spec's fields; attention stays layers; lint clean."""
    model = op_level[2]["tensorrt-plugins"]
    plugin_nodes = [n for n in model.graph.node if n.domain == tp.PLUGIN_DOMAIN]
    assert sorted(n.op_type for n in plugin_nodes) == sorted(
        ["cca", "mhc_pre", "mhc_post", "mhc_head", "sinkhorn", "indexer_topk"] + ["sparse_attention_ring"] * 3
        + ["kv_compress_step"] * 2)
    assert not model.functions and tp.lint(model, plugins=True) == []
    ring = [n for n in plugin_nodes if n.op_type == "sparse_attention_ring"]
    fields = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in ring]
    assert sorted((f["has_idx"], f["ratio"]) for f in fields) == [(0, 0), (0, 4), (1, 4)]
    assert all(f["plugin_namespace"] == b"effexport" and f["plugin_version"] == b"1" for f in fields)
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    next(n for n in bad.graph.node if n.op_type == "cca").attribute.pop()
    assert any("plugin field" in p or "must be" in p for p in tp.lint(bad, plugins=True))


# ----------------------------------------------------------------------------------------- CLI
def test_tensorrt_target_without_tensorrt(tmp_path, capsys):
    """Exit 4, one line naming the fix, nothing written, no traceback."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the missing-backend path cannot be exercised")
    assert main([MODEL, "--target", "tensorrt", "-o", str(tmp_path / "t")]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TensorRT is not installed" in err and "pip install 'effexport[tensorrt]'" in err
    assert "Traceback" not in err and os.listdir(tmp_path) == []


def test_list_shows_targets_and_why_unavailable(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[out.splitlines().index("targets (--target):") + 1:]}
    assert "available" in lines["onnx"] and "unavailable" not in lines["onnx"]
    if importlib.util.find_spec("tensorrt") is None:
        assert "unavailable: TensorRT is not installed" in lines["tensorrt"]


# ------------------------------------------------------------------ where TensorRT is installed
@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma4-e2b:tiny", "gemma4-e4b:tiny", "laguna-xs2:tiny", "zaya1-8b:tiny",
                                  "deepseek-v4-flash:tiny"])
def test_engine_build_and_parity(name, tmp_path, capsys):
    """``effexport MODEL --target tensorrt``: engine + effexport.json + report.json, parity passed."""
    assert main([name, "--target", "tensorrt", "-o", str(tmp_path / "a"), "--steps", "8"]) == 0
    assert {"model.engine", "model.onnx", "effexport.json", "report.json"} <= set(os.listdir(tmp_path / "a"))
    assert "PARITY PASSED" in capsys.readouterr().err


@pytest.mark.tensorrt
def test_plugins_register_and_converters_cover_every_op():
    from effexport.exporter.backends.tensorrt.plugins import register_plugins

    assert len(register_plugins()) == len(specs.plugin_specs())
    pytest.importorskip("torch_tensorrt")
    assert set(converters.register_converters()) == set(custom_ops.ALL_OPS)


LAZY_IMPORTS = """
import sys
import effexport.exporter.backends.tensorrt.specs, effexport.exporter.backends.tensorrt.converters
import effexport.exporter.backends.tensorrt.plugins, effexport.exporter.backends.tensorrt.engine
import effexport.exporter.backends.tensorrt.runtime, effexport.exporter.backends.onnx.tensorrt_profile
heavy = {"tensorrt", "torch_tensorrt", "tensorrt.plugin"}
assert not heavy & set(sys.modules), sorted(heavy & set(sys.modules))
print("lazy")
"""


def test_imports_are_lazy():
    """Importing the backend (specs, converters, plugins, engine, runtime, the ONNX profile) loads
    neither tensorrt nor torch_tensorrt. Checked in a fresh interpreter: this test process may already
    have imported them for other tests (the TensorRT tests on a GPU machine)."""
    proc = subprocess.run([sys.executable, "-c", LAZY_IMPORTS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "lazy", proc.stderr[-2000:]
