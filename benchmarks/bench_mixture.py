"""Benchmark of the mixture NCE loss (k components) and the DIM estimators (jsd, dv): the fused
losses against the spec references, time and peak extra memory.

    python benchmarks/bench_mixture.py                  # CPU, N = B = 256, L = 49, D = 256, k = 4, fp32
    python benchmarks/bench_mixture.py --device cuda
    python benchmarks/bench_mixture.py --quick          # smoke run, tiny shape

Each (loss, variant, mode) case runs in its own subprocess. Modes: "fwd" (inputs require grad, so
the loss keeps what its backward needs) and "fwd+bwd" (forward, then backward of loss + lgt_reg).
Time: median of --repeats calls after --warmup calls (perf_counter on CPU; CUDA events on CUDA).
Peak extra memory: the most memory one call holds beyond what was live before it, minus the
gradients of the inputs (a training step holds those anyway).
- CPU: glibc's mmap threshold is set to 64 KiB before the inputs exist (every large buffer is its
  own mapping, returned to the OS when freed); after the timed calls the heap is trimmed, the
  kernel's peak-RSS counter reset (/proc/self/clear_refs), and extra = VmHWM - VmRSS before.
- CUDA: extra = max_memory_allocated() - memory_allocated() before, after reset_peak_memory_stats().
The fused mixture loss must not hold anything of size N*k x M: the "N*k x M" column gives that
size, and the summary checks that the fused peak stays below a tenth of it.

Writes JSON and a markdown table to benchmarks/results/bench_mixture_<device>[_quick].json|md.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # measure this checkout, not an installed copy

LOSSES = ("mixture", "jsd", "dv")
VARIANTS = ("reference", "fused")
MODES = ("fwd", "fwd+bwd")
SHAPE = dict(n=256, b=256, l=49, d=256, k=4)
QUICK_SHAPE = dict(n=16, b=16, l=9, d=32, k=4)
TAG = "BENCH_MIXTURE_RESULT:"
MIB = 2 ** 20


def loss_fn(loss: str, variant: str):
    import amdim_kernels as ak
    if loss == "mixture":
        fn = ak.fused_mixture_nce_loss if variant == "fused" else ak.mixture_nce_loss_reference
        return lambda src, trg: fn(src, trg)
    fn = ak.fused_nce_loss if variant == "fused" else ak.nce_loss_reference
    return lambda src, trg: fn(src, trg, estimator=loss)


def make_inputs(loss: str, shape: dict, device: str):
    g = torch.Generator().manual_seed(0)
    src_shape = (shape["n"], shape["k"], shape["d"]) if loss == "mixture" else (shape["n"], shape["d"])
    src = torch.randn(src_shape, generator=g).to(device).requires_grad_()
    trg = torch.randn(shape["b"], shape["l"], shape["d"], generator=g).to(device).requires_grad_()
    return src, trg


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_case(case: dict) -> dict:
    """Time and measure one case in this process (the child)."""
    device, cuda = case["device"], case["device"] == "cuda"
    if not cuda:
        m_mmap_threshold = -3
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 64 * 1024)
    src, trg = make_inputs(case["loss"], case["shape"], device)
    fn = loss_fn(case["loss"], case["variant"])
    backward = case["mode"] == "fwd+bwd"

    def call():
        src.grad = trg.grad = None
        loss, reg = fn(src, trg)
        if backward:
            (loss + reg).backward()
        return loss, reg

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    call()
    sync()
    first = time.perf_counter() - t0
    for _ in range(case["warmup"]):
        call()
    times = []
    for _ in range(case["repeats"]):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)

    src.grad = trg.grad = None
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")    # VmHWM := VmRSS
        base = _status_bytes("VmRSS")
    out = call()
    sync()
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    del out
    grad_bytes = sum(x.numel() * x.element_size() for x in (src, trg)) if backward else 0
    return dict(median_s=statistics.median(times), first_call_s=first,
                peak_extra_bytes=max(0, peak - base - grad_bytes))


def run_in_subprocess(case: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
    if proc.returncode != 0 or not lines:
        return dict(case, status="error", error=(proc.stderr or proc.stdout)[-2000:])
    return dict(case, status="ok", **json.loads(lines[-1][len(TAG):]))


def environment(device: str) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(device=device, torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
               threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
               python=platform.python_version(), platform=platform.platform(),
               # the GPU machine gets the tree without .git: gpu_check.sh passes AMDIM_COMMIT
               git_commit=os.environ.get("AMDIM_COMMIT") or git("rev-parse", "HEAD"), git_dirty=bool(git("status", "--porcelain",
                                                                      "amdim_kernels", "csrc")),
               command=" ".join([sys.executable] + sys.argv),
               utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
    else:
        with open("/proc/cpuinfo") as f:
            env["device_name"] = next((ln.split(":", 1)[1].strip() for ln in f
                                       if ln.startswith("model name")), platform.processor())
    return env


def summarize(records: list, shape: dict) -> list:
    def get(loss, variant, mode):
        return next((r for r in records if (r["loss"], r["variant"], r["mode"]) == (loss, variant, mode)
                     and r["status"] == "ok"), None)
    m = shape["b"] * shape["l"]
    rows = []
    for loss in LOSSES:
        n_rows = shape["n"] * (shape["k"] if loss == "mixture" else 1)
        for mode in MODES:
            ref, fused = get(loss, "reference", mode), get(loss, "fused", mode)
            if not (ref and fused):
                continue
            score_bytes = n_rows * m * 4
            rows.append(dict(loss=loss, mode=mode, score_matrix_bytes=score_bytes,
                             speedup=ref["median_s"] / fused["median_s"],
                             mem_fused_over_reference=fused["peak_extra_bytes"] / max(ref["peak_extra_bytes"], 1),
                             fused_below_tenth_of_score_matrix=fused["peak_extra_bytes"] < score_bytes / 10))
    return rows


def render_markdown(result: dict) -> str:
    env, shape = result["env"], result["shape"]
    lines = [f"# bench_mixture: {env['device_name']} ({env['device']})", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['threads']} threads, "
             f"commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}, {env['utc']}", "",
             f"N = B = {shape['n']}, L = {shape['l']}, D = {shape['d']}, k = {shape['k']} (mixture), fp32; "
             f"median of {result['repeats']} calls after {result['warmup']} warm-up calls. "
             "Peak extra = memory held beyond the inputs and their gradients.", "",
             "| loss | mode | variant | median ms | peak extra MiB | score matrix (N*k x M fp32) MiB |",
             "|---|---|---|---:|---:|---:|"]
    for r in result["records"]:
        n_rows = shape["n"] * (shape["k"] if r["loss"] == "mixture" else 1)
        size = n_rows * shape["b"] * shape["l"] * 4 / MIB
        if r["status"] != "ok":
            lines.append(f"| {r['loss']} | {r['mode']} | {r['variant']} | error | error | {size:.1f} |")
            continue
        lines.append(f"| {r['loss']} | {r['mode']} | {r['variant']} | {r['median_s'] * 1e3:.2f} | "
                     f"{r['peak_extra_bytes'] / MIB:.1f} | {size:.1f} |")
    lines += ["", "| loss | mode | speedup (reference / fused) | peak extra fused / reference | "
              "fused peak < score matrix / 10 |", "|---|---|---:|---:|---|"]
    for s in result["summary"]:
        lines.append(f"| {s['loss']} | {s['mode']} | {s['speedup']:.2f} | "
                     f"{s['mem_fused_over_reference']:.3f} | {s['fused_below_tenth_of_score_matrix']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 warm-up and 2 timed calls")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--out", type=Path, help="JSON path (the markdown goes beside it)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(TAG + json.dumps(run_case(json.loads(args.child))), flush=True)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    shape = QUICK_SHAPE if args.quick else SHAPE
    warmup, repeats = (1, 2) if args.quick else (args.warmup, args.repeats)
    cases = [dict(device=args.device, loss=loss, variant=variant, mode=mode, shape=shape,
                  warmup=warmup, repeats=repeats)
             for loss in args.losses for mode in MODES for variant in VARIANTS]
    records = []
    for i, case in enumerate(cases, 1):
        rec = run_in_subprocess(case)
        records.append(rec)
        detail = (f"{rec['median_s'] * 1e3:9.2f} ms  peak extra {rec['peak_extra_bytes'] / MIB:8.1f} MiB"
                  if rec["status"] == "ok" else "ERROR " + rec["error"].splitlines()[-1])
        print(f"[{i}/{len(cases)}] {case['loss']:7s} {case['mode']:7s} {case['variant']:9s} {detail}",
              flush=True)
    result = dict(env=environment(args.device), shape=shape, warmup=warmup, repeats=repeats,
                  records=[{k: v for k, v in r.items() if k != "device"} for r in records],
                  summary=summarize(records, shape))
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"bench_mixture_{args.device}{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
