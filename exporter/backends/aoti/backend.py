"""``--target aoti``: the step program compiled by AOTInductor into ``model.pt2`` (:mod:`.package`),
run by :class:`~.runtime.AotiRuntime`; no ONNX."""
from __future__ import annotations

import os

from effexport.exporter.backends.base import Backend, Lowered


def check() -> None:
    """A C++ compiler is here, and a CUDA build is opted into (:func:`~.package.check_cuda`)."""
    from effexport.exporter.backends.aoti.package import check_compiler, check_cuda

    check_compiler()
    check_cuda()


def stage(opts) -> str:  # noqa: ARG001 (the Backend interface)
    from effexport.exporter.backends.aoti.package import build_device

    device = build_device()
    return f"compile with AOTInductor for {device}" + (
        "" if device == "cuda" else " (torch sees no CUDA device: this is a CPU package)")


def lower(program, plan, directory: str, opts) -> Lowered:  # noqa: ARG001 (the Backend interface)
    from effexport.exporter.backends.aoti.package import PACKAGE_FILE, WEIGHTS_FILE, build_device, compile_package

    aoti = compile_package(program, plan, os.path.join(directory, PACKAGE_FILE), build_device(),
                           getattr(opts, "tp", None))  # a rank program of --tp N: its collectives' group
    files = {"step": PACKAGE_FILE, **({"weights": WEIGHTS_FILE} if aoti["weights"] else {})}
    return Lowered(files, None, None, f"{PACKAGE_FILE}, {aoti['device']}", f"AOTInductor {aoti['device']}",
                   {"aoti": aoti})


def open_runtime(artifact_dir: str):
    from effexport.exporter.backends.aoti.runtime import AotiRuntime

    return AotiRuntime(artifact_dir)


BACKEND = Backend("aoti", "AOTInductor package (model.pt2) for torch-native deployment; CPU (CUDA only with "
                  "EFFEXPORT_AOTI_CUDA=1: torch's loader crashed on CUDA packages) (needs a C++ compiler)",
                  "AOTInductor", check, stage, lower, open_runtime)
