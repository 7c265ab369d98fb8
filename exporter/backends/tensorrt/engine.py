"""TensorRT engine build from the ``tensorrt`` ONNX profile, with optimization profiles.

* :func:`shape_profiles`: min / opt / max shapes of every step input for one optimization profile
  covering prefill and decode -- batch ``1..max_batch``, new tokens ``1..max_context``, full
  caches ``0..max_context`` long; rings and states are static but for batch. ``pos`` is 0-d; if
  TensorRT treats it as a shape tensor (it feeds ``Range``), its *values* get ``0..max_context-1``.
* :func:`export_onnx`: the step graph in the ``tensorrt`` profile (or its plugin variant), local
  functions renamed for the parser, linted (:func:`~effexport.exporter.backends.onnx.tensorrt_profile.lint`);
  a lint problem is a :class:`~effexport.exporter.errors.LowerError` and nothing is written.
* :func:`build_engine`: ``trt.Builder`` + ``trt.OnnxParser`` + builder config with the profile,
  strongly typed (the ONNX dtypes decide the precision, so fp32 graphs stay fp32), serialized
  engine written next to the ONNX file.

Unverified: :func:`build_engine` needs TensorRT (not installable on this project's machines).
"""
from __future__ import annotations

import os
from pathlib import Path

from effexport.exporter.errors import BackendMissingError, LowerError
from effexport.passes.cache_plan import CachePlan

__all__ = ["shape_profiles", "export_onnx", "build_engine", "lower_to_engine", "ENGINE_FILE", "ONNX_FILE"]

ENGINE_FILE = "model.engine"
ONNX_FILE = "model.onnx"


def shape_profiles(plan: CachePlan, max_batch: int = 8, max_context: int = 4096, opt_batch: int = 1,
                   opt_context: int | None = None) -> tuple[dict, dict]:
    """``(shapes, values)``: ``shapes[name] = (min, opt, max)`` for every step input and
    ``values["pos"] = (min, opt, max)`` for the case ``pos`` is a shape tensor. ``opt`` is decode
    (one new token) after ``opt_context`` cached tokens (default half the context)."""
    if not 1 <= opt_batch <= max_batch or max_context < 2:
        raise ValueError(f"need 1 <= opt_batch <= max_batch and max_context >= 2, got {opt_batch}, {max_batch}, "
                         f"{max_context}")
    opt_context = max_context // 2 if opt_context is None else opt_context
    shapes = {"input_ids": ((1, 1), (opt_batch, 1), (max_batch, max_context)), "pos": ((), (), ())}
    for e in plan.entries:
        shapes[f"past.{e.name}"] = tuple(tuple(e.concrete_shape(b, n)) for b, n in
                                         ((1, 0), (opt_batch, opt_context), (max_batch, max_context)))
    return shapes, {"pos": ((0,), (opt_context,), (max_context - 1,))}


def export_onnx(program, plan: CachePlan, directory: str, plugins: bool = False):
    """Write ``directory/model.onnx`` in the ``tensorrt`` profile (``plugins``: its plugin
    variant) and return the linted ``ModelProto``."""
    import onnx

    from effexport.exporter.backends.onnx import tensorrt_profile as tp
    from effexport.exporter.backends.onnx.export import export_step

    path = os.path.join(directory, ONNX_FILE)
    external = os.path.join(directory, ONNX_FILE + ".data")
    try:
        export_step(program, plan, path, "tensorrt-plugins" if plugins else "tensorrt")
        model = tp.make_parser_safe(onnx.load(path))
        problems = tp.lint(model, plugins=plugins)
        if problems:
            raise LowerError(f"the tensorrt ONNX profile has {len(problems)} construct(s) the TensorRT "
                             f"{tp.TRT_VERSION} parser rejects, first: {problems[0]}")
        onnx.save_model(model, path, save_as_external_data=os.path.exists(external),
                        all_tensors_to_one_file=True, location=os.path.basename(external))
    except BaseException:
        for p in (path, external):
            if os.path.exists(p):
                os.unlink(p)
        raise
    return model


def build_engine(onnx_path: str, engine_path: str, shapes: dict, values: dict, plugins: bool = False,
                 workspace_bytes: int | None = None) -> Path:
    """Parse ``onnx_path`` with the TensorRT ONNX parser and write a serialized engine."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendMissingError("TensorRT is not installed: pip install 'effexport[tensorrt]' "
                                  "(NVIDIA GPU machines only)") from None
    if plugins:
        from effexport.exporter.backends.tensorrt.plugins import register_plugins

        register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise LowerError(f"the TensorRT ONNX parser rejected {onnx_path}: {errors[0] if errors else 'no detail'}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.is_shape_tensor:
            profile.set_shape_input(tensor.name, *values[tensor.name])
        else:
            profile.set_shape(tensor.name, *shapes[tensor.name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LowerError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    return Path(engine_path)


def lower_to_engine(program, plan: CachePlan, directory: str, max_context: int, max_batch: int = 8):
    """The tensorrt target's lowering stage: ``model.onnx`` (tensorrt profile, linted) and
    ``model.engine`` built from it; returns ``(ModelProto, manifest "files" entry)``."""
    model = export_onnx(program, plan, directory)
    shapes, values = shape_profiles(plan, max_batch=max_batch, max_context=max_context)
    build_engine(os.path.join(directory, ONNX_FILE), os.path.join(directory, ENGINE_FILE), shapes, values)
    return model, {"step": ENGINE_FILE, "onnx": ONNX_FILE}
