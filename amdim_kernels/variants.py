"""Which kernels compute a problem on CUDA: one forward and one backward variant per problem.

Forward (the CUDA kernel of nce_fwd):
- "tiled": the Triton split kernel (triton_nce_fwd.py): score tiles in registers, nothing N x M;
- "dense": cuBLAS writes the N x M fp32 scores, one Triton kernel reduces them
  (triton_nce_dense.py): for small problems, where holding the matrix is cheap.
Backward (the CUDA kernel of nce_bwd):
- "cuda": the CUDA C++ kernel (csrc/cuda; needs nvcc, built on first use);
- "triton": the Triton row- and column-parallel kernels (triton_nce_bwd.py), nothing N x M;
- "triton_cublas": a Triton kernel writes the score gradient g in the input dtype, tile by tile
  within a memory budget, and cuBLAS forms g @ trg and g^T @ src (triton_nce_bwd_cublas.py).

AMDIM_KERNELS_CUDA_FWD=tiled|dense and AMDIM_KERNELS_CUDA_BWD=cuda|triton|triton_cublas fix a
variant for every problem; unset, the committed table (auto_table.py, measured on a GPU by
benchmarks/gpu_check.sh) picks by size among the available ones.

The loss around them (softplus, means, lgt_reg, NaN poisoning): "fused" (default) computes it in
the loss op's Triton programs (nce_loss_op.py: 2 launches forward, 4 backward), "torch" composes it
from torch ops as on the CPU (~20 launches), AMDIM_KERNELS_CUDA_EPILOGUE=fused|torch, so that a GPU
run can measure what the fusion saves.
"""
from __future__ import annotations

import functools
import os

import torch

from . import auto_table

FWD_VARIANTS = ("tiled", "dense")
BWD_VARIANTS = ("cuda", "triton", "triton_cublas")
EPILOGUES = ("fused", "torch")
FWD_ENV, BWD_ENV = "AMDIM_KERNELS_CUDA_FWD", "AMDIM_KERNELS_CUDA_BWD"
EPILOGUE_ENV = "AMDIM_KERNELS_CUDA_EPILOGUE"
# CPU: "forward" (default) forms the gradient in the forward where a backward follows (three
# products, memory held in between), "backward" recomputes the scores there (four, none held)
CPU_GRADIENTS = ("forward", "backward")
CPU_GRADIENT_ENV = "AMDIM_KERNELS_CPU_GRADIENT"


def env_choice(env: str, allowed: tuple[str, ...], value: str | None = None) -> str | None:
    """The variant an environment variable fixes (None when unset or empty); a ValueError naming
    the variable and the choices for anything else."""
    value = os.environ.get(env) if value is None else value
    if not value:
        return None
    if value not in allowed:
        raise ValueError(f"{env} must be one of {', '.join(allowed)} (or unset for the default), "
                         f"got {value!r}")
    return value


def table_choice(n: int, m: int, d: int, dtype: torch.dtype, available: frozenset[str],
                 rules=None) -> tuple[str, str]:
    """(forward, backward) of the first rule of the table that matches the problem; the backward
    is the rule's first preference that is available."""
    name = str(dtype).removeprefix("torch.")
    for rule in auto_table.RULES if rules is None else rules:
        if ("dtypes" in rule and name not in rule["dtypes"]) or n * m > rule.get("max_nm", n * m) \
                or d < rule.get("min_d", d) or d > rule.get("max_d", d):
            continue
        bwd = next((v for v in rule["bwd"] if v in available), None)
        if bwd is not None:
            return rule["fwd"], bwd
    return "tiled", "triton"   # always available where the CUDA kernels are registered


class Selection:
    """The variants in force: fixed by the environment, or by the table among those available."""

    def __init__(self, available_bwd: frozenset[str], fwd: str | None, bwd: str | None,
                 epilogue: str | None = None):
        self.available_bwd, self.fwd, self.bwd = available_bwd, fwd, bwd
        self.epilogue = epilogue or "fused"
        self.choose = functools.lru_cache(maxsize=1024)(self._choose)

    def _choose(self, n: int, m: int, d: int, dtype: torch.dtype) -> tuple[str, str]:
        fwd, bwd = table_choice(n, m, d, dtype, self.available_bwd)
        return self.fwd or fwd, self.bwd or bwd

    def describe(self) -> str:
        fixed = lambda v, env: f"{v} ({env})" if v else "by size (auto_table.py)"   # noqa: E731
        return (f"forward {fixed(self.fwd, FWD_ENV)}, backward {fixed(self.bwd, BWD_ENV)}, "
                f"epilogue {self.epilogue}; backward variants available: "
                f"{', '.join(sorted(self.available_bwd))}")
