"""The one-token decode graph (``decode.onnx``, :func:`effexport.exporter.backends.onnx.export.export_steps`)
of a model with several KV heads: gemma4-e4b:tiny (2 KV heads, 4 query heads; sliding owners 0-4,
full owner 5, consumers 6-10 of ring 4 and 11 of buffer 5), where MultiHeadAttention's query rows
fold the two query heads of each KV head (``attend_mha_prefix``). gemma4-e2b:tiny (one KV head) is
covered with the CLI build in tests/test_kv_buffer.py (both graphs, the runtime, shared weights);
here only the decode graph is lowered (CI time), and run from the empty caches on."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from _helpers import assert_close, step_feeds


def test_e4b_decode_graph_folds_two_kv_heads(rewritten):
    """decode.onnx reads the prefix caches with one MultiHeadAttention each (``num_heads`` = 2 KV
    heads): the six consumers' and ring 4's owner's (slot layout: its consumers read it), no Softmax
    left. Fed 18 tokens one at a time from the empty caches at batch 2 (positions 0..17: the 8-slot
    ring fills, then wraps twice), every step's logits equal the eager model's (fp32, rel 1e-5)."""
    from effexport.exporter.backends.onnx.export import _finish, _lower_step
    from effexport.passes.pipeline import run_pipeline

    base = rewritten("gemma4-e4b:tiny")
    program, analysis = run_pipeline(base.captured, max_context=64, cache_layout="buffer")
    decode = ir.to_proto(_lower_step(program, analysis.plan, "ort", 2, one_token=True))
    _finish(decode, "ort")
    mha = [n for n in decode.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == 7 and not [n for n in decode.graph.node if n.op_type == "Softmax"]
    assert all(a.i == 2 for n in mha for a in n.attribute if a.name == "num_heads")
    session = ort.InferenceSession(decode.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = torch.from_numpy(np.random.RandomState(2).randint(0, base.sample.config.vocab_size, (2, 18)))
    caches, past = [e.empty(2).numpy() for e in analysis.plan.entries], None
    for pos in range(ids.shape[1]):
        token = ids[:, pos:pos + 1]
        with torch.no_grad():
            want, past = base.model(token) if past is None else base.model(token, past)
        out = session.run(None, step_feeds(session, token.numpy(), pos, caches))
        assert_close(torch.from_numpy(out[0]), want, rtol=1e-5, what=f"decode.onnx at {pos}")
        caches = out[1:]
