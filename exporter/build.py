"""``effexport MODEL --target onnx``: load, capture, rewrite, lower, verify, write the artifact.

One progress line per stage on stderr; the artifact directory is built in a temporary sibling and
renamed into place only when complete, so a failed or interrupted build leaves nothing behind.

Artifact layout (a contract, see DESIGN.md):
    DIR/model.onnx       the step model: (input_ids, pos, past.*) -> (logits, present.*)
    DIR/model.onnx.data  external weights (only when large)
    DIR/effexport.json   CachePlan, I/O names, dtypes, opset, IR version, profile, versions, command
    DIR/report.json      the analytic report (effexport report) plus "parity" and "passes"
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

from effexport.exporter.errors import BackendMissingError, LoadError, UsageError

TARGETS = {
    "onnx": "ONNX model for ONNX Runtime (profiles: ort, standard)",
    "tensorrt": "TensorRT engine (needs: pip install 'effexport[tensorrt]')",
}
PROFILES = ("ort", "standard")
# random-weight samples above this many parameters are refused (fp32 weights would not fit a laptop)
MAX_RANDOM_PARAMS = 200_000_000


@dataclass
class BuildOptions:
    """Everything a build needs, from the CLI or from Python."""

    model: str
    target: str = "onnx"
    output: str | None = None
    profile: str = "ort"
    dtype: str = "fp32"
    check: bool = True
    steps: int = 16
    max_context: int = 4096
    explain: bool = False
    dump_after: str | None = None
    force: bool = False
    command: tuple = ()


class Progress:
    """One line per stage: ``[2/5] capture ... 12.3s``."""

    def __init__(self, total: int, stream=None):
        self.total, self.n, self.stream = total, 0, stream or sys.stderr
        self.start = time.monotonic()

    def stage(self, what: str):
        self.n += 1
        print(f"[{self.n}/{self.total}] {what} ...", file=self.stream, flush=True)
        return time.monotonic()

    def done(self, t0: float, note: str = ""):
        print(f"      done in {time.monotonic() - t0:.1f}s{(': ' + note) if note else ''}", file=self.stream,
              flush=True)


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


def resolve_sample(name: str):
    """The built-in sample called ``name`` (usage errors for paths and unknown names)."""
    from effexport.samples import UnknownModelError, get_sample

    if os.path.exists(name):
        raise LoadError(f"{name!r} is a path: loading model files is not supported yet; "
                        "use a built-in sample name (see 'effexport list')")
    try:
        return get_sample(name)
    except UnknownModelError as exc:
        raise UsageError(str(exc)) from None


def load_sample_model(name: str):
    """Resolve a built-in sample and build it with deterministic random weights (seed 0)."""
    sample = resolve_sample(name)
    if name in getattr(sample.module, "REPORT_ONLY", ()):
        raise UsageError(f"{name} is a report-only preset (no model); try 'effexport report {name}'")
    params = sample.build("meta").param_counts()["total"]
    if params > MAX_RANDOM_PARAMS:
        raise UsageError(f"{name} has {params / 1e9:.1f} B parameters: building it with random weights "
                         f"needs {params * 4 / 2**30:.0f} GiB; export '{name}:tiny' (or use "
                         f"'effexport report {name}' for its costs)")
    return sample, sample.build()


def example_ids(sample, batch: int = 2, length: int = 40, seed: int = 1) -> torch.Tensor:
    """The deterministic token stream used for capture and parity."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, sample.config.vocab_size, (batch, length), generator=gen)


def check_target(target: str) -> None:
    """Refuse a target whose backend is missing (exit 4) before any work is done."""
    if target == "tensorrt":
        import importlib.util

        missing = [m for m in ("tensorrt", "torch_tensorrt") if importlib.util.find_spec(m) is None]
        if missing:
            raise BackendMissingError(f"the tensorrt target needs {', '.join(missing)} (not installed): "
                                      "pip install 'effexport[tensorrt]' (NVIDIA GPU machines only)")
        raise BackendMissingError("the tensorrt target is not built yet in this version; use --target onnx")
    if target == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise BackendMissingError(f"the onnx target needs {exc.name}: pip install onnx onnxruntime onnxscript") from None


def build(opts: BuildOptions) -> int:
    """Run a build; returns the exit code (0 ok, 1 parity failed). Raises EffexportError otherwise."""
    from effexport.exporter import report as rep
    from effexport.exporter._io import atomic_directory
    from effexport.exporter.capture import capture_step
    from effexport.exporter.parity import check_parity
    from effexport.exporter.runtime import MANIFEST, OrtRuntime
    from effexport.passes.pipeline import run_pipeline

    if opts.profile not in PROFILES:
        raise UsageError(f"unknown --profile {opts.profile!r}; choose one of {', '.join(PROFILES)}")
    if opts.dtype != "fp32":
        raise UsageError(f"--dtype {opts.dtype}: ONNX Runtime's CPU kernels cannot run the parity check in "
                         "half precision; build with --dtype fp32")
    check_target(opts.target)
    out = opts.output or f"{opts.model.replace(':', '-')}-{opts.target}"
    if os.path.exists(out) and not opts.force:
        raise UsageError(f"output directory {out!r} exists; pass --force to replace it or -o another directory")
    resolve_sample(opts.model)  # a bad name fails before any progress output
    progress = Progress(5 if opts.check else 4)
    t0 = progress.stage(f"load {opts.model}")
    sample, model = load_sample_model(opts.model)
    ids = example_ids(sample)
    progress.done(t0, f"{sum(p.numel() for p in model.parameters()):,} parameters")
    t0 = progress.stage("capture (torch.export, dynamic batch / tokens / cache length)")
    captured = capture_step(model, ids)
    progress.done(t0, f"{len(captured.gm.graph.nodes)} nodes")
    t0 = progress.stage("rewrite (attention sites, masks, KV sharing, caches)")
    dumped = {}
    program, analysis = run_pipeline(captured, opts.dump_after,
                                     lambda name, gm: dumped.setdefault(name, gm.code), opts.max_context)
    c = analysis.counts
    progress.done(t0, f"{c['discover']['sites']} sites: {c['rewrite']['ring']} ring, {c['rewrite']['full']} full, "
                      f"{c['kv_sharing']['consumers']} consumers, "
                      f"{c['rewrite']['left_alone']} left alone")
    if opts.explain:
        print(analysis.explain(), file=sys.stderr)
    code = 0
    with atomic_directory(out, force=opts.force) as tmp:
        if opts.dump_after:
            with open(os.path.join(tmp, f"graph-after-{opts.dump_after}.py"), "w") as f:
                f.write(dumped[opts.dump_after])
        t0 = progress.stage(f"lower to ONNX (profile {opts.profile})")
        from effexport.exporter.onnx.export import export_step
        model_proto = export_step(program, analysis.plan, os.path.join(tmp, "model.onnx"), profile=opts.profile)
        progress.done(t0, f"opset {_opset(model_proto)}, IR {model_proto.ir_version}")
        manifest = {
            "format": 1, "model": opts.model, "target": opts.target, "profile": opts.profile,
            "dtype": opts.dtype, "files": {"step": "model.onnx"}, "max_context": opts.max_context,
            "inputs": program.inputs, "outputs": program.outputs,
            "opset": _opset(model_proto), "ir_version": model_proto.ir_version,
            "cache_plan": analysis.plan.to_json(), "versions": versions(),
            "command": list(opts.command) or ["effexport", opts.model, "--target", opts.target],
        }
        _write_json(os.path.join(tmp, MANIFEST), manifest)
        report = rep.build_report(sample, rep.max_context(sample) or 4096)
        report["passes"] = analysis.counts
        if opts.check:
            t0 = progress.stage(f"parity vs eager (prefill + {opts.steps} decode steps, ONNX Runtime CPU)")
            parity = check_parity(model, OrtRuntime(tmp), ids[:, :8], opts.steps, opts.dtype)
            progress.done(t0)
            print(parity.table(), file=sys.stderr)
            report["parity"] = parity.to_json()
            code = 0 if parity.passed else 1
        _write_json(os.path.join(tmp, "report.json"), report)
    total = time.monotonic() - progress.start
    print(f"{'PASSED' if code == 0 else 'FAILED'}: {out} ({total:.1f}s)", file=sys.stderr)
    return code


def _opset(model_proto) -> int:
    return next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
