"""AOTInductor backend (``--target aoti``): the rewritten step program compiled by
``torch._inductor.aoti_compile_and_package`` into ``model.pt2``, for torch-native deployment.

* :mod:`.package`: the lowering (:func:`~.package.compile_package`), what a package calls
  (:func:`~.package.custom_op_calls`), and :func:`~.package.aoti_step` for in-process callers
  (``bench/decode_step.py``). Its docstring says how the ``effexport`` ops are called from the
  package, what a loading process must import, and why two builds are not byte-identical.
* :mod:`.runtime`: :class:`~.runtime.AotiRuntime` (``initial_caches`` / ``step`` / ``generate`` like
  :class:`effexport.runtime.OrtRuntime`, plus ``step_torch`` with caches kept on the device).

``--tp N``: each rank's program compiled the same way into ``rank{r}/model.pt2``; its all-reduces
compile against a fake process group named "0" (:func:`~.package.compile_group`) and run on the
real one each rank joins (:func:`effexport.exporter.backends.torch.sharded.open_rank`).

Needs a C++ compiler (``g++`` or ``$CXX``) to build; builds for CUDA when torch sees a GPU, else for
the CPU. Verified on the CPU (``tests/test_aoti.py``). On an H200 (torch 2.11) a CUDA package compiles
but torch's loader segfaults on it (README, AOTInductor), so a build where torch sees a GPU is refused
unless ``EFFEXPORT_AOTI_CUDA=1`` (:func:`~.package.check_cuda`).
"""
from effexport.exporter.backends.aoti.package import (PACKAGE_FILE, WEIGHTS_FILE, aoti_step, build_device,
                                             check_compiler, check_cuda, compile_package, custom_op_calls)

__all__ = ["PACKAGE_FILE", "WEIGHTS_FILE", "aoti_step", "build_device", "check_compiler", "check_cuda",
           "compile_package", "custom_op_calls"]
