"""Whether and how the CUDA C++ backward (csrc/cuda) is built or used, decided without a GPU: the
nvcc probe (fake toolkits in tmp_path), the CPU build that never depends on it, and which GPU
architectures an ahead-of-time build holds."""
from __future__ import annotations

import os
import stat

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

from amdim_kernels import _extension as ext


@pytest.fixture
def cuda_torch(monkeypatch, tmp_path):
    """A torch that says it was built with CUDA 13.0, and CUDA_HOME at an empty tmp_path/cuda;
    returns a function writing a fake nvcc there (its output and exit status)."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    ext.probe_nvcc.cache_clear()
    yield lambda text, status=0: _fake_nvcc(home / "bin" / "nvcc", text, status)
    ext.probe_nvcc.cache_clear()


def _fake_nvcc(path, text, status):
    path.write_text(f"#!/bin/sh\necho '{text}'\nexit {status}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


NVCC_13 = "Cuda compilation tools, release 13.0, V13.0.48"


def test_no_cuda_in_torch_means_no_cuda_kernel():
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    ext.probe_nvcc.cache_clear()
    assert ext.probe_nvcc() == (None, "this torch has no CUDA")


def test_cuda_home_without_nvcc_is_not_a_toolkit(cuda_torch):
    """torch sets CUDA_HOME=/usr/local/cuda whenever the directory exists (runtime-only images)."""
    nvcc, why = ext.probe_nvcc()
    assert nvcc is None and "no nvcc in CUDA_HOME" in why


def test_a_matching_nvcc_is_found(cuda_torch):
    path = cuda_torch(NVCC_13)
    assert ext.probe_nvcc() == (path, None)


@pytest.mark.parametrize("text,status,words", [
    ("Cuda compilation tools, release 12.4, V12.4.131", 0, "is CUDA 12.4, this torch was built with CUDA 13.0"),
    ("nvcc: error while loading shared libraries", 1, "--version failed"),
    ("no release number here", 0, "--version failed"),
])
def test_an_nvcc_that_cannot_build_for_this_torch_is_refused(cuda_torch, text, status, words):
    cuda_torch(text, status)
    nvcc, why = ext.probe_nvcc()
    assert nvcc is None and words in why, why


def test_torch_older_than_the_cuda_kernel_needs_is_refused(cuda_torch, monkeypatch):
    cuda_torch(NVCC_13)
    monkeypatch.setattr(ext, "_torch_version", lambda: (2, 9))
    nvcc, why = ext.probe_nvcc()
    assert nvcc is None and "needs torch >= 2.10" in why


def test_the_cpu_build_never_compiles_the_cuda_kernel(cuda_torch):
    """With a CUDA torch and a working toolkit the first-use build of the CPU ops is still CPU-only:
    a broken CUDA build cannot break CPU calls; the CUDA kernel is a build of its own."""
    cuda_torch(NVCC_13)
    assert ext.probe_nvcc()[0] is not None
    spec = ext.jit_spec()
    assert not spec.with_cuda and not any(s.endswith(".cu") or "/cuda/" in s for s in spec.sources)
    cuda = ext.cuda_jit_spec()
    assert cuda.with_cuda and cuda.sources and all("/cuda/" in s.replace(os.sep, "/") for s in cuda.sources)
    assert cuda.name.startswith(ext.CUDA_BASE_NAME + "_") and cuda.name != spec.name


SM80 = ["-gencode=arch=compute_80,code=sm_80"]


@pytest.mark.parametrize("flags,capability,covered", [
    (SM80, (8, 0), True), (SM80, (8, 6), True), (SM80, (9, 0), False), (SM80, (7, 5), False),
    (SM80 + ["-gencode=arch=compute_80,code=compute_80"], (9, 0), True),   # PTX, compiled by the driver
    (["-gencode=arch=compute_90a,code=sm_90a"], (9, 0), True),
    (["-gencode=arch=compute_90a,code=sm_90a"], (10, 0), False),
    (["-gencode=arch=compute_90,code=sm_90"], (10, 0), False),
    (["-gencode=arch=compute_100,code=sm_100"], (10, 0), True),
    (["-gencode=arch=compute_90,code=compute_90"], (8, 6), False),
])
def test_arch_flags_cover(flags, capability, covered):
    assert ext.arch_flags_cover(flags, capability) is covered


def test_a_shipped_build_without_this_gpus_architecture_is_not_used(monkeypatch):
    monkeypatch.setattr(ext, "_shipped_cuda_flags", lambda: SM80)
    source, why = ext.cuda_bwd_status([(9, 0)])
    assert source is None and "compute capability 9.0" in why and "TORCH_CUDA_ARCH_LIST" in why
    assert ext.cuda_bwd_status([(8, 0), (8, 6)]) == ("shipped", None)
    monkeypatch.setattr(ext, "_shipped_cuda_flags", lambda: [])   # built before the record: used
    assert ext.cuda_bwd_status([(9, 0)]) == ("shipped", None)


def test_without_a_shipped_cuda_kernel_the_probe_decides(monkeypatch, cuda_torch):
    monkeypatch.setattr(ext, "_shipped_cuda_flags", lambda: None)
    assert ext.cuda_bwd_status([(9, 0)])[0] is None
    ext.probe_nvcc.cache_clear()
    cuda_torch(NVCC_13)
    assert ext.cuda_bwd_status([(9, 0)]) == ("build", None)


def test_the_ahead_of_time_build_records_its_architectures(monkeypatch, cuda_torch):
    cuda_torch(NVCC_13)
    flags = SM80 + ["-gencode=arch=compute_90,code=sm_90"]
    monkeypatch.setattr(ext, "_cuda_arch_flags", lambda: flags)
    options = ext.aot_build_options(ext.source_dir())
    assert options["with_cuda"] and options["metadata"]["cuda_arch_flags"] == flags
    assert any(s.endswith(".cu") for s in options["sources"])
