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


REPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--cache-dtype`` values ``effexport report --tp`` computes per-rank bytes in (weights and caches)."""


def sharded_report(sample, context: int, cache_dtype: str, tp: int) -> dict:
    """Per-rank weight and cache bytes of ``sample`` split over ``tp`` ranks (``effexport report
    --tp``): the model captured and rewritten on the meta device in ``cache_dtype`` (no weights
    allocated), its :class:`~effexport.passes.sharding.ShardPlan` and each rank's CachePlan
    (:func:`~effexport.passes.sharding.shard_rank`) at ``context`` tokens, batch 1. A KV head
    replicated on several ranks (fewer KV heads than ranks) is counted on every rank holding it:
    ``replicated_kv_bytes`` is what that adds to the unsharded caches."""
    from effexport.exporter.capture import capture_step
    from effexport.exporter.errors import UsageError
    from effexport.passes.pipeline import run_pipeline
    from effexport.passes.sharding import ShardCountError, plan_sharding, shard_rank

    if cache_dtype not in REPORT_DTYPES:
        raise UsageError(f"--tp with --cache-dtype {cache_dtype}: per-rank bytes are computed for "
                         f"{', '.join(REPORT_DTYPES)}; pass one of those")
    if tp < 2:
        raise UsageError(f"--tp {tp}: give the number of ranks, at least 2, e.g. --tp 2")
    model = sample.build("meta", dtype=REPORT_DTYPES[cache_dtype])
    program, analysis = run_pipeline(capture_step(model, torch.zeros(2, 40, dtype=torch.long, device="meta")),
                                     max_context=context)
    plan = analysis.plan
    try:
        shard = plan_sharding(program, plan, tp)
    except ShardCountError as exc:
        raise ShardCountError(f"--tp {tp}: {exc}") from None
    weights = shard.weight_bytes(program)
    ranks = []
    for rank in range(tp):
        _, rank_plan = shard_rank(program, plan, shard, rank, "0")
        ranks.append({"rank": rank, "weight_bytes": weights["per_rank"], "cache_bytes": rank_plan.nbytes(1, context)})
    copies = sum(e.nbytes(1, context) * (tp // shard.caches[e.name].nblocks - 1)
                 for e in plan.entries if e.name in shard.caches)
    return {"tp": tp, "ep": tp, "dtype": cache_dtype, "context": context, "batch": 1, "ranks": ranks,
            "sum": {"weight_bytes": sum(r["weight_bytes"] for r in ranks),
                    "cache_bytes": sum(r["cache_bytes"] for r in ranks)},
            "unsharded": {"weight_bytes": weights["whole"], "cache_bytes": plan.nbytes(1, context)},
            "weights": {"split": weights["split"], "replicated": weights["replicated"]},
            "replicated_kv_bytes": copies, "all_reduces_per_step": len(shard.reduces),
            "shard_plan": shard.describe()}


def format_sharded(data: dict) -> str:
    """The human table of :func:`sharded_report`."""
    from effexport.exporter.verify.report import human_bytes

    lines = [f"tensor + expert parallel over {data['tp']} ranks ({data['dtype']} weights and caches, cache at "
             f"{data['context']:,} tokens, batch 1, from the rewritten program's CachePlan):",
             f"{'rank':>6} {'weights':>14} {'cache':>14}"]
    lines += [f"{r['rank']:>6} {human_bytes(r['weight_bytes']):>14} {human_bytes(r['cache_bytes']):>14}"
              for r in data["ranks"]]
    lines.append(f"{'sum':>6} {human_bytes(data['sum']['weight_bytes']):>14} {human_bytes(data['sum']['cache_bytes']):>14}")
    lines.append(f"{'whole':>6} {human_bytes(data['unsharded']['weight_bytes']):>14} "
                 f"{human_bytes(data['unsharded']['cache_bytes']):>14}  (unsharded)")
    w = data["weights"]
    lines.append(f"weights: {human_bytes(w['split'])} split, {human_bytes(w['replicated'])} replicated on every rank; "
                 f"cache: +{human_bytes(data['replicated_kv_bytes'])} from KV heads replicated on several ranks; "
                 f"{data['all_reduces_per_step']} all-reduces per step")
    return "\n".join(lines)
