"""``effexport.runtime.CudaGraphRuntime``: decode steps replayed from CUDA graphs.

ONNX Runtime's CUDA execution provider can capture one run of a session into a CUDA graph
(``enable_cuda_graph``) and replay it: one launch for the whole step instead of one per node, which
is what a decode step of a few thousand small kernels is bound by. A replay relaunches the recorded
kernels on the recorded memory, so this runtime owns, per batch size, every tensor a decode step
reads or writes and keeps it at one address:

* ``input_ids [B, 1]`` and ``pos`` (0-d int64) on the device, overwritten before each step;
  ``pos_host`` (the host copy GroupQueryAttention's ``total_sequence_length`` reads) beside them;
* the caches: full ``buffer`` caches and GroupQueryAttention's windowed caches (the model's
  ``effexport.in_place`` metadata) are bound as their own present and written in place; every
  other kind (slot rings, states: a few rows each) has a present of its own that is copied back into
  its past after the step (one fused device copy). Slot rings stay out of place because a ring's
  past is also read by KV-sharing consumers after its producer's write;
* the logits ``[B, 1, V]``.

``initial_caches(B)`` resets that batch size's caches and returns them; every step returns those
same tensors, and a step given other caches copies them in first. One-token steps run as graph
``B`` (ONNX Runtime runs the first two of each graph normally, captures the third and replays from
then on) through the artifact's one-token decode graph where it has one (``decode.onnx``, sharing
the weights with ``model.onnx``: :class:`~.runtime.OrtRuntime`); prefill and other multi-token steps
run uncaptured (``gpu_graph_id = -1``) on the same memory, a chunk at ``pos > 0`` with ``B > 1`` one
row at a time (GroupQueryAttention refuses it batched). :meth:`generate` keeps the greedy loop on the
device: the next token goes from the logits' argmax into ``input_ids`` without a trip through the host.

Requirements, checked when the runtime opens: every cache has a fixed shape (no growing ``full``
cache: build with ``--kv-cache buffer``), the step reads ``pos`` on the device only (the model's
``effexport.device_positions`` metadata, written by the ``ort`` and ``standard`` lowerings), caches
batch-major. On a CPU (``device="cpu"``, where the tests run) the same bindings run without capture.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from effexport.exporter.errors import LoadError
from effexport.exporter.backends.artifact import StepResult, in_pieces, pieces_needed
from effexport.exporter.backends.onnx.host_positions import DEVICE_POSITIONS
from effexport.exporter.backends.onnx.profiles import recorded
from effexport.exporter.backends.onnx.runtime import OrtRuntime, _bind

__all__ = ["CudaGraphRuntime"]


TORCH_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
               "tensor(bfloat16)": torch.bfloat16}


@dataclass
class _Slot:
    """The memory of one batch size: what a captured graph reads and writes."""

    ids: torch.Tensor
    pos: torch.Tensor
    pos_host: np.ndarray
    pasts: list
    presents: list  # None where the past is its own present
    logits: torch.Tensor
    binding: object = None


class CudaGraphRuntime(OrtRuntime):
    """An :class:`~effexport.exporter.backends.onnx.runtime.OrtRuntime` whose decode steps replay CUDA graphs."""

    def __init__(self, artifact_dir: str, device: str = "cuda", threads: int | None = None, capture: bool = True,
                 session_options=None, mem_reuse: bool | None = None):
        """``capture=False`` runs the same bindings without CUDA graphs (to measure what they save);
        ``session_options`` and ``mem_reuse`` as for :class:`OrtRuntime`."""
        self._slots: dict[int, _Slot] = {}
        self.capture = capture and device == "cuda"
        super().__init__(artifact_dir, device=device, threads=threads, io_binding=True,
                         session_options=session_options, mem_reuse=mem_reuse)
        self._check_fixed()
        meta = self.session.get_outputs()[0]
        self.logits_dtype = TORCH_TYPES.get(meta.type)
        self.vocab = meta.shape[-1]
        if self.logits_dtype is None or not isinstance(self.vocab, int):
            raise LoadError(f"the step model's logits ({meta.type}, {meta.shape}) need a float type and a static "
                            "vocabulary size for a CUDA graph; rebuild the artifact with this effexport version")
        self._decode_options = {}

    # -------------------------------------------------------------------------------- opening
    def _providers(self, ort, device: str) -> list:
        providers = super()._providers(ort, device)
        if self.capture:
            self._check_device_positions()
            name, options = providers[0]
            providers[0] = (name, {**options, "enable_cuda_graph": "1"})
        return providers

    def _check_device_positions(self) -> None:
        import onnx

        files = self.manifest["files"]
        for path in [os.path.join(self.artifact_dir, files[k]) for k in ("step", "decode") if files.get(k)]:
            meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
            if meta.get(DEVICE_POSITIONS) == "true":
                continue
            raise LoadError(f"{self.artifact_dir}: the step reads its position on the host, so a CUDA graph "
                            "would replay a stale one; rebuild with this effexport version (--profile ort)")

    def _check_fixed(self) -> None:
        growing = [e.name for e in self.entries if "seq" in e.shape]
        if growing:
            raise LoadError(f"{self.artifact_dir}: caches {', '.join(growing[:3])} grow every step, and a CUDA "
                            "graph needs fixed shapes; rebuild with --kv-cache buffer")
        if any(e.shape[0] != "batch" for e in self.entries):
            raise LoadError(f"{self.artifact_dir}: a cache is not batch-major; CUDA graphs need batch-major caches")

    # ---------------------------------------------------------------------------------- memory
    def _slot(self, batch: int) -> _Slot:
        if batch not in self._slots:
            dev = self.device
            pasts = [e.empty(batch, dev) for e in self.entries]
            self._slots[batch] = _Slot(
                ids=torch.zeros(batch, 1, dtype=torch.int64, device=dev),
                pos=torch.zeros((), dtype=torch.int64, device=dev), pos_host=np.zeros((), dtype=np.int64),
                pasts=pasts, presents=[None if in_place else torch.zeros_like(p)
                                       for in_place, p in zip(self.in_place, pasts)],
                logits=torch.zeros(batch, 1, self.vocab, dtype=self.logits_dtype, device=dev))
        return self._slots[batch]

    def initial_caches(self, batch: int) -> list:
        """This batch size's caches, reset to the plan's prefill values (device tensors)."""
        slot = self._slot(batch)
        for entry, past in zip(self.entries, slot.pasts):
            past.copy_(entry.empty(batch))
        return slot.pasts

    def _adopt(self, slot: _Slot, caches: list) -> None:
        """Copy caches that are not the slot's own into it (a step given another runtime's caches)."""
        for i, (mine, given) in enumerate(zip(slot.pasts, caches)):
            if given is not mine:
                mine.copy_(given if isinstance(given, torch.Tensor) else torch.from_numpy(np.asarray(given)))

    def _bind_all(self, binding, slot: _Slot, rows: slice, ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Bind every input and output of one run to the slot's memory (rows ``rows`` of it)."""
        _bind(binding.bind_input, "input_ids", ids)
        _bind(binding.bind_input, "pos", slot.pos)
        if "pos_host" in self.input_names:
            binding.bind_cpu_input("pos_host", slot.pos_host)
        for name, past in zip(self.cache_names, slot.pasts):
            _bind(binding.bind_input, name, past[rows])
        _bind(binding.bind_output, self.output_names[0], logits)
        for name, past, present in zip(self.output_names[1:], slot.pasts, slot.presents):
            _bind(binding.bind_output, name, (past if present is None else present)[rows])

    def _copy_back(self, slot: _Slot) -> None:
        pairs = [(p, q) for p, q in zip(slot.pasts, slot.presents) if q is not None]
        if pairs:
            torch._foreach_copy_([p for p, _ in pairs], [q for _, q in pairs])

    # ------------------------------------------------------------------------------------ steps
    def _decode_run(self, slot: _Slot, batch: int) -> None:
        """One captured (or capturing) one-token run on the slot's memory."""
        session = self.session_for(1)  # the decode graph where the artifact has one
        if slot.binding is None:
            slot.binding = session.io_binding()
            self._bind_all(slot.binding, slot, slice(None), slot.ids, slot.logits)
        if self.device == "cuda":
            torch.cuda.synchronize()  # the inputs written on torch's stream, before ORT's stream reads them
        session.run_with_iobinding(slot.binding, self._run_options(batch))
        self._copy_back(slot)

    def _run_options(self, graph_id: int):
        if not self.capture:
            return None
        if graph_id not in self._decode_options:
            options = self.ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._decode_options[graph_id] = options
        return self._decode_options[graph_id]

    def _chunk_run(self, slot: _Slot, ids: torch.Tensor, rows: slice) -> torch.Tensor:
        """An uncaptured multi-token run over rows ``rows`` of the slot's memory; returns the logits."""
        logits = torch.empty(ids.shape[0], ids.shape[1], self.vocab, dtype=self.logits_dtype, device=self.device)
        session = self.session_for(ids.shape[1])
        binding = session.io_binding()
        self._bind_all(binding, slot, rows, ids, logits)
        if self.device == "cuda":
            torch.cuda.synchronize()
        session.run_with_iobinding(binding, self._run_options(-1))
        return logits

    def step(self, input_ids: np.ndarray, pos: int, caches: list) -> StepResult:
        """One step at ``pos..pos+T-1``; returns the logits (host, float32) and this batch size's caches
        (more than the manifest's ``max_step_tokens`` new tokens: one call per piece)."""
        if pieces_needed(self.manifest, input_ids):
            return in_pieces(self.step, self.manifest["max_step_tokens"], input_ids, pos, caches)
        batch, new = np.shape(input_ids)
        self._check_room(pos, new)
        slot = self._slot(batch)
        self._adopt(slot, caches)
        ids = torch.as_tensor(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        if new == 1:
            return StepResult(self.decode_step(ids, pos).float().cpu().numpy(), slot.pasts)
        slot.pos.fill_(pos)
        slot.pos_host[...] = pos
        profile = recorded(self.manifest.get("profile"))
        if batch > 1 and pos > 0 and profile is not None and profile.gqa_rows:  # GQA: one row at a time
            logits = torch.cat([self._chunk_run(slot, ids[i:i + 1], slice(i, i + 1)) for i in range(batch)])
        else:
            logits = self._chunk_run(slot, ids, slice(None))
        self._copy_back(slot)
        return StepResult(logits.float().cpu().numpy(), slot.pasts)

    def decode_step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """One token per row at position ``pos`` over this batch size's caches (as the previous step
        left them), everything on the device: ``token [B, 1]`` int64 (e.g. the previous logits'
        argmax) in, the logits ``[B, 1, V]`` out -- the runtime's own tensor, overwritten by the next
        step (clone it to keep it)."""
        batch = token.shape[0]
        self._check_room(pos, 1)
        slot = self._slot(batch)
        slot.ids.copy_(token)
        slot.pos.fill_(pos)
        slot.pos_host[...] = pos
        self._decode_run(slot, batch)
        return slot.logits

    def generate(self, input_ids: np.ndarray, max_new_tokens: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Greedy generation with the loop on the device: returns (tokens [B, max_new_tokens], the
        last-position logits of the prefill and of every decode step, float32 on the host)."""
        batch, length = np.shape(input_ids)
        self._check_room(0, length + max_new_tokens - 1)
        result = self.step(input_ids, 0, self.initial_caches(batch))
        last = [torch.from_numpy(result.logits[:, -1]).to(self.device)]
        tokens = []
        for i in range(max_new_tokens):
            tokens.append(last[-1].argmax(-1))
            if i == max_new_tokens - 1:
                break
            last.append(self.decode_step(tokens[-1][:, None], length + i)[:, -1].to(torch.float32, copy=True))
        return (torch.stack(tokens, 1).cpu().numpy().astype(np.int64),
                [x.cpu().numpy() for x in last])
