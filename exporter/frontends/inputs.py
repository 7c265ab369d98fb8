"""Untrusted input files, checked before anything reads them in full: model files, ``config.json``,
safetensors headers and indexes, artifact manifests.

A path must name a regular file after resolving symlinks (a device such as ``/dev/zero`` would be read
until memory runs out, a FIFO blocks forever), of bounded size; JSON is parsed with its nesting depth
caught; a config's sizes are checked against bounds before a model of that size is allocated; a
safetensors header must describe exactly the bytes that follow it. Every problem is one
:class:`~effexport.exporter.errors.LoadError` line (exit 2) naming the file, the field and the fix.
"""
from __future__ import annotations

import json
import os
import stat
import struct

from effexport.exporter.errors import LoadError

MAX_JSON_BYTES = 16 << 20          # config.json, index, manifest: real ones are kilobytes
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
                        "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                        "I64": 8, "U64": 8, "F64": 8}
# config.json sizes: (smallest, largest) accepted; far beyond every published model, far below a
# size whose allocation would exhaust a machine. Checked at the top level and in "text_config".
CONFIG_BOUNDS = {
    "num_hidden_layers": (1, 1024), "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 18),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "head_dim": (1, 4096),
    "vocab_size": (1, 1 << 22), "max_position_embeddings": (1, 1 << 24), "sliding_window": (1, 1 << 24),
    "num_local_experts": (1, 4096), "num_experts": (1, 4096), "n_routed_experts": (1, 4096),
    "moe_intermediate_size": (1, 1 << 18), "num_experts_per_tok": (1, 4096),
}


def regular_file(path: str, what: str = "file") -> str:
    """``path`` resolved; refuses a dangling or looping symlink, a directory, a device, a FIFO or a
    socket."""
    if os.path.islink(path) and not os.path.exists(path):
        raise LoadError(f"{path} is a symbolic link to nothing (dangling or looping); point it at the {what} "
                        "or copy the file in its place")
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise LoadError(f"{path}: cannot read the {what} ({exc.strerror or exc}); check the path") from None
    if stat.S_ISDIR(mode):
        raise LoadError(f"{path} is a directory, not a {what}; pass the file")
    if not stat.S_ISREG(mode):
        raise LoadError(f"{path} is not a regular file (a device, FIFO or socket); pass the {what} itself")
    return os.path.realpath(path)


def read_json(path: str, fix: str, limit: int = MAX_JSON_BYTES):
    """The JSON value in ``path`` (a regular file of at most ``limit`` bytes); ``fix`` ends the error."""
    regular_file(path, "JSON file")
    size = os.path.getsize(path)
    if size > limit:
        raise LoadError(f"{path} is {size:,} bytes, more than the {limit >> 20} MiB such a file can be; {fix}")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except RecursionError:
        raise LoadError(f"{path} is not valid JSON (nested too deeply); {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LoadError(f"{path} is not valid JSON ({exc}); {fix}") from None


def check_config(config: dict, path: str) -> None:
    """A transformers config's sizes within :data:`CONFIG_BOUNDS` (whole numbers, or lists of them: one
    per layer), heads dividing the hidden size (without an explicit ``head_dim``) and query heads a
    multiple of KV heads; ``architectures`` a list of names."""
    fix = "fix the field or save the config again with model.save_pretrained(DIR)"
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise LoadError(f"{path}: 'architectures' must be a list of class names; {fix}")
    sections = [("", config)]
    if isinstance(config.get("text_config"), dict):
        sections.append(("text_config.", config["text_config"]))
    for prefix, section in sections:
        for key, (low, high) in CONFIG_BOUNDS.items():
            value = section.get(key)
            if value is None:
                continue
            for item in value if isinstance(value, list) and value else [value]:  # or per layer (Gemma 3n)
                if type(item) is not int:
                    raise LoadError(f"{path}: {prefix}{key} is {_echo(value)}, not a whole number; {fix}")
                if not low <= item <= high:
                    raise LoadError(f"{path}: {prefix}{key} = {_echo(value)} is outside {low}..{high}; {fix}")
        heads, kv, hidden = (section.get(k) for k in ("num_attention_heads", "num_key_value_heads", "hidden_size"))
        if heads and kv and heads % kv:
            raise LoadError(f"{path}: {prefix}num_attention_heads = {heads} is not a multiple of "
                            f"num_key_value_heads = {kv}; {fix}")
        if heads and hidden and section.get("head_dim") is None and hidden % heads:
            raise LoadError(f"{path}: {prefix}hidden_size = {hidden} is not divisible by num_attention_heads = "
                            f"{heads} (and no head_dim is given); {fix}")


def _echo(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_safetensors(path: str) -> dict:
    """Validate a safetensors file without reading its tensors: a regular file, 8-byte header length,
    JSON object header, every tensor's dtype, shape and ``data_offsets`` consistent (byte length =
    elements x item size, ranges inside the data) and the file exactly as long as the header says.
    Returns the header."""
    regular_file(path, "safetensors file")
    size = os.path.getsize(path)

    def bad(why: str):
        return LoadError(f"{path} is truncated or corrupt ({why}); download or save it again")
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > MAX_SAFETENSORS_HEADER:
            raise bad(f"header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n))
        except RecursionError:
            raise bad("header JSON is nested too deeply") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        name = _echo(key)
        if not isinstance(info, dict):
            raise bad(f"tensor {name} is not described by an object")
        offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise bad(f"tensor {name} has no data_offsets [begin, end]")
        begin, stop = offsets
        if not 0 <= begin <= stop:
            raise bad(f"tensor {name} has data_offsets {offsets}")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise bad(f"tensor {name} has an unknown dtype {_echo(dtype)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"tensor {name} has a shape that is not a list of sizes")
        numel = 1
        for d in shape:
            numel *= d
        if numel * SAFETENSORS_ITEMSIZE[dtype] != stop - begin and dtype != "F4":
            raise bad(f"tensor {name}: {dtype} {shape} needs {numel * SAFETENSORS_ITEMSIZE[dtype]} bytes, "
                      f"data_offsets span {stop - begin}")
        end = max(end, stop)
    if 8 + n + end != size:
        raise bad(f"{size} bytes, the header describes {8 + n + end}")
    return header
