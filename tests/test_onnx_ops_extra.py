"""ONNX lowering of ``cca``, ``kv_compress``, ``kv_compress_step``, ``indexer_topk``,
``sparse_attention`` and ``sparse_attention_ring``: ORT (CPU) parity with the eager ops at several
dynamic shapes per exported model, in both profiles, plus graph structure (two grouped ``Conv`` for
CCA, ``TopK`` for the indexer, static step-output shapes, no dense mask constants; one
``effexport``-domain node per op call, each with a model-local function body, call sites with
different static parameters told apart by the function ``overload``).

Each op is exported once per profile (a module calls its variants side by side, e.g. CSA and HCA),
cached for the module. Not covered here: whole-model export (tests/test_onnx_export.py) and
non-fp32 dtypes.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _helpers import assert_close

from effexport.custom_ops.kv_compress import empty_state
from effexport.exporter.backends.onnx.profiles import ORT_PROFILES
from effexport.samples._blocks import inv_freq_default, rope_cos_sin

ops = torch.ops.effexport
Dim = torch.export.Dim
HQ, HK, D, K0, K1, ROT = 4, 2, 8, 2, 3, 4  # CCA
C, P, DV = (HQ + HK) * D, K0 + K1 - 2, HK * D // 2
R, CW, RD, NCAP = 4, 8, 4, 6  # compressor: ratio, entry width c, rope dims, entry capacity
HI, DI, TOPK = 3, 8, 4  # indexer
H, DA, WIN, SLOTS, KSEL = 4, 8, 4, 6, 3  # sparse attention



def _gen(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g)


_CACHE: dict = {}


def _export(key: str, profile: str, module: torch.nn.Module, args, dynamic) -> tuple[onnx.ModelProto, object]:
    """(model, ORT session), exported once per (key, profile) for the whole module."""
    if (key, profile) not in _CACHE:
        from effexport.exporter.backends.onnx.export import lower

        model = lower(module, args, profile, dynamic_shapes=dynamic)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        _CACHE[key, profile] = (model, sess)
    return _CACHE[key, profile]


def _run(model: onnx.ModelProto, sess, args) -> list[np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    feeds = {i.name: a.numpy() for i, a in zip(model.graph.input, args) if i.name in names}
    return sess.run(None, feeds)


def _check(got, expected, what: str) -> None:
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(got) == len(expected), what
    for j, (g, e) in enumerate(zip(got, expected)):
        _close(torch.from_numpy(g), e.detach(), f"{what} out{j}")


def _close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """fp32 rel 1e-5 on finite values; infinities (the compressor's empty state rows, -inf) must
    sit at the same places with the same sign."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    inf = expected.isinf()
    assert torch.equal(got.isinf(), inf) and torch.equal(got[inf], expected[inf]), f"{what}: infinities differ"
    assert_close(got.masked_fill(inf, 0.0), expected.masked_fill(inf, 0.0), rtol=1e-5, what=what)


def _all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return list(model.graph.node) + [n for f in model.functions for n in f.node]


def _assert_clean(model: onnx.ModelProto, calls: dict[str, int] | None = None) -> None:
    """Every effexport-domain node has a model-local function body (matched with its overload),
    whose nodes are standard ops; ``calls``: the effexport node count per op type, and no
    standard op outside them besides glue (the bodies are not inlined); no rank>=2 boolean constant."""
    local = {(f.domain, f.name, f.overload): f for f in model.functions if f.node}
    ours = [n for n in model.graph.node if n.domain == "effexport"]
    assert all(("effexport", n.op_type, n.overload) in local for n in ours)
    assert all(m.domain in ("", "ai.onnx") for f in local.values() for m in f.node)
    if calls is not None:
        assert Counter(n.op_type for n in ours) == Counter(calls)
        assert len(model.graph.node) < 3 * len(ours) + 8, [n.op_type for n in model.graph.node]
    for t in model.graph.initializer:
        assert not (t.data_type == onnx.TensorProto.BOOL and len(t.dims) >= 2), t.name
    for n in _all_nodes(model):
        if n.op_type == "Constant":
            for a in n.attribute:
                assert not (a.t.data_type == onnx.TensorProto.BOOL and len(a.t.dims) >= 2), n.output[0]


# ----------------------------------------------------------------------------------------- CCA
class _Cca(torch.nn.Module):
    """``effexport::cca`` with its conv weights, biases and temperature as parameters."""

    def __init__(self):
        super().__init__()
        r = _gen(0)
        self.w0, self.w1 = torch.nn.Parameter(r(C, 1, K0) * 0.5), torch.nn.Parameter(r(C, D, K1) * D ** -0.5)
        self.b0, self.b1 = torch.nn.Parameter(r(C) * 0.1), torch.nn.Parameter(r(C) * 0.1)
        self.temp = torch.nn.Parameter(1 + 0.2 * r(HK))

    def forward(self, q, k, v_cur, v_del, cos, sin, conv_state, shift_state):
        return ops.cca(q, k, v_cur, v_del, self.w0, self.w1, self.temp, cos, sin, conv_state, shift_state,
                       self.b0, self.b1)


def _cca_inputs(batch: int, t_len: int, start: int, seed: int):
    r = _gen(seed)
    cos, sin = rope_cos_sin(torch.arange(start, start + t_len), inv_freq_default(ROT, 1e4))
    zero = start == 0
    return (r(batch, t_len, HQ * D), r(batch, t_len, HK * D), r(batch, t_len, DV), r(batch, t_len, DV),
            cos, sin, torch.zeros(batch, C, P) if zero else r(batch, C, P),
            torch.zeros(batch, DV) if zero else r(batch, DV))


def _cca(profile: str):
    bt, t = {0: Dim("batch"), 1: Dim("t")}, {0: Dim("t")}
    return _export("cca", profile, _Cca().eval(), _cca_inputs(2, 3, 0, 0),
                   (bt, bt, bt, bt, t, t, {0: Dim("batch")}, {0: Dim("batch")}))


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_cca_parity(profile):
    """q, k, v and both states equal eager (rel 1e-5) at prefill, decode and chunk shapes."""
    model, sess = _cca(profile)
    module = _Cca().eval()
    for i, (batch, t_len, start) in enumerate([(1, 1, 5), (3, 7, 0), (2, 2, 9), (1, 5, 0)]):
        args = _cca_inputs(batch, t_len, start, seed=i + 1)
        _check(_run(model, sess, args), module(*args), f"cca {profile} B={batch} T={t_len} start={start}")


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_cca_structure(profile):
    """One effexport::cca node with its static parameters as attributes; its body has exactly two
    Conv nodes: depthwise (group C) then grouped (group Hq+Hk), and normalizes and rotates the query
    and key heads as one tensor: one L2 norm (one ReduceSum, one Sqrt) and one rotate-half (one
    Neg), where separate query / key tails had two of each (86 -> 65 non-constant body nodes)."""
    model, _ = _cca(profile)
    convs = [n for n in _all_nodes(model) if n.op_type == "Conv"]
    groups = [onnx.helper.get_attribute_value(a) for n in convs for a in n.attribute if a.name == "group"]
    assert groups == [C, HQ + HK]
    body = [n.op_type for f in model.functions if f.name == "cca" for n in f.node]
    assert (body.count("ReduceSum"), body.count("Sqrt"), body.count("Neg")) == (1, 1, 1), body
    _assert_clean(model, {"cca": 1})
    node = next(n for n in model.graph.node if n.op_type == "cca")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} == dict(
        num_heads=HQ, kv_num_heads=HK, head_size=D, conv_state_size=P, rotary_dim=ROT)


# ------------------------------------------------------------------------------ compressor
class _Compress(torch.nn.Module):
    """Prefill (``step=False``) or step form, CSA (overlap, coff 2) and HCA side by side."""

    def __init__(self, step: bool):
        super().__init__()
        r = _gen(1)
        self.step = step
        self.ape = torch.nn.ParameterList([torch.nn.Parameter(r(R, 2 * CW)), torch.nn.Parameter(r(R, CW))])
        self.norm = torch.nn.Parameter(1 + 0.1 * r(CW))
        self.register_buffer("inv_freq", inv_freq_default(RD, 1e4))

    def forward(self, a2, z2, a1, z1, cache2=None, state_a2=None, state_z2=None, cache1=None,
                state_a1=None, state_z1=None, pos=None):
        rest = (cache2, state_a2, state_z2, cache1, state_a1, state_z1, pos)
        outs = []
        for i, (a, z, overlap) in enumerate(((a2, z2, True), (a1, z1, False))):
            kw = dict(ratio=R, overlap=overlap, eps=1e-6, rope_dim=RD)
            if self.step:
                cache, sa, sz = rest[3 * i: 3 * i + 3]
                outs += ops.kv_compress_step(a, z, self.ape[i], self.norm, self.inv_freq, cache, sa, sz,
                                             rest[-1], **kw)
            else:
                outs += ops.kv_compress(a, z, self.ape[i], self.norm, self.inv_freq, **kw)
        return tuple(outs)


def _tokens(batch: int, t_len: int, seed: int):
    r = _gen(seed)
    return r(batch, t_len, 2 * CW), r(batch, t_len, 2 * CW), r(batch, t_len, CW), r(batch, t_len, CW)


def _empty(batch: int):
    """Step state before position 0: per variant (cache, state_a, state_z)."""
    out = []
    for overlap in (True, False):
        out += [torch.zeros(batch, NCAP, CW), *empty_state(batch, R, overlap, CW)]
    return out


def _compress(profile: str, step: bool):
    bt = {0: Dim("batch"), 1: Dim("t")}
    if not step:
        return _export("kv_compress", profile, _Compress(False), _tokens(2, 9, 0), (bt,) * 4)
    args = (*_tokens(2, 3, 0), *_empty(2), torch.tensor(5))
    return _export("kv_compress_step", profile, _Compress(True), args, (bt,) * 4 + ({0: Dim("batch")},) * 6 + (None,))


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_kv_compress_parity(profile):
    """Entries and states equal eager for T < r (no entry), multiples of r and a trailing partial block."""
    model, sess = _compress(profile, step=False)
    for i, (batch, t_len) in enumerate([(1, 3), (3, 8), (2, 13), (1, 1)]):
        args = _tokens(batch, t_len, seed=i + 1)
        _check(_run(model, sess, args), _Compress(False)(*args), f"kv_compress {profile} B={batch} T={t_len}")
    _assert_clean(model, {"kv_compress": 2})
    assert len({n.overload for n in model.graph.node if n.domain == "effexport"}) == 2  # CSA, HCA bodies


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_kv_compress_step_across_blocks(profile):
    """Chunks of 1..5 tokens crossing several block boundaries: ORT fed its own outputs equals the
    eager chain after every call, and the final entries equal the prefill form's up to the buffer
    capacity (the last completed block falls past it and is dropped, as in the eager op)."""
    model, sess = _compress(profile, step=True)
    module, batch, chunks = _Compress(True), 2, [1, 2, 1, 3, 5, 1, 4, 2, 6, 3]
    eager_state, ort_state, pos, seen = _empty(batch), _empty(batch), 0, []
    for i, t_len in enumerate(chunks):
        tokens = _tokens(batch, t_len, seed=10 + i)
        seen.append(tokens)
        expected = module(*tokens, *eager_state, torch.tensor(pos))
        got = _run(model, sess, (*tokens, *ort_state, torch.tensor(pos)))
        _check(got, expected, f"kv_compress_step {profile} pos={pos} T={t_len}")
        eager_state, ort_state = list(expected), [torch.from_numpy(g) for g in got]
        pos += t_len
    full = [torch.cat(parts, 1) for parts in zip(*seen)]
    entries = _Compress(False)(*full)
    assert pos // R == NCAP + 1  # every slot written, one block beyond the capacity
    for j, ent in ((0, entries[0]), (3, entries[3])):  # CSA / HCA caches vs prefill entries
        _close(ort_state[j], ent[:, :NCAP], f"{profile} cache{j} vs prefill")


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_kv_compress_step_static_shapes(profile):
    """Step outputs keep the static shapes of the cache and state inputs; no dense mask constant."""
    model, _ = _compress(profile, step=True)
    dims = lambda v: [d.dim_value if d.HasField("dim_value") else d.dim_param  # noqa: E731
                      for d in v.type.tensor_type.shape.dim]
    for inp, out in zip(model.graph.input[4:10], model.graph.output):
        assert dims(inp)[1:] == dims(out)[1:] and all(isinstance(d, int) and d > 0 for d in dims(out)[1:])
    _assert_clean(model, {"kv_compress_step": 2})


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_kv_compress_step_counts_are_tensors_of_their_own(profile):
    """Each step body reads its token count and entry capacity as ``Gather(Shape(x), k)``, never as a
    ``Squeeze`` of a ``Shape``: ONNX Runtime runs that Squeeze as an alias of the CUDA Shape's host
    output, and a bf16 deepseek-v4-flash:tiny prefill's CUDA ``Range`` read a count whose buffer had
    gone to another host scalar (``_build.host_dim``; parity: the tests above)."""
    model, _ = _compress(profile, step=True)
    bodies = [f for f in model.functions if f.name == "kv_compress_step"]
    assert len(bodies) == 2
    for body in bodies:
        shapes = {n.output[0] for n in body.node if n.op_type == "Shape"}
        readers = [n for n in body.node if any(i in shapes for i in n.input)]
        assert len(readers) == 2 and {n.op_type for n in readers} == {"Gather"}, [n.op_type for n in readers]


# --------------------------------------------------------------------------------- indexer
class _Indexer(torch.nn.Module):
    def forward(self, q, w, k_idx, pos):
        return ops.indexer_topk(q, w, k_idx, pos, ratio=R, topk=TOPK)


def _indexer_inputs(batch: int, t_len: int, n: int, pos: int, seed: int, ties: bool = False):
    """Positive q, k, w: every score is a distinct positive number (no ReLU zeros, no ties);
    ``ties``: all-zero keys, so every visible score ties at 0 (lower index must come first)."""
    r = _gen(seed)
    q, k, w = r(batch, t_len, HI, DI).abs(), r(batch, n, DI).abs(), r(batch, t_len, HI).abs() + 0.1
    return q, w, torch.zeros_like(k) if ties else k, torch.tensor(pos)


def _min_gap(q, w, k) -> float:
    s = (torch.einsum("bthd,bnd->bthn", q.double(), k.double()).relu() * w.double()[..., None]).sum(2)
    s = s.sort(-1).values
    return (s[..., 1:] - s[..., :-1]).min().item() if s.shape[-1] > 1 else 1.0


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_indexer_topk_exact(profile):
    """Indices equal eager exactly: N < topk, N > topk, T > 1 with partially visible rows, ties."""
    model, sess = _export("indexer", profile, _Indexer(), _indexer_inputs(2, 3, 7, 5, 0),
                          ({0: Dim("batch"), 1: Dim("t")},) * 2 + ({0: Dim("batch"), 1: Dim("n")}, None))
    probes = [(1, 1, 2, 9, False), (2, 6, 9, 3, False), (3, 2, 12, 40, False), (2, 4, 10, 20, True)]
    for i, (batch, t_len, n, pos, ties) in enumerate(probes):
        args = _indexer_inputs(batch, t_len, n, pos, seed=i + 1, ties=ties)
        if not ties:
            assert _min_gap(*args[:3]) > 1e-4, "probe scores too close for an exact order"
        got = torch.from_numpy(_run(model, sess, args)[0])
        expected = _Indexer()(*args)
        assert got.dtype == torch.int64 and torch.equal(got, expected), f"{profile} probe {i}: {got} vs {expected}"
        assert (expected == -1).any() or n >= TOPK  # the -1 tail is exercised where it exists
    assert "TopK" in [n.op_type for n in _all_nodes(model)]
    _assert_clean(model, {"indexer_topk": 1})


# ------------------------------------------------------------------------- sparse attention
class _Sparse(torch.nn.Module):
    """One form (``ring`` or sequence) as CSA (idx), HCA (all visible) and window-only, side by side."""

    def __init__(self, ring: bool):
        super().__init__()
        self.fn = ops.sparse_attention_ring if ring else ops.sparse_attention
        self.sink = torch.nn.Parameter(_gen(2)(H))

    def forward(self, q, kv, comp, idx, pos):
        kw = dict(scale=0.3, window=WIN)
        return (self.fn(q, kv, comp, idx, self.sink, pos, ratio=R, **kw),
                self.fn(q, kv, comp, None, self.sink, pos, ratio=R, **kw),
                self.fn(q, kv, comp, None, self.sink, pos, ratio=0, **kw))


def _sparse_inputs(batch: int, t_len: int, s_len: int, n: int, pos: int, seed: int):
    """idx mixes valid, repeated, -1, out-of-range (>= N) and not-yet-visible entries."""
    r = _gen(seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, n + 2, (batch, t_len, KSEL), generator=g)
    return r(batch, t_len, H, DA), r(batch, s_len, DA), r(batch, n, DA), idx, torch.tensor(pos)


def _sparse(profile: str, ring: bool):
    bt, b = {0: Dim("batch"), 1: Dim("t")}, {0: Dim("batch")}
    if ring:
        return _export("sparse_ring", profile, _Sparse(True), _sparse_inputs(2, 2, SLOTS, 5, 7, 0),
                       (bt, b, {0: Dim("batch"), 1: Dim("n")}, bt, None))
    return _export("sparse", profile, _Sparse(False), _sparse_inputs(2, 3, 5, 5, 7, 0),
                   (bt, {0: Dim("batch"), 1: Dim("s")}, {0: Dim("batch"), 1: Dim("n")}, bt, None))


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_sparse_attention_ring_parity(profile):
    """Decode (T=1) and T <= W-window+1 chunks over a ring, early (empty slots) and late positions."""
    model, sess = _sparse(profile, ring=True)
    for i, (batch, t_len, n, pos) in enumerate([(1, 1, 4, 0), (3, 1, 6, 17), (2, 3, 3, 9), (1, 2, 8, 30)]):
        args = _sparse_inputs(batch, t_len, SLOTS, n, pos, seed=i + 1)
        _check(_run(model, sess, args), _Sparse(True)(*args), f"ring {profile} B={batch} T={t_len} pos={pos}")
    _assert_clean(model, {"sparse_attention_ring": 3})
    assert len({n.overload for n in model.graph.node if n.domain == "effexport"}) == 3  # CSA, HCA, window


@pytest.mark.parametrize("profile", ORT_PROFILES)
def test_sparse_attention_parity(profile):
    """Prefill (S = T, pos 0) and chunked prefill with the previous window-1 rows prepended."""
    model, sess = _sparse(profile, ring=False)
    probes = [(1, 9, 9, 2, 0), (2, 4, 4 + WIN - 1, 3, 6), (3, 1, WIN, 4, 15), (1, 5, 5, 1, 0)]
    for i, (batch, t_len, s_len, n, pos) in enumerate(probes):
        args = _sparse_inputs(batch, t_len, s_len, n, pos, seed=i + 1)
        _check(_run(model, sess, args), _Sparse(False)(*args), f"sparse {profile} B={batch} T={t_len} pos={pos}")
    types = [n.op_type for n in _all_nodes(model)]
    assert "GatherND" in types and types.count("Softmax") == 3  # one per variant: sink in the same softmax
    _assert_clean(model, {"sparse_attention": 3})
