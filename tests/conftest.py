import os

import torch

# Triton kernels are decorated at import time: the interpreter must be chosen before that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker itself: item.keywords also holds the names of the parent directories, so a
        # checkout in a directory named "gpu" would skip every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
