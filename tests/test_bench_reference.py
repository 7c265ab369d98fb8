"""``bench/_reference.py`` on the CPU: the fp32 reference streamed a layer at a time computes what a
full fp32 copy of the half-precision weights computes, and leaves the model as it found it; ``topk``
choices recorded on one run and pinned on another (eager, and the rewritten graph with its ``aten.topk``
hooked); ``bench/torch_engine.py``'s routing diagnosis end to end."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import _reference as ref  # noqa: E402
from _helpers import tiny_gemma3  # noqa: E402

from effexport.samples import get_sample  # noqa: E402

CPU = torch.device("cpu")
FAMILIES = ["laguna-xs2:tiny", "zaya1-8b:tiny", "deepseek-v4-flash:tiny", "gemma4-e2b:tiny"]


def _half(name: str):
    sample = get_sample(name)
    return sample, sample.build(device=CPU).to(torch.bfloat16).eval()


def _state(model):
    return {k: (v, v.dtype, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_streamed_fp32_is_a_full_fp32_copy_of_the_half_weights_and_restores_them(name):
    sample, half = _half(name)
    before = _state(half)
    full = copy.deepcopy(half).float()
    ids = torch.randint(0, sample.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own, _ = half(ids)
        want, past_w = full(ids)
        got, past_g = ref.Fp32Eager(half)(ids)
        want2, _ = full(ids[:, :1], past_w)
        got2, _ = ref.Fp32Eager(half)(ids[:, :1], past_g)
    assert got.dtype == torch.float32 and torch.equal(got, want) and torch.equal(got2, want2)
    assert len(ref.streamed_blocks(half)) >= len(half.layers)  # the decoder layers at least
    after = half.state_dict(keep_vars=True)
    for key, (tensor, dtype, value) in before.items():  # the same tensors, their dtypes and values
        assert after[key] is tensor and tensor.dtype == dtype and torch.equal(tensor, value), key
    with torch.no_grad():  # and the model computes in bf16 again
        assert torch.equal(half(ids)[0], own) and not torch.equal(own.float(), want)


def test_streamed_fp32_upcasts_one_block_at_a_time_and_restores_after_a_failure():
    sample, half = _half("laguna-xs2:tiny")
    blocks = ref.streamed_blocks(half)
    seen = []

    def spy(block, _args):
        seen.append(sum(b is not block and any(p.dtype == torch.float32 for p in b.parameters()) for b in blocks))
    handles = [b.register_forward_pre_hook(spy) for b in blocks]
    ids = torch.randint(0, sample.config.vocab_size, (1, 5))
    with torch.no_grad():
        ref.Fp32Eager(half)(ids)
    assert seen == [0] * len(blocks)  # no other block is fp32 while one starts
    for h in handles:
        h.remove()
    before = _state(half)

    def boom(_block, _args, _out):
        raise RuntimeError("boom")
    handle = blocks[2].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        ref.Fp32Eager(half)(ids)
    handle.remove()
    for key, (tensor, dtype, value) in before.items():
        assert tensor.dtype == dtype and torch.equal(tensor, value), key


def test_pinned_to_its_own_choices_a_run_is_unchanged_and_to_others_it_follows_them():
    """Laguna tiny (sigmoid router, top-2 of 8): pinned to its own recording the logits are bit-equal
    and nothing flips; pinned to the choices of the same model with its router biases moved, it routes
    as that model does (every ``topk`` flipped somewhere, the logits moved) -- and a run of the moved
    model itself pinned back to the first model's choices gives the first model's logits."""
    sample, half = _half("laguna-xs2:tiny")
    model = half.float()
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for layer in moved.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, sample.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with ref.record_topk() as own:
            base, _ = model(ids)
        with ref.record_topk() as other:
            moved_out, _ = moved(ids)
        with ref.pin_topk(own) as log:
            again, _ = model(ids)
        with ref.pin_topk(other) as log_other:
            follows, _ = model(ids)
    assert len(own.indices) == sample.config.num_hidden_layers - 1  # one per MoE layer (the first is dense)
    assert torch.equal(again, base) and log.summary()["flipped_rows"] == 0
    s = log_other.summary()
    assert s["calls_with_flips"] == s["calls"] == len(own.indices) and s["flipped_rows"] > 0
    assert (follows - base).abs().max() > 1e-2 * base.abs().max()
    with torch.no_grad(), ref.pin_topk(own):
        back, _ = moved(ids)
    assert (back - base).abs().max() <= 1e-5 * base.abs().max()  # the biases only select: same weights once pinned
    with pytest.raises(RuntimeError, match="no recorded twin"), torch.no_grad(), ref.pin_topk(own):
        model(ids[:, :4])  # another computation (fewer rows)


def test_the_rewritten_graph_hooked_is_pinned_as_eager_is():
    """The rewritten step of Laguna tiny (fp32, buffer caches) with its 7 ``aten.topk`` nodes hooked:
    unpinned it is the rewritten step; pinned to another routing it gives eager's logits pinned to the
    same routing (1e-5), prefill and a decode step."""
    import torch_engine

    from effexport.exporter.backends.torch import TorchEngine

    sample = torch_engine.real_sample("laguna-xs2:tiny")
    model32, _ = torch_engine.build_models(sample, torch.float32, CPU, False)
    program, analysis = torch_engine.rewrite(sample, model32, CPU, 64)
    plain = TorchEngine(program.gm, analysis.plan.entries, CPU, compile=False, cuda_graphs=False)
    gm, hooked = ref.topk_hooked(plain.module)
    assert hooked == 7 and not any(n.target is torch.ops.aten.topk.default for n in gm.graph.nodes)
    pinned = TorchEngine(gm, plain.entries, CPU, compile=False, cuda_graphs=False, inplace=False, pack=False)
    moved = copy.deepcopy(model32)
    with torch.no_grad():
        for layer in moved.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.add_(torch.randn(8, generator=torch.Generator().manual_seed(5)))
    ids = torch.randint(0, sample.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    tok = torch.randint(0, sample.config.vocab_size, (2, 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with ref.record_topk() as other:
            _, past = moved(ids)
            moved(tok, past)
        with ref.pin_topk(other):
            e0, past = model32(ids)
            e1, _ = model32(tok, past)
        a0, caches = plain.step(ids, 0, plain.initial_caches(2))
        u0, _ = pinned.step(ids, 0, pinned.initial_caches(2))
        with ref.pin_topk(other) as log:
            p0, caches = pinned.step(ids, 0, pinned.initial_caches(2))
            p1, _ = pinned.step(tok, 11, caches)
    assert torch.equal(u0, a0)
    assert log.summary()["flipped_rows"] > 0
    for got, want in ((p0, e0), (p1, e1)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("mode,how", [("always", "full"), ("never", "none"), ("streamed", "streamed"), ("auto", "full")])
def test_fp32_reference_modes_off_cuda(mode, how):
    import torch_engine

    assert torch_engine.fp32_fits(get_sample("laguna-xs2:tiny"), CPU, mode)[0] == how


def test_torch_engine_streamed_reference_and_routing_end_to_end(tmp_path):
    """``--real laguna-xs2:tiny --fp32-ref streamed`` on the CPU: the reference is the streamed one,
    and the routing diagnosis pins eager bf16 and the rewritten step to fp32's choices: pinned, both
    are at bf16's rounding; unpinned, the rows whose routing flips put both several times higher."""
    out = tmp_path / "te"
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "torch_engine.py"), "--device", "cpu", "--real",
                    "laguna-xs2:tiny", "--fp32-ref", "streamed", "--contexts", "96", "--batches", "1", "--decode", "2",
                    "--reps", "1", "--out", str(out)], check=True, capture_output=True, text=True)
    (case,) = json.load(open(out / "torch_engine.json"))["cases"]
    e = case["errors"]
    assert case["fp32_ref"] == "--fp32-ref streamed" and e["reference"].startswith("fp32 eager (the weights upcast")
    r = e["routing"]
    assert r["topk_calls"] == 7 * 3  # 7 MoE layers, prefill + 2 steps
    for key, run in (("eager", r["eager_pinned"]), ("rewritten", r["rewritten_pinned"])):
        assert run["calls"] == 21 and run["rows"] == 7 * (64 + 2), run
        assert run["vs_fp32"] < 5e-2, run  # bf16's rounding once the routing is fp32's
        assert e[key]["vs_fp32"] > 4 * run["vs_fp32"], (e[key], run)  # the flips' share of the error
    assert r["rewritten_pinned"]["hooked_topk_nodes"] == 7


def test_ort_graphs_fp32_column_is_the_streamed_upcast_of_an_hf_model():
    """``bench/ort_graphs.py``'s fp32 column (``_Eager.run_fp32``) on a Hugging Face model (tiny Gemma 3,
    bf16): the logits of a full fp32 copy of the same weights, bit for bit, without holding one; the
    bf16 model unchanged after."""
    import ort_graphs

    model = tiny_gemma3().to(torch.bfloat16).eval()
    eager = ort_graphs._Eager(model, lambda out: out.logits)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    before = _state(model)
    with torch.no_grad():
        own = eager.run(ids)
        want = copy.deepcopy(model).float()(ids).logits
        got = eager.run_fp32(ids)
    assert got.dtype == torch.float32 and torch.equal(got, want) and not torch.equal(own.float(), want)
    for key, (tensor, dtype, value) in before.items():
        assert tensor.dtype == dtype and torch.equal(tensor, value), key
    with torch.no_grad():
        assert torch.equal(eager.run(ids), own)
