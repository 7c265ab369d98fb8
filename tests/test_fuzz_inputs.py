"""Malformed inputs generated from a seed: artifact manifests (``effexport check``), ``config.json`` of a
Hugging Face directory, safetensors headers. Every case must end with exit 2, 4 or 5, one
``effexport: error:`` line, no traceback, and nothing changed in the working directory or outside it
(the whole temporary tree is compared before and after each case).

A seeded generator rather than hypothesis: the same cases in every run and a fixed, small cost (about
three seconds). Each case mutates one valid-looking input: a key dropped, a value replaced by a value
of another JSON type, a huge or negative number, a path escaping its directory, deep nesting.
"""
import json
import os
import random
import struct

import pytest

from effexport.exporter.cli import main
from test_bad_inputs import TINY, _listing, assert_one_line_error

SEED, CASES_PER_KIND = 17, 40
DEEP = "<nested 50,000 deep>"  # replaced by the text of that nesting when written (Python cannot hold it)
ODD_VALUES = [None, True, -1, 0, 2 ** 63, 1e308, -1e9, "", "x" * 3000, "../../etc/passwd", "/dev/zero",
              [], [1, "a"], {}, {"a": {"b": []}}, "\x1b[31mred", DEEP, 3.5, [[[[[[[[[[]]]]]]]]]]]


def _odd(rng: random.Random):
    return rng.choice(ODD_VALUES)


def _dumps(obj) -> str:
    return json.dumps(obj).replace(json.dumps(DEEP), "[" * 50_000 + "]" * 50_000)


def _mutate(rng: random.Random, obj: dict) -> dict:
    """One to three mutations of a nested JSON object (a key dropped, replaced or added)."""
    obj = json.loads(json.dumps(obj))
    for _ in range(rng.randint(1, 3)):
        target = obj
        while isinstance(target, dict) and target and rng.random() < 0.4:
            child = target[rng.choice(sorted(target))]
            if not isinstance(child, dict) or not child:
                break
            target = child
        if not isinstance(target, dict):
            continue
        action = rng.random()
        if target and action < 0.3:
            target.pop(rng.choice(sorted(target)))
        elif target and action < 0.9:
            target[rng.choice(sorted(target))] = _odd(rng)
        else:
            target[rng.choice(["files", "dtype", "zzz", "model_type", "shape"])] = _odd(rng)
    return obj


MANIFEST = {"format": 1, "model": TINY, "target": "onnx", "profile": "ort", "dtype": "fp32",
            "files": {"step": "model.onnx"}, "max_context": 4096, "weights": "random",
            "inputs": ["input_ids", "pos", "past.0.k"], "outputs": ["logits", "present.0.k"],
            "cache_plan": {"entries": [{"name": "0.k", "layer": 0, "kind": "full", "dtype": "float32",
                                        "shape": ["batch", 2, "seq", 8], "window": 0, "ratio": 0}]},
            "source": {"kind": "sample", "name": TINY, "weights": "random"}}
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 256, "sliding_window": None, "text_config": {"hidden_size": 64},
          "quantization_config": {"quant_method": "bitsandbytes"}}
HEADER = {"__metadata__": {"format": "pt"},
          "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
          "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}


def _write_manifest(rng):
    os.makedirs("art")
    with open("art/effexport.json", "w") as f:
        f.write(_dumps(_mutate(rng, MANIFEST)))
    with open("art/model.onnx", "wb") as f:
        f.write(rng.randbytes(64))  # never a loadable model: a manifest that survives still ends in exit 2
    return ["check", "art", "--steps", str(rng.choice([1, 4]))]


def _write_config(rng):
    """config.json mutated; its weights file is corrupt, so a config that passes still ends in exit 2
    (or 4: the bitsandbytes quantization it asks for is not installed)."""
    os.makedirs("hf")
    with open("hf/config.json", "w") as f:
        f.write(_dumps(_mutate(rng, CONFIG)))
    with open("hf/model.safetensors", "wb") as f:
        f.write(rng.randbytes(40))
    return ["hf", "-o", "out"]


def _write_header(rng):
    """A safetensors file alone (always refused after its header is checked: no architecture)."""
    blob = _dumps(_mutate(rng, HEADER)).encode()
    data = bytes(rng.choice([0, 16, 24, 100]))
    with open("model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return ["model.safetensors", "-o", "out"]


@pytest.mark.parametrize("write", [_write_manifest, _write_config, _write_header],
                         ids=["manifest", "config", "safetensors-header"])
def test_malformed_inputs_fail_cleanly(tmp_path, monkeypatch, capsys, write):
    rng = random.Random(f"{SEED}-{write.__name__}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("untouched")
    for i in range(CASES_PER_KIND):
        work = tmp_path / f"case{i}"
        work.mkdir()
        monkeypatch.chdir(work)
        argv = write(rng)
        before = _listing(tmp_path)
        code = main(argv)
        err = capsys.readouterr().err
        assert code in (2, 4, 5), f"case {i}: exit {code}\n{err}\n{open(argv[1] + '/effexport.json').read()[:500] if argv[0] == 'check' else ''}"
        assert_one_line_error(err, "")
        assert _listing(tmp_path) == before, f"case {i} changed files"
    assert (outside / "keep.txt").read_text() == "untouched"
