"""effexport: export LLMs that use KV sharing, sliding windows, compressed attention and
hyper-connections to deployable engines without losing the memory and compute savings.

Sub-packages: ``effexport.samples`` (reference architectures), ``effexport.custom_ops`` (the operator
set), ``effexport.passes`` (FX rewrites), ``effexport.exporter`` (capture, backends, CLI, report).
"""
__version__ = "0.1.0"


def export(module, target: str = "onnx", output: str | None = None, profile: str = "ort", **opts) -> str:
    """Export an in-memory model: a transformers causal LM (``...ForCausalLM``) or a module following
    the samples' step contract ``forward(input_ids, past=None) -> (logits, present dict)``.

    ``opts`` are the other build options (``check``, ``steps``, ``max_context``, ``kv_cache``, ``explain``,
    ``dump_after``, ``force``, ``name``; see ``effexport.exporter.build.BuildOptions``). Returns the
    artifact directory. Raises :class:`effexport.exporter.errors.EffexportError` subclasses on user
    errors, and ``ParityError`` when the artifact was written but does not match eager."""
    from effexport.exporter.build import BuildOptions, build_loaded
    from effexport.exporter.errors import ParityError

    name = opts.pop("name", None) or getattr(getattr(module, "config", None), "model_type", None) \
        or type(module).__name__
    loaded = _wrap(module, name)
    output = output or f"{name}-{target}"
    code = build_loaded(loaded, BuildOptions(model=name, target=target, output=output, profile=profile,
                                             command=("effexport.export", name), **opts))
    if code:
        raise ParityError(f"{output}: the artifact does not match eager within tolerance (report.json "
                          "holds the parity table)")
    return output


def check(directory: str, module, steps: int = 16):
    """Re-run the parity check of the artifact in ``directory`` against ``module`` (the model it was
    built from, e.g. with :func:`export`): prefill + ``steps`` decode steps, as ``effexport check DIR``
    does for a model it can load by itself. Returns the ``ParityReport`` (``.passed``, ``.table()``)."""
    from effexport.exporter.build import check_artifact

    return check_artifact(directory, _wrap(module, type(module).__name__), steps)


def _wrap(module, name: str):
    """``module`` as a LoadedModel: a transformers causal LM or a step-contract module."""
    from effexport.exporter.frontends.loading import is_transformers_module, wrap_module

    if is_transformers_module(module):
        from effexport.exporter.frontends.hf import wrap_hf_module

        return wrap_hf_module(module, name)
    return wrap_module(module.eval(), name)
