"""The Triton kernels' numbers on the CPU: every kernel of custom_ops/_triton (split-K decode for
``attention_cache`` / ``attention_ring`` / ``attention_read`` (full and ring) / ``sparse_attention_ring``
(HCA, CSA), the block-sparse prefill kernel behind ``attention`` and the multi-token cache ops, the
fused CCA decode kernel, the mHC ``sinkhorn`` and ``mhc_pre`` kernels, the decode-shape ``gemv``) run by Triton's interpreter
(``TRITON_INTERPRET=1``) on small fp32 shapes, against the op's eager reference in float64: max relative error ``max|out - ref| / max|ref|`` <= 1e-5,
outputs finite and not all zero, and the caches / states the ops return equal the reference's bit
for bit. The shapes are picked so the decode kernels split the rows over several programs (the
combine kernel merges partials), rings have wrapped, and CSA indices include -1, out-of-range and
repeated entries.

The interpreter runs in a subprocess: ``TRITON_INTERPRET`` is read when Triton is imported, and
other tests of a session import Triton for the sm_90 compile checks (tests/test_gpu_kernels.py).
There the registrations' device checks are bypassed (``_fast`` returns True, ``Tensor.is_cuda`` reads
True around the CCA and mHC calls, 8 SMs) so the CUDA launch code runs unchanged on CPU tensors.

Two known interpreter problems, and what this file does about them:
* numpy >= 2.4 refuses ``int()`` of a one-element array, which the interpreter's ``tensor.__index__``
  does (``TypeError: only 0-dimensional arrays can be converted to Python scalars``). The
  subprocess wraps ``triton.runtime.interpreter._patch_lang_tensor`` to install an ``__index__``
  that calls ``.item()`` first (:func:`_patch_interpreter`; a no-op change on older numpy), so
  numpy is not pinned for the rest of the suite.
* the interpreter computes bf16 ``tl.dot`` wrongly, so only fp32 runs here; bf16 and the mixed
  fp32-query / bf16-cache dots are checked on the GPU (tests/test_gpu_kernels.py, ``gpu`` marker).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

# triton is in the test extra on Linux x86_64 (pyproject.toml): there a missing triton fails here
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    (platform.system(), platform.machine()) != ("Linux", "x86_64"),
    reason="the test extra installs triton on Linux x86_64 only")]
TOL = 1e-5
TIMEOUT_S = 600


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _f64(*tensors):
    return [None if t is None else t.double() if t.is_floating_point() else t for t in tensors]


def _decode_cache(T, A, gen, window, sinks):
    b, h, hkv, d, dv, past = 2, 4, 2, 32, 24, 150
    q, kn, vn = _rand(gen, b, h, 1, d), _rand(gen, b, hkv, 1, d), _rand(gen, b, hkv, 1, dv)
    kp, vp = _rand(gen, b, hkv, past, d), _rand(gen, b, hkv, past, dv)
    s = _rand(gen, h) if sinks else None
    kw = dict(scale=d ** -0.5, window=window, softcap=30.0 if sinks else 0.0)
    got = T._cache_cuda(q, kn, vn, kp, vp, s, **kw)
    ref = A.attention_cache._init_fn(*_f64(q, kn, vn, kp, vp, s), **kw)
    same = A.attention_cache._init_fn(q, kn, vn, kp, vp, s, **kw)
    return got[0], ref[0], list(zip(got[1:], same[1:]))


def _decode_ring(T, A, gen):
    b, h, hkv, d, slots, pos = 2, 4, 1, 32, 16, 53
    q, kn, vn = _rand(gen, b, h, 1, d), _rand(gen, b, hkv, 1, d), _rand(gen, b, hkv, 1, d)
    kr, vr, s = _rand(gen, b, hkv, slots, d), _rand(gen, b, hkv, slots, d), _rand(gen, h)
    p, kw = torch.tensor(pos), dict(scale=d ** -0.5, window=slots, softcap=0.0)
    got = T._ring_cuda(q, kn, vn, kr, vr, p, s, **kw)
    ref = A.attention_ring._init_fn(*_f64(q, kn, vn, kr, vr), p, s.double(), **kw)
    same = A.attention_ring._init_fn(q, kn, vn, kr, vr, p, s, **kw)
    return got[0], ref[0], list(zip(got[1:], same[1:]))


def _decode_read(T, A, gen, ring, window):
    b, h, hkv, d = 2, 4, 2, 32
    slots, pos = (16, 100) if ring else (200, 150)
    q, k, v = _rand(gen, b, h, 1, d), _rand(gen, b, hkv, slots, d), _rand(gen, b, hkv, slots, d)
    p, kw = torch.tensor(pos), dict(scale=d ** -0.5, window=window, softcap=0.0, ring=ring)
    return T._read_cuda(q, k, v, p, None, **kw), A.attention_read._init_fn(*_f64(q, k, v), p, None, **kw), []


def _buffer(T, A, gen, groups, pos, t_len=1, window=0, sinks=False, inplace=True, cap=200, batch=2,
            **config):
    """``attention_buffer_inplace`` (or the functional ``attention_buffer``) over a ``cap``-row buffer: the
    output against float64, the buffers after the call (mutated, or returned) equal to the
    reference's bit for bit -- the new rows at ``pos`` and every other row unchanged. The decode
    kernel cuts rows ``0..pos`` into chunks at run time: with 8 SMs, 4 (batch, KV head) pairs and
    64-row blocks, one chunk at pos 0, two at pos 97, four at pos 199, four of three blocks each at
    pos 519 (so a chunk of one block per program would miss rows). The new row is stored by the
    last split (empty at pos 0 and 97: another program attends it) unless ``buffer_store="loop"``
    (the first design: stored from the tile of the program holding it). ``config``: overrides of
    ``plan.CONFIG`` for this call (``dynamic_chunk=False``: the static cut, row pos mid-chunk)."""
    from effexport.custom_ops._triton import plan

    saved = dict(plan.CONFIG)
    plan.CONFIG.update(config)
    try:
        return _buffer_call(T, A, gen, groups, pos, t_len, window, sinks, inplace, cap, batch)
    finally:
        plan.CONFIG.clear()
        plan.CONFIG.update(saved)


def _buffer_call(T, A, gen, groups, pos, t_len, window, sinks, inplace, cap, batch):
    b, hkv, d, dv = batch, 2, 32, 24
    q, kn, vn = _rand(gen, b, hkv * groups, t_len, d), _rand(gen, b, hkv, t_len, d), _rand(gen, b, hkv, t_len, dv)
    kb, vb = _rand(gen, b, hkv, cap, d), _rand(gen, b, hkv, cap, dv)
    s = _rand(gen, hkv * groups) if sinks else None
    p, kw = torch.tensor(pos), dict(scale=d ** -0.5, window=window, softcap=30.0 if sinks else 0.0)
    ref = A.attention_buffer._init_fn(*_f64(q, kn, vn, kb, vb), p, *_f64(s), **kw)
    same = A.attention_buffer._init_fn(q, kn, vn, kb, vb, p, s, **kw)
    if not inplace:  # the returned buffers are the reference's; the inputs stay as they were
        before = (kb.clone(), vb.clone())
        got = T._buffer_cuda(q, kn, vn, kb, vb, p, s, **kw)
        return got[0], ref[0], list(zip(got[1:], same[1:])) + list(zip((kb, vb), before))
    k_buf, v_buf = kb.clone(), vb.clone()
    out = T._buffer_inplace_cuda(q, kn, vn, k_buf, v_buf, p, s, **kw)
    return out, ref[0], [(k_buf, same[1]), (v_buf, same[2])]


def _sparse(T, S, gen, kind):
    b, heads, dim, window, slots, pos = 2, 8, 32, 8, 12, 150  # a ring wider than the window
    ratio, ncomp, topk = (4, 40, 8) if kind == "csa" else (16, 12, 0)
    if kind == "hca-long":  # 300 of 400 entries visible: cut at run time into 128-row chunks (2 blocks)
        b, pos, ratio, ncomp = 4, 600, 2, 400
    q, kv, comp, sink = _rand(gen, b, 1, heads, dim), _rand(gen, b, slots, dim), _rand(gen, b, ncomp, dim), _rand(gen, heads)
    idx = None
    if kind == "csa":  # visible, invisible, out-of-range, -1 and repeated entries
        idx = torch.randint(-1, (pos + 1) // ratio + 4, (b, 1, topk), generator=gen)
        idx[..., :2] = idx[..., 2:4]
        idx[..., 4] = ncomp + 3
        idx[..., 5], idx[..., 6] = (pos + 1) // ratio - 1, (pos + 1) // ratio  # last visible, first not
    p, kw = torch.tensor(pos), dict(scale=dim ** -0.5, window=window, ratio=ratio)
    got = T._sparse_ring_cuda(q, kv, comp, idx, sink, p, **kw)
    return got, S.sparse_attention_ring._init_fn(*_f64(q, kv, comp, idx, sink), p, **kw), []


def _prefill(T, A, gen, causal):
    b, h, hkv, d, dv = 1, 4, 2, 32, 24
    t, s_len, window = (70, 70, 20) if causal else (40, 33, 0)
    q, k, v = _rand(gen, b, h, t, d), _rand(gen, b, hkv, s_len, d), _rand(gen, b, hkv, s_len, dv)
    sinks = _rand(gen, h) if causal else None
    kw = dict(scale=d ** -0.5, causal=causal, window=window, softcap=30.0 if causal else 0.0)
    return T._attention_cuda(q, k, v, sinks, **kw), A.attention._init_fn(*_f64(q, k, v, sinks), **kw), []


def _chunk(T, A, gen, op):
    b, h, hkv, d = 1, 4, 1, 32
    t, pos, window = {"cache": (30, 40, 0), "ring": (20, 50, 16), "read": (10, 60, 0)}[op]
    rows = {"cache": pos, "ring": window, "read": pos + t + 5}[op]
    q, kn, vn = _rand(gen, b, h, t, d), _rand(gen, b, hkv, t, d), _rand(gen, b, hkv, t, d)
    kc, vc, s = _rand(gen, b, hkv, rows, d), _rand(gen, b, hkv, rows, d), _rand(gen, h)
    p, kw = torch.tensor(pos), dict(scale=d ** -0.5, window=window, softcap=0.0)
    if op == "cache":
        got = T._cache_cuda(q, kn, vn, kc, vc, s, **kw)
        ref = A.attention_cache._init_fn(*_f64(q, kn, vn, kc, vc, s), **kw)
        same = A.attention_cache._init_fn(q, kn, vn, kc, vc, s, **kw)
    elif op == "ring":
        got = T._ring_cuda(q, kn, vn, kc, vc, p, s, **kw)
        ref = A.attention_ring._init_fn(*_f64(q, kn, vn, kc, vc), p, s.double(), **kw)
        same = A.attention_ring._init_fn(q, kn, vn, kc, vc, p, s, **kw)
    else:
        return T._read_cuda(q, kc, vc, p, s, **kw), A.attention_read._init_fn(*_f64(q, kc, vc), p, s.double(), **kw), []
    return got[0], ref[0], list(zip(got[1:], same[1:]))


def _as_cuda(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``Tensor.is_cuda`` reading True (the fused paths' device checks)."""
    is_cuda = torch.Tensor.is_cuda
    torch.Tensor.is_cuda = property(lambda self: True)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.Tensor.is_cuda = is_cuda


def _sinkhorn(T, M, gen, n, iters):
    """``sinkhorn`` of [2, t, n, n] logits for t = 1, 37, 150 (one, several and a partial block of
    tokens per program), all through the kernel; compared as one tensor."""
    got, ref = [], []
    for t in (1, 37, 150):
        x = _rand(gen, 2, t, n, n) * 3
        got.append(_as_cuda(T._sinkhorn_cuda, x, iters=iters, eps=1e-6).flatten())
        ref.append(M.sinkhorn._init_fn(x.double(), iters=iters, eps=1e-6).flatten())
    return torch.cat(got), torch.cat(ref), []


def _mhc_pre(T, M, gen, b, t, n, d, iters):
    """``mhc_pre``: the projection in torch, the rest in the fused kernel (d > 1024 at n = 4: two
    slices of X per pass, the last one partial); u, post and comb compared as one tensor."""
    rows = 2 * n + n * n
    x, fn = _rand(gen, b, t, n, d), _rand(gen, rows, n * d) * (n * d) ** -0.5
    base, scale = _rand(gen, rows) * 0.5, torch.rand(3, generator=gen) + 0.5
    got = _as_cuda(T._mhc_pre_cuda, x, fn, base, scale, iters=iters)
    ref = M.mhc_pre._init_fn(*_f64(x, fn, base, scale), iters=iters)
    return torch.cat([a.flatten() for a in got]), torch.cat([a.flatten() for a in ref]), []


def _gemv(T, M, gen, rows, k, n, block_n, dot):
    """The decode-shape projection (:mod:`effexport.custom_ops._triton.gemv`, a bench candidate, no op
    yet): K and N not multiples of the blocks (masked tails), both paths."""
    from effexport.custom_ops._triton.gemv import gemv

    x, w = _rand(gen, rows, k), _rand(gen, n, k) * k ** -0.5
    return gemv(x, w, block_n=block_n, block_k=32, dot=dot), x.double() @ w.double().T, []


def _cca(T, C, gen):
    b, hq, hk, d, k0, k1, rot = 2, 4, 2, 32, 2, 2, 16
    c, p, dv = (hq + hk) * d, k0 - 1 + k1 - 1, hk * d // 2
    args = [_rand(gen, b, 1, hq * d), _rand(gen, b, 1, hk * d), _rand(gen, b, 1, dv), _rand(gen, b, 1, dv),
            _rand(gen, c, 1, k0) * 0.5, _rand(gen, c, d, k1) * d ** -0.5, torch.rand(hk, generator=gen) + 0.5,
            torch.cos(_rand(gen, 1, rot)), torch.sin(_rand(gen, 1, rot)), _rand(gen, b, c, p), _rand(gen, b, dv),
            _rand(gen, c) * 0.1, _rand(gen, c) * 0.1]
    got = _as_cuda(T._cca_cuda, *args)
    ref, same = C.cca._init_fn(*_f64(*args)), C.cca._init_fn(*args)
    # q and k through the kernel (compared as one tensor); v and both states must be exact
    return (torch.cat([got[0].flatten(), got[1].flatten()]), torch.cat([ref[0].flatten(), ref[1].flatten()]),
            list(zip(got[2:], same[2:])))


CASES = {
    "decode-cache": lambda T, m, g: _decode_cache(T, m["attention"], g, 0, False),
    "decode-cache-window-sinks-softcap": lambda T, m, g: _decode_cache(T, m["attention"], g, 37, True),
    "decode-ring-wrapped": lambda T, m, g: _decode_ring(T, m["attention"], g),
    "decode-read-full": lambda T, m, g: _decode_read(T, m["attention"], g, False, 0),
    "decode-read-full-window": lambda T, m, g: _decode_read(T, m["attention"], g, False, 40),
    "decode-read-ring": lambda T, m, g: _decode_read(T, m["attention"], g, True, 12),
    # in-place full-cache buffer: pos at 0, mid and capacity - 1; GQA groups 1 and 4; window, sinks
    "decode-buffer-pos0-mha": lambda T, m, g: _buffer(T, m["attention"], g, 1, 0),
    "decode-buffer-mid-gqa4": lambda T, m, g: _buffer(T, m["attention"], g, 4, 97),
    "decode-buffer-last-gqa4": lambda T, m, g: _buffer(T, m["attention"], g, 4, 199),
    "decode-buffer-long-gqa2": lambda T, m, g: _buffer(T, m["attention"], g, 2, 519, cap=520),
    "decode-buffer-last-mha-window-sinks-softcap": lambda T, m, g: _buffer(T, m["attention"], g, 1, 199, 1, 70, True),
    # batch 1 and 3 (3 x 2 KV heads: 2 splits of 128 rows at cap 200), the static cut (row pos in the
    # middle of a chunk that holds rows past it), the first design (new row stored inside the loop;
    # once with the two-pass combine, as run 25 measured it)
    "decode-buffer-pos0-b1": lambda T, m, g: _buffer(T, m["attention"], g, 4, 0, batch=1),
    "decode-buffer-midsplit-b1": lambda T, m, g: _buffer(T, m["attention"], g, 4, 150, batch=1),
    "decode-buffer-last-b1": lambda T, m, g: _buffer(T, m["attention"], g, 2, 199, batch=1),
    "decode-buffer-pos0-b3": lambda T, m, g: _buffer(T, m["attention"], g, 2, 0, batch=3),
    "decode-buffer-midsplit-b3": lambda T, m, g: _buffer(T, m["attention"], g, 4, 70, batch=3),
    "decode-buffer-last-b3-window": lambda T, m, g: _buffer(T, m["attention"], g, 1, 199, 1, 45, batch=3),
    "decode-buffer-static-midsplit-b3": lambda T, m, g: _buffer(T, m["attention"], g, 2, 100, batch=3,
                                                                dynamic_chunk=False),
    "decode-buffer-static-midsplit-b1": lambda T, m, g: _buffer(T, m["attention"], g, 4, 30, batch=1,
                                                                dynamic_chunk=False),
    "decode-buffer-inloop-pos0-b1": lambda T, m, g: _buffer(T, m["attention"], g, 4, 0, batch=1,
                                                            buffer_store="loop"),
    "decode-buffer-inloop-mid-b3": lambda T, m, g: _buffer(T, m["attention"], g, 2, 97, batch=3,
                                                           buffer_store="loop", combine_one_pass=False),
    "decode-buffer-inloop-last-b2-sinks": lambda T, m, g: _buffer(T, m["attention"], g, 1, 199, 1, 0, True,
                                                                  buffer_store="loop"),
    "decode-buffer-functional-mid-gqa2": lambda T, m, g: _buffer(T, m["attention"], g, 2, 150, inplace=False),
    "chunk-buffer-gqa2-sinks": lambda T, m, g: _buffer(T, m["attention"], g, 2, 121, 6, 0, True),
    "sparse-hca": lambda T, m, g: _sparse(T, m["sparse"], g, "hca"),
    "sparse-csa": lambda T, m, g: _sparse(T, m["sparse"], g, "csa"),
    "sparse-hca-long": lambda T, m, g: _sparse(T, m["sparse"], g, "hca-long"),
    "prefill-causal-window-sinks-softcap": lambda T, m, g: _prefill(T, m["attention"], g, True),
    "prefill-bidirectional": lambda T, m, g: _prefill(T, m["attention"], g, False),
    "chunk-cache": lambda T, m, g: _chunk(T, m["attention"], g, "cache"),
    "chunk-ring": lambda T, m, g: _chunk(T, m["attention"], g, "ring"),
    "chunk-read": lambda T, m, g: _chunk(T, m["attention"], g, "read"),
    "cca-decode": lambda T, m, g: _cca(T, m["cca"], g),
    **{f"sinkhorn-n{n}-iters{it}": (lambda n, it: lambda T, m, g: _sinkhorn(T, m["mhc"], g, n, it))(n, it)
       for n in (4, 3, 8) for it in (1, 2, 20)},
    "gemv-m1-sum": lambda T, m, g: _gemv(T, m, g, 1, 100, 37, 8, False),
    "gemv-m3-dot": lambda T, m, g: _gemv(T, m, g, 3, 200, 45, 16, True),
    "gemv-m8-sum": lambda T, m, g: _gemv(T, m, g, 8, 64, 20, 4, False),
    "mhcpre-n4-d40-b2t3": lambda T, m, g: _mhc_pre(T, m["mhc"], g, 2, 3, 4, 40, 20),
    "mhcpre-n4-d1100-decode": lambda T, m, g: _mhc_pre(T, m["mhc"], g, 1, 1, 4, 1100, 20),
    "mhcpre-n3-d24-iters1": lambda T, m, g: _mhc_pre(T, m["mhc"], g, 3, 2, 3, 24, 1),
    "mhcpre-n8-d64-iters2": lambda T, m, g: _mhc_pre(T, m["mhc"], g, 1, 5, 8, 64, 2),
}


def _patch_interpreter(launched: list) -> None:
    """numpy >= 2.4: the interpreter's ``tensor.__index__`` is ``int(ndarray)``, which numpy refuses
    for a one-element array of rank >= 1; install one that takes ``.item()`` first. Also record the
    name of every kernel run in ``launched`` (a case that fell back to the reference runs none)."""
    from triton.runtime import interpreter

    original, run = interpreter._patch_lang_tensor, interpreter.InterpretedFunction.run

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    def record(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    interpreter._patch_lang_tensor = patch
    interpreter.InterpretedFunction.run = record


def _run_cases() -> dict:
    """(In the ``TRITON_INTERPRET=1`` subprocess.) ``{case: {"rel_err", "finite", "nonzero",
    "same_shape", "exact", "kernels"}}`` or ``{case: {"error": text}}``."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    launched = []
    _patch_interpreter(launched)
    from effexport.custom_ops import _triton as T
    from effexport.custom_ops import attention, cca, mhc, sparse_attention

    T._fast = lambda *tensors: True
    T._sm_count = lambda device: 8
    mods = {"attention": attention, "sparse": sparse_attention, "cca": cca, "mhc": mhc}
    results = {}
    for i, (name, case) in enumerate(CASES.items()):
        launched.clear()
        try:
            out, ref, states = case(T, mods, torch.Generator().manual_seed(100 + i))
            results[name] = {
                "rel_err": ((out.double() - ref).abs().max() / ref.abs().max()).item(),
                "finite": bool(torch.isfinite(out).all()), "nonzero": bool(out.abs().max() > 0),
                "same_shape": out.shape == ref.shape and out.dtype == torch.float32,
                "exact": all(a.shape == e.shape and torch.equal(a, e) for a, e in states),
                "kernels": sorted(set(launched))}
        except Exception as exc:  # noqa: BLE001  (reported per case by the test)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


@pytest.fixture(scope="module")
def interpreted():
    """Every case run once, in one ``TRITON_INTERPRET=1`` subprocess."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT_S, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


KERNELS = {"decode": ["_combine", "_partial"], "sparse": ["_combine", "_partial"], "prefill": ["_prefill"],
           "chunk": ["_prefill"], "cca": ["_cca_decode"], "sinkhorn": ["_sinkhorn"],
           "mhcpre": ["_mhc_pre"], "gemv": ["_gemv"]}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_float64_reference(interpreted, case):
    r = interpreted[case]
    assert "error" not in r, f"{case}: {r.get('error')}"
    assert r["kernels"] == KERNELS[case.split("-")[0]], f"{case}: ran {r['kernels']}"
    assert r["same_shape"] and r["finite"] and r["nonzero"], f"{case}: {r}"
    assert r["rel_err"] <= TOL, f"{case}: max rel err {r['rel_err']:.3g} > {TOL}"
    assert r["exact"], f"{case}: the returned caches / states differ from the reference's"


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(_run_cases()))
