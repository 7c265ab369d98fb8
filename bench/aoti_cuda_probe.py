"""Where does loading a CUDA AOTInductor package crash, and does any other way of loading it work?
Every compile and every load attempt runs in its own process with a timeout (a segfault ends only
that attempt); each outcome is recorded.

    python3 bench/aoti_cuda_probe.py [--out DIR] [--device cuda] [--models linear,gemma_step]
                                     [--variants ...] [--budget-s 170] [--timeout-s 150]

Models: ``linear`` (a Linear + GELU: no effexport op), ``gemma_step`` (gemma4-e2b:tiny's rewritten
decode step, ``--kv-cache buffer`` layout: what ``--target aoti`` compiles), ``op`` (one
``effexport::attention_read`` call), ``op_cpu_pos`` (the same with ``pos`` a CPU tensor).

First the torch APIs this torch has (``api``: the signatures of ``aoti_load_package``,
``aoti_compile_and_package``, ``torch._inductor.package.load_package``, the ``torch._C._aoti``
classes, whether ``aot_inductor.package_cpp_only`` exists -- to compare torch 2.11 with 2.13). Then
per model one compile process writing ``MODEL.pt2`` (``aoti_compile_and_package``) and, with the
``cpp_only`` variant asked for, ``MODEL_cpp.pt2`` (``inductor_configs={"aot_inductor.package_cpp_only":
True}``: sources and a CMakeLists, no library), the example inputs and the eager outputs. Then per
model and variant one load process:

* ``default``: ``torch._inductor.aoti_load_package(pkg)``, called once;
* ``single_threaded``: ``aoti_load_package(pkg, run_single_threaded=True)``;
* ``device_index``: ``aoti_load_package(pkg, device_index=0)`` (-1 on the CPU, whose runner refuses 0);
* ``loader``: ``torch._C._aoti.AOTIModelPackageLoader(pkg, "model", False, 1, 0)`` and ``.run``;
* ``keep_alive``: loaded and called three times, the model held to the end and the process left by
  ``os._exit(0)`` (no destructors: a crash at teardown would not show);
* ``debug_env``: ``default`` with ``AOTI_RUNTIME_CHECK_INPUTS=1``, ``CUDA_LAUNCH_BLOCKING=1``,
  ``TORCH_SHOW_CPP_STACKTRACES=1``, ``TORCH_CPP_LOG_LEVEL=INFO``, ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``;
* ``gdb``: ``default`` under ``gdb -batch -ex run -ex bt`` (the native backtrace of a crash; run
  only where ``default`` failed, skipped where gdb is missing);
* ``cpp_only``: ``MODEL_cpp.pt2`` unpacked, its CMakeLists built with cmake + make against this torch
  (``cmake_minimum_required`` lowered to the installed cmake where that is older: recorded), the
  library loaded with ``torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda")`` (``...Cpu(so, 1)``
  on the CPU) and run on the flat inputs.

A load outcome is ``ok`` with the max abs error of the outputs against eager, or the exit status, the
last stage reached and the stderr tail. ``--device cpu`` runs the same code on the CPU (this
machine's check of the script; CPU packages load here). Writes ``aoti_probe.json`` to ``--out``
after every attempt; attempts that would start with less than 10 s of ``--budget-s`` left are
recorded as skipped.
"""
from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

MODELS = ("linear", "gemma_step", "op", "op_cpu_pos")
VARIANTS = ("default", "single_threaded", "loader", "cpp_only", "debug_env", "gdb", "keep_alive", "device_index")
"""In the order they run (the budget cuts the tail)."""
DEBUG_ENV = {"AOTI_RUNTIME_CHECK_INPUTS": "1", "CUDA_LAUNCH_BLOCKING": "1", "TORCH_SHOW_CPP_STACKTRACES": "1",
             "TORCH_CPP_LOG_LEVEL": "INFO", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}


def api() -> dict:
    """The AOTInductor entry points this torch has (signatures, or None where missing)."""
    import torch

    def sig(obj, *names):
        for name in names:
            obj = getattr(obj, name, None)
            if obj is None:
                return None
        try:
            return str(inspect.signature(obj))
        except (TypeError, ValueError):
            return (getattr(obj, "__doc__", "") or "").strip().splitlines()[0][:300] if obj.__doc__ else "present"

    import torch._inductor
    out = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "aoti_load_package": sig(torch._inductor, "aoti_load_package"),
           "aoti_compile_and_package": sig(torch._inductor, "aoti_compile_and_package")}
    try:
        import torch._inductor.package as package
        out["package.load_package"] = sig(package, "load_package")
    except ImportError as exc:
        out["package.load_package"] = f"ImportError: {exc}"
    from torch._inductor import config
    out["config.aot_inductor.package_cpp_only"] = hasattr(config.aot_inductor, "package_cpp_only")
    aoti = getattr(torch._C, "_aoti", None)
    out["torch._C._aoti"] = sorted(n for n in dir(aoti) if not n.startswith("_")) if aoti else None
    for cls in ("AOTIModelPackageLoader", "AOTIModelContainerRunnerCuda", "AOTIModelContainerRunnerCpu"):
        out[f"_aoti.{cls}.__init__"] = sig(aoti, cls, "__init__") if aoti else None
    out["cmake"] = shutil.which("cmake") and subprocess.run(["cmake", "--version"], capture_output=True,
                                                            text=True).stdout.split("\n")[0]
    out["gdb"] = shutil.which("gdb")
    return out


# ------------------------------------------------------------------------------------ children
def _model(name: str, dev: str):
    """(module or ExportedProgram, flat example inputs)."""
    import torch

    torch.manual_seed(0)
    if name == "linear":
        class Linear(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(64, 64)

            def forward(self, x):
                return torch.nn.functional.gelu(self.lin(x))
        return Linear().to(dev), (torch.randn(4, 64, device=dev),)
    if name in ("op", "op_cpu_pos"):
        class Read(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(64, 64)

            def forward(self, q, k, v, pos):
                return torch.ops.effexport.attention_read(self.proj(q), k, v, pos, None, scale=0.125) * 2.0
        q = torch.randn(1, 8, 1, 64, device=dev)
        k, v = torch.randn(1, 1, 256, 64, device=dev), torch.randn(1, 1, 256, 64, device=dev)
        pos = torch.tensor(255, device="cpu" if name == "op_cpu_pos" else dev)
        return Read().to(dev), (q, k, v, pos)
    if name == "gemma_step":
        from effexport.exporter.backends.aoti.package import _program_for
        from effexport.exporter.capture import capture_step
        from effexport.passes.pipeline import run_pipeline
        from effexport.samples import get_sample

        from effexport.samples._spec import capture_length

        sample = get_sample("gemma4-e2b:tiny")
        model = sample.build()
        ids = torch.randint(0, sample.config.vocab_size, (2, capture_length(sample.config.layer_specs())))
        program, analysis = run_pipeline(capture_step(model, ids), max_context=64, cache_layout="buffer")
        ep = _program_for(program, analysis.plan, dev)
        caches = [e.empty(1, dev) for e in analysis.plan.entries]
        ids = torch.randint(0, sample.config.vocab_size, (1, 1), device=dev)
        return ep, (ids, torch.tensor(0, device=dev), *caches)
    raise ValueError(name)


def _flat(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _max_err(got, want) -> float:
    return max(((g.float().cpu() - w.float().cpu()).abs().max().item() if g.numel() else 0.0)
               for g, w in zip(_flat(got), _flat(want)))


def child_compile(model: str, workdir: str, dev: str, cpp_only: bool) -> None:
    import torch

    import effexport.custom_ops  # noqa: F401  (registers effexport::*)
    if dev == "cuda":
        effexport.custom_ops.enable_triton()
    obj, args = _model(model, dev)
    with torch.no_grad():
        ep = obj if isinstance(obj, torch.export.ExportedProgram) else torch.export.export(obj, args)
        want = ep.module()(*args)
        torch.save({"args": [a.cpu() for a in args], "devices": [a.device.type for a in args],
                    "want": [w.cpu() for w in _flat(want)]}, os.path.join(workdir, f"{model}_io.pt"))
        print("stage: exported", flush=True)
        t0 = time.monotonic()
        torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(workdir, f"{model}.pt2"))
        print(json.dumps({"compile_s": time.monotonic() - t0}), flush=True)
        if cpp_only:
            t0 = time.monotonic()
            torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(workdir, f"{model}_cpp.pt2"),
                                                     inductor_configs={"aot_inductor.package_cpp_only": True})
            print(json.dumps({"compile_cpp_only_s": time.monotonic() - t0}), flush=True)


def _inputs(model: str, workdir: str, dev: str):
    import torch

    io = torch.load(os.path.join(workdir, f"{model}_io.pt"))
    return [a.to(dev if d != "cpu" else "cpu") for a, d in zip(io["args"], io["devices"])], io["want"]


def child_load(model: str, variant: str, workdir: str, dev: str) -> None:
    import torch

    import effexport.custom_ops  # noqa: F401
    if dev == "cuda":
        effexport.custom_ops.enable_triton()
    args, want = _inputs(model, workdir, dev)
    pkg = os.path.join(workdir, f"{model}.pt2")
    print("stage: inputs ready", flush=True)
    with torch.no_grad():
        if variant in ("default", "debug_env", "gdb", "keep_alive"):
            runner = torch._inductor.aoti_load_package(pkg)
        elif variant == "single_threaded":
            runner = torch._inductor.aoti_load_package(pkg, run_single_threaded=True)
        elif variant == "device_index":
            runner = torch._inductor.aoti_load_package(pkg, device_index=0 if dev == "cuda" else -1)
        elif variant == "loader":
            loader = torch._C._aoti.AOTIModelPackageLoader(pkg, "model", False, 1, 0 if dev == "cuda" else -1)

            def runner(*a):
                return loader.run(list(a))
        else:
            raise ValueError(variant)
        print("stage: loaded", flush=True)
        got = runner(*args)
        if dev == "cuda":
            torch.cuda.synchronize()
        print("stage: ran", flush=True)
        if variant == "keep_alive":
            for _ in range(2):
                got = runner(*args)
            if dev == "cuda":
                torch.cuda.synchronize()
            print(json.dumps({"ok": True, "max_abs_err": _max_err(got, want), "calls": 3}), flush=True)
            sys.stdout.flush()
            os._exit(0)  # the runner is never destroyed
    print(json.dumps({"ok": True, "max_abs_err": _max_err(got, want)}), flush=True)


def child_cpp_only(model: str, workdir: str, dev: str, timeout: float) -> None:
    """Build ``MODEL_cpp.pt2``'s CMakeLists and run the library through the container runner."""
    import torch
    import torch.utils

    import effexport.custom_ops  # noqa: F401
    if dev == "cuda":
        effexport.custom_ops.enable_triton()
    src = tempfile.mkdtemp(dir=workdir, prefix=f"{model}_cpp_")
    with zipfile.ZipFile(os.path.join(workdir, f"{model}_cpp.pt2")) as z:
        z.extractall(src)
    lists = glob.glob(os.path.join(src, "**", "CMakeLists.txt"), recursive=True)
    if not lists:
        print(json.dumps({"ok": False, "reason": "the cpp-only package has no CMakeLists.txt",
                          "files": sorted(os.path.relpath(p, src) for p in glob.glob(os.path.join(src, "**"),
                                                                                     recursive=True))[:40]}))
        return
    project = os.path.dirname(lists[0])
    info = {"files": sorted(os.listdir(project))}
    cmake = shutil.which("cmake")
    if cmake is None:
        print(json.dumps({"ok": False, "reason": "no cmake on PATH", **info}))
        return
    have = re.search(r"(\d+\.\d+)", subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout)
    text = open(lists[0]).read()
    need = re.search(r"cmake_minimum_required\(VERSION (\d+\.\d+)", text)
    if have and need and tuple(map(int, have.group(1).split("."))) < tuple(map(int, need.group(1).split("."))):
        text = text.replace(f"VERSION {need.group(1)}", f"VERSION {have.group(1)}", 1)
        open(lists[0], "w").write(text)
        info["cmake_minimum_lowered"] = f"{need.group(1)} -> {have.group(1)}"
    build = os.path.join(project, "build")
    os.makedirs(build)
    t0 = time.monotonic()
    for cmd in ([cmake, "..", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DCMAKE_BUILD_TYPE=Release"],
                ["make", f"-j{os.cpu_count() or 2}"]):
        proc = subprocess.run(cmd, cwd=build, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            print(json.dumps({"ok": False, "reason": f"{cmd[0]} failed (rc {proc.returncode})",
                              "log_tail": (proc.stdout + proc.stderr).strip().splitlines()[-15:], **info}))
            return
    info["build_s"] = time.monotonic() - t0
    libs = glob.glob(os.path.join(build, "*.so"))
    print("stage: built " + ", ".join(os.path.basename(p) for p in libs), flush=True)
    args, want = _inputs(model, workdir, dev)
    aoti = torch._C._aoti
    runner = (aoti.AOTIModelContainerRunnerCuda(libs[0], 1, "cuda") if dev == "cuda"
              else aoti.AOTIModelContainerRunnerCpu(libs[0], 1))
    print("stage: loaded", flush=True)
    with torch.no_grad():
        got = runner.run(list(args))
        if dev == "cuda":
            torch.cuda.synchronize()
    print(json.dumps({"ok": True, "max_abs_err": _max_err(got, want), **info}), flush=True)


# ------------------------------------------------------------------------------------ parent
def attempt(argv: list[str], timeout: float, env: dict | None = None, gdb: bool = False) -> dict:
    """Run one child; its stdout stages and JSON lines, exit status and stderr tail."""
    cmd = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__), *argv]
    if gdb:
        cmd = ["gdb", "-batch", "-ex", "run", "-ex", "bt 25", "--args", *cmd]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = "timeout", exc.stdout or "", exc.stderr or ""
        out, err = (out.decode() if isinstance(out, bytes) else out), (err.decode() if isinstance(err, bytes) else err)
    res: dict = {"rc": rc, "wall_s": round(time.monotonic() - t0, 1)}
    lines = [line for line in out.splitlines() if line.strip()]
    res["stages"] = [line[7:] for line in lines if line.startswith("stage: ")]
    for line in lines:
        if line.startswith("{"):
            try:
                res.update(json.loads(line))
            except json.JSONDecodeError:
                pass
    if gdb:  # the backtrace is on stdout
        res["backtrace"] = [line for line in lines if line.startswith("#")][:25]
    if rc != 0 or not res.get("ok", True):
        res["stderr_tail"] = err.strip().splitlines()[-15:]
    return res


def _default_ok(attempts: list, model: str) -> bool:
    return any(a["model"] == model and a["attempt"] == "default" and a.get("ok") for a in attempts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="linear,gemma_step")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--budget-s", type=float, default=170.0)
    ap.add_argument("--timeout-s", type=float, default=150.0, help="per attempt")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, model, *rest = args.child
        if kind == "compile":
            child_compile(model, args.workdir, args.device, "cpp_only" in rest)
        elif kind == "cpp_only":
            child_cpp_only(model, args.workdir, args.device, args.timeout_s)
        else:
            child_load(model, rest[0], args.workdir, args.device)
        return 0
    deadline = time.monotonic() + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="aoti_probe_")
    variants = [v for v in args.variants.split(",") if v]
    result = {"device": args.device, "api": api(), "attempts": []}

    def save():
        with open(os.path.join(args.out, "aoti_probe.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
    save()
    print(json.dumps(result["api"]), flush=True)
    common = ["--workdir", workdir, "--device", args.device, "--timeout-s", str(args.timeout_s)]
    for model in [m for m in args.models.split(",") if m]:
        jobs = [("compile", None)] + [("load", v) for v in variants]
        for kind, variant in jobs:
            rec: dict = {"model": model, "attempt": kind if variant is None else variant}
            result["attempts"].append(rec)
            left = deadline - time.monotonic()
            compiled = os.path.isfile(os.path.join(workdir, f"{model}.pt2"))
            if left < 10:
                rec["skipped"] = f"time budget ({left:.0f} s left)"
            elif kind == "load" and not compiled:
                rec["skipped"] = "the compile failed"
            elif variant == "gdb" and not shutil.which("gdb"):
                rec["skipped"] = "no gdb on PATH"
            elif variant == "gdb" and _default_ok(result["attempts"], model):
                rec["skipped"] = "default loaded and ran: no crash to trace"
            elif variant == "cpp_only" and not os.path.isfile(os.path.join(workdir, f"{model}_cpp.pt2")):
                rec["skipped"] = "no cpp-only package (its compile failed)"
            elif kind == "compile":
                rec.update(attempt(["--child", "compile", model, *(["cpp_only"] if "cpp_only" in variants else []),
                                    *common], min(args.timeout_s, left)))
            elif variant == "cpp_only":
                rec.update(attempt(["--child", "cpp_only", model, *common], min(args.timeout_s, left)))
            else:
                rec.update(attempt(["--child", "load", model, variant, *common], min(args.timeout_s, left),
                                   env=DEBUG_ENV if variant == "debug_env" else None, gdb=variant == "gdb"))
            print(json.dumps({k: v for k, v in rec.items() if k not in ("stderr_tail", "backtrace", "log_tail")}),
                  flush=True)
            if rec.get("rc") not in (0, None) or rec.get("ok") is False:
                print("\n".join(rec.get("stderr_tail", []) + rec.get("backtrace", []) + rec.get("log_tail", [])),
                      flush=True)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
