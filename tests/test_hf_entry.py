"""Any Hugging Face causal LM at the entry points (issue #18): which directories the CLI takes and
which it refuses (and why), ``effexport report DIR`` from a config alone, ``effexport check`` of an
artifact built through ``effexport.export(module)``, and the default ``--max-context``. The family
matrix (build + parity + CachePlan per family) is tests/test_hf_families.py."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
import transformers  # a test dependency: missing, the module fails to import (no silent skip)

from models import hf_tiny

from effexport.exporter.cli import main
from effexport.exporter.errors import LoadError


def _config_dir(path, **config) -> str:
    """A directory with ``config.json`` (``config``) and one tiny safetensors file."""
    from safetensors.torch import save_file

    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({"w": torch.zeros(2)}, os.path.join(path, "model.safetensors"))
    return str(path)


# ------------------------------------------------------------------------------- which directories
@pytest.mark.parametrize("config, message", [
    pytest.param(dict(model_type="bert", architectures=["BertLMHeadModel"]),
                 "is not a decoder-only causal LM (its AutoModelForCausalLM class is BertLMHeadModel)", id="encoder"),
    pytest.param(dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]),
                 "save its text model", id="multimodal-wrapper"),
    pytest.param(dict(model_type="t5"), "transformers has no causal-LM class for it", id="no-causal-lm"),
    pytest.param(dict(model_type="frobnet"), "has no model_type 'frobnet'", id="unknown-type"),
    pytest.param(dict(model_type="frobnet", auto_map={"AutoModelForCausalLM": "modeling_frob.FrobForCausalLM"}),
                 "names remote code, which effexport does not run", id="remote-code"),
])
def test_directories_refused_with_the_reason(tmp_path, capsys, config, message):
    """A directory transformers cannot load as a ...ForCausalLM is refused before loading, one line."""
    path = _config_dir(tmp_path / "model", **config)
    assert main([path, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("model_type", list(__import__("effexport.exporter.frontends.hf", fromlist=["x"]).UNSUPPORTED_MODEL_TYPES))
def test_unsupported_model_types(tmp_path, model_type):
    """Every UNSUPPORTED_MODEL_TYPES entry is refused with its reason."""
    from effexport.exporter.frontends.hf import UNSUPPORTED_MODEL_TYPES
    from effexport.exporter.frontends.loading import resolve_model

    path = _config_dir(tmp_path / "model", model_type=model_type)
    with pytest.raises(LoadError, match=re.escape("cannot be exported: " + UNSUPPORTED_MODEL_TYPES[model_type])):
        resolve_model(path)


def test_any_causal_lm_type_is_taken(tmp_path):
    """Model types the project never names resolve (no allow-list), with their trained context; Gemma 3n's
    per-layer ``intermediate_size`` list passes the config checks."""
    from safetensors.torch import save_file

    from effexport.exporter.frontends.loading import resolve_model

    for family in ("mistral", "qwen3_next", "gpt_oss", "gemma3n"):
        config_cls, _, kwargs, _ = hf_tiny.FAMILIES[family]
        getattr(transformers, config_cls)(**kwargs).save_pretrained(tmp_path / family)
        save_file({"w": torch.zeros(2)}, str(tmp_path / family / "model.safetensors"))
        spec = resolve_model(str(tmp_path / family))
        assert (spec.kind, spec.context_limit) == ("hf", kwargs["max_position_embeddings"])


# ---------------------------------------------------------------------------------- --max-context
def test_default_max_context_is_the_models_limit(monkeypatch, tmp_path):
    """``effexport laguna-xs2:tiny --target onnx`` (limit 256) builds with --max-context 256 by default;
    a larger explicit value is still refused, a model without a limit gets 4096."""
    from effexport.exporter import build as build_mod

    seen = []
    monkeypatch.setattr(build_mod, "_build", lambda loaded, opts, out, progress: seen.append(opts.max_context) or 0)
    assert main(["laguna-xs2:tiny", "--target", "onnx", "-o", str(tmp_path / "a")]) == 0
    assert main(["gemma4-e2b:tiny", "--target", "onnx", "-o", str(tmp_path / "b")]) == 0
    assert seen == [256, 4096]
    assert main(["laguna-xs2:tiny", "--max-context", "512", "-o", str(tmp_path / "c")]) == 2


# ----------------------------------------------------------------------------------------- report
def test_report_from_a_config_only_directory(tmp_path, capsys):
    """``effexport report DIR`` needs only config.json: sliding layers are rings of the window, KV-shared
    layers consumers of their producer (Gemma 4), gated-delta-net layers fixed-size states (Qwen3-Next);
    a context beyond the trained limit is a warning, not a refusal."""
    layers = {}
    for family in ("gemma4", "qwen3_next"):
        config_cls, _, kwargs, _ = hf_tiny.FAMILIES[family]
        getattr(transformers, config_cls)(**kwargs).save_pretrained(tmp_path / family)
        assert not [f for f in os.listdir(tmp_path / family) if f.endswith(".safetensors")]
        assert main(["report", str(tmp_path / family), "--context", "1M", "--json"]) == 0
        out = capsys.readouterr()
        assert "beyond" in out.err and "trained limit of 256 tokens" in out.err
        data = json.loads(out.out)
        assert data["context"] == 1 << 20 and data["warnings"]
        layers[family] = [(x["type"], x["role"], x["reads"], x["cache"]) for x in data["layers"]]
        assert data["params"]["total"] == sum(p.numel() for p in hf_tiny.build(family).parameters())
    assert layers["gemma4"] == [("sliding", "owner", 0, "ring"), ("full", "owner", 1, "full"),
                                ("sliding", "consumer", 0, "none"), ("full", "consumer", 1, "none")]
    assert layers["qwen3_next"] == [("linear", "independent", 0, "state"), ("full", "independent", 1, "full")]


# ------------------------------------------------------------------------------------------ check
def test_check_an_artifact_built_from_python(tmp_path, capsys):
    """``effexport.export(module)``: an in-memory model with no directory is refused by ``effexport
    check`` with the Python call to use instead (and ``effexport.check(DIR, model)`` passes); a model
    loaded from a directory records it, and ``effexport check`` reloads it from there."""
    import effexport

    model = hf_tiny.build("llama")
    out = effexport.export(model, output=str(tmp_path / "mem"), check=False)
    assert main(["check", out, "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "effexport.check(DIR, model)" in err and "unknown model" not in err
    assert effexport.check(out, model, steps=4).passed

    model.save_pretrained(tmp_path / "llama")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    out = effexport.export(reloaded, output=str(tmp_path / "dir"), check=False)
    source = json.loads((tmp_path / "dir" / "effexport.json").read_text())["source"]
    assert source["path"] == os.path.abspath(tmp_path / "llama")
    assert main(["check", out, "--steps", "4"]) == 0
    assert "PARITY PASSED" in capsys.readouterr().out
