"""Builds (once per distinct build, cached) and loads the C++/CUDA extension that registers the
amdim_kernels ops.

Two ways to get the compiled ops:
- ahead of time: ``AMDIM_KERNELS_BUILD_OPS=1 pip install --no-build-isolation .`` compiles csrc/
  with portable flags into the package (``amdim_kernels/_ops*.so`` beside ``_ops_build.json``,
  which records the torch it was built against). It is used whenever it matches the running torch;
- on first use (the default): torch.utils.cpp_extension.load compiles csrc/ with ninja for the
  host CPU (-march=native) into torch's extension cache (TORCH_EXTENSIONS_DIR, default
  ~/.cache/torch_extensions/<python>_<cpu|cuXYZ>).

The CUDA gradient kernel (csrc/cuda) is a build of its own, made only when it is used (`cuda_bwd_status`,
`load_cuda_bwd`): only where torch has CUDA and a working nvcc of torch's CUDA major version is
found, never for CPU calls, and a failed build leaves the Triton backward in its place
(amdim_kernels/ops.py) instead of failing the fused losses.

A first-use build is named after a hash of everything that determines the binary (the bytes of
csrc/, the flags, torch, the CPU for -march=native), so every copy of the package with the same
sources (a checkout, an installed copy, a second checkout) reuses one build, and a changed source
gets a new one instead of silently recompiling over another copy's build.

The build runs under an flock of our own, which the OS releases when the holder dies: a process
killed mid-build cannot leave the next one waiting forever on torch's lock file, and a process
waiting for a live builder says who it is waiting for and gives up after a bounded time.

This module imports nothing from the package (setup.py loads it on its own for the ahead-of-time
build).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import importlib.machinery
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass

import torch

BASE_NAME = "amdim_kernels_ops"
AOT_MODULE = "_ops"                   # amdim_kernels/_ops<EXT_SUFFIX>, the ahead-of-time build
AOT_METADATA = "_ops_build.json"      # beside it: what it was built with
BUILD_ENV = "AMDIM_KERNELS_BUILD_OPS"  # =1: build the ops at install time (see setup.py)
TIMEOUT_ENV = "AMDIM_KERNELS_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0            # a CUDA build on a loaded machine takes minutes, not half an hour
_SOURCE_SUFFIXES = (".cpp", ".cc", ".h", ".hpp", ".cu", ".cuh")
_DONE = "build-ok.json"               # written after a build succeeded: the .so alone may be half-linked
_LOCK = "amdim-build.lock"            # our flock; torch's FileBaton uses "lock" in the same directory

# -fno-trapping-math lets GCC if-convert (and so vectorise) the branchy exp/tanh loops
_CFLAGS = ["-O3", "-fno-trapping-math", "-fopenmp", "-DNDEBUG"]
_LDFLAGS = ["-fopenmp"]  # at::parallel_for is serial without OpenMP in both compile and link
_CUDA_CFLAGS = ["-O3", "-DNDEBUG", "--use_fast_math", "-lineinfo"]


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message says what to install or change."""


_NO_COMPILER_HINT = ('backend="reference" (plain PyTorch, the same results) works without a '
                     "compiler, as does an ahead-of-time build (AMDIM_KERNELS_BUILD_OPS=1 pip install "
                     "--no-build-isolation . on a machine with one).")


def package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def source_dir() -> str:
    """csrc/: inside the installed package, or beside the package in a checkout."""
    here = package_dir()
    for candidate in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(candidate, "nce.cpp")):
            return candidate
    raise BuildError(f"amdim_kernels: C++ sources not found next to {here} (looked for csrc/nce.cpp)")


CUDA_BASE_NAME = "amdim_kernels_cuda"   # the first-use build of csrc/cuda (the CUDA nce_bwd)
# csrc/cuda/nce_cuda.cpp accumulates 16-bit products into an fp32 addmm output (out_dtype),
# which torch supports from 2.10 (pytorch#167931); the file static_asserts it.
MIN_TORCH_FOR_CUDA = (2, 10)
_NVCC_RELEASE = re.compile(r"release (\d+)\.(\d+)")


def _torch_version() -> tuple[int, int]:
    return tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])


@functools.lru_cache(maxsize=None)
def probe_nvcc() -> tuple[str | None, str | None]:
    """(nvcc, None) where the CUDA kernels can be compiled for this torch, else (None, why not).

    torch's CUDA_HOME is set whenever /usr/local/cuda exists, nvcc or not (a runtime-only CUDA
    image), so the nvcc that torch.utils.cpp_extension will run (CUDA_HOME/bin/nvcc) is run, and
    its release must have torch's CUDA major version (torch refuses to build otherwise)."""
    if torch.version.cuda is None:
        return None, "this torch has no CUDA"
    if _torch_version() < MIN_TORCH_FOR_CUDA:
        return None, (f"the CUDA kernel needs torch >= {'.'.join(map(str, MIN_TORCH_FOR_CUDA))}, "
                      f"this is {torch.__version__}")
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return None, "no CUDA toolkit (CUDA_HOME unset and no nvcc on PATH)"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        return None, f"no nvcc in CUDA_HOME={CUDA_HOME} (a CUDA runtime without the toolkit?)"
    try:
        proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{nvcc} --version failed: {err}"
    found = _NVCC_RELEASE.search(proc.stdout)
    if proc.returncode != 0 or found is None:
        return None, f"{nvcc} --version failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
    release = f"{found.group(1)}.{found.group(2)}"
    if found.group(1) != torch.version.cuda.split(".")[0]:
        return None, f"{nvcc} is CUDA {release}, this torch was built with CUDA {torch.version.cuda}"
    return nvcc, None


def _cuda_toolkit_usable() -> bool:
    return probe_nvcc()[0] is not None


def cuda_sources(root: str) -> list[str]:
    """The CUDA gradient kernel's files: csrc/cuda/*.cpp, *.cu (the headers come with them)."""
    cuda = os.path.join(root, "cuda")
    return sorted(glob.glob(os.path.join(cuda, "*.cpp")) + glob.glob(os.path.join(cuda, "*.cu")))


def source_files(root: str, with_cuda: bool) -> list[str]:
    """The files to compile: csrc/*.cpp, and csrc/cuda/*.cpp, *.cu with CUDA."""
    sources = sorted(glob.glob(os.path.join(root, "*.cpp")))
    return sources + cuda_sources(root) if with_cuda else sources


def sources_digest(root: str) -> str:
    """sha256 of every source and header under root (relative paths and bytes, not mtimes or
    locations: two copies with the same content have the same digest)."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            if not filename.endswith(_SOURCE_SUFFIXES):
                continue
            path = os.path.join(dirpath, filename)
            digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
            digest.update(b"\0")
    return digest.hexdigest()


def torch_abi() -> dict:
    """What a compiled extension depends on besides its sources: a build for another torch, CUDA
    or C++ ABI must not be loaded."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
            "python": sys.implementation.cache_tag, "machine": platform.machine()}


def _host_cpu() -> str:
    """Identifies the instruction set -march=native compiles for (a cache on a shared file system
    may be used by nodes with different CPUs)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "model name", "flags", "Features", "CPU part") and key not in fields:
            fields[key] = value.strip()
    return json.dumps(fields, sort_keys=True)


@dataclass(frozen=True)
class BuildSpec:
    """One distinct build: the name is the base name and a hash of everything that determines the
    binary, so equal specs share one build directory and different ones never overwrite each other."""
    name: str
    sources: tuple
    cflags: tuple
    ldflags: tuple
    cuda_cflags: tuple
    with_cuda: bool


def make_spec(base: str, sources: list[str], digest: str, *, cflags: list[str], ldflags: list[str],
              cuda_cflags: list[str], with_cuda: bool, identity: dict | None = None) -> BuildSpec:
    key = {"sources": digest, "cflags": cflags, "ldflags": ldflags, "with_cuda": with_cuda,
           "abi": torch_abi(), "cxx": os.environ.get("CXX", "c++")}
    if with_cuda:
        key.update(cuda_cflags=cuda_cflags, arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"))
        if key["arch_list"] is None and torch.cuda.is_available():
            # without TORCH_CUDA_ARCH_LIST torch compiles for the GPUs it sees: a cache shared by
            # nodes with other GPUs must not hand them a build without their architecture
            key["gpus"] = sorted({torch.cuda.get_device_capability(i)
                                  for i in range(torch.cuda.device_count())})
    key.update(identity or {})
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return BuildSpec(f"{base}_{tag}", tuple(sources), tuple(cflags), tuple(ldflags),
                     tuple(cuda_cflags), with_cuda)


def jit_spec(root: str | None = None, with_cuda: bool = False) -> BuildSpec:
    """The first-use build of csrc/ at root: tuned for this CPU (-march=native). CPU only: the
    CUDA kernel is built apart, when it is used (cuda_jit_spec)."""
    root = source_dir() if root is None else root
    return make_spec(BASE_NAME, source_files(root, with_cuda), sources_digest(root),
                     cflags=_CFLAGS[:1] + ["-march=native"] + _CFLAGS[1:], ldflags=_LDFLAGS,
                     cuda_cflags=_CUDA_CFLAGS, with_cuda=with_cuda, identity={"cpu": _host_cpu()})


def cuda_jit_spec(root: str | None = None) -> BuildSpec:
    """The first-use build of the CUDA gradient kernel (csrc/cuda) alone."""
    root = source_dir() if root is None else root
    return make_spec(CUDA_BASE_NAME, cuda_sources(root), sources_digest(root),
                     cflags=["-O3", "-DNDEBUG"], ldflags=[], cuda_cflags=_CUDA_CFLAGS, with_cuda=True)


def _cuda_arch_flags() -> list[str]:
    """The -gencode flags torch compiles CUDA code with (TORCH_CUDA_ARCH_LIST, else the visible
    GPUs, else every architecture of the CUDA version)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    return list(_get_cuda_arch_flags())


def arch_flags_cover(flags: list[str], capability: tuple[int, int]) -> bool:
    """Whether a binary built with these -gencode flags runs on a GPU of this compute capability:
    machine code sm_XY runs on X.Z for Z >= Y (sm_XYa only on X.Y), PTX compute_XY is compiled
    by the driver for any capability >= X.Y."""
    major, minor = capability
    for flag in flags:
        for kind, arch in re.findall(r"(sm|compute)_(\d+a?)", flag.rpartition("code=")[2]):
            x, y, specific = int(arch.rstrip("a")[:-1]), int(arch.rstrip("a")[-1]), arch.endswith("a")
            if kind == "compute" and (major, minor) >= (x, y) and not specific:
                return True
            if kind == "sm" and major == x and (minor == y if specific else minor >= y):
                return True
    return False


def aot_build_options(root: str) -> dict:
    """What setup.py compiles ahead of time: portable flags (no -march=native: the binary runs on
    other machines), CUDA only where torch has CUDA and a CUDA toolkit is present."""
    with_cuda = _cuda_toolkit_usable()
    return {"sources": source_files(root, with_cuda), "with_cuda": with_cuda,
            # -g0: Python's own CFLAGS, which setuptools passes first, carry -g (a 5x larger .so)
            "cflags": list(_CFLAGS) + ["-g0"], "ldflags": list(_LDFLAGS), "cuda_cflags": list(_CUDA_CFLAGS),
            "metadata": {**torch_abi(), "with_cuda": with_cuda, "sources": sources_digest(root),
                         # which GPUs the CUDA kernel runs on: a build without this GPU's
                         # architecture is not used for it (cuda_bwd_status)
                         "cuda_arch_flags": _cuda_arch_flags() if with_cuda else []}}


def _library_path(build_dir: str, spec: BuildSpec) -> str:
    return os.path.join(build_dir, f"{spec.name}.so")


def is_built(build_dir: str, spec: BuildSpec) -> bool:
    """A finished build of spec is in build_dir (the marker is written only after a build succeeded)."""
    return (os.path.isfile(os.path.join(build_dir, _DONE))
            and os.path.isfile(_library_path(build_dir, spec)))


# ---- toolchain -----------------------------------------------------------------------------------
def _ninja_dirs() -> list[str]:
    """Where a pip-installed ninja lives when its environment is not activated (bin/ of the running
    interpreter's environment, or the ninja package's own binary directory)."""
    dirs = [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    try:
        import ninja
        dirs.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    return [d for d in dirs if d]


def find_ninja() -> tuple[str, str | None]:
    """Return (the ninja torch will run, the directory to put on PATH for it or None), or raise
    saying how to get one. torch runs plain "ninja": a ninja installed in a virtual environment
    that is not activated is not on PATH, so the environment's own is looked for too."""
    found = shutil.which("ninja")
    if found:
        return found, None
    for directory in _ninja_dirs():
        candidate = shutil.which("ninja", path=directory)
        if candidate:
            return candidate, directory
    raise BuildError(
        "amdim_kernels: compiling the C++ extension needs ninja, which is not on PATH nor in "
        f"this Python's environment ({sys.executable}). Install it with `pip install ninja` "
        "(or `apt-get install ninja-build`, `conda install ninja`); if it is installed in a virtual "
        f"environment, activate that environment. {_NO_COMPILER_HINT}")


@contextlib.contextmanager
def _path_with(directory: str | None):
    """PATH with directory in front, for the duration of the build only."""
    if directory is None:
        yield
        return
    saved = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([directory] + ([saved] if saved else []))
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = saved


def check_compiler() -> str:
    """Return the C++ compiler torch will run ($CXX, else c++), or raise naming what is missing."""
    cxx = os.environ.get("CXX", "c++")
    words = shlex.split(cxx) or ["c++"]
    found = shutil.which(words[0])
    if found:
        return found
    origin = f"CXX={cxx!r} is set but {words[0]!r} was not found" if "CXX" in os.environ else \
        "no C++ compiler (c++) is on PATH"
    raise BuildError(
        f"amdim_kernels: compiling the C++ extension needs a C++ compiler: {origin}. Install one "
        "(Debian/Ubuntu: `apt-get install g++`, or `build-essential`; Fedora/RHEL: `dnf install "
        "gcc-c++`; conda: `conda install -c conda-forge cxx-compiler`) or point CXX at it. "
        + _NO_COMPILER_HINT)


# ---- build lock ----------------------------------------------------------------------------------
def _describe_holder(lock_path: str) -> str:
    try:
        with open(lock_path) as f:
            owner = json.load(f)
        return (f"process {owner['pid']} on {owner['host']} (building since "
                f"{time.strftime('%H:%M:%S', time.localtime(owner['since']))})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def build_lock(build_dir: str, timeout_s: float | None = None, poll_s: float = 0.25):
    """Hold the build lock of build_dir: an flock, so it dies with its holder. While another live
    process holds it, say who, and give up after timeout_s (AMDIM_KERNELS_BUILD_TIMEOUT, default
    30 min) with an error naming the holder and the lock file."""
    if timeout_s is None:
        try:
            timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        except ValueError:
            raise BuildError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: expected a number of "
                             "seconds") from None
    os.makedirs(build_dir, exist_ok=True)
    lock_path = os.path.join(build_dir, _LOCK)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        next_note = start
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            now = time.monotonic()
            if now - start >= timeout_s:
                raise BuildError(
                    f"amdim_kernels: gave up after {timeout_s:.0f} s waiting for "
                    f"{_describe_holder(lock_path)} to finish building the extension in {build_dir}. "
                    f"If that process is stuck, stop it (the lock is released when it exits: lock "
                    f"file {lock_path}); set {TIMEOUT_ENV} to wait longer.")
            if now >= next_note:
                print(f"amdim_kernels: waiting for {_describe_holder(lock_path)}, which is building "
                      f"the extension in {build_dir} (giving up after {timeout_s:.0f} s)",
                      file=sys.stderr, flush=True)
                next_note = now + 60.0
            time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.time()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays (removing it would race with waiters)


def _remove_stale_torch_lock(build_dir: str) -> None:
    """torch's FileBaton ("lock") waits forever for a file its creator removes. Every builder of this
    directory holds our flock while torch's lock exists; so with the flock held, a lock file left
    there belongs to a process that died mid-build."""
    stale = os.path.join(build_dir, "lock")
    if os.path.exists(stale):
        print(f"amdim_kernels: removing {stale}, left by a build that was interrupted",
              file=sys.stderr, flush=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)


# ---- build and load ------------------------------------------------------------------------------
def build_and_load(spec: BuildSpec, root: str | None = None, what: str = "C++ extension") -> str:
    """Load spec's build from root (default: torch's extension cache), compiling it first if no
    finished build is there. Returns the path of the loaded library."""
    if root is None:
        from torch.utils.cpp_extension import _get_build_directory
        try:
            build_dir = _get_build_directory(spec.name, verbose=False)  # honours TORCH_EXTENSIONS_DIR
        except OSError as err:
            raise _unusable_extensions_dir(err) from err
    else:
        build_dir = os.path.join(root, spec.name)
    library = _library_path(build_dir, spec)
    if not is_built(build_dir, spec):
        check_compiler()
        _, ninja_dir = find_ninja()
        try:
            with build_lock(build_dir), _path_with(ninja_dir):
                if not is_built(build_dir, spec):  # not finished meanwhile by the process we waited for
                    _remove_stale_torch_lock(build_dir)
                    print(f"amdim_kernels: compiling the {what} (once for these sources and flags; "
                          f"cached in {build_dir}) ...", file=sys.stderr, flush=True)
                    _compile(spec, build_dir)
                    with open(os.path.join(build_dir, _DONE), "w") as f:
                        json.dump({"name": spec.name, **torch_abi()}, f)
        except OSError as err:   # _compile raises BuildError: what is left is the directory's
            if root is not None:
                raise
            raise _unusable_extensions_dir(err) from err
    torch.ops.load_library(library)
    return library


def _unusable_extensions_dir(err: OSError) -> BuildError:
    """The extension cache cannot hold a build (not a directory, read-only, ...): say which
    setting points there and what works instead, rather than a bare OSError."""
    value = os.environ.get("TORCH_EXTENSIONS_DIR")
    if value is None:
        from torch.utils.cpp_extension import get_default_build_root
        where = (f"torch's extension cache {get_default_build_root()} (the default, used while "
                 f"TORCH_EXTENSIONS_DIR is unset)")
    else:
        where = f"TORCH_EXTENSIONS_DIR={value!r}"
    return BuildError(
        f"amdim_kernels: cannot build the C++ extension in {where}: {err.strerror or err} "
        f"({err.filename or value}). It must be a writable directory: set TORCH_EXTENSIONS_DIR to "
        f"one (for example a directory under /tmp or on a local disk); a read-only cache works once "
        f"it holds a finished build. Or install an ahead-of-time build (AMDIM_KERNELS_BUILD_OPS=1 "
        f"pip install --no-build-isolation .); backend=\"reference\" needs no build at all.")


def _compile(spec: BuildSpec, build_dir: str) -> None:
    from torch.utils.cpp_extension import load as load_extension
    try:
        # is_python_module=False: torch only dlopens the result; the ops register themselves
        load_extension(name=spec.name, sources=list(spec.sources), extra_cflags=list(spec.cflags),
                       extra_ldflags=list(spec.ldflags), extra_cuda_cflags=list(spec.cuda_cflags),
                       with_cuda=spec.with_cuda, build_directory=build_dir, is_python_module=False,
                       verbose=False)
    except Exception as err:  # surface the compiler's message, not just "ninja failed"
        raise BuildError(f"amdim_kernels: building the extension in {build_dir} failed:\n{err}\n"
                         + _NO_COMPILER_HINT) from err


@functools.lru_cache(maxsize=None)
def shipped_build() -> tuple[str, dict, str | None] | None:
    """The ahead-of-time build inside the package: (library, its metadata, why it cannot be used
    here or None), or None if there is none."""
    here = package_dir()
    meta_path = os.path.join(here, AOT_METADATA)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        library = os.path.join(here, AOT_MODULE + suffix)
        if os.path.isfile(library) and os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            return library, meta, _shipped_mismatch(meta)
    return None


def _shipped_mismatch(meta: dict) -> str | None:
    """Why the ahead-of-time build cannot be used here, or None if it can."""
    running = torch_abi()
    for key, what in (("torch", "torch"), ("cuda", "CUDA"), ("cxx11_abi", "C++ ABI (_GLIBCXX_USE_CXX11_ABI)"),
                      ("python", "Python"), ("machine", "CPU architecture")):
        if meta.get(key) != running[key]:
            return f"was built for {what} {meta.get(key)}, and this is {running[key]}"
    try:
        if meta.get("sources") != sources_digest(source_dir()):
            return "was built from other sources than the csrc/ beside it"
    except BuildError:
        pass  # no sources to compare with (or to build from): the shipped build is all there is
    return None   # without CUDA kernels it still serves the CPU: the CUDA kernel is built apart


@functools.lru_cache(maxsize=None)
def load() -> str:
    """Load the ops into torch.ops.amdim_kernels, compiling them first if needed (idempotent).
    Returns the path of the library loaded."""
    shipped = shipped_build()
    if shipped is not None:
        library, _, why = shipped
        if why is None:
            torch.ops.load_library(library)
            return library
        print(f"amdim_kernels: not using the prebuilt extension {library}: it {why}; "
              "using the first-use build instead", file=sys.stderr, flush=True)
    return build_and_load(jit_spec(), what="C++ extension")


def _shipped_cuda_flags() -> list[str] | None:
    """The -gencode flags of the loaded ahead-of-time build if it holds the CUDA kernel, else
    None; [] for a build older than that record."""
    shipped = shipped_build()
    if shipped is None or shipped[2] is not None or not shipped[1].get("with_cuda"):
        return None
    return list(shipped[1].get("cuda_arch_flags", []))


def cuda_bwd_status(capabilities: list[tuple[int, int]]) -> tuple[str | None, str | None]:
    """Where the CUDA gradient kernel (op amdim_kernels::nce_bwd_cuda) comes from for GPUs of
    these compute capabilities: ("shipped", None) the loaded ahead-of-time build holds it for
    them, ("build", None) it can be compiled on first use (load_cuda_bwd), or (None, why not)."""
    flags = _shipped_cuda_flags()
    if flags is not None:
        missing = [c for c in capabilities if flags and not arch_flags_cover(flags, c)]
        if missing:
            return None, (f"the prebuilt extension was compiled for {' '.join(flags)}, which does "
                          f"not run on compute capability {'.'.join(map(str, missing[0]))}; rebuild "
                          f"it with TORCH_CUDA_ARCH_LIST naming this GPU")
        return "shipped", None   # an older build without the record: used as before
    nvcc, why = probe_nvcc()
    return ("build", None) if nvcc else (None, why)


@functools.lru_cache(maxsize=None)
def load_cuda_bwd() -> str:
    """Compile (once, cached) and load the CUDA gradient kernel; raises BuildError."""
    return build_and_load(cuda_jit_spec(), what="CUDA gradient kernel (csrc/cuda)")
