"""``effexport MODEL --target onnx``: load, capture, rewrite, lower, verify, write the artifact.

One progress line per stage on stderr; the artifact directory is built in a temporary sibling and
renamed into place only when complete, so a failed or interrupted build leaves nothing behind.
``build(opts)`` loads ``opts.model`` (:mod:`effexport.exporter.frontends.loading`: sample name, model file or
directory) and runs ``build_loaded(loaded, opts)``, which Python callers use for an in-memory model.
The artifact files are deterministic: two builds of one model with the same flags are byte-identical
(no timestamps, temporary names or timings in them; structure-only builds add the documented
``report.json["resources"]``: time and peak memory).

Artifact layout (a contract: README's Commands and exit-code sections, tests/test_build.py):
    DIR/model.onnx       the step model: (input_ids, pos, past.*) -> (logits, present.*)
    DIR/model.onnx.data  external weights (only when large)
    DIR/model.pt2        instead of model.onnx with --target aoti: the AOTInductor package (exporter/backends/aoti)
    DIR/program.pt2      instead of model.onnx with --target torch: the torch.export program (exporter/backends/torch)
    DIR/effexport.json   CachePlan, I/O names, dtypes, opset, IR version, profile, versions, command
    DIR/report.json      the analytic report (effexport report) plus "parity" and "passes", and
                         "stock_export": the caches a stock torch.onnx.export of the eager sample
                         would carry vs the CachePlan's (report.stock_comparison)
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import platform
import sys
from dataclasses import dataclass

import torch

from effexport.exporter.backends.artifact import DTYPES, MANIFEST
from effexport.exporter.backends.onnx.profiles import SELECTABLE
from effexport.exporter.backends.registry import BACKENDS, open_runtime, read_manifest
from effexport.exporter.errors import OutputError, UsageError
from effexport.exporter.frontends.loading import LoadedModel, resolve_model
from effexport.exporter.progress import Progress
from effexport.exporter.verify.parity import PARITY_PROMPT
from effexport.passes.buffers import CACHE_LAYOUTS

MAX_STEPS = 4096
HALF_TARGETS = ("onnx", "torch")
"""Targets that build bf16 / fp16 artifacts (``--dtype``)."""
DEFAULT_MAX_CONTEXT = 4096


@dataclass
class BuildOptions:
    """Everything a build needs, from the CLI or from Python."""

    model: str
    target: str = "onnx"
    output: str | None = None
    profile: str = "ort"
    dtype: str = "fp32"
    kv_cache: str = "grow"    # "buffer": full caches in fixed max_context buffers (passes/buffers.py)
    check: bool = True
    steps: int = 16
    max_context: int | None = None  # None: the smaller of DEFAULT_MAX_CONTEXT and the model's limit
    explain: bool = False
    dump_after: str | None = None
    force: bool = False
    command: tuple = ()
    weights: str = "random"   # "none": structure only (meta device, no weight data, no parity)
    trust_pickle: bool = False
    allow_missing_weights: bool = False  # a Hugging Face directory lacking weights builds (recorded in report.json)
    genai: bool = False       # also an onnxruntime-genai package (exporter/backends/onnx/genai.py): needs kv_cache="buffer"
    stream_weights: bool | None = None  # HF directory: weights streamed from safetensors (frontends/streaming.py); None: by size
    data_file_bytes: int | None = None  # ONNX external data split into files of at most this many bytes
    tp: int | None = None     # tensor parallel: one rank program per rank (passes/sharding.py), --target torch / onnx
    ep: int | None = None     # expert parallel group size: for now the same ranks as tp (None or == tp)


def versions() -> dict:
    """Versions of everything that shapes the artifact (recorded in effexport.json)."""
    import effexport

    out = {"effexport": effexport.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def check_options(opts: BuildOptions) -> None:
    """Refuse bad options (exit 2) and a missing backend (exit 4) before any work is done."""
    if opts.profile not in SELECTABLE:
        raise UsageError(f"unknown --profile {opts.profile!r}; choose one of {', '.join(SELECTABLE)}")
    if opts.target not in BACKENDS:
        raise UsageError(f"unknown --target {opts.target!r}; choose one of {', '.join(BACKENDS)}")
    if opts.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {opts.dtype!r}; choose one of {', '.join(DTYPES)}")
    if opts.dtype != "fp32" and opts.target not in HALF_TARGETS:
        raise UsageError(f"--dtype {opts.dtype} builds ONNX and torch artifacts (--target "
                         f"{' / '.join(HALF_TARGETS)}); --target {opts.target} builds fp32 only")
    check_steps(opts.steps, opts.max_context if opts.check and opts.weights != "none" else None)
    if opts.max_context is not None and opts.max_context < 1:
        raise UsageError(f"--max-context {opts.max_context}: must be at least 1 token, e.g. 4096 or 128k")
    if opts.kv_cache not in CACHE_LAYOUTS:
        raise UsageError(f"unknown --kv-cache {opts.kv_cache!r}; choose one of {', '.join(CACHE_LAYOUTS)}")
    if opts.genai and opts.target != "onnx":
        raise UsageError(f"--genai packages an ONNX build for onnxruntime-genai; --target {opts.target} has no ONNX "
                         "step model: use --target onnx")
    if opts.genai and opts.kv_cache != "buffer":
        raise UsageError(f"--genai needs --kv-cache buffer (GenAI binds past and present to one buffer), not "
                         f"--kv-cache {opts.kv_cache}: drop --kv-cache")
    if opts.stream_weights and opts.target != "onnx" and not (opts.target == "torch" and opts.tp):
        held = (f"--target aoti --tp {opts.tp} compiles each rank from the model loaded whole (streamed rank "
                "slices are not wired to AOTInductor yet)" if opts.tp else
                f"an unsharded --target {opts.target} build holds the whole model")
        raise UsageError(f"--stream-weights writes ONNX external data, or with --target torch --tp N each rank's "
                         f"slices; {held}: drop --stream-weights, or use --target onnx, or --target torch --tp N")
    if opts.data_file_bytes is not None and opts.target != "onnx":
        raise UsageError(f"--data-file-size splits ONNX external data; --target {opts.target} writes none: drop it")
    if opts.data_file_bytes is not None and opts.data_file_bytes < (64 << 10):
        raise UsageError(f"--data-file-size {opts.data_file_bytes}: at least 64KiB (e.g. 2GiB)")
    if opts.target == "aoti" and opts.weights == "none":
        raise UsageError("--weights none builds structure-only ONNX; --target aoti compiles kernels around real "
                         "weights: drop --weights none, or use --target onnx")
    check_parallel(opts)
    BACKENDS[opts.target].check()


MAX_TP = 1024
SHARDED_TARGETS = ("torch", "onnx", "aoti")
"""Targets that build per-rank artifacts (``--tp``)."""


def check_parallel(opts: BuildOptions) -> None:
    """``--tp`` / ``--ep``: a rank count from 2, ``--ep`` only equal to ``--tp`` (experts are split over
    the same ranks as the heads), the torch, onnx or aoti target, growing caches (so no ``--genai``: it
    needs fixed buffers); with onnx, fp32 (aoti is fp32 anyway) (exit 2 otherwise)."""
    if opts.tp is None:
        if opts.ep is not None:
            raise UsageError(f"--ep {opts.ep} needs --tp: experts are split across the tensor-parallel ranks; "
                             f"pass --tp {opts.ep} --ep {opts.ep}")
        return
    if opts.tp < 2 or opts.tp > MAX_TP:
        raise UsageError(f"--tp {opts.tp}: give the number of ranks, 2 to {MAX_TP}, e.g. --tp 2"
                         + (" (--tp 1 is the unsharded build: drop --tp)" if opts.tp == 1 else ""))
    if opts.ep is not None and opts.ep != opts.tp:
        raise UsageError(f"--ep {opts.ep} with --tp {opts.tp}: expert parallelism uses the same ranks as tensor "
                         f"parallelism for now (a separate expert-parallel group is not supported); pass --ep "
                         f"{opts.tp} or drop --ep")
    if opts.target not in SHARDED_TARGETS:
        raise UsageError(f"--tp builds one torch.export program, ONNX model or AOTInductor package per rank: use "
                         f"--target torch, onnx or aoti (--target {opts.target} has no sharded build yet)")
    if opts.kv_cache != "grow":
        raise UsageError(f"--tp with --kv-cache {opts.kv_cache}: sharded builds use growing caches only for now; "
                         "drop --kv-cache")
    if opts.target == "onnx" and opts.dtype != "fp32":
        raise UsageError(f"--target onnx --tp with --dtype {opts.dtype}: sharded ONNX builds are fp32 for now -- "
                         "ONNX Runtime's CPU kernels lack half precision for several ops, so checking the rank models "
                         "would need an fp32 twin of every rank, which is not built yet; drop --dtype, or use "
                         f"--target torch --tp {opts.tp} --dtype {opts.dtype}")


def check_steps(steps: int, max_context: int | None) -> None:
    """``--steps`` of a parity check: 1 to MAX_STEPS, and the prompt plus the steps within the
    artifact's ``max_context`` (None: not checked, no parity run)."""
    if not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"--steps {steps}: the parity check runs 1 to {MAX_STEPS} decode steps; "
                         "pass e.g. --steps 16 (or --no-check)")
    if max_context is not None and PARITY_PROMPT + steps > max_context:
        raise UsageError(f"--steps {steps}: the parity check's {PARITY_PROMPT} prompt tokens + {steps} decode steps "
                         f"go past --max-context {max_context}; pass --steps {max(1, max_context - PARITY_PROMPT)} "
                         "or less, or a larger --max-context")


def _output_dir(opts: BuildOptions, name: str, model_path: str | None = None) -> str:
    """The artifact directory; an existing one only with ``--force`` and only if it is an artifact that
    holds neither the current directory nor ``model_path`` (the input)."""
    from effexport.exporter._io import check_replaceable

    out = opts.output or f"{name.replace(':', '-')}-{opts.target}"
    if os.path.lexists(out):
        if not opts.force:
            raise UsageError(f"output directory {out!r} exists; pass --force to replace it or -o another directory")
        check_replaceable(out, (model_path,) if model_path else ())
    return out


def resolve_context(opts: BuildOptions, name: str, limit: int | None) -> BuildOptions:
    """``opts`` with ``max_context`` set: the default is the smaller of :data:`DEFAULT_MAX_CONTEXT`
    and the model's trained limit (``limit``, None when the model states none); a value past the
    limit is refused."""
    import dataclasses

    if opts.max_context is None:
        opts = dataclasses.replace(opts, max_context=min(DEFAULT_MAX_CONTEXT, limit or DEFAULT_MAX_CONTEXT))
        check_steps(opts.steps, opts.max_context if opts.check and opts.weights != "none" else None)
    elif limit is not None and opts.max_context > limit:
        raise UsageError(f"--max-context {opts.max_context} is beyond {name}'s limit of {limit} tokens; "
                         f"pass --max-context {limit} or less")
    return opts


def build(opts: BuildOptions) -> int:
    """Load ``opts.model`` and build it; returns the exit code (0 ok, 1 parity failed). Raises
    EffexportError otherwise. Every check that needs no loading runs before the first progress line."""
    check_options(opts)
    spec = resolve_model(opts.model, trust_pickle=opts.trust_pickle, weights=opts.weights,
                         allow_missing_weights=opts.allow_missing_weights)
    requested, opts = opts, resolve_context(opts, spec.name, spec.context_limit)
    out = _output_dir(opts, spec.name, spec.spec if spec.kind != "sample" else None)
    sharded = opts.tp is not None  # a sharded build of a Hugging Face directory streams unless told not to
    stream = (spec.kind == "hf" and not opts.allow_missing_weights
              and (streaming().wanted(spec.spec, opts.stream_weights) if opts.target == "onnx" else
                   sharded and opts.target == "torch" and opts.stream_weights is not False))
    if opts.stream_weights and not stream:
        raise UsageError("--stream-weights streams a Hugging Face directory's safetensors (--target onnx, or "
                         "--target torch --tp N; without --allow-missing-weights); drop --stream-weights")
    twin = stream and not sharded and opts.check and opts.dtype != "fp32"  # a streamed ONNX half build's fp32 twin
    stages = _stages(opts, structure_only=opts.weights == "none") + 1
    progress = Progress(stages + twin)
    t0 = progress.stage(f"load {opts.model}" + (" (structure only: meta device, no weights)"
                                                 if opts.weights == "none" else
                                                 " (parameters on meta; each rank reads its slices from safetensors)"
                                                 if stream and sharded else
                                                 " (parameters on meta, weights streamed from safetensors later)"
                                                 if stream else ""))
    try:
        loaded, why = streaming().load_streamed(spec.spec) if stream else (None, None)
        if loaded is not None:
            if opts.check:
                streaming().check_parity_memory(loaded.weights)
            streaming().check_space(out, streaming().artifact_bytes(loaded.weights, DTYPES[opts.dtype], twin))
        else:
            progress.total -= twin
            loaded = spec.load()
        progress.done(t0, f"{sum(p.numel() for p in loaded.model.parameters()):,} parameters"
                      + (f", {loaded.weights.checkpoint.nbytes / 2**30:.2f} GiB in {len(loaded.weights.checkpoint.files)} "
                         "safetensors file(s), read when the weights are written" if loaded.weights is not None else
                         f" (loaded whole: {why})" if why else ""))
        if spec.context_limit is None:  # a pickled module states its limit only once loaded
            opts = resolve_context(requested, loaded.name, loaded.context_limit)
        return _build(loaded, opts, out, progress)
    finally:
        progress.close()


def streaming():
    """exporter/frontends/streaming.py (weights streamed from safetensors), imported when used."""
    from effexport.exporter.frontends import streaming as module

    return module


@contextlib.contextmanager
def streaming_from(source):
    """The lowering inside takes its meta initializers from ``source`` (None: an ordinary build)."""
    if source is None:
        yield
        return
    from effexport.exporter.backends.onnx.weights import streaming_from as active

    with active(source):
        yield


def build_loaded(loaded: LoadedModel, opts: BuildOptions) -> int:
    """Build an already loaded model (``effexport.export(module, ...)``); same contract as :func:`build`."""
    check_options(opts)
    opts = resolve_context(opts, loaded.name, loaded.context_limit)
    out = _output_dir(opts, loaded.name)
    progress = Progress(_stages(opts, loaded.structure_only))
    try:
        return _build(loaded, opts, out, progress)
    finally:
        progress.close()


def _stages(opts: BuildOptions, structure_only: bool) -> int:
    """Stages after loading: capture, rewrite, lower, and parity when it runs (GenAI's too)."""
    if opts.genai and opts.dtype == "fp32":
        from effexport.exporter.backends.onnx.genai import genai_available

        return 3 + (opts.check and not structure_only) * (1 + genai_available())
    return 3 + (opts.check and not structure_only) + (opts.tp is not None)


def _build(loaded: LoadedModel, opts: BuildOptions, out: str, progress: Progress) -> int:
    from effexport.exporter.capture import capture_step
    from effexport.exporter.backends.onnx.structure_only import ResourceMeter
    from effexport.passes.pipeline import run_pipeline

    meter = ResourceMeter(progress.start)
    reference, loaded = loaded, in_dtype(loaded, opts.dtype)
    t0 = progress.stage("capture (torch.export, dynamic batch / tokens / cache length)"
                        + ("" if opts.dtype == "fp32" else f", in {opts.dtype}"))
    captured = capture_step(loaded.model, loaded.example_ids(), loaded.example_new_tokens)
    progress.done(t0, f"{len(captured.gm.graph.nodes)} nodes")
    t0 = progress.stage("rewrite (attention sites, masks, KV sharing, caches)")
    dumped = {}
    program, analysis = run_pipeline(captured, opts.dump_after,
                                     lambda name, gm: dumped.setdefault(name, gm.code), opts.max_context,
                                     opts.kv_cache)
    progress.done(t0, _rewrite_summary(analysis))
    if opts.genai:  # decided by the CachePlan's kinds; before anything is written
        from effexport.exporter.backends.onnx.genai import refusal

        reason = refusal(analysis.plan, loaded.name)
        if not reason and program.max_new_tokens:  # GenAI feeds a whole prompt to one step call
            reason = (f"{loaded.name} cannot be an onnxruntime-genai package: its step graph takes at most "
                      f"{program.max_new_tokens} new tokens per call (max_step_tokens) and og.Generator feeds a "
                      "prompt in one call; build without --genai and run it with effexport.runtime, which feeds "
                      "longer prompts in pieces")
        if reason:
            raise UsageError(reason)
    if opts.explain:
        print(analysis.explain(), file=sys.stderr)
    shard = _shard(program, analysis, opts, progress) if opts.tp else None
    try:
        code = _lower_and_write(loaded, opts, out, progress, program, analysis, dumped, meter, reference, shard)
    except OSError as exc:  # disk full, permissions: atomic_directory has removed the partial output
        raise OutputError(f"could not write {out!r}: {exc.strerror or exc}; free space or pass -o a directory "
                          "on another disk (nothing was written)") from None
    status = "BUILT (structure only)" if loaded.structure_only else "PASSED" if code == 0 else "FAILED"
    print(f"{status}: {out} ({meter.summary()})", file=sys.stderr)
    return code


def _shard(program, analysis, opts: BuildOptions, progress: Progress):
    """The ShardPlan of ``--tp`` (before anything is written); a rank count that does not divide a
    head count is a usage error (exit 2) naming the layer."""
    from effexport.passes.sharding import ShardCountError, plan_sharding

    t0 = progress.stage(f"shard (tensor + expert parallel over {opts.tp} ranks)")
    try:
        shard = plan_sharding(program, analysis.plan, opts.tp)
    except ShardCountError as exc:
        raise ShardCountError(f"--tp {opts.tp}: {exc}") from None
    progress.done(t0, f"{len(shard.weights)} weights sliced, {len(shard.caches)} caches split by heads, "
                      f"{len(shard.reduces)} all-reduces per step")
    if opts.explain:
        print(shard.describe(), file=sys.stderr)
    return shard


def _rewrite_summary(analysis) -> str:
    """One line: attention sites and their caches, then the other rewrites that happened."""
    c = analysis.counts
    line = (f"{c['discover']['sites']} sites: {c['rewrite']['ring']} ring, {c['rewrite']['full']} full, "
            f"{c['kv_sharing']['consumers']} consumers")
    others = [(c["rewrite"].get("chunk", 0), "chunk"), (c["cca"]["cca"], "CCA"), (c["compressed"]["csa"], "CSA"), (c["compressed"]["hca"], "HCA"),
              (c["compressed"]["window_only"], "window-only sparse"),
              (c["mhc"]["mhc_pre"] + c["mhc"]["mhc_post"] + c["mhc"]["mhc_head"], "mHC")]
    line += "".join(f", {n} {what}" for n, what in others if n)
    if analysis.stateful:
        line += f", {len(analysis.stateful)} stateful (fixed-size states)"
    return f"{line}, {len(analysis.left_alone)} left alone"


def in_dtype(loaded: LoadedModel, dtype: str) -> LoadedModel:
    """``loaded`` with its model in ``dtype`` (a converted copy; the fp32 one stays the reference), by
    :func:`to_dtype`."""
    if dtype == "fp32":
        return loaded
    model = loaded.model if loaded.structure_only else copy.deepcopy(loaded.model)
    return dataclasses.replace(loaded, model=to_dtype(model, DTYPES[dtype]))


def to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model.to(dtype)`` in place, except for the non-persistent floating-point buffers (computed at
    init, never saved), which get the dtype ``from_pretrained(dtype=...)`` would give them: a Hugging
    Face model's RoPE frequencies (``inv_freq``, made ``.float()`` explicitly) stay fp32 in a bf16 model,
    a buffer its init makes in the default dtype follows ``dtype``. ``.to(bf16)`` would round the
    frequencies to 8 significant bits, and every rotation angle ``pos * inv_freq`` with them: an error
    that grows with the position (Gemma 3 1B over a 600-token prompt: 4-5x eager bf16's own error
    against fp32, where a short prompt shows little). The dtypes come from the Hugging Face module
    built again on the meta device under ``dtype`` as the default (what ``from_pretrained`` does);
    other modules (the samples), or a module that cannot be built so, keep such buffers as they are."""
    kept, seen = [], set()
    roots = _hf_roots(model)
    for root, meta in [(r, _meta_buffer_dtypes(r, dtype)) for r in roots] + [(model, {})]:
        for prefix, sub in root.named_modules():
            for name in sub._non_persistent_buffers_set:
                buffer = sub._buffers.get(name)
                if buffer is None or not buffer.is_floating_point() or id(buffer) in seen:
                    continue
                seen.add(id(buffer))
                target = meta.get(f"{prefix}.{name}" if prefix else name, buffer.dtype)
                if target != dtype:
                    kept.append((sub, name, target, buffer))
    model.to(dtype)
    for sub, name, target, buffer in kept:
        sub._buffers[name] = buffer.to(target)
    return model


def _hf_roots(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost transformers ``PreTrainedModel`` modules inside ``model`` (none without transformers)."""
    base = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)
    if base is None:
        return []
    roots, inside = [], set()
    for module in model.modules():
        if isinstance(module, base) and id(module) not in inside:
            roots.append(module)
            inside.update(id(m) for m in module.modules())
    return roots


def _meta_buffer_dtypes(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Buffer name -> dtype of ``type(module)(module.config)`` built on the meta device with ``dtype`` as
    torch's default (empty where that fails)."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            ghost = type(module)(copy.deepcopy(module.config))
        return {name: b.dtype for name, b in ghost.named_buffers()}
    except Exception:  # noqa: BLE001 - a model whose init needs more than its config: keep its buffers as they are
        return {}
    finally:
        torch.set_default_dtype(previous)


def _lower_and_write(loaded: LoadedModel, opts: BuildOptions, out: str, progress: Progress, program, analysis,
                     dumped: dict, meter, reference: LoadedModel, shard=None) -> int:
    """Lower, write effexport.json / report.json and check parity inside the atomic output directory;
    with a ShardPlan (``--tp``), one lowered rank program per ``rank{r}/`` and a topology manifest."""
    from effexport.exporter.verify import report as rep
    from effexport.exporter._io import atomic_directory
    from effexport.exporter.backends.onnx.structure_only import check_structure, external_bytes

    code = 0
    with atomic_directory(out, force=opts.force) as tmp:
        if opts.dump_after:
            with open(os.path.join(tmp, f"graph-after-{opts.dump_after}.py"), "w") as f:
                f.write(dumped[opts.dump_after])
        backend = BACKENDS[opts.target]
        t0 = progress.stage(backend.stage(opts))
        reader = None
        if shard is not None:
            lowered, ranks, reader = _lower_ranks(loaded, opts, tmp, program, analysis.plan, shard)
        else:
            with streaming_from(loaded.weights):  # a streamed build: the initializers read the checkpoint
                lowered = backend.lower(program, analysis.plan, tmp, opts)
        model_proto, note, files = lowered.model_proto, lowered.summary, dict(lowered.files)
        if opts.genai:  # an onnxruntime-genai package next to the ONNX step model (check_options: onnx only)
            from effexport.exporter.backends.onnx.genai import write_package

            files.update(write_package(tmp, files["step"], analysis.plan, loaded, opts.max_context))
        if loaded.structure_only and model_proto is not None:
            check_structure(os.path.join(tmp, lowered.files["step"]))
            note += (f", structure only: {external_bytes(model_proto) / 2**30:.2f} GiB of weights referenced "
                     "as external data (not written), onnx.checker full check passed")
        elif loaded.structure_only and shard is not None and opts.target == "onnx":
            for _, rank_files, _ in ranks:
                check_structure(os.path.join(tmp, rank_files["step"]))
            note += (", structure only: each rank's weights referenced as external data (not written), "
                     "onnx.checker full check passed per rank")
        elif loaded.structure_only:
            note += ", structure only: meta placeholders of the weights' shapes (no data written)"
        if reader is not None:
            note += (f", each rank's weights read as slices from the checkpoint ({max(reader.rank_bytes) / 2**20:,.1f} "
                     f"MiB at most per rank, {reader.peak / 2**20:,.1f} MiB alive at once)")
        progress.done(t0, note)
        manifest = _manifest(loaded, opts, lowered, files, program, analysis.plan)
        if shard is not None:
            manifest["sharded"] = _topology(shard, program, ranks, loaded.vocab_size, opts.max_context, opts.target)
        _write_json(os.path.join(tmp, MANIFEST), manifest)
        if loaded.sample is not None:
            report = rep.build_report(loaded.sample, rep.max_context(loaded.sample) or 4096)
            report[rep.STOCK_KEY] = rep.stock_comparison(loaded.sample, analysis.plan, report["context"])
            print(f"      {rep.format_stock(report[rep.STOCK_KEY])}", file=sys.stderr)
        else:
            report = {"model": loaded.name, rep.REALISED_KEY: rep.realised_savings(analysis, opts.max_context)}
            print(f"      {rep.format_realised(report[rep.REALISED_KEY])}", file=sys.stderr)
        if opts.allow_missing_weights:
            report["allow_missing_weights"] = True
            report["missing_weights"] = loaded.source.get("missing_weights", {})
        report["passes"] = analysis.counts
        if shard is not None and "runtime" in manifest["sharded"]:
            report["runtime"] = manifest["sharded"]["runtime"]
            print(f"      runs on: {report['runtime']}", file=sys.stderr)
        if reader is not None:
            report["weights"] = {"streamed": True, "sharded": True, "checkpoint_bytes": reader.checkpoint.nbytes,
                                 "files": len(reader.checkpoint.files), "rank_bytes_read": reader.rank_bytes,
                                 "peak_bytes_alive": reader.peak}
        elif loaded.weights is not None:
            report["weights"] = loaded.weights.report()
        if loaded.structure_only:
            print("      no parity check: structure-only build (no weights)", file=sys.stderr)
            report["resources"] = meter.to_json()  # volatile: the only timing in an artifact (documented)
        elif opts.check and shard is not None:
            parity = _check_sharded(loaded, reference, opts, tmp, manifest, progress)
            print(parity.table(), file=sys.stderr)
            report["parity"] = parity.to_json()
            code = 0 if parity.passed else 1
        elif opts.check and loaded.weights is not None:  # eager first, freed, then the artifact
            from effexport.exporter.verify.streamed import check_streamed

            parity = check_streamed(loaded, reference, opts, tmp, progress, PARITY_PROMPT, twin_verdict)
            print(parity.table(), file=sys.stderr)
            report["parity"] = parity.to_json()
            code = 0 if parity.passed else 1
        elif opts.check and opts.dtype != "fp32":
            parity = _check_half(loaded, reference, opts, tmp, progress)
            print(parity.table(), file=sys.stderr)
            report["parity"] = parity.to_json()
            code = 0 if parity.passed else 1
        elif opts.check:
            t0 = progress.stage(f"parity vs eager (prefill + {opts.steps} decode steps, {lowered.runs_on})")
            parity = check_artifact(tmp, loaded, opts.steps)
            progress.done(t0)
            print(parity.table(), file=sys.stderr)
            report["parity"] = parity.to_json()
            code = 0 if parity.passed else 1
        if opts.genai and opts.check and not loaded.structure_only:
            from effexport.exporter.backends.onnx.genai import run_genai_check

            genai = run_genai_check(tmp, loaded, opts.max_context, opts.dtype, progress)
            if genai is not None:
                report["genai_parity"] = genai.to_json()
                code = code or (0 if genai.passed else 1)
        _write_json(os.path.join(tmp, "report.json"), report)
    return code


def _manifest(loaded: LoadedModel, opts: BuildOptions, lowered, files: dict, program, plan) -> dict:
    """``effexport.json`` of a step model (docs/ARCHITECTURE.md, Manifest)."""
    from effexport.exporter.backends.base import onnx_inputs, onnx_opset

    model_proto = lowered.model_proto
    return {
        "format": 1, "model": loaded.name, "source": loaded.source, "target": opts.target,
        "profile": lowered.profile, "dtype": opts.dtype, "files": files, "max_context": opts.max_context,
        "kv_cache": opts.kv_cache,
        "weights": opts.weights,
        "inputs": onnx_inputs(model_proto) or program.inputs, "outputs": program.outputs,
        "opset": onnx_opset(model_proto) if model_proto is not None else None,
        "ir_version": model_proto.ir_version if model_proto is not None else None, **lowered.manifest,
        "cache_plan": plan.to_json(), "versions": versions(),
        **({"max_step_tokens": program.max_new_tokens} if program.max_new_tokens else {}),
        "command": list(opts.command) or ["effexport", opts.model, "--target", opts.target],
    }


def _lower_ranks(loaded: LoadedModel, opts: BuildOptions, tmp: str, program, plan, shard):
    """Each rank's program (:func:`~effexport.passes.sharding.shard_rank`) lowered into ``tmp/rank{r}/``
    with its own manifest (a torch artifact of that rank: its CachePlan, ``rank`` and ``world``);
    returns the top-level :class:`~.backends.base.Lowered` (every rank's files, no backend keys:
    those are per rank), per rank ``(directory, files, CachePlan)``, and the
    :class:`~.frontends.streaming.SliceReader` of a streamed build (None otherwise). A streamed
    build's program holds meta parameters: each rank's are read from the checkpoint as that rank's
    slices (:func:`~.frontends.streaming.load_rank_weights`), lowered, and freed before the next rank
    loads, so the build holds one rank's weights at a time."""
    import gc

    from effexport.exporter.backends.base import Lowered
    from effexport.exporter.backends.torch.sharded import RANK_DIR
    from effexport.passes.sharding import shard_rank

    backend, files, ranks = BACKENDS[opts.target], {}, []
    reader = streaming().SliceReader(loaded.weights.checkpoint) if loaded.weights is not None else None
    for rank in range(shard.world):
        rank_dir = RANK_DIR.format(rank)
        os.mkdir(os.path.join(tmp, rank_dir))
        rank_program, rank_plan = shard_rank(program, plan, shard, rank, "0")  # "0": the default process group
        with reader.rank() if reader is not None else contextlib.nullcontext():
            if reader is not None:
                streaming().load_rank_weights(rank_program.gm, loaded.weights, shard.weights, rank, reader)
            lowered = backend.lower(rank_program, rank_plan, os.path.join(tmp, rank_dir), opts)
        rank_files = {k: f"{rank_dir}/{v}" for k, v in lowered.files.items()}
        manifest = _manifest(loaded, opts, lowered, dict(lowered.files), rank_program, rank_plan)
        manifest["rank"] = {"rank": rank, "world": shard.world, "process_group": "0"}
        _write_json(os.path.join(tmp, rank_dir, MANIFEST), manifest)
        files.update({("step" if rank == 0 and k == "step" else f"{rank_dir}.{k}"): v for k, v in rank_files.items()})
        files[f"{rank_dir}.manifest"] = f"{rank_dir}/{MANIFEST}"
        ranks.append((rank_dir, rank_files, rank_plan))
        del rank_program
        gc.collect()  # the rank's graph module (reference cycles) and its weights, before the next rank's
    return Lowered(files, None, None, f"{shard.world} rank programs ({', '.join(sorted(lowered.files.values()))} "
                   f"in {RANK_DIR.format('0')}..{RANK_DIR.format(shard.world - 1)})", lowered.runs_on), ranks, reader


def _check_sharded(loaded: LoadedModel, reference: LoadedModel, opts: BuildOptions, tmp: str, manifest: dict,
                   progress: Progress):
    """The build's parity of a sharded artifact (:func:`~.verify.sharded.check_sharded_parity`): eager
    fp32 (and eager in ``--dtype`` for a bf16 / fp16 build) recorded first, then the ranks run together
    over gloo. A streamed build's eager models are materialised from the checkpoint one at a time and
    freed before any rank starts."""
    from effexport.exporter.verify.sharded import check_sharded_parity

    half = opts.dtype != "fp32"
    if loaded.weights is not None:
        fp32 = lambda: streaming().materialize(reference, torch.float32)  # noqa: E731
        same = (lambda: streaming().materialize(loaded, DTYPES[opts.dtype])) if half else None
    else:
        fp32, same = reference.model, loaded.model if half else None
    world = manifest["sharded"]["world"]
    t0 = progress.stage(f"parity vs eager {'fp32 and ' + opts.dtype if half else 'fp32'} (prefill + {opts.steps} "
                        + (f"decode steps, the {world} rank models composed into one graph on ONNX Runtime CPU, each "
                           "AllReduce a Sum of the ranks' inputs: the collective itself is not run)"
                           if opts.target == "onnx" else
                           f"decode steps, {world} ranks together over gloo on the CPU, each loading its "
                           + ("AOTInductor package)" if opts.target == "aoti" else "program.pt2)")))
    parity = check_sharded_parity(fp32, tmp, manifest, reference.parity_prompt(PARITY_PROMPT, device="cpu"),
                                  opts.steps, opts.dtype, half=same)
    progress.done(t0)
    return parity


def _topology(shard, program, ranks: list, vocab_size: int, context: int, target: str = "torch") -> dict:
    """The top-level manifest's ``sharded`` entry: the world, tp / ep, per rank its directory, files,
    CachePlan, weight bytes (the same on every rank; in the build's dtype) and cache bytes (at
    ``context`` = ``--max-context`` tokens, batch 1), the ShardPlan's JSON, the vocabulary (what
    ``effexport run`` checks prompt ids against); for ONNX rank models, ``runtime``: what runs them
    (:data:`~.backends.onnx.collectives.RUNTIME_REQUIREMENT`)."""
    weights = shard.weight_bytes(program)
    runtime = {}
    if target == "onnx":
        from effexport.exporter.backends.onnx.collectives import RUNTIME_REQUIREMENT

        runtime = {"runtime": RUNTIME_REQUIREMENT, "collective": "com.microsoft::AllReduce"}
    return {**runtime, "world": shard.world, "tp": shard.world, "ep": shard.world, "process_group": "0",
            "vocab_size": vocab_size, "cache_context": context,
            "ranks": [{"rank": r, "directory": d, "files": files, "cache_plan": plan.to_json(),
                       "weight_bytes": weights["per_rank"], "cache_bytes": plan.nbytes(1, context)}
                      for r, (d, files, plan) in enumerate(ranks)],
            "weight_bytes": weights, "shard_plan": shard.to_json()}


def check_artifact(artifact_dir: str, loaded: LoadedModel, steps: int = 16, runtime=None):
    """Parity of a built artifact against ``loaded`` (the eager model): a PARITY_PROMPT-token prompt
    drawn independently of the capture's example stream (``parity_prompt``), then ``steps`` decode steps; ``runtime`` defaults to
    :func:`open_runtime`'s."""
    from effexport.exporter.verify.parity import check_parity

    check_steps(steps, None)
    runtime = runtime or open_runtime(artifact_dir)
    dtype = read_manifest(artifact_dir)["dtype"]
    return check_parity(loaded.model, runtime, loaded.parity_prompt(PARITY_PROMPT), steps, dtype)


def cuda_ep_available() -> bool:
    """ONNX Runtime has its CUDA execution provider here and torch sees a GPU."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def _check_half(loaded: LoadedModel, reference: LoadedModel, opts: BuildOptions, tmp: str, progress: Progress):
    """Parity of a bf16 / fp16 artifact. With ONNX Runtime's CUDA EP and a GPU: the artifact itself on
    CUDA against fp32 eager, bounded by eager-in-the-dtype's own error
    (:func:`~.parity.check_parity_half`). Without: ORT's CPU kernels lack half precision for several ops, so the same
    rewritten graph is built again from the fp32 model (capture, rewrite, lower), checked on ORT CPU
    against fp32 eager (tolerance 1e-4), and must have the artifact's op structure (every op type and
    count but Cast); report.json's ``mode`` says which check ran. A torch artifact: :func:`_check_half_torch`."""
    from effexport.exporter.verify.parity import check_parity, check_parity_half, compare_structure
    from effexport.exporter.backends.onnx.runtime import OrtRuntime

    ids = loaded.parity_prompt(PARITY_PROMPT)
    if opts.target == "torch":
        return _check_half_torch(loaded, reference, opts, tmp, progress, ids)
    if cuda_ep_available():
        t0 = progress.stage(f"parity vs eager fp32 and {opts.dtype} (prefill + {opts.steps} decode steps, "
                            "ONNX Runtime CUDA)")
        parity = check_parity_half(loaded.model.cuda(), reference.model.cuda(), OrtRuntime(tmp, device="cuda"),
                                   ids.cuda(), opts.steps, opts.dtype)
        progress.done(t0)
        return parity
    import tempfile

    from effexport.exporter.capture import capture_step
    from effexport.exporter.backends.base import onnx_inputs
    from effexport.exporter.backends.onnx.export import export_step
    from effexport.passes.pipeline import run_pipeline

    t0 = progress.stage(f"parity of the fp32 twin (no CUDA EP here to run {opts.dtype}: capture, rewrite and "
                        f"lower fp32, prefill + {opts.steps} decode steps on ONNX Runtime CPU)")
    twin_program, twin_analysis = run_pipeline(capture_step(reference.model, reference.example_ids(), reference.example_new_tokens),
                                               max_context=opts.max_context, cache_layout=opts.kv_cache)
    with tempfile.TemporaryDirectory(prefix=".effexport-twin-", dir=os.path.dirname(tmp)) as twin:
        twin_proto = export_step(twin_program, twin_analysis.plan, os.path.join(twin, "model.onnx"),
                                 profile=opts.profile)
        _write_json(os.path.join(twin, MANIFEST), {
            "target": "onnx", "profile": opts.profile, "files": {"step": "model.onnx"},
            "inputs": onnx_inputs(twin_proto), "outputs": twin_program.outputs,
            "cache_plan": twin_analysis.plan.to_json(),
            **({"max_step_tokens": twin_program.max_new_tokens} if twin_program.max_new_tokens else {})})
        parity = check_parity(reference.model, OrtRuntime(twin), ids, opts.steps, "fp32")
        mismatch = compare_structure(os.path.join(tmp, "model.onnx"), os.path.join(twin, "model.onnx"))
    progress.done(t0)
    return twin_verdict(parity, mismatch, opts.dtype)


def _check_half_torch(loaded: LoadedModel, reference: LoadedModel, opts: BuildOptions, tmp: str, progress: Progress,
                      ids: torch.Tensor):
    """Parity of a bf16 / fp16 ``--target torch`` artifact: the artifact itself, run by
    :class:`~.backends.torch.runtime.TorchRuntime` with its defaults (CUDA when torch sees it:
    Inductor + CUDA-graph decode; else the exported module uncompiled on torch's CPU kernels, which
    have bf16 / fp16 -- unlike ONNX Runtime's CPU kernels, so no fp32 twin is needed), against fp32
    eager on the same device, bounded by eager-in-the-dtype's own error
    (:func:`~.parity.check_parity_half`). report.json's ``mode`` names the device and engine."""
    from effexport.exporter.backends.torch.runtime import TorchRuntime
    from effexport.exporter.verify.parity import check_parity_half

    runtime = TorchRuntime(tmp)
    where = ("torch CUDA, Inductor + CUDA-graph decode" if runtime.device.type == "cuda"
             else "torch CPU, the exported module uncompiled")
    t0 = progress.stage(f"parity vs eager fp32 and {opts.dtype} (prefill + {opts.steps} decode steps, {where})")
    dev = runtime.device
    parity = check_parity_half(loaded.model.to(dev), reference.model.to(dev),
                               runtime, ids.to(dev), opts.steps, opts.dtype)
    parity.mode = f"{parity.mode}; the {opts.dtype} program.pt2 itself on {where}"
    progress.done(t0)
    return parity


def twin_verdict(parity, mismatch: str, dtype: str):
    """The fp32 twin's parity as the verdict on a ``dtype`` artifact: failed as well when the two
    graphs' op structures differ (``mismatch``, from :func:`~.parity.compare_structure`)."""
    parity.mode = (f"fp32 twin on ONNX Runtime CPU (no CUDA execution provider here: the {dtype} artifact "
                   "was not run; its op structure equals the twin's)" if not mismatch else
                   f"fp32 twin on ONNX Runtime CPU (no CUDA execution provider here: the {dtype} artifact was not run)")
    if mismatch:
        parity.passed = False
        parity.detail = "; ".join(filter(None, [parity.detail, f"the {dtype} graph differs from the fp32 twin's: "
                                                f"{mismatch}"]))
    return parity


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
