"""Parity of a streamed build (``exporter/frontends/streaming.py``) with the weights held once at a
time: eager fp32 is materialised from the checkpoint, runs the prompt and the greedy decode steps,
its logits are kept and the model is freed; only then is the artifact (or, for bf16 / fp16, its fp32
twin, streamed again) opened in ONNX Runtime and fed the same tokens."""
from __future__ import annotations

import gc
import json
import os
import shutil

import torch
from torch import nn

from effexport.exporter.frontends.streaming import WeightSource, materialize


class Replay:
    """Eager outputs recorded by :func:`record`, served back in order to :func:`~.parity.check_parity`
    (as the model it calls; a call without ``past`` starts again from the prompt, so one recording
    serves several checks); the token ids it is given must be the ones eager was run with."""

    def __init__(self, inputs: list[torch.Tensor], logits: list[torch.Tensor]):
        self.inputs, self.logits, self.i = inputs, logits, 0

    def __call__(self, input_ids: torch.Tensor, past=None):
        if past is None:
            self.i = 0
        if self.i >= len(self.logits) or not torch.equal(input_ids.cpu(), self.inputs[self.i]):
            raise RuntimeError("parity replay out of step with the recorded eager run")
        self.i += 1
        return self.logits[self.i - 1], self.i


def record(model: nn.Module, prompt: torch.Tensor, steps: int) -> Replay:
    """Eager prompt + ``steps`` greedy decode steps (the tokens :func:`~.parity.check_parity` feeds)."""
    inputs, logits = [prompt], []
    with torch.no_grad():
        out, past = model(prompt)
        logits.append(out.float())
        for _ in range(steps):
            nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
            inputs.append(nxt)
            out, past = model(nxt, past)
            logits.append(out.float())
    return Replay(inputs, logits)


def check_streamed(loaded, reference, opts, tmp: str, progress, prompt_length: int, twin_verdict):
    """Parity of a streamed build (see the module docstring): eager fp32 first, freed, then the
    artifact (or, for bf16 / fp16, its fp32 twin) on ONNX Runtime CPU; ``twin_verdict`` (the build's)
    turns the twin's parity and the structure comparison into the verdict."""
    import tempfile

    from effexport.exporter.backends.artifact import MANIFEST
    from effexport.exporter.backends.base import onnx_inputs
    from effexport.exporter.backends.onnx.runtime import OrtRuntime
    from effexport.exporter.backends.onnx.weights import streaming_from
    from effexport.exporter.verify.parity import check_parity, compare_structure

    half = opts.dtype != "fp32"
    prompt = loaded.parity_prompt(prompt_length, device="cpu")  # the streamed model's parameters are on meta
    twin_dir = tempfile.mkdtemp(prefix=".effexport-twin-", dir=os.path.dirname(tmp)) if half else None
    try:
        if half:
            from effexport.exporter.capture import capture_step
            from effexport.exporter.backends.onnx.export import export_step
            from effexport.passes.pipeline import run_pipeline

            t0 = progress.stage(f"fp32 twin for parity (no CUDA execution provider here to run {opts.dtype}: "
                                "capture, rewrite and stream the weights again in fp32)")
            program, analysis = run_pipeline(capture_step(reference.model, reference.example_ids()),
                                             max_context=opts.max_context, cache_layout=opts.kv_cache)
            twin_source = WeightSource(reference.weights.checkpoint, reference.weights.names)
            with streaming_from(twin_source):
                proto = export_step(program, analysis.plan, os.path.join(twin_dir, "model.onnx"),
                                    profile=opts.profile, external_data=True)
            with open(os.path.join(twin_dir, MANIFEST), "w") as f:
                json.dump({"target": "onnx", "profile": opts.profile, "files": {"step": "model.onnx"},
                           "inputs": onnx_inputs(proto), "outputs": program.outputs,
                           "cache_plan": analysis.plan.to_json()}, f)
            del program, analysis, proto
            progress.done(t0)
        t0 = progress.stage(f"parity vs eager fp32 (prefill + {opts.steps} decode steps; eager first, then "
                            "ONNX Runtime CPU: the weights are held once at a time)")
        model = materialize(reference, torch.float32)
        replay = record(model, prompt, opts.steps)
        del model
        gc.collect()
        runtime = OrtRuntime(twin_dir or tmp)
        parity = check_parity(replay, runtime, prompt, opts.steps, "fp32" if half else opts.dtype)
        del runtime
        gc.collect()
        mode = "eager fp32 then the artifact, one after the other (weights streamed from the checkpoint)"
        if half:
            mismatch = compare_structure(os.path.join(tmp, "model.onnx"), os.path.join(twin_dir, "model.onnx"))
            parity = twin_verdict(parity, mismatch, opts.dtype)
            mode = f"{parity.mode}; eager fp32 then the twin, one after the other (weights streamed)"
        parity.mode = mode
        progress.done(t0)
        return parity
    finally:
        if twin_dir is not None:
            shutil.rmtree(twin_dir, ignore_errors=True)
