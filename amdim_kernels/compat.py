"""Drop-in replacements for the loss functions of the public AMDIM code (costs.py)."""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate
from .nce import _fused_nce_loss


def g2l_loss(r_src: torch.Tensor, r_trg: torch.Tensor, mask_mat: torch.Tensor,
             tclip: Optional[float] = 20.0, *, strict: Optional[bool] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """NCE_MI_MULTI._loss_g2l of the public AMDIM code, fused: returns (loss, lgt_reg).

    r_src: (N, D); r_trg: (D, B*L), column b*L + l; mask_mat: (N, B), float or bool, with exactly
    one 1 (True) per row, at the sample that holds row i's positives. lgt_reg uses the public
    code's weight 0.05. strict: as in fused_nce_loss; a mask row that is not one-hot raises
    in strict mode and gives NaN otherwise.
    """
    strict = _validate.resolve_strict(strict, r_src)
    _validate.check_tensor(r_src, "r_src", 2, "(N, D)")
    _validate.check_tensor(r_trg, "r_trg", 2, "(D, B*L)")
    if isinstance(mask_mat, torch.Tensor):
        _validate.check_strided(mask_mat, "mask_mat")
    if not isinstance(mask_mat, torch.Tensor) or mask_mat.dim() != 2:
        raise ValueError(f"mask_mat must be a 2-D tensor (N, B), got "
                         f"{tuple(mask_mat.shape) if isinstance(mask_mat, torch.Tensor) else type(mask_mat).__name__}")
    if mask_mat.dtype.is_complex:
        raise TypeError(f"mask_mat must be a real or bool tensor, got {mask_mat.dtype}")
    n, d = r_src.shape
    if mask_mat.shape[0] != n:
        raise ValueError(f"mask_mat must have N = {n} rows (one per r_src row), got {tuple(mask_mat.shape)}")
    if r_trg.shape[0] != d:
        raise ValueError(f"r_trg must be (D, B*L) with D = {d} (r_src's feature size), got {tuple(r_trg.shape)}")
    b = mask_mat.shape[1]
    if b == 0 or r_trg.shape[1] % b:
        raise ValueError(f"r_trg's {r_trg.shape[1]} columns must be B*L for B = {b} (mask_mat's columns)")
    if n == 0 or d == 0 or r_trg.shape[1] == 0:
        raise ValueError(f"r_src and r_trg must be non-empty, got r_src {tuple(r_src.shape)} and "
                         f"r_trg {tuple(r_trg.shape)}")
    if mask_mat.device != r_src.device:
        raise ValueError(f"mask_mat must be on r_src's device ({r_src.device}), got {mask_mat.device}")
    one_hot = ((mask_mat == 0) | (mask_mat == 1)).all(dim=1) & (mask_mat.sum(dim=1) == 1)
    if strict and not bool(one_hot.all()):
        bad = int((~one_hot).nonzero()[0])
        raise ValueError(f"mask_mat rows must be one-hot (exactly one 1, zeros elsewhere); "
                         f"row {bad} is {mask_mat[bad].tolist()}")
    # the column of each row's 1 (argmax takes no bool tensors)
    pos_idx = (mask_mat == 1).to(torch.uint8).argmax(dim=1)
    trg = r_trg.t().reshape(b, r_trg.shape[1] // b, d)
    out = _fused_nce_loss(r_src, trg, pos_idx, tclip, 0.05, "nce", "auto", strict,
                          src_name="r_src", trg_name="r_trg")
    return _validate.poison(out, None if strict else ~one_hot.all())
