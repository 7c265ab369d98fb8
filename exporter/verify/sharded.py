"""Parity of a sharded ``--target torch`` artifact (``--tp N``) against unsharded eager.

Eager runs the prompt and ``steps`` greedy tokens first and is recorded (:func:`.streamed.record`);
the N rank programs then run that token stream together, one spawned process per rank over gloo on
the CPU (:func:`~effexport.exporter.backends.torch.sharded.run_ranks`); the verdict is
:func:`~.parity.check_parity`'s over rank 0's logits (the same tolerances, the same greedy-token
rule: eager feeds its own tokens, the artifact's argmax must equal them), and every rank's logits
must equal rank 0's bit for bit (the all-reduced logits are the same tensor on every rank).

A bf16 / fp16 artifact is judged as a single-rank half-precision build is
(:func:`~.parity.check_parity_half`): against fp32 eager, bounded by eager-in-the-dtype's own error
against fp32 eager; the ranks run fp32 eager's token stream and, where it differs, eager-in-the-dtype's
(one run, the two streams stacked on the batch); eager-in-the-dtype's own error is measured on fp32
eager's tokens at every step. Eager is recorded before any rank starts, so a caller
that passes its models as functions (a streamed build materialising them from the checkpoint) holds
one eager model at a time and none while the ranks run.
"""
from __future__ import annotations

import torch

from effexport.exporter.backends.artifact import StepResult
from effexport.exporter.verify.parity import ParityReport, check_parity, check_parity_half
from effexport.exporter.verify.streamed import record


class _Ranks:
    """The runtime interface over logits the ranks computed for token streams: ``runs`` of
    ``(logits [B, T, V], stream [B, >= T])``; a step serves the logits of the first stream whose tokens
    it is fed (the streams still matching travel as its ``caches``)."""

    def __init__(self, runs: list[tuple[torch.Tensor, torch.Tensor]]):
        self.runs = [(logits.float(), stream.cpu()) for logits, stream in runs]

    def initial_caches(self, batch: int):
        return None

    def step(self, input_ids, pos: int, caches):
        new, ids = input_ids.shape[1], torch.as_tensor(input_ids)
        keep = [i for i in (range(len(self.runs)) if caches is None else caches)
                if torch.equal(ids, self.runs[i][1][:, pos:pos + new])]
        if not keep:
            raise AssertionError(f"parity fed tokens at {pos} that the ranks did not run")
        return StepResult(self.runs[keep[0]][0][:, pos:pos + new].numpy(), keep)


def greedy_stream(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """``prompt`` followed by eager's ``steps`` greedy tokens (what :func:`check_parity` feeds)."""
    return torch.cat(record(model, prompt, steps).inputs, 1)


def _forced(model: torch.nn.Module, stream: torch.Tensor, steps: int) -> torch.Tensor:
    """``model``'s logits over ``stream`` teacher-forced: its prefill, then ``steps`` one-token steps
    (the positions :func:`~.parity.check_parity` compares)."""
    prefill = stream.shape[1] - steps
    with torch.no_grad():
        logits, past = model(stream[:, :prefill])
        out = [logits.float()]
        for pos in range(prefill, stream.shape[1]):
            logits, past = model(stream[:, pos:pos + 1], past)
            out.append(logits.float())
    return torch.cat(out, 1)


def _own_error(forced: torch.Tensor, ref, prefill: int, steps: int, tokens_equal: bool, dtype: str) -> ParityReport:
    """Eager-in-``dtype``'s error against fp32 eager (``ref``'s recording) on fp32 eager's tokens, at
    the prefill and at every decode step -- also past a step where its own greedy token would differ
    (where :func:`~.parity.check_parity` stops: the bound would then rest on fewer steps than the
    artifact is measured on)."""
    from effexport.exporter.verify.parity import OutputError, _errors

    fp32 = torch.cat(ref.logits, 1)
    decode = [_errors(forced[:, p:p + 1].numpy(), fp32[:, p:p + 1]) for p in range(prefill, prefill + steps)]
    outputs = [OutputError("logits/prefill", *_errors(forced[:, :prefill].numpy(), fp32[:, :prefill])),
               OutputError("logits/decode", max((d[0] for d in decode), default=0.0),
                           max((d[1] for d in decode), default=0.0))]
    return ParityReport(True, steps, 0.0, outputs, tokens_equal,
                        "" if tokens_equal else f"eager {dtype}'s greedy tokens leave fp32 eager's")


def check_sharded_parity(model, directory: str, manifest: dict, prompt: torch.Tensor, steps: int,
                         dtype: str = "fp32", tolerances: dict | None = None, half=None) -> ParityReport:
    """The sharded artifact at ``directory`` (its top-level ``manifest``) against eager: prefill of
    ``prompt`` + ``steps`` decode steps (module docstring). ``model``: eager fp32; ``half``: eager in
    ``dtype`` for a bf16 / fp16 artifact. Either may be a function returning the model, called once
    and the model released before the ranks run."""
    from effexport.exporter.backends.torch.sharded import run_ranks, topology

    if manifest.get("target") == "onnx":
        return check_composed_parity(model, directory, manifest, prompt, steps, dtype, tolerances)
    archives = topology(directory, manifest)
    fp32 = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
    ref = record(fp32, prompt, steps)
    stream = torch.cat(ref.inputs, 1)
    del fp32, model
    streams, same, own = [stream], None, None
    if half is not None:
        eager = half() if callable(half) and not isinstance(half, torch.nn.Module) else half
        same, forced = record(eager, prompt, steps), _forced(eager, stream, steps)
        del eager, half
        equal = torch.equal(torch.cat(same.inputs, 1), stream)
        own = _own_error(forced, ref, prompt.shape[1], steps, equal, dtype)
        if not equal:
            streams.append(torch.cat(same.inputs, 1))
    outs = run_ranks(archives, torch.cat(streams, 0), steps, manifest.get("max_step_tokens"))
    batch = prompt.shape[0]
    ranks = _Ranks([(outs[0]["logits"][k * batch:(k + 1) * batch], s) for k, s in enumerate(streams)])
    where = f"sharded, gloo, {len(archives)} ranks"
    if same is None:
        report = check_parity(ref, ranks, prompt, steps, dtype, tolerances)
        report.mode = where
    else:
        report = check_parity_half(same, ref, ranks, prompt, steps, dtype, tolerances, own=own)
        report.mode = f"{where}; {report.mode}"
    differ = [r for r, out in enumerate(outs) if not torch.equal(out["logits"], outs[0]["logits"])]
    if differ:
        report.passed = False
        report.detail = "; ".join(filter(None, [report.detail, f"rank(s) {', '.join(map(str, differ))}'s logits "
                                                "differ from rank 0's"]))
    return report


def check_composed_parity(model, directory: str, manifest: dict, prompt: torch.Tensor, steps: int,
                          dtype: str = "fp32", tolerances: dict | None = None) -> ParityReport:
    """A sharded ONNX artifact (``--target onnx --tp N``) against unsharded eager: its rank models
    composed into one graph (:mod:`~effexport.exporter.backends.onnx.composed`: each AllReduce a Sum
    of the ranks' inputs) run on ONNX Runtime CPU over the prefill and ``steps`` decode steps
    (:func:`~.parity.check_parity`), then one prefill with every rank's logits, which must equal rank
    0's bit for bit. The collective itself is not run: report.json's ``mode`` says so."""
    import os
    import tempfile

    import numpy as np

    from effexport.exporter.backends.onnx.composed import COMPOSED_MODE, write_composed
    from effexport.exporter.backends.onnx.runtime import OrtRuntime

    if dtype != "fp32":
        raise ValueError(f"the composed check runs fp32 rank models on ONNX Runtime CPU, not {dtype}")
    fp32 = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
    world = manifest["sharded"]["world"]
    with tempfile.TemporaryDirectory(prefix=".effexport-composed-", dir=os.path.dirname(os.path.abspath(directory))) as tmp:
        info = write_composed(directory, manifest, tmp)
        runtime = OrtRuntime(tmp)
        report = check_parity(fp32, runtime, prompt, steps, dtype, tolerances)
        names = [o.name for o in runtime.session.get_outputs() if o.name.endswith("/logits")]
        first = runtime.session.run(["logits", *names], {
            "input_ids": prompt.numpy(), **{n: np.array(0, dtype=np.int64) for n in runtime.input_names
                                            if n in ("pos", "pos_host")},
            **dict(zip(runtime.cache_names, runtime.initial_caches(prompt.shape[0])))})
    report.mode = COMPOSED_MODE.format(world=world)
    differ = [n.split("/")[0] for n, out in zip(names, first[1:]) if not np.array_equal(out, first[0])]
    detail = f"{info['all_reduces'][0]} AllReduce nodes per rank, each a Sum of the {world} ranks' inputs"
    if differ:
        report.passed = False
        detail += f"; rank(s) {', '.join(differ)}'s logits differ from rank 0's"
    report.detail = "; ".join(filter(None, [report.detail, detail]))
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
