"""``effexport report`` numbers against hand arithmetic from the spec (architectures.md)."""
import json

import pytest

from effexport.exporter.verify import report as rep
from effexport.exporter.cli import main
from effexport.samples import get_sample

N = 131072  # 128K
BF16 = 2


@pytest.fixture(scope="module")
def reports():
    cache = {}

    def get(name, context=N, cache_dtype="bf16"):
        key = (name, context, cache_dtype)
        if key not in cache:
            cache[key] = rep.build_report(get_sample(name), context, cache_dtype)
        return cache[key]
    return get


# (model, ring-policy bytes, full-length bytes, baseline bytes) at N tokens, bf16, by hand:
HAND_KV = [
    # E2B: owners/independents = layers 0-14: 3 full (4,9,14) x 2*1*512*2 B/token, 12 sliding x 2*1*256*2 B/token;
    # ring: sliding keep 512 tokens. Baseline: 35 layers, own full-length caches: 28 sliding x 1024 + 7 full x 2048.
    pytest.param("gemma4-e2b", 3 * 2048 * N + 12 * 1024 * 512, (3 * 2048 + 12 * 1024) * N,
                 (28 * 1024 + 7 * 2048) * N, id="gemma4-e2b"),
    # E4B: layers 0-23 compute KV: 4 full (5,11,17,23) x 2*2*512*2, 20 sliding x 2*2*256*2; 42 layers in the baseline.
    pytest.param("gemma4-e4b", 4 * 4096 * N + 20 * 2048 * 512, (4 * 4096 + 20 * 2048) * N,
                 (35 * 2048 + 7 * 4096) * N, id="gemma4-e4b"),
    # Laguna XS.2: 10 full x 2*8*128*2 B/token, 30 sliding rings of 512 x 4096 B; baseline: 40 full.
    pytest.param("laguna-xs2", 10 * 4096 * N + 30 * 512 * 4096, 40 * 4096 * N, 40 * 4096 * N, id="laguna-xs2"),
    # ZAYA1-8B: 40 x (K 2*128 + V 2*128) x 2 B/token + 40 x (conv [1280, 2] + shift [128]) x 2 B;
    # baseline MHA at hidden 2048: 40 x 2*2048*2 B/token.
    pytest.param("zaya1-8b", 40 * 1024 * N + 40 * (5120 + 256), 40 * 1024 * N + 40 * (5120 + 256),
                 40 * 8192 * N, id="zaya1-8b"),
]


@pytest.mark.parametrize("name, ring, full, baseline", HAND_KV)
def test_kv_bytes_match_hand_arithmetic(reports, name, ring, full, baseline):
    r = reports(name)
    assert r["kv_bytes"]["ring"]["model"] == ring
    assert r["kv_bytes"]["full_length"]["model"] == full
    assert r["kv_bytes"]["full_length"]["baseline"] == baseline
    assert r["kv_bytes"]["ring"]["baseline"] == baseline  # the baseline has no windows


def test_gemma4_e2b_layer_roles(reports):
    layers = reports("gemma4-e2b")["layers"]
    assert len(layers) == 35
    consumers = {l["index"]: l["reads"] for l in layers if l["role"] == "consumer"}
    assert set(consumers) == set(range(15, 35))
    assert {consumers[i] for i in (19, 24, 29, 34)} == {14}
    assert {v for k, v in consumers.items() if k not in (19, 24, 29, 34)} == {13}
    assert all(l["cache"] == "none" and l["bytes"] == 0 for l in layers if l["role"] == "consumer")
    assert {l["index"] for l in layers if l["role"] == "owner"} == {13, 14}


@pytest.mark.parametrize("name, per_token", [
    pytest.param("deepseek-v4-flash", 3450, id="v4-flash"),     # 21 CSA x (576/4 + 64/4) + 20 HCA x 576/128
    pytest.param("deepseek-v4-pro", 4939.5, id="v4-pro"),       # 30 CSA x 160 + 31 HCA x 4.5
    pytest.param("deepseek-v3.2", 48068, id="v3.2"),            # 61 x (656 + 132)
])
def test_deepseek_published_bytes_per_token(reports, name, per_token):
    # the growing part: bytes(2N) - bytes(N) over N more tokens (N a multiple of every ratio, > window,
    # 2N within every model's context limit)
    n = 1 << 16
    a = reports(name, n, "published")["kv_bytes"]["ring"]["model"]
    b = reports(name, 2 * n, "published")["kv_bytes"]["ring"]["model"]
    assert (b - a) / n == pytest.approx(per_token, abs=1e-6)


@pytest.mark.parametrize("name, total, effective, active", [
    pytest.param("gemma4-e2b", 4.63e9, 2.28e9, 2.28e9, id="gemma4-e2b"),      # spec 1.7
    pytest.param("gemma4-e4b", 7.46e9, 4.64e9, 4.64e9, id="gemma4-e4b"),
    pytest.param("laguna-xs2", 33.4e9, 33.4e9, 3.02e9, id="laguna-xs2"),      # spec 2.2
    pytest.param("deepseek-v4-flash", 284.3e9, 284.3e9, 13.8e9, id="v4-flash"),  # spec 4.2 recount
])
def test_params_match_spec_recounts(reports, name, total, effective, active):
    p = reports(name)["params"]
    assert p["total"] == pytest.approx(total, rel=0.01)
    assert p["effective"] == pytest.approx(effective, rel=0.01)
    assert p["active"] == pytest.approx(active, rel=0.01)


def test_zaya_params_match_spec(reports):
    # spec 3.2: 8.30 B non-embedding + 0.54 B embeddings (tied)
    assert reports("zaya1-8b")["params"]["total"] == pytest.approx(8.30e9 + 0.54e9, rel=0.01)


def test_deepseek_flash_flops_at_1m(reports):
    n = 1 << 20
    f = reports("deepseek-v4-flash", n)["flops_per_token"]
    active = reports("deepseek-v4-flash", n)["params"]["active"]
    # spec 4.6: core = [21 (512+128) + 20 (N/128 + 128) + 2 x 128] x 64 heads x 2 (512 + 512)
    attention = (21 * (512 + 128) + 20 * (n // 128 + 128) + 2 * 128) * 64 * 2 * 1024
    indexer = 21 * 2 * 64 * 128 * (n // 4)
    assert f["attention"] == attention
    assert f["indexer"] == indexer
    assert f["raw"] == 2 * active + attention + indexer
    # weighting B: fp8 weights x1, bf16 attention x2, fp4 indexer x0.5
    assert f["fp8_equivalent"] == round(2 * active + 2 * attention + 0.5 * indexer)


def test_gemma_flops_window_bounded(reports):
    f = reports("gemma4-e2b")["flops_per_token"]
    # 28 sliding layers attend 512 keys with d=256; 7 full layers attend N keys with d=512; 8 heads
    assert f["attention"] == 28 * 2 * 8 * 512 * 512 + 7 * 2 * 8 * 1024 * N
    assert f["fp8_equivalent"] == 2 * f["raw"]  # bf16 model: everything counts twice


def test_json_contract(capsys):
    assert main(["report", "gemma4-e4b", "--context", "128k", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("model", "context", "cache_dtype", "kv_bytes", "baseline", "params", "flops_per_token", "layers"):
        assert key in data
    assert data["context"] == N and data["model"] == "gemma4-e4b"
    assert set(data["kv_bytes"]) == {"full_length", "ring"}
    assert set(data["layers"][0]) >= {"index", "type", "role", "reads", "cache", "bytes"}


def test_human_table_and_plot(tmp_path, capsys):
    png = tmp_path / "kv.png"
    assert main(["report", "laguna-xs2", "--context", "32768", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "sliding" in out and "plot written" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["kv.png"]  # no temporary left behind


@pytest.mark.parametrize("name", ["gemma4-e2b", "gemma4-e4b", "laguna-xs2", "zaya1-8b", "deepseek-v4-flash",
                                  "deepseek-v4-pro", "deepseek-v3.2"])
def test_every_preset_reports(reports, name):
    r = reports(name, 4096)
    kv = r["kv_bytes"]
    assert 0 < kv["ring"]["model"] <= kv["full_length"]["model"]
    if name == "deepseek-v3.2":  # the comparison point: no windows, and its indexer keys cost extra
        assert kv["ring"]["model"] == kv["full_length"]["model"] > kv["ring"]["baseline"]
    else:
        assert kv["ring"]["model"] < kv["ring"]["baseline"]


@pytest.mark.parametrize("cache_dtype, scale", [pytest.param("fp16", 1, id="fp16"), pytest.param("fp32", 2, id="fp32")])
def test_cache_dtype_through_the_cli(capsys, cache_dtype, scale):
    """``report --cache-dtype``: fp16 entries cost what bf16 ones do, fp32 twice (Laguna XS.2 keeps no
    fp32 state): the hand arithmetic of HAND_KV times ``scale``."""
    assert main(["report", "laguna-xs2", "--context", "128k", "--cache-dtype", cache_dtype, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cache_dtype"] == cache_dtype
    assert data["kv_bytes"]["ring"]["model"] == scale * (10 * 4096 * N + 30 * 512 * 4096)
    assert data["kv_bytes"]["full_length"]["baseline"] == scale * 40 * 4096 * N
