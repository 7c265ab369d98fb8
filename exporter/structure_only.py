"""Structure-only export (``--weights none``): a real-size model built on the meta device, lowered to
an ONNX graph that holds no weight data.

Every weight that has no data (a ``meta`` tensor) becomes an ONNX *external data reference*:
``data_location = EXTERNAL`` with ``location = model.onnx.data`` and the offset/length the tensor
would have if the weights were written there one after another in graph order. The data file itself
is not written, so the artifact is a few MB whatever the model size. The graph is the one a weighted
build lowers (same ops, I/O, CachePlan), except that onnxscript's optimizer cannot fold
weight-only subexpressions (e.g. ``1 + norm.weight``) it cannot read: they stay as nodes.

What works with such a graph: ``onnx.checker.check_model(proto, full_check=True)`` on the loaded proto
(the checker looks for external files only when given a path), ``onnx.load(path,
load_external_data=False)``, graph inspection, shape inference. What does not: running it (ONNX
Runtime needs the data; there is no parity check), ``onnx.checker.check_model(path)``.

``placeholder_meta_weights`` is called by :func:`effexport.exporter.onnx.export.lower` before the
optimizer (a no-op for weighted models); ``ResourceMeter`` measures a build's time and peak RSS.
"""
from __future__ import annotations

import logging
import os
import resource
import sys
import time

import onnx_ir as ir
import torch

DATA_LOCATION = "model.onnx.data"
"""Where the absent weight data of a structure-only build would live (relative to model.onnx)."""
_NO_DATA_DIR = "/nonexistent-effexport-structure-only"  # reads raise FileNotFoundError: not folded


class _Placeholder(ir.ExternalTensor):
    """An external data reference whose data does not exist. ``numpy()`` raises FileNotFoundError
    (constant folding: 'value unknown'); ``tobytes()`` returns the tensor's name, so the optimizer's
    initializer deduplication (which compares the bytes of small initializers) never merges two."""

    def tobytes(self) -> bytes:
        return f"effexport-placeholder:{self.name}".encode()


class _QuietPlaceholders(logging.Filter):
    """Drops onnxscript's constant-folding warnings about values it cannot read: 'External data for
    value X is not available' and the evaluation of a node with such an input ('NoneType'). Only
    placeholders cause them (a weighted build's external data is written after the optimizer), and a
    real-size graph would print one per weight."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (text.startswith("External data for value")
                    or (text.startswith("Evaluation failed") and "NoneType" in str(record.args)))


_QUIET = _QuietPlaceholders()


def _is_meta(value: ir.Value) -> bool:
    raw = getattr(value.const_value, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.is_meta


def placeholder_meta_weights(model: ir.Model, location: str = DATA_LOCATION) -> int:
    """Replace every initializer backed by a meta tensor with an external data reference to
    ``location`` (nothing is read or written). Returns the bytes the references span (0 for a model
    with real weights, which is left unchanged).

    The optimizer reads constants through ``numpy()``; an external tensor whose file is missing
    raises ``FileNotFoundError``, which onnxscript's constant folding treats as 'value unknown' (it
    leaves the node alone), so the graph lowers without any weight data."""
    offset = 0
    for value in model.graph.initializers.values():
        if not _is_meta(value):
            continue
        tensor = value.const_value
        length = tensor.nbytes
        value.const_value = _Placeholder(location, offset, length, tensor.dtype, shape=tensor.shape,
                                         name=value.name, base_dir=_NO_DATA_DIR)
        offset += length
    if offset:
        logger = logging.getLogger("onnxscript.optimizer._constant_folding")
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
    return offset


def check_structure(path: str) -> None:
    """``onnx.checker.check_model(path, full_check=True)`` of a structure-only model: the checker wants
    every external data file to exist, so a sparse file of the referenced size (no disk blocks) stands
    in next to ``path`` during the check and is removed afterwards."""
    import onnx

    from effexport.exporter.errors import LowerError

    proto = onnx.load(path, load_external_data=False)
    data = os.path.join(os.path.dirname(path), DATA_LOCATION)
    if os.path.exists(data):
        raise LowerError(f"{data} exists next to a structure-only model; build into an empty directory")
    try:
        with open(data, "wb") as f:
            f.truncate(external_bytes(proto))
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise LowerError(f"the structure-only ONNX graph fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    finally:
        if os.path.exists(data):
            os.unlink(data)


def external_bytes(model_proto) -> int:
    """Bytes of weight data a model proto references externally (the sum of the ``length`` entries)."""
    total = 0
    for init in model_proto.graph.initializer:
        info = {e.key: e.value for e in init.external_data}
        total += int(info.get("length", 0))
    return total


class ResourceMeter:
    """Wall time, CPU time and peak resident memory of this process (``resource.getrusage``;
    ``ru_maxrss`` is in KiB on Linux, bytes on macOS). The peak is the process's, so it includes what
    was resident before the build started (imports: about 0.5 GiB); CPU time counts from the process
    start (on a busy machine wall time overstates the work, CPU time does not)."""

    def __init__(self, start: float | None = None):
        self.start = time.monotonic() if start is None else start

    @staticmethod
    def peak_rss_bytes() -> int:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)

    @staticmethod
    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def to_json(self) -> dict:
        return {"seconds": round(time.monotonic() - self.start, 1), "cpu_seconds": round(self.cpu_seconds(), 1),
                "peak_rss_bytes": self.peak_rss_bytes()}

    def summary(self) -> str:
        return (f"{time.monotonic() - self.start:.1f}s, {self.cpu_seconds():.0f} CPU-s, "
                f"peak memory {self.peak_rss_bytes() / 2**30:.2f} GiB")
