"""Where along the layers an ONNX artifact's error grows: the input of every hidden-width RMS norm
(the residual stream and each block's output, in execution order) in the artifact and in eager, each
against fp32 eager, over one prompt.

    python3 bench/norm_error_probe.py ARTIFACT --model MODEL [--prompt 600] [--device cuda] [--out DIR]

``ARTIFACT``: an ``--target onnx`` build (``model.onnx``, the general graph, runs the prompt), or its
fp32 emulation (``bench/bf16_emulation.py``); ``MODEL``: what it was built from (a Hugging Face
directory or a sample name, loaded in the artifact's dtype, or the dtype the emulation emulates). A
copy of the step graph in a temporary sibling of ``ARTIFACT`` (removed after; the weights hard-linked,
copied across filesystems; the artifact untouched) gets one extra output per hidden-width norm: a
``SimplifiedLayerNormalization``'s input, a ``SkipSimplifiedLayerNormalization``'s sum (its fourth
output, added where the fusion left it out), each cast to fp32 (exact), and the logits. Eager's taps
are forward pre-hooks on the norm modules whose weight is ``[hidden]`` (their first input), in the
artifact's dtype and in fp32 (the weights upcast a layer at a time, ``_reference.py``). Per tap: ``artifact_vs_fp32`` and ``eager_vs_fp32``
(max relative error over the prompt's rows, and over its last row). The two tap lists must have the
same length (one ONNX norm per eager norm); where they do not, the JSON says so and no pairing is
made. ``first_tap_over_twice_eager``: the first tap where the artifact's error exceeds twice eager's
(and 1e-5). Writes ``norm_error_probe.json`` to ``--out``. Checked on ONNX Runtime's CPU EP (fp32, and
bf16 emulated); the CUDA path (I/O binding, buffer caches bound in place as ``OrtRuntime`` binds
them) is written against the same API and runs on the GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import onnx
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def _hidden_width(node: onnx.NodeProto, widths: dict[str, int]) -> int | None:
    """The width a norm node normalises, from its scale initializer (``widths``: the 1-D initializers'
    lengths by name; None: not a constant)."""
    scale = node.input[1 if node.op_type == NORMS[0] else 2] if len(node.input) > 1 else ""
    return widths.get(scale)


def vector_widths(model: onnx.ModelProto) -> dict[str, int]:
    """Name -> length of every 1-D initializer (the norm scales among them)."""
    return {init.name: int(init.dims[0]) for init in model.graph.initializer if len(init.dims) == 1}


def add_taps(model: onnx.ModelProto, hidden: int) -> list[str]:
    """Add the fp32 tap outputs (see the module docstring) to ``model`` in place; returns their names in
    node order, the logits' tap last."""
    graph, taps, casts, widths = model.graph, [], [], vector_widths(model)
    for i, node in enumerate(graph.node):
        if node.op_type not in NORMS or node.domain not in ("", "com.microsoft") or _hidden_width(node, widths) != hidden:
            continue
        if node.op_type == NORMS[0]:
            value = node.input[0]
        else:
            outputs = list(node.output) + [""] * (4 - len(node.output))
            if not outputs[3]:
                outputs[3] = f"probe.sum{i}"
            del node.output[:]
            node.output.extend(outputs)
            value = outputs[3]
        taps.append(f"probe.{len(taps)}")
        casts.append(onnx.helper.make_node("Cast", [value], [taps[-1]], to=onnx.TensorProto.FLOAT))
    logits = graph.output[0].name
    taps.append("probe.logits")
    casts.append(onnx.helper.make_node("Cast", [logits], [taps[-1]], to=onnx.TensorProto.FLOAT))
    graph.node.extend(casts)
    graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in taps)
    return taps


def probe_dir(artifact: str, work: str, hidden: int) -> list[str]:
    """A work copy of ``artifact`` whose step graph has the taps: the manifest without the decode graph,
    every other file hard-linked to the artifact's (copied across filesystems). Returns the taps."""
    from effexport.exporter.backends.artifact import MANIFEST

    with open(os.path.join(artifact, MANIFEST)) as f:
        manifest = json.load(f)
    step = manifest["files"]["step"]
    for name in os.listdir(artifact):
        if name not in (MANIFEST, step):  # ORT refuses external data reached through a symlink: a hard link
            src, dst = os.path.join(artifact, name), os.path.join(work, name)
            try:
                os.link(src, dst)
            except OSError:  # another filesystem
                shutil.copy(src, dst)
    model = onnx.load(os.path.join(artifact, step), load_external_data=False)
    taps = add_taps(model, hidden)
    onnx.save(model, os.path.join(work, step))
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k != "decode"}
    with open(os.path.join(work, MANIFEST), "w") as f:
        json.dump(manifest, f)
    return taps


def run_taps(work: str, taps: list[str], ids: np.ndarray, device: str) -> list[np.ndarray]:
    """The prompt through the work copy's step graph (empty caches at position 0): the taps' values."""
    from effexport.exporter.backends.onnx.runtime import STEP_INPUTS, OrtRuntime, _bind, _host

    rt = OrtRuntime(work, device=device)
    caches = rt.initial_caches(ids.shape[0])
    feeds = {"input_ids": ids.astype(np.int64),
             **{n: np.array(0, dtype=np.int64) for n in STEP_INPUTS[1:] if n in rt.input_names}}
    if not rt.io_binding:
        feeds.update({n: _host(c) for n, c in zip(rt.cache_names, caches)})
        return rt.session.run(taps, feeds)
    binding = rt.session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for name, cache in zip(rt.cache_names, caches):
        if isinstance(cache, torch.Tensor):
            _bind(binding.bind_input, name, cache)
        else:
            binding.bind_ortvalue_input(name, cache)
    for name, cache in zip(rt.output_names[1:], caches):  # presents: in place where bound so, else ORT's
        if isinstance(cache, torch.Tensor):
            _bind(binding.bind_output, name, cache)
    for tap in taps:
        binding.bind_output(tap, "cpu")
    rt.session.run_with_iobinding(binding)
    outs = binding.get_outputs()  # in binding order: the in-place presents, then the taps
    return [o.numpy() for o in outs[len(outs) - len(taps):]]


def norm_inputs(model: torch.nn.Module, hidden: int, call) -> list[torch.Tensor]:
    """The first input of every norm module with a ``[hidden]`` weight, in call order, while ``call()``
    runs (as fp32, on the host)."""
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().float().cpu()))
               for m in model.modules() if "norm" in type(m).__name__.lower()
               and isinstance(getattr(m, "weight", None), torch.Tensor) and tuple(m.weight.shape) == (hidden,)]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return seen


def _err(x: np.ndarray | torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = torch.as_tensor(np.asarray(x)).double().reshape(ref.shape), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def compare(art: list[np.ndarray], eager: list[torch.Tensor], fp32: list[torch.Tensor]) -> dict:
    """Per tap (the logits last): errors against fp32 over all rows and over the last row."""
    out: dict = {"taps": {"artifact": len(art), "eager": len(eager), "fp32": len(fp32)}}
    if not (len(art) == len(eager) == len(fp32)):
        out["error"] = "the artifact's norms and eager's do not pair one to one"
        return out
    rows = []
    for i, (a, e, r) in enumerate(zip(art, eager, fp32)):
        rows.append({"tap": i, "artifact_vs_fp32": _err(a, r), "eager_vs_fp32": _err(e, r),
                     "artifact_vs_fp32_last": _err(np.asarray(a).reshape(r.shape)[:, -1], r[:, -1]),
                     "eager_vs_fp32_last": _err(e[:, -1], r[:, -1])})
    out["rows"] = rows
    first = next((r["tap"] for r in rows if r["artifact_vs_fp32"] > 2 * max(r["eager_vs_fp32"], 1e-5)), None)
    out["first_tap_over_twice_eager"] = first
    return out


def load_eager(spec: str, dtype: torch.dtype, device: str):
    """(model, forward(ids) -> logits, hidden size) of a Hugging Face directory or a sample name."""
    if os.path.isdir(spec):
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(spec, dtype=dtype).to(device).eval()
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return model, lambda ids: model(ids).logits, text.hidden_size
    from effexport.samples import get_sample

    sample = get_sample(spec)
    model = sample.build(device=torch.device("cpu")).to(dtype).to(device).eval()
    return model, lambda ids: model(ids)[0], sample.config.hidden_size


def probe(artifact: str, spec: str, prompt: int, device: str) -> dict:
    """The comparison of the module docstring (eager and fp32 first, the model freed, then the artifact)."""
    sys.path.insert(0, HERE)
    from _reference import fp32_streamed

    from effexport.exporter.backends.artifact import load_manifest

    manifest = load_manifest(artifact)  # an emulated artifact (bench/bf16_emulation.py): eager in the dtype it emulates
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(manifest.get("emulates", manifest.get("dtype")),
                                                                torch.float32)
    model, forward, hidden = load_eager(spec, dtype, device)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    ids = np.random.RandomState(1).randint(0, config.vocab_size, (1, prompt))
    tids = torch.from_numpy(ids).to(device)
    logits: list = []

    def run():
        logits.append(forward(tids).float().cpu())

    def run32():
        with fp32_streamed(model):
            run()
    eager = norm_inputs(model, hidden, run) + [logits[-1]]
    fp32 = norm_inputs(model, hidden, run32) + [logits[-1]]
    del model, forward
    if device == "cuda":
        torch.cuda.empty_cache()
    work = tempfile.mkdtemp(prefix=".norm_probe.", dir=os.path.dirname(os.path.abspath(artifact)))  # hard links
    try:
        taps = probe_dir(artifact, work, hidden)
        art = run_taps(work, taps, ids, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"artifact": os.path.abspath(artifact), "model": spec, "prompt": prompt, "device": device,
            "dtype": str(dtype).replace("torch.", ""), **compare(art, eager, fp32)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--model", required=True, help="a Hugging Face directory or a sample name")
    ap.add_argument("--prompt", type=int, default=600)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    result = probe(args.artifact, args.model, args.prompt, args.device)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "norm_error_probe.json"), "w") as f:
        json.dump(result, f, indent=1)
    for r in result.get("rows", []):
        print(f"tap {r['tap']:4d}  artifact {r['artifact_vs_fp32']:.2e}  eager {r['eager_vs_fp32']:.2e}  "
              f"(last row {r['artifact_vs_fp32_last']:.2e} / {r['eager_vs_fp32_last']:.2e})")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
