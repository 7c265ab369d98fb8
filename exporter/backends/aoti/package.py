"""Lower the rewritten step program to an AOTInductor package (``model.pt2``).

:func:`compile_package` takes the step ``ExportedProgram`` of
:func:`effexport.exporter.backends.exported.exported_step` (dynamic batch, new tokens and full-cache
lengths; the same re-export the ONNX lowering uses) and runs
``torch._inductor.aoti_compile_and_package`` on it. Inductor generates C++ (CPU) or Triton (CUDA)
kernels for the aten ops and a C++ wrapper; every ``effexport::*`` op stays one call of the
registered op: AOTInductor emits ``aoti_torch_proxy_executor_call_function`` for an op it has no
C shim for, and records the op and its arguments in ``*.wrapper.json`` inside the package (the
"extern kernel nodes"). At load time the package's proxy executor looks each op's schema up in
the dispatcher, so the process that loads a package must have imported
:mod:`effexport.custom_ops` first (``torch.library.custom_op`` registers from Python; without it
the load fails with "Could not find schema for effexport::attention_ring"), and the package cannot
run in a Python-free C++ process. On CUDA the ops dispatch to the Triton decode kernels when
:func:`effexport.custom_ops.enable_triton` has registered them.

Device: the package is compiled for the device asked for; the program, its weights and the
example ``pos`` are moved there first (``torch.export.passes.move_to_device_pass`` on a copy that
shares the weight tensors, so the cached re-export is left as it was). A CPU package is compiled with ``-march=native`` for this
machine's vector ISA (recorded in the package metadata and ``effexport.json``); it may not load on
a CPU without that ISA. Weights up to :data:`WEIGHTS_IN_SO_LIMIT` are embedded in the package's shared
object (Inductor's default); above it the package is compiled without them and they are saved next
to it as ``model.weights.pt`` (``torch.save`` of the name -> tensor dict, loaded back with
``weights_only=True`` and handed to the loaded package with ``load_constants``).

Sharded rank programs (``--tp N``): the ``_c10d_functional.all_reduce`` / ``wait_tensor`` calls
compile like any op Inductor knows (on the CPU, a call of the registered collective; checked on
torch 2.13 with gloo), but Inductor resolves each collective's process group by name while it
compiles (its graph-repro logging asks the group's size), and the build process has none:
"Could not resolve the process group registered under the name 0". :func:`compile_group` gives
the compile a fake process group (torch's ``fake`` backend: no communication) of the artifact's
world as the default group, named ``"0"`` like the real one each rank joins before it loads its
package; the package calls whatever group has that name when it runs.

Not deterministic: two builds of one program differ in ``.data/serialization_id`` (a random id
torch's archive writer gives every archive) and in the comments of the generated ``*.wrapper.cpp`` /
``*.kernel.cpp`` (Inductor appends the compile and link commands, with its cache directory's paths,
and appends them again on a cache hit). With a fresh Inductor cache directory per build (a new
temporary path each time) the kernel file name and the shared object differ too. The extern-kernel
JSON (the effexport op calls) and the package metadata were identical in every build compared
(six builds of gemma4-e2b:tiny on this machine, with shared and with fresh caches).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import warnings
import zipfile
from collections import Counter

import torch

from effexport.exporter.errors import BackendMissingError, LowerError
from effexport.passes.cache_plan import CachePlan

__all__ = ["PACKAGE_FILE", "WEIGHTS_FILE", "build_device", "check_compiler", "check_cuda", "compile_group",
           "compile_package", "custom_op_calls", "package_metadata", "aoti_step"]

PACKAGE_FILE = "model.pt2"


def build_device() -> str:
    """The device a build compiles for: ``cuda`` when torch sees a CUDA device, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


CUDA_OPT_IN = "EFFEXPORT_AOTI_CUDA"


def check_cuda() -> None:
    """CUDA packages compile, but loading one crashed torch's AOTInductor loader on an H200 (SIGSEGV
    in ``aoti_load_package``, torch 2.11+cu130), also for a package of a plain ``Linear`` without any
    effexport op (``bench/aoti_cuda_probe.py``; README, AOTInductor). A build on a machine where torch
    sees a GPU is refused with the workarounds, rather than crashing mid-build, unless
    ``EFFEXPORT_AOTI_CUDA=1`` asks to try."""
    if torch.cuda.is_available() and os.environ.get(CUDA_OPT_IN) != "1":
        raise BackendMissingError(
            "aoti CUDA packages crash torch's AOTInductor loader (measured: torch 2.11, CUDA 13, even for a "
            "package of a plain Linear); build a CPU package with CUDA_VISIBLE_DEVICES='' effexport ..., use "
            f"--target onnx, or set {CUDA_OPT_IN}=1 to try")


def check_compiler() -> None:
    """AOTInductor compiles its generated C++ with ``$CXX`` or ``g++`` (Inductor's search on Linux);
    refuse (exit 4) when neither is on ``PATH``."""
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise BackendMissingError(f"the aoti target needs a C++ compiler and {cxx!r} is not on PATH: "
                                  "apt-get install g++ (or set CXX to a C++17 compiler)")


def _program_for(program, plan: CachePlan, device: str):
    """The step ExportedProgram with everything on ``device``, ``pos`` included (the re-export
    makes its example ``pos`` a CPU tensor whatever the graph's device). ``move_to_device_pass``
    works in place, so it runs on a copy of the cached re-export that shares its weight tensors
    (no second copy of the weights; those on another device are copied over by the pass)."""
    from torch.export.passes import move_to_device_pass

    from effexport.exporter.backends.exported import exported_step

    ep = exported_step(program, plan)
    weights = [*ep.state_dict.values(), *ep.constants.values()]
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        # with a bare "cuda" the pass writes device=cuda into the graph's _assert_tensor_metadata
        # checks, and Inductor's cuda:0 tensors then fail them ("Expected: cuda, Got: cuda:0")
        target = torch.device("cuda", torch.cuda.current_device())
    return move_to_device_pass(copy.deepcopy(ep, {id(t): t for t in weights if isinstance(t, torch.Tensor)}), target)


WEIGHTS_IN_SO_LIMIT = 2 << 30  # bytes of weights above which they are saved beside the package
WEIGHTS_FILE = "model.weights.pt"


def _weights(ep) -> dict[str, torch.Tensor]:
    return {name: t for name, t in [*ep.state_dict.items(), *ep.constants.items()] if isinstance(t, torch.Tensor)}


def _weights_apart(ep) -> bool:
    """Whether the weights are saved beside the package rather than embedded in its library.
    Embedding gathers every weight into one host buffer and links it into the ``.so`` (9 GB for
    gemma4-e2b in bf16; the first real-size attempt on the GPU machine died without a message, later
    traced to the package loader, which crashes either way). Inductor's own on-disk format
    (``pickle_weights``) crashed the loaded package here (torch 2.13, SIGSEGV on the first call), so
    the weights go through ``load_constants`` instead."""
    return sum(t.untyped_storage().nbytes() for t in _weights(ep).values()) > WEIGHTS_IN_SO_LIMIT


@contextlib.contextmanager
def compile_group(world: int | None):
    """While compiling a rank program of ``world`` ranks (None: an unsharded program, nothing done):
    a fake default process group named ``"0"`` (module docstring), destroyed afterwards. A process
    that already has a default group (a build inside a distributed job) compiles against that one."""
    import torch.distributed as dist

    if world is None or dist.is_initialized():
        yield
        return
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 (registers the "fake" backend)

    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=world)
    try:
        name = dist.group.WORLD.group_name
        if name != "0":  # the rank programs' collectives name the default group "0"
            raise LowerError(f"the compile's default process group is named {name!r}, not '0': build the "
                             "sharded aoti artifact in a fresh process")
        yield
    finally:
        dist.destroy_process_group()


def compile_package(program, plan: CachePlan, path: str, device: str, world: int | None = None) -> dict:
    """Compile ``program`` (the rewritten step) into the AOTInductor package ``path`` (``*.pt2``)
    for ``device``; returns ``{"device", "pos_device", "metadata", "weights"}`` for ``effexport.json``
    (``weights``: the file beside the package holding them, or None when they are embedded).
    ``world``: the rank count of a sharded rank program (its all-reduces compile against a fake
    process group, :func:`compile_group`). Nothing is left at ``path`` when it fails (:class:`LowerError`)."""
    from effexport.exporter.capture import fast_export_config

    # the AOT compile re-traces the program with fake tensors, as export does (same settings); torch's
    # own pytree deprecation warning (LeafSpec, from copying and tracing the program) is noise for a user
    with fast_export_config(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
        ep = _program_for(program, plan, device)
        apart = _weights_apart(ep)
        weights_path = os.path.join(os.path.dirname(path), WEIGHTS_FILE)
        try:
            with compile_group(world):
                torch._inductor.aoti_compile_and_package(
                    ep, package_path=path,
                    inductor_configs={"aot_inductor.package_constants_in_so": False} if apart else {})
            if apart:
                torch.save(_weights(ep), weights_path)
        except Exception as exc:  # Inductor and the C++ compiler raise many types
            for written in (path, weights_path):
                if os.path.exists(written):
                    os.unlink(written)
            raise LowerError(f"AOTInductor could not compile the step program: {type(exc).__name__}: "
                             f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from exc
    pos_device = ep.example_inputs[0][1].device.type
    return {"device": device, "pos_device": pos_device, "metadata": package_metadata(path),
            "weights": WEIGHTS_FILE if apart else None}


def _members(path: str, suffix: str) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(n, zf.read(n)) for n in sorted(zf.namelist()) if n.endswith(suffix)]


def package_metadata(path: str) -> dict:
    """The package's ``AOTI_*`` metadata (device key, CPU ISA, compute capability), read from the
    archive without loading it."""
    found = _members(path, ".wrapper_metadata.json")
    return json.loads(found[0][1]) if found else {}


def custom_op_calls(path: str) -> Counter:
    """``Counter`` of the ops the package calls through the proxy executor (its extern kernel
    nodes), e.g. ``{"effexport::attention_ring": 4, ...}``."""
    calls = Counter()
    for _, data in _members(path, ".wrapper.json"):
        calls.update(n["node"]["target"] for n in json.loads(data)["nodes"])
    return calls


def aoti_step(program, plan: CachePlan, package_path: str, device: str = "cuda"):
    """Compile ``program`` to ``package_path`` and return ``step(input_ids, pos, *caches) ->
    (logits, *presents)`` on ``device``: the loaded package, with ``pos`` (an int or 0-d tensor)
    put where the package expects it. For ``bench/decode_step.py`` and other in-process callers."""
    from effexport.exporter.backends.aoti.runtime import load_package

    info = compile_package(program, plan, package_path, device)
    model = load_package(package_path, device, info["weights"])
    pos_device = torch.device(info["pos_device"])

    def step(input_ids, pos, *caches):
        pos = torch.as_tensor(pos, dtype=torch.int64).to(pos_device)
        return model(input_ids.contiguous(), pos, *(c.contiguous() for c in caches))
    return step
