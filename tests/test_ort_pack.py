"""Packed Q/K/V into ONNX Runtime's GroupQueryAttention (exporter/backends/onnx/ort_pack.py): the three
projections of an attention become one ``MatMul`` whose output is GQA's packed query, key and value
absent. Checked on ONNX Runtime's CPU EP with tiny Hugging Face models built by the CLI (``ort``
profile, ``--kv-cache buffer``): the structure (which attentions are packed, the packed weight, two
``MatMul`` nodes fewer per attention), the same logits as the unpacked build, and the per-head Q / K
norm models (Qwen3) packed only where the norms moved into the attention (half precision), with the
build's structure check against its unpacked fp32 twin passing."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models import hf_tiny

GQA = "GroupQueryAttention"


def _cli(src, out, *extra, pack: bool = True) -> None:
    from effexport.exporter.cli import main

    old = os.environ.get("EFFEXPORT_ORT_PACK_QKV")
    os.environ["EFFEXPORT_ORT_PACK_QKV"] = "1" if pack else "0"
    try:
        assert main([str(src), "--target", "onnx", "--kv-cache", "buffer", "-o", str(out), *extra]) == 0
    finally:
        if old is None:
            os.environ.pop("EFFEXPORT_ORT_PACK_QKV")
        else:
            os.environ["EFFEXPORT_ORT_PACK_QKV"] = old


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Llama (no Q/K norms) fp32 packed and unpacked; Qwen3 (per-head Q/K norms) fp32 and bf16."""
    root = tmp_path_factory.mktemp("pack")
    for family in ("llama", "qwen3"):
        hf_tiny.build(family).save_pretrained(root / family)
    out = {"llama": root / "llama-packed", "llama_unpacked": root / "llama-unpacked",
           "qwen3": root / "qwen3-fp32", "qwen3_bf16": root / "qwen3-bf16"}
    _cli(root / "llama", out["llama"])
    _cli(root / "llama", out["llama_unpacked"], pack=False)
    _cli(root / "qwen3", out["qwen3"])
    _cli(root / "qwen3", out["qwen3_bf16"], "--dtype", "bf16")
    return out


def _model(directory) -> onnx.ModelProto:
    return onnx.load(str(directory / "model.onnx"), load_external_data=False)


def _count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def _packed(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == GQA and not n.input[1] and not n.input[2]]


def test_every_llama_attention_reads_one_packed_projection(built):
    packed, plain = _model(built["llama"]), _model(built["llama_unpacked"])
    attentions = [n for n in packed.graph.node if n.op_type == GQA]
    assert len(attentions) == 2 and _packed(packed) == attentions and _packed(plain) == []
    assert _count(packed, "MatMul") == _count(plain, "MatMul") - 2 * len(attentions)
    producers = {o: n for n in packed.graph.node for o in n.output}
    shapes = {i.name: list(i.dims) for i in packed.graph.initializer}
    cfg = hf_tiny.FAMILIES["llama"][2]
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    for node in attentions:
        matmul = producers[node.input[0]]
        assert matmul.op_type == "MatMul" and matmul.input[1].endswith(".qkv")
        assert shapes[matmul.input[1]] == [cfg["hidden_size"],
                                           (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * d]
    for directory in (built["llama"], built["llama_unpacked"]):
        assert json.loads((directory / "report.json").read_text())["parity"]["passed"]


def test_packed_and_unpacked_builds_give_the_same_logits(built):
    from effexport.exporter.backends.onnx.runtime import OrtRuntime

    ids = np.random.RandomState(11).randint(0, 128, (2, 7))
    tokens_a, logits_a = OrtRuntime(str(built["llama"])).generate(ids, 6)
    tokens_b, logits_b = OrtRuntime(str(built["llama_unpacked"])).generate(ids, 6)
    assert np.array_equal(tokens_a, tokens_b)
    for a, b in zip(logits_a, logits_b):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()


def test_qk_norm_models_pack_where_the_norms_moved_into_the_attention(built):
    """fp32: the per-head norms stay between the projections and the attention (ONNX Runtime's CPU
    attention takes no norm weights), so nothing is packed; bf16: the norms go into the attention
    (``q_norm_weight``) and the projections are packed -- and the build's own structure check against
    its fp32 twin passed (a packed attention counts as the two MatMul nodes it saved)."""
    from effexport.exporter.backends.onnx.ort_cuda import Q_NORM

    fp32, bf16 = _model(built["qwen3"]), _model(built["qwen3_bf16"])
    assert _count(fp32, GQA) == 2 and _packed(fp32) == []
    assert len(_packed(bf16)) == 2 and all(n.input[Q_NORM] for n in _packed(bf16))
    report = json.loads((built["qwen3_bf16"] / "report.json").read_text())
    assert report["parity"]["passed"] and "twin" in report["parity"]["mode"]


def test_structure_check_counts_a_packed_attention_as_its_three_projections(built):
    from effexport.exporter.verify.parity import compare_structure

    packed, plain = str(built["llama"] / "model.onnx"), str(built["llama_unpacked"] / "model.onnx")
    assert compare_structure(packed, plain) == ""
    assert compare_structure(str(built["qwen3"] / "model.onnx"), plain) != ""  # the check still sees differences


def test_a_projection_read_elsewhere_keeps_its_attention_unpacked(built):
    from effexport.exporter.backends.onnx.ort_pack import pack_qkv_into_attention

    model = ir.from_proto(onnx.load(str(built["llama_unpacked"] / "model.onnx")))
    first = next(n for n in model.graph if n.op_type == GQA)
    model.graph.outputs.append(first.inputs[1])  # the first attention's key projection, also an output
    assert pack_qkv_into_attention(model) == 1
    assert first.inputs[1] is not None and first.inputs[1].producer().op_type == "MatMul"


def test_two_attentions_sharing_a_query_weight_get_their_own_packed_weights():
    """The packed weight is one per distinct (query, key, value) triple: two attentions that share the
    query weight but not the key / value get two packed initializers, each the concatenation of its own."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    from effexport.exporter.backends.onnx.ort_pack import pack_qkv_into_attention

    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal((8, w)).astype(np.float32) for n, w in
               (("wq", 8), ("wk1", 4), ("wv1", 4), ("wk2", 4), ("wv2", 4))}
    nodes, outputs = [], []
    for i in (1, 2):
        nodes += [h.make_node("MatMul", ["x", w], [f"{w}_{i}"]) for w in ("wq", f"wk{i}", f"wv{i}")]
        nodes.append(h.make_node("GroupQueryAttention", [f"wq_{i}", f"wk{i}_{i}", f"wv{i}_{i}"], [f"y{i}"],
                                 domain="com.microsoft", num_heads=2, kv_num_heads=1))
        outputs.append(h.make_tensor_value_info(f"y{i}", TP.FLOAT, None))
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 1, 8])], outputs,
                         [onnx.numpy_helper.from_array(a, n) for n, a in weights.items()])
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)]))
    assert pack_qkv_into_attention(model) == 2
    packed = [n.inputs[0].producer().inputs[1] for n in model.graph if n.op_type == GQA]
    assert packed[0] is not packed[1]
    for value, i in zip(packed, (1, 2)):
        want = np.concatenate([weights["wq"], weights[f"wk{i}"], weights[f"wv{i}"]], axis=1)
        assert np.array_equal(value.const_value.numpy(), want)
    assert sum(n.op_type == "MatMul" for n in model.graph) == 2


@pytest.mark.parametrize("stream", [False, True], ids=["loaded", "streamed"])
def test_one_kv_head_attention_takes_its_rotation_norms_and_packed_projection(tmp_path, stream):
    """Gemma 3 1B has one KV head: the key's ``[B, T, 1, d] -> [B, 1, T, d]`` transpose moves a unit
    axis only, and the layout rule that makes such a transpose a Reshape fired before its per-head
    norm moved above it -- the rotation then stayed a ``RotaryEmbedding`` in the heads-major layout,
    and with it the Q / K norms and the projections stayed out of every attention (run 39: 649
    nodes where run 27 had 387). A tiny Gemma 3 with one KV head (head size 256, sliding and full
    layers), bf16: every GroupQueryAttention rotates inside, takes both norms and reads one packed
    projection, no ``RotaryEmbedding`` node is left, and the build's parity check (its fp32 twin on
    ORT CPU against eager, and the structure comparison) passed. Loaded and streamed from the
    checkpoint (``--stream-weights``, as real-size Hugging Face builds are: its first fusion round
    runs before the norm scales are constants, and turned the transposes into reshapes there)."""
    from effexport.exporter.backends.onnx.ort_cuda import K_NORM, Q_NORM

    src, out = tmp_path / "hf", tmp_path / "bf16"
    hf_tiny.build("gemma3", head_dim=256, num_key_value_heads=1).save_pretrained(src)
    _cli(src, out, "--dtype", "bf16", *(["--stream-weights"] if stream else []))
    model = _model(out)
    attentions = [n for n in model.graph.node if n.op_type == GQA]
    assert len(attentions) == 3 and _packed(model) == attentions
    for node in attentions:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["do_rotary"] == 1 and attrs["kv_num_heads"] == 1 and node.input[Q_NORM] and node.input[K_NORM]
    assert _count(model, "RotaryEmbedding") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["passed"] and "twin" in report["parity"]["mode"]
