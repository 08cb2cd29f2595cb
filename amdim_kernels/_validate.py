"""Argument checks shared by every entry point: one place that says what a valid call is.

Errors name the argument and what was expected (spec section 1, "Edge cases"). Data-dependent
checks (index ranges, one-hot rows, finiteness) read values back from the device, so they are
skipped while torch.compile traces; shapes, dtypes and devices are always checked.
"""
from __future__ import annotations

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(x, name: str, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}")


def check_options(tclip, reg_weight) -> None:
    if tclip is not None:
        if isinstance(tclip, bool) or not isinstance(tclip, (int, float)):
            raise TypeError(f"tclip must be a positive float or None, got {tclip!r}")
        if not tclip > 0 or tclip == float("inf"):
            raise ValueError(f"tclip must be a positive finite float or None, got {tclip!r}")
    if isinstance(reg_weight, bool) or not isinstance(reg_weight, (int, float)):
        raise TypeError(f"reg_weight must be a float >= 0, got {reg_weight!r}")
    if not reg_weight >= 0 or reg_weight == float("inf"):
        raise ValueError(f"reg_weight must be a finite float >= 0, got {reg_weight!r}")


def check_nce_inputs(src, trg, pos_idx, tclip, reg_weight, check_range=True):
    """Validate the arguments of the NCE loss; return pos_idx as an int64 tensor on src's device.

    check_range=False leaves the pos_idx range to check_fused_outputs: the fused kernels never
    index memory with pos_idx (they compare it with column samples), so one device read after
    the kernel can cover both the range and the finiteness checks.
    """
    check_tensor(src, "src", 2, "(N, D)")
    check_tensor(trg, "trg", 3, "(B, L, D)")
    if src.dtype != trg.dtype:
        raise TypeError(f"src and trg must have the same dtype, got src {src.dtype} and trg {trg.dtype}")
    if src.device != trg.device:
        raise ValueError(f"src and trg must be on the same device, got src on {src.device} "
                         f"and trg on {trg.device}")
    n, d = src.shape
    b, l, d_trg = trg.shape
    if d != d_trg:
        raise ValueError(f"src and trg must have the same feature size D, got src (N={n}, D={d}) "
                         f"and trg (B={b}, L={l}, D={d_trg})")
    if n == 0 or b == 0 or l == 0 or d == 0:
        raise ValueError(f"src and trg must be non-empty, got src {tuple(src.shape)} "
                         f"and trg {tuple(trg.shape)}")
    check_options(tclip, reg_weight)
    if pos_idx is None:
        if n != b:
            raise ValueError(f"pos_idx=None means row i's positives are sample i, which needs N == B; "
                             f"got N={n} and B={b}: pass pos_idx")
        return torch.arange(n, device=src.device)
    if not isinstance(pos_idx, torch.Tensor):
        raise TypeError(f"pos_idx must be an integer tensor of shape (N,) or None, "
                        f"got {type(pos_idx).__name__}")
    if pos_idx.dtype.is_floating_point or pos_idx.dtype.is_complex or pos_idx.dtype == torch.bool:
        raise TypeError(f"pos_idx must be an integer tensor (int32 or int64), got {pos_idx.dtype}")
    if pos_idx.shape != (n,):
        raise ValueError(f"pos_idx must have shape (N,) = ({n},), got {tuple(pos_idx.shape)}")
    if pos_idx.device != src.device:
        raise ValueError(f"pos_idx must be on the same device as src ({src.device}), "
                         f"got {pos_idx.device}")
    if check_range and not _tracing():
        _check_range(pos_idx, b)
    return pos_idx.long()


def _check_range(pos_idx, b):
    lo, hi = int(pos_idx.min()), int(pos_idx.max())
    if lo < 0 or hi >= b:
        raise ValueError(f"pos_idx values must lie in [0, B) = [0, {b}), got values in [{lo}, {hi}]")


def raise_non_finite(**tensors) -> None:
    """Called when the scores are not finite: name the input that caused it."""
    for name, x in tensors.items():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
    raise ValueError("the scores <src, trg> / sqrt(D) overflow to Inf: src and trg are finite "
                     "but too large in magnitude")


def check_fused_outputs(pos_idx: torch.Tensor | None, b: int, sumsq: torch.Tensor,
                        **tensors) -> None:
    """After a fused kernel: pos_idx in [0, B) (None: already known), and finite scores. sum(a^2)
    is finite iff every raw score is, so one device read covers all N*M scores and the indices."""
    if _tracing():
        return
    flags = [~torch.isfinite(sumsq)]
    if pos_idx is not None:
        flags.append(((pos_idx < 0) | (pos_idx >= b)).any())
    bad_scores, *bad_index = torch.stack(flags).tolist()
    if any(bad_index):
        _check_range(pos_idx, b)
    if bad_scores:
        raise_non_finite(**tensors)
