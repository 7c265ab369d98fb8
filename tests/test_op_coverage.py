"""Every op file is registered, listed, documented, and importing the package stays light."""
import importlib
import pkgutil
import subprocess
import sys

import torch

import effexport.custom_ops as custom_ops

EXPECTED = {
    "attention", "attention_cache", "attention_ring", "attention_read", "attention_buffer", "cca", "kv_compress",
    "kv_compress_step", "indexer_topk", "sparse_attention", "sparse_attention_ring", "sinkhorn",
    "mhc_pre", "mhc_post", "mhc_head",
}


def test_all_ops_listed_once():
    names = [op.name().split("::")[1].split(".")[0] for op in custom_ops.ALL_OPS]
    assert sorted(names) == sorted(EXPECTED)
    assert all(isinstance(op, torch._ops.OpOverload) for op in custom_ops.ALL_OPS)
    assert all(op.namespace == "effexport" for op in custom_ops.ALL_OPS)


def test_every_op_file_is_imported_by_the_package():
    files = {m.name for m in pkgutil.iter_modules(custom_ops.__path__) if not m.name.startswith("_")}
    assert files == {m.__name__.rsplit(".", 1)[1] for m in custom_ops.MODULES}


def test_every_op_is_documented():
    for module in custom_ops.MODULES:
        assert module.__doc__ and len(module.__doc__) > 200, module.__name__
        for op in module.OPS:
            op_def = getattr(module, op.name().split("::")[1].split(".")[0])  # a CustomOpDef
            doc = getattr(op_def, "_init_fn", op_def).__doc__
            assert doc and "[" in doc, f"{op} docstring lacks shapes"


def test_import_pulls_in_no_backend():
    code = ("import sys, effexport.custom_ops; "
            "bad = [m for m in ('triton', 'onnxruntime', 'tensorrt', 'onnx') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_second_import_does_not_reregister():
    for module in custom_ops.MODULES:
        assert importlib.import_module(module.__name__) is module
    assert len(custom_ops.ALL_OPS) == len(EXPECTED)
