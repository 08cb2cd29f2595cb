"""What every benchmark script here shares: timing, peak memory, the environment record, child
processes, and the JSON / markdown / PNG writers.

Timing: the median of the calls after a warm-up; perf_counter on CPU, CUDA events recorded around
each call on CUDA (all read after one synchronize, so the host never waits between calls).

Peak extra memory of a call: the most memory it holds beyond what was live before it.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), against
  memory_allocated() before the call.
- CPU: the process's peak RSS. The kernel's peak counter is reset (writing "5" to
  /proc/self/clear_refs sets VmHWM to VmRSS) after the heap is trimmed, VmRSS is the baseline and
  VmHWM the peak. Only meaningful in a process that first called use_mmap_for_large_allocations()
  (see there), which is why the scripts measure CPU memory in a child process of its own.

Backends: `backends_ran` notes in a result record which backends the amdim_kernels losses timed
in it ran, so that a "fused" row that ran the reference says so.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:   # plot.py lives beside this file, also when imported from elsewhere
    sys.path.insert(0, str(HERE))
MIB = 2 ** 20


# ----------------------------------------------------------------------------- timing

class Clock:
    """Times one call: perf_counter on CPU; CUDA events (recorded around the call) on CUDA."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fn: Callable, prepare: Callable, warmup: int, repeats: int):
        """Returns (first-call seconds, list of per-call seconds after warm-up).

        `prepare` runs before every call, outside the timed region (e.g. to drop the last call's
        gradients). The first call is timed on its own: it holds one-time costs (compilation,
        building the C++ extension, autotuning) that the median must not see.
        """
        prepare()
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        first = time.perf_counter() - t0
        del out
        for _ in range(warmup):
            prepare()
            out = fn()
            del out
        times = []
        if self.cuda:
            events = []
            for _ in range(repeats):
                prepare()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                del out
                events.append((start, end))
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) / 1e3 for s, e in events]
        else:
            for _ in range(repeats):
                prepare()
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
                del out   # freeing the outputs (and the graph) is outside the timed region
        return first, times


def timing_fields(first: float, times: list) -> dict:
    """The timing fields of a result record."""
    return dict(median_s=statistics.median(times), min_s=min(times), times_s=times, first_call_s=first)


# ----------------------------------------------------------------------------- memory

def proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def use_mmap_for_large_allocations():
    """Every allocation >= 64 KiB becomes its own mapping, returned to the OS when freed.

    Done before the inputs exist: large chunks that glibc's default (adaptive) threshold put on the
    heap stay there after free, in arenas picked by lock contention, and inflate a later peak by a
    varying amount (seen: +3 to +48 MiB on a 61 MiB peak). An explicit threshold also stops glibc
    raising it, which is why timing runs in another process with the default.
    """
    m_mmap_threshold = -3   # mallopt parameter number
    if not ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 64 * 1024):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")


class PeakMeter:
    """Memory in use and its peak since the last reset: RSS on CPU, the caching allocator on CUDA."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.libc = None if self.cuda else ctypes.CDLL("libc.so.6")

    def reset(self) -> int:
        """Clears freed memory, resets the peak to the current use and returns that use."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")        # VmHWM := VmRSS
        return proc_status_bytes("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return proc_status_bytes("VmHWM")


def peak_extra(device: str, forward: Callable, backward: Optional[Callable], prepare: Callable,
               grad_bytes: Callable[[], int], calls: int = 2) -> int:
    """Peak bytes held beyond the memory in use before the call, not counting the gradients.

    Forward and backward are measured separately so the gradients are subtracted only from the
    backward's peak (a forward peak holds no gradients); the smaller over `calls` calls.
    backward(out) takes the forward's output; None measures the forward alone.
    """
    meter, extras = PeakMeter(device), []
    for _ in range(calls):
        prepare()
        base = meter.reset()
        out = forward()
        extra = meter.peak() - base
        if backward is not None:
            meter.reset()       # the peak restarts from what the forward left (saved tensors)
            backward(out)
            extra = max(extra, meter.peak() - base - grad_bytes())
        del out
        extras.append(extra)
    return min(extras)


def is_oom(exc: BaseException) -> bool:
    if torch.cuda.is_available() and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, (MemoryError, RuntimeError)) and (
        "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc))


@contextlib.contextmanager
def backends_ran(record: dict):
    """Sets record["backends"] to the sorted backends ("cpp", "triton", "reference") that the
    amdim_kernels losses called in the block ran (amdim_kernels.nce.record_dispatch); [] when the
    block called none (the reference variants call the reference functions themselves)."""
    from amdim_kernels.nce import record_dispatch
    with record_dispatch() as ran:
        yield
    record["backends"] = sorted({d.backend for d in ran})


# ----------------------------------------------------------------------------- child processes

def run_child(script: Path, args: list, tag: str, timeout: Optional[float] = None):
    """Runs `python script *args` from the repository root; returns (payload, None) where the
    child printed a line `tag + json`, else (None, (status, message)).

    status is "timeout", "OOM" (killed by signal 9: the kernel's OOM killer prints nothing) or
    "error"; the message holds the end of the child's output.
    """
    cmd = [sys.executable, str(Path(script).resolve()), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, ("timeout", f"no result within {timeout} s")
    if proc.returncode == 0:
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(tag):
                return json.loads(line[len(tag):]), None
    tail = (proc.stderr or proc.stdout).strip()[-2000:]
    return None, ("OOM" if proc.returncode == -9 else "error",
                  f"child exited with {proc.returncode}: {tail}")


def print_child_result(tag: str, payload) -> None:
    print(tag + json.dumps(payload), flush=True)


# ----------------------------------------------------------------------------- environment

def _cmd_out(*cmd) -> Optional[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit() -> Optional[str]:
    """AMDIM_COMMIT when set (the GPU machine gets a copy of the tree without .git), else HEAD."""
    return os.environ.get("AMDIM_COMMIT") or _cmd_out("git", "rev-parse", "HEAD")


def environment(device: str, argv: list, dirty_scope: tuple = ()) -> dict:
    """Where and what was measured: device, versions, commit, the command line, the time.

    git_dirty is None where there is no git repository; dirty_scope limits it (and
    git_dirty_paths) to those paths of the checkout.
    """
    cpu_model = None
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dirty = _cmd_out("git", "status", "--porcelain", "--", *dirty_scope)
    env = dict(device=device, cpu_model=cpu_model or platform.processor(), cpu_count=os.cpu_count(),
               cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
               torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
               python=platform.python_version(), platform=platform.platform(),
               git_commit=git_commit(),
               git_dirty=None if dirty is None else bool(dirty),
               git_dirty_paths=dirty.splitlines()[:50] if dirty else [],
               command=" ".join(shlex.quote(a) for a in [sys.executable] + [str(a) for a in argv]),
               # the kernel variants and options in force (AMDIM_KERNELS_CUDA_BWD=..., ...)
               kernel_settings={k: v for k, v in sorted(os.environ.items())
                                if k.startswith("AMDIM_KERNELS_")},
               utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["driver"] = _cmd_out("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    else:
        env["device_name"] = env["cpu_model"]
        env["driver"] = None
    return env


def versions_line(env: dict) -> str:
    """One line for a report header: versions, driver, commit."""
    dirty = " (dirty)" if env.get("git_dirty") else ""
    return (f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
            f"driver {env.get('driver')}; git {env.get('git_commit')}{dirty}; {env.get('utc')}")


# ----------------------------------------------------------------------------- writers

def write_atomic(path: Path, text: str) -> None:
    """Never leaves a half-written file behind (a run cut off mid-write keeps the last version)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: Path, result: dict, markdown: str, indent: int = 1, plot: bool = True) -> list:
    """Writes `out` (JSON), the markdown beside it (.md) and, when plot, the figure (.png).

    Returns the paths written. The figure needs matplotlib (the `bench` extra); without it the
    JSON and markdown are still written and a line says the plot was skipped.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=indent) + "\n")
    write_atomic(out.with_suffix(".md"), markdown)
    written = [out, out.with_suffix(".md")]
    if plot:
        import plot as plot_module   # benchmarks/plot.py
        try:
            png = plot_module.save_plot(result, out.with_suffix(".png"))
        except Exception as exc:   # the measurements are saved: a drawing bug must not lose them
            print(f"the plot failed ({type(exc).__name__}: {exc}); the results are in {out}; "
                  f"redraw them with benchmarks/plot.py", flush=True)
            png = None
        if png is not None:
            written.append(png)
    return written
