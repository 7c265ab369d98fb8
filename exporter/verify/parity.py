"""Parity of a built artifact against eager PyTorch: prefill plus N greedy decode steps.

The eager model runs the same token stream with its own cache; per step, logits are compared
(max abs and max relative error, relative to the step's largest eager magnitude) and the greedy
tokens must be identical. Tolerances by dtype: fp32 1e-4, bf16/fp16 2e-2, overridable per output
(:mod:`effexport.exporter.verify.tolerances`: ``--tolerance``, ``pyproject.toml``, the pytest plugin's ini).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from effexport.exporter.verify.tolerances import DEFAULTS as TOLERANCE

PARITY_PROMPT = 8  # prompt tokens of the parity check, before its decode steps


@dataclass
class OutputError:
    """Worst error of one output over all steps."""

    name: str
    max_abs: float
    max_rel: float


@dataclass
class ParityReport:
    """What ``effexport check`` prints and ``report.json`` stores under ``parity``."""

    passed: bool
    steps: int
    tolerance: float
    outputs: list[OutputError] = field(default_factory=list)
    tokens_equal: bool = True
    detail: str = ""
    mode: str = ""  # what ran, when not the artifact itself on the build's runtime (half precision)
    tolerances: dict = field(default_factory=dict)  # {output: the max rel error it may have}; tolerance is their max
    tokens_ok: bool | None = None  # the greedy-token verdict where it is not tokens_equal (half precision)
    graphs: dict = field(default_factory=dict)  # {"prefill": file, "decode": file} where the runtime says
    # which graph ran a step (an ONNX artifact with a one-token decode graph runs two)

    def output_passed(self, o: OutputError) -> bool:
        """``o`` is within its tolerance (NaN is not)."""
        return o.max_rel <= self.tolerances.get(o.name, self.tolerance)

    def to_json(self) -> dict:
        out = {"passed": self.passed, "steps": self.steps, "tolerance": self.tolerance,
               "tokens_equal": self.tokens_equal, "outputs": [asdict(o) for o in self.outputs],
               "detail": self.detail}
        if self.tolerances:
            out["tolerances"] = dict(self.tolerances)
        if self.graphs:
            out["graphs"] = dict(self.graphs)
        return {**out, "mode": self.mode} if self.mode else out

    def table(self) -> str:
        """Human table."""
        per_output = any(v != self.tolerance for v in self.tolerances.values())
        lines = [f"{'output':<16} {'max abs':>12} {'max rel':>12}  " + (
            f"{'tolerance':>10}" if per_output else f"(tolerance {self.tolerance:g} rel)")]
        for o in self.outputs:
            lines.append(f"{o.name:<16} {o.max_abs:>12.3e} {o.max_rel:>12.3e}" + (
                f"  {self.tolerances.get(o.name, self.tolerance):>10.3g}" if per_output else ""))
        lines.append(f"greedy tokens identical over {self.steps} decode steps: {'yes' if self.tokens_equal else 'NO'}")
        if self.detail:
            lines.append(self.detail)
        if self.mode:
            lines.append(f"checked: {self.mode}")
        lines.append("PARITY PASSED" if self.passed else "PARITY FAILED")
        return "\n".join(lines)


def _errors(got: np.ndarray, ref: torch.Tensor) -> tuple[float, float]:
    ref64 = ref.detach().double().cpu().numpy()
    diff = np.abs(got.astype(np.float64) - ref64)
    max_abs = float(diff.max()) if diff.size else 0.0
    return max_abs, max_abs / max(float(np.abs(ref64).max()), 1e-30)


def check_parity(model: torch.nn.Module, runtime, prompt: torch.Tensor, steps: int = 16,
                 dtype: str = "fp32", tolerances: dict | None = None) -> ParityReport:
    """Run ``prompt`` then ``steps`` greedy tokens through eager and the artifact's runtime; each output
    must be within ``tolerances[output]`` (default: the dtype's :data:`TOLERANCE`)."""
    worst_prefill, worst_decode = (0.0, 0.0), (0.0, 0.0)
    with torch.no_grad():
        ref_logits, past = model(prompt)
    result = runtime.step(prompt.cpu().numpy(), 0, runtime.initial_caches(prompt.shape[0]))
    worst_prefill = _errors(result.logits, ref_logits)
    graphs = {"prefill": getattr(runtime, "last_graph", None)}
    decode_graphs = set()
    tokens_equal, detail = True, ""
    pos = prompt.shape[1]
    nxt_ref = ref_logits[:, -1].argmax(-1, keepdim=True)
    for step in range(steps):
        nxt_art = torch.from_numpy(result.logits[:, -1].argmax(-1)[:, None].astype(np.int64)).to(nxt_ref.device)
        if not torch.equal(nxt_art, nxt_ref):
            tokens_equal = False
            detail = f"greedy token differs at decode step {step}"
            break
        with torch.no_grad():
            ref_logits, past = model(nxt_ref, past)
        result = runtime.step(nxt_ref.cpu().numpy(), pos, result.caches)
        decode_graphs.add(getattr(runtime, "last_graph", None))
        err = _errors(result.logits, ref_logits)
        worst_decode = (max(worst_decode[0], err[0]), max(worst_decode[1], err[1]))
        nxt_ref = ref_logits[:, -1].argmax(-1, keepdim=True)
        pos += 1
    outputs = [OutputError("logits/prefill", *worst_prefill), OutputError("logits/decode", *worst_decode)]
    tols = {o.name: (tolerances or {}).get(o.name, TOLERANCE[dtype]) for o in outputs}
    passed = tokens_equal and all(o.max_rel <= tols[o.name] for o in outputs)
    graphs["decode"] = ", ".join(sorted(g for g in decode_graphs if g)) or None
    graphs = {k: v for k, v in graphs.items() if v}
    return ParityReport(passed, steps, max(tols.values()), outputs, tokens_equal, detail, tolerances=tols,
                        graphs=graphs)


STRUCTURE_IGNORED = ("Cast", "Constant")
"""Op types a half-precision graph may have in other numbers than its fp32 twin (dtype conversions,
folded constants)."""


def compare_structure(path: str, twin_path: str) -> str:
    """"" when the ONNX graphs at ``path`` and ``twin_path`` have the same op types in the same
    numbers (main graph and model-local functions, :data:`STRUCTURE_IGNORED` aside; a ``Clip`` counts
    as the ``Max`` / ``Min`` of its bounds, a ``SkipSimplifiedLayerNormalization`` as its residual
    ``Add`` and ``SimplifiedLayerNormalization``, a GroupQueryAttention with packed Q/K/V as itself and the two
    ``MatMul`` nodes packing saved; an artifact with the CUDA-only fusions is compared with the
    twin fused the same way), else the first few differences as "op: n vs m"."""
    from collections import Counter

    import onnx

    from effexport.exporter.backends.onnx.ort_cuda import has_cuda_fusions, with_cuda_fusions
    from effexport.exporter.backends.onnx.ort_pack import is_packed

    def kinds(n) -> list[str]:
        if n.op_type == "Clip" and n.domain in ("", "ai.onnx"):  # Min(Max(x, lo), hi): the optimizer folds
            # it into a Clip only where it can read both bounds as constants (fp32: yes; bf16: not always)
            bounds = list(n.input[1:3]) + [""] * 2
            return ["Max"] * bool(bounds[0]) + ["Min"] * bool(bounds[1])
        if n.op_type == "SkipSimplifiedLayerNormalization" and n.domain == "com.microsoft":
            # the residual Add(s) and the norm it fuses: a half-precision model that keeps its residual
            # stream in fp32 (ZAYA1) has Add -> Cast -> norm, which the fused op (one type for the sum
            # and the output) cannot take, where its fp32 twin fuses
            bias = len(n.input) > 3 and bool(n.input[3])
            return ["ai.onnx::Add"] * (1 + bias) + ["ai.onnx::SimplifiedLayerNormalization"]
        if is_packed(n):  # one MatMul for the three projections: the twin may keep three (.ort_pack)
            return [n.op_type, "ai.onnx::MatMul", "ai.onnx::MatMul"]
        return [n.op_type]

    def ops(model) -> Counter:
        nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
        return Counter(k if "::" in k else f"{n.domain or 'ai.onnx'}::{k}" for n in nodes
                       if n.op_type not in STRUCTURE_IGNORED for k in kinds(n))

    artifact, twin = (onnx.load(p, load_external_data=False) for p in (path, twin_path))
    if has_cuda_fusions(artifact):  # CUDA-only fusions (exporter/backends/onnx/ort_cuda.py): fuse the twin too
        twin = with_cuda_fusions(twin)
    a, b = ops(artifact), ops(twin)
    diff = [f"{k} {a[k]} vs {b[k]}" for k in sorted(set(a) | set(b)) if a[k] != b[k]]
    return ", ".join(diff[:5]) + (f" (+{len(diff) - 5} more)" if len(diff) > 5 else "")


class EagerRuntime:
    """An eager step-contract model behind the runtime interface (``initial_caches`` / ``step``), so
    :func:`check_parity` can compare two eager models (half precision against fp32)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device

    def initial_caches(self, batch: int):
        return None

    def step(self, input_ids: np.ndarray, pos: int, caches):
        from effexport.exporter.backends.artifact import StepResult

        with torch.no_grad():
            logits, past = self.model(torch.from_numpy(np.asarray(input_ids)).to(self.device), caches)
        return StepResult(logits.float().cpu().numpy(), past)


HALF_MARGIN = 1.5
"""A half-precision artifact passes when its logits are no further from fp32 eager than this times
eager's own error in that dtype (or the dtype's tolerance, whichever is larger)."""


def check_parity_half(half: torch.nn.Module, fp32: torch.nn.Module, runtime, prompt: torch.Tensor,
                      steps: int, dtype: str, tolerances: dict | None = None,
                      own: ParityReport | None = None) -> ParityReport:
    """Parity of a bf16 / fp16 artifact against fp32 eager, measured against what eager itself loses
    in that dtype: every output's max relative error against fp32 eager must be at most
    ``max(TOLERANCE[dtype], HALF_MARGIN * eager-in-dtype's error against fp32 eager)`` (``tolerances[output]``
    in place of ``TOLERANCE[dtype]`` where given), and its greedy
    tokens must equal fp32 eager's or eager-in-dtype's (unless eager-in-dtype's own tokens leave fp32's).
    A tight comparison of two half-precision computations would fail models whose rounding differs
    by order of operations alone (fused norms, fp32 softmax), with neither nearer the fp32 truth.
    ``own``: eager-in-dtype's report against fp32 eager when the caller has measured it (a sharded
    check: teacher-forced on fp32 eager's tokens over every step); default ``check_parity`` of
    ``EagerRuntime(half)``."""
    art = check_parity(fp32, runtime, prompt, steps, "fp32")
    own = own or check_parity(fp32, EagerRuntime(half), prompt, steps, "fp32")
    same_dtype = check_parity(half, runtime, prompt, steps, dtype)
    bound = {o.name: max((tolerances or {}).get(o.name, TOLERANCE[dtype]), HALF_MARGIN * o.max_rel)
             for o in own.outputs}
    tokens = art.tokens_equal or same_dtype.tokens_equal or not own.tokens_equal
    passed = tokens and all(o.max_rel <= bound[o.name] for o in art.outputs)
    detail = "; ".join(filter(None, [
        "bounds " + ", ".join(f"{k} {v:.2e}" for k, v in bound.items()),
        f"eager {dtype} vs fp32 eager: " + ", ".join(f"{o.name} max rel {o.max_rel:.2e}" for o in own.outputs)
        + (", greedy tokens identical" if own.tokens_equal else f", {own.detail}"),
        f"artifact vs eager {dtype}: " + ", ".join(f"{o.name} max rel {o.max_rel:.2e}" for o in same_dtype.outputs)
        + (", greedy tokens identical" if same_dtype.tokens_equal else f", {same_dtype.detail}"),
        art.detail]))
    return ParityReport(passed, steps, max(bound.values()), art.outputs, art.tokens_equal, detail,
                        f"the {dtype} artifact against fp32 eager, bounded by eager {dtype}'s own error",
                        tolerances=bound, tokens_ok=tokens)
