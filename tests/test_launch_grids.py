"""Every Triton launch's grid fits CUDA's limits (x < 2^31, y and z <= 65535) at extreme but legal
shapes, for every GPU tile config: the interpreter runs any grid, a GPU refuses the launch. The
kernels are replaced by recorders that evaluate each launch's grid under each GPU config, and the
wrappers plan as on a GPU (its configs, 132 SMs): nothing is computed, only the launches are."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from amdim_kernels import triton_mixture as tmx, triton_nce_bwd as tnb  # noqa: E402
from amdim_kernels import triton_nce_bwd_cublas as tgc, triton_nce_dense as tnd  # noqa: E402
from amdim_kernels import triton_nce_fwd as tnf  # noqa: E402

GRID_LIMITS = (2**31 - 1, 65535, 65535)


class Recorder:
    """Stands in for a kernel: kernel[grid](...) records the grid under every config."""

    def __init__(self, name, configs):
        self.name, self.configs, self.grids = name, configs, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for cfg in self.configs or [None]:
                meta = dict(kwargs, **(cfg.kwargs if cfg else {}))
                dims = tuple(grid(meta) if callable(grid) else grid)
                self.grids.append((self.name, cfg.kwargs if cfg else None, dims))
        return launch


@pytest.fixture
def launches(monkeypatch):
    """Record the launches of every wrapper, planned as on an H100 with the GPU configs."""
    kernels = {
        (tnf, "_nce_fwd_split_kernel"): tnf._GPU_CONFIGS + tnf._WIDE_CONFIGS,
        (tnf, "_nce_fwd_merge_kernel"): None,
        (tnd, "_nce_dense_kernel"): None,
        (tnb, "_nce_bwd_src_kernel"): tnb._SRC_CONFIGS + tnb._FP32_CONFIGS,
        (tnb, "_nce_bwd_trg_kernel"): tnb._TRG_CONFIGS + tnb._FP32_CONFIGS,
        (tnb, "_sum_splits_kernel"): None,
        (tgc, "_nce_g_kernel"): tgc._GPU_CONFIGS + tgc._FP32_CONFIGS,
        (tmx, "_mixture_fwd_kernel"): None,
        (tmx, "_mixture_bwd_kernel"): None,
    }
    recorders = []
    for (module, name), configs in kernels.items():
        rec = Recorder(name, configs)
        monkeypatch.setattr(module, name, rec)
        recorders.append(rec)
    monkeypatch.setattr(tnf, "CONFIGS", tnf._GPU_CONFIGS)
    monkeypatch.setattr(tnb, "SRC_CONFIGS", tnb._SRC_CONFIGS + tnb._FP32_CONFIGS)
    monkeypatch.setattr(tnb, "INTERPRET", False)
    monkeypatch.setattr(tnf, "INTERPRET", False)
    for module in (tnf, tnb):
        monkeypatch.setattr(module, "sm_count", lambda index: 132)
    monkeypatch.setattr(tnf, "_plan", tnf._plan.__wrapped__)
    yield lambda: [g for rec in recorders for g in rec.grids]


def inputs(n, b, l, d, dtype):
    return (torch.zeros(n, d, dtype=dtype), torch.zeros(b, l, d, dtype=dtype),
            torch.zeros(n, dtype=torch.long), torch.zeros(n, l), torch.zeros(n), torch.zeros(()),
            torch.zeros(n))


# (N, B, L, D): one source against four million targets, four million sources against one
# target, and a wide D
SHAPES = [(1, 2**22, 1, 1), (3, 2**21, 2, 1), (2**22, 1, 1, 1), (2, 2, 3, 65536)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_launch_grid_fits_cuda_limits(launches, shape, dtype):
    n, b, l, d = shape
    src, trg, pos_idx, gp, gn, gs, ns = inputs(n, b, l, d, dtype)
    bwd_args = (gp, gn, gs, src, trg, pos_idx, ns, 20.0, "logsumexp")
    tnf.nce_fwd_triton(src, trg, pos_idx, 20.0, "logsumexp")
    if n * b * l <= 2**23:   # the dense forward holds N x M fp32 scores: only small problems
        tnd.nce_fwd_dense(src, trg, pos_idx, 20.0, "logsumexp")
    tnb.nce_bwd_triton(*bwd_args)
    tgc.nce_bwd_triton_cublas(*bwd_args)
    if l <= 64:
        tmx.mixture_bwd_triton(torch.tensor(1.0), gp.view(n, 1, l), gn.view(n, 1), 1.0, 1.0, True)
    grids = launches()
    assert {name for name, _, _ in grids} >= {"_nce_fwd_split_kernel", "_nce_bwd_src_kernel",
                                             "_nce_bwd_trg_kernel", "_nce_g_kernel"}
    too_large = [(name, cfg, dims) for name, cfg, dims in grids
                 if any(x > limit for x, limit in zip(dims, GRID_LIMITS)) or min(dims) < 1]
    assert not too_large, too_large
