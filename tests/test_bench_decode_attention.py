"""bench/decode_attention.py: argument handling, the byte counts of the buffer cases, the HCA
bytes model (CPU), and one tiny run of the script on a GPU (``gpu`` marker)."""
import importlib.util
import json
import os

import pytest
import torch

PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "decode_attention.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decode_attention_bench", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_kernel_is_a_usage_error(bench):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--kernels", "buffer,nope"])
    assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_a_gpu_exits_4(bench, tmp_path):
    assert bench.main(["--kernels", "buffer,buffer_short,hca", "--out", str(tmp_path)]) == 4


@pytest.mark.parametrize("name,capacity,inplace", [
    ("buffer", 64, True), ("buffer_functional", 64, False), ("buffer_short", 256, True),
    ("buffer_inloop", 64, True)])
def test_buffer_case_bytes_and_reference(bench, monkeypatch, name, capacity, inplace):
    """The bytes a buffer case counts: rows 0..pos-1 of K and V, the new row read (and written in
    place, or the whole buffer copied for the functional op), q and out; the case's op on CPU (the
    eager reference) gives its reference's output."""
    monkeypatch.setattr(bench, "DEV", "cpu")
    monkeypatch.setattr(bench, "BIG_CAPACITY", 256)
    ctx, batch, d = 64, 2, 512
    make, nbytes, kern, ref, _ = bench.CASES[name](ctx, batch, torch.Generator().manual_seed(0))
    args = make()
    assert args[3].shape == (batch, 1, capacity, d) and int(args[5]) == ctx - 1
    row = 2 * batch * d * 2  # one K row and one V row of every batch item, bf16
    q_out = 2 * batch * 8 * d * 2
    # rows read, the new row read, then the new row written (in place) or the buffers copied
    want = (ctx - 1) * row + row + (row if inplace else 2 * capacity * row) + q_out
    assert nbytes(*args) == want
    got, expected = kern(*[a.clone() for a in args]), ref(*[a.clone() for a in args])
    got, expected = (got[0], expected[0]) if isinstance(got, tuple) else (got, expected)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["read_full_short", "hca_short"])
def test_short_cases_count_the_visible_rows(bench, monkeypatch, name):
    """The *_short cases allocate a 128K context's rows (here 256) and count only the rows visible at
    position L - 1: L rows of K and V (read_full_short), the 128-slot window plus L/128 compressed
    entries (hca_short)."""
    monkeypatch.setattr(bench, "DEV", "cpu")
    monkeypatch.setattr(bench, "BIG_CAPACITY", 1024)
    ctx, batch = 512, 2
    make, nbytes, kern, ref, _ = bench.CASES[name](ctx, batch, torch.Generator().manual_seed(0))
    args = make()
    if name == "read_full_short":
        assert args[1].shape[2] == 1024
        want = 2 * batch * ctx * 512 * 2 + 2 * batch * 8 * 512 * 2
    else:
        assert args[2].shape[1] == 1024 // 128
        want = batch * (128 + ctx // 128) * 512 * 2 + 2 * batch * 64 * 512 * 2
    assert nbytes(*args) == want
    assert torch.equal(kern(*args), ref(*args))


def test_bytes_model(bench):
    """Fixed cost from the smallest context; a row within 10% of fixed + bytes / bw is met."""
    bw = 1e12
    rows = [{"kernel": "hca", "batch": 1, "context": 4096, "bytes": 1e6, "t_triton": 11e-6},  # fixed 10 us
            {"kernel": "hca", "batch": 1, "context": 32768, "bytes": 5e6, "t_triton": 16e-6},  # bound 15 us
            {"kernel": "hca", "batch": 1, "context": 131072, "bytes": 9e6, "t_triton": 25e-6},  # bound 19 us
            {"kernel": "hca", "batch": 8, "context": 4096, "error": "x"},
            {"kernel": "read_full", "batch": 1, "context": 4096, "bytes": 1e6, "t_triton": 1.0}]
    out = bench.bytes_model(rows, bw)
    assert [(r["context"], r["met"]) for r in out] == [(32768, True), (131072, False)]
    assert out[0]["fixed"] == pytest.approx(10e-6) and out[1]["ratio"] == pytest.approx(25 / 19)


@pytest.mark.gpu
def test_tiny_run_writes_every_row(bench, tmp_path):
    """The script end to end on a GPU at one small size: every case a row without an error."""
    kernels = "buffer,buffer_inloop,buffer_d256,buffer_short,read_full_short,hca"
    assert bench.main(["--out", str(tmp_path), "--contexts", "4096,8192", "--batches", "1",
                       "--kernels", kernels, "--no-ref"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r for r in result["rows"] if "error" in r] == []
    assert len(result["rows"]) == 2 * len(kernels.split(","))
    assert all(r["rel_err_vs_ref"] < 2e-2 and r["bw_frac"] > 0 for r in result["rows"])
    assert [r["context"] for r in result["hca_vs_bytes"]] == [8192]


def test_inloop_cases_run_the_first_design(bench, monkeypatch):
    """``buffer_inloop`` calls the op with ``plan.CONFIG["buffer_store"] = "loop"`` and the two-pass
    combine (run 25's kernels: what its warm-up and CUDA-graph capture compile), ``read_full_twopass``
    with that combine, and the config is restored after the call; ``buffer`` keeps the defaults."""
    from effexport.custom_ops._triton import plan

    seen = []
    monkeypatch.setattr(bench, "DEV", "cpu")
    for op in ("attention_buffer_inplace", "attention_read"):
        monkeypatch.setattr(bench.ops, op, lambda *a, **k: seen.append(
            (plan.CONFIG["buffer_store"], plan.CONFIG["combine_one_pass"])), raising=False)
    for name in ("buffer_inloop", "buffer", "buffer_d256_inloop", "read_full_twopass", "read_full"):
        make, _, kern, _, _ = bench.CASES[name](64, 1, torch.Generator().manual_seed(0))
        kern(*make())
        assert plan.CONFIG["buffer_store"] == "after_loop" and plan.CONFIG["combine_one_pass"] is True
    assert seen == [("loop", False), ("after_loop", True), ("loop", False), ("after_loop", False),
                    ("after_loop", True)]
