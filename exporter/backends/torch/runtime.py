"""``TorchRuntime``: drive a ``--target torch`` artifact the way :class:`effexport.runtime.OrtRuntime`
drives an ONNX one -- ``initial_caches`` / ``step`` / ``generate`` on numpy arrays (what
:func:`effexport.exporter.verify.parity.check_parity` uses) -- plus a torch path
(:meth:`TorchRuntime.initial_caches_torch`, :meth:`TorchRuntime.step_torch`) whose caches stay on
the device between steps.

Loading imports :mod:`effexport.custom_ops` (the archive calls the ops by name), reads
``program.pt2`` with ``torch.export.load``, moves it to the device and hands it to a
:class:`~.engine.TorchEngine`: on CUDA compiled by Inductor with CUDA-graph decode by default, on
the CPU the exported module run as it is (Inductor on the CPU works too, ``compile=True``, but
compiling a prefill and a decode shape took minutes per model on 2 CPU cores).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from effexport.exporter.errors import LoadError
from effexport.exporter.backends.artifact import (StepResult, in_pieces, load_manifest, numpy_caches, pieces_needed,
                                               plan_entries, refuse_sharded)
from effexport.exporter.backends.onnx.runtime import OrtRuntime
from effexport.exporter.backends.torch.artifact import op_calls
from effexport.exporter.backends.torch.engine import TorchEngine, on_device

__all__ = ["TorchRuntime", "load_program"]


def load_program(path: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` of an artifact's program after registering the effexport ops."""
    import effexport.custom_ops  # noqa: F401  (registers every effexport op the archive names)

    if not os.path.isfile(path):
        raise LoadError(f"{path} is missing: copy the whole artifact directory, or rebuild with --target torch")
    try:
        return torch.export.load(path)
    except Exception as exc:  # a damaged archive raises many types
        raise LoadError(f"{path} is not a readable torch.export archive ({type(exc).__name__}: "
                        f"{(str(exc).strip().splitlines() or [''])[0][:200]}); rebuild with --target torch") from exc


class TorchRuntime:
    """A ``--target torch`` artifact loaded on ``device`` (default: CUDA when torch sees it); ``compile``,
    ``cuda_graphs``, ``inplace``, ``pack`` and ``tune`` are :class:`~.engine.TorchEngine`'s. :attr:`op_calls`:
    the effexport ops the program calls (``artifact.op_calls``)."""

    generate = OrtRuntime.generate  # greedy loop over step / initial_caches

    def __init__(self, artifact_dir: str, device: str | None = None, compile: bool | None = None,
                 cuda_graphs: bool | None = None, inplace: bool = True, pack: bool = True, tune: bool = False):
        self.manifest = load_manifest(artifact_dir)
        self.entries = plan_entries(self.manifest)
        info = self.manifest.get("torch")
        refuse_sharded(artifact_dir, self.manifest)
        if self.manifest.get("weights") == "none":
            raise LoadError(f"{artifact_dir!r} is structure-only (built with --weights none): its program holds "
                            "meta placeholders, no weights, so it cannot run; build it with weights")
        if not info or self.manifest.get("target") != "torch":
            raise LoadError(f"{artifact_dir!r} is not a torch artifact (effexport.json has no 'torch' entry); "
                            "rebuild it with 'effexport MODEL --target torch'")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        ep = load_program(os.path.join(artifact_dir, self.manifest["files"]["step"]))
        if self.device.type != "cpu":
            ep = on_device(ep, self.device)
        self.op_calls = op_calls(ep)
        # the engine runs its own module of the program; the ExportedProgram is not kept, so the weights
        # its packed projections replaced are freed (held by the program too, they would count twice)
        self.engine = TorchEngine(ep, self.entries, self.device, compile=compile, cuda_graphs=cuda_graphs,
                                  inplace=inplace, pack=pack, tune=tune)
        del ep
        self.input_names, self.output_names = self.manifest["inputs"], self.manifest["outputs"]

    def initial_caches(self, batch: int) -> list:
        """The plan's prefill caches as numpy arrays; bf16 caches, which numpy cannot hold, as CPU
        tensors (:meth:`step` takes either)."""
        if any(e.dtype == "bfloat16" for e in self.entries):
            return [_host(e.empty(batch)) for e in self.entries]
        return numpy_caches(self.entries, batch)

    def initial_caches_torch(self, batch: int) -> list[torch.Tensor]:
        """The plan's prefill caches as tensors on the runtime's device."""
        return self.engine.initial_caches(batch)

    def step_torch(self, input_ids: torch.Tensor, pos, caches: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step on the device (:meth:`.engine.TorchEngine.step`: the buffer caches given are
        written in place and returned; with CUDA graphs the returned logits and caches are the
        graph's static tensors, reused by the next decode step). More than
        the manifest's ``max_step_tokens`` new tokens run in pieces, each on the caches the previous
        one returned (the logits concatenated: a fresh tensor)."""
        if pieces_needed(self.manifest, input_ids):
            result = in_pieces(lambda *a: StepResult(*self.step_torch(*a)), self.manifest["max_step_tokens"],
                               input_ids, int(pos), caches)
            return result.logits, result.caches
        return self.engine.step(input_ids, pos, caches)

    def step(self, input_ids: np.ndarray, pos: int, caches: list) -> StepResult:
        """One step on numpy arrays (copied to and from the device; :meth:`step_torch` feeds a long
        step in pieces). bf16 logits come back as float32 numpy, bf16 caches as CPU tensors. The
        caller's caches are never written: the engine's in-place buffers (:attr:`.engine.TorchEngine.inplace`)
        get copies where they would otherwise share the caller's memory (a CPU engine)."""
        tensors = [c if isinstance(c, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(c)) for c in caches]
        tensors = [t.clone() if i in self.engine.aliased and t.device.type == self.engine.device.type else t
                   for i, t in enumerate(tensors)]
        logits, presents = self.step_torch(torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)), pos,
                                           tensors)
        return StepResult(_host(logits.float()), [_host(c) for c in presents])


def _host(t: torch.Tensor):
    """``t`` on the host: a numpy array, or a CPU tensor where numpy has no such dtype (bf16)."""
    t = t.detach().cpu()
    return t if t.dtype == torch.bfloat16 else t.numpy()
