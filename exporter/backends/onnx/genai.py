"""ONNX Runtime GenAI packages (``effexport MODEL --target onnx --genai``): ``genai_config.json`` and a
step model with GenAI's I/O contract next to the effexport artifact, so ``onnxruntime_genai``'s
``og.Model`` / ``og.Generator`` run the same graph.

Design (the contract read from onnxruntime-genai 0.18: its model builder's ``genai_config.json`` and
its C++ ``DefaultKeyValueCache`` / ``DefaultPositionInputs``):

* ``genai.onnx`` is ``model.onnx`` with its I/O renamed and one adapter, not a second lowering: the
  cache inputs ``past.{L}.k`` / ``past.{L}.v`` become ``past_key_values.{L}.key`` / ``.value``, the
  outputs ``present.{L}.k`` / ``.v`` become ``present.{L}.key`` / ``.value``, ``logits`` and
  ``input_ids`` keep their names, and the scalar ``pos`` input becomes GenAI's ``position_ids
  [B, T]`` (int64) with ``pos = position_ids[0, 0]`` computed in the graph (two ``Gather``). The
  graph masks by position, as it does for effexport's runtime; GenAI's ``attention_mask [B, past +
  T]`` is an input only for its shape, which gives ``pos_host`` (the host copy of the position that
  GroupQueryAttention's total length reads in an ``ort`` build) without a device-to-host copy. Weights are shared: inline initializers are copied,
  external ones keep pointing at ``model.onnx.data``.
* Caches are built with ``--kv-cache buffer``: every full cache is one ``[B, Hkv, max_context, d]``
  buffer written in place (GroupQueryAttention's shared-buffer form), which is the layout of
  GenAI's ``past_present_share_buffer``: GenAI allocates each cache once, binds it as past and
  present, and only moves ``position_ids`` forward. Layers without a cache input (KV-sharing
  consumers reading their producer's cache) are skipped by GenAI, which finds the cache layers by
  input name; per-layer KV heads and head sizes come from the inputs' static shapes.
* Windowed (sliding) layers keep effexport's W-slot ring (slot = position mod W). GenAI sizes a
  sliding layer's cache as ``sliding_window.window_size + cache_slack`` positions (on the CPU and
  CUDA providers), so the config states ``window_size = W - 1`` and ``cache_slack = 1``: the
  buffer GenAI allocates is exactly the ring. The window itself is applied by the graph (GenAI
  reads these fields only to size the cache). All rings of a model must have one W.
* ``search.max_length`` and ``context_length`` are the artifact's ``max_context``: the cache
  buffers have that many rows as a static dimension. Without rings GenAI reads the rows off the
  graph (a smaller ``max_length`` only stops earlier); with rings it sizes full caches by
  ``max_length``, so a smaller one set at run time is refused by ONNX Runtime (shape mismatch).

Refused (:func:`refusal`, decided by the CachePlan's entry kinds, never by model name): fixed-size
states (CCA's conv / value-shift states, DeepSeek's compressor states, linear-attention states),
compressed entry caches, chunk-local caches (Llama 4), full caches left growing, rings of several
window sizes: GenAI drives per-layer K/V caches only. Batch items share positions (GenAI's
left-padded batches are not supported, as in effexport's runtime).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from effexport.exporter.backends.onnx.host_positions import POS_HOST

GENAI_CONFIG = "genai_config.json"
GENAI_MODEL = "genai.onnx"
CACHE_SLACK = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
"""Files copied from a Hugging Face input directory when present (og.Tokenizer reads them)."""
PART = {"k": "key", "v": "value"}
KIND_REASON = {
    "state": "fixed-size states (CCA conv / value-shift, compressor or linear-attention states)",
    "compressed": "compressed entry caches (DeepSeek CSA / HCA)",
    "chunk": "chunk-local caches (chunked attention)",
    "full": "full caches kept growing (another reader of the past cache)",
}


def _split(name: str) -> tuple[str, str]:
    layer, _, part = name.rpartition(".")
    return layer, part


def refusal(plan, name: str) -> str | None:
    """Why ``plan`` (a CachePlan built with ``--kv-cache buffer``) cannot be a GenAI package, or None."""
    why: dict[str, list[int]] = {}
    for e in plan.entries:
        kind = e.kind
        if kind in ("buffer", "ring") and (PART.get(_split(e.name)[1]) is None or e.layer is None
                                           or len(e.shape) != 4 or e.shape[0] != "batch"):
            kind = "state"
        if kind not in ("buffer", "ring"):
            why.setdefault(kind, []).append(e.layer)
    if why:
        kinds = "; ".join(f"{KIND_REASON.get(k, k)} in layer(s) {_layers(v)}" for k, v in sorted(why.items()))
        return (f"{name} cannot be an onnxruntime-genai package: it keeps {kinds}, and GenAI drives only "
                "per-layer K/V caches; build without --genai and run it with effexport.runtime")
    windows = {e.shape[2] for e in plan.entries if e.kind == "ring"}  # slots (= the window)
    if len(windows) > 1:
        return (f"{name} cannot be an onnxruntime-genai package: its sliding layers use windows "
                f"{sorted(windows)} and GenAI sizes every sliding layer's cache from one window; build without --genai")
    if windows and min(windows) < 2:
        return f"{name} cannot be an onnxruntime-genai package: a 1-token window; build without --genai"
    if not plan.entries:
        return f"{name} cannot be an onnxruntime-genai package: it has no K/V cache; build without --genai"
    return None


def _layers(layers) -> str:
    layers = sorted({x for x in layers if x is not None})
    return ", ".join(map(str, layers[:8])) + (", ..." if len(layers) > 8 else "")


def genai_model(model, plan):
    """``model`` (the step ModelProto, weights inline or external) with GenAI's I/O names and the
    ``position_ids`` adapter; a new ModelProto."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    rename = {}
    for e in plan.entries:
        layer, part = _split(e.name)
        rename[f"past.{e.name}"] = f"past_key_values.{e.layer}.{PART[part]}"
        rename[f"present.{e.name}"] = f"present.{e.layer}.{PART[part]}"

    def renamed(values):
        for i, v in enumerate(values):
            if v in rename:
                values[i] = rename[v]
    for node in g.node:
        renamed(node.input)
        renamed(node.output)
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"genai: node {node.name} ({node.op_type}) has a subgraph; its captures are not renamed")
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        vi.name = rename.get(vi.name, vi.name)
    ids = next(i for i in g.input if i.name == "input_ids")
    position_ids = onnx.ValueInfoProto()
    position_ids.CopyFrom(ids)
    position_ids.name = "position_ids"
    position_ids.type.tensor_type.elem_type = onnx.TensorProto.INT64
    inputs = [position_ids if i.name == "pos" else i for i in g.input]
    del g.input[:]
    g.input.extend(inputs)
    zero = helper.make_tensor("genai.zero", onnx.TensorProto.INT64, [], [0])
    adapter = [helper.make_node("Constant", [], ["genai.zero"], value=zero, name="genai.zero"),
               helper.make_node("Gather", ["position_ids", "genai.zero"], ["genai.row0"], axis=0, name="genai.row0"),
               helper.make_node("Gather", ["genai.row0", "genai.zero"], ["pos"], axis=0, name="genai.pos")]
    if any(i.name == POS_HOST for i in g.input):
        adapter += _host_position(g, ids)
    nodes = adapter + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return out


def _host_position(g, ids) -> list:
    """``pos_host`` (the host copy of the position GroupQueryAttention's total length reads) from the
    shape of GenAI's ``attention_mask [B, past + T]``: ``past + T - T``. A shape is host data, so
    GenAI's CUDA graphs see no copy node; in their decode steps the mask has ``max_length`` columns
    and the value is stale, which a one-token step ignores (:mod:`.host_positions`)."""
    import onnx
    from onnx import helper

    mask = onnx.ValueInfoProto()
    mask.CopyFrom(ids)
    mask.name = "attention_mask"
    mask.type.tensor_type.shape.dim[1].dim_param = "total_seq"
    inputs = [mask if i.name == POS_HOST else i for i in g.input]
    del g.input[:]
    g.input.extend(inputs)
    return [helper.make_node("Shape", ["attention_mask"], ["genai.total"], start=1, end=2, name="genai.total"),
            helper.make_node("Shape", ["input_ids"], ["genai.new"], start=1, end=2, name="genai.new"),
            helper.make_node("Sub", ["genai.total", "genai.new"], ["genai.past"], name="genai.past"),
            helper.make_node("Squeeze", ["genai.past"], [POS_HOST], name="genai.pos_host")]


def write_model(step_path: str, plan, out_path: str) -> None:
    """Write the GenAI step model beside ``step_path`` (external weights stay in the step's data file)."""
    import onnx

    model = onnx.load(step_path, load_external_data=False)
    onnx.save_model(genai_model(model, plan), out_path)


def model_fields(loaded, plan) -> dict:
    """``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``, token ids and ``type`` of the
    loaded model: a Hugging Face config's, or a built-in sample's (which has no tokenizer: no token
    ids, so generation stops only at ``max_length``)."""
    hf = getattr(getattr(loaded.model, "hf", None), "config", None)
    if hf is not None:
        text = hf.get_text_config(decoder=True)
        return {"hidden_size": int(text.hidden_size), "num_attention_heads": int(text.num_attention_heads),
                "num_hidden_layers": int(text.num_hidden_layers),
                "bos_token_id": getattr(text, "bos_token_id", None), "eos_token_id": getattr(text, "eos_token_id", None),
                "pad_token_id": getattr(text, "pad_token_id", None)}
    cfg = getattr(loaded.sample, "config", None)
    layers = max((r.layer for r in plan.layers), default=-1) + 1
    return {"hidden_size": int(getattr(cfg, "hidden_size", 0) or 0),
            "num_attention_heads": int(getattr(cfg, "num_attention_heads", 0) or 0),
            "num_hidden_layers": int(getattr(cfg, "num_hidden_layers", layers) or layers),
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def _token_id(value, vocab_size: int):
    """A config's token id (int, list of ints or None) as GenAI takes it: ids inside the vocabulary."""
    if isinstance(value, (list, tuple)):
        value = [int(v) for v in value if v is not None and 0 <= int(v) < vocab_size]
        return value if len(value) > 1 else value[0] if value else None
    return None if value is None else int(value)


def genai_config(plan, fields: dict, vocab_size: int, max_context: int) -> dict:
    """The ``genai_config.json`` object (keys of onnxruntime-genai 0.18's ``Config``)."""
    caches = [e for e in plan.entries if _split(e.name)[1] == "k"]
    first = caches[0]
    rings = sorted({e.layer for e in plan.entries if e.kind == "ring"})
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": GENAI_MODEL,
        "head_size": int(first.shape[3]),
        "hidden_size": fields["hidden_size"],
        "inputs": {"input_ids": "input_ids", "position_ids": "position_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": fields["num_attention_heads"],
        "num_hidden_layers": fields["num_hidden_layers"],
        "num_key_value_heads": int(first.shape[1]),
    }
    if rings:
        slots = next(int(e.shape[2]) for e in plan.entries if e.kind == "ring")
        decoder["sliding_window"] = {"window_size": slots - CACHE_SLACK, "cache_slack": CACHE_SLACK,
                                     "slide_key_value_cache": False, "slide_inputs": False, "layers": rings}
    model = {"context_length": max_context, "decoder": decoder, "type": "decoder", "vocab_size": int(vocab_size)}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # a sample has none: GenAI's defaults
        value = _token_id(fields[key], vocab_size)
        if isinstance(value, list) and key != "eos_token_id":
            value = value[0]
        if value is not None and (isinstance(value, list) or 0 <= value < vocab_size):
            model[key] = value
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
              "max_length": max_context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model, "search": search}


def write_package(tmp: str, step_file: str, plan, loaded, max_context: int) -> dict:
    """Write ``genai.onnx``, ``genai_config.json`` and the input directory's tokenizer files into the
    artifact directory ``tmp``; returns the manifest's ``files`` entries to add."""
    write_model(os.path.join(tmp, step_file), plan, os.path.join(tmp, GENAI_MODEL))
    config = genai_config(plan, model_fields(loaded, plan), loaded.vocab_size, max_context)
    with open(os.path.join(tmp, GENAI_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    files = {"genai_config": GENAI_CONFIG, "genai_model": GENAI_MODEL}
    source = loaded.source.get("path") if loaded.source.get("kind") == "hf" else None
    if source and os.path.isdir(source):
        for name in TOKENIZER_FILES:
            path = os.path.join(source, name)
            if os.path.isfile(path) and not os.path.islink(path):
                shutil.copyfile(path, os.path.join(tmp, name))
                files[f"tokenizer:{name}"] = name
    return files


# ------------------------------------------------------------------------------------------ parity
def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def genai_generate(artifact_dir: str, prompt: np.ndarray, steps: int, stop: int | None = None):
    """Greedy generation through ``og.Generator`` from token ids (no tokenizer), batch 1: the tokens it
    picks (``steps``, fewer if it stops) and the logits ``[V]`` it picked each from. ``stop``: a token
    id that replaces the package's EOS and pad ids for this run (the parity check passes one the
    reference never produces, so generation runs past the model's EOS)."""
    import onnxruntime_genai as og

    config = og.Config(artifact_dir)
    if stop is not None:
        config.overlay(json.dumps({"model": {"eos_token_id": int(stop), "pad_token_id": int(stop)}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, batch_size=1)  # max_length: the config's (the buffers' rows)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32)[None])
    tokens, logits = [], []
    while len(tokens) < steps and not generator.is_done():
        logits.append(np.array(generator.get_logits(), dtype=np.float32).reshape(-1))
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, logits


GENAI_TOKENS = 32
"""Greedy tokens the GenAI parity check generates (fewer when the artifact's context is shorter)."""
GENAI_MODE = "onnxruntime-genai og.Generator (CPU, greedy, batch 1, token ids without a tokenizer)"


def check_genai(artifact_dir: str, loaded, prompt_length: int, max_context: int, dtype: str = "fp32"):
    """Parity of the GenAI package against eager: the parity prompt (batch 1), then
    :data:`GENAI_TOKENS` greedy tokens through the eager model with its own cache and through
    ``og.Generator``; every token must be equal and every step's logits within the dtype's tolerance
    (max relative error, relative to the step's largest eager magnitude). The model's EOS is
    replaced for the run by a token eager never produces, so all tokens are compared. A
    :class:`~effexport.exporter.verify.parity.ParityReport`."""
    import torch

    from effexport.exporter.errors import one_line
    from effexport.exporter.verify.parity import TOLERANCE, OutputError, ParityReport, _errors

    steps = max(1, min(GENAI_TOKENS, (max_context or GENAI_TOKENS + prompt_length) - prompt_length))
    prompt = loaded.parity_prompt(prompt_length, batch=1)
    tol = TOLERANCE[dtype]
    ref_tokens, ref_logits, past, nxt = [], [], None, prompt
    with torch.no_grad():
        for _ in range(steps):
            out, past = loaded.model(nxt, past)
            ref_logits.append(out[0, -1].float())
            ref_tokens.append(int(ref_logits[-1].argmax()))
            nxt = torch.tensor([[ref_tokens[-1]]], device=prompt.device)
    unused = sorted(set(range(loaded.vocab_size)) - set(ref_tokens) - set(prompt[0].tolist()))
    try:
        tokens, logits = genai_generate(artifact_dir, prompt[0].cpu().numpy(), steps, unused[0] if unused else None)
    except Exception as exc:  # noqa: BLE001 - GenAI raises RuntimeError for a package it cannot run
        return ParityReport(False, steps, tol, [], False, f"onnxruntime-genai cannot run the package "
                            f"({type(exc).__name__}: {one_line(str(exc), 200)})", GENAI_MODE)
    worst = (0.0, 0.0)
    for got, ref in zip(logits, ref_logits):
        err = _errors(got, ref)
        worst = (max(worst[0], err[0]), max(worst[1], err[1]))
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
    equal = same is None and len(tokens) == steps
    detail = (f"onnxruntime-genai: {len(tokens)} greedy tokens equal eager's" if equal else
              f"onnxruntime-genai stopped after {len(tokens)} of {steps} tokens" if same is None else
              f"onnxruntime-genai's greedy token {same} is {tokens[same]}, eager's {ref_tokens[same]}")
    outputs = [OutputError("genai/logits", *worst)]
    return ParityReport(equal and worst[1] <= tol, len(tokens), tol, outputs, equal, detail, GENAI_MODE)


def run_genai_check(artifact_dir: str, loaded, max_context: int, dtype: str, progress=None, stream=None):
    """The GenAI parity stage of a build or ``effexport check``: the report, or None (with one line on
    stderr saying why) when it cannot run here: onnxruntime-genai not installed, or a half-precision
    package (GenAI's CPU provider cannot run it; the fp32 check of the same graph is the build's own)."""
    import sys

    from effexport.exporter.verify.parity import PARITY_PROMPT

    why = ("onnxruntime-genai is not installed (pip install onnxruntime-genai)" if not genai_available() else
           f"a {dtype} package runs on onnxruntime-genai-cuda (not checked on the CPU)" if dtype != "fp32" else None)
    if why:
        print(f"      no GenAI parity check: {why}", file=stream or sys.stderr)
        return None
    t0 = progress.stage(f"parity vs eager through onnxruntime-genai ({GENAI_TOKENS} greedy tokens)") if progress else None
    report = check_genai(artifact_dir, loaded, PARITY_PROMPT, max_context, dtype)
    if progress:
        progress.done(t0)
    print(report.table(), file=stream or sys.stderr)
    return report
