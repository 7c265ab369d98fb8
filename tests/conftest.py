"""Test configuration: the one skip mechanism (markers ``gpu``, ``tensorrt``, ``slow``), each with a reason."""
import importlib.util
import os

import pytest
import torch


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group markers
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    skip_trt = pytest.mark.skip(reason="TensorRT is not installed (pip install effexport[tensorrt])")
    run_slow = os.environ.get("EFFEXPORT_SLOW", "1") != "0"
    skip_slow = pytest.mark.skip(reason="slow test disabled by EFFEXPORT_SLOW=0")
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_xdist_group(item)))
    for item in items:  # markers, not keywords: a parameter id such as "tensorrt" is a keyword too
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if item.get_closest_marker("tensorrt") and not has_trt:
            item.add_marker(skip_trt)
        if item.get_closest_marker("slow") and not run_slow:
            item.add_marker(skip_slow)


def _xdist_group(item) -> str:
    """The unit ``pytest -n`` (``--dist loadgroup``, set in pyproject.toml) hands to one worker: a test
    module, so its module-scoped fixtures (exports, builds) are computed once; a module that names
    parameters in ``XDIST_SPLIT`` is split per value of them (e.g. one unit per tiny preset), so its
    exports spread over the workers."""
    group = item.module.__name__
    params = getattr(getattr(item, "callspec", None), "params", {})
    for key in getattr(item.module, "XDIST_SPLIT", ()):
        if key in params:
            group += f":{params[key]}"
    return group


class Rewritten:
    """A tiny sample captured once per test session: eager model, captured step, rewritten step."""

    def __init__(self, name: str):
        from effexport.exporter.capture import capture_step
        from effexport.passes.pipeline import run_pipeline
        from effexport.samples import get_sample

        self.name = name
        self.sample = get_sample(name)
        self.model = self.sample.build()
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, self.sample.config.vocab_size, (2, 40), generator=gen)
        self.captured = capture_step(self.model, self.ids)  # 37 prompt + 3 new tokens
        self.program, self.analysis = run_pipeline(self.captured)


_REWRITTEN: dict = {}


@pytest.fixture(scope="session")
def rewritten():
    """``rewritten(name)`` -> :class:`Rewritten`, shared by every test module (captures are slow)."""
    def get(name: str) -> Rewritten:
        if name not in _REWRITTEN:
            _REWRITTEN[name] = Rewritten(name)
        return _REWRITTEN[name]
    return get


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole session: tiny models run faster without threading overhead,
    and CI's two cores stay free for ONNX Runtime and export work. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
