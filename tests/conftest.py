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


@pytest.fixture
def threads():
    """At least two intra-op threads, whatever the machine and OMP_NUM_THREADS: the CPU kernels
    split the score columns over threads and merge per-thread statistics (csrc/nce.cpp), a merge
    that one thread never exercises. Shapes with M = B*L > 256 (two column blocks) split."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield torch.get_num_threads()
    torch.set_num_threads(before)
