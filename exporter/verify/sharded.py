"""Parity of a sharded ``--target torch`` artifact (``--tp N``) against unsharded eager.

Eager runs the prompt and ``steps`` greedy tokens first; the N rank programs then run that token
stream together, one spawned process per rank over gloo on the CPU
(:func:`~effexport.exporter.backends.torch.sharded.run_ranks`); the verdict is
:func:`~.parity.check_parity`'s over rank 0's logits (the same tolerances, the same greedy-token
rule: eager feeds its own tokens, the artifact's argmax must equal them), and every rank's logits
must equal rank 0's bit for bit (the all-reduced logits are the same tensor on every rank).
"""
from __future__ import annotations

import torch

from effexport.exporter.backends.artifact import StepResult
from effexport.exporter.verify.parity import ParityReport, check_parity


class _Replay:
    """The runtime interface over logits the ranks computed for one token stream."""

    def __init__(self, logits: torch.Tensor, stream: torch.Tensor):
        self.logits, self.stream = logits.float(), stream

    def initial_caches(self, batch: int):
        return None

    def step(self, input_ids, pos: int, caches):
        new = input_ids.shape[1]
        if not torch.equal(torch.as_tensor(input_ids), self.stream[:, pos:pos + new].cpu()):
            raise AssertionError(f"parity fed tokens at {pos} that the ranks did not run")
        return StepResult(self.logits[:, pos:pos + new].numpy(), None)


def greedy_stream(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """``prompt`` followed by eager's ``steps`` greedy tokens (what :func:`check_parity` feeds)."""
    tokens = [prompt]
    with torch.no_grad():
        logits, past = model(prompt)
        for step in range(steps):
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
            if step < steps - 1:
                logits, past = model(tokens[-1], past)
    return torch.cat(tokens, 1)


def check_sharded_parity(model: torch.nn.Module, directory: str, manifest: dict, prompt: torch.Tensor,
                         steps: int, dtype: str = "fp32", tolerances: dict | None = None) -> ParityReport:
    """The sharded artifact at ``directory`` (its top-level ``manifest``) against eager ``model``:
    prefill of ``prompt`` + ``steps`` decode steps (module docstring)."""
    from effexport.exporter.backends.torch.sharded import run_ranks, topology

    archives = topology(directory, manifest)
    stream = greedy_stream(model, prompt, steps)
    outs = run_ranks(archives, stream, steps, manifest.get("max_step_tokens"))
    report = check_parity(model, _Replay(outs[0]["logits"], stream), prompt, steps, dtype, tolerances)
    report.mode = f"sharded, gloo, {len(archives)} ranks"
    differ = [r for r, out in enumerate(outs) if not torch.equal(out["logits"], outs[0]["logits"])]
    if differ:
        report.passed = False
        report.detail = "; ".join(filter(None, [report.detail, f"rank(s) {', '.join(map(str, differ))}'s logits "
                                                "differ from rank 0's"]))
    return report
