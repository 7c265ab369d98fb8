"""Where does loading a CUDA AOTInductor package crash? One small program per case, each compiled,
loaded and run in its own process (a segfault ends only that case).

    python3 bench/aoti_cuda_probe.py [--out DIR]

Cases: ``linear`` (a Linear + GELU: no effexport op), ``op`` (one ``effexport::attention_read``
call, i.e. an extern kernel node run by the package's proxy executor, eager reference on CUDA),
``op_triton`` (the same with ``enable_triton()`` before compile and load), ``op_cpu_pos`` (the same
with ``pos`` a CPU tensor, as a re-export without ``move_to_device_pass`` would leave it). Prints one
line per case: ok (with max abs error against the eager call) or the exit status; writes
``aoti_probe.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CASES = ("linear", "op", "op_triton", "op_cpu_pos")


def _child(case: str, workdir: str) -> None:
    import torch

    import effexport.custom_ops  # noqa: F401  (registers effexport::*)
    from effexport.custom_ops import enable_triton

    if case == "op_triton":
        enable_triton()
    dev = os.environ.get("PROBE_DEVICE", "cuda")  # cpu: a local smoke run of the probe itself

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 64)

        def forward(self, x):
            return torch.nn.functional.gelu(self.lin(x))

    class Read(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, q, k, v, pos):
            out = torch.ops.effexport.attention_read(self.proj(q), k, v, pos, None, scale=0.125)
            return out * 2.0

    torch.manual_seed(0)
    if case == "linear":
        model, args = Linear().to(dev), (torch.randn(4, 64, device=dev),)
    else:
        q = torch.randn(1, 8, 1, 64, device=dev)
        k, v = torch.randn(1, 1, 256, 64, device=dev), torch.randn(1, 1, 256, 64, device=dev)
        pos = torch.tensor(255, device="cpu" if case == "op_cpu_pos" else dev)
        model, args = Read().to(dev), (q, k, v, pos)
    with torch.no_grad():
        want = model(*args)
        ep = torch.export.export(model, args)
        path = os.path.join(workdir, f"{case}.pt2")
        torch._inductor.aoti_compile_and_package(ep, package_path=path)
        print(f"{case}: compiled", flush=True)
        loaded = torch._inductor.aoti_load_package(path)
        print(f"{case}: loaded", flush=True)
        got = loaded(*args)
        got = got[0] if isinstance(got, (list, tuple)) else got
    print(json.dumps({"case": case, "ok": True, "max_abs_err": (got - want).abs().max().item()}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--child", choices=CASES)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, tempfile.mkdtemp())
        return 0
    os.makedirs(args.out, exist_ok=True)
    results = []
    for case in args.cases.split(","):
        proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "--child", case],
                              capture_output=True, text=True, timeout=300)
        lines = [l for l in proc.stdout.splitlines() if l.strip()]
        res = {"case": case, "rc": proc.returncode, "stages": [l for l in lines if not l.startswith("{")],
               "stderr_tail": proc.stderr.strip().splitlines()[-12:]}
        for line in lines:
            if line.startswith("{"):
                res.update(json.loads(line))
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "stderr_tail"}), flush=True)
        if proc.returncode != 0:
            print("\n".join(res["stderr_tail"]), flush=True)
    with open(os.path.join(args.out, "aoti_probe.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
