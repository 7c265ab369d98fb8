"""The program the passes transform: a decode-step graph with named, flat inputs and outputs.

Capture (``effexport.exporter.capture``) produces it, the pipeline (:mod:`.pipeline`) rewrites it and
the backends lower it. Signature: ``(input_ids, *past tensors) -> (logits, *present tensors)`` with
names ``past.{layer}.{name}`` / ``present.{layer}.{name}`` (after the passes, ``pos`` follows
``input_ids``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx


@dataclass
class StepProgram:
    """A captured (and later rewritten) decode-step graph with named, flat inputs and outputs."""

    gm: fx.GraphModule
    inputs: list[str]
    outputs: list[str]
    seq_dims: dict[str, int | None] = field(default_factory=dict)  # cache name -> growing dim (None: state)
    capture_seconds: float = 0.0
    fills: dict[str, float] = field(default_factory=dict)  # state name -> prefill value, where not 0 (initial_fills)
    max_new_tokens: int | None = None  # the most new tokens one step may take (export's bound), None: any

    def __call__(self, *args):
        return self.gm(*args)
