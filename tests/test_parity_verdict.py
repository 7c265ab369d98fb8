"""The parity verdict fails when the artifact is wrong, and says where.

``check_parity`` against fake runtimes that are the eager model itself with a distortion: logits
scaled by 1 + 2e-4 at the prefill or at one decode step fail the fp32 tolerance (1e-4) and name the
output, while 1 + 5e-5 passes and the bf16 tolerance takes 2e-4; a greedy token swapped at decode
step k fails even where the logits error alone would pass, and the report names step k. Then the
verdict through the front doors, on a two-layer model with the samples' step contract
(tests/models/negatives.py, ~5 CPU-s a build): a CLI ``--trust-pickle`` build whose ONNX artifact is
perturbed (the logits multiplied by 1.001 inside the graph) exits 1 and writes ``report.json`` with
``passed: false``, ``effexport.export`` of such a build raises ``ParityError``; the same builds
unperturbed pass (``effexport.export`` with its default check, a ``--trust-pickle`` CLI build), and
the parity prompt is drawn independently of the capture's example tokens.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from models import negatives
from onnx import helper

import effexport
from effexport.exporter.cli import main
from effexport.exporter.errors import ParityError
from effexport.exporter.verify.parity import TOLERANCE, check_parity
from effexport.exporter.backends.artifact import StepResult

STEPS = 12


@pytest.fixture(scope="module")
def model():
    return negatives.build(negatives.NegConfig(layers=2, vocab=40)).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(5))


class EagerRuntime:
    """A runtime that is the eager model, with ``distort(call, logits)`` applied to the logits of
    each step call (call 0 is the prefill, call i the i-th decode step's)."""

    def __init__(self, model, distort=None):
        self.model, self.distort, self.calls, self.positions = model, distort, 0, []

    def initial_caches(self, batch):
        return None

    def step(self, ids, pos, caches):
        self.positions.append(pos)
        with torch.no_grad():
            logits, present = self.model(torch.from_numpy(ids), caches)
        logits = logits.numpy().copy()
        if self.distort is not None:
            logits = self.distort(self.calls, logits)
        self.calls += 1
        return StepResult(logits, present)


def _scale_at(call: int, factor: float):
    return lambda i, logits: logits * np.float32(factor) if i == call else logits


def test_the_eager_model_itself_passes(model, prompt):
    runtime = EagerRuntime(model)
    report = check_parity(model, runtime, prompt, STEPS)
    assert report.passed and report.tokens_equal and report.steps == STEPS
    assert all(o.max_rel == 0.0 for o in report.outputs)
    assert runtime.positions == [0] + list(range(prompt.shape[1], prompt.shape[1] + STEPS))
    assert "PARITY PASSED" in report.table()


@pytest.mark.parametrize("call,output", [pytest.param(0, "logits/prefill", id="prefill"),
                                         pytest.param(6, "logits/decode", id="decode-step-5")])
def test_logits_off_by_2e_4_fail_fp32(model, prompt, call, output):
    """2e-4 relative error (twice the fp32 tolerance) in one call's logits fails, in that output."""
    report = check_parity(model, EagerRuntime(model, _scale_at(call, 1 + 2e-4)), prompt, STEPS)
    errors = {o.name: o.max_rel for o in report.outputs}
    assert not report.passed and report.tokens_equal
    assert 1.5e-4 < errors[output] < 2.5e-4, errors
    assert all(err < 1e-6 for name, err in errors.items() if name != output), errors
    assert "PARITY FAILED" in report.table() and report.to_json()["passed"] is False


@pytest.mark.parametrize("factor,dtype", [pytest.param(1 + 5e-5, "fp32", id="5e-5-fp32"),
                                          pytest.param(1 + 2e-4, "bf16", id="2e-4-bf16")])
def test_errors_within_the_dtype_tolerance_pass(model, prompt, factor, dtype):
    report = check_parity(model, EagerRuntime(model, _scale_at(6, factor)), prompt, STEPS, dtype)
    assert report.passed and report.tolerance == TOLERANCE[dtype]
    assert 0 < report.outputs[1].max_rel <= TOLERANCE[dtype]


def test_greedy_token_differs_at_step_k(model, prompt):
    """The decode step whose top-2 logits are closest gets its top two swapped in row 0: the tokens
    differ there, the logits error stays inside the bf16 tolerance, and the verdict is FAILED
    naming that step."""
    trace = []
    check_parity(model, EagerRuntime(model, lambda i, logits: trace.append(logits) or logits), prompt, STEPS)
    gaps = []
    for logits in trace[1:STEPS]:  # decode calls 1 .. STEPS - 1: the token of call i is compared at step i
        top2 = np.sort(logits[0, -1])[-2:]
        gaps.append((top2[1] - top2[0]) / np.abs(logits).max())
    k = 1 + int(np.argmin(gaps))
    assert gaps[k - 1] < TOLERANCE["bf16"] / 2, f"no close top-2 in {STEPS} steps: {gaps}"

    def swap(i, logits):
        if i == k:
            row = logits[0, -1]
            first, second = np.argsort(row)[-1], np.argsort(row)[-2]
            row[first], row[second] = row[second], row[first]
        return logits

    report = check_parity(model, EagerRuntime(model, swap), prompt, STEPS, "bf16")
    assert not report.passed and not report.tokens_equal
    assert report.detail == f"greedy token differs at decode step {k}"
    assert all(o.max_rel <= TOLERANCE["bf16"] for o in report.outputs), "the logits alone would pass"
    assert f"decode step {k}" in report.table() and "identical over" in report.table()


# ------------------------------------------------------------------------ builds (front doors)
def _perturb_logits(monkeypatch, factor: float = 1.001):
    """Every ONNX export of this test multiplies the graph's logits by ``factor`` (a Mul before
    the output): an artifact that is slightly wrong, with the same greedy tokens."""
    from effexport.exporter.backends.onnx import export as export_mod

    real = export_mod.export_steps  # the backend's entry point (export_step calls it too)

    def export_steps(program, plan, path, *args, **kwargs):
        _, decode = real(program, plan, path, *args, **kwargs)
        proto = onnx.load(path)
        (producer,) = [n for n in proto.graph.node if "logits" in n.output]
        producer.output[list(producer.output).index("logits")] = "logits_unperturbed"
        proto.graph.node.append(helper.make_node("Constant", [], ["perturbation"], value=helper.make_tensor(
            "perturbation", onnx.TensorProto.FLOAT, [], [factor])))
        proto.graph.node.append(helper.make_node("Mul", ["logits_unperturbed", "perturbation"], ["logits"]))
        onnx.save(proto, path)
        return proto, decode

    monkeypatch.setattr(export_mod, "export_steps", export_steps)


@pytest.fixture(scope="module")
def pickled(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("pickle") / "neg.pt"
    torch.save(model, path)
    return str(path)


def _parity(out) -> dict:
    return json.loads((out / "report.json").read_text())["parity"]


def test_cli_trust_pickle_build_passes(pickled, tmp_path, capsys):
    assert main([pickled, "--trust-pickle", "-o", str(tmp_path / "a"), "--steps", "8"]) == 0
    parity = _parity(tmp_path / "a")
    assert parity["passed"] and parity["tokens_equal"] and parity["steps"] == 8
    assert "PARITY PASSED" in capsys.readouterr().err


def test_cli_build_of_a_perturbed_artifact_exits_1(pickled, tmp_path, monkeypatch, capsys):
    _perturb_logits(monkeypatch)
    assert main([pickled, "--trust-pickle", "-o", str(tmp_path / "a"), "--steps", "8"]) == 1
    parity = _parity(tmp_path / "a")
    assert parity["passed"] is False and parity["tokens_equal"]
    assert max(o["max_rel"] for o in parity["outputs"]) > 5e-4
    err = capsys.readouterr().err
    assert "PARITY FAILED" in err and "FAILED: " in err


def test_export_with_the_default_check_passes(model, tmp_path, monkeypatch):
    """``effexport.export(module)`` of a step-contract module: the default check runs 16 steps and
    passes; its prompt is not taken from the capture's example token stream."""
    from effexport.exporter import capture
    from effexport.exporter.verify import parity

    seen = {}
    real_capture, real_check = capture.capture_step, parity.check_parity
    monkeypatch.setattr(capture, "capture_step", lambda m, ids, *a, **k: (
        seen.setdefault("example", ids), real_capture(m, ids, *a, **k))[1])
    monkeypatch.setattr(parity, "check_parity", lambda m, rt, prompt, *a, **k: (
        seen.setdefault("prompt", prompt), real_check(m, rt, prompt, *a, **k))[1])
    out = effexport.export(model, output=str(tmp_path / "a"), name="neg")
    assert out == str(tmp_path / "a")
    report = _parity(tmp_path / "a")
    assert report["passed"] and report["steps"] == 16
    example, prompt = seen["example"], seen["prompt"]
    length = prompt.shape[1]
    assert not any(torch.equal(prompt, example[:, s:s + length]) for s in range(example.shape[1] - length + 1)), (
        "the parity prompt is a slice of the capture's example ids")


def test_export_of_a_perturbed_artifact_raises_parity_error(model, tmp_path, monkeypatch):
    _perturb_logits(monkeypatch)
    with pytest.raises(ParityError, match="does not match eager") as exc:
        effexport.export(model, output=str(tmp_path / "a"), name="neg", steps=8)
    assert exc.value.exit_code == 1
    assert _parity(tmp_path / "a")["passed"] is False
