"""``--target torch``: the rewritten step program saved as a ``torch.export`` archive (``program.pt2``,
:mod:`.artifact`), run by :class:`~.runtime.TorchRuntime` -- Inductor with CUDA-graph decode on CUDA,
the exported module uncompiled on the CPU (:mod:`.engine`); no ONNX."""
from __future__ import annotations

import os

import torch

from effexport.exporter.backends.base import Backend, Lowered


def check() -> None:
    """Nothing beyond torch: the archive is written by ``torch.export.save``."""


def runs_on() -> str:
    """What runs a torch artifact's parity here (:class:`~.runtime.TorchRuntime`'s defaults)."""
    return ("torch CUDA, Inductor + CUDA graphs" if torch.cuda.is_available()
            else "torch CPU, the exported module uncompiled")


def stage(opts) -> str:  # noqa: ARG001 (the Backend interface)
    return "save the step program (torch.export archive)"


def lower(program, plan, directory: str, opts) -> Lowered:  # noqa: ARG001 (the Backend interface)
    from effexport.exporter.backends.torch.artifact import PROGRAM_FILE, save_program

    info = save_program(program, plan, os.path.join(directory, PROGRAM_FILE))
    return Lowered({"step": PROGRAM_FILE}, None, None, PROGRAM_FILE, runs_on(), {"torch": info})


def open_runtime(artifact_dir: str):
    from effexport.exporter.backends.torch.runtime import TorchRuntime

    return TorchRuntime(artifact_dir)


BACKEND = Backend("torch", "torch.export program (program.pt2) run by torch: Inductor-compiled with CUDA-graph "
                  "decode on CUDA, the exported module as it is on the CPU (TorchRuntime)",
                  "torch.export", check, stage, lower, open_runtime)
