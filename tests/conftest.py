"""Test configuration: the one skip mechanism (markers ``gpu``, ``tensorrt``, ``slow``), each with a reason."""
import importlib.util
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    skip_trt = pytest.mark.skip(reason="TensorRT is not installed (pip install effexport[tensorrt])")
    run_slow = os.environ.get("EFFEXPORT_SLOW", "1") != "0"
    skip_slow = pytest.mark.skip(reason="slow test disabled by EFFEXPORT_SLOW=0")
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
