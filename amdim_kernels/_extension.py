"""Builds (on first use, cached) and loads the C++/CUDA extension that registers amdim_kernels ops.

The sources are compiled with torch.utils.cpp_extension.load (ninja) into torch's extension cache
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); later imports reuse the cached build
unless a source changed. The CUDA part (csrc/cuda) is built only where torch has CUDA and nvcc is
available.
"""
from __future__ import annotations

import functools
import glob
import os
import sys

import torch

_NAME = "amdim_kernels_ops"


def _source_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(candidate, "nce.cpp")):
            return candidate
    raise RuntimeError(f"amdim_kernels: C++ sources not found next to {here} (looked for csrc/nce.cpp)")


def cuda_buildable() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.version.cuda is not None and CUDA_HOME is not None


def _sources(with_cuda: bool) -> list[str]:
    root = _source_dir()
    sources = sorted(glob.glob(os.path.join(root, "*.cpp")))
    if with_cuda:
        cuda = os.path.join(root, "cuda")
        sources += sorted(glob.glob(os.path.join(cuda, "*.cpp")) + glob.glob(os.path.join(cuda, "*.cu")))
    return sources


@functools.lru_cache(maxsize=None)
def load() -> None:
    """Compile if needed and load the ops into torch.ops.amdim_kernels (idempotent)."""
    from torch.utils.cpp_extension import _get_build_directory, load as load_extension

    with_cuda = cuda_buildable()
    sources = _sources(with_cuda)
    build_dir = _get_build_directory(_NAME, verbose=False)
    built = glob.glob(os.path.join(build_dir, f"{_NAME}*.so"))
    newest_source = max(os.path.getmtime(s) for s in sources)
    if not built or min(os.path.getmtime(b) for b in built) < newest_source:
        print(f"amdim_kernels: compiling the {'C++/CUDA' if with_cuda else 'C++'} extension "
              f"(first use; cached in {build_dir}) ...", file=sys.stderr, flush=True)
    # -fno-trapping-math lets GCC if-convert (and so vectorise) the branchy exp/tanh loops
    cflags = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-DNDEBUG"]
    try:
        load_extension(
            name=_NAME,
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            extra_cuda_cflags=["-O3", "-DNDEBUG", "--use_fast_math", "-lineinfo"],
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:  # surface the compiler's message, not just "ninja failed"
        raise RuntimeError(f"amdim_kernels: building the C++ extension from {_source_dir()} "
                           f"failed:\n{err}") from err
