"""Where a sliding-window artifact goes wrong on ONNX Runtime's CUDA EP: prompt length against the window,
batch size, and ORT's buffer reuse.

    source bench/_ortgpu_env.sh; python3 bench/window_probe.py --out "$OUT/window"
    python3 bench/window_probe.py --device cpu --dtype fp32 --out /tmp/window     # the script itself, ORT CPU

Why: run 36b (BENCHMARKS.md) -- tiny Hugging Face Gemma 3 and Laguna bf16 artifacts (sliding window 6)
failed the CLI's CUDA check from the first decode steps after an 8-token prompt (decode max rel 0.60 /
0.39), while Llama and Qwen3 (no sliding layers) passed and the fp32 twins pass on the CPU. An
8-token prompt overfills the 6-row window in the prefill itself, so two explanations fit: the CUDA
kernel's prefill stores a window other than the one its decode reads (then prompts shorter than the
window pass until the window wraps, or pass throughout), or the wrap itself (then short prompts fail
once ``pos`` reaches the window), or the memory planner (then reuse off passes; run 36b ran with it on).

Per family (``--families``: tiny HF models from ``tests/models/hf_tiny.py``, built once by the CLI with
``--dtype``, ``--kv-cache buffer``, no check) and per prompt length (``--prompts``), batch
(``--batches``) and buffer reuse (off / on): the parity check of the build (``verify.parity.check_parity``:
the prompt, then ``--steps`` greedy steps teacher-forced from eager, each step's logits against eager
in the same dtype on the same device), recording whether it passed, the first step whose greedy token
differs and the worst errors. Writes ``window_probe.json``; each case is caught and recorded on its own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ort_attention import environment  # noqa: E402  (bench/: os.environ updated inside, restored after)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


VARIANT_ENV = {  # build switches a probe family may name (FAMILY+TAG): which fused GQA input is at fault
    "nonorm": {"EFFEXPORT_ORT_CUDA_FUSIONS": "0"},  # per-head Q / K norms stay nodes
    "norot": {"EFFEXPORT_ORT_ROTARY_IN_ATTENTION": "0"},  # rotations stay RotaryEmbedding nodes
    "nopack": {"EFFEXPORT_ORT_PACK_QKV": "0"},  # query, key and value apart
    "nowindow": {"EFFEXPORT_ORT_WINDOW_CACHE": "0"},  # sliding rings as slot rings (the default in run 38 only)
    "window": {"EFFEXPORT_ORT_WINDOW_CACHE": "1"},  # GroupQueryAttention's windowed cache (the default but in run 38)
    "wtotal": {"EFFEXPORT_ORT_WINDOW_TOTAL": "window"},  # its one-token total_sequence_length W (until run 39)
}


def parse_family(spec: str) -> tuple[str, dict, dict]:
    """``FAMILY[/hdN][+TAG...]`` -> ``(family, config overrides, build env)``. ``/hdN``: that tiny
    model with head size N (ONNX Runtime's CUDA GroupQueryAttention picks its kernel by head size --
    XQA decode for 64 / 128 / 256 in half precision, flash or memory-efficient attention otherwise --
    so a failure at the tiny models' 16 need not be the real models'); ``+TAG``: a build switch of
    :data:`VARIANT_ENV`."""
    head, *tags = spec.split("+")
    family, _, variant = head.partition("/")
    overrides, env = {}, {}
    if variant:
        if not (variant.startswith("hd") and variant[2:].isdigit()):
            raise ValueError(f"{spec!r}: a variant is FAMILY/hdN (head size N)")
        overrides["head_dim"] = int(variant[2:])
    for tag in tags:
        if tag not in VARIANT_ENV:
            raise ValueError(f"{spec!r}: unknown build switch +{tag} (known: {', '.join(VARIANT_ENV)})")
        env.update(VARIANT_ENV[tag])
    return family, overrides, env


def build(spec: str, work: str, dtype: str) -> tuple[str, str]:
    """``(HF model dir, artifact dir)`` of the tiny model ``spec`` (:func:`parse_family`) built by the CLI."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from models import hf_tiny

    from effexport.exporter.cli import main

    family, overrides, env = parse_family(spec)
    tag = spec.replace("/", "-")
    src, out = os.path.join(work, f"hf-{tag}"), os.path.join(work, f"{tag}-{dtype}")
    hf_tiny.build(family, **overrides).save_pretrained(src)
    with environment(env):
        code = main([src, "--target", "onnx", "--dtype", dtype, "--kv-cache", "buffer", "--no-check", "-o", out,
                     "--force"])
    if code != 0:
        raise RuntimeError(f"{family}: the CLI build exited {code}")
    return src, out


def structure_of(artifact: str) -> dict:
    """Counts of what the probe varies in the built step graph: GroupQueryAttention nodes, those with a
    windowed cache, rotary inside, per-head Q / K norms inside, packed input, and RotaryEmbedding nodes."""
    import onnx

    model = onnx.load(os.path.join(artifact, "model.onnx"), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]

    def attr(node, name):
        return next((a.i for a in node.attribute if a.name == name), 0)

    return {"gqa": len(gqa), "gqa_window_cache": sum(attr(n, "sliding_window_cache") == 1 for n in gqa),
            "gqa_do_rotary": sum(attr(n, "do_rotary") == 1 for n in gqa),
            "gqa_qk_norm": sum(len(n.input) > 14 and bool(n.input[14]) for n in gqa),
            "gqa_packed": sum(len(n.input) > 1 and not n.input[1] for n in gqa),
            "rotary_nodes": sum(n.op_type == "RotaryEmbedding" for n in model.graph.node)}


def config_of(src: str) -> dict:
    """The saved model's sliding window and head size."""
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    return {"window": config.get("sliding_window"), "head_dim": config.get("head_dim")}


def run_case(loaded, eager, artifact: str, device: str, prompt: int, batch: int, reuse: bool, steps: int,
             dtype: str) -> dict:
    from effexport.exporter.backends.onnx.runtime import OrtRuntime
    from effexport.exporter.verify.parity import check_parity

    runtime = OrtRuntime(artifact, device=device, mem_reuse=reuse)
    ids = loaded.parity_prompt(prompt, batch=batch).to(device)
    report = check_parity(eager, runtime, ids, steps, dtype)
    errors = {o.name: o.max_rel for o in report.outputs}
    return {"passed": report.passed, "tokens_equal": report.tokens_equal, "detail": report.detail, **errors}


def table(results: dict) -> str:
    """Markdown: per family (its head size and the built graph's GQA inputs), each prompt / batch /
    buffer-reuse case's verdict and its decode error (``!`` marks a greedy token that differs)."""
    lines = ["| family | d | GQA (window / rotary / QK-norm) | prompt | B | reuse | passed | prefill | decode |",
             "|---|---|---|---|---|---|---|---|---|"]
    for family, entry in results["families"].items():
        st = entry.get("structure", {})
        shape = f"{st.get('gqa', '?')} ({st.get('gqa_window_cache', '?')} / {st.get('gqa_do_rotary', '?')} / " \
                f"{st.get('gqa_qk_norm', '?')})"
        if "error" in entry:
            lines.append(f"| {family} | {entry.get('head_dim', '?')} | {shape} | - | - | - | {entry['error'][:80]} | | |")
        for c in entry.get("cases", []):
            verdict = c["error"][:60] if "error" in c else ("yes" if c["passed"] else "**no**")
            flag = "" if c.get("tokens_equal", True) else " !"
            lines.append(f"| {family} | {entry.get('head_dim', '?')} | {shape} | {c['prompt']} | {c['batch']} | "
                         f"{'on' if c['mem_reuse'] else 'off'} | {verdict} | {c.get('logits/prefill', float('nan')):.3g} | "
                         f"{c.get('logits/decode', float('nan')):.3g}{flag} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    ap.add_argument("--work", default="/tmp/window_probe")
    ap.add_argument("--families", default="gemma3,laguna",
                    help="tiny HF families, each FAMILY or FAMILY/hdN (head size N), comma-separated")
    ap.add_argument("--prompts", default="3,5,6,7,8,12")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--reuse", default="off,on", help="ORT buffer reuse settings to run, comma-separated")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    from effexport.exporter.frontends.loading import load_model

    results = {"device": args.device, "dtype": args.dtype, "families": {}}
    path = os.path.join(args.out, "window_probe.json")
    for family in args.families.split(","):
        entry = results["families"][family] = {"cases": []}
        try:
            src, artifact = build(family, args.work, args.dtype)
            entry.update(config_of(src))
            entry["structure"] = structure_of(artifact)
            loaded = load_model(src)
            eager = loaded.model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()
        except Exception as exc:  # noqa: BLE001
            entry["error"] = f"{type(exc).__name__}: {exc}"[:600]
            traceback.print_exc()
            continue
        for prompt in (int(p) for p in args.prompts.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                for reuse in [r == "on" for r in args.reuse.split(",")]:
                    case = {"prompt": prompt, "batch": batch, "mem_reuse": reuse}
                    try:
                        case.update(run_case(loaded, eager, artifact, args.device, prompt, batch, reuse, args.steps,
                                             args.dtype))
                    except Exception as exc:  # noqa: BLE001
                        case["error"] = f"{type(exc).__name__}: {exc}"[:400]
                    entry["cases"].append(case)
                    print(json.dumps({"family": family, **case}), flush=True)
                    with open(path, "w") as f:
                        json.dump(results, f, indent=1)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "window_probe.md"), "w") as f:
        f.write(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
