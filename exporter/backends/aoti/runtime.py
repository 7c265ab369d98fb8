"""``AotiRuntime``: drive an AOTInductor package artifact (``--target aoti``) the way
:class:`effexport.runtime.OrtRuntime` drives an ONNX Runtime session -- same ``initial_caches`` /
``step`` / ``generate`` interface on numpy arrays (what :func:`effexport.exporter.verify.parity.check_parity`
uses), plus a torch path (:meth:`AotiRuntime.initial_caches_torch`, :meth:`AotiRuntime.step_torch`)
whose caches stay on the device between steps, for a GPU deployment or a benchmark.

Loading imports :mod:`effexport.custom_ops` first (the package calls the ``effexport`` ops through
the dispatcher, see :mod:`.package`) and, on CUDA, registers the Triton decode kernels
(:func:`effexport.custom_ops.enable_triton`) when Triton is importable.

The compiled code reads its inputs with the strides of the example it was compiled with (contiguous)
and does not check them: a strided view (``ids[:, :8]``) gives wrong numbers without an error, so
every input is made contiguous here.

Verified on the CPU (tests/test_aoti.py). On an H200 (torch 2.11+cu130) a CUDA package of gemma4-e2b
compiled but ``aoti_load_package`` segfaulted loading it (README, AOTInductor): the CUDA path is not
working yet.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from effexport.exporter.errors import BackendMissingError, LoadError
from effexport.exporter.backends.artifact import (StepResult, in_pieces, load_manifest, numpy_caches, pieces_needed,
                                               plan_entries, refuse_sharded)
from effexport.exporter.backends.onnx.runtime import OrtRuntime

__all__ = ["AotiRuntime", "load_package"]


def load_package(path: str, device: str, weights: str | None = None):
    """``torch._inductor.aoti_load_package`` after what the package needs in this process: the
    effexport ops registered, and on CUDA the Triton kernels when Triton is installed. ``weights``:
    the file (beside the package) holding the weights of a package compiled without them."""
    import effexport.custom_ops as ops  # registers every effexport op (the package resolves them by name)

    if device == "cuda":
        if not torch.cuda.is_available():
            raise BackendMissingError(f"{path} is a CUDA package and torch sees no CUDA device; run it on an "
                                      "NVIDIA GPU machine or rebuild with --target aoti on this one (CPU)")
        if importlib.util.find_spec("triton") is not None:
            ops.enable_triton()
    model = torch._inductor.aoti_load_package(path)
    if weights:
        weights_path = os.path.join(os.path.dirname(path), weights)
        if not os.path.isfile(weights_path):
            raise LoadError(f"{weights_path} is missing: this package was compiled without its weights, "
                            "which live in that file; copy the whole artifact directory")
        state = torch.load(weights_path, map_location=device, weights_only=True, mmap=True)
        # only the constants the compiled program kept (Inductor folds some buffers into its code)
        model.load_constants({name: state[name] for name in model.get_constant_fqns()}, check_full_update=True)
    return model


class AotiRuntime:
    """A loaded AOTInductor package over an artifact's step program."""

    generate = OrtRuntime.generate  # greedy loop over step / initial_caches

    def __init__(self, artifact_dir: str, device: str | None = None):
        self.manifest = load_manifest(artifact_dir)
        refuse_sharded(artifact_dir, self.manifest)
        self.entries = plan_entries(self.manifest)
        info = self.manifest.get("aoti")
        if not info:
            raise LoadError(f"{artifact_dir!r} is not an aoti artifact (effexport.json has no 'aoti' entry); "
                            "rebuild it with 'effexport MODEL --target aoti'")
        built = info["device"]
        if device not in (None, built):
            raise LoadError(f"{artifact_dir!r} was compiled for {built} and an AOTInductor package runs only on "
                            f"that device; rebuild it with --target aoti on a {device} machine")
        self.device = torch.device(built)
        self.pos_device = torch.device(info["pos_device"])
        self.input_names, self.output_names = self.manifest["inputs"], self.manifest["outputs"]
        self.model = load_package(os.path.join(artifact_dir, self.manifest["files"]["step"]), built,
                                  info.get("weights"))

    def initial_caches(self, batch: int) -> list[np.ndarray]:
        """The plan's prefill caches as numpy arrays."""
        return numpy_caches(self.entries, batch)

    def initial_caches_torch(self, batch: int) -> list[torch.Tensor]:
        """The plan's prefill caches as tensors on the package's device."""
        return [e.empty(batch, self.device) for e in self.entries]

    def step_torch(self, input_ids: torch.Tensor, pos, caches: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step on the device: ``input_ids [B, T]`` at positions ``pos..pos+T-1`` (an int or
        0-d tensor) over ``caches``; returns logits and the caches for the next step (device tensors).
        More than the manifest's ``max_step_tokens`` new tokens run in pieces."""
        if pieces_needed(self.manifest, input_ids):
            result = in_pieces(lambda *a: StepResult(*self.step_torch(*a)), self.manifest["max_step_tokens"],
                               input_ids, int(pos), caches)
            return result.logits, result.caches
        pos = torch.as_tensor(pos, dtype=torch.int64).to(self.pos_device)
        feeds = [input_ids.to(self.device, torch.int64).contiguous(), pos]
        feeds += [c.to(self.device).contiguous() for c in caches]
        outs = self.model(*feeds)
        return outs[0], list(outs[1:])

    def step(self, input_ids: np.ndarray, pos: int, caches: list[np.ndarray]) -> StepResult:
        """One step on numpy arrays (copied to and from the device); numpy has no bfloat16, so a
        bf16 program goes through :meth:`step_torch` (which feeds a long step in pieces)."""
        logits, presents = self.step_torch(torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)), pos,
                                           [torch.from_numpy(np.ascontiguousarray(c)) for c in caches])
        return StepResult(logits.cpu().numpy(), [c.cpu().numpy() for c in presents])
