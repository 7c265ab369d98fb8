"""``effexport.runtime``: drive a built artifact -- prefill, decode loop, caches by the CachePlan, greedy
generation.

The artifact directory holds ``effexport.json`` (the CachePlan, I/O names, files) and the step model.
One step call takes ``input_ids [B, T]``, ``pos`` (0-d int64, position of the first new token) and
every cache input in plan order, and returns logits and every present cache in the same order;
the runtime feeds presents back as pasts. Prefill is the same step with ``pos = 0`` and the plan's
initial caches (zero-length full caches, zero rings and states).

Backends: ONNX Runtime (CPU; CUDA when onnxruntime-gpu is installed and ``device="cuda"``).
On CUDA the runtime uses ONNX Runtime's I/O binding: caches are ``onnxruntime.OrtValue`` tensors on
the GPU, each step binds the previous step's present caches as its past caches and lets ORT
allocate the new ones on the device, and only the logits come back to the host (``io_binding=True``
does the same on CPU, where it is tested).

Caches of kind ``buffer`` (``--kv-cache buffer``: a full cache in a fixed buffer of ``max_context``
rows) are updated in place: with I/O binding a buffer is a torch tensor on the device, bound by
pointer as both its past input and its present output, so ONNX Runtime's GroupQueryAttention writes
the new rows into it (it detects the shared buffer) and no cache is copied or reallocated between steps; without
binding, ORT returns a new present each step, as for the other kinds. A step that would run past the
buffers' rows is refused before ORT sees it.

An artifact with a one-token *decode graph* (``files.decode``, ``decode.onnx``: ``ort`` profile,
``--kv-cache buffer``; :func:`~.export.export_steps`) has two sessions: one-token steps run the
decode graph, every other step ``model.onnx``, on the same caches (the two graphs have the same
inputs, outputs and cache layouts). The two sessions share the weights in memory
(:func:`shared_weights`): the external data both graphs reference is mapped once (``np.memmap``,
read-only; CPU) or copied to the device once (torch tensors; CUDA), and each tensor goes to both
sessions as the same ``OrtValue`` through ``SessionOptions.add_initializer``, which ONNX Runtime uses
in place of the file's bytes without a copy when the value lies where the session plans the
initializer (onnxruntime session_state_utils.cc: "an initializer supplied by the user for the
purpose of sharing"). The CPU EP still prepacks the weights of its MatMul kernels, once per session
(a copy of those in each); the CUDA EP does not prepack. ORT's graph optimizer folds constant
subgraphs from the file's own bytes (measured with onnxruntime 1.32: a user initializer does not
reach a folded Cast), which are the shared values' bytes here; a folded result is each session's. The CUDA path is written against
onnxruntime's Python API (``OrtValue.from_dlpack``) but untested here (no GPU in CI).

ONNX Runtime's ``com.microsoft::GroupQueryAttention`` (``ort`` profile) refuses several new tokens
on a non-empty cache at batch > 1 ("batch_size must be 1 when sequence_length > 1 and past context
is given", a check in ORT's GQA helper, whatever ``seqlens_k`` says). :meth:`OrtRuntime.step` then
runs the batch one row at a time (each row's chunk in one call) and concatenates logits and
caches along the batch axis: rows are independent and share positions, so the result equals one
batched call. Prefill from an empty cache and one-token decode run batched.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from effexport.exporter.backends.artifact import (StepResult, in_pieces, load_manifest, numpy_caches, pieces_needed,
                                               plan_entries)
from effexport.exporter.backends.onnx.host_positions import IN_PLACE
from effexport.exporter.backends.onnx.profiles import recorded
from effexport.exporter.errors import BackendMissingError, LoadError
from effexport.passes.cache_plan import buffer_capacity

STEP_INPUTS = ("input_ids", "pos", "pos_host")
"""The step inputs that are not caches (``pos_host``: :mod:`effexport.exporter.backends.onnx.host_positions`)."""
BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


def _host(cache) -> np.ndarray:
    """A cache as a numpy array (an OrtValue is copied to the host)."""
    return cache if isinstance(cache, np.ndarray) else cache.numpy()


def _bind(bind, name: str, tensor: torch.Tensor) -> None:
    """``binding.bind_input`` / ``bind_output`` of ``name`` to the memory of a torch ``tensor``."""
    onnx_type = {torch.float32: 1, torch.float16: 10, torch.bfloat16: BFLOAT16, torch.int64: 7}[tensor.dtype]
    bind(name, tensor.device.type, tensor.device.index or 0, onnx_type, list(tensor.shape), tensor.data_ptr())


def _numpy_dtype(data_type: int) -> np.dtype | None:
    """The numpy dtype an ``onnx.TensorProto`` element type's bytes are read as, for a value ONNX Runtime
    takes from numpy (``onnx.helper.tensor_dtype_to_np_dtype``): bf16 as its int16 bit pattern (ORT
    gets its type separately); None for a type numpy has no native dtype of (string, complex, the
    ``ml_dtypes`` float8 / int4 kinds), which ORT cannot take from numpy."""
    if data_type == BFLOAT16:
        return np.dtype(np.int16)
    import onnx

    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    except KeyError:
        return None
    return dtype if dtype.isbuiltin == 1 and dtype.kind in "biuf" else None


def shared_weights(artifact_dir: str, files: list[str], ort, device: str = "cpu") -> tuple[dict[str, object], list]:
    """One ``OrtValue`` per external tensor of the step graphs ``files`` (the artifact's ONNX files),
    by initializer name; a tensor both graphs reference (same file, offset and length) is one value.

    CPU: a view of the data file mapped read-only (``np.memmap``; no copy: ORT wraps the pages), or
    an aligned copy where a tensor's offset is not 64-byte aligned (onnx_ir packs tensors densely).
    CUDA: one device copy (a torch tensor) wrapped without a copy by ``OrtValue.from_dlpack``.
    Returns the values by name and what must outlive the sessions (the device tensors, the maps:
    ONNX Runtime holds no reference to them, and a value freed under a session crashes it). A name bound
    to other bytes in the two graphs is a :class:`LoadError` (the export names them apart:
    ``export._one_namespace``)."""
    import onnx

    root = os.path.realpath(artifact_dir)
    maps, values, names, keep, inline = {}, {}, {}, [], set()
    for file in files:
        model = onnx.load(os.path.join(artifact_dir, file), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                inline.add(t.name)
                continue
            info = {e.key: e.value for e in t.external_data}
            key = (info["location"], int(info.get("offset", 0)), int(info["length"]))
            if names.setdefault(t.name, key) != key:
                raise LoadError(f"{artifact_dir}: initializer {t.name} names other data in {file} than in {files[0]}; "
                                "rebuild the artifact")
            if key in values:
                continue
            path = os.path.realpath(os.path.join(artifact_dir, key[0]))
            if not path.startswith(root + os.sep):
                raise LoadError(f"{artifact_dir}: {file} references data outside the artifact ({key[0]!r})")
            if path not in maps:
                maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
            dtype = _numpy_dtype(t.data_type)
            if dtype is None:
                raise LoadError(f"{artifact_dir}: initializer {t.name} has element type {t.data_type}, which the "
                                "runtime cannot share")
            array = maps[path][key[1]:key[1] + key[2]].view(dtype).reshape(tuple(t.dims))
            if device == "cuda":
                tensor = torch.from_numpy(np.array(array)).to(device)
                tensor = tensor.view(torch.bfloat16) if t.data_type == BFLOAT16 else tensor
                value = ort.OrtValue.from_dlpack(tensor)
                keep.append(tensor)
            else:
                if key[1] % 64:
                    array = np.array(array)  # aligned for the kernels; still one copy for both sessions
                value = (ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, BFLOAT16) if t.data_type == BFLOAT16
                         else ort.OrtValue.ortvalue_from_numpy(array))
            values[key] = value
    clash = sorted(inline & set(names))
    if clash:  # a value handed to both sessions would replace another graph's own constant of that name
        raise LoadError(f"{artifact_dir}: initializer {clash[0]} is external data in one step graph and a constant "
                        "of its own in another; rebuild the artifact")
    return {name: values[key] for name, key in names.items()}, keep + list(maps.values())


CUDA_OPTIONS = {"arena_extend_strategy": "kSameAsRequested"}
"""The CUDA execution provider's options in every session the runtimes open. ONNX Runtime's arena
grows by powers of two by default, so a model whose weights ORT loads itself can reserve up to about
twice their size (BENCHMARKS.md run 32: the 27 GB DeepSeek V4 Flash cut ran out of an 80 GB GPU beside
its eager reference); growing by what is asked keeps the reservation at the weights' size. Steady
decode steps allocate nothing new either way (freed blocks are reused)."""


MEM_REUSE_ENV = "EFFEXPORT_ORT_MEM_REUSE"


def mem_reuse_default(device: str) -> bool:
    """Whether the runtimes let ONNX Runtime reuse intermediate buffers: not on CUDA, yes on the CPU;
    :data:`MEM_REUSE_ENV` ``1`` / ``0`` overrides both.

    Why not on CUDA: ONNX Runtime 1.31.1's memory planner computed wrong steps there with reuse on.
    ``deepseek-v4-flash:tiny`` in bf16 (``bench/runtime_pair_probe.py``, BENCHMARKS.md run 36, H100):
    with reuse, a batch-2 prompt of 10 tokens and 15 greedy steps through :class:`OrtRuntime` differ
    from the same artifact replayed by :class:`~.graph_runtime.CudaGraphRuntime` by up to 1.52 max rel
    (other tokens from step 8); with reuse off the two are bit-identical, and the graph runtime gives
    the same numbers either way (it binds every output to its own memory). Run 34 had found the same
    planner handing a host scalar of the compressor body to another value while it was still read.
    The cost is memory for the intermediates of an uncaptured step (each keeps its own buffer); the
    CPU EP gave bit-identical steps both ways, so it keeps its reuse."""
    env = os.environ.get(MEM_REUSE_ENV)
    if env in ("0", "1"):
        return env == "1"
    return device != "cuda"


class OrtRuntime:
    """An ONNX Runtime session over an artifact's step model (and a second one over its one-token
    decode graph, sharing the weights, where the artifact has one: the module docstring)."""

    def __init__(self, artifact_dir: str, device: str = "cpu", threads: int | None = None,
                 io_binding: bool | None = None, session_options=None, mem_reuse: bool | None = None):
        """``session_options``: an ``onnxruntime.SessionOptions`` to start the session with (profiling,
        optimization level, logging); ``threads`` sets its intra-op thread count. With a decode graph
        both sessions start with it, and it takes the shared weights (``add_initializer``): give each
        runtime its own. ``mem_reuse``: ONNX Runtime's reuse of intermediate buffers
        (``SessionOptions.enable_mem_reuse``); None: as ``session_options`` say where given, else
        :func:`mem_reuse_default` (off on CUDA)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendMissingError("onnxruntime is not installed: pip install onnxruntime "
                                      "(or onnxruntime-gpu for CUDA)") from None
        self.ort, self.device, self.artifact_dir = ort, device, artifact_dir
        self.io_binding = device == "cuda" if io_binding is None else io_binding
        self.manifest = load_manifest(artifact_dir)
        self.entries = plan_entries(self.manifest)
        options = session_options if session_options is not None else ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if mem_reuse is not None or session_options is None:
            options.enable_mem_reuse = mem_reuse_default(device) if mem_reuse is None else mem_reuse
        self.mem_reuse = options.enable_mem_reuse
        files = self.manifest["files"]
        self.graph_files = [files["step"]] + ([files["decode"]] if files.get("decode") else [])
        self.weights, self._weights_memory = {}, []
        """The weights both sessions share, by initializer name (empty without a decode graph); kept
        alive with the runtime (``SessionOptions`` holds no reference to them)."""
        if len(self.graph_files) > 1:
            self.weights, self._weights_memory = shared_weights(artifact_dir, self.graph_files, ort, device)
            for name, value in self.weights.items():
                options.add_initializer(name, value)
        providers = self._providers(ort, device)
        self.session = ort.InferenceSession(os.path.join(artifact_dir, files["step"]), options, providers=providers)
        self.decode_session = None
        """The session of the one-token decode graph (None: one-token steps run ``self.session``)."""
        if len(self.graph_files) > 1:
            self.decode_session = ort.InferenceSession(os.path.join(artifact_dir, files["decode"]), options,
                                                       providers=providers)
        self.last_graph = None
        """The file of the graph the last step ran (the build's parity report records it)."""
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendMissingError("onnxruntime could not start its CUDA execution provider (CUDA / cuDNN "
                                      "libraries not found?): the session fell back to the CPU")
        self.input_names = self.manifest["inputs"]
        self.output_names = self.manifest["outputs"]
        self.cache_names = [n for n in self.input_names if n not in STEP_INPUTS]
        try:
            bound = json.loads(self.session.get_modelmeta().custom_metadata_map.get(IN_PLACE, "[]"))
        except ValueError:
            raise LoadError(f"{artifact_dir}: the step model's effexport.in_place metadata is not JSON; "
                            "rebuild the artifact") from None
        self.in_place = [e.kind == "buffer" or name in bound for e, name in zip(self.entries, self.cache_names)]
        """Per cache: bound as its own present (a full buffer, a GroupQueryAttention windowed cache)."""
        self.capacity = buffer_capacity(self.entries)

    def _providers(self, ort, device: str) -> list:
        """ONNX Runtime's execution providers for ``device``, most preferred first."""
        if device != "cuda":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendMissingError("CUDA requested but onnxruntime has no CUDAExecutionProvider: "
                                      "pip install onnxruntime-gpu")
        if hasattr(ort, "preload_dlls"):  # CUDA / cuDNN from the nvidia wheels torch brings
            ort.preload_dlls()
        return [("CUDAExecutionProvider", dict(CUDA_OPTIONS)), "CPUExecutionProvider"]

    def initial_caches(self, batch: int) -> list:
        """The plan's prefill caches: numpy arrays, or (I/O binding) host OrtValues that ORT copies
        to the device once, and ``buffer`` caches as torch tensors on the device (bound in place);
        bf16 caches, which numpy cannot hold, need I/O binding."""
        if not self.io_binding:
            return numpy_caches(self.entries, batch)
        caches = [e.empty(batch) for e in self.entries]
        return [c.to(self.device) if in_place  # a device tensor, bound by pointer (in place)
                else self.ort.OrtValue.ortvalue_from_numpy_with_onnx_type(c.view(torch.int16).numpy(), BFLOAT16)
                if c.dtype == torch.bfloat16 else self.ort.OrtValue.ortvalue_from_numpy(c.numpy())
                for in_place, c in zip(self.in_place, caches)]

    def _device_value(self, array: np.ndarray):
        if not self.io_binding:
            return array
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _check_room(self, pos: int, new: int) -> None:
        """Refuse positions past the fixed-size caches' rows (and past RoPE tables of that length)."""
        if self.capacity is not None and pos + new > self.capacity:
            raise LoadError(f"positions {pos}..{pos + new - 1} do not fit the artifact's {self.capacity}-row "
                            "cache buffers; rebuild with a larger --max-context")

    def step(self, input_ids: np.ndarray, pos: int, caches: list[np.ndarray]) -> StepResult:
        """One step: ``input_ids [B, T]`` at positions ``pos..pos+T-1`` over ``caches``. A chunk
        (``T > 1``) on a non-empty cache at ``B > 1`` runs row by row in a profile with GQA's quirk
        (``Profile.gqa_rows``; the module docstring says why); more than the manifest's
        ``max_step_tokens`` new tokens run in pieces (:func:`~effexport.exporter.backends.artifact.in_pieces`)."""
        if pieces_needed(self.manifest, input_ids):
            return in_pieces(self.step, self.manifest["max_step_tokens"], input_ids, pos, caches)
        batch, new = np.shape(input_ids)
        self._check_room(pos, new)
        profile = recorded(self.manifest.get("profile"))
        if not (profile is not None and profile.gqa_rows and batch > 1 and new > 1 and pos > 0):
            return self._run(input_ids, pos, caches)
        axes = [e.shape.index("batch") for e in self.entries]
        # a prompt chunk: rare enough for a round trip to the host (device tensors stay torch)
        caches = [c if isinstance(c, torch.Tensor) else _host(c) for c in caches]
        rows = [self._run(input_ids[i:i + 1], pos, [c.narrow(a, i, 1).contiguous() if isinstance(c, torch.Tensor)
                                                    else np.take(c, [i], axis=a) for c, a in zip(caches, axes)])
                for i in range(batch)]
        return StepResult(np.concatenate([r.logits for r in rows], axis=0),
                          [torch.cat(parts, dim=a) if isinstance(parts[0], torch.Tensor)
                           else self._device_value(np.concatenate([_host(p) for p in parts], axis=a))
                           for parts, a in zip(zip(*(r.caches for r in rows)), axes)])

    def session_for(self, new: int):
        """The session a step of ``new`` tokens per row runs (recorded in :attr:`last_graph`)."""
        decode = new == 1 and self.decode_session is not None
        self.last_graph = self.graph_files[1 if decode else 0]
        return self.decode_session if decode else self.session

    def _run(self, input_ids: np.ndarray, pos: int, caches: list[np.ndarray]) -> StepResult:
        """One call of the step model (the decode graph for one new token, where there is one)."""
        session = self.session_for(np.shape(input_ids)[1])
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 **{name: np.array(pos, dtype=np.int64) for name in STEP_INPUTS[1:] if name in self.input_names}}
        if not self.io_binding:
            feeds.update({name: _host(c) for name, c in zip(self.cache_names, caches)})
            outs = session.run(self.output_names, feeds)
            return StepResult(outs[0], list(outs[1:]))
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        caches = [c if isinstance(c, (self.ort.OrtValue, torch.Tensor)) else self._device_value(c) for c in caches]
        for name, cache in zip(self.cache_names, caches):
            if isinstance(cache, torch.Tensor):
                _bind(binding.bind_input, name, cache)
            else:
                binding.bind_ortvalue_input(name, cache)
        logits = self._logits_buffer(*np.shape(input_ids))
        if logits is not None:
            _bind(binding.bind_output, self.output_names[0], logits)
        else:
            binding.bind_output(self.output_names[0], self.device)
        for name, cache in zip(self.output_names[1:], caches):
            if isinstance(cache, torch.Tensor):  # a buffer: present = past, GQA writes the new rows in place
                _bind(binding.bind_output, name, cache)
            else:
                binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        presents = [c if isinstance(c, torch.Tensor) else o for c, o in zip(caches, outs[1:])]
        return StepResult(outs[0].numpy() if logits is None else logits.float().cpu().numpy(), presents)

    def _logits_buffer(self, batch: int, new: int) -> torch.Tensor | None:
        """bf16 logits cannot come back as numpy: they are written into a torch tensor on the device
        (returned as float32 numpy). None for other dtypes."""
        meta = self.session.get_outputs()[0]
        if meta.type != "tensor(bfloat16)":
            return None
        if not isinstance(meta.shape[-1], int):
            raise LoadError(f"the step model's bf16 logits have no static vocabulary size ({meta.shape}); "
                            "rebuild the artifact with this effexport version")
        return torch.empty(batch, new, meta.shape[-1], dtype=torch.bfloat16, device=self.device)

    def generate(self, input_ids: np.ndarray, max_new_tokens: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Greedy generation: returns (generated tokens [B, max_new_tokens], logits of every step)."""
        batch, length = input_ids.shape
        result = self.step(input_ids, 0, self.initial_caches(batch))
        logits = [result.logits[:, -1]]
        tokens = []
        for i in range(max_new_tokens):
            nxt = logits[-1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(nxt)
            if i == max_new_tokens - 1:
                break
            result = self.step(nxt, length + i, result.caches)
            logits.append(result.logits[:, -1])
        return np.concatenate(tokens, axis=1), logits
