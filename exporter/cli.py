"""The ``effexport`` command line.

``main(argv) -> int`` is what the console script calls and what tests call in-process. User
mistakes (bad flags, unknown model, bad numbers) print one line ``effexport: error: ...`` naming the
problem and the fix and return a non-zero exit code (see ``exporter/errors.py``); no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from effexport.exporter.errors import (EXIT_BUG, EXIT_INTERRUPTED, EffexportError, Terminated, UsageError,
                                       one_line, save_traceback, termination_signals)

_SUFFIXES = {"": 1, "k": 1024, "m": 1024 ** 2}


def parse_tokens(text: str) -> int:
    """Parse a context length: ``131072``, ``128k``/``128K`` (x1024), ``1M`` (x1024^2)."""
    match = re.fullmatch(r"\s*(\d{1,15})\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"invalid context length {text!r}: give a positive number of tokens, e.g. 131072 or 128k")
    value = int(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid context length {text!r}: must be at least 1 token")
    return value


_BYTE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_bytes(text: str) -> int:
    """Parse a size: ``2GiB``, ``2G``, ``512MiB``, ``1073741824`` (binary units)."""
    match = re.fullmatch(r"\s*(\d{1,15})\s*(?:([kKmMgG])(?:i?[bB])?)?\s*", text)
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: give e.g. 2GiB, 512MiB or a number of bytes")
    return int(match.group(1)) * _BYTE_SUFFIXES[(match.group(2) or "").lower()]


def _int(text: str) -> int:
    """An integer flag value (the range is checked where the value is used)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: give a whole number, e.g. 16") from None


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (one line, exit 2) instead of printing usage + exiting."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _cmd_list(args) -> int:
    from effexport.samples import get_sample, preset_names

    print("samples (MODEL names; ':tiny' presets run on a CPU in seconds):")
    for name in preset_names():
        sample = get_sample(name)
        note = " (report only)" if name in getattr(sample.module, "REPORT_ONLY", ()) else ""
        print(f"  {name}{note}")
    from effexport.exporter.backends.registry import BACKENDS, target_status

    print("targets (--target):")
    for target, reason in target_status().items():
        print(f"  {target:<9} {BACKENDS[target].description}" + (f" -- unavailable: {reason}" if reason else " -- available"))
    return 0


def _cmd_report(args) -> int:
    from effexport.exporter.verify import report as rep
    from effexport.exporter._io import atomic_file
    from effexport.samples import UnknownModelError, get_sample

    if os.path.isdir(args.model):
        from effexport.exporter.verify.hf_report import hf_report_sample

        sample = hf_report_sample(args.model)
    else:
        try:
            sample = get_sample(args.model)
        except UnknownModelError as exc:
            raise UsageError(f"{exc}; or pass a Hugging Face model directory") from None
    fmt = rep.plot_format(args.plot) if args.plot else None
    data = rep.build_report(sample, args.context, args.cache_dtype)
    if args.tp is not None:
        from effexport.exporter.verify.sharded import format_sharded, sharded_report

        if os.path.isdir(args.model):
            raise UsageError("--tp reports built-in samples for now (the model is captured on the meta device); "
                             "drop --tp for a Hugging Face directory")
        data["sharded"] = sharded_report(sample, args.context, args.cache_dtype, args.tp)
    for warning in data["warnings"]:
        print(f"effexport: warning: {warning}", file=sys.stderr)
    if args.plot:
        with atomic_file(args.plot) as tmp:
            rep.plot_report(sample, args.cache_dtype, args.context, tmp, fmt)
    if args.json:
        print(json.dumps(data, indent=1, sort_keys=False))
    else:
        print(rep.format_report(data))
        if "sharded" in data:
            print(format_sharded(data["sharded"]))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _cmd_build(args) -> int:
    from effexport.exporter.build import BuildOptions, build
    from effexport.passes.pipeline import PASS_NAMES

    if args.dump_after is not None and args.dump_after not in PASS_NAMES:
        raise UsageError(f"unknown pass {args.dump_after!r} for --dump-after; passes are: {', '.join(PASS_NAMES)}")

    return build(BuildOptions(model=args.model, target=args.target, output=args.output, profile=args.profile,
                              dtype=args.dtype, kv_cache=args.kv_cache or ("buffer" if args.genai else "grow"), check=args.check, steps=args.steps, explain=args.explain,
                              max_context=args.max_context, weights=args.weights, trust_pickle=args.trust_pickle,
                              dump_after=args.dump_after, force=args.force, command=tuple(args.argv),
                              allow_missing_weights=args.allow_missing_weights, genai=args.genai,
                              stream_weights=args.stream_weights, data_file_bytes=args.data_file_size,
                              tp=args.tp, ep=args.ep))


def _cmd_check(args) -> int:
    """``effexport check DIR``: the table on stdout (stderr with ``--json`` to stdout), ``--junit`` /
    ``--json`` files; exit 0 passed, 1 failed. A check that cannot run still writes ``--junit``
    (one ``<error>`` case) before its one-line error."""
    from effexport.exporter.verify import tolerances
    from effexport.exporter.verify.junit import write_junit

    try:
        args.tolerances = tolerances.load(args.tolerance)
        run = run_check(args)
    except EffexportError as exc:
        if args.junit:
            write_junit(args.junit, args.dir, error=one_line(str(exc)))
        raise
    to_stdout = args.json == "-"
    table = sys.stderr if to_stdout else sys.stdout
    print(run.parity.table(), file=table)
    print(run.summary(), file=table)
    code = 0 if run.parity.passed else 1
    if os.path.isfile(os.path.join(args.dir, "genai_config.json")):  # an onnxruntime-genai package
        from effexport.exporter.backends.onnx.genai import run_genai_check

        genai = run_genai_check(args.dir, run.loaded, run.limit, run.dtype, stream=table)
        code = code or (0 if genai is None or genai.passed else 1)
    if args.junit:
        write_junit(args.junit, args.dir, run)
    if args.json:
        text = json.dumps(run.to_json(), indent=1)
        if to_stdout:
            print(text)
        else:
            from effexport.exporter._io import atomic_file

            with atomic_file(args.json) as tmp, open(tmp, "w") as f:
                f.write(text + "\n")
    return code


def _cmd_run(args) -> int:
    """``effexport run DIR``: greedy generation over a sharded artifact's ranks. Under torchrun (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) this process is one rank; otherwise it starts every rank
    itself on this machine. Rank 0 prints ``{"tokens": [[...]]}`` (prompt + generated ids)."""
    from effexport.exporter.backends.registry import read_manifest
    from effexport.exporter.backends.torch.sharded import is_sharded, launch, launch_local, topology
    from effexport.exporter.build import MAX_STEPS
    from effexport.exporter.verify.checkrun import prompt_ids

    manifest = read_manifest(args.dir)
    if "rank" in manifest:
        raise UsageError(f"{args.dir!r} is one rank of a sharded artifact: pass the directory above it "
                         f"({os.path.dirname(os.path.abspath(args.dir))!r})")
    if not is_sharded(manifest):
        raise UsageError(f"{args.dir!r} is not a sharded artifact (built with --tp N); an unsharded one runs in one "
                         "process: effexport.runtime.open_runtime(DIR).generate(...) from Python")
    if manifest.get("target") == "onnx":
        from effexport.exporter.backends.onnx.collectives import RUNTIME_REQUIREMENT
        from effexport.exporter.errors import BackendMissingError

        raise BackendMissingError(f"{args.dir!r} holds ONNX rank models: running them together needs "
                                  f"{RUNTIME_REQUIREMENT}; 'effexport check {args.dir}' runs them here composed into "
                                  "one graph on ONNX Runtime CPU")
    if manifest.get("weights") == "none":
        raise UsageError(f"{args.dir!r} is structure-only (built with --weights none): its rank programs hold no "
                         "weights, so there is nothing to run; build it with weights (drop --weights none)")
    if not 1 <= args.steps <= MAX_STEPS:
        raise UsageError(f"--steps {args.steps}: generate 1 to {MAX_STEPS} tokens, e.g. --steps 16")
    topology(args.dir, manifest)  # every rank's files are there, before any process starts
    limit = manifest.get("max_context")
    ids, _ = prompt_ids(args.prompt_ids, manifest, manifest["sharded"]["vocab_size"], args.steps,
                        limit if type(limit) is int and limit > 0 else None)
    if any(os.environ.get(k) for k in ("RANK", "WORLD_SIZE")):
        tokens = launch(args.dir, manifest, ids, args.steps)
    else:
        tokens = launch_local(args.dir, manifest, ids, args.steps)
    if tokens is not None:
        print(json.dumps({"tokens": tokens.tolist()}))
    return 0


def run_check(args):
    """Parity of the artifact ``args.dir`` against its model re-loaded (``args``: ``steps``,
    ``trust_pickle``, ``tolerances`` (a :class:`~.tolerances.Tolerances`), ``prompt_ids`` (a file or
    None), ``seed``) -> :class:`~.checkrun.CheckRun`; raises EffexportError (one line) when it cannot run.
    The pytest plugin calls this too."""
    from effexport.exporter.backends.onnx.runtime import OrtRuntime
    from effexport.exporter.backends.registry import BACKENDS, open_runtime, read_manifest
    from effexport.exporter.backends.torch.sharded import is_sharded
    from effexport.exporter.build import PARITY_PROMPT, check_steps, cuda_ep_available, in_dtype
    from effexport.exporter.verify.checkrun import CheckRun, load_prompt, runtime_info, seeded_prompt
    from effexport.exporter.errors import BackendMissingError, LoadError
    from effexport.exporter.frontends.loading import resolve_source
    from effexport.exporter.verify.parity import check_parity, check_parity_half

    start = time.monotonic()
    manifest = read_manifest(args.dir)
    limit = manifest.get("max_context")
    check_steps(args.steps, limit if type(limit) is int and limit > 0 else None)
    for name in manifest["files"].values():
        if not os.path.isfile(os.path.join(args.dir, name)):
            raise LoadError(f"artifact {args.dir!r} lacks {name} (named in effexport.json); rebuild it with "
                            f"'effexport MODEL -o {args.dir} --force'")
    spec = resolve_source(manifest.get("source") or {"kind": "sample", "name": manifest.get("model")},
                          trust_pickle=args.trust_pickle)
    step = manifest["files"]["step"]
    half = manifest.get("dtype", "fp32") != "fp32"
    sharded = is_sharded(manifest)  # its ranks run on the CPU over gloo, in any dtype
    if half and not sharded and not cuda_ep_available():
        raise BackendMissingError(
            f"{args.dir!r} is a {manifest['dtype']} artifact: checking it runs it on ONNX Runtime's CUDA execution "
            "provider (the CPU kernels lack half precision for several ops); run 'effexport check' on a GPU "
            "machine with onnxruntime-gpu (the build's own check is in report.json, parity.mode)")
    try:
        runtime = None if sharded else OrtRuntime(args.dir, device="cuda") if half else open_runtime(args.dir)
    except EffexportError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a bad file
        backend = BACKENDS[manifest["target"]].runtime_name
        raise LoadError(f"{backend} cannot load {step} of {args.dir!r} ({type(exc).__name__}: "
                        f"{one_line(str(exc), 120)}); rebuild the artifact with --force") from None
    loaded = spec.load()
    dtype = manifest.get("dtype", "fp32")
    tols, sources = args.tolerances.table(dtype), args.tolerances.sources(dtype)
    if args.prompt_ids:
        ids, prompt = load_prompt(args.prompt_ids, loaded, manifest, args.steps,
                                  limit if type(limit) is int and limit > 0 else None)
    else:  # the build's prompt (seed PARITY_SEED) unless --seed picks another
        ids, prompt = seeded_prompt(loaded, PARITY_PROMPT, args.seed)
    model = loaded.model
    try:
        if sharded:  # its ranks together, spawned here over gloo
            from effexport.exporter.verify.sharded import check_sharded_parity

            parity = check_sharded_parity(model, args.dir, manifest, ids, args.steps, dtype, tols,
                                          half=in_dtype(loaded, dtype).model if half else None)
        elif half:  # on the GPU the artifact runs on: against fp32 eager, bounded by eager in its dtype
            parity = check_parity_half(in_dtype(loaded, manifest["dtype"]).model.cuda(), model.cuda(), runtime,
                                       ids.cuda(), args.steps, manifest["dtype"], tols)
        else:
            parity = check_parity(model, runtime, ids, args.steps, dtype, tols)
    except EffexportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the runtime's own error types (wrong inputs, shapes)
        raise LoadError(f"artifact {args.dir!r} does not match its manifest: running {step} failed "
                        f"({type(exc).__name__}: {one_line(str(exc), 160)}); rebuild it with "
                        f"'effexport MODEL -o {args.dir} --force'") from None
    run = CheckRun(args.dir, manifest, parity, *runtime_info(runtime, manifest), prompt, sources,
                   time.monotonic() - start)
    run.loaded, run.limit = loaded, limit  # what the GenAI check of a package needs (_cmd_check)
    return run


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command (used for ``--help`` and tests)."""
    parser = _Parser(
        prog="effexport",
        description="Export LLMs that use KV sharing, sliding windows, compressed attention and "
                    "hyper-connections without losing the savings, and account for what they cost.",
        epilog="examples:\n"
               "  effexport gemma4-e2b:tiny --target onnx -o out  # export + parity check\n"
               "  effexport check out                             # re-run parity of an artifact\n"
               "  effexport gemma4-e2b:tiny --target torch --tp 2 -o tp2  # one program per rank\n"
               "  effexport gemma4-e2b:tiny --target onnx --tp 2 -o tp2o  # one model.onnx per rank\n"
               "  effexport gemma4-e2b:tiny --target aoti --tp 2 -o tp2a  # one AOTInductor package per rank\n"
               "  effexport run tp2 --prompt-ids ids.json         # its ranks together (or under torchrun)\n"
               "  effexport list                                  # built-in samples\n"
               "  effexport report gemma4-e2b --context 128k      # KV bytes, params, FLOPs/token\n"
               "  effexport report deepseek-v4-flash --context 1M --cache-dtype published --json\n"
               "exit codes: 0 ok, 1 parity failed, 2 usage/input error, 3 capture/rewrite/lowering error, "
               "4 backend not installed, 5 output not written (disk full), 70 internal error (a bug), "
               "128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    from effexport.exporter.backends.registry import BACKENDS
    from effexport.exporter.backends.onnx.profiles import SELECTABLE
    from effexport.exporter.frontends.loading import WEIGHTS
    from effexport.passes.pipeline import PASS_NAMES

    p_build = sub.add_parser(
        "build", help="export MODEL to a deployable artifact and check it against eager (also: effexport MODEL ...)",
        description="Capture MODEL with torch.export, rewrite its attention into effexport ops (sliding windows "
                    "as ring caches, shared KV read in place), lower it to the target and check parity "
                    "against eager PyTorch (prefill + decode steps).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="targets:\n" + "\n".join(f"  {k:<9} {b.description}" for k, b in BACKENDS.items()) +
               "\nexample: effexport gemma4-e2b:tiny --target onnx -o out/gemma --explain")
    p_build.add_argument("model", metavar="MODEL",
                         help="a built-in sample name (see 'effexport list'), a Hugging Face model directory "
                              "(config.json + *.safetensors) or a torch.save file of the module (.pt, with "
                              "--trust-pickle)")
    p_build.add_argument("--target", choices=tuple(BACKENDS), default="onnx", help="what to build (default onnx)")
    p_build.add_argument("-o", "--output", metavar="DIR", help="artifact directory (default ./MODEL-TARGET)")
    p_build.add_argument("--profile", choices=SELECTABLE, default="ort",
                         help="ONNX profile: 'ort' uses com.microsoft contrib ops (GroupQueryAttention), "
                              "'standard' only ai.onnx ops (default ort)")
    p_build.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                         help="dtype the model is captured and deployed in (default fp32). bf16 / fp16: --target "
                              "onnx or torch (with --tp too: the ranks' parity is against fp32 eager, bounded by "
                              "eager in the dtype); ONNX parity runs the artifact on ONNX Runtime's CUDA EP against eager in the same "
                              "dtype when onnxruntime-gpu and a GPU are here, otherwise the same graph built in fp32 "
                              "is checked on the CPU and must match the artifact's op structure (report.json "
                              "parity.mode says which ran)")
    p_build.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                         help="run parity against eager after the build (default on)")
    p_build.add_argument("--steps", type=_int, default=16, help="decode steps in the parity check (default 16)")
    p_build.add_argument("--max-context", type=parse_tokens, default=None,
                         help="longest sequence the artifact serves: sizes fixed compressed-entry buffers "
                              "(DeepSeek V4: max_context / ratio slots). Default: the smaller of 4096 and "
                              "the model's trained limit; accepts 128k")
    p_build.add_argument("--kv-cache", choices=("grow", "buffer"), default=None,
                         help="full-cache layout: 'grow' concatenates each step's K/V to a new present; "
                              "'buffer' keeps each full cache in one fixed buffer of --max-context rows that "
                              "the step writes in place (ONNX Runtime's GroupQueryAttention shared-buffer "
                              "layout: past and present bound to one device buffer; fixed shapes for CUDA "
                              "graphs). Rings, compressed caches and states are fixed-size either way "
                              "(default grow; buffer with --genai)")
    p_build.add_argument("--genai", action="store_true",
                         help="--target onnx: also write an onnxruntime-genai package (genai_config.json, "
                              "genai.onnx with GenAI's I/O names, the input directory's tokenizer files) and check "
                              "og.Generator's greedy tokens against eager; implies --kv-cache buffer. Refused "
                              "(exit 2) for caches GenAI cannot drive (CCA / compressor / linear-attention states, "
                              "compressed or chunk caches)")
    p_build.add_argument("--explain", action="store_true",
                         help="print every attention site: what it was classified as and why")
    p_build.add_argument("--dump-after", metavar="PASS",
                         help="write the graph after PASS into DIR/graph-after-PASS.py "
                              f"(passes: {', '.join(PASS_NAMES)})")
    p_build.add_argument("--force", action="store_true",
                         help="replace an existing artifact directory (one a build wrote: it holds effexport.json)")
    p_build.add_argument("--allow-missing-weights", action="store_true",
                         help="build a Hugging Face directory whose safetensors lack some of the model's weights "
                              "(or hold extra or differently shaped ones): those keep seeded random values; "
                              "recorded in report.json")
    p_build.add_argument("--weights", choices=WEIGHTS, default="random",
                         help="'random': a sample's deterministic random weights (seed 0; model files bring "
                              "their own); 'none': structure only -- the model on the meta device, an ONNX "
                              "graph whose weights are external-data references with no data written, or "
                              "(--target torch, also with --tp N) program.pt2 files whose weights are meta "
                              "placeholders of their (per-rank) shapes; no parity; for real-size presets "
                              "(default random)")
    p_build.add_argument("--stream-weights", action=argparse.BooleanOptionalAction, default=None,
                         help="Hugging Face directory, --target onnx: capture and lower on meta weights and stream "
                              "the safetensors tensors into the external data one at a time, converted to --dtype "
                              "(peak memory ~ one tensor beyond the graph; parity runs eager, then the artifact). "
                              "Default: on from 256 MiB of safetensors. --target torch --tp N: each rank reads only "
                              "its slices of the tensors (safetensors get_slice), one rank at a time; default on")
    p_build.add_argument("--data-file-size", type=parse_bytes, default=None, metavar="SIZE",
                         help="split the ONNX external data into files of at most SIZE (e.g. 2GiB): "
                              "model-00001-of-0000N.onnx.data ... (default one model.onnx.data)")
    p_build.add_argument("--trust-pickle", action="store_true",
                         help="allow unpickling a torch.save file of a whole module (runs code from the file: "
                              "only for files you trust); without it .pt files are read weights-only")
    p_build.add_argument("--tp", type=_int, default=None, metavar="N",
                         help="tensor parallel over N ranks (--target torch: fp32, bf16 or fp16; --target onnx or "
                              "aoti: fp32; --weights none for structure only): attention heads, MLPs and "
                              "experts split as 'effexport report MODEL --tp N' shows; writes DIR/rank{r}/program.pt2 "
                              "(or model.onnx, each all-reduce a com.microsoft::AllReduce; or the AOTInductor package "
                              "model.pt2) per rank and a topology in "
                              "DIR/effexport.json; the parity check runs the N ranks together over gloo on the CPU "
                              "(ONNX: the rank models composed into one graph on ONNX Runtime CPU, each AllReduce a Sum; "
                              "the collective needs an onnxruntime CUDA build with NCCL). A head count N does not "
                              "divide: exit 2 naming the layer. Run torch and aoti ranks with 'effexport run DIR' or "
                              "torchrun")
    p_build.add_argument("--ep", type=_int, default=None, metavar="M",
                         help="expert parallel group size; for now only M = N of --tp (experts are split over the "
                              "same ranks as the heads)")
    p_build.set_defaults(func=_cmd_build)

    p_check = sub.add_parser("check", help="re-run parity of a built artifact against eager")
    p_check.add_argument("dir", metavar="DIR", help="an artifact directory written by a build")
    p_check.add_argument("--steps", type=_int, default=16, help="decode steps (default 16)")
    p_check.add_argument("--trust-pickle", action="store_true",
                         help="allow re-loading a model that was built from a pickled module")
    from effexport.exporter.frontends.model import PARITY_SEED
    from effexport.exporter.verify.tolerances import DEFAULTS
    p_check.add_argument("--tolerance", action="append", default=[], metavar="KEY=VALUE",
                         help="max relative error of an output (logits/prefill, logits/decode), of every output "
                              "of a group (logits) or of a dtype's outputs (fp32, bf16, fp16); repeatable. "
                              "Defaults: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULTS.items()) +
                              "; pyproject.toml's [tool.effexport.tolerance] table (nearest, from the current "
                              "directory upward) is read first, these flags win")
    p_check.add_argument("--prompt-ids", metavar="FILE",
                         help="the prompt: a JSON list of token ids (or a list of equal-length lists: a batch), "
                              "or a text file tokenized with the tokenizer of the Hugging Face directory the "
                              "artifact was built from (default: 8 tokens at batch 2 drawn with --seed)")
    p_check.add_argument("--seed", type=_int, default=PARITY_SEED,
                         help=f"seed of the default prompt (default {PARITY_SEED}, the build's check); recorded")
    p_check.add_argument("--junit", metavar="FILE.xml",
                         help="also write JUnit XML: one testcase per output (logits/prefill, logits/decode) "
                              "and greedy-tokens, failures as <failure>, a check that cannot run as <error>")
    p_check.add_argument("--json", nargs="?", const="-", metavar="FILE",
                         help="the result as JSON (report.json's parity object plus runtime, "
                              "execution_provider, device, dtype, tolerances and their sources, prompt): to "
                              "stdout (the table then goes to stderr), or to FILE")
    p_check.set_defaults(func=_cmd_check)

    p_run = sub.add_parser(
        "run", help="greedy generation over a sharded (--tp) artifact: one process per rank, or one rank under torchrun",
        description="Generate --steps greedy tokens after --prompt-ids with a sharded artifact (built with --tp N).\n"
                    "Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) this process\n"
                    "is one rank: it joins the default process group (nccl on CUDA, cuda:LOCAL_RANK; gloo on the\n"
                    "CPU) and runs DIR/rank{RANK}/program.pt2 (aoti: model.pt2). Without those variables it starts\n"
                    "the N ranks itself on this machine. Rank 0 prints {\"tokens\": [[prompt + generated ids], ...]}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  effexport gemma4-e2b:tiny --target torch --tp 2 -o tp2\n"
               "  effexport run tp2 --prompt-ids prompt.json --steps 8\n"
               "  torchrun --nproc-per-node 2 -m effexport.launch tp2 --prompt-ids prompt.json --steps 8")
    p_run.add_argument("dir", metavar="DIR",
                       help="a sharded artifact directory (effexport MODEL --target torch|aoti --tp N)")
    p_run.add_argument("--prompt-ids", metavar="FILE", required=True,
                       help="the prompt: a JSON list of token ids (or a list of equal-length lists: a batch), or a "
                            "text file tokenized with the tokenizer of the Hugging Face directory it was built from")
    p_run.add_argument("--steps", type=_int, default=16, help="tokens to generate (default 16)")
    p_run.set_defaults(func=_cmd_run)

    p_list = sub.add_parser("list", help="list the built-in samples and the targets (and what is missing)")
    p_list.set_defaults(func=_cmd_list)

    p_rep = sub.add_parser(
        "report", help="KV-cache bytes per layer, parameters and decode FLOPs/token at a context length",
        description="Analytic cost of a model at a context length: per-layer cache (owner/consumer, "
                    "full / ring(W) / compressed(r) / state) under both cache policies, against the model's "
                    "baseline with its savings turned off; parameters; decode FLOPs per token.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: effexport report laguna-xs2 --context 131072 --plot kv.png")
    p_rep.add_argument("model", metavar="MODEL", help="a built-in sample name (see 'effexport list') or a Hugging "
                                                      "Face model directory (config.json is enough)")
    p_rep.add_argument("--context", type=parse_tokens, default=parse_tokens("128k"),
                       help="context length in tokens: 131072, 128k or 1M (default 128k)")
    from effexport.exporter.verify.report import CACHE_DTYPES
    p_rep.add_argument("--cache-dtype", choices=CACHE_DTYPES, default="bf16",
                       help="cache storage format; 'published' = the formats the model's authors ship "
                            "(e.g. DeepSeek fp8+bf16 KV, fp4 indexer keys). Default bf16")
    p_rep.add_argument("--json", action="store_true", help="print the machine-readable JSON object only")
    p_rep.add_argument("--plot", metavar="FILE.png", help="also draw KV bytes vs context (log x) to FILE.png")
    p_rep.add_argument("--tp", type=_int, default=None, metavar="N",
                       help="also per-rank weight and cache bytes over N tensor-parallel ranks (built-in samples; "
                            "--cache-dtype fp32 / bf16 / fp16): the model captured and sharded on the meta device "
                            "as 'effexport MODEL --target torch --tp N' would; a KV head replicated on several ranks "
                            "counts on each. JSON: 'sharded'")
    p_rep.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (``exporter/errors.py``): a user error prints one line, a
    signal (Ctrl-C, SIGTERM, SIGHUP) cleans up and returns 128 + its number, a bug returns 70 with the
    traceback saved to a log file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_typed = ["effexport"] + argv
    parser = build_parser()
    commands = {"build", "check", "list", "report", "run"}
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        argv = ["build"] + argv  # effexport MODEL --target ... is sugar for effexport build MODEL ...
    start = time.monotonic()
    try:
        with termination_signals():
            if not argv:
                parser.print_usage(sys.stderr)
                raise UsageError("give a MODEL to export or a command, e.g. 'effexport gemma4-e2b:tiny -o out' "
                                 "(see 'effexport --help')")
            args = parser.parse_args(argv)
            if not getattr(args, "func", None):
                parser.print_usage(sys.stderr)
                raise UsageError("give a command (see 'effexport --help')")
            args.argv = as_typed
            return args.func(args)
    except EffexportError as exc:
        print(f"effexport: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"effexport: interrupted after {time.monotonic() - start:.1f}s; nothing was written",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as exc:
        print(f"effexport: stopped by {exc.name} after {time.monotonic() - start:.1f}s; nothing was written",
              file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:  # noqa: BLE001 - a bug: say so, keep the traceback in a file
        if os.environ.get("EFFEXPORT_DEBUG"):
            raise
        log = save_traceback(exc)
        print(f"effexport: internal error ({type(exc).__name__}: {one_line(str(exc), 200)}): this is a bug, "
              f"please report it with the traceback saved in {log}", file=sys.stderr)
        return EXIT_BUG


def entry_point() -> None:
    """Console-script entry."""
    sys.exit(main())
