"""Which exact-GELU node ONNX Runtime's CUDA EP runs in half precision: ``com.microsoft.Gelu`` and
``ai.onnx.Gelu`` (opset 20), each in bf16 / fp16 / fp32, on the CUDA EP with the CPU fallback off.

    source bench/_ortgpu_env.sh; python3 bench/gelu_kernel_probe.py --out "$OUT/gelu"
    python3 bench/gelu_kernel_probe.py --device cpu --out /tmp/gelu      # the script itself, ORT CPU

Why: the ``ort`` profile writes the exact GELU (``0.5 * x * (1 + erf(x / sqrt 2))``, ZAYA1's router)
as five nodes, five kernels a layer on a launch-bound decode step; one node would do, if the CUDA EP
has a kernel for the build's dtype (a node without one falls back to the CPU, which has no bf16
kernel). Each case: whether a session opens with ``session.disable_cpu_ep_fallback``, and the node's
max relative error against ``torch.nn.functional.gelu`` computed in fp32 on the same inputs. Writes
``gelu_kernel_probe.json``.
"""
from __future__ import annotations

import argparse
import json
import os

import onnx
import torch
from onnx import TensorProto, helper

CASES = (("com.microsoft", 1), ("", 20))
DTYPES = {"bf16": (TensorProto.BFLOAT16, torch.bfloat16), "fp16": (TensorProto.FLOAT16, torch.float16),
          "fp32": (TensorProto.FLOAT, torch.float32)}


def gelu_model(domain: str, opset: int, elem: int) -> bytes:
    """One ``Gelu`` node of ``domain`` over a ``[2, 8, 384]`` tensor of ``elem``."""
    shape = [2, 8, 384]
    node = helper.make_node("Gelu", ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "gelu", [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", elem, shape)])
    imports = [helper.make_opsetid("", opset if not domain else 18)]
    if domain:
        imports.append(helper.make_opsetid(domain, opset))
    return helper.make_model(graph, opset_imports=imports, ir_version=10).SerializeToString()


def run_case(ort, domain: str, opset: int, dtype: str, device: str) -> dict:
    elem, tdtype = DTYPES[dtype]
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1" if device == "cuda" else "0")
    # the CUDA EP alone: ORT refuses the CPU EP in the list with its fallback off
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    x = (torch.randn(2, 8, 384, generator=torch.Generator().manual_seed(0)) * 3).to(tdtype)
    try:
        session = ort.InferenceSession(gelu_model(domain, opset, elem), options, providers=providers)
        binding = session.io_binding()
        x_dev = x.to("cuda" if device == "cuda" else "cpu").contiguous()
        y_dev = torch.empty_like(x_dev)
        for name, t in (("x", x_dev), ("y", y_dev)):
            kind = "cuda" if t.is_cuda else "cpu"
            bind = binding.bind_input if name == "x" else binding.bind_output
            bind(name, kind, 0, elem, list(t.shape), t.data_ptr())
        session.run_with_iobinding(binding)
        ref = torch.nn.functional.gelu(x.float())
        err = ((y_dev.cpu().float() - ref).abs().max() / ref.abs().max()).item()
        return {"runs": True, "max_rel": err}
    except Exception as exc:  # noqa: BLE001  (no kernel is an answer)
        return {"runs": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args(argv)
    import onnxruntime as ort

    os.makedirs(args.out, exist_ok=True)
    results = {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "device": args.device, "cases": []}
    for domain, opset in CASES:
        for dtype in DTYPES:
            case = {"op": f"{domain or 'ai.onnx'}.Gelu-{opset}", "dtype": dtype,
                    **run_case(ort, domain, opset, dtype, args.device)}
            results["cases"].append(case)
            print(json.dumps(case), flush=True)
    with open(os.path.join(args.out, "gelu_kernel_probe.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
