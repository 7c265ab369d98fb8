"""The ONNX lowering's side of a streamed build (``exporter/frontends/streaming.py``): the weight
source active while a step is lowered (its meta initializers become lazy reads of checkpoint tensors,
``structure_only.meta_weights_as_external``), the external data split into files
(``--data-file-size``) and the writer's progress (bytes done / total, rate)."""
from __future__ import annotations

import contextlib
import contextvars
import time


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("effexport_weight_source", default=None)


def active_source():
    """The weight source (``frontends.streaming.WeightSource``) of the lowering under way (None: not a
    streamed build)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def streaming_from(source):
    """Lowerings inside the block take their meta initializers from ``source`` (None: no effect)."""
    token = _ACTIVE.set(source)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class WriteProgress:
    """``callback`` for ``onnx_ir``'s external-data writer: the bytes written so far, of ``total``,
    and the rate, as the build's phase (the heartbeat line says it) and one line at the end."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done, self.start = total, what, 0, time.monotonic()
        self.pending = 0  # the tensor being written now (the writer calls back before each tensor)

    def __call__(self, tensor, info) -> None:
        from effexport.exporter.progress import phase

        self.done += self.pending
        self.pending = tensor.nbytes
        phase(f"lower: {self.line()}")

    def finish(self) -> None:
        """The last tensor is written (the writer has returned)."""
        self.done, self.pending = self.done + self.pending, 0

    def line(self) -> str:
        seconds = max(time.monotonic() - self.start, 1e-9)
        return (f"writing weights to {self.what}: {self.done / 2**30:.2f} of {self.total / 2**30:.2f} GiB "
                f"({100 * self.done / max(self.total, 1):.0f}%), {self.done / 2**20 / seconds:.0f} MiB/s")


def data_files(location: str, sizes: list[int], limit: int | None) -> list[tuple[str, list[int]]]:
    """Tensors (by index, in order) grouped into data files of at most ``limit`` bytes each (a tensor
    larger than ``limit`` gets a file of its own): ``[(file name, [tensor indices])]``. One group is
    named ``location``; several ``{stem}-00001-of-0000N.onnx.data`` (``location`` =
    ``{stem}.onnx.data``)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(sizes):
        if limit is not None and groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    if len(groups) == 1:
        return [(location, groups[0])]
    stem = location.removesuffix(".data").removesuffix(".onnx")
    return [(f"{stem}-{k + 1:05d}-of-{len(groups):05d}.onnx.data", g) for k, g in enumerate(groups)]
