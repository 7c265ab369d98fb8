"""CCA decode (ZAYA1-8B shapes) on one CUDA GPU: the fused Triton kernel against the eager reference.

    python3 bench/cca_decode.py [--out DIR] [--batches 1,8]

One ``effexport::cca`` call for one new token (Hq 8, Hk 2, d 128, K0 = K1 = 2, rot 64, bf16, random
inputs and weights), median time from CUDA-graph replays, with the kernel enabled
(``enable_triton()``) and the op's eager reference (~20 small torch kernels). "MB" is what the call
must read and write at least (the grouped-conv weights dominate: 1280 x 128 x 2 bf16 = 0.66 MB);
"% of copy BW" divides it by the time, against the copy bandwidth measured in the same run.
Writes ``cca.json`` and ``cca.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_attention import _time_graph, bandwidths  # noqa: E402

from effexport.custom_ops import cca as cca_mod  # noqa: E402
from effexport.custom_ops import enable_triton  # noqa: E402

HQ, HK, D, K0, K1, ROT = 8, 2, 128, 2, 2, 64


def _args(batch: int, gen) -> list:
    c, p, dv, bf = (HQ + HK) * D, K0 - 1 + K1 - 1, HK * D // 2, torch.bfloat16

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(bf)
    return [r(batch, 1, HQ * D), r(batch, 1, HK * D), r(batch, 1, dv), r(batch, 1, dv), r(c, 1, K0, scale=0.5),
            r(c, D, K1, scale=D ** -0.5), torch.rand(HK, generator=gen, device="cuda") + 0.5,
            torch.cos(torch.randn(1, ROT, generator=gen, device="cuda")),
            torch.sin(torch.randn(1, ROT, generator=gen, device="cuda")), r(batch, c, p), r(batch, dv),
            r(c, scale=0.1), r(c, scale=0.1)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cca_decode: needs a CUDA device", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    bw = bandwidths()["copy"]
    enable_triton()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        a = _args(batch, gen)
        nbytes = sum(t.numel() * t.element_size() for t in a if t is not None)
        nbytes += sum(t.numel() * t.element_size() for t in torch.ops.effexport.cca(*a))
        kernel = _time_graph(lambda: torch.ops.effexport.cca(*a), [()])[0]
        ref = _time_graph(lambda: cca_mod.cca._init_fn(*a), [()])[0]
        got, want = torch.ops.effexport.cca(*a), cca_mod.cca._init_fn(*[t.double() if t is not None and t.is_floating_point() else t for t in a])
        err = max(((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got[:2], want[:2]))
        rows.append({"batch": batch, "mb": nbytes / 1e6, "kernel_us": kernel * 1e6, "ref_us": ref * 1e6,
                     "ref_vs_kernel": ref / kernel, "pct_copy_bw": nbytes / kernel / bw * 100, "rel_err_qk": err})
        print(json.dumps(rows[-1]), flush=True)
    md = [f"copy bandwidth {bw / 1e12:.3f} TB/s", "",
          "| B | MB moved | Triton us | % of copy BW | eager ref us | ref / Triton | max rel err q,k (vs float64) |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['batch']} | {r['mb']:.2f} | {r['kernel_us']:.1f} | {r['pct_copy_bw']:.1f}% | {r['ref_us']:.1f} | "
           f"{r['ref_vs_kernel']:.1f}x | {r['rel_err_qk']:.1e} |" for r in rows]
    with open(os.path.join(args.out, "cca.json"), "w") as f:
        json.dump({"copy_bw": bw, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "cca.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
