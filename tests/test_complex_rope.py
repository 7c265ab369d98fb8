"""The complex pass (passes/complex.py): complex arithmetic -> real (real, imag) pairs.

Llama 4's RoPE as transformers writes it (``torch.polar``, ``view_as_complex``, a broadcast complex
``mul``, ``view_as_real``, ``flatten``) plus a complex add, captured with torch.export: after the pass
no complex value or op remains and the outputs equal the eager module's. An op outside the pass's
table (``abs`` of a complex tensor, a real-to-complex cast) leaves the graph unchanged with the reason. The Llama 4 model
test (tests/test_chunked.py) checks the same on a whole model through ONNX Runtime.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from effexport.passes.complex import rewrite_complex

COMPLEX_OPS = (torch.ops.aten.polar.default, torch.ops.aten.view_as_complex.default,
               torch.ops.aten.view_as_real.default)


class _Rope(torch.nn.Module):
    """transformers' Llama 4 ``Llama4TextRotaryEmbedding.forward`` + ``apply_rotary_emb``."""

    def __init__(self, tail=None):
        super().__init__()
        self.inv_freq = torch.nn.Buffer(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
        self.tail = tail

    def forward(self, xq, xk, positions):
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, d/2]
        freqs_cis = torch.polar(torch.ones_like(freqs), freqs) * 1.0
        q = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # [B, T, H, d/2]
        k = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
        q_out = q * freqs_cis[:, :, None, :]
        k_out = (k + q) * freqs_cis[:, :, None, :]
        if self.tail is not None:
            return self.tail(q_out)
        return torch.view_as_real(q_out).flatten(3).type_as(xq), torch.view_as_real(k_out).flatten(3).type_as(xk)


def _captured(module):
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 5, 4, 16, generator=gen), torch.randn(2, 5, 4, 16, generator=gen),
            torch.arange(3, 8).expand(2, 5))
    t = torch.export.Dim.AUTO
    ep = torch.export.export(module, args, dynamic_shapes=({0: t, 1: t}, {0: t, 1: t}, {0: t, 1: t}), strict=False)
    return ep.module(), args


def _complex_nodes(gm):
    return [n for n in gm.graph.nodes if n.target in COMPLEX_OPS or (
        isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex())]


def _run(gm):
    ctx = SimpleNamespace(program=SimpleNamespace(gm=gm), analysis=SimpleNamespace(left_alone=[]))
    return rewrite_complex(ctx), ctx.analysis.left_alone


def test_rope_lowered_to_real():
    module = _Rope().eval()
    gm, args = _captured(module)
    assert _complex_nodes(gm)
    counts, left = _run(gm)
    assert counts["left_alone"] == 0 and counts["complex_nodes"] >= 8 and left == []
    assert _complex_nodes(gm) == []
    for seed, length in ((1, 5), (2, 11)):  # dynamic batch / length still work
        gen = torch.Generator().manual_seed(seed)
        xq, xk = torch.randn(3, length, 4, 16, generator=gen), torch.randn(3, length, 4, 16, generator=gen)
        pos = torch.arange(7, 7 + length).expand(3, length)
        for got, want in zip(gm(xq, xk, pos), module(xq, xk, pos)):
            assert got.dtype == want.dtype and torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()


class _RealToComplex(torch.nn.Module):
    def forward(self, xq, xk, positions):
        return torch.view_as_real(xq.to(torch.complex64) * torch.polar(xk, xk)) + positions[..., None, None, None]


@pytest.mark.parametrize("module,why", [
    pytest.param(_Rope(tail=torch.abs), "abs", id="abs-of-complex"),
    pytest.param(_RealToComplex(), "makes a complex tensor from real ones", id="cast-real-to-complex"),
])
def test_unsupported_complex_op_left_alone(module, why):
    """Ops outside the table (``abs`` of a complex tensor, a cast of a real tensor to complex): the
    graph is left unchanged, with the reason."""
    gm, _ = _captured(module.eval())
    before = [n.format_node() for n in gm.graph.nodes]
    counts, left = _run(gm)
    assert counts["left_alone"] == 1 and len(left) == 1 and why in left[0], left
    assert [n.format_node() for n in gm.graph.nodes] == before
