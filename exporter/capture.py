"""Capture a model's decode step with ``torch.export`` (non-strict) as a flat FX graph.

One graph serves prefill and decode: ``step(input_ids [B, T], past) -> (logits [B, T, V], present)``
with batch, new-token count T and past length P all dynamic (P = 0 is prefill). The sample's own
cache layout (full-length K/V, conv states, ...) is what gets captured; the passes then rewrite it
into the CachePlan's layout. Which dims of each cache tensor grow with the sequence is found by
running the eager model at two prompt lengths and comparing shapes (meta device for real sizes).

The result is a :class:`StepProgram`: a GraphModule with a flat signature
``(input_ids, *past tensors) -> (logits, *present tensors)`` plus the input/output names
(``past.{layer}.{name}`` / ``present.{layer}.{name}``).
"""
from __future__ import annotations

import contextlib
import re
import time
import warnings

import torch
from torch import fx
from torch.utils import _pytree as pytree

from effexport.exporter.errors import CaptureError
from effexport.exporter.progress import phase
from effexport.passes.program import StepProgram


# torch's own pytree internals trip their deprecation of LeafSpec during torch.export (torch 2.13):
# a FutureWarning about torch's code, not the user's, printed into every build's output
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


def path_key(path) -> str:
    """Pytree key path of a dict entry -> its key string."""
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "idx", last)))


def growing_dims(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict, dict[str, int | None]]:
    """Run prefill at two prompt lengths (L // 2 and L); returns (past at L, cache name -> seq dim).

    Lengths far apart, so caches that grow only every r tokens (compressed entries) are seen to grow
    too; the prompt should hold at least two blocks of the largest compression ratio."""
    with torch.no_grad():
        _, past_a = model(ids[:, :max(3, ids.shape[1] // 2)])
        _, past_b = model(ids)
    dims: dict[str, int | None] = {}
    for name, a in past_a.items():
        b = past_b[name]
        changed = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if len(changed) > 1:
            raise CaptureError(f"cache tensor {name!r} changes in {len(changed)} dims per token; "
                               "one sequence dim is supported")
        dims[name] = changed[0] if changed else None
    return past_b, dims


def fast_export_config() -> contextlib.AbstractContextManager:
    """torch settings that make ``torch.export`` of a large model faster, same graph.

    FakeTensor's dispatch cache is switched off: with symbolic shapes, building a cache entry and
    rebuilding the output from it cost more sympy work than running the meta kernel again (measured
    on 4 layers of DeepSeek V4-Flash on meta: export 70 s with the cache, 42 s without)."""
    dynamo_config = torch._dynamo.config
    if not hasattr(dynamo_config, "fake_tensor_cache_enabled"):  # a future torch without the switch
        return contextlib.nullcontext()
    return dynamo_config.patch(fake_tensor_cache_enabled=False)


def _mismatch(a, b) -> int:
    """Elements of two output pytrees that differ (rtol 1e-5; a shape or structure change counts all)."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return 1 << 30
    bad = 0
    for x, y in zip(la, lb):
        if not isinstance(x, torch.Tensor) or x.shape != y.shape:
            bad += 1 << 20
        elif x.is_floating_point():
            bad += int((~torch.isclose(x.float(), y.float(), rtol=1e-5, atol=1e-6, equal_nan=True)).sum())
        else:
            bad += int((x != y).sum())
    return bad


def initial_fills(model: torch.nn.Module, prompt: torch.Tensor, past: dict, seq_dims: dict) -> dict[str, float]:
    """Each fixed-size state's prefill value, where it is not zero: ``{name: fill}``.

    A model's prefill (``past=None``) starts its states from its own empty values, which the step
    graph cannot see: the artifact's prefill feeds the CachePlan's empty caches instead. A state the
    passes rewrite is masked by position in the rewritten graph, but one they leave alone (a compressor
    not recognised) reads them as written: DeepSeek V4's compressor starts its gate scores at -inf
    ("empty slot"), and started from zeros its first entries pool empty slots (rel 2.5e-2 off at a
    5-token prefill). So the eager model runs the prompt from an explicit empty past (zero-length
    growing caches, states filled) and its logits and presents must equal its own prefill's: all
    zeros first, then -inf tried state by state where it brings them closer. Nothing found that
    reproduces the prefill is refused; a model that cannot take an explicit empty past is taken as it
    is (zeros)."""
    states = [name for name, dim in seq_dims.items() if dim is None]
    if prompt.device.type == "meta":
        return {}

    def run(fills: dict) -> int:
        empty = {name: (t.narrow(seq_dims[name], 0, 0) if seq_dims[name] is not None
                        else torch.full_like(t, fills.get(name, 0.0))) for name, t in past.items()}
        return _mismatch(model(prompt, empty), want)

    with torch.no_grad():
        want = model(prompt)
        try:
            fills: dict[str, float] = {}
            err = run(fills)
        except Exception:  # the model's forward takes no explicit empty past: nothing to learn
            return {}
        for name in states if err else ():
            trial = {**fills, name: float("-inf")}
            e = run(trial)
            if e < err:
                fills, err = trial, e
    if err:
        raise CaptureError(
            "the model's prefill (past=None) is not reproduced from an empty cache (zero-length growing caches, "
            f"states zero or -inf): {err} output values differ; states: {', '.join(states) or 'none'}. The artifact "
            "starts every step sequence from such a cache, so its prefill would differ from the model's")
    return fills


class _Sizes:
    """What an export guard reads of one input: ``.size()`` (``L['input_ids'].size()[1]``)."""

    def __init__(self, shape):
        self.shape = list(shape)

    def size(self):
        return self.shape


_NEW = "L['input_ids'].size()[1]"
_STEP_SEARCH = 8192  # new-token counts the guards are evaluated at (a larger bound: none recorded)


def _max_new_tokens(ep, new: torch.Tensor, past: dict) -> int | None:
    """The largest new-token count T for which every guard of the new-token count alone holds, or None.

    A Python loop over chunks of the new tokens (Qwen3-Next's gated delta rule: ``for i in
    range(num_chunks)``) is unrolled at the example's chunk count; export keeps the count only as a
    guard (``((T + (64 - T % 64) % 64) // 64) == 1``), which nothing enforces once the graph is
    lowered, so a longer step computes one chunk of a longer sequence: wrong (0.13 max rel at 70
    and 150 tokens). The guards that read no size but T and the batch are evaluated at T = example
    .. 8192 (the other sizes at the example's); the first T failing one bounds the step: the artifact
    records the bound (``max_step_tokens``) and its runtimes feed longer inputs in pieces. An upper bound
    export put on T's range itself caps it too."""
    bound = None  # the range export itself put on T (``ep.range_constraints``), if finite
    user = ep.graph_signature.user_inputs[:1]  # input_ids (parameters are placeholders too, before it)
    t = next((n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user), None)
    t = t.meta.get("val").shape[1] if t is not None and isinstance(t.meta.get("val"), torch.Tensor) else None
    if isinstance(t, torch.SymInt) and t.node.expr in ep.range_constraints:
        upper = ep.range_constraints[t.node.expr].upper
        bound = None if bool(upper >= 2 ** 62) else int(upper)
    guards = []
    for code in getattr(ep, "_guards_code", ()):
        batchless = re.sub(r"L\['past'\]\['[^']+'\]\.size\(\)\[0\]", "", code)  # past batch sizes are fine
        if _NEW not in code or "L['past']" in batchless or re.search(r"stride|_base|storage", code):
            continue
        try:
            guards.append(compile(code, "<guard>", "eval"))
        except SyntaxError:
            continue
    if not guards:
        return bound
    env = {"L": {"input_ids": _Sizes(new.shape), "past": {k: _Sizes(v.shape) for k, v in past.items()}}}

    def holds(t: int) -> bool:
        env["L"]["input_ids"].shape[1] = t
        ok = True
        for g in guards:
            try:
                ok = ok and bool(eval(g, {"__builtins__": {"min": min, "max": max, "abs": abs}}, env))
            except Exception:  # a guard this evaluation cannot read: not a bound
                continue
        return ok

    start = new.shape[1]
    if not holds(start):
        return bound
    for t in range(start + 1, min(bound or _STEP_SEARCH, _STEP_SEARCH) + 1):
        if not holds(t):
            return t - 1
    return bound


def _check_dynamic(graph: fx.Graph, in_names: list[str], seq_dims: dict) -> None:
    """Fail clearly if export specialised batch, T or a cache length to its example value."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, in_names):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        dims = {0: "batch"}
        if name == "input_ids":
            dims[1] = "new-token count"
        elif seq_dims.get(name) is not None:
            dims[seq_dims[name]] = "cache length"
        for dim, what in dims.items():
            if not isinstance(val.shape[dim], torch.SymInt):
                raise CaptureError(
                    f"torch.export specialised the {what} of {name!r} to {val.shape[dim]}: the model's "
                    "forward branches on that size, so the graph would only run at that size; make the "
                    "branch shape-independent (torch.where / torch.cond) and export again")


def _guard_text(guard: str) -> str:
    """A guard of torch.export's ``_guards_code`` in the step's input names: ``L['past']['0.k'].size()[2]``
    -> ``past.0.k.shape[2]``."""
    guard = re.sub(r"L\['input_ids'\]\.size\(\)\[(\d+)\]", r"input_ids.shape[\1]", guard)
    return re.sub(r"L\['past'\]\['([^']+)'\]\.size\(\)\[(\d+)\]", r"past.\1.shape[\2]", guard)


_SIZE = r"L\['(?:input_ids'\]|past'\]\['[^']+'\])\.size\(\)\[\d+\]"
# export's guard for a Python comparison of a length (or a sum of lengths) with a number
_LENGTH_THRESHOLD = re.compile(rf"^{_SIZE}(?: \+ {_SIZE})* (?:<=|>=|<|>) -?\d+$")


def _check_length_branches(graph: fx.Graph, in_names: list[str], seq_dims: dict, ep) -> None:
    """Fail clearly if the model's forward branched on a cache length in Python (``if keys > 64:
    window``): export traced the branch the example took and kept the condition only as a guard on
    the inputs, which nothing enforces once the graph is rewritten and lowered, so the graph would
    compute that branch at every length. Seen two ways: a guard that compares the key count (a
    growing cache's length, plus the new tokens) with a number, and an upper bound export put on a
    cache length. A bound on the new-token count alone is allowed: the artifact records it
    (``max_step_tokens``, :func:`_max_new_tokens`) and its runtimes feed longer steps in pieces."""
    guards = [_guard_text(g) for g in getattr(ep, "_guards_code", ())]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, in_names):
        val, dim = node.meta.get("val"), seq_dims.get(name)
        if dim is None or not isinstance(val, torch.Tensor) or not isinstance(val.shape[dim], torch.SymInt):
            continue
        length = f"{name}.shape[{dim}]"
        branch = [g for g, raw in zip(guards, getattr(ep, "_guards_code", ())) if _LENGTH_THRESHOLD.match(raw) and length in g]
        bounds = [int(ep.range_constraints[s].upper) for s in val.shape[dim].node.expr.free_symbols
                  if s in ep.range_constraints and not bool(ep.range_constraints[s].upper >= 2 ** 62)]  # int_oo: none
        if branch or bounds:
            raise CaptureError(
                f"the model's forward branches on the cache length of {name!r} in Python ("
                + "; ".join(branch or [f"torch.export bounded it to at most {min(bounds)}"])
                + "): the captured graph keeps only the branch its example took and would compute it at "
                "every length; write the branch with tensor ops (torch.where) or torch.cond")


def dynamic_spec(seq_dims: dict) -> tuple:
    """``dynamic_shapes`` for ``model(input_ids, past)``: batch and new-token count of the ids, batch
    and (where it grows) the sequence dim of every past tensor, all ``Dim.AUTO``."""
    auto = torch.export.Dim.AUTO
    return ({0: auto, 1: auto},
            {name: ({0: auto, d: auto} if d is not None else {0: auto}) for name, d in seq_dims.items()})


def capture_step(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int = 3) -> StepProgram:
    """Export ``model(input_ids[:, -new_tokens:], past)`` with dynamic batch, T and P.

    ``input_ids`` ``[B, L]`` is an example sequence (B >= 2, L - new_tokens >= 3 so no size is 0/1).
    The example T (3 by default) should differ from the model's small static sizes (conv kernels,
    head counts): torch.export silently unifies a dynamic size with an equal static one."""
    if input_ids.shape[0] < 2 or input_ids.shape[1] - new_tokens < 3 or new_tokens < 2:
        raise CaptureError("capture needs example input_ids with batch >= 2 and >= 3 prompt + >= 2 new tokens")
    prompt, new = input_ids[:, :-new_tokens], input_ids[:, -new_tokens:]
    phase("capture: eager prefill at two lengths (which cache dims grow)")
    past, seq_dims = growing_dims(model, prompt)
    phase("capture: torch.export")
    start = time.monotonic()
    try:
        with fast_export_config():
            ep = torch.export.export(model, (new, past), dynamic_shapes=dynamic_spec(seq_dims), strict=False)
    except Exception as exc:  # torch raises many types; report them as a capture error
        raise CaptureError(f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    seconds = time.monotonic() - start
    gm = ep.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()  # flat signature: (input_ids, *past) -> (logits, *present)
    with torch.no_grad():
        eager_out = model(new, past)
    in_names = ["input_ids"] + [f"past.{path_key(p)}" for p, _ in pytree.tree_flatten_with_path(past)[0]]
    out_flat = pytree.tree_flatten_with_path(eager_out)[0]
    out_names = ["logits"] + [f"present.{path_key(p)}" for p, _ in out_flat[1:]]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    _check_dynamic(graph, in_names, {f"past.{k}": v for k, v in seq_dims.items()})
    _check_length_branches(graph, in_names, {f"past.{k}": v for k, v in seq_dims.items()}, ep)
    max_new = _max_new_tokens(ep, new, past)
    phase("capture: the states' prefill values")
    fills = initial_fills(model, prompt, past, seq_dims)
    if len(placeholders) != len(in_names):
        raise CaptureError(f"captured graph has {len(placeholders)} inputs, expected {len(in_names)}")
    output = next(n for n in graph.nodes if n.op == "output")
    flat = pytree.tree_leaves(output.args[0])
    output.args = (tuple(flat),)
    graph.lint()
    gm = fx.GraphModule(gm, graph)  # a fresh module: no export input-spec hooks, flat signature
    return StepProgram(gm, in_names, out_names, {f"past.{k}": v for k, v in seq_dims.items()}, seconds,
                       {f"past.{k}": v for k, v in fills.items()}, max_new)
