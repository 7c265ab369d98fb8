"""onnxruntime-genai packages (``--target onnx --genai``, exporter/backends/onnx/genai.py).

* Each package of the matrix -- the Gemma 4 E2B tiny preset (sliding rings, a full buffer, KV-sharing
  consumers, per-layer head sizes) and tiny Hugging Face Llama (full caches only) and Gemma 3
  (sliding + full) -- loads in ``og.Model``, and ``og.Generator``'s 32 greedy tokens equal eager's
  with every step's logits within fp32 tolerance (1e-4 max rel); its ``genai_config.json`` says
  what the model's config says (layers, heads, head size, vocabulary, context, sliding layers and
  window, token ids), and names inputs and outputs the ONNX file has; ``effexport check`` runs the
  GenAI check too.
* Models whose caches GenAI cannot drive are refused by their CachePlan's kinds (exit 2, one line,
  nothing written): ZAYA1 (CCA states) and DeepSeek V4 (compressed entries and compressor states)
  end to end, every kind on hand-made plans.

One build per package (module fixture, one pytest-xdist unit each); builds skip the ONNX Runtime
parity stage (``--no-check``, covered by tests/test_kv_buffer.py) and run only the GenAI check.
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import onnx
import pytest

import onnxruntime_genai as og  # noqa: E402,F401  (a test dependency: missing, it fails the run)

from effexport.exporter.cli import main  # noqa: E402
from effexport.exporter.backends.onnx import genai  # noqa: E402
from effexport.passes.cache_plan import CacheEntry, CachePlan  # noqa: E402

XDIST_SPLIT = ("package", "preset")
MAX_CONTEXT = 128
PACKAGES = ["gemma4-e2b:tiny", "hf:llama", "hf:gemma3"]


def _cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


class Package:
    """A model built with ``--genai`` through the CLI, and what the tests compare it with."""

    def __init__(self, name: str, tmp):
        from effexport.exporter.frontends.loading import resolve_source
        from effexport.exporter.backends.artifact import load_manifest

        self.name, self.out = name, tmp / "out"
        model = name
        if name.startswith("hf:"):
            from models import hf_tiny

            if not hf_tiny.available(name[3:]):
                pytest.skip(f"transformers has no {name[3:]}")
            model = tmp / "model"
            hf_tiny.build(name[3:]).save_pretrained(model)
        code, _, self.log = _cli(model, "--genai", "--no-check", "--max-context", MAX_CONTEXT, "-o", self.out)
        assert code == 0, self.log[-3000:]
        self.manifest = load_manifest(str(self.out))
        self.config = json.loads((self.out / genai.GENAI_CONFIG).read_text())
        self.loaded = resolve_source(self.manifest["source"], trust_pickle=False).load()


@pytest.fixture(scope="module", params=[pytest.param(p, marks=pytest.mark.slow) for p in PACKAGES])
def package(request, tmp_path_factory):
    return Package(request.param, tmp_path_factory.mktemp(request.param.replace(":", "-")))


def test_generator_equals_eager(package):
    """og.Model loads the package; og.Generator's 32 greedy tokens (from token ids, no tokenizer)
    equal eager's, logits within 1e-4 max rel at every step."""
    og.Model(str(package.out))
    report = genai.check_genai(str(package.out), package.loaded, 8, MAX_CONTEXT)
    print(f"{package.name}: {report.detail}; tokens equal {report.tokens_equal} over {report.steps}; "
          f"logits max abs {report.outputs[0].max_abs:.2e}, max rel {report.outputs[0].max_rel:.2e}")
    assert report.passed and report.tokens_equal and report.steps == genai.GENAI_TOKENS, report.table()


def _expected(package) -> dict:
    """What the model's own config says: layers, heads, sizes, the layers that own caches and which
    of them are sliding, the window, token ids."""
    if package.loaded.sample is not None:
        cfg = package.loaded.sample.config
        specs = cfg.layer_specs()
        owners = [s for s in specs if s.role != "consumer"]
        first = owners[0]
        return dict(layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, hidden=cfg.hidden_size,
                    vocab=cfg.vocab_size, kv_heads=first.cache[0].elements // first.qk_dim, head_size=first.qk_dim,
                    owners=[s.index for s in owners], sliding=[s.index for s in owners if s.window],
                    window=cfg.sliding_window, eos=None)
    from effexport.exporter.verify.hf_report import kv_shared, layer_types

    text = package.loaded.model.hf.config.get_text_config(decoder=True)
    types, reads = layer_types(text), kv_shared(text)
    owners = [i for i in range(len(types)) if i not in reads]
    window = getattr(text, "sliding_window", None)
    return dict(layers=text.num_hidden_layers, heads=text.num_attention_heads, hidden=text.hidden_size,
                vocab=text.vocab_size, kv_heads=text.num_key_value_heads,
                head_size=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                owners=owners, sliding=[i for i in owners if types[i] == "sliding_attention"], window=window,
                eos=text.eos_token_id)


def test_config_matches_the_model(package):
    """genai_config.json's fields equal the model config's; its I/O names are the ONNX file's."""
    want, model = _expected(package), package.config["model"]
    decoder, search = model["decoder"], package.config["search"]
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["hidden_size"]) == (
        want["layers"], want["heads"], want["hidden"])
    assert (decoder["num_key_value_heads"], decoder["head_size"], model["vocab_size"]) == (
        want["kv_heads"], want["head_size"], want["vocab"])
    assert model["context_length"] == search["max_length"] == package.manifest["max_context"] == MAX_CONTEXT
    assert search["past_present_share_buffer"] is True and search["num_beams"] == 1 and model["type"] == "decoder"
    if want["eos"] is not None:
        assert model["eos_token_id"] == want["eos"]
    sliding = decoder.get("sliding_window")
    if want["sliding"]:
        assert sliding["layers"] == want["sliding"]
        assert sliding["window_size"] + sliding["cache_slack"] == want["window"]  # the ring GenAI allocates
    else:
        assert sliding is None
    graph = onnx.load(str(package.out / decoder["filename"]), load_external_data=False).graph
    inputs, outputs = {i.name: i for i in graph.input}, {o.name for o in graph.output}
    cache_layers = sorted(int(n.split(".")[1]) for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    assert cache_layers == want["owners"]
    names = decoder["inputs"]
    expected = {names["input_ids"], names["position_ids"]} | {
        names[f"past_{p}_names"] % layer for layer in cache_layers for p in ("key", "value")}
    assert expected <= set(inputs) and set(inputs) - expected <= {names["attention_mask"]}
    # the mask (when GroupQueryAttention needs the position on the host) is read for its shape only
    assert {n.op_type for n in graph.node if names["attention_mask"] in n.input} <= {"Shape"}
    assert outputs == {decoder["outputs"]["logits"]} | {
        decoder["outputs"][f"present_{p}_names"] % layer for layer in cache_layers for p in ("key", "value")}
    for layer in cache_layers:  # the shared buffer: past and present of one shape, rows fixed
        past = [d.dim_value or d.dim_param for d in inputs[f"past_key_values.{layer}.key"].type.tensor_type.shape.dim]
        assert past[2] == (want["window"] if layer in want["sliding"] else MAX_CONTEXT), (layer, past)
    assert package.manifest["files"]["genai_config"] == genai.GENAI_CONFIG
    if package.name.startswith("hf:"):  # tokenizer files are copied when the input directory has them
        assert os.path.isfile(package.out / "generation_config.json")


@pytest.mark.parametrize("package", [pytest.param(PACKAGES[0], marks=pytest.mark.slow)], indirect=True)
def test_check_runs_genai(package):
    """``effexport check DIR`` of a package runs the GenAI check after the ONNX Runtime one."""
    code, out, err = _cli("check", package.out)
    assert code == 0, out + err
    assert "checked: onnxruntime-genai og.Generator" in out and out.count("PARITY PASSED") == 2, out


# ------------------------------------------------------------------------------------ refusals
def _entry(name, layer, kind, rows, window=0, ratio=0):
    return CacheEntry(name, layer, kind, ("batch", 2, rows, 16), "float32", window, ratio)


def test_refusal_by_cache_kind():
    """Buffers and rings of one window pass; every other kind is refused with the layers named."""
    fine = CachePlan([_entry("0.k", 0, "ring", 8, 8), _entry("0.v", 0, "ring", 8, 8),
                      _entry("1.k", 1, "buffer", 64), _entry("1.v", 1, "buffer", 64)])
    assert genai.refusal(fine, "m") is None
    cases = {"state": "fixed-size states", "compressed": "compressed entry caches", "chunk": "chunk-local",
             "full": "kept growing"}
    for kind, words in cases.items():
        plan = CachePlan(fine.entries + [_entry("2.conv", 2, kind, 4, 4 if kind == "chunk" else 0)])
        reason = genai.refusal(plan, "m")
        assert reason and words in reason and "layer(s) 2" in reason and "\n" not in reason, (kind, reason)
    odd = CachePlan(fine.entries + [_entry("2.state", 2, "ring", 8, 8)])  # a ring that is not a K / V pair
    assert "fixed-size states" in genai.refusal(odd, "m")
    two = CachePlan(fine.entries + [_entry("2.k", 2, "ring", 4, 4), _entry("2.v", 2, "ring", 4, 4)])
    assert "windows [4, 8]" in genai.refusal(two, "m")


@pytest.mark.parametrize("argv,words", [
    (["--target", "aoti"], "use --target onnx"), (["--kv-cache", "grow"], "needs --kv-cache buffer")])
def test_option_errors(tmp_path, argv, words):
    code, _, err = _cli("gemma4-e2b:tiny", "--genai", *argv, "-o", tmp_path / "out")
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset,words", [("zaya1-8b:tiny", "fixed-size states"),
                                          ("deepseek-v4-flash:tiny", "compressed entry caches")])
def test_refused_presets(tmp_path, preset, words):
    """CCA (ZAYA1) and DeepSeek V4's compressed caches: exit 2 after the rewrite, one error line
    naming what GenAI cannot drive, nothing left in the output's parent."""
    code, _, err = _cli(preset, "--genai", "-o", tmp_path / "out")
    errors = [line for line in err.splitlines() if line.startswith("effexport: error:")]
    assert code == 2 and len(errors) == 1 and words in errors[0] and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("package", [pytest.param(PACKAGES[0], marks=pytest.mark.slow)], indirect=True)
def test_a_wrong_config_fails_the_check(package, tmp_path):
    """The GenAI check sees a config that does not fit the graph: a sliding cache one slot too long
    (GenAI allocates a buffer the ring input refuses) or a wrong context length."""
    import shutil

    for edit in ("slack", "context"):
        broken = tmp_path / edit
        shutil.copytree(package.out, broken)
        config = json.loads((broken / genai.GENAI_CONFIG).read_text())
        if edit == "slack":
            config["model"]["decoder"]["sliding_window"]["cache_slack"] += 1
        else:
            config["model"]["context_length"] = config["search"]["max_length"] = MAX_CONTEXT // 2
        (broken / genai.GENAI_CONFIG).write_text(json.dumps(config))
        report = genai.check_genai(str(broken), package.loaded, 8, MAX_CONTEXT)
        assert not report.passed and "cannot run the package" in report.detail, (edit, report.table())
