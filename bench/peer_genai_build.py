"""onnxruntime-genai 0.18's model builder on a transformers-5 Gemma 3 checkpoint (the peer of
bench/ort_graphs.py). Same arguments as ``python -m onnxruntime_genai.models.builder``.

The 0.18 builder reads two transformers-4 fields of Gemma 3 configs: a flat ``rope_parameters`` with a
``rope_type`` (transformers 5 nests them per layer type: ``full_attention`` / ``sliding_attention``) and
``rope_local_base_freq`` (in transformers 5, ``rope_parameters["sliding_attention"]["rope_theta"]``).
This wrapper answers both from the transformers-5 fields while the builder reads them; the saved
config is not touched (transformers validates rope parameters when it loads a config)."""
import runpy
import sys

import onnxruntime_genai.models  # noqa: F401  (puts the builder's package folder on sys.path)
import transformers
import builders.base as base  # noqa: E402  (importable only after the line above)

_rope_init = base.Model.make_rope_init


def _full_attention_rope(self, config):
    nested = getattr(config, "rope_parameters", None)
    if not (isinstance(nested, dict) and "full_attention" in nested and "rope_type" not in nested):
        return _rope_init(self, config)
    object.__setattr__(config, "rope_parameters", dict(nested["full_attention"]))
    try:
        return _rope_init(self, config)
    finally:
        object.__setattr__(config, "rope_parameters", nested)


base.Model.make_rope_init = _full_attention_rope
transformers.Gemma3TextConfig.rope_local_base_freq = property(
    lambda self: self.rope_parameters["sliding_attention"]["rope_theta"])
sys.argv[0] = "builder"
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
