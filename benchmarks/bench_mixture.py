"""Benchmark of the mixture NCE loss (k components) and the DIM estimators (jsd, dv): the fused
losses against the plain PyTorch references (docs/losses.md, sections 3-4), time and peak extra
memory.

    python benchmarks/bench_mixture.py                  # CPU, N = B = 256, L = 49, D = 256, k = 4, fp32
    python benchmarks/bench_mixture.py --device cuda
    python benchmarks/bench_mixture.py --quick          # smoke run, tiny shape

Each (loss, variant, mode) case runs in its own subprocess. Modes: "fwd" (inputs require grad, so
the loss keeps what its backward needs) and "fwd+bwd" (forward, then backward of loss + lgt_reg).
Time and memory are measured as benchmarks/harness.py describes: the median of --repeats calls
after --warmup calls (perf_counter on CPU, CUDA events on CUDA); peak extra memory = the most
memory a call holds beyond what was live before it, forward and backward measured apart and the
inputs' gradients subtracted from the backward's peak (a training step holds those anyway), the
smaller over two calls (VmHWM against VmRSS on CPU, with glibc's mmap threshold at 64 KiB;
max_memory_allocated() on CUDA).
The fused mixture loss must not hold anything of size N*k x M: the "N*k x M" column gives that
size, and the summary checks that the fused peak stays below a tenth of it.

Writes JSON, a markdown table and a plot (with matplotlib) to
benchmarks/results/bench_mixture_<device>[_quick].json|md|png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from harness import (MIB, ROOT, Clock, backends_ran, environment, peak_extra, print_child_result,
                     run_child, timing_fields, use_mmap_for_large_allocations, versions_line,
                     write_results)

sys.path.insert(0, str(ROOT))   # measure this checkout, not an installed copy

LOSSES = ("mixture", "jsd", "dv")
VARIANTS = ("reference", "fused")
MODES = ("fwd", "fwd+bwd")
SHAPE = dict(n=256, b=256, l=49, d=256, k=4)
QUICK_SHAPE = dict(n=16, b=16, l=9, d=32, k=4)
TAG = "BENCH_MIXTURE_RESULT:"


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


def run_case(case: dict) -> dict:
    """Time and measure one case in this process (the child)."""
    device = case["device"]
    if device == "cpu":   # before the inputs exist: see harness.use_mmap_for_large_allocations
        use_mmap_for_large_allocations()
    src, trg = make_inputs(case["loss"], case["shape"], device)
    fn = loss_fn(case["loss"], case["variant"])
    with_backward = case["mode"] == "fwd+bwd"

    def prepare():
        src.grad = trg.grad = None

    def forward():
        return fn(src, trg)

    def backward(out):
        loss, reg = out
        (loss + reg).backward()

    def call():
        out = forward()
        if with_backward:
            backward(out)
        return out

    def grad_bytes():
        return sum(t.grad.nbytes for t in (src, trg) if t.grad is not None)

    rec = {}
    with backends_ran(rec):
        first, times = Clock(device).run(call, prepare, case["warmup"], case["repeats"])
        extra = peak_extra(device, forward, backward if with_backward else None, prepare, grad_bytes)
    return dict(timing_fields(first, times), peak_extra_bytes=max(0, extra), **rec)


def run_in_subprocess(case: dict) -> dict:
    payload, failure = run_child(Path(__file__), ["--child", json.dumps(case)], TAG)
    if failure is not None:
        return dict(case, status=failure[0], error=failure[1])
    return dict(case, status="ok", **payload)


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
             f"{versions_line(env)}; {env['threads']} threads", "",
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
        print_child_result(TAG, run_case(json.loads(args.child)))
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
    # git_dirty: only the kernels' sources count (edits to benchmarks or docs change no number)
    env = environment(args.device, [str(Path(__file__))] + list(sys.argv[1:] if argv is None else argv),
                      dirty_scope=("amdim_kernels", "csrc"))
    result = dict(env=env, shape=shape, warmup=warmup, repeats=repeats,
                  records=[{k: v for k, v in r.items() if k != "device"} for r in records],
                  summary=summarize(records, shape))
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"bench_mixture_{args.device}{'_quick' if args.quick else ''}.json")
    written = write_results(out, result, render_markdown(result), indent=2)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
