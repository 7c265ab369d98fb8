"""Triton CUDA decode kernels (custom_ops/_triton) against the eager references.

GPU tests (marked ``gpu``; skipped without CUDA): each kernel's output against the op's eager
reference run in float64 on the same inputs, max relative error ``max|out - ref| / max|ref|`` <=
2e-2 (bf16) / 1e-4 (fp32), on fresh random inputs, outputs not all zero; the caches the ops return
must equal the reference's bit for bit. The CPU tests check the launch plan and the opt-in error.
"""
import importlib.util
import json
import os

import pytest
import torch

from effexport.custom_ops import attention as attn_mod
from effexport.custom_ops import enable_triton
from effexport.custom_ops import sparse_attention as sparse_mod
from effexport.custom_ops._triton import plan

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
ops = torch.ops.effexport


# ------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("groups,bh,span,d,dv", [
    pytest.param(8, 1, 131072, 512, 512, id="gemma-global-128k"),
    pytest.param(8, 8, 131072, 256, 256, id="b8-128k"),
    pytest.param(64, 1, 640, 512, 512, id="deepseek-csa"),
    pytest.param(3, 2, 1, 80, 48, id="one-row-odd-dims"),
    pytest.param(4, 3, 4097, 64, 64, id="gqa4-4097"),
])
def test_plan_covers_every_row(groups, bh, span, d, dv):
    p = plan.plan(groups, bh, span, d, dv, sm_count=132)
    assert p.chunk % p.block_n == 0 and p.block_g >= 16 and p.block_n >= 16
    assert (p.splits - 1) * p.chunk < span <= p.splits * p.chunk  # every row, no empty tail split
    assert p.num_gb * p.block_g >= groups and p.block_d >= d and p.block_dv >= dv
    # one wave: never more programs than the SMs hold at once (a partial second wave costs ~2x)
    if bh * p.num_gb <= 132:
        assert bh * p.num_gb * p.splits <= 132 * plan.CONFIG["programs_per_sm"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="triton is installed")
def test_enable_triton_without_triton_names_the_fix():
    with pytest.raises(RuntimeError, match="pip install triton"):
        enable_triton()


# ------------------------------------------------------------------------------------------ GPU
def _rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


def _f64(*tensors):
    return [None if t is None else t.double() if t.is_floating_point() else t for t in tensors]


def _check(out, ref, dtype, what):
    assert out.dtype == dtype and out.shape == ref.shape, what
    assert torch.isfinite(out).all() and out.abs().max() > 0, f"{what}: non-finite or all-zero output"
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    log = os.environ.get("EFFEXPORT_KERNEL_ERRORS")  # bench/run_device.sh collects the numbers
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", what).split(" ")[0],
                                "dtype": str(dtype), "rel_err": err}) + "\n")
    assert err <= TOL[dtype], f"{what}: max rel err {err:.3g} > {TOL[dtype]}"
    return err


@pytest.fixture(scope="module")
def gen():
    enable_triton()
    return torch.Generator(device="cuda").manual_seed(8)


DENSE = [  # batch, heads, kv heads, d, dv, window, sinks, softcap
    pytest.param(1, 8, 1, 256, 256, 0, False, 0.0, id="b1-gqa8-d256"),
    pytest.param(8, 8, 2, 64, 64, 0, True, 0.0, id="b8-gqa4-sinks"),
    pytest.param(2, 4, 4, 128, 64, 0, False, 30.0, id="mha-dv64-softcap"),
    pytest.param(1, 8, 1, 512, 512, 100, True, 50.0, id="b1-d512-window-sinks-softcap"),
    pytest.param(8, 16, 2, 80, 80, 37, False, 0.0, id="b8-gqa8-d80-window"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("past", [0, 1, 3000], ids=["P0", "P1", "P3000"])
@pytest.mark.parametrize("batch,heads,kv_heads,d,dv,window,use_sinks,softcap", DENSE)
def test_attention_cache(gen, dtype, past, batch, heads, kv_heads, d, dv, window, use_sinks, softcap):
    q = _rand(batch, heads, 1, d, dtype=dtype, gen=gen)
    k_new, v_new = _rand(batch, kv_heads, 1, d, dtype=dtype, gen=gen), _rand(batch, kv_heads, 1, dv, dtype=dtype, gen=gen)
    k_past, v_past = _rand(batch, kv_heads, past, d, dtype=dtype, gen=gen), _rand(batch, kv_heads, past, dv, dtype=dtype, gen=gen)
    sinks = _rand(heads, dtype=torch.float32, gen=gen) if use_sinks else None
    kw = dict(scale=d ** -0.5, window=window, softcap=softcap)
    out, k_p, v_p = ops.attention_cache(q, k_new, v_new, k_past, v_past, sinks, **kw)
    ref = attn_mod.attention_cache._init_fn(*_f64(q, k_new, v_new, k_past, v_past, sinks), **kw)[0]
    _check(out, ref, dtype, "attention_cache")
    assert torch.equal(k_p, torch.cat([k_past, k_new], 2)) and torch.equal(v_p, torch.cat([v_past, v_new], 2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("slots,pos", [
    pytest.param(8, 3, id="W8-partial"), pytest.param(8, 8, id="W8-full"),
    pytest.param(8, 21, id="W8-wrapped"), pytest.param(512, 0, id="W512-first"),
    pytest.param(512, 511, id="W512-last-empty"), pytest.param(512, 70001, id="W512-wrapped"),
])
@pytest.mark.parametrize("batch,heads,kv_heads,d,dv,use_sinks,softcap", [
    pytest.param(1, 8, 1, 256, 256, False, 0.0, id="b1-gqa8-d256"),
    pytest.param(8, 8, 2, 64, 64, True, 30.0, id="b8-gqa4-sinks-softcap"),
    pytest.param(2, 6, 6, 128, 96, True, 0.0, id="mha-dv96-sinks"),
])
def test_attention_ring(gen, dtype, slots, pos, batch, heads, kv_heads, d, dv, use_sinks, softcap):
    q = _rand(batch, heads, 1, d, dtype=dtype, gen=gen)
    k_new, v_new = _rand(batch, kv_heads, 1, d, dtype=dtype, gen=gen), _rand(batch, kv_heads, 1, dv, dtype=dtype, gen=gen)
    k_ring, v_ring = _rand(batch, kv_heads, slots, d, dtype=dtype, gen=gen), _rand(batch, kv_heads, slots, dv, dtype=dtype, gen=gen)
    sinks = _rand(heads, dtype=torch.float32, gen=gen) if use_sinks else None
    p = torch.tensor(pos, device="cuda")
    kw = dict(scale=d ** -0.5, window=slots, softcap=softcap)
    out, k_r, v_r = ops.attention_ring(q, k_new, v_new, k_ring, v_ring, p, sinks, **kw)
    ref = attn_mod.attention_ring._init_fn(*_f64(q, k_new, v_new, k_ring, v_ring), p, _f64(sinks)[0], **kw)
    _check(out, ref[0], dtype, "attention_ring")
    same = attn_mod.attention_ring._init_fn(q, k_new, v_new, k_ring, v_ring, p, sinks, **kw)
    assert torch.equal(k_r, same[1]) and torch.equal(v_r, same[2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("ring,slots,pos,window", [
    pytest.param(False, 4096, 4095, 0, id="full-exact"),
    pytest.param(False, 8192, 3000, 0, id="full-overallocated"),
    pytest.param(False, 8192, 5000, 512, id="full-window"),
    pytest.param(True, 512, 300, 512, id="ring-partial"),
    pytest.param(True, 512, 90000, 512, id="ring-wrapped"),
    pytest.param(True, 64, 1000, 40, id="ring-window-lt-slots"),
])
@pytest.mark.parametrize("batch,heads,kv_heads,d,use_sinks,softcap", [
    pytest.param(1, 8, 1, 512, False, 0.0, id="b1-gqa8-d512"),
    pytest.param(8, 8, 2, 128, True, 30.0, id="b8-gqa4-sinks-softcap"),
])
def test_attention_read(gen, dtype, ring, slots, pos, window, batch, heads, kv_heads, d, use_sinks, softcap):
    q = _rand(batch, heads, 1, d, dtype=dtype, gen=gen)
    k, v = _rand(batch, kv_heads, slots, d, dtype=dtype, gen=gen), _rand(batch, kv_heads, slots, d, dtype=dtype, gen=gen)
    sinks = _rand(heads, dtype=torch.float32, gen=gen) if use_sinks else None
    p = torch.tensor(pos, device="cuda")
    kw = dict(scale=d ** -0.5, window=window, softcap=softcap, ring=ring)
    out = ops.attention_read(q, k, v, p, sinks, **kw)
    ref = attn_mod.attention_read._init_fn(*_f64(q, k, v), p, _f64(sinks)[0], **kw)
    _check(out, ref, dtype, "attention_read")


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["cache", "ring", "read", "read_ring"])
def test_fp32_query_over_bf16_cache(gen, op):
    """What the rewritten sample graphs pass (the samples upcast q for the score matmul): an fp32
    query over bf16 caches. The kernel's tf32x3 dots must keep the fp32 tolerance (1e-4)."""
    b, h, hkv, d = 2, 8, 1, 512
    slots = 3000 if op in ("cache", "read") else 512
    q = _rand(b, h, 1, d, dtype=torch.float32, gen=gen)
    k, v, kn, vn = (_rand(b, hkv, n, d, dtype=torch.bfloat16, gen=gen) for n in (slots, slots, 1, 1))
    p = torch.tensor(slots + 700 if op != "cache" else slots, device="cuda")
    window = 512 if op in ("ring", "read_ring") else 0
    kw = dict(scale=d ** -0.5, window=window, softcap=0.0)
    if op == "cache":
        out = ops.attention_cache(q, kn, vn, k, v, None, **kw)[0]
        ref = attn_mod.attention_cache._init_fn(*_f64(q, kn, vn, k, v), None, **kw)[0]
    elif op == "ring":
        out = ops.attention_ring(q, kn, vn, k, v, p, None, **kw)[0]
        ref = attn_mod.attention_ring._init_fn(*_f64(q, kn, vn, k, v), p, None, **kw)[0]
    else:
        p = torch.tensor(slots - 1 if op == "read" else slots + 700, device="cuda")
        kw["ring"] = op == "read_ring"
        out = ops.attention_read(q, k, v, p, None, **kw)
        ref = attn_mod.attention_read._init_fn(*_f64(q, k, v), p, None, **kw)
    _check(out, ref, torch.float32, f"{op} fp32 q / bf16 cache")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind,ratio,ncomp,topk,pos", [
    pytest.param("hca", 128, 1024, 0, 5000, id="hca-5000"),
    pytest.param("hca", 128, 1024, 0, 100, id="hca-none-visible"),
    pytest.param("csa", 4, 2048, 512, 5000, id="csa-5000"),
    pytest.param("csa", 4, 2048, 512, 60, id="csa-few-visible"),
    pytest.param("swa", 0, 8, 0, 300, id="window-only"),
])
@pytest.mark.parametrize("batch,heads,dim", [
    pytest.param(1, 64, 512, id="b1-h64-d512"), pytest.param(8, 16, 128, id="b8-h16-d128"),
])
def test_sparse_attention_ring(gen, dtype, kind, ratio, ncomp, topk, pos, batch, heads, dim):
    window = 128
    q = _rand(batch, 1, heads, dim, dtype=dtype, gen=gen)
    kv = _rand(batch, window, dim, dtype=dtype, gen=gen)
    comp = _rand(batch, ncomp, dim, dtype=dtype, gen=gen)
    sink = _rand(heads, dtype=torch.float32, gen=gen)
    idx = None
    if kind == "csa":  # visible, invisible, out-of-range, -1 and repeated entries
        idx = torch.randint(-1, (pos + 1) // ratio + 8, (batch, 1, topk), generator=gen, device="cuda")
        idx[..., :4] = idx[..., 4:8]
        idx[..., 8] = ncomp + 3
    p = torch.tensor(pos, device="cuda")
    kw = dict(scale=dim ** -0.5, window=window, ratio=ratio)
    out = ops.sparse_attention_ring(q, kv, comp, idx, sink, p, **kw)
    ref = sparse_mod.sparse_attention_ring._init_fn(*_f64(q, kv, comp, idx, sink), p, **kw)
    _check(out, ref, dtype, f"sparse_attention_ring {kind}")


# ---------------------------------------------------------------------------- prefill (T > 1)
PREFILL = [  # batch, heads, kv heads, d, dv, sinks, softcap
    pytest.param(1, 8, 1, 256, 256, False, 0.0, id="gemma-sliding-d256"),
    pytest.param(1, 8, 1, 512, 512, True, 30.0, id="d512-sinks-softcap"),
    pytest.param(2, 8, 2, 64, 48, True, 0.0, id="b2-gqa4-dv48-sinks"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("t_len,s_len,causal,window", [
    pytest.param(1500, 1500, True, 512, id="T1500-window512"),
    pytest.param(700, 700, True, 0, id="T700-causal"),
    pytest.param(100, 900, True, 37, id="last100of900-window37"),
    pytest.param(300, 257, False, 0, id="bidirectional"),
    pytest.param(1, 600, True, 0, id="one-query"),
])
@pytest.mark.parametrize("batch,heads,kv_heads,d,dv,use_sinks,softcap", PREFILL)
def test_attention_prefill(gen, dtype, t_len, s_len, causal, window, batch, heads, kv_heads, d, dv,
                           use_sinks, softcap):
    q = _rand(batch, heads, t_len, d, dtype=dtype, gen=gen)
    k, v = _rand(batch, kv_heads, s_len, d, dtype=dtype, gen=gen), _rand(batch, kv_heads, s_len, dv, dtype=dtype, gen=gen)
    sinks = _rand(heads, dtype=torch.float32, gen=gen) if use_sinks else None
    kw = dict(scale=d ** -0.5, causal=causal, window=window, softcap=softcap)
    out = ops.attention(q, k, v, sinks, **kw)
    ref = attn_mod.attention._init_fn(*_f64(q, k, v, sinks), **kw)
    _check(out, ref, dtype, "attention (prefill kernel)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("op,t_len,pos", [
    pytest.param("cache", 300, 0, id="cache-P0"), pytest.param("cache", 65, 1000, id="cache-P1000"),
    pytest.param("ring", 1300, 0, id="ring-prefill-T-gt-W"), pytest.param("ring", 200, 100, id="ring-partial"),
    pytest.param("ring", 96, 5000, id="ring-wrapped"),
    pytest.param("read", 120, 3000, id="read-chunk"),
])
@pytest.mark.parametrize("batch,heads,kv_heads,d,dv,use_sinks,softcap", PREFILL[:2])
def test_cache_ops_multi_token(gen, dtype, op, t_len, pos, batch, heads, kv_heads, d, dv, use_sinks, softcap):
    """Chunked prefill through the cache ops (T > 1) takes the prefill kernel: the output within
    tolerance of the float64 reference, the returned caches equal to the reference's bit for bit."""
    window = 512 if op == "ring" else 0
    q = _rand(batch, heads, t_len, d, dtype=dtype, gen=gen)
    kn, vn = _rand(batch, kv_heads, t_len, d, dtype=dtype, gen=gen), _rand(batch, kv_heads, t_len, dv, dtype=dtype, gen=gen)
    rows = {"cache": pos, "ring": window, "read": pos + t_len + 50}[op]
    kc, vc = _rand(batch, kv_heads, rows, d, dtype=dtype, gen=gen), _rand(batch, kv_heads, rows, dv, dtype=dtype, gen=gen)
    sinks = _rand(heads, dtype=torch.float32, gen=gen) if use_sinks else None
    p = torch.tensor(pos, device="cuda")
    kw = dict(scale=d ** -0.5, window=window, softcap=softcap)
    if op == "cache":
        got = ops.attention_cache(q, kn, vn, kc, vc, sinks, **kw)
        ref = attn_mod.attention_cache._init_fn(*_f64(q, kn, vn, kc, vc, sinks), **kw)
        same = attn_mod.attention_cache._init_fn(q, kn, vn, kc, vc, sinks, **kw)
    elif op == "ring":
        got = ops.attention_ring(q, kn, vn, kc, vc, p, sinks, **kw)
        ref = attn_mod.attention_ring._init_fn(*_f64(q, kn, vn, kc, vc), p, _f64(sinks)[0], **kw)
        same = attn_mod.attention_ring._init_fn(q, kn, vn, kc, vc, p, sinks, **kw)
    else:
        got = (ops.attention_read(q, kc, vc, p, sinks, **kw),)
        ref = (attn_mod.attention_read._init_fn(*_f64(q, kc, vc), p, _f64(sinks)[0], **kw),)
        same = got
    _check(got[0], ref[0], dtype, f"attention_{op} T={t_len} (prefill kernel)")
    assert all(torch.equal(a, b) for a, b in zip(got[1:], same[1:]))


@pytest.mark.gpu
def test_ring_consumer_multi_token_keeps_the_reference(gen):
    """``attention_read(ring=True)`` with T > 1 is refused by the reference (not exact); the CUDA
    registration must refuse it the same way, not compute something."""
    q = _rand(1, 4, 3, 32, dtype=torch.float32, gen=gen)
    k, v = (_rand(1, 1, 16, 32, dtype=torch.float32, gen=gen) for _ in range(2))
    with pytest.raises(ValueError, match="only exact for one query token"):
        ops.attention_read(q, k, v, torch.tensor(40, device="cuda"), scale=0.2, window=16, ring=True)
