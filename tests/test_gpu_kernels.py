"""Triton CUDA decode kernels (custom_ops/_triton) against the eager references.

GPU tests (marked ``gpu``; skipped without CUDA): each kernel's output against the op's eager
reference run in float64 on the same inputs, max relative error ``max|out - ref| / max|ref|`` <=
2e-2 (bf16) / 1e-4 (fp32), on fresh random inputs, outputs not all zero; the caches the ops return
must equal the reference's bit for bit. The CPU tests check the launch plan and the opt-in error.
"""
import importlib.util
import json
import os
import zlib

import pytest
import torch

from effexport.custom_ops import attention as attn_mod
from effexport.custom_ops import cca as cca_mod
from effexport.custom_ops import enable_triton
from effexport.custom_ops import mhc as mhc_mod
from effexport.custom_ops import sparse_attention as sparse_mod
from effexport.custom_ops._triton import plan

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
XDIST_SPLIT = ("op",)  # the sm_90 compile cases spread over the workers (conftest._xdist_group)
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


def test_enable_triton_without_triton_names_the_fix(monkeypatch):
    from effexport.custom_ops import _triton

    if _triton.registered():
        pytest.skip("the kernels are already registered in this process (a GPU run)")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install triton"):
        enable_triton()


# Every launch configuration the CUDA registrations pick is compiled for an H200 (sm_90) here,
# without a GPU: the registrations run on CPU tensors with the launches recorded instead of run,
# then each recorded launch is specialized by Triton's own argument binder (the types, the
# int == 1 constants and the alignment hints a real launch gets) and compiled to a cubin. A kernel
# that does not compile (e.g. a loop bound changing type in a branch) or needs more shared memory
# than the H200 has fails here, not on the GPU machine.
H200_SMEM = 232448  # bytes of shared memory one block may use on sm_90


def _cpu(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def _decode_case(op, dtype, qdtype):
    from effexport.custom_ops import _triton as T

    b, d = 2, 512 if op in ("cache", "read", "buffer", "buffer_inloop", "buffer_pdl") else 256
    q = _cpu(b, 8, 1, d, dtype=qdtype)
    new = [_cpu(b, 1, 1, d, dtype=dtype) for _ in range(2)]
    rows = 512 if op in ("ring", "ring_chunked", "read_ring") else 4096
    cache = [_cpu(b, 1, rows, d, dtype=dtype) for _ in range(2)]
    sinks, pos = torch.randn(8), torch.tensor(5000)
    if op == "cache":
        T._cache_cuda(q, *new, *cache, sinks, scale=1.0, softcap=30.0)
    elif op in ("buffer", "buffer_inloop", "buffer_pdl"):  # the default store after the loop, the first
        saved = dict(plan.CONFIG)                          # design's in it, the PDL launches
        plan.CONFIG.update(buffer_store="loop" if op == "buffer_inloop" else "after_loop",
                           combine_one_pass=op != "buffer_inloop",  # the two-pass combine compiles too
                           pdl=op == "buffer_pdl")
        try:
            T._buffer_inplace_cuda(q, *new, *cache, torch.tensor(3000), sinks, scale=1.0, softcap=30.0)
        finally:
            plan.CONFIG.update(saved)
    elif op in ("ring", "ring_chunked"):
        T._ring_cuda(q, *new, *cache, pos, None, scale=1.0, window=512, chunked=op == "ring_chunked")
    else:
        T._read_cuda(q, *cache, pos, None, scale=1.0, window=512 if op == "read_ring" else 0,
                     ring=op == "read_ring")


def _sparse_case(kind, dtype, qdtype):
    from effexport.custom_ops import _triton as T

    q, kv, comp = _cpu(2, 1, 64, 512, dtype=qdtype), _cpu(2, 128, 512, dtype=dtype), _cpu(2, 1024, 512, dtype=dtype)
    idx = torch.randint(-1, 1024, (2, 1, 512)) if kind == "csa" else None
    T._sparse_ring_cuda(q, kv, comp, idx, torch.randn(64), torch.tensor(5000), scale=0.04, window=128,
                        ratio=4 if kind == "csa" else 128)


def _prefill_case(op, dtype, qdtype):
    from effexport.custom_ops import _triton as T

    t, d = 300, {"sliding": 256, "full": 512, "bidir": 80}.get(op, 256)
    q = _cpu(1, 8, t, d, dtype=qdtype)
    k, v = _cpu(1, 2, t, d, dtype=dtype), _cpu(1, 2, t, d, dtype=dtype)
    sinks, pos = torch.randn(8), torch.tensor(700)
    if op in ("sliding", "full", "bidir"):
        T._attention_cuda(q, k, v, sinks if op == "full" else None, scale=1.0, causal=op != "bidir",
                          window=512 if op == "sliding" else 0, softcap=30.0 if op == "full" else 0.0)
    elif op == "cache":
        T._cache_cuda(q, k, v, _cpu(1, 2, 700, d, dtype=dtype), _cpu(1, 2, 700, d, dtype=dtype), None, scale=1.0)
    elif op == "buffer":
        T._buffer_inplace_cuda(q, k, v, _cpu(1, 2, 1200, d, dtype=dtype), _cpu(1, 2, 1200, d, dtype=dtype), pos,
                               None, scale=1.0)
    elif op in ("ring", "ring_chunked"):
        T._ring_cuda(q, k, v, _cpu(1, 2, 512, d, dtype=dtype), _cpu(1, 2, 512, d, dtype=dtype), pos, sinks,
                     scale=1.0, window=512, chunked=op == "ring_chunked")
    else:
        T._read_cuda(q, _cpu(1, 2, 1200, d, dtype=dtype), _cpu(1, 2, 1200, d, dtype=dtype), pos, None, scale=1.0)


def _cca_case(shape, dtype, qdtype):
    from effexport.custom_ops import _triton as T

    b, hq, hk, d, k0, k1, rot = shape
    c, p, dv = (hq + hk) * d, k0 - 1 + k1 - 1, hk * d // 2
    T._cca_cuda(_cpu(b, 1, hq * d, dtype=dtype), _cpu(b, 1, hk * d, dtype=dtype), _cpu(b, 1, dv, dtype=dtype),
                _cpu(b, 1, dv, dtype=dtype), _cpu(c, 1, k0, dtype=dtype), _cpu(c, d, k1, dtype=dtype),
                torch.rand(hk) + 0.5, torch.randn(1, rot), torch.randn(1, rot), _cpu(b, c, p, dtype=dtype),
                _cpu(b, dv, dtype=dtype), _cpu(c, dtype=dtype), None)


def _mhc_case(op, dtype, qdtype):
    from effexport.custom_ops import _triton as T

    n, d = 4, 4096  # DeepSeek V4-Flash: hc_mult 4, dim 4096
    if op == "sinkhorn":
        T._sinkhorn_cuda(_cpu(2, 3, n, n, dtype=dtype), iters=20, eps=1e-6)
    else:
        T._mhc_pre_cuda(_cpu(2, 1, n, d, dtype=dtype), torch.randn(2 * n + n * n, n * d),
                        torch.randn(2 * n + n * n), torch.rand(3), iters=20)


BF16, FP32 = torch.bfloat16, torch.float32
ZAYA1 = (1, 8, 2, 128, 2, 2, 64)  # batch, Hq, Hk, d, K0, K1, rot of ZAYA1-8B's CCA
LAUNCH_CASES = [
    *[pytest.param(_decode_case, op, dt, qdt, id=f"decode-{op}-{name}")
      for op in ("cache", "ring", "ring_chunked", "read", "read_ring", "buffer", "buffer_inloop", "buffer_pdl")
      for name, dt, qdt in (("bf16", BF16, BF16), ("fp32", FP32, FP32), ("fp32q-bf16kv", BF16, FP32))],
    *[pytest.param(_sparse_case, kind, dt, dt, id=f"sparse-{kind}-{name}") for kind in ("hca", "csa")
      for name, dt in (("bf16", BF16), ("fp32", FP32))],
    *[pytest.param(_prefill_case, op, dt, qdt, id=f"prefill-{op}-{name}") for op in ("sliding", "full", "bidir")
      for name, dt, qdt in (("bf16", BF16, BF16), ("fp32", FP32, FP32), ("fp32q-bf16kv", BF16, FP32))],
    *[pytest.param(_prefill_case, op, BF16, BF16, id=f"prefill-{op}-bf16") for op in ("cache", "ring", "read", "buffer")],
    *[pytest.param(_prefill_case, "ring_chunked", dt, qdt, id=f"prefill-ring_chunked-{name}")
      for name, dt, qdt in (("bf16", BF16, BF16), ("fp32", FP32, FP32))],
    *[pytest.param(_cca_case, ZAYA1, dt, dt, id=f"cca-decode-{name}") for name, dt in (("bf16", BF16), ("fp32", FP32))],
    *[pytest.param(_mhc_case, op, dt, dt, id=f"mhc-{op}-{name}") for op in ("sinkhorn", "mhc_pre")
      for name, dt in (("bf16", BF16), ("fp32", FP32))],
]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="needs triton to compile the kernels (the test extra installs it: pip install -e .[test])")
@pytest.mark.parametrize("case,op,dtype,qdtype", LAUNCH_CASES)
def test_kernel_launches_compile_for_h200(monkeypatch, case, op, dtype, qdtype):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    from effexport.custom_ops import _triton as T
    from effexport.custom_ops._triton import kernels, prefill

    calls = []

    class Record:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.fn, grid, args, kwargs))

    from effexport.custom_ops._triton import cca, mhc

    for mod, name in ((kernels, "_partial"), (kernels, "_combine"), (prefill, "_prefill"), (cca, "_cca_decode"),
                      (mhc, "_sinkhorn"), (mhc, "_mhc_pre")):
        monkeypatch.setattr(mod, name, Record(getattr(mod, name)))
    monkeypatch.setattr(T, "_fast", lambda *tensors: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the cca / mhc fast-path checks
    monkeypatch.setattr(T, "_sm_count", lambda device: 132)
    case(op, dtype, qdtype)
    assert calls, f"{op}: no kernel launched"
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    for fn, grid, args, kwargs in calls:
        assert all(g >= 1 for g in grid), f"{fn.__name__}: empty grid {grid}"
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        compiled = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        assert compiled.metadata.shared <= H200_SMEM, (
            f"{fn.__name__} needs {compiled.metadata.shared} bytes of shared memory (H200: {H200_SMEM})")


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


@pytest.fixture
def gen(request):
    """A CUDA generator per test, seeded from the test's id: a test's inputs do not depend on which
    tests ran before it in the worker (selection, order, xdist), so a failure reproduces alone."""
    enable_triton()
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(request.node.nodeid.encode()))


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
@pytest.mark.parametrize("chunk,pos,t_len", [
    pytest.param(8, 16, 1, id="C8-chunk-start"), pytest.param(8, 21, 1, id="C8-mid-chunk"),
    pytest.param(8, 23, 1, id="C8-chunk-end"), pytest.param(8192, 20000, 1, id="C8192-decode"),
    pytest.param(8, 0, 37, id="C8-prefill"), pytest.param(64, 100, 300, id="C64-chunked-prefill"),
])
def test_attention_ring_chunked(gen, dtype, chunk, pos, t_len):
    """``attention_ring(chunked=True)`` (Llama 4's chunk-local cache of C slots): the decode kernel
    (T == 1) and the prefill kernel (T > 1) against the float64 reference, caches bit for bit."""
    q = _rand(2, 8, t_len, 128, dtype=dtype, gen=gen)
    k_new, v_new = _rand(2, 2, t_len, 128, dtype=dtype, gen=gen), _rand(2, 2, t_len, 128, dtype=dtype, gen=gen)
    k_ring, v_ring = _rand(2, 2, chunk, 128, dtype=dtype, gen=gen), _rand(2, 2, chunk, 128, dtype=dtype, gen=gen)
    p = torch.tensor(pos, device="cuda")
    kw = dict(scale=128 ** -0.5, window=chunk, chunked=True)
    out, k_r, v_r = ops.attention_ring(q, k_new, v_new, k_ring, v_ring, p, **kw)
    ref = attn_mod.attention_ring._init_fn(*_f64(q, k_new, v_new, k_ring, v_ring), p, **kw)
    _check(out, ref[0], dtype, "attention_ring(chunked)")
    same = attn_mod.attention_ring._init_fn(q, k_new, v_new, k_ring, v_ring, p, **kw)
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("capacity,pos,t_len,window", [
    pytest.param(4096, 0, 1, 0, id="pos0"),
    pytest.param(4096, 2000, 1, 0, id="mid"),
    pytest.param(4096, 4095, 1, 0, id="last"),
    pytest.param(32768, 1500, 1, 0, id="short-in-32k"),  # few rows in a large buffer: split at run time
    pytest.param(8192, 5000, 1, 512, id="window"),
    pytest.param(4096, 1000, 70, 0, id="chunk-T70"),
])
@pytest.mark.parametrize("batch,heads,kv_heads,d,use_sinks,softcap", [
    pytest.param(1, 8, 1, 512, False, 0.0, id="gemma4-global-d512"),
    pytest.param(8, 8, 2, 256, True, 0.0, id="b8-gqa4-d256-sinks"),
    pytest.param(2, 8, 8, 128, False, 30.0, id="mha-d128-softcap"),
])
def test_attention_buffer(gen, dtype, capacity, pos, t_len, window, batch, heads, kv_heads, d, use_sinks,
                          softcap):
    """``attention_buffer_inplace`` writes rows ``pos..pos+T-1`` into the caller's buffers and leaves
    every other row alone (bit for bit the reference's returned buffers), its output within tolerance
    of the float64 reference; the functional ``attention_buffer`` returns the same output and
    buffers and leaves its inputs untouched."""
    q = _rand(batch, heads, t_len, d, dtype=dtype, gen=gen)
    kn, vn = (_rand(batch, kv_heads, t_len, d, dtype=dtype, gen=gen) for _ in range(2))
    kb, vb = (_rand(batch, kv_heads, capacity, d, dtype=dtype, gen=gen) for _ in range(2))
    sinks = _rand(heads, dtype=torch.float32, gen=gen) if use_sinks else None
    p = torch.tensor(pos, device="cuda")
    kw = dict(scale=d ** -0.5, window=window, softcap=softcap)
    ref = attn_mod.attention_buffer._init_fn(*_f64(q, kn, vn, kb, vb), p, _f64(sinks)[0], **kw)[0]
    same = attn_mod.attention_buffer._init_fn(q, kn, vn, kb, vb, p, sinks, **kw)
    before = (kb.clone(), vb.clone())
    out, k_out, v_out = ops.attention_buffer(q, kn, vn, kb, vb, p, sinks, **kw)
    _check(out, ref, dtype, "attention_buffer")
    assert torch.equal(k_out, same[1]) and torch.equal(v_out, same[2])
    assert torch.equal(kb, before[0]) and torch.equal(vb, before[1])
    out_inplace = ops.attention_buffer_inplace(q, kn, vn, kb, vb, p, sinks, **kw)
    _check(out_inplace, ref, dtype, "attention_buffer_inplace")
    assert torch.equal(kb, same[1]) and torch.equal(vb, same[2])


@pytest.mark.gpu
@pytest.mark.parametrize("store,one_pass,pdl", [("after_loop", True, False), ("loop", False, False),
                                                ("after_loop", True, True)], ids=["default", "run25", "pdl"])
@pytest.mark.parametrize("capacity,pos", [(4096, 0), (4096, 1337), (4096, 4095), (32768, 20000)],
                         ids=["pos0", "mid", "last", "mid-32k"])
@pytest.mark.parametrize("batch", [1, 3])
def test_attention_buffer_inplace_stores(monkeypatch, gen, store, one_pass, pdl, capacity, pos, batch):
    """Both places of the new row's store (``plan.CONFIG["buffer_store"]``: after the loop, the
    default, or inside it with the two-pass combine, run 25's kernels), and the combine as a
    programmatic dependent launch, write exactly row ``pos`` and attend rows ``0..pos`` (Gemma 4
    global shapes, bf16)."""
    monkeypatch.setitem(plan.CONFIG, "buffer_store", store)
    monkeypatch.setitem(plan.CONFIG, "combine_one_pass", one_pass)
    monkeypatch.setitem(plan.CONFIG, "pdl", pdl)
    h, hkv, d = 8, 1, 512
    q = _rand(batch, h, 1, d, dtype=torch.bfloat16, gen=gen)
    kn, vn = (_rand(batch, hkv, 1, d, dtype=torch.bfloat16, gen=gen) for _ in range(2))
    kb, vb = (_rand(batch, hkv, capacity, d, dtype=torch.bfloat16, gen=gen) for _ in range(2))
    p = torch.tensor(pos, device="cuda")
    ref = attn_mod.attention_buffer._init_fn(*_f64(q, kn, vn, kb, vb), p, None, scale=d ** -0.5)[0]
    same = attn_mod.attention_buffer._init_fn(q, kn, vn, kb, vb, p, None, scale=d ** -0.5)
    out = ops.attention_buffer_inplace(q, kn, vn, kb, vb, p, scale=d ** -0.5)
    _check(out, ref, torch.bfloat16, f"attention_buffer_inplace ({store})")
    assert torch.equal(kb, same[1]) and torch.equal(vb, same[2])


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_attention_buffer_inplace_replays_from_a_cuda_graph(monkeypatch, gen, pdl):
    """Captured once, replayed at successive positions (``pos`` updated on the device): each replay
    writes its row and attends rows ``0..pos``, as the reference does step by step (also with the
    combine as a programmatic dependent launch, ``plan.CONFIG["pdl"]``)."""
    monkeypatch.setitem(plan.CONFIG, "pdl", pdl)
    b, h, hkv, d, cap = 2, 8, 1, 512, 2048
    kb, vb = (torch.zeros(b, hkv, cap, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q, kn, vn = (_rand(b, n, 1, d, dtype=torch.bfloat16, gen=gen) for n in (h, hkv, hkv))
    p = torch.tensor(0, device="cuda")
    k_ref, v_ref = kb.clone(), vb.clone()
    ops.attention_buffer_inplace(q, kn, vn, kb, vb, p, scale=1.0)  # compile outside the capture
    kb.zero_(), vb.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.attention_buffer_inplace(q, kn, vn, kb, vb, p, scale=1.0)
    for step in range(0, 1500, 149):
        for t in (q, kn, vn):
            t.copy_(_rand(*t.shape, dtype=t.dtype, gen=gen))
        p.fill_(step)
        graph.replay()
        k_ref[:, :, step], v_ref[:, :, step] = kn[:, :, 0], vn[:, :, 0]
        ref = attn_mod.attention_read._init_fn(*_f64(q, k_ref, v_ref), p, None, scale=1.0)
        _check(out, ref, torch.bfloat16, f"replay at pos {step}")
        assert torch.equal(kb, k_ref) and torch.equal(vb, v_ref), f"buffers after pos {step}"


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["cache", "ring", "read", "read_ring", "buffer"])
def test_fp32_query_over_bf16_cache(gen, op):
    """What the rewritten sample graphs pass (the samples upcast q for the score matmul): an fp32
    query over bf16 caches. The kernel's tf32x3 dots must keep the fp32 tolerance (1e-4)."""
    b, h, hkv, d = 2, 8, 1, 512
    slots = 3000 if op in ("cache", "read", "buffer") else 512
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
    elif op == "buffer":
        p = torch.tensor(slots - 1, device="cuda")
        ref = attn_mod.attention_buffer._init_fn(*_f64(q, kn, vn, k, v), p, None, **kw)[0]
        out = ops.attention_buffer_inplace(q, kn, vn, k, v, p, None, **kw)
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
    pytest.param("hca", 128, 1024, 0, 131071, id="hca-all-visible"),
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


# ------------------------------------------------------------------------------------ cca decode
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape,bias,zero_state", [
    pytest.param(ZAYA1, True, False, id="zaya1-8b"),
    pytest.param((8, 8, 2, 128, 2, 2, 64), False, True, id="zaya1-b8-nobias-zero-state"),
    pytest.param((2, 3, 1, 48, 3, 2, 48), True, False, id="mqa-K3-full-rope-d48"),
    pytest.param((3, 6, 3, 80, 2, 3, 16), True, False, id="gqa2-K1-3-d80"),
])
def test_cca_decode(gen, dtype, shape, bias, zero_state):
    """One decode token of ``effexport::cca`` through the fused kernel: q and k within tolerance of
    the float64 reference, v and both states equal to the reference's bit for bit; T > 1 runs the
    reference itself."""
    b, hq, hk, d, k0, k1, rot = shape
    c, p, dv = (hq + hk) * d, k0 - 1 + k1 - 1, hk * d // 2
    args = [_rand(b, 1, hq * d, dtype=dtype, gen=gen), _rand(b, 1, hk * d, dtype=dtype, gen=gen),
            _rand(b, 1, dv, dtype=dtype, gen=gen), _rand(b, 1, dv, dtype=dtype, gen=gen),
            _rand(c, 1, k0, dtype=dtype, gen=gen) * 0.5, _rand(c, d, k1, dtype=dtype, gen=gen) * d ** -0.5,
            (torch.rand(hk, generator=gen, device="cuda") + 0.5),
            torch.cos(_rand(1, rot, dtype=torch.float32, gen=gen)), torch.sin(_rand(1, rot, dtype=torch.float32, gen=gen)),
            _rand(b, c, p, dtype=dtype, gen=gen) * (0 if zero_state else 1), _rand(b, dv, dtype=dtype, gen=gen),
            _rand(c, dtype=dtype, gen=gen) * 0.1 if bias else None, _rand(c, dtype=dtype, gen=gen) * 0.1 if bias else None]
    got = ops.cca(*args)
    ref = cca_mod.cca._init_fn(*_f64(*args))
    same = cca_mod.cca._init_fn(*args)
    _check(got[0], ref[0], dtype, "cca q (decode kernel)")
    _check(got[1], ref[1], dtype, "cca k (decode kernel)")
    for name, a, e in zip(("v", "conv_state", "shift_state"), got[2:], same[2:]):
        assert a.shape == e.shape and torch.equal(a, e), f"cca {name} differs from the reference"
    multi = [torch.cat([a, a], 1) if i < 4 else a for i, a in enumerate(args)]
    multi[7], multi[8] = torch.cat([args[7]] * 2), torch.cat([args[8]] * 2)
    assert all(torch.equal(x, y) for x, y in zip(ops.cca(*multi), cca_mod.cca._init_fn(*multi)))


# ------------------------------------------------------------------------------------------- mHC
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n,iters,lead", [
    pytest.param(4, 20, (1, 1), id="n4-it20-decode"),
    pytest.param(4, 20, (3, 70), id="n4-it20-b3t70"),
    pytest.param(4, 1, (2, 5), id="n4-it1"),
    pytest.param(3, 2, (200,), id="n3-it2"),
    pytest.param(8, 20, (2, 33), id="n8-it20"),
])
def test_sinkhorn(gen, dtype, n, iters, lead):
    """``effexport::sinkhorn`` through the kernel: within tolerance of the float64 reference, and
    of the eager op on the same inputs (fp32: the same arithmetic, ~1 ulp)."""
    x = _rand(*lead, n, n, dtype=dtype, gen=gen) * 3
    got = ops.sinkhorn(x, iters=iters, eps=1e-6)
    _check(got, mhc_mod.sinkhorn._init_fn(x.double(), iters=iters, eps=1e-6), dtype, "sinkhorn (kernel)")
    eager = mhc_mod.sinkhorn._init_fn(x, iters=iters, eps=1e-6)
    assert (got.float() - eager.float()).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)


def _mhc_pre_args(gen, dtype, b, t, n, d):
    rows = 2 * n + n * n
    x = _rand(b, t, n, d, dtype=dtype, gen=gen)
    fn = _rand(rows, n * d, dtype=torch.float32, gen=gen) * (n * d) ** -0.5
    base = _rand(rows, dtype=torch.float32, gen=gen) * 0.5
    scale = torch.rand(3, generator=gen, device="cuda") + 0.5
    return x, fn, base, scale


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("b,t,n,d,iters", [
    pytest.param(1, 1, 4, 4096, 20, id="v4-flash-decode"),
    pytest.param(2, 37, 4, 4096, 20, id="v4-flash-prefill"),
    pytest.param(3, 2, 4, 1000, 1, id="d1000-it1"),
    pytest.param(2, 3, 3, 96, 2, id="n3-d96"),
])
def test_mhc_pre(gen, dtype, b, t, n, d, iters):
    """``effexport::mhc_pre`` (projection + fused kernel): u, post and comb within tolerance of the
    float64 reference and close to the eager op's (u in X's dtype: bf16 may differ by an ulp)."""
    args = _mhc_pre_args(gen, dtype, b, t, n, d)
    got = ops.mhc_pre(*args, iters=iters)
    ref = mhc_mod.mhc_pre._init_fn(*_f64(*args), iters=iters)
    eager = mhc_mod.mhc_pre._init_fn(*args, iters=iters)
    for name, a, r, e in zip(("u", "post", "comb"), got, ref, eager):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        _check(a, r, a.dtype, f"mhc_pre {name} (kernel)")
        # the fp32 GEMM may be TF32 / split differently from the reference's: compare at tolerance
        assert ((a.double() - e.double()).abs().max() / e.double().abs().max()).item() <= TOL[a.dtype], name


@pytest.mark.gpu
def test_mhc_pre_replays_from_a_cuda_graph(gen):
    """``mhc_pre`` and ``sinkhorn`` captured once in a CUDA graph (no host syncs, allocations from the
    graph's pool): each replay on new inputs equals the uncaptured call bit for bit."""
    args = _mhc_pre_args(gen, torch.bfloat16, 1, 1, 4, 4096)
    logits = _rand(2, 4, 4, dtype=torch.float32, gen=gen)
    ops.mhc_pre(*args), ops.sinkhorn(logits, iters=20, eps=1e-6)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.mhc_pre(*args)
        comb = ops.sinkhorn(logits, iters=20, eps=1e-6)
    for _ in range(3):
        for t in args + (logits,):
            t.copy_(_rand(*t.shape, dtype=t.dtype, gen=gen))
        args[3].abs_().add_(0.5)
        graph.replay()
        want = ops.mhc_pre(*args)
        for name, a, e in zip(("u", "post", "comb"), out, want):
            assert torch.equal(a, e), f"replayed mhc_pre {name} differs from the uncaptured call"
        assert torch.equal(comb, ops.sinkhorn(logits, iters=20, eps=1e-6)), "replayed sinkhorn"
