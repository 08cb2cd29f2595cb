"""Benchmark of the AMDIM NCE loss: eager reference, torch.compile of it, the fused op, and the
three matrix products that no exact method can avoid, measured in the same run.

    python benchmarks/bench_nce.py                                   # CPU, default shapes
    python benchmarks/bench_nce.py --device cuda                     # S1, S2 in bf16
    python benchmarks/bench_nce.py --device cuda --sweep --variants fused products --modes fwd+bwd
    python benchmarks/bench_nce.py --quick                           # smoke run, tiny shape
    python benchmarks/bench_nce.py --cpu-targets                     # the CPU targets, floor interleaved

Shapes are N x B x L x D (src N x D, trg B x L x D, M = B*L score columns). Each loss variant is
timed in two modes: "fwd" (the training forward: inputs require grad, so the variant saves what its
backward needs) and "fwd+bwd" (forward, then backward of loss + lgt_reg). Times are the median of
--repeats calls after --warmup calls; "first call" is the call before the warm-up, which holds
torch.compile's compile time (and the C++ extension's build on its first use ever). CPU calls are
timed with perf_counter, CUDA calls with CUDA events around each call.

--interleave (CPU; implied by --cpu-targets) times the fused loss (fwd, fwd+bwd, and "eval": the
forward under torch.no_grad, which is what a forward alone costs once the CPU training forward forms
the gradient, docs/design.md) and the three products round-robin in one process per case: each round calls each once, so a ratio to the floor
is taken within a round (machine speed drifts between rounds on a shared machine) and its median
over the rounds is reported, with its spread (min-max) as the measure of noise. --cpu-targets runs
the CPU acceptance cases (fp32): N = B = 256 and 1024 (L = 49, D = 256, nce, tclip 20), and DIM's
dot-product local loss (N = 16384 source locations = B * L, B = 256, L = 64, D = 256, jsd, tclip
None, reg_weight 0); with N = B * L, source row i's positives are the L locations of image i // L.

"products" times torch.mm into preallocated outputs, in the inputs' dtype, on random data:
src @ trg^T (N x D @ D x M), g @ trg (N x M @ M x D) and g^T @ src (M x N @ N x D). The first is
the floor of a forward, their sum the floor of forward + backward.

Peak extra memory = the most memory the call holds beyond what was live before it, minus the
gradients of src and trg (a training step must hold those anyway); the inputs are excluded too.
- CPU: every (variant, shape, dtype, mode) is timed in one fresh subprocess (glibc malloc as
  usual) and its memory measured in another. The memory child first sets glibc's mmap threshold to
  64 KiB, so every tensor buffer is its own mapping, counted in RSS once written and returned to
  the OS when freed (freed heap chunks would otherwise stay resident and inflate the peak by a
  varying amount). After warm-up (which pays one-time costs: compile, thread pools, BLAS buffers)
  it trims the heap, resets the kernel's peak-RSS counter (writes "5" to /proc/self/clear_refs),
  reads VmRSS as the baseline, runs the forward and reads VmHWM; resets the counter, runs the
  backward and reads VmHWM again: extra = max(forward peak - baseline, backward peak - baseline
  - gradient bytes), the smaller over two such calls.
- CUDA: the same with torch.cuda.reset_peak_memory_stats(), memory_allocated() as the baseline
  (it holds the inputs) and max_memory_allocated() as the peak. Cases run in one process (--isolate for
  one subprocess each); a case that runs out of memory is recorded as "OOM".

Writes JSON (environment, settings, every measurement, ratios, target checks), a markdown table and
(with matplotlib) a plot of time and peak memory against M, all with the same basename, to
benchmarks/results/. Timing, memory and the writers are shared with bench_mixture.py
(benchmarks/harness.py); benchmarks/plot.py redraws the plot of any results file.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from harness import (MIB, ROOT, Clock, backends_ran, is_oom, environment, peak_extra, print_child_result,
                     run_child, timing_fields, use_mmap_for_large_allocations, versions_line,
                     write_results)

sys.path.insert(0, str(ROOT))   # measure the checkout this script lives in, not an installed copy

VARIANTS = ("reference", "compiled", "fused", "products")
LOSS_MODES = ("fwd", "fwd+bwd")
# The inference forward (torch.no_grad): interleaved cases time it too, since on CPU a training
# forward ("fwd") already forms the gradient (docs/design.md, "The gradient in the forward").
EVAL = "eval"
PRODUCTS = ("src@trg^T", "g@trg", "g^T@src")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
DEFAULT_SHAPES = {"cpu": ["128x128x49x256", "256x256x49x256", "256x256x25x1024"],
                  "cuda": ["512x512x49x2048", "4096x4096x49x1024"]}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
QUICK_SHAPE = "16x16x9x32"
SWEEP = dict(nb=[128, 256, 512, 1024, 2048, 4096, 8192], l=[25, 49], d=[256, 1024, 2048],
             dtypes=["bfloat16", "float16", "float32"])
RESULT_TAG = "BENCH_NCE_RESULT:"

# The CPU acceptance cases: (shape, estimator, tclip, reg_weight).
S_CPU, S_CPU_1024, S_DIM = (256, 256, 49, 256), (1024, 1024, 49, 256), (16384, 256, 64, 256)
CPU_TARGET_CASES = [(S_CPU, "nce", 20.0, 0.05), (S_CPU_1024, "nce", 20.0, 0.05), (S_DIM, "jsd", None, 0.0)]

# (device, shape, dtype, estimator, name, ratio key, comparison, limit): the acceptance targets
# (README, "Performance"): the CPU ones on the machine that runs them (fp32), the CUDA ones those of
# the one-call GPU check (benchmarks/gpu_check.sh), H100/H200 in bf16.
S1, S2 = (512, 512, 49, 2048), (4096, 4096, 49, 1024)
S_D256 = (8192, 8192, 49, 256)
AMDIM_SIZES = [(nb, nb, 49, d) for nb in (128, 256, 480) for d in (1024, 1536, 2560)]
TARGETS = [
    ("cpu", S_CPU, "float32", "nce", "eval fwd / product", "fused_eval_over_mm", "<=", 1.15),
    ("cpu", S_CPU, "float32", "nce", "fwd+bwd / three products", "fused_fwdbwd_over_3mm", "<=", 1.3),
    ("cpu", S_CPU, "float32", "nce", "peak extra fwd+bwd MiB", "fused_peak_extra_fwdbwd_mib", "<", 1.0),
    ("cpu", S_CPU_1024, "float32", "nce", "fwd+bwd / three products", "fused_fwdbwd_over_3mm", "<=", 1.3),
    ("cpu", S_DIM, "float32", "jsd", "fwd+bwd / three products", "fused_fwdbwd_over_3mm", "<=", 1.3),
    ("cuda", S2, "bfloat16", "nce", "fwd / product", "fused_fwd_over_mm", "<=", 1.3),
    ("cuda", S2, "bfloat16", "nce", "fwd+bwd / product", "fused_fwdbwd_over_mm", "<=", 4.5),
    ("cuda", S2, "bfloat16", "nce", "peak extra fwd+bwd MiB", "fused_peak_extra_fwdbwd_mib", "<=", 64.0),
    ("cuda", S1, "bfloat16", "nce", "fwd+bwd speedup vs reference", "speedup_fwdbwd_vs_reference", ">=", 4.0),
    ("cuda", S1, "bfloat16", "nce", "fwd+bwd speedup vs compiled", "speedup_fwdbwd_vs_compiled", ">=", 2.0),
    ("cuda", S_D256, "bfloat16", "nce", "fwd+bwd / product", "fused_fwdbwd_over_mm", "<=", 6.0),
] + [("cuda", shape, "bfloat16", "nce", "fwd+bwd speedup vs compiled", "speedup_fwdbwd_vs_compiled", ">=", 1.0)
     for shape in AMDIM_SIZES]


# ----------------------------------------------------------------------------- measuring one case

def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"shape must be NxBxLxD with positive integers, got {text!r}")
    return tuple(int(p) for p in parts)


def shape_str(shape) -> str:
    return "x".join(str(v) for v in shape)


def parse_tclip(text: str):
    return None if text.lower() == "none" else float(text)


def make_inputs(shape, dtype, device, requires_grad):
    """N == B: pos_idx None (row i's positive is sample i); N == B * L: each location of each image
    is a source row (DIM's local loss), row i's positive is image i // L; else i % B."""
    n, b, l, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.randn(n, d, generator=gen, device=device, dtype=dtype).requires_grad_(requires_grad)
    trg = torch.randn(b, l, d, generator=gen, device=device, dtype=dtype).requires_grad_(requires_grad)
    rows = torch.arange(n, device=device)
    pos_idx = None if n == b else rows // l if n == b * l else rows % b
    return src, trg, pos_idx


def loss_function(variant: str, fused_backend: str):
    from amdim_kernels.reference import nce_loss_reference
    if variant == "reference":
        return nce_loss_reference
    if variant == "compiled":
        # dynamic=False: one specialised graph per shape, as a user with a fixed batch would get.
        return torch.compile(nce_loss_reference, dynamic=False)
    try:
        from amdim_kernels import fused_nce_loss
    except ImportError as exc:
        raise RuntimeError(f"fused variant unavailable: cannot import amdim_kernels.fused_nce_loss ({exc})")
    return lambda src, trg, pos_idx, **kw: fused_nce_loss(src, trg, pos_idx, backend=fused_backend, **kw)


def _record(case, **fields):
    rec = dict(variant=case["variant"], shape=case["shape"], dtype=case["dtype"], mode=case["mode"],
               estimator=case["estimator"], tclip=case["tclip"], reg_weight=case["reg_weight"],
               status="ok", error=None, median_s=None, min_s=None, times_s=None, first_call_s=None,
               peak_extra_bytes=None, grad_bytes=None, input_bytes=None)
    rec.update(fields)
    return rec


def product_calls(case, cfg) -> dict:
    """The three products of the case's shape, each a call into preallocated outputs."""
    n, b, l, d = case["shape"]
    m = b * l
    dtype, device = DTYPES[case["dtype"]], cfg["device"]
    gen = torch.Generator(device=device).manual_seed(1)
    src = torch.randn(n, d, generator=gen, device=device, dtype=dtype)
    trg = torch.randn(m, d, generator=gen, device=device, dtype=dtype)
    g = torch.randn(n, m, generator=gen, device=device, dtype=dtype)
    scores, d_src, d_trg = (torch.empty(n, m, device=device, dtype=dtype), torch.empty_like(src),
                            torch.empty_like(trg))
    return {"src@trg^T": lambda: torch.mm(src, trg.T, out=scores),
            "g@trg": lambda: torch.mm(g, trg, out=d_src),
            "g^T@src": lambda: torch.mm(g.T, src, out=d_trg)}


def measure_products(case, cfg, clock):
    calls, records = product_calls(case, cfg), []
    for name in PRODUCTS:
        first, times = clock.run(calls[name], lambda: None, cfg["warmup"], cfg["repeats"])
        records.append(_record(dict(case, mode=name), **timing_fields(first, times)))
    return records


class LossCall:
    """One loss variant on inputs of its own: call() is the forward ("fwd": the training forward,
    inputs require grad, so it saves for backward) or forward + backward of loss + lgt_reg."""

    def __init__(self, case, cfg):
        if case["variant"] == "compiled":
            torch._dynamo.reset()   # a fresh compile per case: first_call_s is this shape's compile
        self.fn = loss_function(case["variant"], cfg["fused_backend"])
        self.src, self.trg, self.pos_idx = make_inputs(case["shape"], DTYPES[case["dtype"]],
                                                       cfg["device"], requires_grad=True)
        self.kw = dict(tclip=case["tclip"], reg_weight=case["reg_weight"], estimator=case["estimator"])
        self.with_backward = case["mode"] == "fwd+bwd"
        self.inference = case["mode"] == EVAL

    def prepare(self):
        self.src.grad = self.trg.grad = None   # frees the last call's gradients outside the timed region

    def forward(self):
        with torch.set_grad_enabled(not self.inference):
            return self.fn(self.src, self.trg, self.pos_idx, **self.kw)

    @staticmethod
    def backward(out):
        loss, lgt_reg = out
        (loss + lgt_reg).backward()

    def call(self):
        out = self.forward()
        if self.with_backward:
            self.backward(out)
        return out

    def grad_bytes(self) -> int:
        return sum(t.grad.nbytes for t in (self.src, self.trg) if t.grad is not None)

    def input_bytes(self) -> int:
        return self.src.nbytes + self.trg.nbytes


def measure_loss(case, cfg, clock, part):
    """part: "time" (first call, warm-up, timed calls), "memory" (warm-up, peak extra) or "all"."""
    loss = LossCall(case, cfg)
    rec = _record(case, input_bytes=loss.input_bytes())
    if case["variant"] == "fused" and cfg["device"] == "cuda":   # which CUDA kernels computed it
        from amdim_kernels import ops
        n, b, l, d = case["shape"]
        rec["cuda_variants"] = (list(ops.SELECTION.choose(n, b * l, d, loss.src.dtype))
                                if ops.SELECTION else None)
    with backends_ran(rec):
        if part in ("time", "all"):
            first, times = clock.run(loss.call, loss.prepare, cfg["warmup"], cfg["repeats"])
            rec.update(timing_fields(first, times))
        if part in ("memory", "all"):
            if part == "memory":   # warm-up: one-time costs (compile, thread pools, BLAS buffers)
                for _ in range(max(cfg["warmup"], 1)):
                    loss.prepare()
                    loss.call()
            rec["peak_extra_bytes"] = peak_extra(cfg["device"], loss.forward,
                                                 loss.backward if loss.with_backward else None,
                                                 loss.prepare, loss.grad_bytes)
            rec["grad_bytes"] = loss.grad_bytes()
    return [rec]


def measure_interleaved(case, cfg):
    """The fused loss (fwd, fwd+bwd, eval) and the three products, round-robin: every round calls
    each once (in an order rotated by one per round), so times_s[r] of the six records belong
    together."""
    entries = []
    for mode in LOSS_MODES + (EVAL,):
        loss = LossCall(dict(case, variant="fused", mode=mode), cfg)
        entries.append((dict(case, variant="fused", mode=mode), loss.prepare, loss.call, loss))
    for name, fn in product_calls(case, cfg).items():
        entries.append((dict(case, variant="products", mode=name), lambda: None, fn, None))
    first, ran, formed = [], {}, []
    with backends_ran(ran):   # which backend the fused rows ran (the products call no loss)
        for _, prepare, fn, loss in entries:   # the first call holds one-time costs (the extension's build)
            prepare()
            t0 = time.perf_counter()
            out = fn()
            first.append(time.perf_counter() - t0)
            # whether the forward formed the gradient (the CPU path's choice, or --two-pass)
            formed.append(loss and type(out[0].grad_fn).__name__ == "ForwardGradientLossBackward")
        times = [[] for _ in entries]
        for r in range(-cfg["warmup"], cfg["repeats"]):
            for k in range(len(entries)):
                j = (k + r) % len(entries)
                _, prepare, fn, _ = entries[j]
                prepare()
                t0 = time.perf_counter()
                fn()
                if r >= 0:
                    times[j].append(time.perf_counter() - t0)
    return [_record(c, interleaved=True, input_bytes=loss.input_bytes() if loss else None,
                    **({"backends": ran["backends"], "gradient_in_forward": g} if loss else {}),
                    **timing_fields(f, t))
            for (c, _, _, loss), f, t, g in zip(entries, first, times, formed)]


def measure(case, cfg, part="all"):
    """All records of one case; failures become records with status "OOM" or "error"."""
    torch.set_num_threads(cfg["threads"])
    clock = Clock(cfg["device"])
    if cfg.get("two_pass"):   # this child process only
        os.environ["AMDIM_KERNELS_CPU_GRADIENT"] = "backward"
    try:
        if case["variant"] == "interleaved":
            return measure_interleaved(case, cfg)
        if case["variant"] == "products":
            return measure_products(case, cfg, clock)
        if part == "memory" and cfg["device"] == "cpu":
            use_mmap_for_large_allocations()
        return measure_loss(case, cfg, clock, part)
    except Exception as exc:   # one failing variant must not end the run
        status = "OOM" if is_oom(exc) else "error"
        err = f"{type(exc).__name__}: {str(exc).strip()[:800]}"
        return [_record(dict(case, variant=v, mode=m), status=status, error=err)
                for v, m in case_records(case)]
    finally:
        gc.collect()
        if cfg["device"] == "cuda":
            torch.cuda.empty_cache()


def case_records(case) -> list:
    """The (variant, mode) of every record a case gives."""
    if case["variant"] == "interleaved":
        return [("fused", m) for m in LOSS_MODES + (EVAL,)] + [("products", p) for p in PRODUCTS]
    if case["variant"] == "products":
        return [("products", p) for p in PRODUCTS]
    return [(case["variant"], case["mode"])]


def measure_in_subprocess(case, cfg, part):
    timeout = cfg["compile_timeout"] if case["variant"] == "compiled" else cfg["case_timeout"]
    spec = json.dumps(dict(case=case, cfg=cfg, part=part))
    records, failure = run_child(Path(__file__), ["--_child", spec], RESULT_TAG, timeout)
    if failure is None:
        return records
    status, message = failure
    return [_record(dict(case, variant=v, mode=m), status=status, error=f"{part}: {message[-800:]}")
            for v, m in case_records(case)]


def measure_isolated(case, cfg):
    """Timing and peak memory of a loss case in two fresh processes: each needs its own malloc mode.
    An interleaved case is timed in one process and the memory of each fused mode measured in one more."""
    if case["variant"] == "interleaved":
        records = measure_in_subprocess(case, cfg, "time")
        for rec in records:
            if rec["variant"] == "fused" and rec["status"] == "ok":
                (mem,) = measure_in_subprocess(dict(case, variant="fused", mode=rec["mode"]), cfg, "memory")
                rec.update(peak_extra_bytes=mem["peak_extra_bytes"], grad_bytes=mem["grad_bytes"])
                if mem["status"] != "ok":
                    rec.update(status=mem["status"], error=mem["error"])
        return records
    if case["variant"] == "products" or cfg["device"] == "cuda":   # CUDA memory needs no malloc mode
        return measure_in_subprocess(case, cfg, "time" if case["variant"] == "products" else "all")
    (timed,) = measure_in_subprocess(case, cfg, "time")
    (mem,) = measure_in_subprocess(case, cfg, "memory")
    if timed["status"] != "ok":
        return [timed]
    timed.update(peak_extra_bytes=mem["peak_extra_bytes"], grad_bytes=mem["grad_bytes"])
    if mem["status"] != "ok":
        timed.update(status=mem["status"], error=mem["error"])
    return [timed]


# ----------------------------------------------------------------------------- the run

def build_cases(setups, dtypes, variants, modes, interleave=False):
    """setups: (shape, estimator, tclip, reg_weight) per loss. With interleave, the fused variant
    and the products of a setup are one case ("interleaved")."""
    cases = []
    for dtype in dtypes:
        for shape, estimator, tclip, reg_weight in setups:
            base = dict(shape=list(shape), dtype=dtype, estimator=estimator, tclip=tclip,
                        reg_weight=reg_weight)
            if interleave:
                cases.append(dict(base, variant="interleaved", mode="interleaved"))
            for variant in variants:
                if interleave and variant in ("fused", "products"):
                    continue
                for mode in ("products",) if variant == "products" else modes:
                    cases.append(dict(base, variant=variant, mode=mode))
    return cases


def _find(records, variant, mode):
    return next((r for r in records if r["variant"] == variant and r["mode"] == mode
                 and r["status"] == "ok"), None)


def _median(records, variant, mode):
    r = _find(records, variant, mode)
    return (r["median_s"], r["peak_extra_bytes"]) if r else (None, None)


def _div(a, b):
    return a / b if a is not None and b else None


def _per_round(recs, num_mode, den_modes):
    """(median, min, max) over the rounds of fused[num_mode] / sum of products[den_modes], for
    interleaved records (one time per round each), else None."""
    num = _find(recs, "fused", num_mode)
    dens = [_find(recs, "products", m) for m in den_modes]
    if num is None or not num.get("interleaved") or not all(d and d.get("interleaved") for d in dens):
        return None
    ratios = [t / sum(ts) for t, *ts in zip(num["times_s"], *(d["times_s"] for d in dens))]
    return statistics.median(ratios), min(ratios), max(ratios)


def _passes(value, op, limit):
    return None if value is None else {">=": value >= limit, "<=": value <= limit, "<": value < limit}[op]


def summarize(records, device):
    """Ratios per (shape, dtype, loss options) and the target checks that apply to the measured cases.
    Ratios to the products are the median of the per-round ratios where the case was interleaved."""
    groups = {}
    for r in records:
        key = (tuple(r["shape"]), r["dtype"], r.get("estimator", "nce"), r.get("tclip"), r.get("reg_weight"))
        groups.setdefault(key, []).append(r)
    summary, checks = [], []
    for (shape, dtype, estimator, tclip, reg_weight), recs in groups.items():
        t = {(v, m): _median(recs, v, m)[0] for v in VARIANTS for m in LOSS_MODES + PRODUCTS}
        mem = {v: _median(recs, v, "fwd+bwd")[1] for v in VARIANTS}
        mm1 = t["products", "src@trg^T"]
        mm3 = None if any(t["products", p] is None for p in PRODUCTS) else sum(t["products", p] for p in PRODUCTS)
        fwd, fwdbwd = t["fused", "fwd"], t["fused", "fwd+bwd"]
        rounds = {"fwd_over_mm": _per_round(recs, "fwd", PRODUCTS[:1]),
                  "eval_over_mm": _per_round(recs, EVAL, PRODUCTS[:1]),
                  "fwdbwd_over_mm": _per_round(recs, "fwd+bwd", PRODUCTS[:1]),
                  "fwdbwd_over_3mm": _per_round(recs, "fwd+bwd", PRODUCTS)}
        ratio = {k: v[0] if v else None for k, v in rounds.items()}
        row = dict(shape=list(shape), dtype=dtype, estimator=estimator, tclip=tclip,
                   reg_weight=reg_weight, mm_s=mm1, three_mm_s=mm3,
                   interleaved=rounds["fwdbwd_over_3mm"] is not None,
                   fused_fwd_over_mm=ratio["fwd_over_mm"] or _div(fwd, mm1),
                   fused_fwdbwd_over_mm=ratio["fwdbwd_over_mm"] or _div(fwdbwd, mm1),
                   fused_fwdbwd_over_3mm=ratio["fwdbwd_over_3mm"] or _div(fwdbwd, mm3),
                   fused_fwd_over_mm_range=rounds["fwd_over_mm"] and list(rounds["fwd_over_mm"][1:]),
                   fused_eval_over_mm=ratio["eval_over_mm"],
                   fused_eval_over_mm_range=rounds["eval_over_mm"] and list(rounds["eval_over_mm"][1:]),
                   fused_fwdbwd_over_3mm_range=rounds["fwdbwd_over_3mm"] and list(rounds["fwdbwd_over_3mm"][1:]),
                   speedup_fwd_vs_reference=_div(t["reference", "fwd"], fwd),
                   speedup_fwdbwd_vs_reference=_div(t["reference", "fwd+bwd"], fwdbwd),
                   speedup_fwd_vs_compiled=_div(t["compiled", "fwd"], fwd),
                   speedup_fwdbwd_vs_compiled=_div(t["compiled", "fwd+bwd"], fwdbwd),
                   fused_peak_extra_fwdbwd_mib=_div(mem["fused"], MIB),
                   mem_fwdbwd_fused_over_reference=_div(mem["fused"], mem["reference"]))
        summary.append(row)
        for dev, tshape, tdtype, testimator, name, key, op, limit in TARGETS:
            if (dev, tshape, tdtype, testimator) == (device, shape, dtype, estimator):
                value = row[key]
                checks.append(dict(target=name, shape=list(shape), dtype=dtype, estimator=estimator,
                                   key=key, value=value, limit=f"{op} {limit}",
                                   passed=_passes(value, op, limit)))
    return summary, checks


def _fmt(v, scale=1.0, digits=2):
    return "-" if v is None else f"{v * scale:.{digits}f}"


def loss_str(rec) -> str:
    """The loss options of a record or summary row (older files have none: nce)."""
    return (f"{rec.get('estimator', 'nce')}, tclip {rec.get('tclip', '-')}, "
            f"reg_weight {rec.get('reg_weight', '-')}")


def _range(r) -> str:
    return "-" if not r else f"{r[0]:.2f}-{r[1]:.2f}"


def render_markdown(result) -> str:
    env, cfg = result["env"], result["settings"]
    lines = [f"# bench_nce: {env['device_name']} ({env['device']})", "",
             f"{versions_line(env)}; {cfg['threads']} threads; torch CPU capability "
             f"{env.get('cpu_capability')}; C++ kernels: epilogue {env.get('cpu_epilogue_isa') or '-'}, "
             f"flags `{env.get('cpu_kernels_cflags') or '-'}`",
             "", f"`{env['command']}`", "",
             f"Median of {cfg['repeats']} calls after {cfg['warmup']} warm-up calls; fused backend "
             f"`{cfg['fused_backend']}`. Peak extra = {cfg['memory_method']}. "
             "products: fwd column = src@trg^T, fwd+bwd column = sum of the three products.", ""]
    if any(s.get("interleaved") for s in result["summary"]):
        lines += ["Interleaved cases: the fused loss and the products ran round-robin in one process; "
                  "their ratios are medians of per-round ratios, and the range (min-max over the "
                  "rounds) shows how noisy the machine was.", ""]
    if not result["complete"]:
        lines += [f"**Incomplete: {len(result['records'])} records so far (the run was cut off or is "
                  "still going).**", ""]
    groups = {}
    for r in result["records"]:
        groups.setdefault((shape_str(r["shape"]), r["dtype"], loss_str(r)), []).append(r)
    for (shape, dtype, loss), recs in groups.items():
        lines += [f"## N x B x L x D = {shape}, {dtype}, {loss}", "",
                  "| variant | fwd ms | fwd+bwd ms | first call s (fwd / f+b) | peak extra fwd MiB "
                  "| peak extra f+b MiB | status |", "|---|---|---|---|---|---|---|"]
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in recs)]
        for v in variants:
            rs = {r["mode"]: r for r in recs if r["variant"] == v}
            bad = "; ".join(f"{m}: {r['status']} {r['error'] or ''}".strip()
                            for m, r in rs.items() if r["status"] != "ok")
            bad = bad.replace("|", "/").replace("\n", " ")   # keep the markdown row intact
            if v == "products":
                t = [rs[p]["median_s"] if p in rs and rs[p]["status"] == "ok" else None for p in PRODUCTS]
                three = None if None in t else sum(t)
                lines.append(f"| products | {_fmt(t[0], 1e3)} | {_fmt(three, 1e3)} | - | - | - | "
                             f"{bad or 'ok'} (ms each: {', '.join(_fmt(x, 1e3) for x in t)}) |")
                continue
            f, b = rs.get("fwd", {}), rs.get("fwd+bwd", {})
            lines.append(f"| {v} | {_fmt(f.get('median_s'), 1e3)} | {_fmt(b.get('median_s'), 1e3)} "
                         f"| {_fmt(f.get('first_call_s'))} / {_fmt(b.get('first_call_s'))} "
                         f"| {_fmt(f.get('peak_extra_bytes'), 1 / MIB)} "
                         f"| {_fmt(b.get('peak_extra_bytes'), 1 / MIB)} | {(bad or 'ok')[:300]} |")
            e = rs.get(EVAL)
            if e and e["status"] == "ok":
                lines.append(f"| {v} (eval: no grad) | {_fmt(e['median_s'], 1e3)} | - "
                             f"| {_fmt(e['first_call_s'])} / - | {_fmt(e['peak_extra_bytes'], 1 / MIB)} | - | ok |")
        lines.append("")
    lines += ["## Ratios (fused)", "",
              "| shape | dtype | loss | fwd / mm (range) | eval fwd / mm (range) | f+b / mm | f+b / 3 mm (range) "
              "| f+b speedup vs reference | vs compiled | peak extra f+b MiB | peak extra f+b / reference's |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        lines.append(f"| {shape_str(s['shape'])} | {s['dtype']} | {loss_str(s)} "
                     f"| {_fmt(s['fused_fwd_over_mm'])} ({_range(s.get('fused_fwd_over_mm_range'))}) "
                     f"| {_fmt(s.get('fused_eval_over_mm'))} ({_range(s.get('fused_eval_over_mm_range'))}) "
                     f"| {_fmt(s['fused_fwdbwd_over_mm'])} "
                     f"| {_fmt(s['fused_fwdbwd_over_3mm'])} ({_range(s.get('fused_fwdbwd_over_3mm_range'))}) "
                     f"| {_fmt(s['speedup_fwdbwd_vs_reference'])} | {_fmt(s['speedup_fwdbwd_vs_compiled'])} "
                     f"| {_fmt(s['fused_peak_extra_fwdbwd_mib'])} | {_fmt(s['mem_fwdbwd_fused_over_reference'], 1, 3)} |")
    if result["targets"]:
        lines += ["", "## Targets", "", "| target | shape | dtype | loss | value | limit | met |",
                  "|---|---|---|---|---|---|---|"]
        for c in result["targets"]:
            met = "n/a" if c["passed"] is None else ("yes" if c["passed"] else "NO")
            lines.append(f"| {c['target']} | {shape_str(c['shape'])} | {c['dtype']} | {c.get('estimator', 'nce')} "
                         f"| {_fmt(c['value'], 1, 3)} | {c['limit']} | {met} |")
    return "\n".join(lines) + "\n"


def progress_line(i, total, case, recs) -> str:
    mode = "" if case["variant"] == "interleaved" else f" {case['mode']}"
    head = (f"[{i}/{total}] {case['variant']:9s} {shape_str(case['shape'])} {case['dtype']}{mode} "
            f"({case['estimator']}, tclip {case['tclip']})")
    parts = []
    for r in recs:
        if r["status"] != "ok":
            parts.append(f"{r['mode']}: {r['status']} {(r['error'] or '')[:120]}")
            continue
        if case["variant"] == "interleaved":
            parts.append(f"{r['variant']} {r['mode']} {r['median_s'] * 1e3:.3f} ms")
            continue
        text = f"{r['median_s'] * 1e3:.3f} ms"
        if r["peak_extra_bytes"] is not None:
            text += f", first call {r['first_call_s']:.2f} s, peak extra {r['peak_extra_bytes'] / MIB:.2f} MiB"
        parts.append(text if len(recs) == 1 else f"{r['mode']} {text}")
    return f"{head}: {'; '.join(parts)}"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shapes", nargs="+", type=parse_shape, help="NxBxLxD, e.g. 256x256x49x256")
    p.add_argument("--dtype", nargs="+", help="float32|bfloat16|float16 (fp32, bf16, fp16); "
                   "default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   help="default: all (all but compiled with --quick or --sweep)")
    p.add_argument("--modes", nargs="+", choices=LOSS_MODES, default=list(LOSS_MODES))
    p.add_argument("--repeats", type=int, help="timed calls per case (default 10; 25 on cuda without --sweep; 3 quick)")
    p.add_argument("--warmup", type=int, help="untimed calls before them (default 2; 5 on cuda without --sweep; 1 quick)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--fused-backend", default="auto", help="backend= of fused_nce_loss")
    p.add_argument("--two-pass", action="store_true",
                   help="cpu: the fused loss's gradient by nce_fwd + nce_bwd (four products) even where "
                        "the forward would form it (AMDIM_KERNELS_CPU_GRADIENT=backward), to compare the two")
    p.add_argument("--tclip", type=parse_tclip, default=20.0, help="soft clip, or none (default 20)")
    p.add_argument("--reg-weight", type=float, default=0.05)
    p.add_argument("--estimator", choices=["nce", "jsd", "dv"], default="nce")
    p.add_argument("--interleave", action="store_true",
                   help="cpu: time fused and the products round-robin in one process per case")
    p.add_argument("--cpu-targets", action="store_true",
                   help="the CPU acceptance cases (see above), fp32, fused and products interleaved")
    p.add_argument("--sweep", action="store_true", help=f"N=B in {SWEEP['nb']}, L in {SWEEP['l']}, "
                   f"D in {SWEEP['d']}, dtypes {SWEEP['dtypes']} (unless --shapes/--dtype given)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: shape {QUICK_SHAPE}, few repeats")
    p.add_argument("--isolate", action="store_true", help="one subprocess per case on cuda too (always on cpu)")
    p.add_argument("--case-timeout", type=float, default=600.0, help="seconds per case run in a subprocess")
    p.add_argument("--compile-timeout", type=float, default=300.0,
                   help="seconds per torch.compile case run in a subprocess (caps the compile cost)")
    p.add_argument("--tag", help="name part of the default output file (default: UTC timestamp)")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/bench_nce_<device>_<tag>.json); "
                   "the markdown table goes beside it with .md")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    if args.sweep and args.quick:
        p.error("--sweep and --quick exclude each other")
    if (args.interleave or args.cpu_targets) and args.device != "cpu":
        p.error("--interleave and --cpu-targets are for --device cpu")
    if args.cpu_targets and (args.shapes or args.dtype or args.sweep or args.quick):
        p.error("--cpu-targets sets its own shapes and dtype (and is neither --sweep nor --quick)")
    args.interleave = args.interleave or args.cpu_targets
    dtypes = args.dtype or (SWEEP["dtypes"] if args.sweep else [DEFAULT_DTYPE[args.device]])
    args.dtype = [DTYPE_ALIASES.get(d, d) for d in dtypes]
    for d in args.dtype:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {sorted(DTYPES) + sorted(DTYPE_ALIASES)}")
    if args.shapes is None:
        if args.quick:
            args.shapes = [parse_shape(QUICK_SHAPE)]
        elif args.sweep:
            args.shapes = [(nb, nb, l, d) for d in SWEEP["d"] for l in SWEEP["l"] for nb in SWEEP["nb"]]
        else:
            args.shapes = [parse_shape(s) for s in DEFAULT_SHAPES[args.device]]
    if args.cpu_targets:
        args.setups = CPU_TARGET_CASES
        args.variants = args.variants or ["fused", "products"]
    else:
        args.setups = [(shape, args.estimator, args.tclip, args.reg_weight) for shape in args.shapes]
    if args.variants is None:
        # torch.compile costs tens of seconds per case: opt in to it for smoke runs and sweeps.
        args.variants = [v for v in VARIANTS if v != "compiled" or not (args.quick or args.sweep)]
    # (repeats, warmup): the sweep has hundreds of cases, each far longer than the timer's resolution.
    defaults = (3, 1) if args.quick else (25, 5) if args.device == "cuda" and not args.sweep else (10, 2)
    args.repeats = args.repeats or defaults[0]
    args.warmup = defaults[1] if args.warmup is None else args.warmup
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def cpu_kernels() -> dict:
    """Which build of the C++ CPU kernels runs (building it first if needed): the library, its
    compile flags, and the instruction set its epilogues were compiled for."""
    from amdim_kernels import _extension, ops  # noqa: F401  (ops loads the extension)
    library = _extension.load()
    shipped = _extension.shipped_build()
    flags = ("ahead-of-time build (portable flags)" if shipped and shipped[0] == library
             else " ".join(_extension.jit_spec().cflags))
    return dict(cpu_kernels_library=library, cpu_kernels_cflags=flags,
                cpu_epilogue_isa=torch.ops.amdim_kernels.cpu_epilogue_isa())


def write_outputs(out: Path, env, cfg, records, complete: bool, t_start: float) -> tuple[str, list]:
    """Writes JSON and markdown; the plot only once complete (benchmarks/plot.py redraws any file)."""
    summary, checks = summarize(records, cfg["device"])
    result = dict(schema="bench_nce/1", complete=complete, env=env, settings=cfg, records=records,
                  summary=summary, targets=checks, wall_s=time.perf_counter() - t_start)
    markdown = render_markdown(result)
    return markdown, write_results(out, result, markdown, indent=1, plot=complete)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        spec = json.loads(argv[1])
        print_child_result(RESULT_TAG, measure(spec["case"], spec["cfg"], spec["part"]))
        return 0
    args = parse_args(argv)
    isolate = args.isolate or args.device == "cpu"   # peak RSS is only meaningful per process
    memory_method = ("max(fwd peak, bwd peak - gradient bytes) - allocated before the call "
                     "(torch.cuda.max_memory_allocated); min of 2 calls"
                     if args.device == "cuda" else
                     "max(fwd VmHWM, bwd VmHWM - gradient bytes) - VmRSS before the call, after "
                     "warm-up (own subprocess, 64 KiB mmap threshold, heap trimmed, HWM reset via "
                     "clear_refs); min of 2 calls")
    cfg = dict(device=args.device, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
               fused_backend=args.fused_backend, two_pass=args.two_pass, interleave=args.interleave,
               case_timeout=args.case_timeout, compile_timeout=args.compile_timeout,
               isolate=isolate, memory_method=memory_method)
    torch.set_num_threads(args.threads)
    env = environment(args.device, [str(Path(__file__))] + list(argv))
    if args.device == "cpu" and "fused" in args.variants and args.fused_backend != "reference":
        env.update(cpu_kernels())
    tag = args.tag or datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_nce_{args.device}_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    cases = build_cases(args.setups, args.dtype, args.variants, args.modes, args.interleave)
    print(f"bench_nce: {len(cases)} cases on {env['device_name']} ({args.device}, {args.threads} threads), "
          f"repeats {args.repeats}, warmup {args.warmup}", flush=True)
    records, t_start = [], time.perf_counter()
    for i, case in enumerate(cases, 1):
        recs = measure_isolated(case, cfg) if isolate else measure(case, cfg)
        records += recs
        print(progress_line(i, len(cases), case, recs), flush=True)
        # Rewritten after every case: a run cut off by a time limit still leaves what it measured.
        markdown, written = write_outputs(out, env, cfg, records, complete=i == len(cases), t_start=t_start)
    print("\n" + markdown)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
