"""``OrtRuntime`` with I/O binding and bf16 tensors, which numpy cannot hold (the CUDA deployment
dtype): bf16 initial caches go in as OrtValues of the raw 16-bit pattern, bf16 logits come back
through a torch buffer bound as the output. Checked on ONNX Runtime CPU with a hand-made step model
whose logits are the token ids cast to bf16 and whose present cache is ``past + 1`` in bf16."""
import ctypes
import json

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from effexport.exporter.backends.artifact import MANIFEST
from effexport.exporter.backends.onnx.runtime import OrtRuntime

VOCAB = 5


def _step_model(path):
    bf16 = TensorProto.BFLOAT16
    nodes = [
        helper.make_node("Unsqueeze", ["input_ids", "axis"], ["ids3"]),
        helper.make_node("Expand", ["ids3", "vocab_shape"], ["ids_v"]),
        helper.make_node("Cast", ["ids_v"], ["logits"], to=bf16),
        helper.make_node("Cast", ["past.0.k"], ["past32"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["past32", "one"], ["next32"]),
        helper.make_node("Cast", ["next32"], ["present.0.k"], to=bf16),
    ]
    inits = [helper.make_tensor("axis", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("vocab_shape", TensorProto.INT64, [3], [1, 1, VOCAB]),
             helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])]
    graph = helper.make_graph(
        nodes, "step",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, []),
         helper.make_tensor_value_info("past.0.k", bf16, ["batch", 2, 3])],
        [helper.make_tensor_value_info("logits", bf16, ["batch", "seq", VOCAB]),
         helper.make_tensor_value_info("present.0.k", bf16, ["batch", 2, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_bf16_caches_and_logits_through_io_binding(tmp_path):
    _step_model(str(tmp_path / "model.onnx"))
    entry = {"name": "0.k", "layer": 0, "kind": "state", "shape": ["batch", 2, 3], "dtype": "bfloat16"}
    (tmp_path / MANIFEST).write_text(json.dumps({
        "target": "onnx", "profile": "ort", "files": {"step": "model.onnx"},
        "inputs": ["input_ids", "pos", "past.0.k"], "outputs": ["logits", "present.0.k"],
        "cache_plan": {"entries": [entry], "layers": []}}))
    runtime = OrtRuntime(str(tmp_path), io_binding=True)
    ids = np.array([[3, 1, 4], [1, 5, 9]], dtype=np.int64)
    result = runtime.step(ids, 0, runtime.initial_caches(2))
    assert result.logits.dtype == np.float32 and result.logits.shape == (2, 3, VOCAB)
    np.testing.assert_array_equal(result.logits, np.repeat(ids[:, :, None], VOCAB, axis=2).astype(np.float32))
    for pos in range(3, 6):  # caches stay bf16 OrtValues and count the steps
        result = runtime.step(ids[:, :1], pos, result.caches)
        assert result.caches[0].data_type() == "tensor(bfloat16)"
    assert _bf16_values(result.caches[0]).eq(4.0).all()  # zero prefill cache + 1 per step, 4 steps


def _bf16_values(value) -> torch.Tensor:
    """A host bf16 OrtValue's values (numpy has no bf16: read its 16-bit words from its buffer)."""
    count = int(np.prod(value.shape()))
    words = np.ctypeslib.as_array((ctypes.c_int16 * count).from_address(value.data_ptr())).copy()
    return torch.from_numpy(words).view(torch.bfloat16).float()


def test_shared_weight_element_types():
    """The numpy dtype a shared external weight's bytes are read as (``runtime._numpy_dtype``): onnx's
    own table for the types numpy holds natively, bf16 as its int16 bit pattern, None (refused) for
    string, complex and the ml_dtypes kinds (float8, int4), which ONNX Runtime takes from no numpy array."""
    from effexport.exporter.backends.onnx.runtime import _numpy_dtype

    assert _numpy_dtype(TensorProto.BFLOAT16) == np.int16
    assert [_numpy_dtype(t) for t in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.BOOL,
                                      TensorProto.UINT8)] == [np.float32, np.float16, np.int64, np.bool_, np.uint8]
    assert [_numpy_dtype(t) for t in (TensorProto.UNDEFINED, TensorProto.STRING, TensorProto.COMPLEX64,
                                      TensorProto.FLOAT8E5M2, TensorProto.INT4, 999)] == [None] * 6
