"""Shared test helpers: one per-dtype tolerance table, a parity assertion that prints the worst element, and
the check that a parity run is long enough for a sample's layout."""
import torch

# max relative error allowed, relative to the reference's max magnitude (plus a tiny absolute floor)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def max_errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |expected|) over the finite entries of ``expected``; a
    non-finite entry (a state starting at -inf) must be matched exactly, else the errors are inf."""
    a, e = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(e)
    if not bool(finite.all()):
        if not torch.equal(torch.isfinite(a), finite) or not torch.equal(a[~finite].nan_to_num(), e[~finite].nan_to_num()) \
                or bool(torch.isnan(a[~finite]).ne(torch.isnan(e[~finite])).any()):
            return float("inf"), float("inf")
        a, e = a[finite], e[finite]
    diff = (a - e).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    return max_abs, max_abs / max(scale, 1e-30)


def assert_close(actual, expected, dtype=torch.float32, rtol=None, what="output"):
    """Assert ``max|a-e| / max|e| <= rtol`` (rtol from :data:`TOLERANCE` by dtype); on failure name
    the worst element."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol = TOLERANCE[dtype] if rtol is None else rtol
    max_abs, max_rel = max_errors(actual, expected)
    if not max_rel <= rtol:
        diff = (actual.double() - expected.double()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: max rel error {max_rel:.3e} > {rtol:.1e} (max abs {max_abs:.3e}) at {idx}: "
            f"got {actual[idx].item():.6g}, expected {expected[idx].item():.6g}")
    return max_abs, max_rel


MIN_DECODE = 8  # decode steps every parity run takes at least


def assert_long_enough(specs, prefill: int, decode: int) -> None:
    """A prefill of ``prefill`` tokens then ``decode`` one-token steps reach every path of a layout
    (``samples._spec.LayerSpec`` list): the prefill is longer than every window (rings wrap during
    the prefill itself), holds at least two completed compressed blocks of each ratio and more
    than top-k of them (the selection drops entries), a block completes during the decode steps,
    and there are at least :data:`MIN_DECODE` of them."""
    assert decode >= MIN_DECODE, f"{decode} decode steps < {MIN_DECODE}"
    for spec in specs:
        if spec.window is not None:
            assert prefill > spec.window, f"layer {spec.index}: prefill {prefill} <= window {spec.window}"
        if spec.ratio:
            blocks = prefill // spec.ratio
            assert blocks >= 2 and blocks > (spec.topk or 0), (
                f"layer {spec.index}: {blocks} compressed entries after the prefill, top-k {spec.topk}")
            assert any((t + 1) % spec.ratio == 0 for t in range(prefill, prefill + decode)), (
                f"layer {spec.index}: no block of {spec.ratio} completes during the decode steps")


def step_feeds(session, ids, pos: int, caches) -> dict:
    """An ONNX step's feeds by input name: ``input_ids``, ``pos`` (and ``pos_host``, the ort profile's
    host copy of it, when the step has one), then the caches in plan order."""
    import numpy as np

    names = [i.name for i in session.get_inputs()]
    position = np.array(pos, np.int64)
    values = [np.asarray(ids), position] + ([position] if "pos_host" in names else []) + list(caches)
    return dict(zip(names, values))


def greedy(model, prompt: torch.Tensor, n: int):
    """The eager model's ``n`` greedy tokens after ``prompt`` ``[B, L]`` (its own cache): ``[B, n]``."""
    from effexport.exporter.verify.sharded import greedy_stream

    return greedy_stream(model, prompt, n)[:, prompt.shape[1]:].numpy()


def run_cli(*args: str) -> tuple[int, str]:
    """``effexport ARGS...`` in this process: (exit code, what it wrote to stderr)."""
    import contextlib
    import io

    from effexport.exporter.cli import main

    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        code = main(list(args))
    return code, log.getvalue()


CONTROL_FLOW = {"Loop", "Scan", "If"}


def control_flow(model) -> list[str]:
    """``where:op`` of every Loop / Scan / If of an ONNX model, in its main graph or a function body
    (ONNX Runtime inlines the bodies; its CUDA EP refuses a CUDA-graph capture with control flow)."""
    nodes = [("graph", n) for n in model.graph.node] + [(f.name, n) for f in model.functions for n in f.node]
    return [f"{where}:{n.op_type}" for where, n in nodes if n.op_type in CONTROL_FLOW]


def assert_sinkhorn_unrolled(model) -> int:
    """Every ``effexport::sinkhorn`` / ``mhc_pre`` node's body is its ``iters`` unrolled: 2 iters - 1
    normalisations (ReduceSum + Div each; mhc_pre has one ReduceSum more, u's stream sum). Returns
    how many such nodes there are."""
    import onnx

    bodies = {(f.domain, f.name, f.overload): f for f in model.functions}
    sites = [n for n in model.graph.node if n.domain == "effexport" and n.op_type in ("sinkhorn", "mhc_pre")]
    for node in sites:
        iters = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "iters")
        ops = [m.op_type for m in bodies[node.domain, node.op_type, node.overload].node]
        extra = node.op_type == "mhc_pre"
        assert (ops.count("ReduceSum"), ops.count("Div")) == (2 * iters - 1 + extra, 2 * iters - 1), \
            f"{node.name} ({node.op_type}, iters={iters}): {ops.count('ReduceSum')} ReduceSum, {ops.count('Div')} Div"
    return len(sites)


def tiny_gemma3(head_dim: int = 32, max_positions: int = 256, directory=None):
    """A tiny Hugging Face Gemma 3 (hidden 64, 2 layers: sliding then full, one KV head, vocab 256,
    random weights from seed 0): saved to ``directory`` and returned there, or the model itself."""
    import transformers

    config = transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=head_dim, sliding_window=16, vocab_size=256, query_pre_attn_scalar=head_dim,
        max_position_embeddings=max_positions, layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config)
    if directory is None:
        return model
    model.save_pretrained(directory, safe_serialization=True)
    return directory
