"""Where the fused loss spends its GPU time: the pieces of one fwd+bwd, and the Triton forward
under each tile config (the forward's tile-size tuning loop in one call).

    python benchmarks/profile_gpu.py                      # S1 and S2, bf16
    python benchmarks/profile_gpu.py --configs            # also time every forward tile config
    AMDIM_NCE_BWD_TILE_MIB=16 python benchmarks/profile_gpu.py --bwd-only
    python benchmarks/profile_gpu.py --bwd-compare         # every nce_bwd variant on the same inputs

Prints tables; with --out writes the numbers as JSON, rewritten after every measurement (a run cut
off by a time limit keeps what it measured). Times: triton.testing.do_bench medians (CUDA events,
after warm-up, random data).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import amdim_kernels as ak  # noqa: E402
from amdim_kernels import ops  # noqa: E402
from amdim_kernels import triton_nce_fwd as tnf  # noqa: E402

SHAPES = {"S1": (512, 512, 49, 2048), "S2": (4096, 4096, 49, 1024),
          # D = 256: one D-out chunk, so the Triton backward recomputes each tile only twice
          "S3": (2048, 2048, 49, 256)}
# Candidates beyond the autotuned set: larger tiles feed the tensor cores better, at the price of
# registers for the epilogue (spills are reported by the sm_90 compile test).
EXTRA = [
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_D": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 256, "BLOCK_M": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_D": 64}, num_warps=4, num_stages=3),
]


def inputs(n, b, l, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    src = torch.randn(n, d, device="cuda", dtype=dtype, generator=g)
    trg = torch.randn(b, l, d, device="cuda", dtype=dtype, generator=g)
    pos_idx = torch.arange(n, device="cuda") % b
    return src, trg, pos_idx


def ms(fn):
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def pieces(name, shape, dtype, tclip=20.0):
    n, b, l, d = shape
    src, trg, pos_idx = inputs(n, b, l, d, dtype)
    trg_flat = trg.view(-1, d)
    pos, neg_stat, sumsq = ops.nce_fwd(src, trg, pos_idx, tclip, "logsumexp")
    gp, gn = torch.randn_like(pos), torch.randn_like(neg_stat)
    gs = torch.tensor(0.3, device="cuda")
    src_g, trg_g = src.clone().requires_grad_(), trg.clone().requires_grad_()

    def fused_fb():
        loss, reg = ak.fused_nce_loss(src_g, trg_g, pos_idx, tclip=tclip)
        (loss + reg).backward()

    row = {
        "mm (N x D)(D x M)": ms(lambda: src @ trg_flat.T),
        "nce_fwd op": ms(lambda: ops.nce_fwd(src, trg, pos_idx, tclip, "logsumexp")),
        "nce_bwd op": ms(lambda: ops.nce_bwd(gp, gn, gs, src, trg, pos_idx, neg_stat, tclip, "logsumexp")),
        "fused_nce_loss fwd": ms(lambda: ak.fused_nce_loss(src, trg, pos_idx, tclip=tclip)),
        "fused_nce_loss fwd+bwd": ms(fused_fb),
    }
    print(f"\n## {name} {shape} {dtype}: ms (ratio to the product)")
    for k, v in row.items():
        print(f"  {k:28s} {v:8.3f}  ({v / row['mm (N x D)(D x M)']:.2f}x)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fused_fb()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))
    return row


def forward_configs(name, shape, dtype, tclip=20.0):
    n, b, l, d = shape
    src, trg, pos_idx = inputs(n, b, l, d, dtype)
    kernel = tnf._nce_fwd_split_kernel
    original, original_module = list(kernel.configs), list(tnf.CONFIGS)
    out = {}
    try:
        for cfg in original + EXTRA:
            key = f"{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_D']} w{cfg.num_warps} s{cfg.num_stages}"
            kernel.configs = [cfg]
            tnf.CONFIGS = [cfg]            # split_columns sizes its granule from CONFIGS
            tnf._plan.cache_clear()
            kernel.cache.clear()
            try:
                out[key] = ms(lambda: tnf.nce_fwd_triton(src, trg, pos_idx, tclip, "logsumexp"))
            except Exception as err:  # a config that fails to compile or run is reported, not fatal
                out[key] = f"failed: {type(err).__name__}: {str(err)[:120]}"
            print(f"  {name} {key:26s} {out[key] if isinstance(out[key], str) else f'{out[key]:.3f} ms'}", flush=True)
    finally:
        kernel.configs, tnf.CONFIGS = original, original_module
        tnf._plan.cache_clear()
        kernel.cache.clear()
    return out


def bwd_compare(name, shape, dtype, tclip=20.0, record=print):
    """Every nce_bwd variant available here (the CUDA C++ one, the Triton row/column one, the
    Triton g + cuBLAS one) on the same inputs: median ms, the largest difference from the first
    variant relative to max |grad|, and the peak memory beyond the gradients. Each variant's first
    call (autotuning, compilation) is not timed. `record(row)` gets each row as it is measured."""
    n, b, l, d = shape
    src, trg, pos_idx = inputs(n, b, l, d, dtype)
    pos, neg_stat, _ = ops.nce_fwd(src, trg, pos_idx, tclip, "logsumexp")
    gp = torch.randn_like(pos) / pos.numel()
    gn = torch.rand_like(neg_stat) / n
    gs = torch.tensor(1e-3 / pos.numel(), device="cuda")
    args = (gp, gn, gs, src, trg, pos_idx, neg_stat, tclip, "logsumexp")
    mm = ms(lambda: src @ trg.view(-1, d).T)
    first = None
    for variant, kernel in ops._BWD_KERNELS.items():
        out = kernel(*args)   # autotune, compile
        first = first or out
        diff = max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
                   for x, y in zip(out, first))
        del out
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        grads = kernel(*args)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before - sum(g.nbytes for g in grads)) / 2**20
        del grads
        t = ms(lambda: kernel(*args))
        row = {"shape": name, "variant": variant, "ms": t, "mm ms": mm, "over mm": t / mm,
               "max rel diff vs first": diff, "peak extra MiB": peak}
        print(f"{name} {shape} {dtype} {variant:14s} {t:8.3f} ms = {t / mm:5.2f}x the product "
              f"({mm:.3f} ms), peak extra {peak:7.1f} MiB, max rel diff {diff:.2e}", flush=True)
        record(row)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["S1", "S2"], choices=list(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--configs", action="store_true", help="time the Triton forward under every tile config")
    p.add_argument("--bwd-only", action="store_true", help="only the nce_bwd op (for tile-size sweeps)")
    p.add_argument("--bwd-compare", action="store_true",
                   help="time every nce_bwd variant (CUDA C++, Triton, Triton g + cuBLAS) on the same inputs")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
          "bwd tile MiB", os.environ.get("AMDIM_NCE_BWD_TILE_MIB", "32 (default)"))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "commit": os.environ.get("AMDIM_COMMIT"),
              "bwd_tile_mib": os.environ.get("AMDIM_NCE_BWD_TILE_MIB", "32"), "dtype": args.dtype,
              "variants": ops.SELECTION.describe() if ops.SELECTION else None, "bwd_compare": []}

    def save():
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))

    def record(row):
        result["bwd_compare"].append(row)
        save()

    for name in args.shapes:
        shape = SHAPES[name]
        if args.bwd_compare:
            bwd_compare(name, shape, dtype, record=record)
            continue
        if args.bwd_only:
            n, b, l, d = shape
            src, trg, pos_idx = inputs(n, b, l, d, dtype)
            pos, neg_stat, _ = ops.nce_fwd(src, trg, pos_idx, 20.0, "logsumexp")
            gp, gn, gs = torch.randn_like(pos), torch.randn_like(neg_stat), torch.tensor(0.3, device="cuda")
            t = ms(lambda: ops.nce_bwd(gp, gn, gs, src, trg, pos_idx, neg_stat, 20.0, "logsumexp"))
            mm = ms(lambda: src @ trg.view(-1, d).T)
            print(f"{name}: nce_bwd {t:.3f} ms = {t / mm:.2f}x the product ({mm:.3f} ms)")
            result[name] = {"nce_bwd": t, "mm": mm}
        else:
            result[name] = {"pieces": pieces(name, shape, dtype)}
            if args.configs:
                result[name]["forward_configs"] = forward_configs(name, shape, dtype)
        save()


if __name__ == "__main__":
    main()
