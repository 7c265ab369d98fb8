"""Export the rewritten decode-step graph to an ONNX file.

``export_step(program, plan, path, profile)`` lowers the step GraphModule that
:func:`effexport.passes.pipeline.run_pipeline` returns, signature
``(input_ids, pos, *caches in plan order) -> (logits, *presents)``, with ``torch.onnx.export``
(dynamo) and the effexport translation table of the profile. The ONNX graph's I/O:

* inputs ``input_ids [batch, seq]`` int64, ``pos`` 0-d int64, ``past.{entry.name}`` for every
  CachePlan entry, in plan order; in the ``ort`` profile, when a GroupQueryAttention over a fixed
  buffer needs the position on the host, ``pos_host`` (the same number) right after ``pos``
  (:mod:`.host_positions`);
* outputs ``logits [batch, seq, vocab]``, ``present.{entry.name}`` in the same order;
* dynamic: batch, the new-token count ``seq``, and the length of every full cache
  (``past_seq``; its present is ``total_seq``); ring and state dims stay static.

The model's metadata ``effexport.device_positions`` is ``true`` when ``pos`` is read on the device
only (no Range bound, Slice end or other host input derives from it): the condition for replaying
the step from a CUDA graph.

The file gets the profile's opset and an explicit IR version ORT 1.30 loads
(:attr:`.profiles.Profile.ir_version`). Weights go to one external data file next to the model,
``{model}.data``, when the serialized model would approach protobuf's 2 GB limit (or when
``external_data=True``). They are *streamed* there: after the optimizer, every initializer of at
least :data:`EXTERNAL_TENSOR_BYTES` is written from the onnx_ir model one tensor at a time (a
torch.onnx initializer straight from its torch storage, a folded one from its numpy array), in graph
order; only then is the model serialized, and that proto holds references, no weight bytes. So no
serialized copy of the weights is ever made (``program.model_proto`` followed by ``onnx.save_model``
held one: peak RSS rose by 1.5x the weights, ``tests/test_external_data.py``). The file(s) are
written in a temporary directory next to the target and renamed, so a failed export leaves nothing.

:func:`export_steps` also writes the step's one-token decode graph (``decode.onnx`` in an ``ort``
``--kv-cache buffer`` artifact) over the same data file. Not covered: dtype
conversion (the graph is exported in the dtype it was captured in), and ``effexport.json``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx_ir.passes import common as ir_passes
import onnxscript.optimizer

from effexport.exporter.capture import fast_export_config
from effexport.exporter.errors import LowerError, root_cause
from effexport.exporter.progress import phase
from effexport.exporter.backends.exported import example_inputs, exported_step
from effexport.exporter.backends.onnx._local import attach, types_kept
from effexport.exporter.backends.onnx.attention import max_context, one_token_graph, slot_rings
from effexport.exporter.backends.onnx.half_einsum import einsums
from effexport.exporter.backends.onnx.host_positions import (DEVICE_POSITIONS, IN_PLACE, host_reads,
                                                          split_host_positions)
from effexport.exporter.backends.onnx.ort_fusions import INLINE, fuse_for_ort, fuse_step_for_ort, zero_skip_norms
from effexport.exporter.backends.onnx.profiles import PROFILES
from effexport.exporter.backends.onnx.translations import translation_table
from effexport.exporter.backends.onnx.structure_only import meta_weights_as_external
from effexport.passes.cache_plan import CachePlan, buffer_capacity
from effexport.passes.program import StepProgram

__all__ = ["export_step", "export_steps", "exported_step", "lower", "EXTERNAL_DATA_THRESHOLD", "step_io_names",
           "example_inputs", "DEVICE_POSITIONS"]

EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Initializer bytes above which weights are written as external data (protobuf caps at 2 GB)."""
EXTERNAL_TENSOR_BYTES = 1024
"""In an external-data save, initializers of at least this many bytes go to the data file; smaller
ones (scalars, shapes) stay inline in the model."""



def step_io_names(plan: CachePlan) -> tuple[list[str], list[str]]:
    """The ONNX input and output names of a step graph for ``plan``."""
    return (["input_ids", "pos"] + [f"past.{e.name}" for e in plan.entries],
            ["logits"] + [f"present.{e.name}" for e in plan.entries])


class _NoTorchvisionNotice(logging.Filter):
    """torch.onnx logs one warning per torchvision op when building its registry without torchvision
    ("torchvision is not installed. Skipping torchvision::nms"): noise in a build's output, since no
    language model here uses those ops."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_NoTorchvisionNotice())

def optimize(model: ir.Model) -> None:
    """Clean up torch.onnx's output in place: constant folding, dead nodes / functions / opsets,
    constants lifted to (deduplicated) initializers, common sub-expressions, names.

    This is ``onnxscript.optimizer.optimize_ir`` without its pattern rewriter and without inlining
    (effexport-domain functions stay functions). Measured on gemma4-e2b:tiny (1300 nodes): 1.7 s
    instead of 21 s, for 23 more nodes (leftover Mul / Transpose / Reshape pairs the rewriter would
    fuse); the rewriter's matching dominated lowering time on a 2-core CPU."""
    onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True)
    ir.passes.Sequential(
        ir_passes.RemoveUnusedNodesPass(), ir_passes.RemoveUnusedFunctionsPass(),
        ir_passes.RemoveUnusedOpsetsPass(),
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        ir_passes.LiftSubgraphInitializersToMainGraphPass(), ir_passes.DeduplicateInitializersPass(),
        ir_passes.CommonSubexpressionEliminationPass(), ir_passes.OutputFixPass(), ir_passes.NameFixPass(),
    )(model)


def _lower_ir(module, args, profile: str, dynamic_shapes, input_names, output_names,
              max_positions: int | None = None) -> ir.Model:
    """``torch.onnx.export`` (dynamo) with the profile's translation table and opset, then
    :func:`optimize`; the initializers still reference the module's torch tensors (no copy)."""
    phase("lower: torch.onnx (decomposition, translation)")
    with fast_export_config():  # torch.onnx re-traces the program to decompose it
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, custom_translation_table=translation_table(profile),
            opset_version=PROFILES[profile].opset, optimize=False, verbose=False, report=False)
    phase("lower: ONNX graph optimization")
    from effexport.exporter.backends.onnx.weights import active_source

    with types_kept(program.model), meta_weights_as_external(program.model):  # --weights none: no data
        optimize(program.model)
        streamed = active_source() is not None  # fused again below, once the norm scales are constants
        if PROFILES[profile].ort_fusions:  # ONNX Runtime contrib ops: fewer nodes, fewer kernel launches
            fuse_for_ort(program.model)
            split_host_positions(program.model)
            fuse_step_for_ort(program.model, max_positions, unit_transposes=not streamed)
    if PROFILES[profile].ort_fusions and streamed:
        with types_kept(program.model):
            _fuse_streamed_again(program.model, max_positions)
    with types_kept(program.model):
        einsums(program.model)  # bf16 Einsum is not an ONNX type: MatMul, or fp32 between casts
        program.model.metadata_props[DEVICE_POSITIONS] = json.dumps(host_reads(program.model) == [])
    return program.model


def _fuse_streamed_again(model: ir.Model, max_positions: int | None) -> None:
    """A streamed build's second round of ``ort`` fusions. Inside the optimizer's block the weights
    had no values (:func:`~.structure_only.meta_weights_as_external`), so small constants computed
    from them stayed nodes -- Gemma's norm scale ``1 + w``, cast to fp32 -- and the fusions that need
    a constant scale (a half-precision norm without its casts, then the residual add into the norm,
    the rotations' layout) did not apply; the fp32 twin, whose scale needs no cast, fused more, and
    the two structures differed. Now the initializers read their checkpoint tensors lazily: constants
    of at most 8,192 elements are folded (the norm vectors, not the matrices) and the step fusions
    run again (a rule that already applied finds nothing left to match). The first round left the
    unit-axis transposes alone (``unit_transposes=False``): made reshapes before the norms were fused,
    a one-KV-head key's rotation could not leave the heads-major layout."""
    onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True)
    ir.passes.Sequential(
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        ir_passes.RemoveUnusedNodesPass())(model)
    fuse_step_for_ort(model, max_positions)


def _finish(model: onnx.ModelProto, profile: str) -> None:
    """The profile's IR version and the bodies of the ``effexport`` nodes (:mod:`._local`), in place."""
    model.ir_version = PROFILES[profile].ir_version
    attach(model)


def lower(module, args=(), profile: str = "ort", dynamic_shapes=None, input_names=None,
          output_names=None) -> onnx.ModelProto:
    """``torch.onnx.export`` (dynamo) of a module or ExportedProgram with the profile's translation
    table and opset, then :func:`optimize` (no function inlining); finally every
    ``effexport``-domain node gets its function body in ``model.functions`` (:mod:`._local`).
    The returned proto holds the weights (:func:`export_step` streams them to a file instead)."""
    model = ir.to_proto(_lower_ir(module, args, profile, dynamic_shapes, input_names, output_names))
    _finish(model, profile)
    return model


def rings_with_consumers(plan: CachePlan) -> frozenset[str]:
    """Input names of the sliding rings another layer reads (KV sharing). Those rings keep the slot
    layout (:func:`.attention.slot_rings`): GroupQueryAttention's windowed cache must be written in
    place on CUDA ("sliding_window_cache=1 requires past_key/present_key ... to share the same
    buffer"), and a consumer runs after its producer, so it would read the ring already updated.
    Every other ring gets the windowed cache."""
    kinds = {layer.layer: layer.kind for layer in plan.layers}
    read = {layer.reads for layer in plan.layers if layer.role == "consumer" and kinds.get(layer.reads) == "ring"}
    return frozenset(f"past.{e.name}" for e in plan.entries if e.layer in read and e.kind == "ring")


def in_place_inputs(model: ir.Model) -> list[str]:
    """Cache inputs a runtime must bind to the same memory as their present: the past of every
    GroupQueryAttention with a windowed cache (ORT's CUDA kernel requires it)."""
    names = set()
    for node in model.graph:
        attr = node.attributes.get("sliding_window_cache")
        if node.op_type == "GroupQueryAttention" and attr is not None and attr.as_int() == 1:
            names.update(v.name for v in node.inputs[3:5] if v is not None and v.is_graph_input())
    return sorted(names)


def _check_signature(program: StepProgram, plan: CachePlan) -> None:
    inputs, outputs = step_io_names(plan)
    if list(program.inputs) != inputs:
        raise LowerError(f"step graph inputs {program.inputs} do not match the CachePlan's {inputs}")
    if list(program.outputs) != outputs:
        raise LowerError(f"step graph outputs {program.outputs} do not match the CachePlan's {outputs}")


def _name_dims(model: onnx.ModelProto, plan: CachePlan) -> None:
    """Give the dynamic dims readable names: batch, seq (new tokens), past_seq / total_seq."""
    def rename(value, names: dict[int, str]):
        for i, d in enumerate(value.type.tensor_type.shape.dim):
            if i in names and d.HasField("dim_param"):
                d.dim_param = names[i]
    values = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    rename(values["input_ids"], {0: "batch", 1: "seq"})
    rename(values["logits"], {0: "batch", 1: "seq"})
    for e in plan.entries:
        seq_dim = e.shape.index("seq") if "seq" in e.shape else None
        for prefix, length in (("past.", "past_seq"), ("present.", "total_seq")):
            names = {0: "batch"}
            if seq_dim is not None:
                names[seq_dim] = length
            rename(values[prefix + e.name], names)


def _initializer_bytes(model: ir.Model) -> int:
    """Bytes of the initializers held in memory (references to external data not counted)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor))


def _to_data_file(value: ir.Value) -> bool:
    """Whether an initializer goes to the data file in an external-data save: held in memory, not
    strings, at least :data:`EXTERNAL_TENSOR_BYTES`, and not marked to stay inline (``meta``
    :data:`~.ort_fusions.INLINE`: the decode graph's zero skips, so it gets no data file of its own)."""
    t = value.const_value
    return t is not None and not isinstance(t, ir.ExternalTensor) and t.dtype != ir.DataType.STRING \
        and t.nbytes >= EXTERNAL_TENSOR_BYTES and not value.meta.get(INLINE)


def _stream_weights(model: ir.Model, directory: str, location: str, file_bytes: int | None = None) -> list[str]:
    """Write every in-memory initializer of at least :data:`EXTERNAL_TENSOR_BYTES` to
    ``directory/location``, one tensor at a time in graph order, and replace it by a reference;
    returns the data file names. With ``file_bytes`` the data is split into files of at most that
    size (:func:`~effexport.exporter.backends.onnx.weights.data_files`). Progress (bytes, rate) is the build's phase.
    A streamed build's initializers are ``LazyTensor`` reads of checkpoint tensors
    (``exporter/frontends/streaming.py``): each is read, converted and written, then dropped.

    onnx_ir's ``convert_tensors_to_external`` calls each tensor's ``tofile``: torch.onnx's
    ``TorchTensor`` writes its torch storage through a ctypes view, a numpy-backed tensor (a folded
    constant) ``ndarray.tofile``; neither makes a bytes copy of the whole model. The layout is a
    function of the graph and the onnx_ir version (>= 1.1 packs densely; older versions align tensors
    over 1 MiB to 64 KiB), so builds stay byte-deterministic."""
    if any(isinstance(v.const_value, ir.ExternalTensor) and os.path.normpath(v.const_value.location) == location
           for v in model.graph.initializers.values()):
        raise LowerError(f"the model already references {location} (a structure-only build's placeholders); "
                         "it cannot also be written with external data")
    from effexport.exporter.backends.onnx.weights import WriteProgress, data_files

    values = [v for v in model.graph.initializers.values() if _to_data_file(v)]
    sizes = [v.const_value.nbytes for v in values]
    files = data_files(location, sizes, file_bytes)
    progress = WriteProgress(sum(sizes), location if len(files) == 1 else f"{len(files)} files")
    for name, indices in files:
        written = ir.external_data.convert_tensors_to_external(
            [values[i].const_value for i in indices], base_dir=directory, relative_path=name, callback=progress)
        for i, tensor in zip(indices, written):
            values[i].const_value = tensor
    progress.finish()
    phase(f"lower: {progress.line()}")
    return [name for name, _ in files]


def _save(model: ir.Model | onnx.ModelProto, path: Path, external: bool,
          finish: Callable[[onnx.ModelProto], None] | None = None, file_bytes: int | None = None) -> onnx.ModelProto:
    """Write atomically: into a temporary directory next to ``path``, then rename. With ``external``
    the weights are streamed to ``{path.name}.data`` first (:func:`_stream_weights`), so the proto
    serialized afterwards holds references only. ``finish`` edits that proto before it is written
    (IR version, function bodies, dim names). Returns the proto written to ``path``.

    ``model`` is the optimized onnx_ir model (its initializers are replaced by references to the
    temporary file, so it is spent afterwards) or a ``ModelProto``, read through onnx_ir."""
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".effexport-") as tmp:
        written = []
        if external:
            phase(f"lower: writing weights to {data}")
            written = _stream_weights(model, tmp, data, file_bytes)
        phase(f"lower: writing {path.name}")
        proto = ir.to_proto(model)
        if finish is not None:
            finish(proto)
        tmp_model = Path(tmp) / path.name
        onnx.save_model(proto, tmp_model)  # references stay references: nothing is read back
        for name in written:
            if os.path.exists(Path(tmp) / name):  # absent when no initializer was large enough
                os.replace(Path(tmp) / name, path.parent / name)
        os.replace(tmp_model, path)
    return proto


def _lower_step(program: StepProgram, plan: CachePlan, profile: str, example_batch: int,
                one_token: bool = False) -> ir.Model:
    """The optimized onnx_ir model of the step (``one_token``: the new-token count static 1), with
    its ``effexport.in_place`` metadata; its initializers still reference the program's tensors."""
    inputs, outputs = step_io_names(plan)
    exported = exported_step(program, plan, example_batch, one_token)
    try:
        # the translations see the program's placeholder names; the inputs get the plan's names after
        slot = rings_with_consumers(plan)
        slot = {ph for ph, name in zip(exported.graph_signature.user_inputs, inputs) if name in slot}
        capacity = buffer_capacity(plan.entries)
        with slot_rings(slot), max_context(capacity), one_token_graph() if one_token else contextlib.nullcontext():
            model = _lower_ir(exported, (), profile, None, inputs, outputs, capacity)
        if one_token and PROFILES[profile].ort_fusions:  # a [1, 1, H] skip matches [B, 1, H] rows only
            zero_skip_norms(model)
        model.metadata_props[IN_PLACE] = json.dumps(in_place_inputs(model))
    except Exception as exc:  # torch.onnx raises many types; report them as a lowering error
        what = f"ONNX export ({profile}{', one-token decode graph' if one_token else ''})"
        raise LowerError(f"{what} failed: {root_cause(exc)}") from exc
    return model


def _match_decode_io(model: ir.Model, decode: ir.Model) -> None:
    """Make the decode graph's inputs the general graph's, in order: a host input the decode graph
    does not read (``pos_host`` where no one-token node needs it) becomes an unused input of the
    same type, so a runtime feeds both graphs alike. Any other difference (an input it has and the
    general graph lacks, other outputs, other in-place caches or a host-read position) is a
    :class:`LowerError`: the runtime switches between the two on the same caches."""
    names = [v.name for v in model.graph.inputs]
    have = {v.name: v for v in decode.graph.inputs}
    extra = sorted(set(have) - set(names))
    if extra:
        raise LowerError(f"the one-token decode graph has inputs the step graph lacks: {extra}")
    decode.graph.inputs.clear()
    for value in model.graph.inputs:
        decode.graph.inputs.append(have.get(value.name) or ir.Value(name=value.name, type=value.type,
                                                                   shape=value.shape))
    if [v.name for v in decode.graph.outputs] != [v.name for v in model.graph.outputs]:
        raise LowerError("the one-token decode graph's outputs differ from the step graph's")
    for key in (IN_PLACE, DEVICE_POSITIONS):
        if decode.metadata_props.get(key) != model.metadata_props.get(key):
            raise LowerError(f"the one-token decode graph's {key} ({decode.metadata_props.get(key)}) differs from "
                             f"the step graph's ({model.metadata_props.get(key)})")


def _same_data(a, b) -> bool:
    """Whether two initializer tensors of one dtype and shape hold the same values: the same torch
    storage view (the program's parameters, which both lowerings reference), else equal bytes (a
    folded constant, a streamed build's lazy checkpoint read: read again here)."""
    if a is b:
        return True
    ra, rb = getattr(a, "raw", None), getattr(b, "raw", None)
    if isinstance(ra, torch.Tensor) and isinstance(rb, torch.Tensor):
        if (ra.data_ptr(), ra.stride(), ra.shape, ra.dtype) == (rb.data_ptr(), rb.stride(), rb.shape, rb.dtype):
            return True
        return ra.device == rb.device and bool(torch.equal(ra, rb))
    return a.tobytes() == b.tobytes()


def _shared_initializers(model: ir.Model, decode: ir.Model) -> list[tuple[ir.Value, ir.Value]]:
    """``(decode value, general value)`` for every decode initializer that the general graph has
    under its name with the same dtype, shape and values, large enough to go to the data file
    (:data:`EXTERNAL_TENSOR_BYTES`): the decode graph references the general graph's bytes for those."""
    def usable(t) -> bool:
        return t is not None and not isinstance(t, ir.ExternalTensor) and t.dtype != ir.DataType.STRING \
            and t.nbytes >= EXTERNAL_TENSOR_BYTES

    computed: dict = {}  # (dtype, shape) -> general values computed by the lowering (numpy), by content
    for other in model.graph.initializers.values():
        if usable(other.const_value) and isinstance(getattr(other.const_value, "raw", None), np.ndarray):
            computed.setdefault((other.const_value.dtype, tuple(other.const_value.shape)), []).append(other)
    pairs = []
    for name, value in decode.graph.initializers.items():
        a = value.const_value
        if not usable(a):
            continue
        other = model.graph.initializers.get(name)
        b = other.const_value if other is not None else None
        if usable(b) and a.dtype == b.dtype and a.shape == b.shape and _same_data(a, b):
            pairs.append((value, other))
        elif isinstance(getattr(a, "raw", None), np.ndarray):  # a table the lowering computed (RoPE), named
            # after a value of its own graph: the general graph's copy has another name
            match = next((o for o in computed.get((a.dtype, tuple(a.shape)), ())
                          if _same_data(a, o.const_value)), None)
            if match is not None:
                pairs.append((value, match))
    return pairs


def _value_names(graph: ir.Graph) -> set[str]:
    return ({v.name for v in graph.inputs} | set(graph.initializers)
            | {o.name for node in graph.all_nodes() for o in node.outputs})


def _one_namespace(model: ir.Model, decode: ir.Model, pairs: list[tuple[ir.Value, ir.Value]]) -> None:
    """Name the decode graph's initializers so that a name both graphs hold means the same data: a
    shared one takes the general graph's name (where free), any other that the general graph also
    names is renamed ``decode.{name}``. A runtime can then hand one set of shared weights, by name,
    to both sessions (:class:`~.runtime.OrtRuntime`)."""
    taken = _value_names(decode.graph)
    for value, other in pairs:
        if value.name != other.name and other.name not in taken:
            taken.discard(value.name)
            value.name = other.name
            taken.add(other.name)
    same = {id(v) for v, other in pairs if v.name == other.name}  # one name, one tensor in both graphs
    for name, value in list(decode.graph.initializers.items()):
        if name in model.graph.initializers and id(value) not in same:
            new, k = f"decode.{name}", 1
            while new in taken:
                new, k = f"decode{k}.{name}", k + 1
            value.name = new
            taken.add(new)


def _has_external(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


MHA = "MultiHeadAttention"


def export_steps(program: StepProgram, plan: CachePlan, path: str, profile: str = "ort",
                 example_batch: int = 2, external_data: bool | None = None, data_file_bytes: int | None = None,
                 decode_path: str | None = None) -> tuple[onnx.ModelProto, onnx.ModelProto | None]:
    """:func:`export_step`, and with ``decode_path`` the step's one-token *decode graph* there.

    The decode graph is the same program exported with the new-token count static 1 and lowered in
    the same profile: the ``ort`` translations then read a cache whose valid rows are a prefix --
    a KV-sharing consumer's read of its producer's ring (``min(pos + 1, W)`` rows) or buffer
    (``pos + 1``), a slot-ring producer's or a head-size-512 buffer owner's own read after its write
    -- with one ``com.microsoft::MultiHeadAttention`` (:func:`.attention.attend_mha_prefix`) instead
    of the ~10-node MatMul / Softmax decomposition the general graph needs for chunks, and each plain
    ``[B, 1, H]`` RMS norm as a ``SkipSimplifiedLayerNormalization`` with a zero skip (the cheaper
    kernel; :func:`.ort_fusions.zero_skip_norms`); every other node is the general graph's. Inputs, outputs, cache layouts and the in-place metadata are the
    general graph's (:func:`_match_decode_io`), so a runtime runs either on the same caches.

    The weights are written once: both graphs take external data, the general graph's
    ``{path}.data`` (split by ``data_file_bytes``), and every decode initializer with the general
    graph's name, dtype, shape and values (:func:`_shared_initializers`) references the same file,
    offset and length; anything else large goes to ``{decode_path}.data`` (none in the presets: the
    zero skips stay inline).

    Not written (returns None for it) when the decode graph has no MultiHeadAttention (nothing to
    gain: a model without KV sharing whose attention is GroupQueryAttention already), or for a
    structure-only build (no weights: its placeholders have no shared file to reference).

    Cost: the decode graph is a second lowering, ~18 s of a ~43 s one on gemma4-e2b:tiny (2 CPU
    cores), ~80% of it tracing: ``torch.export`` at T = 1 (~4-6 s), torch.onnx's decomposition
    (``run_decompositions``, ~9 s) and type promotion (~3 s) of that program; translation ~1 s, the
    optimizer and fusions ~1.3 s. The general graph's traces are not reused: the decomposition
    retraces with T static, so sizes become constants and the nodes and value names differ from a
    retrace at symbolic T."""
    _check_signature(program, plan)
    model = _lower_step(program, plan, profile, example_batch)
    decode = None
    if decode_path is not None and not _has_external(model):
        decode = _lower_step(program, plan, profile, example_batch, one_token=True)
        if not any(n.op_type == MHA for n in decode.graph):
            decode = None
        else:
            _match_decode_io(model, decode)
    if decode is not None:
        external_data = True
        shared = _shared_initializers(model, decode)
        _one_namespace(model, decode, shared)
    elif external_data is None:
        external_data = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD

    def finish(proto: onnx.ModelProto) -> None:
        try:
            _finish(proto, profile)
        except ValueError as exc:  # a function body missing: a lowering error, as inside lower()
            raise LowerError(f"ONNX export ({profile}) failed: {exc}") from exc
        _name_dims(proto, plan)
    proto = _save(model, Path(path), external_data, finish, data_file_bytes)
    if decode is None:
        return proto, None
    for value, other in shared:  # now a reference into the general graph's data file
        value.const_value = other.const_value
    own = any(_to_data_file(v) for v in decode.graph.initializers.values())
    decode.graph.doc_string = (f"effexport one-token decode graph of {Path(path).name}: the same inputs, outputs "
                               "and caches, for steps of exactly one new token per row")
    return proto, _save(decode, Path(decode_path), own, finish, data_file_bytes)


def export_step(program: StepProgram, plan: CachePlan, path: str, profile: str = "ort",
                example_batch: int = 2, external_data: bool | None = None,
                data_file_bytes: int | None = None) -> onnx.ModelProto:
    """Lower the rewritten step graph to ONNX at ``path`` and return the saved ``ModelProto``.

    ``external_data=None`` writes weights externally only above :data:`EXTERNAL_DATA_THRESHOLD`
    bytes; they are then streamed to ``{path}.data`` (see the module docstring) and the returned
    proto references that file instead of holding the weights; ``data_file_bytes`` splits that data
    into files of at most that size (``{stem}-0000k-of-0000n.onnx.data``). :func:`export_steps`
    also writes the one-token decode graph."""
    return export_steps(program, plan, path, profile, example_batch, external_data, data_file_bytes)[0]
