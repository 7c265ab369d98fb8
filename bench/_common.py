"""Pieces the GPU benchmarks share: the common arguments (``--out``, ``--contexts``, ``--batches``),
the bytes a decode step reads (weights: all of them, or the routed experts one step's tokens select),
and the device's copy bandwidth (the roofline's denominator)."""
from __future__ import annotations

import argparse
import os

import torch


def add_common_args(ap: argparse.ArgumentParser, contexts: str = "4096,32768", batches: str = "1,8") -> None:
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--contexts", default=contexts, type=ints, help="comma-separated context lengths")
    ap.add_argument("--batches", default=batches, type=ints, help="comma-separated batch sizes")


def ints(text: str) -> list[int]:
    """``"4096,32768"`` -> ``[4096, 32768]``."""
    return [int(x) for x in text.split(",") if x]


def param_count(sample) -> int:
    """Parameters of the sample's model (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return sum(p.numel() for p in sample.module.Model(sample.config).parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters one decode step reads: all but gathered embedding tables (an
    embedding whose weight is also the tied LM head is read whole and counted)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    gathered = {id(m.weight) for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)
                and not (tied and name == "embed_tokens")}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in gathered)


def experts_per_token(config) -> int | None:
    """Routed experts each token selects (None: no MoE in the config)."""
    for field in ("n_activated_experts", "num_experts_per_tok"):
        if getattr(config, field, None):
            return int(getattr(config, field))
    return None


def active_weight_bytes(model: torch.nn.Module, batch: int) -> int:
    """:func:`weight_bytes` less the routed experts ``batch`` one-token rows leave unselected, counting
    ``batch * k`` distinct experts per MoE layer (at most all of them): what a step that computed only
    the selected experts would read -- an upper bound at ``batch > 1``, where tokens may share experts.
    The samples' ``StackedExperts`` compute every expert on every token, so they read
    :func:`weight_bytes`."""
    from effexport.samples._blocks import StackedExperts

    k = experts_per_token(model.config)
    unread = 0
    for m in model.modules():
        if isinstance(m, StackedExperts) and k:
            experts = m.gate_up.shape[0]
            unread += (experts - min(experts, batch * k)) * m.expert_params() * m.gate_up.element_size()
    return weight_bytes(model) - unread


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes per second of the best device copy (``bench/decode_attention.py``'s ``bandwidths``);
    None off CUDA."""
    if device.type != "cuda":
        return None
    from decode_attention import bandwidths

    return bandwidths()["copy"]
