"""Prefill attention on one CUDA GPU: the block-sparse Triton kernel against dense baselines.

    python3 bench/prefill_attention.py [--out DIR] [--lengths 4096,16384,32768]

For the Gemma 4 E2B layer shapes (8 query heads, 1 KV head; sliding layers d 256 with a 512-token
window, full layers d 512 causal; scale 1) and a prompt of T tokens (batch 1, bf16, random inputs),
the median time of one ``effexport::attention`` call with the Triton kernels enabled, against
``F.scaled_dot_product_attention`` (``is_causal`` for the full layers; for the sliding layers the
window as a dense boolean ``T x T`` mask, what a generic export of the sliding layer runs) and, up
to 8K tokens, the op's eager reference (fp32 scores). "visible pairs" counts the (query, key) pairs a
layer must score: T(T+1)/2 causal, ~T x W windowed; "TFLOP/s" is 4 x heads x d x visible pairs over
the time (QK^T and PV, multiply-adds as 2). A block-sparse sliding kernel's time grows like T x W
(linear in T); a dense-mask one like T^2. "rel err" is ``max|out - ref| / max|ref|`` against the
float64 reference when it was run, else against SDPA. Each call is replayed from a CUDA graph;
writes ``prefill.json`` and ``prefill.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_attention import _time_graph  # noqa: E402  (same timing method as the decode kernels)

from effexport.custom_ops import attention as attn_mod  # noqa: E402
from effexport.custom_ops import enable_triton  # noqa: E402

ops = torch.ops.effexport
LAYERS = {"sliding": dict(heads=8, kv_heads=1, d=256, window=512),
          "full": dict(heads=8, kv_heads=1, d=512, window=0)}
REF_MAX = 8192  # the eager reference materializes fp32 [H, T, T] scores: 2 GiB at 8K


def _visible_pairs(t_len: int, window: int) -> int:
    if window == 0 or window >= t_len:
        return t_len * (t_len + 1) // 2
    return window * (window + 1) // 2 + (t_len - window) * window


def _rel(out, ref) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def run_case(layer: str, t_len: int) -> dict:
    cfg = LAYERS[layer]
    h, hkv, d, w = cfg["heads"], cfg["kv_heads"], cfg["d"], cfg["window"]
    gen = torch.Generator(device="cuda").manual_seed(t_len + d)
    q, k, v = (torch.randn(1, n, t_len, d, generator=gen, device="cuda").to(torch.bfloat16)
               for n in (h, hkv, hkv))
    kw = dict(scale=1.0, causal=True, window=w, softcap=0.0)
    row = {"layer": layer, "T": t_len, "heads": h, "d": d, "window": w,
           "visible_pairs": _visible_pairs(t_len, w)}
    flops = 4 * h * d * row["visible_pairs"]
    out = ops.attention(q, k, v, None, **kw)
    row["triton_ms"] = _time_graph(lambda: ops.attention(q, k, v, None, **kw), [()])[0] * 1e3
    row["triton_tflops"] = flops / row["triton_ms"] / 1e9

    mask = None
    if w:
        i = torch.arange(t_len, device="cuda")
        diff = i[:, None] - i[None, :]
        mask = (diff >= 0) & (diff < w)  # [T, T] bool: the dense form of the window

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              scale=1.0, enable_gqa=True)
    try:
        base = sdpa()
        row["sdpa_ms"] = _time_graph(sdpa, [()])[0] * 1e3
        row["sdpa_vs_triton"] = row["sdpa_ms"] / row["triton_ms"]
    except Exception as exc:  # noqa: BLE001  (e.g. out of memory for a dense mask: recorded)
        row["sdpa_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        base = None
    if t_len <= REF_MAX:
        ref = attn_mod.attention._init_fn(q.double(), k.double(), v.double(), None, **kw)
        row["ref_ms"] = _time_graph(lambda: attn_mod.attention._init_fn(q, k, v, None, **kw), [()])[0] * 1e3
        row["rel_err"], row["rel_err_vs"] = _rel(out, ref), "float64 reference"
    elif base is not None:
        row["rel_err"], row["rel_err_vs"] = _rel(out, base), "SDPA"
    del q, k, v, mask
    torch.cuda.empty_cache()
    return row


def _md(rows: list[dict]) -> str:
    lines = ["| layer | T | visible pairs (M) | Triton ms | TFLOP/s | SDPA ms | SDPA / Triton | eager ref ms | rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} (d {r['d']}, W {r['window'] or '-'}) | {r['T']} | {r['visible_pairs'] / 1e6:.1f} | "
            f"{r['triton_ms']:.3f} | {r['triton_tflops']:.0f} | {r.get('sdpa_ms', float('nan')):.3f} | "
            f"{r.get('sdpa_vs_triton', float('nan')):.1f}x | {r.get('ref_ms', float('nan')):.3f} | "
            f"{r.get('rel_err', float('nan')):.1e} ({r.get('rel_err_vs', '-')}) |")
    by = {(r["layer"], r["T"]): r["triton_ms"] for r in rows}
    ts = sorted({r["T"] for r in rows})
    for layer in LAYERS:
        if (layer, ts[0]) in by and (layer, ts[-1]) in by and ts[-1] > ts[0]:
            lines.append(f"\n{layer}: T {ts[0]} -> {ts[-1]} ({ts[-1] / ts[0]:.0f}x tokens): Triton time "
                         f"x{by[layer, ts[-1]] / by[layer, ts[0]]:.1f}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--lengths", default="4096,16384,32768")
    ap.add_argument("--layers", default="sliding,full")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("prefill_attention: needs a CUDA device", file=sys.stderr)
        return 2
    enable_triton()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for layer in args.layers.split(","):
        for t_len in (int(x) for x in args.lengths.split(",")):
            rows.append(run_case(layer, t_len))
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "prefill.json"), "w") as f:
        json.dump(rows, f, indent=1)
    md = _md(rows)
    with open(os.path.join(args.out, "prefill.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
