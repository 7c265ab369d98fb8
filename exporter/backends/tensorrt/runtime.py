"""``TrtRuntime``: drive a TensorRT engine artifact the way :class:`effexport.runtime.OrtRuntime`
drives an ONNX Runtime session -- same ``initial_caches`` / ``step`` / ``generate`` interface,
caches by the CachePlan in ``effexport.json``, so :func:`effexport.exporter.verify.parity.check_parity`
runs unchanged against it.

Buffers are CUDA tensors (torch); inputs TensorRT treats as shape tensors (``pos`` when it feeds
shape arithmetic) stay in host memory, as the TensorRT 10 API requires. Outputs are sized from
``context.get_tensor_shape`` once every input shape is set; zero-size tensors (the empty full
caches of a prefill) get a one-element buffer so that no address is null.

Unverified: needs TensorRT and a CUDA device (neither exists on this project's machines).
"""
from __future__ import annotations

import os

import numpy as np

from effexport.exporter.errors import BackendMissingError
from effexport.exporter.backends.artifact import (StepResult, in_pieces, load_manifest, numpy_caches, pieces_needed,
                                               plan_entries)
from effexport.exporter.backends.onnx.runtime import OrtRuntime

__all__ = ["TrtRuntime"]


class TrtRuntime:
    """A TensorRT execution context over an artifact's serialized engine."""

    generate = OrtRuntime.generate

    def __init__(self, artifact_dir: str):
        try:
            import tensorrt as trt
            import torch
        except ImportError:
            raise BackendMissingError("TensorRT is not installed: pip install 'effexport[tensorrt]' "
                                      "(NVIDIA GPU machines only)") from None
        if not torch.cuda.is_available():
            raise BackendMissingError("a TensorRT engine needs an NVIDIA GPU; none is visible to torch")
        self.manifest = load_manifest(artifact_dir)
        self.entries = plan_entries(self.manifest)
        if self.manifest.get("plugins"):
            from effexport.exporter.backends.tensorrt.plugins import register_plugins

            register_plugins()
        with open(os.path.join(artifact_dir, self.manifest["files"]["step"]), "rb") as f:
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
        self.context = self.engine.create_execution_context()
        self.input_names, self.output_names = self.manifest["inputs"], self.manifest["outputs"]
        self._torch, self._stream = torch, torch.cuda.Stream()

    def _bind(self, name: str, tensor) -> None:
        torch = self._torch
        if self.engine.is_shape_inference_io(name):
            tensor = tensor.cpu()
        elif tensor.numel() == 0:
            tensor = torch.empty(1, dtype=tensor.dtype, device="cuda")
        self._keep.append(tensor)
        self.context.set_tensor_address(name, tensor.data_ptr())

    def initial_caches(self, batch: int) -> list[np.ndarray]:
        """The plan's prefill caches as numpy arrays."""
        return numpy_caches(self.entries, batch)

    def step(self, input_ids: np.ndarray, pos: int, caches: list[np.ndarray]) -> StepResult:
        """One engine call: set input shapes and addresses, allocate outputs, run, copy back (more
        than the manifest's ``max_step_tokens`` new tokens: one call per piece)."""
        if pieces_needed(self.manifest, input_ids):
            return in_pieces(self.step, self.manifest["max_step_tokens"], input_ids, pos, caches)
        torch = self._torch
        feeds = [torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)), torch.tensor(pos)]
        feeds += [torch.from_numpy(np.ascontiguousarray(c)) for c in caches]
        self._keep = []
        for name, tensor in zip(self.input_names, feeds):
            tensor = tensor.cuda()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self._bind(name, tensor)
        outputs = []
        for name in self.output_names:
            dtype = getattr(torch, str(np.dtype(self.engine.get_tensor_dtype(name).nptype())))
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            outputs.append(out)
            self._bind(name, out)
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        self._stream.synchronize()
        arrays = [o.cpu().numpy() for o in outputs]
        return StepResult(arrays[0], arrays[1:])
