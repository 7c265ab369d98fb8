"""Memory-lean builds of real checkpoints: weights streamed from safetensors to the artifact.

A Hugging Face directory whose weights go through this path (``--stream-weights``, automatic for
``--target onnx`` at :data:`STREAM_MIN_BYTES` of safetensors and more) is never loaded whole:

* **load**: the model is built from ``config.json`` with every *parameter* on the meta device and its
  buffers real (RoPE frequencies and other values computed at construction, a few KiB); persistent
  buffers the checkpoint holds are read from it. Every parameter must map 1:1 onto a checkpoint
  tensor of its shape (tied parameters share one); otherwise (renamed or fused keys, missing or
  extra tensors, dtypes without a torch type) the ordinary full load runs instead and the load line
  says why. The safetensors files are indexed from their headers only (:class:`Checkpoint`).
* **capture, rewrite, lower** run on the meta parameters, as a ``--weights none`` build does. When
  lowering ends, each initializer that stands for a parameter becomes an ``onnx_ir.LazyTensor``
  that reads its checkpoint tensor, converts it to the initializer's dtype (the build's ``--dtype``)
  and applies the layout transforms lowering put on it: a ``Transpose`` of a weight (``Linear`` ->
  ``MatMul``) is folded into a new initializer recording the permutation, as constant folding does
  for in-memory weights. The mapping (initializer -> checkpoint tensor, file, dtypes, permutation) is
  recorded in ``report.json["weights"]["initializers"]``.
* **write**: the initializers are written to the external data file(s) one tensor at a time
  (``exporter/backends/onnx/export.py``, ``exporter/backends/onnx/weights.py``), so the process
  holds one converted tensor at a time. Tensors are
  read with ``readinto`` at their header offsets (not memory-mapped: pages of a mapping count in the
  process's resident set until it is closed; read this way they stay in the page cache only).
  ``--data-file-size SIZE`` splits the data into several files of at most SIZE each (a tensor never
  spans two files). Progress (bytes done / total, rate) goes to the build's heartbeat lines, and a
  build whose output filesystem lacks the bytes it will write is refused before capture (only the
  headers are read by then).
* **parity** (``exporter/verify/streamed.py``): the eager model is materialised from the checkpoint in fp32,
  runs the prompt and the greedy decode steps, its logits are kept (a few MB) and the model is
  freed; only then is the artifact opened in ONNX Runtime and fed the same tokens. The whole model is
  therefore held once at a time (eager fp32, then ORT's copy), never twice. A bf16 / fp16 artifact
  is checked, as without streaming on a machine without ONNX Runtime's CUDA provider, through its
  fp32 twin (captured, rewritten and streamed again in fp32; same op structure required).
  ``report.json["parity"]["mode"]`` says so. A check whose fp32 model exceeds the memory available
  is refused before capture (:func:`check_parity_memory`: pass ``--no-check``); not implemented: a
  layer-group by layer-group check for such models.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
from torch import nn

from effexport.exporter.errors import LowerError, OutputError

STREAM_MIN_BYTES = 256 << 20
"""Safetensors bytes from which a Hugging Face directory is streamed by default (``--target onnx``)."""
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
SPACE_MARGIN = 64 << 20  # model.onnx, JSON files, filesystem slack
STEP_PREFIX = "hf."      # HFStep holds the transformers model as ``self.hf``


# ------------------------------------------------------------------------------------ checkpoint
@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie in a safetensors file."""

    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple


class Checkpoint:
    """The safetensors files of a model directory (``model.safetensors.index.json`` shards or every
    ``*.safetensors``), indexed from their headers; :meth:`read` reads one tensor."""

    def __init__(self, directory: str):
        from effexport.exporter.frontends.inputs import check_safetensors

        self.directory = directory
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        self.files = [os.path.join(directory, f) for f in files]
        self.tensors: dict[str, TensorRef] = {}
        for path in self.files:
            header = check_safetensors(path)
            with open(path, "rb") as f:
                start = 8 + int.from_bytes(f.read(8), "little")
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self.tensors[key] = TensorRef(path, start + begin, end - begin, info["dtype"], tuple(info["shape"]))

    @property
    def nbytes(self) -> int:
        return sum(ref.nbytes for ref in self.tensors.values())

    def unsupported(self) -> list[str]:
        """Tensors whose dtype has no torch type here (e.g. FP8 scales): such a checkpoint is not streamed."""
        return sorted(k for k, ref in self.tensors.items() if ref.dtype not in TORCH_DTYPES)

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` in its stored dtype, read from the file (no memory map)."""
        ref = self.tensors[key]
        raw = torch.empty(ref.nbytes, dtype=torch.uint8)
        if ref.nbytes:
            with open(ref.file, "rb") as f:
                f.seek(ref.offset)
                if f.readinto(raw.numpy()) != ref.nbytes:
                    raise OutputError(f"{ref.file} ended inside tensor {key}: the file changed during the build")
        return raw.view(TORCH_DTYPES[ref.dtype]).reshape(ref.shape)


def wanted(directory: str, flag: bool | None) -> bool:
    """Whether a build of the Hugging Face ``directory`` streams its weights: ``flag`` when given
    (``--stream-weights`` / ``--no-stream-weights``), else from :data:`STREAM_MIN_BYTES` of safetensors."""
    if flag is not None:
        return flag
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.endswith(".safetensors")) >= STREAM_MIN_BYTES


# ------------------------------------------------------------------------------------------ load
@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered inside the block move to the meta device (buffers stay real)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class WeightSource:
    """Which checkpoint tensor each meta parameter of the step model is (``names``: the step model's
    parameter name -> checkpoint key), and the lowering hook that turns initializers into lazy reads."""

    def __init__(self, checkpoint: Checkpoint, names: dict[str, str]):
        self.checkpoint, self.names = checkpoint, names
        self.initializers: dict[str, dict] = {}  # the ONNX initializer -> its source (report.json)

    def lazy(self, name: str, key: str, dtype: torch.dtype, perm: tuple | None = None):
        import onnx_ir as ir

        ref = self.checkpoint.tensors[key]
        shape = ref.shape if perm is None else tuple(ref.shape[p] for p in perm)
        self.initializers[name] = {"key": key, "file": os.path.basename(ref.file), "stored": ref.dtype,
                                   "dtype": str(dtype).removeprefix("torch."), "transpose": list(perm) if perm else None}

        def read():
            tensor = self.checkpoint.read(key).to(dtype)
            if perm is not None:
                tensor = tensor.permute(perm)
            return _ir_tensor(tensor.contiguous(), name)
        return ir.LazyTensor(read, _IR_DTYPE()[dtype], ir.Shape(shape), name=name)

    def attach(self, model, meta: dict) -> None:
        """After the optimizer (``structure_only.meta_weights_as_external``): every initializer that
        held a meta tensor (``meta``: name -> its torch.onnx tensor) reads its checkpoint tensor lazily;
        then Transposes of such initializers are folded (:meth:`_fold_transposes`)."""
        for name, value in list(model.graph.initializers.items()):
            if name not in meta:  # real (buffers, folded constants) or dropped by the optimizer
                continue
            tensor, key = meta[name], self.names.get(name)
            if key is None:
                raise LowerError(f"the ONNX initializer {name!r} is derived from the weights by a rewrite, not a "
                                 "checkpoint tensor, so it cannot be streamed; build with --no-stream-weights")
            self.initializers.pop(name, None)
            value.const_value = self.lazy(name, key, tensor.raw.dtype)
        self._fold_transposes(model)

    def _fold_transposes(self, model) -> None:
        import onnx_ir as ir

        graph = model.graph
        for node in list(graph):
            source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
            info = self.initializers.get(source.name) if source is not None and source.is_initializer() else None
            if info is None or info["transpose"] is not None:
                continue
            attr = node.attributes.get("perm")
            rank = len(self.checkpoint.tensors[info["key"]].shape)
            perm = tuple(attr.as_ints()) if attr is not None else tuple(reversed(range(rank)))
            out = node.outputs[0]
            folded = ir.Value(name=out.name, shape=out.shape, type=out.type,
                              const_value=self.lazy(out.name, info["key"], getattr(torch, info["dtype"]), perm))
            out.replace_all_uses_with(folded, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            graph.register_initializer(folded)
            if not source.uses():
                graph.initializers.pop(source.name)
                self.initializers.pop(source.name)

    def report(self) -> dict:
        return {"streamed": True, "checkpoint_bytes": self.checkpoint.nbytes, "files": len(self.checkpoint.files),
                "initializers": dict(sorted(self.initializers.items()))}


def _IR_DTYPE():
    import onnx_ir as ir

    return {torch.float32: ir.DataType.FLOAT, torch.bfloat16: ir.DataType.BFLOAT16, torch.float16: ir.DataType.FLOAT16,
            torch.float64: ir.DataType.DOUBLE, torch.int64: ir.DataType.INT64, torch.int32: ir.DataType.INT32,
            torch.int16: ir.DataType.INT16, torch.int8: ir.DataType.INT8, torch.uint8: ir.DataType.UINT8,
            torch.bool: ir.DataType.BOOL}


def _ir_tensor(tensor: torch.Tensor, name: str):
    import onnx_ir as ir

    if tensor.dtype == torch.bfloat16:
        return ir.Tensor(tensor.view(torch.uint16).numpy(), dtype=ir.DataType.BFLOAT16, name=name)
    return ir.Tensor(tensor.numpy(), name=name)


def load_streamed(path: str):
    """A Hugging Face directory as a LoadedModel whose parameters are meta tensors backed by the
    checkpoint (``loaded.weights``: its :class:`WeightSource`), or ``(None, reason)`` when the
    checkpoint does not map 1:1 onto the model (the caller loads it fully instead)."""
    from effexport.exporter.frontends import hf

    transformers = hf.require_transformers()
    checkpoint = Checkpoint(path)
    odd = checkpoint.unsupported()
    if odd:
        return None, f"{odd[0]} is stored as {checkpoint.tensors[odd[0]].dtype}"
    with hf.hub_offline(), hf._quiet(transformers):
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        if getattr(config, "_attn_implementation", None) not in (None, *hf.EXPORTABLE_ATTENTION):
            config._attn_implementation = None
        if getattr(config, "quantization_config", None) is not None:
            return None, "quantized checkpoint"
        with torch.random.fork_rng(), _parameters_on_meta():
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    step = hf.HFStep(model)
    names, used, problem = {}, set(), None
    by_tensor: dict[int, str] = {}
    for name, param in step.named_parameters(remove_duplicate=False):
        key = name.removeprefix(STEP_PREFIX)
        ref = checkpoint.tensors.get(key)
        if ref is not None and ref.shape != tuple(param.shape):
            return None, f"{key}: checkpoint shape {list(ref.shape)}, model {list(param.shape)}"
        if ref is not None:
            by_tensor.setdefault(id(param), key)
    for name, param in step.named_parameters(remove_duplicate=False):  # tied names share one source
        key = by_tensor.get(id(param))
        if key is None:
            problem = problem or f"{name.removeprefix(STEP_PREFIX)} is not in the checkpoint"
            continue
        names[name], used = key, used | {key}
    for name, buf in step.named_buffers():
        key = name.removeprefix(STEP_PREFIX)
        if key in checkpoint.tensors:  # a persistent buffer the checkpoint holds: small, read now
            module, leaf = step.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            module._buffers[leaf] = checkpoint.read(key).to(buf.dtype).clone()
            used.add(key)
    extra = sorted(set(checkpoint.tensors) - used)
    if problem or extra:
        return None, problem or f"{extra[0]} is in the checkpoint but not a parameter of the model ({len(extra)} such)"
    source = {"path": os.path.abspath(path), "transformers": transformers.__version__, "streamed": True}
    loaded = hf._loaded(step, os.path.basename(os.path.normpath(path)) or path, source)
    loaded.weights = WeightSource(checkpoint, names)
    return loaded, None


def materialize(loaded, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A real copy of a streamed LoadedModel's step model: every meta parameter read from the
    checkpoint in ``dtype`` (one tensor at a time; tied parameters stay tied), buffers as they are."""
    model = copy.deepcopy(loaded.model)
    source: WeightSource = loaded.weights
    read: dict[str, nn.Parameter] = {}
    for name, _ in list(model.named_parameters(remove_duplicate=False)):
        key = source.names[name]
        if key not in read:
            read[key] = nn.Parameter(source.checkpoint.read(key).to(dtype), requires_grad=False)
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = read[key]
    return model.eval()


# --------------------------------------------------------------------------- sharded (--tp) loads
class SliceReader:
    """One rank's weights read from the checkpoint (``--target torch --tp N``): a whole tensor, or the
    rank's block of a split one through safetensors' ``safe_open(file).get_slice(key)[...]`` -- only
    the block's bytes are read, never the whole tensor. Files are opened (memory-mapped by
    safetensors) inside :meth:`rank` and closed when it ends, so the mapped pages a rank touched do
    not stay in the process's resident set while the next rank loads.

    It counts what it hands out: ``bytes_read`` (all ranks), ``rank_bytes`` (per rank) and ``peak``,
    the most bytes of the tensors it returned that were alive at once (each tensor's storage is
    followed by a ``weakref.finalize``): a build that held two ranks' weights, or read whole tensors to slice
    them, shows it here (``tests/test_sharded_cli.py``)."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.bytes_read, self.live, self.peak = 0, 0, 0
        self.rank_bytes: list[int] = []
        self._files: dict | None = None

    @contextlib.contextmanager
    def rank(self):
        """The reads of one rank (files opened on first use, closed at the end)."""
        self._files, self.rank_bytes = {}, self.rank_bytes + [0]
        try:
            yield self
        finally:
            files, self._files = self._files, None
            for handle in files.values():
                handle.__exit__(None, None, None)

    def _released(self, nbytes: int) -> None:
        self.live -= nbytes

    def read(self, key: str, dtype: torch.dtype, dim: int | None = None, start: int = 0,
             length: int | None = None) -> torch.Tensor:
        """Checkpoint tensor ``key`` converted to ``dtype``; with ``dim``, only ``[start, start +
        length)`` along ``dim``."""
        import weakref

        from safetensors import safe_open

        ref = self.checkpoint.tensors[key]
        if ref.file not in self._files:
            self._files[ref.file] = safe_open(ref.file, framework="pt", device="cpu").__enter__()
        handle = self._files[ref.file]
        tensor = handle.get_tensor(key) if dim is None else \
            handle.get_slice(key)[(slice(None),) * dim + (slice(start, start + length),)]
        tensor = tensor.to(dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self.bytes_read += nbytes
        self.rank_bytes[-1] += nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor.untyped_storage(), self._released, nbytes)  # outlives the tensor object
        return tensor


def load_rank_weights(gm, source: WeightSource, splits: dict, rank: int, reader: SliceReader) -> None:
    """Fill rank ``rank``'s step graph ``gm`` (:func:`~effexport.passes.sharding.shard_rank` of a
    program captured on meta parameters) with its weights from the checkpoint: every meta ``get_attr``
    tensor is read by ``reader``, sliced as ``splits`` (the ShardPlan's ``weights``: target ->
    :class:`~effexport.passes.sharding.Split`) says, in the dtype of its placeholder. A meta tensor
    that is not a checkpoint tensor (derived from the weights by a rewrite) is a :class:`LowerError`."""
    from effexport.passes.sharding import _get, _set_weight

    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = _get(gm, node.target)
        if not (isinstance(value, torch.Tensor) and value.is_meta):
            continue
        key = source.names.get(node.target)
        if key is None:
            raise LowerError(f"the weight {node.target!r} is derived from the weights by a rewrite, not a "
                             "checkpoint tensor, so a rank cannot read its slice; build with --no-stream-weights")
        split = splits.get(node.target)
        if split is None:
            tensor = reader.read(key, value.dtype)
        else:
            size = source.checkpoint.tensors[key].shape[split.dim] // split.nblocks
            tensor = reader.read(key, value.dtype, split.dim, split.block(rank) * size, size)
        if tuple(tensor.shape) != tuple(value.shape):
            raise LowerError(f"rank {rank}: {key} read as {list(tensor.shape)}, the rank program holds "
                             f"{list(value.shape)}; build with --no-stream-weights")
        _set_weight(gm, node.target, tensor)
    _meta_to_cpu(gm)


def _meta_to_cpu(gm) -> None:
    """The device arguments a capture on meta inputs wrote into the graph (``arange(device=meta)``,
    ``to(buffer, meta)``) become the CPU, where the rank's weights now are."""
    from torch.fx.node import map_aggregate

    def cpu(arg):
        return torch.device("cpu") if isinstance(arg, torch.device) and arg.type == "meta" else arg

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args, node.kwargs = map_aggregate(node.args, cpu), map_aggregate(node.kwargs, cpu)
    gm.recompile()


# ------------------------------------------------------------------------------------- the space
def artifact_bytes(source: WeightSource, dtype: torch.dtype, twin: bool) -> int:
    """Bytes a streamed build writes: every parameter name's tensor in ``dtype`` (tied names counted
    once each: an embedding table and a tied LM head are written as two initializers), plus the fp32
    twin's when ``twin``."""
    itemsize = torch.empty((), dtype=dtype).element_size() + (4 if twin else 0)
    return sum(math.prod(source.checkpoint.tensors[key].shape) * itemsize for key in source.names.values())


def check_space(output: str, need: int) -> None:
    """Refuse a build whose output filesystem has less than ``need`` bytes (+ a margin) free."""
    parent = os.path.dirname(os.path.abspath(output)) or "."
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if free < need + SPACE_MARGIN:
        raise OutputError(f"not enough space for {output!r}: the build writes {need / 2**30:.2f} GiB of weights, "
                          f"{parent} has {free / 2**30:.2f} GiB free; free space or pass -o a directory on "
                          "another disk (nothing was written)")


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_parity_memory(source: WeightSource) -> None:
    """Refuse, before anything runs, a parity check whose eager fp32 model alone (4 bytes a parameter,
    held once: see ``exporter/verify/streamed.py``) exceeds the memory available now."""
    from effexport.exporter.errors import UsageError

    need = 4 * sum(math.prod(source.checkpoint.tensors[key].shape) for key in set(source.names.values()))
    free = available_memory()
    if free is not None and need > free:
        raise UsageError(f"the parity check needs the model in fp32 ({need / 2**30:.1f} GiB, held once: eager, then "
                         f"the artifact) and {free / 2**30:.1f} GiB of memory is available; pass --no-check "
                         "(the artifact is still written tensor by tensor), or check it on a larger machine "
                         "with 'effexport check DIR'")
