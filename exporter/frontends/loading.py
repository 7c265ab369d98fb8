"""Load the model a build exports: ``load_model(spec) -> LoadedModel``.

``spec`` is one of:

* a built-in sample name (``gemma4-e2b:tiny``; ``effexport list``): deterministic random weights
  (seed 0), or with ``weights="none"`` the model on the meta device (structure-only export, any size);
* a Hugging Face model directory (``config.json`` + ``*.safetensors``): validated here (config and its
  sizes, architecture, every safetensors header and its length; regular files of bounded size only,
  :mod:`effexport.exporter.frontends.inputs`) before :func:`effexport.exporter.frontends.hf.load_hf_directory` builds it
  and checks the weights against the model;
* a ``torch.save`` file (``.pt``/``.pth``/``.bin``). Unpickling can run code from the file, so it is
  read weights-only unless ``trust_pickle``: a file holding only tensors (a state dict) has no
  architecture and is refused with what to pass instead; a pickled module needs ``trust_pickle``.
  With it, a transformers model goes to :func:`effexport.exporter.frontends.hf.wrap_hf_module`, any other module
  must follow the samples' step contract ``forward(input_ids, past=None) -> (logits, present dict)``
  (probed with one short forward);
* a ``torch.export`` archive (``.pt2``): recognised and refused with the reason (an ExportedProgram
  fixes one call signature, so the prefill and cached decode calls a build needs cannot both be run
  from it) and what to pass instead.

Every problem is a :class:`~effexport.exporter.errors.LoadError` / ``UsageError`` (exit 2) or
``BackendMissingError`` (exit 4) with one line naming it and the fix. :func:`resolve_model` does all
checks that need no loading (existence, format, headers, the pickle question), so a build fails
before any progress output; :meth:`ModelSpec.load` does the loading.
"""
from __future__ import annotations

import importlib.util
import os
import zipfile
from dataclasses import dataclass

import torch

from effexport.exporter.errors import BackendMissingError, LoadError, UsageError
from effexport.exporter.frontends.inputs import check_config, check_safetensors, read_json, regular_file
from effexport.exporter.frontends.model import LoadedModel
from effexport.samples._spec import capture_length, capture_new_tokens

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
WEIGHTS = ("random", "none")
# random-weight samples above this many parameters are refused (fp32 weights would not fit a laptop)
MAX_RANDOM_PARAMS = 200_000_000
_SAFE_OPEN = "weights-only loading refused it"


@dataclass
class ModelSpec:
    """A checked ``spec``: what it is and how to load it (no weights read yet)."""

    spec: str
    kind: str                 # "sample" | "hf" | "pickle"
    name: str
    weights: str = "random"
    sample: object | None = None
    trust_pickle: bool = False
    allow_missing_weights: bool = False  # a Hugging Face directory may lack weights (random ones there)
    context_limit: int | None = None  # the model's trained context (sample config / config.json), if stated

    def load(self) -> LoadedModel:
        """Build or read the model (the slow part)."""
        if self.kind == "sample":
            return _load_sample(self.sample, self.weights)
        if self.kind == "hf":
            return _hf().load_hf_directory(self.spec, allow_missing_weights=self.allow_missing_weights)
        return _load_pickle(self.spec, self.name)


def load_model(spec: str, *, trust_pickle: bool = False, weights: str = "random") -> LoadedModel:
    """Resolve and load ``spec`` (see the module docstring)."""
    return resolve_model(spec, trust_pickle=trust_pickle, weights=weights).load()


def resolve_source(source: dict, *, trust_pickle: bool = False) -> ModelSpec:
    """The model an artifact was built from (its ``effexport.json["source"]``), resolved again for
    ``effexport check`` (``.load()`` it)."""
    kind = source.get("kind")
    if kind == "sample":
        if source.get("weights") == "none":
            raise LoadError("this artifact is structure-only (built with --weights none): it has no weights, "
                            "so there is no parity to check; build with weights to check it")
        return resolve_model(str(source.get("name")))
    if kind in ("pickle", "pickle+hf"):
        if not trust_pickle:
            raise LoadError(f"this artifact was built from the pickled module {source.get('path')}: re-loading "
                            "it runs code from that file; pass --trust-pickle if you trust its source")
        return resolve_model(str(source.get("path")), trust_pickle=True)
    if kind == "hf" and source.get("path"):
        return resolve_model(str(source["path"]), allow_missing_weights=bool(source.get("missing_weights")))
    raise LoadError(f"this artifact was built from an in-memory {source.get('class', 'module')} with no model "
                    "directory to reload; check parity from Python with the model: effexport.check(DIR, model)")


def default_name(spec: str) -> str:
    """A short name for ``spec``: the sample name, or the file / directory name without suffix."""
    if os.path.sep in spec or os.path.exists(spec) or spec.endswith(PICKLE_SUFFIXES + (".pt2",)):
        base = os.path.basename(os.path.normpath(spec))
        return os.path.splitext(base)[0] or base
    return spec


def resolve_model(spec: str, *, trust_pickle: bool = False, weights: str = "random",
                  allow_missing_weights: bool = False) -> ModelSpec:
    """Every check that needs no weights: raises the one-line error of a bad ``spec``."""
    if weights not in WEIGHTS:
        raise UsageError(f"unknown --weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if os.path.lexists(spec):
        if weights == "none":
            raise UsageError(f"--weights none builds a built-in sample's structure only; {spec!r} is a model "
                             "file with its own weights: drop --weights none")
        name = default_name(spec)
        if os.path.isdir(spec):
            config = _check_hf_directory(spec)
            return ModelSpec(spec, "hf", name, allow_missing_weights=allow_missing_weights,
                             context_limit=hf_context_limit(config))
        regular_file(spec, "model file")
        return _resolve_file(spec, name, trust_pickle)
    if os.path.sep in spec or spec.endswith(PICKLE_SUFFIXES + (".pt2", ".safetensors", ".onnx")):
        hint = (" (models are not downloaded: fetch it, e.g. with 'huggingface-cli download', and pass the "
                "directory)" if spec.count("/") == 1 and not spec.startswith((".", "/")) else "")
        raise LoadError(f"{spec!r}: no such file or directory{hint}; pass an existing model file or directory, "
                        "or a built-in sample name (see 'effexport list')")
    return _resolve_sample(spec, weights)


# -- built-in samples --------------------------------------------------------------------------------

def _resolve_sample(name: str, weights: str) -> ModelSpec:
    from effexport.samples import UnknownModelError, get_sample

    try:
        sample = get_sample(name)
    except UnknownModelError as exc:
        raise UsageError(f"{exc}; or pass a model file or directory") from None
    if name in getattr(sample.module, "REPORT_ONLY", ()):
        raise UsageError(f"{name} is a report-only preset (no model); try 'effexport report {name}'")
    if weights == "random":
        params = sample.build("meta").param_counts()["total"]
        if params > MAX_RANDOM_PARAMS:
            raise UsageError(f"{name} has {params / 1e9:.1f} B parameters: building it with random weights "
                             f"needs {params * 4 / 2**30:.0f} GiB; pass --weights none for a structure-only "
                             f"export, export '{name}:tiny', or use 'effexport report {name}' for its costs")
    from effexport.exporter.verify.report import max_context

    return ModelSpec(name, "sample", name, weights, sample, context_limit=max_context(sample))


def _load_sample(sample, weights: str) -> LoadedModel:
    model = sample.build("meta" if weights == "none" else "cpu")
    source = {"kind": "sample", "name": sample.name, "weights": weights}
    if weights == "random":
        source["seed"] = 0
    from effexport.exporter.verify.report import max_context

    specs = sample.config.layer_specs()
    new_tokens = capture_new_tokens(specs)
    return LoadedModel(sample.name, model, sample.config.vocab_size, sample, source,
                       capture_length(specs, new_tokens=new_tokens), max_context(sample), new_tokens)


# -- torch.save / torch.export files -------------------------------------------------------------------

def _resolve_file(path: str, name: str, trust_pickle: bool) -> ModelSpec:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".pt2":
        _check_zip(path, "torch.export archive (torch.export.save)")
        raise LoadError(f"{path} is a torch.export archive: an ExportedProgram fixes one call signature, so "
                        "effexport cannot run both the prefill (past=None) and the cached decode step it "
                        "captures; pass the model itself: torch.save(model) with --trust-pickle, a Hugging "
                        "Face directory, or effexport.export(model) from Python")
    if suffix == ".safetensors":
        check_safetensors(path)
        raise LoadError(f"{path} holds weights only (safetensors has no architecture); pass the Hugging Face "
                        "directory that holds it with its config.json")
    if suffix == ".onnx":
        raise LoadError(f"{path} is already an ONNX model; effexport exports PyTorch models: pass the "
                        "PyTorch model (sample name, Hugging Face directory or torch.save file)")
    if suffix not in PICKLE_SUFFIXES:
        raise LoadError(f"{path}: unknown model file type {suffix or '(no suffix)'!r}; pass a torch.save file "
                        f"({', '.join(PICKLE_SUFFIXES)}), a Hugging Face directory or a built-in sample name")
    _check_torch_save(path)
    if not trust_pickle:
        _refuse_without_trust(path)
    return ModelSpec(path, "pickle", name, trust_pickle=True)


def _check_zip(path: str, what: str) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise LoadError(f"{path} is not a readable {what}: truncated or corrupt ({exc}); "
                        "write it again") from None


def _check_torch_save(path: str) -> None:
    """A torch.save file is a zip archive (torch >= 1.6) or a legacy pickle stream."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # legacy (non-zip) format: a pickle protocol header
        return
    _check_zip(path, "torch.save file")


def _refuse_without_trust(path: str) -> None:
    """Read ``path`` weights-only (memory-mapped where possible: no tensor data is read) and refuse it
    with the right fix: a state dict needs an architecture, a pickled module needs --trust-pickle."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL" in text:
            raise LoadError(f"{path} is a pickled object (not only tensors): loading it runs code from the "
                            "file; pass --trust-pickle if you trust its source") from None
        first = (text.splitlines() or [type(exc).__name__])[0][:120]
        raise LoadError(f"{path} is not a readable torch.save file: truncated or corrupt ({first}); "
                        "save it again with torch.save") from None
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoadError(f"{path} is a state dict ({len(obj)} tensors) with no architecture: save the module "
                        "itself (torch.save(model)) and pass --trust-pickle, or save a Hugging Face directory "
                        "(model.save_pretrained(DIR)) and pass DIR")
    raise LoadError(f"{path} holds a {type(obj).__name__}, not a model: save the module itself "
                    "(torch.save(model)) and pass --trust-pickle")


def _load_pickle(path: str, name: str) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling raises anything the file's code raises
        first = (str(exc).splitlines() or [""])[0][:160]
        raise LoadError(f"{path} could not be unpickled ({type(exc).__name__}: {first}); import the module "
                        "that defines the model's classes, or save a Hugging Face directory instead") from None
    source = {"kind": "pickle", "path": path, "bytes": os.path.getsize(path), "trust_pickle": True}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoadError(f"{path} is a state dict ({len(obj)} tensors) with no architecture: save the module "
                        "itself (torch.save(model)), or save a Hugging Face directory and pass it")
    if not isinstance(obj, torch.nn.Module):
        raise LoadError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module: save the module itself "
                        "(torch.save(model))")
    if is_transformers_module(obj):
        loaded = _hf().wrap_hf_module(obj)
        loaded.source = {**loaded.source, **source, "kind": "pickle+hf"}
        return loaded
    return wrap_module(obj.eval(), name, source)


def is_transformers_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a transformers model (some class of it is defined in ``transformers``):
    such a model goes through ``exporter.hf``, any other through :func:`wrap_module`."""
    return any(c.__module__.split(".")[0] == "transformers" for c in type(module).__mro__)


def wrap_module(module: torch.nn.Module, name: str, source: dict | None = None) -> LoadedModel:
    """A module that already follows the samples' step contract, checked with one short forward
    (batch 1, 4 tokens of id 0)."""
    what = f"{name} ({type(module).__name__})"
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 4, dtype=torch.long))
    except Exception as exc:  # noqa: BLE001 - a user module raises anything
        first = (str(exc).splitlines() or [""])[0][:120]
        raise LoadError(f"{what} does not follow the step contract forward(input_ids, past=None) -> (logits, "
                        f"present dict): calling it failed ({type(exc).__name__}: {first}); wrap it so it "
                        "does (see samples/__init__.py)") from None
    ok = (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor) and out[0].dim() == 3
          and isinstance(out[1], dict) and all(isinstance(v, torch.Tensor) for v in out[1].values()))
    if not ok:
        raise LoadError(f"{what} returns {type(out).__name__}, not (logits [B, T, V], present dict of tensors): "
                        "wrap it so forward(input_ids, past=None) follows the step contract "
                        "(see samples/__init__.py)")
    return LoadedModel(name, module, int(out[0].shape[-1]), None,
                       source or {"kind": "module", "class": f"{type(module).__module__}.{type(module).__qualname__}"})


# -- Hugging Face directories ----------------------------------------------------------------------------

def _hf():
    """The Hugging Face loader (exporter/frontends/hf.py), imported lazily; it needs transformers."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise BackendMissingError("loading a Hugging Face model needs transformers: pip install "
                                  "'effexport[hf]'") from None
    from effexport.exporter.frontends import hf

    return hf


def hf_context_limit(config: dict) -> int | None:
    """``max_position_embeddings`` of a ``config.json`` (its text config's for a multimodal one)."""
    for cfg in (config, config.get("text_config") or {}):
        value = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_hf_directory(path: str) -> dict:
    """config.json naming a causal LM transformers has (not one known not to export), and complete
    safetensors weights; returns the config."""
    files = set(os.listdir(path))
    if "effexport.json" in files:
        raise LoadError(f"{path} is an effexport artifact, not a model to export; re-check it with "
                        f"'effexport check {path}'")
    if "config.json" not in files:
        what = "has weights but no config.json" if any(f.endswith(".safetensors") for f in files) else \
            "is not a model directory (no config.json)"
        raise LoadError(f"{path} {what}; pass a Hugging Face model directory (written by "
                        "model.save_pretrained(DIR)), a torch.save file or a built-in sample name")
    config_path = os.path.join(path, "config.json")
    config = read_json(config_path, "write it again with model.save_pretrained(DIR)")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise LoadError(f"{config_path} has no 'model_type'; write it with model.save_pretrained(DIR)")
    check_config(config, config_path)
    _check_optional_dependencies(config, config_path)
    from effexport.exporter.frontends.hf import check_model_type  # importing hf needs no transformers

    check_model_type(path, config)
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    index = "model.safetensors.index.json"
    if index in files:
        shards = _indexed_shards(path, index, files)
    if not shards:
        bins = sorted(f for f in files if f.endswith(".bin"))
        extra = (f" ({bins[0]} is a pickle: convert it with model.save_pretrained(DIR, safe_serialization=True))"
                 if bins else "")
        raise LoadError(f"{path} has no *.safetensors weights{extra}; save the model with "
                        "model.save_pretrained(DIR)")
    for shard in shards:
        check_safetensors(os.path.join(path, shard))
    return config


def _indexed_shards(path: str, index: str, files: set) -> list[str]:
    fix = "save the model again with model.save_pretrained(DIR)"
    data = read_json(os.path.join(path, index), fix)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise LoadError(f"{os.path.join(path, index)} is not a valid safetensors index (no 'weight_map' of "
                        f"tensor -> file names); {fix}")
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if os.path.basename(s) != s or s in ("", ".", "..")]
    if outside:
        raise LoadError(f"{os.path.join(path, index)} names the shard {outside[0][:80]!r} outside the model "
                        f"directory; {fix}")
    missing = [s for s in shards if s not in files]
    if missing:
        raise LoadError(f"{path}: weight shard {missing[0]} named in {index} is missing ({len(missing)} of "
                        f"{len(shards)}); copy the whole model directory")
    return shards


# quantization_config["quant_method"] -> (module it needs, pip package)
QUANTIZATION_MODULES = {"bitsandbytes": ("bitsandbytes", "bitsandbytes"), "gptq": ("gptqmodel", "gptqmodel"),
                        "awq": ("awq", "autoawq"), "hqq": ("hqq", "hqq"), "quanto": ("optimum.quanto", "optimum-quanto")}


def _check_optional_dependencies(config: dict, config_path: str) -> None:
    """A quantized checkpoint needs its quantization library (exit 4 with the install hint when it is
    missing). Attention implementations are not a dependency: exporter/frontends/hf.py switches flash / flex
    attention to sdpa."""
    quant = config.get("quantization_config")
    if quant is None:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if not isinstance(method, str):
        raise LoadError(f"{config_path}: quantization_config has no 'quant_method'; save the config again with "
                        "model.save_pretrained(DIR)")
    module, package = QUANTIZATION_MODULES.get(method, (None, None))
    if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
        raise BackendMissingError(f"{config_path} is a {method}-quantized checkpoint, which needs {package}: "
                                  f"pip install {package} (or export the unquantized model)")
