"""``effexport::cca``: opcheck, equivalence with the ZAYA1 sample's q/k/v, chunked decode == one
prefill call over random shapes, and torch.export with dynamic batch and sequence."""
import random
import subprocess
import sys

import pytest
import torch

from _helpers import assert_close
from effexport.custom_ops import cca as cca_mod
from effexport.samples import Sample, zaya1
from effexport.samples._blocks import inv_freq_default, rope_cos_sin

OP = torch.ops.effexport.cca.default



def _weights(hq, hk, d, k0, k1, bias=True, seed=0, dtype=torch.float32):
    """Random conv weights/biases and temperature for (Hq, Hk, d, K0, K1)."""
    gen = torch.Generator().manual_seed(seed)
    c = (hq + hk) * d
    w = {"conv0_weight": torch.randn(c, 1, k0, generator=gen) * 0.5,
         "conv1_weight": torch.randn(c, d, k1, generator=gen) * d ** -0.5,
         "temperature": 1 + 0.2 * torch.randn(hk, generator=gen),
         "conv0_bias": 0.1 * torch.randn(c, generator=gen) if bias else None,
         "conv1_bias": 0.1 * torch.randn(c, generator=gen) if bias else None}
    return {n: None if t is None else t.to(dtype) for n, t in w.items()}


def _inputs(b, t, hq, hk, d, p, rot, start=0, zero_state=True, seed=0, dtype=torch.float32):
    """Per-token inputs of T tokens at positions start.., cos/sin [T, rot] and the two states."""
    gen = torch.Generator().manual_seed(seed)
    dv = hk * d // 2
    pos = torch.arange(start, start + t)
    cos, sin = rope_cos_sin(pos, inv_freq_default(rot, 5e6))
    x = {"q_down": torch.randn(b, t, hq * d, generator=gen),
         "k_down": torch.randn(b, t, hk * d, generator=gen),
         "v_cur": torch.randn(b, t, dv, generator=gen),
         "v_del_src": torch.randn(b, t, dv, generator=gen)}
    state = {"conv_state": torch.zeros(b, (hq + hk) * d, p), "shift_state": torch.zeros(b, dv)}
    if not zero_state:
        state = {n: torch.randn(s.shape, generator=gen) for n, s in state.items()}
    x = {n: v.to(dtype) for n, v in {**x, **state}.items()}
    return {**x, "cos": cos, "sin": sin}


def _call(inputs, weights):
    return OP(inputs["q_down"], inputs["k_down"], inputs["v_cur"], inputs["v_del_src"],
              weights["conv0_weight"], weights["conv1_weight"], weights["temperature"],
              inputs["cos"], inputs["sin"], inputs["conv_state"], inputs["shift_state"],
              weights["conv0_bias"], weights["conv1_bias"])


# ------------------------------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("shape", [
    pytest.param(dict(b=2, t=7, hq=4, hk=2, d=8, k0=2, k1=2, rot=4, zero=True), id="prefill-gqa2"),
    pytest.param(dict(b=2, t=1, hq=4, hk=2, d=8, k0=2, k1=2, rot=4, zero=False), id="decode-T1"),
    pytest.param(dict(b=1, t=5, hq=3, hk=1, d=4, k0=3, k1=2, rot=4, zero=False), id="mqa-K3-fullrope"),
    pytest.param(dict(b=3, t=4, hq=2, hk=2, d=6, k0=1, k1=1, rot=2, zero=True), id="no-conv-context-P0"),
])
@pytest.mark.parametrize("bias", [pytest.param(True, id="bias"), pytest.param(False, id="nobias")])
def test_opcheck(shape, bias):
    s = shape
    p = s["k0"] + s["k1"] - 2
    w = _weights(s["hq"], s["hk"], s["d"], s["k0"], s["k1"], bias=bias)
    x = _inputs(s["b"], s["t"], s["hq"], s["hk"], s["d"], p, s["rot"], start=3, zero_state=s["zero"])
    args = (x["q_down"], x["k_down"], x["v_cur"], x["v_del_src"], w["conv0_weight"],
            w["conv1_weight"], w["temperature"], x["cos"], x["sin"], x["conv_state"],
            x["shift_state"], w["conv0_bias"], w["conv1_bias"])
    torch.library.opcheck(OP, args)
    q, k, v, conv, shift = OP(*args)
    assert q.shape == (s["b"], s["hq"], s["t"], s["d"])
    assert k.shape == v.shape == (s["b"], s["hk"], s["t"], s["d"])
    assert conv.shape == (s["b"], (s["hq"] + s["hk"]) * s["d"], p) and shift.shape == x["shift_state"].shape
    # new tensors, never views of the inputs (an empty P=0 state has no storage to alias)
    assert all(o.numel() == 0 or o.data_ptr() != a.data_ptr()
               for o in (q, k, v, conv, shift) for a in args if a is not None)


def test_ops_tuple_and_no_heavy_imports():
    """OPS names the op; importing the module pulls in no triton/onnxruntime/tensorrt."""
    assert cca_mod.OPS == (OP,)
    code = ("import sys, effexport.custom_ops.cca; "
            "bad = [m for m in ('triton', 'onnxruntime', 'tensorrt') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


# ----------------------------------------------------------------------------- sample equivalence
@pytest.fixture(scope="module")
def tiny():
    return Sample("zaya1-8b:tiny", zaya1, zaya1.PRESETS["zaya1-8b:tiny"]).build("cpu")


def _op_from_layer(attn, x, cos, sin, conv_state, shift_state):
    """The op fed from one sample layer's down-projections and weights."""
    proj = attn.qkv_proj
    return OP(proj.q_proj(x), proj.k_proj(x), proj.v_proj_current(x), proj.v_proj_delayed(x),
              proj.conv_qk_depthwise.weight, proj.conv_qk_grouped.weight, attn.qk_norm.temp,
              cos, sin, conv_state, shift_state, proj.conv_qk_depthwise.bias, proj.conv_qk_grouped.bias)


@pytest.mark.parametrize("layer", [pytest.param(0, id="layer0"), pytest.param(3, id="layer3")])
def test_matches_sample_qkv(tiny, layer):
    """Prefill (zero states) and a continuation (states from the sample's prefill) equal the
    sample's CCAttention.qkv, fp32 <= 1e-5, including the returned states."""
    cfg = tiny.config
    attn = tiny.layers[layer].self_attn
    torch.manual_seed(layer)
    x = torch.randn(2, 13, cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(13), tiny.inv_freq)
    with torch.no_grad():
        ref = attn.qkv(x[:, :9], cos[:9], sin[:9])
        zeros = (x.new_zeros(2, cfg.conv_channels, cfg.conv_padding), x.new_zeros(2, cfg.value_half))
        got = _op_from_layer(attn, x[:, :9], cos[:9], sin[:9], *zeros)
        ref2 = attn.qkv(x[:, 9:], cos[9:], sin[9:], ref[3], ref[4])
        got2 = _op_from_layer(attn, x[:, 9:], cos[9:], sin[9:], got[3], got[4])
    for name, a, e in zip(("q", "k", "v", "conv", "shift"), got + got2, ref + ref2):
        assert_close(a, e, what=name)


# --------------------------------------------------------------------------- decode == prefill
def _random_case(rng: random.Random):
    hk = rng.choice([1, 2])
    d = rng.choice([4, 8])
    return dict(b=rng.choice([1, 2]), t=rng.randint(17, 41), hq=hk * rng.choice([1, 2, 3]), hk=hk,
                d=d, k0=rng.choice([1, 2, 3]), k1=rng.choice([1, 2, 3]), rot=rng.choice([2, d // 2, d]),
                bias=rng.random() < 0.7)


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed{s}") for s in range(8)])
def test_chunked_decode_equals_prefill(seed):
    """Random shapes (T 17..41, K0/K1 1..3, G 1..3, rot 2..d): one call over the whole sequence
    equals threading the states through random chunks (sizes 1..P+2, starting token by token)."""
    rng = random.Random(seed)
    s = _random_case(rng)
    p = s["k0"] + s["k1"] - 2
    w = _weights(s["hq"], s["hk"], s["d"], s["k0"], s["k1"], bias=s["bias"], seed=seed)
    x = _inputs(s["b"], s["t"], s["hq"], s["hk"], s["d"], p, s["rot"], seed=seed)
    full = _call(x, w)
    outs, conv, shift, start = [], x["conv_state"], x["shift_state"], 0
    while start < s["t"]:
        size = 1 if start < 4 else min(rng.randint(1, p + 2), s["t"] - start)
        sl = slice(start, start + size)
        chunk = {n: x[n][:, sl] for n in ("q_down", "k_down", "v_cur", "v_del_src")}
        chunk.update(cos=x["cos"][sl], sin=x["sin"][sl], conv_state=conv, shift_state=shift)
        q, k, v, conv, shift = _call(chunk, w)
        outs.append((q, k, v))
        start += size
    for i, name in enumerate("qkv"):
        assert_close(torch.cat([o[i] for o in outs], dim=2), full[i], what=f"{name} ({s})")
    assert_close(conv, full[3], what="conv state")
    assert_close(shift, full[4], what="shift state")


# ------------------------------------------------------------------------------------------ export
class _CCAWrapper(torch.nn.Module):
    """A tiny module around the op: weights as parameters, per-token inputs and states as args."""

    def __init__(self, weights):
        super().__init__()
        for name, t in weights.items():
            self.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))

    def forward(self, q_down, k_down, v_cur, v_del_src, cos, sin, conv_state, shift_state):
        return OP(q_down, k_down, v_cur, v_del_src, self.conv0_weight, self.conv1_weight,
                  self.temperature, cos, sin, conv_state, shift_state, self.conv0_bias, self.conv1_bias)


_ARG_ORDER = ("q_down", "k_down", "v_cur", "v_del_src", "cos", "sin", "conv_state", "shift_state")


def test_export_dynamic_batch_and_sequence():
    """torch.export with named Dims for batch and sequence keeps the op as one node; the exported
    program equals eager at other batch sizes and lengths, including one-token decode."""
    hq, hk, d, p, rot = 4, 2, 8, 2, 4
    module = _CCAWrapper(_weights(hq, hk, d, 2, 2)).eval()
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=4096)
    tok = {0: batch, 1: seq}
    shapes = {"q_down": tok, "k_down": tok, "v_cur": tok, "v_del_src": tok, "cos": {0: seq},
              "sin": {0: seq}, "conv_state": {0: batch}, "shift_state": {0: batch}}
    x = _inputs(2, 5, hq, hk, d, p, rot)
    ep = torch.export.export(module, tuple(x[n] for n in _ARG_ORDER), dynamic_shapes=shapes)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(OP) == 1
    for b, t, start in ((3, 11, 0), (1, 1, 7), (4, 2, 30)):
        y = _inputs(b, t, hq, hk, d, p, rot, start=start, zero_state=start == 0, seed=b)
        args = tuple(y[n] for n in _ARG_ORDER)
        for got, want in zip(ep.module()(*args), module(*args)):
            assert_close(got, want, what=f"exported B={b} T={t}")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    """The eager reference runs on CUDA and matches CPU (TF32 off), fp32 <= 1e-5."""
    w = _weights(4, 2, 8, 2, 2)
    x = _inputs(2, 9, 4, 2, 8, 2, 4, zero_state=False)
    cpu = _call(x, w)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        to = lambda d: {n: None if v is None else v.cuda() for n, v in d.items()}  # noqa: E731
        gpu = _call(to(x), to(w))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    for name, a, e in zip(("q", "k", "v", "conv", "shift"), gpu, cpu):
        assert a.device.type == "cuda"
        assert_close(a.cpu(), e, what=name)
