"""ONNX Runtime CUDA with CUDA graphs: ``effexport.runtime.CudaGraphRuntime`` against the same artifact
run uncaptured, and against onnxruntime-genai's own model builder on the same Hugging Face model.

    PYTHONPATH=/tmp/ortgpu python3 bench/ort_graphs.py --out DIR [--cases gemma3-1b,gemma4-e2b]
        [--contexts 4096,32768] [--batches 1,8] [--tokens 32] [--peer-batches 1] [--profile 4096:1,4096:8]
        [--stock gemma4-e2b:32768:8]

Cases (random bf16 weights, seed 0):

* ``gemma3-1b``: a Hugging Face ``Gemma3ForCausalLM`` with Gemma 3 1B's published shapes, saved as
  safetensors. **effexport**: ``effexport DIR --target onnx --dtype bf16 --kv-cache buffer --no-check``
  (the CLI, a subprocess). **peer**: onnxruntime-genai's builder (``-p bf16 -e cuda``, CUDA graph on,
  its windowed cache) driven by ``og.Generator``, greedy, a prompt of L-1 tokens, 4 warm-up tokens,
  then ``--tokens`` timed ones (per token: its generator loop, sampling on the device).
* ``gemma4-e2b``: the built-in real-size sample, built on the GPU and exported like
  ``bench/ort_cuda.py`` does with ``--kv-cache buffer`` (the CLI refuses random weights at this size;
  GenAI's builder cannot build Gemma 4 text models), plus effexport's GenAI package of it
  (``genai.onnx`` + ``genai_config.json``, as ``--genai`` writes them) driven by ``og.Generator``.

effexport's decode at (L, B): the runtime's caches for batch B filled with random values, then
``decode_step`` at positions L-1, L, ... with the next token the logits' argmax on the device (the
loop of ``CudaGraphRuntime.generate``): 4 warm-up steps (ORT captures the graph on the third), then
``--tokens`` timed steps, per token; the same with ``capture=False`` (the same bindings, no graph).
For Gemma 3 the effexport build adds ``--genai``: its GenAI package through the same ``og.Generator``
loop as the peer (CUDA provider, CUDA graph on). Parity on the GPU: ``generate`` (prefill 16 + 8 greedy tokens, captured) against the eager model
in bf16 fed the same tokens (max rel error of the logits, per step), and against the same bf16
weights computed in fp32 beside eager bf16's own error there. Roofline: weight bytes a step
reads + the plan's KV bytes at (L, B), over the device-to-device copy bandwidth measured here. For a
model with routed experts (Laguna, ZAYA1, DeepSeek V4: ``com.microsoft.MoE`` in the ``ort`` profile,
``exporter/backends/onnx/ort_moe.py``) the weight bytes count only the experts a step can use: per
MoE layer ``min(E, B * k)`` of its ``E`` experts (``k`` per token; B = 1: the ``k`` active ones),
the rest of the model whole (:func:`step_weight_bytes`).

Routing (``--routing``, on by default; models with routed experts only): whether the parity
outliers of an MoE artifact are routing flips. Eager side: forward hooks on the sample's routers
(Laguna's ``LagunaRouter``, ZAYA1's ``Router``, DeepSeek V4's ``Gate``) during the eager bf16 forward
parity already runs record each token's selected experts and the gap between its k-th and (k+1)-th
selection score (0: a tie). Artifact side: ``model.routing.onnx`` beside ``model.onnx``, the same graph
(weights external, in place) with the indices output of each ``com.microsoft.MoE`` node's router TopK
(found by walking back from its ``router_probs`` input; none for DeepSeek's hash-routed layers) as extra
outputs, run uncaptured once over the same prefill + decode tokens. ``parity.routing``: per step the
(layer, token) pairs whose expert sets differ (``differences``; step 0 counts the prompt's tokens),
the smallest eager gap (``min_gap``), the differing pairs (``flips``: layer, token, eager gap, experts
only eager / only the artifact chose) and per step above 2e-2 max rel error (``outliers``) whether a
flip occurred at that step (``flip``, ``eager_gap``: the smallest at it) and how many up to it
(``flips_up_to``, the prompt's included); the printed
table ends with one line per case.

A case is a built-in preset name, optionally cut to its first ``n`` decoder layers with ``@nL``
(``Sample.with_layers``: real widths, fewer layers, so a real-size MoE fits one GPU), e.g.
``--cases laguna-xs2@8L,zaya1-8b,deepseek-v4-flash@4L``; the build, the eager reference and the weight
bytes all use the cut model (:func:`bench_sample`). A ``:tiny`` preset without a cut goes through the
CLI; with one, through the sample path like the real-size presets.

Stock (``--stock CASE:L:B,...``, e.g. ``gemma4-e2b:32768:8``; empty by default): issue #20's baseline,
the stock ``torch.onnx.export(..., dynamo=True)`` of the case's eager sample as a user would call it
(``bench/ort_cuda.py``'s ``export_stock``: every layer's cache at full length, the capture's dynamic
dims from ``growing_dims``), built in a subprocess (``--export-stock``) started beside the effexport
builds, the sample built the way ``--export-sample`` builds it (``decode_step.build``, bf16, on the GPU;
a ``:tiny`` case's effexport build is the CLI's CPU init, other weights, the same shapes).
One stock build per case; each point (L, B) then, after every case is measured, in ONNX Runtime CUDA
through I/O binding (``ort_cuda._bind_run``: inputs and logits on the device, the presents in
ORT-allocated device memory), caches of the stock model's own layout at length L-1 with random contents
(``decode_step.eager_past``), the same step run 4 times to warm up and ``--tokens`` timed times (each
run synchronized). Rows in ``stock`` (JSON) and the markdown's second table:

* ``stock_ms``: the median of the timed runs (``stock_mean_ms``: their mean; the uncaptured column is a
  mean per token over ``--tokens`` steps);
* ``graph_ms`` / ``uncaptured_ms``: the case's effexport row at the same (L, B) (None where the case or
  the point was not measured); ``stock_over_graph`` = ``stock_ms / graph_ms``, ``stock_over_uncaptured``
  = ``stock_ms / uncaptured_ms`` (issue #20 asks for >= 10x at gemma4-e2b 32K B=8);
* ``stock_kv_bytes``: the stock caches at L-1; ``stock_placement``: from ORT's profile of the first
  warm-up run, the nodes per provider, the CPU nodes' op types and the Memcpy nodes ORT inserted;
* ``stock_max_rel_vs_eager``: the stock logits against the eager model (the same weights and inputs),
  max abs error over max abs logit (``stock_parity_error`` if that failed);
* ``error``: why the stock build or run failed (the rest of the bench goes on); ``skipped``: the build
  was still running when ``--build-timeout`` (counted from the start of the builds) ran out, and was killed.

The builds run in the background while the GPU measures. Writes ``ort_graphs.json`` / ``.md``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WARMUP = 4
GEMMA3_1B = dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=256, sliding_window=512, vocab_size=262144,
                 query_pre_attn_scalar=256, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                 tie_word_embeddings=True)


def copy_bandwidth() -> float:
    """The copy bandwidth the other benchmarks use (bytes read + written per second, best of eager,
    graphed and Triton copies of 2 GiB: ``decode_attention.bandwidths``)."""
    sys.path.insert(0, HERE)
    from decode_attention import bandwidths

    return bandwidths()["copy"]


# ------------------------------------------------------------------------------------- models
def save_gemma3(directory: str, max_context: int) -> int:
    """A random bf16 Gemma 3 1B-shaped model + a small tokenizer (GenAI's builder wants one);
    returns the weight bytes a decode step reads (all but the gathered embedding, which is tied)."""
    import transformers
    from tokenizers import Tokenizer, models

    config = transformers.Gemma3TextConfig(**GEMMA3_1B, max_position_embeddings=max_context)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.Gemma3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                               pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    tok.save_pretrained(directory)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with open(os.path.join(directory, GEMMA3_BYTES), "w") as f:  # written last: a --reuse run reads it
        json.dump({"weight_bytes": weight_bytes}, f)
    return weight_bytes


GEMMA3_BYTES = "bench_weight_bytes.json"


VARIANTS = {"": {}, "nocuda": {"EFFEXPORT_ORT_CUDA_FUSIONS": "0"}, "noskip": {"EFFEXPORT_ORT_ZERO_SKIP": "0"},
            "nopack": {"EFFEXPORT_ORT_PACK_QKV": "0"}, "window": {"EFFEXPORT_ORT_WINDOW_CACHE": "1"},
            "slots": {"EFFEXPORT_ORT_WINDOW_CACHE": "0"}}
"""Case suffixes (``CASE+VARIANT``) and the environment their build runs in: ``+nocuda`` builds without
the CUDA-only fusions (``exporter/backends/onnx/ort_cuda.py``), ``+noskip`` with the decode graph's
plain norms left plain (``ort_fusions.zero_skip_norms`` off), ``+nopack`` with each attention's three
projections unpacked (``ort_pack.py`` off), ``+window`` with GroupQueryAttention's windowed cache for the
sliding layers (the default again since run 39; the default build of run 38 had slot rings), ``+slots``
with the eager op's slot rings, for an A/B in one run."""


def split_variant(name: str) -> tuple[str, dict]:
    """``"gemma3-1b+nocuda"`` -> ``("gemma3-1b", its build environment)``."""
    base, _, variant = name.partition("+")
    if variant not in VARIANTS:
        raise ValueError(f"{name!r}: unknown variant {variant!r} (known: {', '.join(v for v in VARIANTS if v)})")
    return base, dict(os.environ, **VARIANTS[variant])


def effexport_build(model: str, out: str, max_context: int, log: str, genai: bool = False,
                    env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from effexport.exporter.cli import main; sys.exit(main(sys.argv[1:]))",
           model, "--target", "onnx", "--dtype", "bf16", "--kv-cache", "buffer", "--max-context", str(max_context),
           "--no-check", "-o", out, "--force"] + (["--genai"] if genai else [])
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def sample_build(name: str, out: str, max_context: int, log: str, env: dict | None = None) -> subprocess.Popen:
    """A real-size built-in sample: the CLI refuses random weights above its size limit (a CPU
    concern), so this builds the model on the GPU (``decode_step.build``) and exports it the way
    ``bench/ort_cuda.py`` does (capture, rewrite with ``--kv-cache buffer``, ``export_step``)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--export-sample", name, out, str(max_context)]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def bench_sample(name: str):
    """The sample of a case name: a built-in preset, or ``PRESET@nL`` for that preset cut to its first
    ``n`` decoder layers (``Sample.with_layers``; its name keeps the ``@nL``)."""
    from effexport.samples import get_sample

    base, at, cut = name.partition("@")
    sample = get_sample(base)
    if not at:
        return sample
    if not (cut.endswith("L") and cut[:-1].isdigit() and int(cut[:-1]) > 0):
        raise ValueError(f"{name!r}: a cut is @nL, n layers (e.g. {base}@4L)")
    return sample.with_layers(int(cut[:-1]))


def routed_experts(model) -> list[tuple[int, int, int]]:
    """``(E, k, bytes of one expert)`` per stacked routed-expert block of a sample model (``k``: the
    experts one token uses, from the config: ``num_experts_per_tok`` or DeepSeek's
    ``n_activated_experts``, hash-routed layers included)."""
    from effexport.samples._blocks import StackedExperts

    cfg = model.config
    k = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "n_activated_experts", None)
    blocks = [m for m in model.modules() if isinstance(m, StackedExperts)]
    if blocks and not k:
        raise ValueError(f"{type(cfg).__name__}: routed experts but no experts-per-token in the config")
    return [(m.gate_up.shape[0], k, m.expert_params() * m.gate_up.element_size()) for m in blocks]


def step_weight_bytes(case: dict, batch: int) -> int:
    """Weight bytes one decode step of ``batch`` tokens reads: ``case["weight_bytes"]`` (every
    parameter a step reads, all experts included) less, per MoE layer, the experts no token of the
    step can use (``E - min(E, batch * k)``)."""
    return case["weight_bytes"] - sum((e - min(e, batch * k)) * per for e, k, per in case.get("experts", []))


def export_sample(name: str, out: str, max_context: int) -> int:
    sys.path.insert(0, HERE)
    import decode_step
    from ort_cuda import export_effexport

    model = decode_step.build(bench_sample(name))
    _, plan = export_effexport(model, out, torch.bfloat16, max_context, "buffer")
    from types import SimpleNamespace

    from effexport.exporter.backends.onnx.genai import refusal, write_package

    if refusal(plan, name) is None:  # effexport's GenAI package beside the step (og.Generator drives it)
        loaded = SimpleNamespace(model=model, sample=SimpleNamespace(config=model.config), source={},
                                 vocab_size=model.config.vocab_size)
        write_package(out, "model.onnx", plan, loaded, max_context)
    else:
        print("no GenAI package:", refusal(plan, name), flush=True)
    return 0


STOCK_FILE = "stock.json"
"""Beside a stock build's ``model.onnx``: the case, dtype and the capture's sequence dims of its caches."""


def parse_stock(spec: str) -> list[tuple[str, int, int]]:
    """``--stock``'s ``CASE:L:B,...`` -> ``[(case, L, B)]`` (a case may hold ``:``, e.g.
    ``gemma4-e2b:tiny:64:2``); only sample cases (``gemma3-1b`` is a Hugging Face model)."""
    points = []
    for item in filter(None, spec.split(",")):
        parts = item.rsplit(":", 2)
        if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()) or int(parts[1]) < 2 or int(parts[2]) < 1:
            raise ValueError(f"--stock {item!r}: CASE:L:B with L >= 2, B >= 1 (e.g. gemma4-e2b:32768:8)")
        if split_variant(parts[0])[0] == "gemma3-1b":
            raise ValueError(f"--stock {item!r}: the stock baseline is of a sample case (gemma3-1b is a Hugging Face model)")
        points.append((parts[0], int(parts[1]), int(parts[2])))
    return points


def stock_build(name: str, out: str, log: str, device: str = "cuda", dtype: str = "bf16") -> subprocess.Popen:
    """The stock export of a sample case (its variant aside) in a subprocess (``--export-stock``)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--export-stock", split_variant(name)[0], out, device, dtype]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def export_stock_sample(name: str, out: str, device: str = "cuda", dtype: str = "bf16") -> int:
    """``bench/ort_cuda.py``'s ``export_stock`` of a sample built as ``--export-sample`` builds it
    (``decode_step.build``); the dynamic dims are the capture's (``growing_dims`` of a 40-token prefill,
    as ``capture_step`` finds them, without the capture itself). Writes :data:`STOCK_FILE` beside it."""
    from types import SimpleNamespace

    sys.path.insert(0, HERE)
    import decode_step
    from ort_cuda import DTYPES, export_stock

    from effexport.exporter.capture import growing_dims

    decode_step.DEV = device
    model = decode_step.build(bench_sample(name), DTYPES[dtype])
    ids = torch.randint(0, model.config.vocab_size, (2, 40), device=device)
    past, dims = growing_dims(model, ids)
    del past
    seq_dims = {f"past.{k}": v for k, v in dims.items()}
    export_stock(model, SimpleNamespace(seq_dims=seq_dims), out)
    with open(os.path.join(out, STOCK_FILE), "w") as f:
        json.dump({"case": name, "dtype": dtype, "seq_dims": seq_dims}, f)
    return 0


def genai_build(model: str, out: str, log: str) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(HERE, "peer_genai_build.py"), "-i", model, "-o", out, "-p", "bf16",
           "-e", "cuda", "-c", out + "-cache", "--extra_options", "enable_cuda_graph=true"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)


class BuildOverrun(RuntimeError):
    """A build still running when its share of ``--build-timeout`` ran out (killed)."""


def wait(proc: subprocess.Popen, log: str, limit: float, what: str) -> None:
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise BuildOverrun(f"{what}: still running after {limit:.0f}s") from None
    if code:
        with open(log) as f:
            raise RuntimeError(f"{what}: exit {code}: {f.read()[-800:]}")


def wait_builds(case: dict, jobs: list, build_timeout: float, started: float) -> None:
    """Wait for a case's builds, each within what is left of ``build_timeout`` (counted from
    ``started``), recording when each finished (``effexport_build_done_s``, ``genai_build_done_s``)."""
    for proc, log, what in jobs:
        wait(proc, log, max(10.0, build_timeout - (time.monotonic() - started)), f"{case['case']} {what}")
        case[f"{what.split()[0]}_build_done_s"] = time.monotonic() - started


def case_dirs(work: str, name: str) -> dict:
    """The directories a case's builds write under ``work`` (``effexport_dir``; the plain Gemma 3
    case also ``genai_dir``, the peer's)."""
    base = split_variant(name)[0]
    tag = name.replace(":", "-").replace("+", "-")
    if base == "gemma3-1b":
        dirs = {"effexport_dir": os.path.join(work, tag.replace("gemma3-1b", "g3") + "-effexport")}
        if base == name:
            dirs["genai_dir"] = os.path.join(work, "g3-genai")
        return dirs
    return {"effexport_dir": os.path.join(work, f"{tag}-effexport")}


def built(work: str, name: str) -> dict | None:
    """A case's directories (:func:`case_dirs`) when every build in them is complete -- an effexport
    artifact's manifest and the peer's ``genai_config.json`` are what each build writes last -- else None.
    A Gemma 3 case also needs the saved Hugging Face model its eager reference loads."""
    from effexport.exporter.backends.artifact import MANIFEST

    dirs = case_dirs(work, name)
    wanted = [os.path.join(dirs["effexport_dir"], MANIFEST)]
    if "genai_dir" in dirs:
        wanted.append(os.path.join(dirs["genai_dir"], "genai_config.json"))
    if split_variant(name)[0] == "gemma3-1b":
        wanted.append(os.path.join(work, "gemma3-1b-hf", GEMMA3_BYTES))
    return dirs if all(os.path.isfile(p) for p in wanted) else None


# ------------------------------------------------------------------------------------ timings
def effexport_decode(runtime, context: int, batch: int, tokens: int) -> float:
    """Seconds per decode step of a ``CudaGraphRuntime`` at positions context-1 .. (random caches;
    the runtime's graph for this batch size, once captured, serves every context)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for cache in runtime.initial_caches(batch):
        if cache.is_floating_point():
            cache.copy_(torch.randn(cache.shape, generator=gen, device="cuda", dtype=torch.float32) * 0.5)
    token = torch.zeros(batch, 1, dtype=torch.int64, device="cuda")
    pos = context - 1
    for _ in range(WARMUP):
        token = runtime.decode_step(token, pos)[:, -1].argmax(-1, keepdim=True)
        pos += 1
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(tokens):
        token = runtime.decode_step(token, pos)[:, -1].argmax(-1, keepdim=True)
        pos += 1
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / tokens


def placement_log(directory: str) -> None:
    """ONNX Runtime's INFO log of a plain CUDA session (stderr): the nodes it placed on the CPU and the
    Memcpy nodes it inserted, i.e. why a CUDA graph was refused."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 1
    ort.InferenceSession(os.path.join(directory, "model.onnx"), options,
                         providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def genai_decode(directory: str, context: int, batch: int, tokens: int) -> float:
    """Seconds per token of ``og.Generator`` after a prompt of context-1 tokens."""
    import onnxruntime_genai as og

    config = og.Config(directory)
    config.clear_providers()
    config.append_provider("cuda")
    config.set_provider_option("cuda", "enable_cuda_graph", "1")
    model = og.Model(config)
    params = og.GeneratorParams(model)
    with open(os.path.join(directory, "genai_config.json")) as f:  # a package with sliding layers
        length = json.load(f)["model"]["context_length"]  # needs max_length = its context length
    params.set_search_options(max_length=length, batch_size=batch, do_sample=False)
    generator = og.Generator(model, params)
    prompt = np.random.RandomState(0).randint(4, 1000, (batch, context - 1)).astype(np.int32)
    generator.append_tokens(prompt)
    for _ in range(WARMUP):
        generator.generate_next_token()
    t0 = time.perf_counter()
    for _ in range(tokens):
        generator.generate_next_token()
    generator.get_next_tokens()  # the last token is on the host: the loop is done
    seconds = (time.perf_counter() - t0) / tokens
    del generator, model
    return seconds


def stock_placement(session_file: str) -> dict:
    """From ORT's profile (a JSON trace) of one run: nodes per provider, the op types of the nodes on
    the CPU and the Memcpy nodes (``{op: count}`` each)."""
    from collections import Counter

    with open(session_file) as f:
        nodes = [e["args"] for e in json.load(f) if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    provider = [(a.get("provider", "?").replace("ExecutionProvider", ""), a.get("op_name", "?")) for a in nodes]
    return {"providers": dict(Counter(p for p, _ in provider)),
            "cpu_ops": dict(Counter(op for p, op in provider if p == "CPU").most_common()),
            "memcpy": dict(Counter(op for _, op in provider if op.startswith("Memcpy")))}


def stock_decode(directory: str, context: int, batch: int, tokens: int, device: str = "cuda",
                 check: bool = True) -> dict:
    """One decode step of the stock export in :data:`STOCK_FILE`'s directory at position context-1
    (batch ``batch``, its caches at length context-1, random contents): ``WARMUP`` runs (the first under
    ORT's profiler: :func:`stock_placement`), then ``tokens`` timed ones through I/O binding (median and
    mean, ms); ``check``: the logits against the eager model on the same inputs."""
    sys.path.insert(0, HERE)
    import decode_step
    from ort_cuda import DTYPES, _bind_run, _rel, _session

    with open(os.path.join(directory, STOCK_FILE)) as f:
        meta = json.load(f)
    decode_step.DEV = device
    model = decode_step.build(bench_sample(meta["case"]), DTYPES[meta["dtype"]])
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    past = decode_step.eager_past(model, meta["seq_dims"], batch, context - 1, gen)
    ids = torch.randint(0, vocab, (batch, 1), device=device, generator=gen)
    out = {"stock_kv_bytes": sum(t.numel() * t.element_size() for t in past.values())}
    session = _session(os.path.join(directory, "model.onnx"), device,
                       os.path.join(directory, f"profile-{context}-{batch}"))
    run, logits = _bind_run(session, [ids, *past.values()], device, (batch, 1, vocab))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run()
    sync()
    out["stock_placement"] = stock_placement(session.end_profiling())  # the timed runs are not profiled
    for _ in range(WARMUP - 1):
        run()
    sync()
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    out["stock_ms"] = float(np.median(times)) * 1e3
    out["stock_mean_ms"] = float(np.mean(times)) * 1e3
    if check:
        try:
            with torch.no_grad():
                ref = model(ids, past)[0]
            out["stock_max_rel_vs_eager"] = _rel(logits, ref)
        except Exception as exc:  # noqa: BLE001  (the timing stands without it)
            out["stock_parity_error"] = f"{type(exc).__name__}: {exc}"[:600]
            traceback.print_exc()
    del run, logits, session, past, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def stock_row(point: tuple[str, int, int], effexport_rows: list) -> dict:
    """A stock row's effexport side: the graph and uncaptured ms of the case's row at the same (L, B)
    (None where not measured), and the stock fields the row gets later (None until then)."""
    case, context, batch = point
    mine = next((r for r in effexport_rows if (r["context"], r["batch"]) == (context, batch)), {})
    return {"case": case, "context": context, "batch": batch, "stock_ms": None,
            "graph_ms": mine.get("graph_ms"), "uncaptured_ms": mine.get("uncaptured_ms"),
            "stock_over_graph": None, "stock_over_uncaptured": None, "error": None, "skipped": None}


def stock_ratios(row: dict) -> dict:
    """``stock_over_graph`` / ``stock_over_uncaptured`` of a row whose sides were both measured."""
    for key in ("graph", "uncaptured"):
        if row.get("stock_ms") and row.get(f"{key}_ms"):
            row[f"stock_over_{key}"] = row["stock_ms"] / row[f"{key}_ms"]
    return row


# ------------------------------------------------------------------------------------ routing
OUTLIER = 2e-2
"""A parity step whose logits' max rel error exceeds this gets a routing verdict (flip or not)."""
ROUTING_FILE = "model.routing.onnx"
# ops a router's expert indices pass through between its TopK and the MoE's router_probs (the scatter
# of the routing weights, the log of ``comb / max``, casts, ZAYA's skip mask); heavier ops (the router's
# matmuls) lead back into the hidden state, i.e. to earlier layers' routers, and end the walk
_WALK_STOP = frozenset({"MatMul", "Gemm", "Einsum", "MoE", "Conv", "TopK", "Softmax", "Sigmoid", "Softplus"})


def _selection(module, inputs, output):
    """(expert indices ``[N, k]`` int64, selection scores ``[N, E]`` fp32: what the router's top-k ran on)
    of one call of a sample's router; None for a router that selects without a top-k (DeepSeek's hash
    layers). Laguna's ``LagunaRouter`` and DeepSeek V4's ``Gate`` return ``(weights, idx)`` and select on
    ``scores + bias``; ZAYA1's ``Router`` returns ``(logits, idx, ...)`` with the skip class masked to 0 and
    selects top-1 on ``softmax(logits) + balancing_biases`` over ``E + 1`` classes (recomputed here, unmasked,
    as the graph's TopK sees it)."""
    import torch.nn.functional as F

    kind = type(module).__name__
    x = inputs[0]
    if kind == "LagunaRouter":
        logits = F.linear(x, module.weight).float()
        if module.softcap > 0.0:
            logits = torch.tanh(logits / module.softcap) * module.softcap
        return output[1], torch.sigmoid(logits) + module.e_score_correction_bias.float()
    if kind == "Gate":  # DeepSeek V4
        if module.hash:
            return None
        scores = F.linear(x.float(), module.weight.float())
        scores = F.softplus(scores).sqrt() if module.score_func == "sqrtsoftplus" else scores.sigmoid()
        return output[1], scores + module.bias.float()
    if kind == "Router":  # ZAYA1
        scores = torch.softmax(output[0], dim=-1).float() + module.balancing_biases.float()
        return scores.topk(1, dim=-1).indices, scores
    raise TypeError(f"no routing selection for {kind}")


def routers(model) -> list[tuple[str, torch.nn.Module]]:
    """The router modules of a sample model, in layer order (:func:`_selection` knows each kind)."""
    from effexport.samples._blocks import StackedExperts

    if not any(isinstance(m, StackedExperts) for m in model.modules()):
        return []
    return [(name, m) for name, m in model.named_modules()
            if type(m).__name__ in ("LagunaRouter", "Gate", "Router") and "samples" in type(m).__module__]


class EagerRouting:
    """Forward hooks on a model's routers: per router call, the selected experts ``[N, k]`` and the gap
    between the k-th and the (k+1)-th selection score of each token (0: a tie). ``with`` it around one
    forward; ``calls`` then holds ``(router name, idx or None, gap or None)`` in call order."""

    def __init__(self, model):
        self.routers = routers(model)
        self.calls: list[tuple[str, np.ndarray | None, np.ndarray | None]] = []
        self._hooks = []

    def __enter__(self):
        for name, module in self.routers:
            self._hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: self._record(name, m, i, o)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _record(self, name, module, inputs, output):
        sel = _selection(module, inputs, output)
        if sel is None:
            self.calls.append((name, None, None))
            return
        idx, scores = sel
        k = idx.shape[-1]
        top = scores.detach().float().topk(min(k + 1, scores.shape[-1]), dim=-1).values
        gap = (top[:, k - 1] - top[:, k]) if top.shape[-1] > k else torch.full_like(top[:, 0], float("inf"))
        self.calls.append((name, idx.detach().reshape(-1, k).cpu().numpy(), gap.cpu().numpy()))


def moe_topk_outputs(graph) -> list[tuple[str, str | None]]:
    """Per ``com.microsoft.MoE`` node of an ONNX graph (proto), in graph order: (its name, the indices
    output of the ``TopK`` its routing comes from, or None: no TopK, e.g. a hash-routed layer). Walks back
    from the node's ``router_probs`` input through the routing plumbing (``Log``, ``Div``, ``Max``,
    ``Cast``, ``ScatterElements``, ``Gather``, ``Where``, ...) and stops at the router's matmuls and at TopK;
    a TopK reached through its indices output is the one. More than one such TopK raises."""
    producer = {out: node for node in graph.node for out in node.output if out}
    found = []
    for node in graph.node:
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            continue
        seen, todo, topks = set(), [node.input[1]], []
        while todo:
            value = todo.pop()
            if value in seen or value not in producer:
                continue
            seen.add(value)
            src = producer[value]
            if src.op_type == "TopK":
                if value == src.output[1] and value not in topks:
                    topks.append(value)
                continue
            if src.op_type not in _WALK_STOP:
                todo.extend(i for i in src.input if i)
        if len(topks) > 1:
            raise ValueError(f"MoE {node.name}: its routing comes from {len(topks)} TopK nodes ({topks})")
        found.append((node.name, topks[0] if topks else None))
    return found


def routing_model(directory: str) -> tuple[str, list[tuple[str, str | None]]]:
    """A diagnostic copy of an artifact's step model, :data:`ROUTING_FILE` beside it: the same graph
    with the TopK indices of each MoE's router (:func:`moe_topk_outputs`) as extra graph outputs after
    the step's own. The weights stay where they are: the proto is loaded without its external data and
    written alone, its initializers keeping their (relative) locations. Returns (its file name, the
    MoE nodes with their index outputs)."""
    import onnx

    from effexport.exporter.backends.artifact import load_manifest

    model = onnx.load(os.path.join(directory, load_manifest(directory)["files"]["step"]), load_external_data=False)
    found = moe_topk_outputs(model.graph)
    present = {o.name for o in model.graph.output}
    for _, name in found:
        if name is not None and name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
            present.add(name)
    onnx.save_model(model, os.path.join(directory, ROUTING_FILE))
    return ROUTING_FILE, found


def artifact_routing(directory: str, stream: np.ndarray, prompt: int, device: str = "cuda") -> dict:
    """The artifact's expert indices over the parity steps: ``stream [1, prompt + steps]`` fed as a
    prefill of ``prompt`` tokens then one token per step (the tokens eager sees), through one uncaptured
    session of :func:`routing_model`'s copy. Returns ``{"moe": [(node, index output or None)],
    "steps": [[idx [N, k] per MoE with a TopK] per step]}``."""
    from effexport.runtime import CudaGraphRuntime

    file, found = routing_model(directory)
    names = [n for _, n in found if n is not None]

    class Diagnostic(CudaGraphRuntime):
        """The step runtime over the diagnostic copy, with the index outputs bound (ORT allocates them)."""

        last = None

        @property
        def manifest(self):
            return self._manifest

        @manifest.setter
        def manifest(self, value):  # OrtRuntime opens manifest["files"]["step"]: the copy instead
            self._manifest = {**value, "files": {**value["files"], "step": file}}

        def _bind_all(self, binding, slot, rows, ids, logits):
            super()._bind_all(binding, slot, rows, ids, logits)
            for name in names:  # copied to the host by ORT after the run
                binding.bind_output(name, "cpu")
            Diagnostic.last = binding

        def _decode_run(self, slot, batch):
            slot.binding = None  # bound afresh every step: ORT allocates the index outputs per run
            super()._decode_run(slot, batch)

    runtime = Diagnostic(directory, device=device, capture=False)
    steps = []

    def collect():
        outs = Diagnostic.last.get_outputs()[-len(names):] if names else []
        steps.append([np.asarray(o.numpy()).reshape(-1, o.shape()[-1]) for o in outs])

    ids = np.ascontiguousarray(stream[:, :prompt], dtype=np.int64)
    runtime.step(ids, 0, runtime.initial_caches(1))
    collect()
    for i in range(prompt, stream.shape[1]):
        runtime.decode_step(torch.as_tensor(stream[:, i:i + 1], dtype=torch.int64).to(device), i)
        collect()
    del runtime
    return {"moe": found, "steps": steps}


def eager_routing(model, stream: torch.Tensor) -> list[tuple[str, np.ndarray | None, np.ndarray | None]]:
    """The routers' calls (:class:`EagerRouting`) of one forward of ``model`` over ``stream``."""
    with torch.no_grad(), EagerRouting(model) as rec:
        model(stream)
    return rec.calls


def compare_routing(eager_calls, artifact: dict, prompt: int, errors: list[float] | None = None,
                    outlier: float = OUTLIER) -> dict:
    """Eager vs artifact routing per parity step (step 0: the prompt's ``prompt`` tokens, step i: token
    ``prompt - 1 + i``). Routers with a TopK are matched in order (hash-routed ones have none on either
    side). ``differences``: per step, the (layer, token) pairs whose expert *sets* differ;
    ``min_gap``: per step, the smallest eager gap between the k-th and (k+1)-th selection score (how
    near a tie the step's tokens came). With ``errors`` (the logits' max rel error per step), each step
    above ``outlier``: whether a flip occurred at it (``flip``, with the smallest eager gap among its
    flips) and how many occurred up to it, itself included (``flips_up_to``: earlier tokens' routing
    reaches later steps through the cache). ``flips`` lists the first 64 differing pairs."""
    routed = [(name, idx, gap) for name, idx, gap in eager_calls if idx is not None]
    n_topk = sum(n is not None for _, n in artifact["moe"])
    if len(routed) != n_topk:
        raise ValueError(f"{len(routed)} eager routers with a top-k vs {n_topk} MoE TopK outputs in the artifact")
    steps = artifact["steps"]
    out = {"moe_nodes": len(artifact["moe"]), "topk_outputs": n_topk, "layers": [n for n, _, _ in routed],
           "differences": [], "tokens": [], "min_gap": [], "flips": []}
    for s, per_layer in enumerate(steps):
        rows = slice(0, prompt) if s == 0 else slice(prompt - 1 + s, prompt + s)
        diffs, gaps = [], []
        for (name, idx, gap), got in zip(routed, per_layer):
            ref = idx[rows]
            if got.shape[0] != ref.shape[0]:
                raise ValueError(f"step {s}, {name}: {got.shape[0]} artifact tokens vs {ref.shape[0]} eager")
            gaps.append(float(gap[rows].min()))
            for t in range(ref.shape[0]):
                a, b = set(ref[t].tolist()), set(got[t].tolist())
                if a != b:
                    diffs.append({"step": s, "layer": name, "token": rows.start + t, "eager_gap": float(gap[rows][t]),
                                  "eager_only": sorted(a - b), "artifact_only": sorted(b - a)})
        out["differences"].append(len(diffs))
        out["tokens"].append(rows.stop - rows.start)
        out["min_gap"].append(min(gaps) if gaps else None)
        out["flips"].extend(diffs)
    if errors is not None:
        out["outliers"] = []
        for s, err in enumerate(errors):
            if err > outlier:
                at = [d for d in out["flips"] if d["step"] == s]
                out["outliers"].append({"step": s, "max_rel": err, "flip": bool(at),
                                        "flips_up_to": sum(out["differences"][:s + 1]),
                                        "eager_gap": min((d["eager_gap"] for d in at), default=None)})
    out["flips"] = out["flips"][:64]
    return out


def routing_line(case: dict) -> str | None:
    """The printed table's line of a case's routing diagnosis (None without one)."""
    r = case.get("parity", {}).get("routing")
    if isinstance(r, str):
        return f"routing {case['case']}: failed: {r[:200]}"
    if not isinstance(r, dict):
        return None
    line = (f"routing {case['case']}: {r['topk_outputs']}/{r['moe_nodes']} MoE TopK; (layer, token) "
            f"expert-set differences per step {r['differences']}")
    for o in r.get("outliers", []):
        verdict = f"flip, eager gap {o['eager_gap']:.2e}" if o["flip"] else \
            f"no flip at the step ({o['flips_up_to']} up to it)"
        line += f"; step {o['step']} (max rel {o['max_rel']:.3g}): {verdict}"
    return line


def parity(directory: str, eager, vocab: int, prompt: int = 16, steps: int = 8, routing: bool = False,
           eager_first: bool = False, device: str = "cuda") -> dict:
    """``generate`` through CUDA graphs vs the eager model on the same tokens (max rel error of the
    logits per step), against eager bf16 (``max_rel``) and against the same bf16 weights computed in
    fp32 (``fp32.max_rel``), beside eager bf16's own error against that fp32 model (``fp32.eager_bf16``):
    an artifact no farther from fp32 than eager bf16 is differs from it by bf16 rounding order.
    ``routing`` (a model with routers): ``routing`` compares the experts each token got in eager bf16 and in
    the artifact over the same steps (:func:`compare_routing`: hooks on the eager forward already run, and
    one uncaptured session of :func:`routing_model`'s diagnostic copy).

    ``eager_first`` (a model whose eager copy and artifact session do not fit the GPU together, e.g.
    the DeepSeek V4 Flash cut: 27 GB each beside ORT's MoE workspace): eager greedy-decodes the
    ``steps`` tokens first and is moved to the host before the artifact's session opens; the artifact
    then runs the same tokens (prefill, then one-token steps replayed from its CUDA graph) -- the
    same stream, the same comparison, only who chose the tokens differs. ``parity["tokens_from"]``
    says which ran first."""
    from effexport.runtime import CudaGraphRuntime

    ids = np.random.RandomState(1).randint(0, vocab, (1, prompt))

    def errors(x, ref):
        return [((x[:, i] - ref[:, i]).abs().max() / ref[:, i].abs().max()).item() for i in range(x.shape[1])]

    if eager_first:
        stream = torch.from_numpy(ids).to(device)
        with torch.no_grad():
            for _ in range(steps):
                stream = torch.cat([stream, eager.run(stream)[:, -1:].argmax(-1)], 1)
    else:
        runtime = CudaGraphRuntime(directory, device=device)
        tokens, logits = runtime.generate(ids, steps + 1)
        del runtime
        stream = torch.from_numpy(np.concatenate([ids, tokens[:, :-1]], axis=1)).to(device)
        got = torch.stack([torch.from_numpy(x).to(device).float() for x in logits], 1)  # [1, steps+1, V]
    routing = routing and bool(routers(eager.model))
    with torch.no_grad(), EagerRouting(eager.model if routing else torch.nn.Module()) as rec:
        ref = eager.run(stream)[:, prompt - 1:].float()
    with torch.no_grad():
        ref32 = eager.run_fp32(stream)[:, prompt - 1:].float()
    if eager_first:
        # the GPU's memory to the artifact, with no host copy (the caller drops the model after): a
        # real-size model's host copy would not fit beside an artifact kept in host memory (tmpfs --work)
        eager.model.to("meta")
        gc.collect()
        torch.cuda.empty_cache()
        runtime = CudaGraphRuntime(directory, device=device)
        first = runtime.step(stream[:, :prompt].cpu().numpy(), 0, runtime.initial_caches(1))
        got = [torch.from_numpy(first.logits[:, -1:]).to(device).float()]
        for i in range(steps):
            # the runtime's own logits tensor, overwritten by the next step: a copy
            got.append(runtime.decode_step(stream[:, prompt + i:prompt + i + 1], prompt + i).to(torch.float32, copy=True))
        got = torch.cat(got, 1)  # [1, steps+1, V]
        del runtime
    with torch.no_grad():
        out = {"max_rel_per_step": errors(got, ref), "tokens_from": "eager" if eager_first else "artifact",
               "prompt": prompt, "steps": steps}
        out["max_rel"] = max(out["max_rel_per_step"])
        if routing:
            try:
                out["routing"] = compare_routing(rec.calls, artifact_routing(directory, stream.cpu().numpy(), prompt,
                                                                             device=device),
                                                 prompt, out["max_rel_per_step"])
            except Exception as exc:  # noqa: BLE001  (the logits' parity stands without it)
                out["routing"] = f"{type(exc).__name__}: {exc}"[:600]
                traceback.print_exc()
            gc.collect()
            torch.cuda.empty_cache()
        out["fp32"] = {"max_rel": max(errors(got, ref32)), "eager_bf16": max(errors(ref, ref32))}
    return out


class _Eager:
    """The eager reference of a case: ``run(ids)`` in bf16 and ``run_fp32(ids)``, the same bf16
    weights computed in fp32, upcast one decoder layer at a time (``bench/_reference.py``: no full
    fp32 copy, which a real-size MoE model's would not fit beside it)."""

    def __init__(self, model, logits):
        self.model, self.logits = model, logits

    def run(self, ids):
        return self.logits(self.model(ids))

    def run_fp32(self, ids):
        sys.path.insert(0, HERE)
        from _reference import fp32_streamed

        with fp32_streamed(self.model):
            return self.logits(self.model(ids))


def _hf_eager(directory: str):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).cuda().eval()
    return _Eager(model, lambda out: out.logits)


def _sample_eager(name: str):
    """(eager logits function, weight bytes, vocab, routed experts) of a sample case, the model its
    build exported (a ``:tiny`` preset without a cut: the CLI's CPU init; else ``decode_step.build``)."""
    sys.path.insert(0, HERE)
    import decode_step

    if name.endswith(":tiny"):  # the model the CLI built: the CPU init from seed 0 (a GPU init differs)
        model = bench_sample(name).build("cpu").to(torch.bfloat16).cuda().eval()
    else:
        model = decode_step.build(bench_sample(name))
    return _Eager(model, lambda out: out[0]), decode_step.weight_bytes(model), model.config.vocab_size, \
        routed_experts(model)


# --------------------------------------------------------------------------------------- main
def kv_bytes(directory: str, batch: int, context: int) -> int:
    from effexport.exporter.backends.artifact import load_manifest, plan_entries

    entries = plan_entries(load_manifest(directory))
    # a buffer holds max_context rows but a step reads the positions written so far
    return sum(e.nbytes(batch, context) * (min(context, e.shape[2]) / e.shape[2] if e.kind == "buffer" else 1)
               for e in entries)


def general_only(directory: str) -> str | None:
    """A sibling of an artifact with a one-token decode graph (``decode.onnx``) whose manifest names
    only ``model.onnx`` (the other files hard-linked, not copied): the same step without the decode graph,
    so one run measures what the decode graph buys. None if the artifact has no decode graph."""
    from effexport.exporter.backends.artifact import MANIFEST

    with open(os.path.join(directory, MANIFEST)) as f:
        manifest = json.load(f)
    if not manifest.get("files", {}).get("decode"):
        return None
    sibling = directory.rstrip("/") + "-general"
    os.makedirs(sibling, exist_ok=True)
    for name in os.listdir(directory):
        source, target = os.path.join(directory, name), os.path.join(sibling, name)
        if name != MANIFEST and os.path.isfile(source) and not os.path.lexists(target):
            os.link(source, target)  # hard links: the loader refuses symlinks that leave the artifact
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k != "decode"}
    with open(os.path.join(sibling, MANIFEST), "w") as f:
        json.dump(manifest, f)
    return sibling


RUNTIMES = ("graph", "uncaptured", "general_graph")
"""The runtimes :func:`measure` times (``--runtimes``)."""


def measure(case: dict, args, bw: float) -> None:
    """Per (L, B): ``graph_ms`` (``CudaGraphRuntime``, one-token steps through the decode graph where
    the artifact has one), ``uncaptured_ms`` (the same bindings, no graph) and, for an artifact with a
    decode graph, ``general_graph_ms`` (captured, ``model.onnx`` only: what the decode graph buys).
    One runtime at a time (each holds its own copy of the weights), released before the next."""
    from effexport.runtime import CudaGraphRuntime

    rows = case.setdefault("rows", [])
    for context in args.contexts:
        for batch in args.batches:
            rows.append({"context": context, "batch": batch,
                         "roofline_ms": (step_weight_bytes(case, batch)
                                         + kv_bytes(case["effexport_dir"], batch, context)) / bw * 1e3})
    general = general_only(case["effexport_dir"])
    variants = [("graph", case["effexport_dir"], True), ("uncaptured", case["effexport_dir"], False)]
    variants += [("general_graph", general, True)] if general else []
    variants = [v for v in variants if v[0] in args.runtimes]
    for key, directory, capture in variants:
        try:
            runtime = CudaGraphRuntime(directory, device="cuda", capture=capture)
        except Exception as exc:  # noqa: BLE001  (the reason is the finding)
            case["graph_session_error" if key == "graph" else f"{key}_session_error"] = \
                f"{type(exc).__name__}: {exc}"[:600]
            traceback.print_exc()
            if key == "graph":
                placement_log(directory)
            continue
        for row in rows:
            try:
                row[f"{key}_ms"] = effexport_decode(runtime, row["context"], row["batch"], args.tokens) * 1e3
            except Exception as exc:  # noqa: BLE001  (the reason is the finding)
                row[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:600]
                traceback.print_exc()
            print(json.dumps({"case": case["case"], "variant": key, **row}), flush=True)
        del runtime
        gc.collect()
        torch.cuda.empty_cache()
    packages = [(key, d) for key, d in (("genai", case.get("genai_dir")), ("effexport_genai", case["effexport_dir"]))
                if d and os.path.isfile(os.path.join(d, "genai_config.json"))]
    for row in rows:
        if row["batch"] not in args.peer_batches:
            continue
        for key, directory in packages:
            try:  # the peer's own model, and effexport's --genai package, through og.Generator
                row[f"{key}_ms"] = genai_decode(directory, row["context"], row["batch"], args.tokens) * 1e3
            except Exception as exc:  # noqa: BLE001
                row[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:600]
                traceback.print_exc()
            gc.collect()
        print(json.dumps({"case": case["case"], **row}), flush=True)


def op_profile(directory: str, context: int, batch: int, steps: int = 8) -> dict:
    """Where one uncaptured decode step's time goes (the same bindings as the timed runs): per ONNX op
    type the host time of ORT's kernels (its profiler: ``[ms per step, nodes]``), and per CUDA kernel
    the GPU time (torch's CUPTI profiler, which records every kernel of the process: ``[name, ms per
    step, launches per step]``), largest first."""
    import onnxruntime as ort

    from effexport.runtime import CudaGraphRuntime

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(directory, f"profile-{context}-{batch}")
    runtime = CudaGraphRuntime(directory, device="cuda", capture=False, session_options=opts)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # CUPTI sees ORT's kernels too
        effexport_decode(runtime, context, batch, steps)
    kernels = sorted(((e.key, e.device_time_total / 1e3 / (steps + WARMUP), e.count // (steps + WARMUP))
                      for e in prof.key_averages()), key=lambda k: -k[1])
    with open(runtime.session.end_profiling()) as f:
        trace = json.load(f)
    runs = sum(1 for e in trace if e.get("name") == "model_run")
    per_op, nodes = {}, {}
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3 / max(runs, 1)
            nodes.setdefault(op, set()).add(e["name"])
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    return {"runs": runs, "host_ms": sum(per_op.values()),
            "ops_host_ms": {op: [round(ms, 4), len(nodes[op])] for op, ms in ranked[:14]},
            "gpu_ms": sum(k[1] for k in kernels),
            "kernels_gpu_ms": [[name[:90], round(ms, 4), n] for name, ms, n in kernels[:16]]}


def node_counts(path: str) -> dict:
    import onnx
    from collections import Counter

    model = onnx.load(path, load_external_data=False)
    return {"nodes": len(model.graph.node), "top": dict(Counter(n.op_type for n in model.graph.node).most_common(8))}


def table(results: dict) -> str:
    bw = results["copy_bw"]
    lines = [f"copy bandwidth {bw / 1e12:.2f} TB/s" if bw else "copy bandwidth not measured (--build-only)", "",
             "| case | L | B | effexport graph ms | without decode graph ms | uncaptured ms | genai ms | "
             "effexport via genai ms | roofline ms | graph / roofline | genai / graph |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in results["cases"]:
        for r in case.get("rows", []):
            g, w, u, p, e, roof = (r.get(k) for k in ("graph_ms", "general_graph_ms", "uncaptured_ms", "genai_ms",
                                                      "effexport_genai_ms", "roofline_ms"))
            fmt = lambda x: f"{x:.2f}" if isinstance(x, float) else "-"  # noqa: E731
            lines.append(f"| {case['case']} | {r['context']} | {r['batch']} | {fmt(g)} | {fmt(w)} | {fmt(u)} | {fmt(p)} | "
                         f"{fmt(e)} | {fmt(roof)} | {fmt(g / roof) if g and roof else '-'} | "
                         f"{fmt(p / g) if p and g else '-'} |")
    routing = [line for line in map(routing_line, results["cases"]) if line]
    stock = ["", stock_table(results["stock"])] if results.get("stock") else []
    return "\n".join(lines + ([""] + routing if routing else []) + stock)


def stock_measure(results: dict, args, jobs: dict, started: float, save=lambda: None) -> None:
    """``--stock``'s rows, after every case is measured (the GPU free of their runtimes): per stock case,
    wait for its build within what is left of ``--build-timeout`` (past it: killed, its rows ``skipped``),
    then time each point (:func:`stock_decode`); a failure is that row's ``error``; ``save()`` after each row."""
    cases = {case["case"]: case for case in results["cases"]}
    built: dict = {}  # stock case -> None (ready) or (field, reason)
    for point in args.stock:
        row = stock_row(point, cases.get(point[0], {}).get("rows", []))
        results["stock"].append(row)
        base = split_variant(point[0])[0]
        directory, proc, log = jobs[base]
        if base not in built:
            try:
                wait(proc, log, max(10.0, args.build_timeout - (time.monotonic() - started)), f"{base} stock build")
                built[base] = None
                results.setdefault("stock_build_done_s", {})[base] = time.monotonic() - started
            except BuildOverrun as exc:
                built[base] = ("skipped", str(exc))
            except Exception as exc:  # noqa: BLE001  (the reason is the finding)
                built[base] = ("error", f"{type(exc).__name__}: {exc}"[:800])
        if built[base] is not None:
            row[built[base][0]] = built[base][1]
        else:
            try:
                row.update(stock_decode(directory, row["context"], row["batch"], args.tokens))
                stock_ratios(row)
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:800]
                traceback.print_exc()
        print(json.dumps({"stock": row}, default=str), flush=True)
        save()


def stock_table(rows: list) -> str:
    fmt = lambda x, spec=".2f": format(x, spec) if isinstance(x, float) else "-"  # noqa: E731
    lines = ["| case | L | B | stock ms | effexport graph ms | uncaptured ms | stock / graph | stock / uncaptured | "
             "stock max rel vs eager | stock Memcpy nodes | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memcpy = sum(r["stock_placement"]["memcpy"].values()) if r.get("stock_placement") else "-"
        note = ("skipped: " + r["skipped"] if r.get("skipped") else r.get("error") or r.get("stock_parity_error") or "")
        lines.append(f"| {r['case']} | {r['context']} | {r['batch']} | {fmt(r.get('stock_ms'))} | {fmt(r.get('graph_ms'))} | "
                     f"{fmt(r.get('uncaptured_ms'))} | {fmt(r.get('stock_over_graph'), '.1f')} | "
                     f"{fmt(r.get('stock_over_uncaptured'), '.1f')} | {fmt(r.get('stock_max_rel_vs_eager'), '.1e')} | "
                     f"{memcpy} | {note[:120].replace('|', '/')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--export-sample"]:
        return export_sample(argv[1], argv[2], int(argv[3]))
    if argv[:1] == ["--export-stock"]:
        return export_stock_sample(*argv[1:5])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    ap.add_argument("--work", default="/tmp/ort_graphs")
    ap.add_argument("--cases", default="gemma3-1b,gemma4-e2b")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--peer-batches", default="1")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--build-timeout", type=float, default=420)
    ap.add_argument("--build-only", action="store_true",
                    help="build every case's artifacts, record the build times and stop (no GPU timing): with "
                    "--reuse in a second run, a build too long to share one device call with the timings")
    ap.add_argument("--reuse", action="store_true",
                    help="keep a case's artifacts already complete under --work (their manifests written: the build's "
                    "last step) instead of building them again; the same --contexts / --tokens as the build")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES),
                    help="which runtimes to time (each opens its own session, a copy of the weights: minutes at "
                    "real size): graph (captured), uncaptured, general_graph (captured, model.onnx only)")
    ap.add_argument("--profile", default="", help="L:B points (e.g. 4096:1,4096:8) to profile per op type "
                    "(ORT's profiler over uncaptured decode steps)")
    ap.add_argument("--parity-prompt", type=int, default=16,
                    help="prompt tokens of the parity check (then 8 greedy steps): longer than a model's sliding "
                    "window checks its windowed caches past the first wrap (Gemma 3 1B: 512)")
    ap.add_argument("--routing", action=argparse.BooleanOptionalAction, default=True,
                    help="for a model with routed experts: compare the experts each token got in eager bf16 and in "
                    "the artifact over the parity steps (a diagnostic copy of the step model with its routers' TopK "
                    "indices as outputs, one uncaptured session); --no-routing skips it")
    ap.add_argument("--stock", default="", help="CASE:L:B points (e.g. gemma4-e2b:32768:8) at which to time the stock "
                    "torch.onnx.export of the case's eager sample (ORT CUDA, I/O binding, uncaptured) against effexport")
    args = ap.parse_args(argv)
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.peer_batches = [int(x) for x in args.peer_batches.split(",")]
    args.profile = [p for p in args.profile.split(",") if p]
    args.runtimes = [v for v in args.runtimes.split(",") if v]
    if set(args.runtimes) - set(RUNTIMES) or not args.runtimes:
        ap.error(f"--runtimes: one or more of {', '.join(RUNTIMES)}")
    cases = args.cases.split(",")
    args.stock = parse_stock(args.stock)
    for case, context, batch in args.stock:
        if case not in cases or context not in args.contexts or batch not in args.batches:
            print(f"--stock {case}:{context}:{batch}: not in --cases x --contexts x --batches, "
                  "no effexport ms to compare with", flush=True)
    for name in cases + [case for case, _, _ in args.stock]:  # an unknown preset, variant, a bad @nL fails here,
        if split_variant(name)[0] != "gemma3-1b":  # before any build starts
            bench_sample(split_variant(name)[0])
    max_context = max(args.contexts) + WARMUP + args.tokens + 64
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    from effexport.exporter.backends.onnx.runtime import mem_reuse_default

    results = {"onnxruntime": ort.__version__, "torch": torch.__version__, "mem_reuse": mem_reuse_default("cuda"),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "copy_bw": None if args.build_only else copy_bandwidth(), "cases": []}
    if args.stock:
        results["stock"] = []

    def save():
        with open(os.path.join(args.out, "ort_graphs.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(args.out, "ort_graphs.md"), "w") as f:
            f.write(table(results) + "\n")

    jobs = {}  # case -> list of (proc, log, what)
    started = time.monotonic()
    gemma3_saved = None
    for name in cases:
        case = {"case": name}
        results["cases"].append(case)
        base, env = split_variant(name)
        case.update(case_dirs(args.work, name))
        reuse = args.reuse and built(args.work, name) is not None
        if base == "gemma3-1b":
            hf = os.path.join(args.work, "gemma3-1b-hf")
            if reuse:
                with open(os.path.join(hf, GEMMA3_BYTES)) as f:
                    gemma3_saved = json.load(f)["weight_bytes"]
            elif gemma3_saved is None:
                gemma3_saved = save_gemma3(hf, max_context)
            case["weight_bytes"] = gemma3_saved
        if reuse:
            case["reused"] = True
            jobs[name] = []
            continue
        log = case["effexport_dir"] + ".log"
        if base == "gemma3-1b":  # the CLI on the saved model; the peer is built once, beside the plain case
            jobs[name] = [(effexport_build(hf, case["effexport_dir"], max_context, log, "genai_dir" in case, env),
                           log, "effexport build")]
            if "genai_dir" in case:
                jobs[name].append((genai_build(hf, case["genai_dir"], case["genai_dir"] + ".log"),
                                   case["genai_dir"] + ".log", "genai build"))
        elif base.endswith(":tiny"):  # a tiny preset through the CLI: the quick CUDA-graph probe
            jobs[name] = [(effexport_build(base, case["effexport_dir"], max_context, log, env=env), log, "effexport build")]
        else:
            jobs[name] = [(sample_build(base, case["effexport_dir"], max_context, log, env), log, "effexport build")]
    stock_jobs = {}  # stock case (its variant aside) -> (directory, proc, log), started beside the effexport builds
    for base in dict.fromkeys(split_variant(case)[0] for case, _, _ in args.stock):
        directory = os.path.join(args.work, base.replace(":", "-") + "-stock")
        stock_jobs[base] = (directory, stock_build(base, directory, directory + ".log"), directory + ".log")
    if args.build_only:
        for case in results["cases"]:
            try:
                wait_builds(case, jobs[case["case"]], args.build_timeout, started)
            except Exception as exc:  # noqa: BLE001
                case["error"] = f"{type(exc).__name__}: {exc}"[:800]
            print(json.dumps(case, default=str), flush=True)
            save()
        return 0
    torch.cuda.empty_cache()
    for case in results["cases"]:
        name = case["case"]
        try:
            wait_builds(case, jobs[name], args.build_timeout, started)
            if case.get("genai_dir"):
                case["genai_nodes"] = node_counts(os.path.join(case["genai_dir"], "model.onnx"))
            case["effexport_nodes"] = node_counts(os.path.join(case["effexport_dir"], "model.onnx"))
            if os.path.isfile(os.path.join(case["effexport_dir"], "decode.onnx")):
                case["effexport_decode_nodes"] = node_counts(os.path.join(case["effexport_dir"], "decode.onnx"))
            base = split_variant(name)[0]
            if base == "gemma3-1b":
                eager, vocab = _hf_eager(os.path.join(args.work, "gemma3-1b-hf")), GEMMA3_1B["vocab_size"]
            else:
                eager, case["weight_bytes"], vocab, case["experts"] = _sample_eager(base)
                case["step_weight_bytes_b1"] = step_weight_bytes(case, 1)
            try:
                # eager and the artifact's session at once only where both copies of the weights fit
                first = 2.5 * case.get("weight_bytes", 0) > torch.cuda.mem_get_info()[0]
                case["parity"] = parity(case["effexport_dir"], eager, vocab, prompt=args.parity_prompt,
                                        routing=args.routing, eager_first=first)
            except Exception as exc:  # noqa: BLE001
                case["parity_error"] = f"{type(exc).__name__}: {exc}"[:600]
                traceback.print_exc()
            del eager
            torch.cuda.empty_cache()
            print(json.dumps({k: v for k, v in case.items() if k != "rows"}, default=str), flush=True)
            measure(case, args, results["copy_bw"])
            for point in args.profile:
                context, batch = (int(x) for x in point.split(":"))
                try:
                    case.setdefault("profile", {})[point] = op_profile(case["effexport_dir"], context, batch)
                except Exception as exc:  # noqa: BLE001
                    case.setdefault("profile", {})[point] = f"{type(exc).__name__}: {exc}"[:600]
                    traceback.print_exc()
                print(json.dumps({"case": name, "profile": point, **case["profile"]}, default=str)[:3000], flush=True)
        except Exception as exc:  # noqa: BLE001
            case["error"] = f"{type(exc).__name__}: {exc}"[:800]
            traceback.print_exc()
        save()
    stock_measure(results, args, stock_jobs, started, save)
    save()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
