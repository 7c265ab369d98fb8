"""torch backend (``--target torch``): the rewritten step program saved as a ``torch.export`` archive
(``program.pt2``) and run by torch itself -- compiled by Inductor with the ``effexport`` ops as opaque
custom ops (Triton kernels on CUDA), decode replayed from CUDA graphs.

* :mod:`.artifact`: :func:`~.artifact.save_program` (the build's lowering) and what the program calls.
* :mod:`.engine`: :class:`~.engine.TorchEngine`, eager / compiled execution and the CUDA-graph decode
  of any step program (also used in-process by ``bench/torch_engine.py``).
* :mod:`.runtime`: :class:`~.runtime.TorchRuntime`, an artifact loaded for ``step`` / ``generate``.
"""
from effexport.exporter.backends.torch.artifact import PROGRAM_FILE, op_calls, save_program
from effexport.exporter.backends.torch.engine import FIXED_KINDS, TorchEngine, on_device

__all__ = ["FIXED_KINDS", "PROGRAM_FILE", "TorchEngine", "on_device", "op_calls", "save_program"]
