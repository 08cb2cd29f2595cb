"""nn.Module wrappers of the losses, for models that hold their loss as a submodule (as with
torch.nn.CrossEntropyLoss). Options are checked when the module is built; forward takes tensors."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _validate
from .nce import BACKENDS, fused_mixture_nce_loss, fused_nce_loss


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class NCELoss(nn.Module):
    """fused_nce_loss as a module: forward(src (N, D), trg (B, L, D), pos_idx=None) returns
    (loss, lgt_reg). estimator "nce" (AMDIM), "jsd" or "dv" (DIM); backend "auto", "cpp",
    "triton" or "reference"; strict as in fused_nce_loss."""

    def __init__(self, tclip: Optional[float] = 20.0, reg_weight: float = 0.05,
                 estimator: str = "nce", backend: str = "auto", strict: Optional[bool] = None):
        super().__init__()
        _validate.check_options(tclip, reg_weight)
        _validate.check_estimator(estimator, 2)
        _check_backend(backend)
        if strict is not None and not isinstance(strict, bool):
            raise TypeError(f"strict must be True, False or None, got {strict!r}")
        self.tclip, self.reg_weight, self.estimator = tclip, reg_weight, estimator
        self.backend, self.strict = backend, strict

    def forward(self, src: torch.Tensor, trg: torch.Tensor,
                pos_idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_nce_loss(src, trg, pos_idx, tclip=self.tclip, reg_weight=self.reg_weight,
                              estimator=self.estimator, backend=self.backend, strict=self.strict)

    def extra_repr(self) -> str:
        return (f"tclip={self.tclip}, reg_weight={self.reg_weight}, estimator={self.estimator!r}, "
                f"backend={self.backend!r}, strict={self.strict}")


class MixtureNCELoss(nn.Module):
    """fused_mixture_nce_loss as a module: forward(src_mix (N, k, D), trg (B, L, D), pos_idx=None)
    returns (loss, lgt_reg)."""

    def __init__(self, tau: float = 1.0, alpha: Optional[float] = None, detach_q: bool = True,
                 tclip: Optional[float] = 20.0, reg_weight: float = 0.05, backend: str = "auto",
                 strict: Optional[bool] = None):
        super().__init__()
        # the option checks of the loss, on a valid dummy problem
        probe = torch.zeros(1, 1, 1)
        _validate.check_mixture_inputs(probe, probe, None, tau, alpha, detach_q, tclip,
                                       reg_weight, strict=False)
        _check_backend(backend)
        if strict is not None and not isinstance(strict, bool):
            raise TypeError(f"strict must be True, False or None, got {strict!r}")
        self.tau, self.alpha, self.detach_q = tau, alpha, detach_q
        self.tclip, self.reg_weight, self.backend, self.strict = tclip, reg_weight, backend, strict

    def forward(self, src_mix: torch.Tensor, trg: torch.Tensor,
                pos_idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_mixture_nce_loss(src_mix, trg, pos_idx, tau=self.tau, alpha=self.alpha,
                                      detach_q=self.detach_q, tclip=self.tclip,
                                      reg_weight=self.reg_weight, backend=self.backend,
                                      strict=self.strict)

    def extra_repr(self) -> str:
        alpha = "1/tau" if self.alpha is None else self.alpha
        return (f"tau={self.tau}, alpha={alpha}, detach_q={self.detach_q}, tclip={self.tclip}, "
                f"reg_weight={self.reg_weight}, backend={self.backend!r}, strict={self.strict}")
