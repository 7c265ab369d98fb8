"""DeepSeek V4 (the sample, HCA layers of ratio 16 or CSA layers of ratio 4) with compressors that
pool in blocks but not the DeepSeek way: what the compressed pass must refuse (left alone, with the
reason).

``shifted``  the gate's position embedding counted from the wrong block boundary (``ape[(pos + 1) %
             r]`` for ``ape[pos % r]``): the same graph structure as the real compressor (block
             softmax over a padded ``cat(state, z + ape[...])``), other numbers; the numeric check
             must reject it.
``mean``     mean pooling of each block's values without the softmax gate (the -inf-padded rows of
             the open block left out): no block softmax, so no compressor candidate; the attention
             over its entries is then not recognised either.
``swapped``  (CSA, overlapping blocks) each entry pools the previous block's *second* half with the
             current block's *first* half (DeepSeek: first half with second half).

``build(variants)`` takes one variant per layer (``None``: the sample's compressor). Everything else
(window attention, sinks, mHC, MoE) is the sample's, so the model runs through the same capture.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from effexport.samples import deepseek_v4, get_sample

RATIO = 16  # HCA


def _shifted_project(self, x: torch.Tensor, start_pos: int):
    pos = torch.arange(start_pos, start_pos + x.shape[1], device=x.device)
    a = F.linear(x.float(), self.wkv.weight.float())
    z = F.linear(x.float(), self.wgate.weight.float()) + self.ape.float()[(pos + 1) % self.ratio]
    return a, z


def _mean_pool(self, a_blocks: torch.Tensor, z_blocks: torch.Tensor) -> torch.Tensor:
    assert not self.overlap, "mean pooling is written for non-overlapping blocks"
    rows = (~torch.isinf(z_blocks)).to(a_blocks.dtype)  # the open block's padding rows: -inf scores
    return (a_blocks * rows).sum(dim=2) / rows.sum(dim=2).clamp_min(1)


def _swapped_pool(self, a_blocks: torch.Tensor, z_blocks: torch.Tensor) -> torch.Tensor:
    assert self.overlap, "swapped halves are written for overlapping blocks"
    d = self.head_dim
    a = torch.cat([a_blocks[:, :-1, :, d:], a_blocks[:, 1:, :, :d]], dim=2)
    z = torch.cat([z_blocks[:, :-1, :, d:], z_blocks[:, 1:, :, :d]], dim=2)
    return (a * z.softmax(dim=2)).sum(dim=2)


class SwappedCompressor(deepseek_v4.Compressor):
    _pool = _swapped_pool


class ShiftedCompressor(deepseek_v4.Compressor):
    project = _shifted_project


class MeanCompressor(deepseek_v4.Compressor):
    _pool = _mean_pool


KINDS = {"shifted": ShiftedCompressor, "mean": MeanCompressor, "swapped": SwappedCompressor}


def config(layers: int = 2, ratio: int = RATIO) -> deepseek_v4.DeepSeekV4Config:
    """The tiny preset with ``layers`` layers of one compress ratio (16: HCA; 4: CSA with an indexer)."""
    return dataclasses.replace(get_sample("deepseek-v4-flash:tiny").config, n_layers=layers,
                               compress_ratios=(ratio,) * layers, n_hash_layers=1)


def build(variants: tuple[str | None, ...] = ("shifted", "mean"), ratio: int = RATIO, seed: int = 0) -> deepseek_v4.Model:
    """The sample's model with each layer's compressors (the indexer's too) swapped for
    ``KINDS[variant]`` (same weights; ``None``: the sample's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = deepseek_v4.Model(config(len(variants), ratio))
    for layer, variant in zip(model.layers, variants):
        if variant is not None:
            for m in layer.modules():
                if type(m) is deepseek_v4.Compressor:
                    m.__class__ = KINDS[variant]
    return model.eval()
