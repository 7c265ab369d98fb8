"""Structure-only export (``--weights none``): a real-size model built on the meta device, lowered to
an ONNX graph that holds no weight data.

Every weight that has no data (a ``meta`` tensor) becomes an ONNX *external data reference*:
``data_location = EXTERNAL`` with ``location = model.onnx.data`` and the offset/length the tensor
would have if the weights were written there one after another in graph order. The data file itself
is not written, so the artifact is a few MB whatever the model size. The graph is the one a weighted
build lowers (same ops, I/O, CachePlan), except where onnxscript's optimizer would use weight values:
weight-only subexpressions (e.g. ``1 + norm.weight``) are not folded and value-dependent rewrite
rules (e.g. dropping an all-zero Conv bias) do not fire, so a few more nodes remain.

What works with such a graph: ``onnx.load(path, load_external_data=False)``, graph inspection, shape
inference, and ``onnx.checker.check_model(path, full_check=True)`` while a file stands in for the
data (the checker wants it to exist; :func:`check_structure` puts a sparse one there during the
check). What does not: running it (ONNX Runtime needs the data; there is no parity check).

``meta_weights_as_external`` wraps the optimizer in :func:`effexport.exporter.backends.onnx.export.lower`
(a no-op for weighted models); ``ResourceMeter`` measures a build's time and peak RSS.
"""
from __future__ import annotations

import contextlib
import logging
import os
import resource
import time

import onnx_ir as ir
import torch

from effexport.exporter.progress import peak_rss_bytes, phase

DATA_LOCATION = "model.onnx.data"
"""Where the absent weight data of a structure-only build would live (relative to model.onnx)."""
_NO_DATA_DIR = "/nonexistent-effexport-structure-only"  # reads raise FileNotFoundError: not folded


class _Placeholder(ir.ExternalTensor):
    """An external data reference whose data does not exist (``numpy()`` raises FileNotFoundError);
    ``tobytes()`` returns the tensor's name, so two placeholders never compare equal."""

    def tobytes(self) -> bytes:
        return f"effexport-placeholder:{self.name}".encode()


class _QuietPlaceholders(logging.Filter):
    """Drops the optimizer's warnings about weights without values ('Skipped deduplication of
    initializer X as it has no constant value', 'External data for value X is not available', the
    evaluation of a node with such an input): only meta weights cause them, one per weight."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (text.startswith(("External data for value", "Skipped deduplication"))
                    or (text.startswith("Evaluation failed") and "NoneType" in str(record.args)))


_QUIET_LOGGERS = ("onnxscript.optimizer._constant_folding", "onnx_ir.passes.common.initializer_deduplication")


_QUIET = _QuietPlaceholders()


def _is_meta(value: ir.Value) -> bool:
    raw = getattr(value.const_value, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.is_meta


@contextlib.contextmanager
def meta_weights_as_external(model: ir.Model, location: str = DATA_LOCATION):
    """Around the optimizer: every initializer backed by a meta tensor has no constant value inside
    the block (so no pass reads it: constant folding leaves its users alone, rewrite rules that inspect
    values, e.g. 'Conv bias is all zeros', do not match) and becomes an external data reference to
    ``location`` after it (nothing is read or written). A model with real weights is left unchanged.
    The reference offsets are the ones the weights would have if written one after another."""
    meta = {name: value.const_value for name, value in model.graph.initializers.items() if _is_meta(value)}
    for name in meta:
        model.graph.initializers[name].const_value = None
    if meta:
        for logger in _QUIET_LOGGERS:
            if _QUIET not in logging.getLogger(logger).filters:
                logging.getLogger(logger).addFilter(_QUIET)
    try:
        yield
    finally:
        offset = 0
        for name, value in model.graph.initializers.items():
            if name in meta:
                tensor = meta[name]
                value.const_value = _Placeholder(location, offset, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                                 name=name, base_dir=_NO_DATA_DIR)
                offset += tensor.nbytes


def check_structure(path: str) -> None:
    """``onnx.checker.check_model(path, full_check=True)`` of a structure-only model: the checker wants
    every external data file to exist, so a sparse file of the referenced size (no disk blocks) stands
    in next to ``path`` during the check and is removed afterwards."""
    phase("lower: onnx.checker full check")
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

    peak_rss_bytes = staticmethod(peak_rss_bytes)

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
