"""Where the fused loss spends its GPU time: the pieces of one fwd+bwd, and the Triton forward
under each tile config (the tuning loop of issue 6 in one call).

    python benchmarks/profile_gpu.py                      # S1 and S2, bf16
    python benchmarks/profile_gpu.py --configs            # also time every forward tile config
    AMDIM_NCE_BWD_TILE_MIB=16 python benchmarks/profile_gpu.py --bwd-only
    python benchmarks/profile_gpu.py --bwd-compare         # Triton nce_bwd against the registered one

Prints tables; with --out writes the numbers as JSON. Times: triton.testing.do_bench medians
(CUDA events, after warm-up, random data).
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
from amdim_kernels import triton_nce_bwd as tnb  # noqa: E402
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


def bwd_compare(name, shape, dtype, tclip=20.0):
    """The Triton nce_bwd against the kernel registered for CUDA (csrc/cuda unless
    AMDIM_KERNELS_CUDA_BWD=triton), on the same inputs: median ms, and their largest difference
    relative to max |grad|. Each kernel's first call (autotuning, compilation) is not timed."""
    n, b, l, d = shape
    src, trg, pos_idx = inputs(n, b, l, d, dtype)
    pos, neg_stat, _ = ops.nce_fwd(src, trg, pos_idx, tclip, "logsumexp")
    gp = torch.randn_like(pos) / pos.numel()
    gn = torch.rand_like(neg_stat) / n
    gs = torch.tensor(1e-3 / pos.numel(), device="cuda")
    args = (gp, gn, gs, src, trg, pos_idx, neg_stat, tclip, "logsumexp")
    registered, triton_out = ops.nce_bwd(*args), tnb.nce_bwd_triton(*args)
    diff = max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
               for x, y in zip(triton_out, registered))
    row = {"registered": ops.CUDA_BWD, "registered ms": ms(lambda: ops.nce_bwd(*args)),
           "triton ms": ms(lambda: tnb.nce_bwd_triton(*args)),
           "mm ms": ms(lambda: src @ trg.view(-1, d).T), "max rel diff": diff}
    print(f"{name} {shape} {dtype}: registered ({row['registered']}) {row['registered ms']:.3f} ms, "
          f"triton {row['triton ms']:.3f} ms, product {row['mm ms']:.3f} ms, "
          f"max rel diff {diff:.2e}", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["S1", "S2"], choices=list(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--configs", action="store_true", help="time the Triton forward under every tile config")
    p.add_argument("--bwd-only", action="store_true", help="only the nce_bwd op (for tile-size sweeps)")
    p.add_argument("--bwd-compare", action="store_true",
                   help="time the Triton nce_bwd against the registered CUDA one")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
          "bwd tile MiB", os.environ.get("AMDIM_NCE_BWD_TILE_MIB", "32 (default)"))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "commit": os.environ.get("AMDIM_COMMIT"),
              "bwd_tile_mib": os.environ.get("AMDIM_NCE_BWD_TILE_MIB", "32"), "dtype": args.dtype}
    for name in args.shapes:
        shape = SHAPES[name]
        if args.bwd_compare:
            result[name] = {"bwd_compare": bwd_compare(name, shape, dtype)}
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
            continue
        result[name] = {"pieces": pieces(name, shape, dtype)}
        if args.configs:
            result[name]["forward_configs"] = forward_configs(name, shape, dtype)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
