"""Lowering of a sharded rank program's collectives (``--target onnx --tp N``, issue #23).

A rank program (:func:`effexport.passes.sharding.shard_rank`) all-reduces each row-parallel partial
sum with ``_c10d_functional.all_reduce(x, "sum", group)`` followed by ``wait_tensor``. In ONNX:

* ``all_reduce`` -> one ``com.microsoft::AllReduce`` node (ONNX Runtime contrib op, domain
  ``com.microsoft``, version 1). Its schema (onnxruntime/core/graph/contrib_ops/collective_defs.cc):
  one variadic input ``input`` and output ``output`` of type ``T`` in {float16, float, double}, the
  shape of the input, no attributes -- the sum over the session's one NCCL communicator (every rank
  of the job: MPI's world, or ``LOCAL_WORLD_SIZE`` / ``LOCAL_RANK`` without MPI). There is no group
  attribute, so only the default process group ("0", every rank) lowers; a bf16 partial sum is not a
  type the op takes (the sharding pass all-reduces half-precision partial sums in fp32 anyway:
  :func:`~effexport.passes.sharding.shard_rank`).
* ``wait_tensor`` -> ``Identity`` (the kernel is synchronous on its stream).

Which ONNX Runtime builds run it: only CUDA builds compiled with NCCL (``--use_cuda --use_mpi``,
``ORT_USE_NCCL``), where the kernel is in onnxruntime/contrib_ops/cuda/collective/. No pip
package registers the op: ``onnxruntime`` (CPU) and ``onnxruntime-gpu`` both lack it, so a rank
model loads only in a source build (:data:`RUNTIME_REQUIREMENT`). The build's parity therefore runs
a composed graph (:mod:`.composed`) on ONNX Runtime CPU, not the collective itself.

Only the schema's declared part is registered in ``onnx.defs`` (so onnxscript emits the node and
``onnx.checker`` accepts the model); ORT reads the node with its own schema.
"""
from __future__ import annotations

import onnxscript
import torch
from onnxscript import opset18 as op

from effexport.exporter.backends.onnx._schemas import MSFT_DOMAIN, ensure_schema, make_schema
from effexport.exporter.errors import LowerError

__all__ = ["TRANSLATIONS", "ALL_REDUCE", "ALL_REDUCE_TYPES", "RUNTIME_REQUIREMENT", "ensure_collective_schemas"]

ALL_REDUCE = "AllReduce"
ALL_REDUCE_TYPES = ("tensor(float16)", "tensor(float)", "tensor(double)")
"""``T`` of ORT's ``com.microsoft::AllReduce`` (collective_defs.cc): no bfloat16."""
DEFAULT_GROUP = "0"
RUNTIME_REQUIREMENT = ("an onnxruntime CUDA build with NCCL (built from source with --use_mpi): its "
                       "com.microsoft::AllReduce kernel is in no pip package (onnxruntime, onnxruntime-gpu)")
"""What runs a sharded ONNX artifact's rank models (effexport.json's and report.json's ``runtime``)."""

msft = onnxscript.values.Opset(MSFT_DOMAIN, 1)


def ensure_collective_schemas() -> None:
    """Register ``com.microsoft::AllReduce`` (one input, one output: what the lowering writes)."""
    ensure_schema(make_schema(
        ALL_REDUCE, MSFT_DOMAIN, inputs=[("input", "T", False)], outputs=[("output", "T")], attributes=[],
        type_constraints=[("T", list(ALL_REDUCE_TYPES))],
        doc="ONNX Runtime contrib AllReduce (sum over the NCCL communicator; subset declared for emission)."))


def _all_reduce(x, reduce_op: str = "sum", group_name: str = DEFAULT_GROUP):
    """``_c10d_functional.all_reduce`` -> ``com.microsoft::AllReduce`` (a sum over every rank)."""
    if reduce_op != "sum":
        raise LowerError(f"all_reduce {reduce_op!r}: com.microsoft::AllReduce sums; no other reduction lowers")
    if str(group_name) != DEFAULT_GROUP:
        raise LowerError(f"all_reduce over process group {group_name!r}: com.microsoft::AllReduce reduces over "
                         "every rank of the job (no group attribute); only the default group lowers")
    return msft.AllReduce(x)


def _wait_tensor(x):
    """``_c10d_functional.wait_tensor`` -> Identity."""
    return op.Identity(x)


ensure_collective_schemas()
TRANSLATIONS = {torch.ops._c10d_functional.all_reduce.default: _all_reduce,
                torch.ops._c10d_functional.wait_tensor.default: _wait_tensor}
"""{OpOverload: translation} (the same in every profile)."""
