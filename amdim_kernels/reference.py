"""Plain PyTorch losses written straight from docs/losses.md: the ground truth for every test.

These materialise the full N x B x L score tensor (several times over, once autograd keeps its
intermediates); they are for checking the fused kernels and for small problems. Argument checks
live in _validate.py; this module is the math. It runs with autocast disabled, so that the
ground truth accumulates in fp32 (fp64 for fp64 inputs) whatever autocast surrounds it, and it
is differentiable to any order (the fused ops are not).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _validate
from ._validate import acc_dtype, softplus


def raw_scores(src: torch.Tensor, trg: torch.Tensor) -> torch.Tensor:
    """a[i, b, l] = <src[i], trg[b, l]> / sqrt(D), accumulated in fp32 (fp64 for fp64 inputs)."""
    acc = acc_dtype(src.dtype)
    b, l, d = trg.shape
    a = src.to(acc) @ trg.to(acc).reshape(b * l, d).T
    return (a / math.sqrt(d)).view(src.shape[0], b, l)


def soft_clip(a: torch.Tensor, tclip: Optional[float]) -> torch.Tensor:
    return a if tclip is None else tclip * torch.tanh(a / tclip)


def positives_and_lse_neg(s: torch.Tensor, pos_idx: torch.Tensor):
    """P[i, l] = s[i, pos_idx[i], l] (N, L) and Z[i] = logsumexp of row i's negatives (N,)."""
    n, b, _ = s.shape
    pos = s[torch.arange(n, device=s.device), pos_idx]               # (N, L)
    if b == 1:   # no negatives: Z = -inf, and the loss term is 0 with zero gradient
        lse_neg = torch.full((n,), -math.inf, dtype=s.dtype, device=s.device)
    else:
        lse_neg = s.masked_fill(_is_positive(pos_idx, b), -math.inf).reshape(n, -1).logsumexp(dim=1)
    return pos, lse_neg


def _is_positive(pos_idx: torch.Tensor, b: int) -> torch.Tensor:
    """(N, B, 1) mask of the positive samples (a comparison: F.one_hot reads pos_idx back)."""
    return (pos_idx[:, None] == torch.arange(b, device=pos_idx.device))[:, :, None]


def _checked_scores(src, trg, pos_idx, strict, names):
    """The raw scores, pos_idx safe to index with, and the device-side flag of what is invalid
    (None in strict mode, where it has been raised instead)."""
    a = raw_scores(src, trg)
    bad = ~torch.isfinite(a).all()
    if strict:
        if bool(bad):
            _validate.raise_non_finite(**names)
        return a, pos_idx, None
    b = trg.shape[0]
    bad = bad | _validate.range_flag(pos_idx, b)
    return a, pos_idx.clamp(0, b - 1), bad


def nce_loss_reference(src: torch.Tensor, trg: torch.Tensor, pos_idx: Optional[torch.Tensor] = None,
                       *, tclip: Optional[float] = 20.0, reg_weight: float = 0.05,
                       estimator: str = "nce", strict: Optional[bool] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """AMDIM NCE loss (docs/losses.md, section 1), or the DIM estimator "jsd" / "dv" (section 4)
    over the same pairs. Returns (loss, lgt_reg), 0-dim tensors; lgt_reg does not depend on the
    estimator.

    src: (N, D); trg: (B, L, D); pos_idx: (N,) ints in [0, B), or None for N == B.
    With B == 1 there are no negative pairs: "nce" gives 0, "jsd" keeps only its positive term,
    "dv" raises ValueError. strict: as in fused_nce_loss (invalid values raise, or give NaN).
    """
    strict = _validate.resolve_strict(strict, src)
    pos_idx = _validate.check_nce_inputs(src, trg, pos_idx, tclip, reg_weight, strict=strict)
    _validate.check_estimator(estimator, trg.shape[0])
    with _validate.autocast_disabled(src.device):
        a, pos_idx, bad = _checked_scores(src, trg, pos_idx, strict, dict(src=src, trg=trg))
        lgt_reg = _validate.regulariser(a.square().mean(), reg_weight)
        s = soft_clip(a, tclip)
        if estimator == "nce":
            pos, lse_neg = positives_and_lse_neg(s, pos_idx)
            loss = softplus(lse_neg[:, None] - pos).mean()
        else:
            loss = _dim_estimator_loss(s, pos_idx, estimator)
    return _validate.poison((loss, lgt_reg), bad)


def _dim_estimator_loss(s, pos_idx, estimator):
    """Section 4 over the full (N, B, L) score tensor s: masked sums rather than selections, so
    that no shape depends on the values of pos_idx (torch.compile)."""
    n, b, l = s.shape
    is_pos = _is_positive(pos_idx, b).expand_as(s)
    n_pos, n_neg = n * l, n * (b - 1) * l
    if estimator == "jsd":   # the mean over no negative pairs (B == 1) counts as 0
        pos_term = softplus(-s).masked_fill(~is_pos, 0.0).sum() / n_pos
        return pos_term + softplus(s).masked_fill(is_pos, 0.0).sum() / max(n_neg, 1)
    pos_mean = s.masked_fill(~is_pos, 0.0).sum() / n_pos                            # "dv"
    return -(pos_mean - (s.masked_fill(is_pos, -math.inf).reshape(-1).logsumexp(dim=0) - math.log(n_neg)))


def mixture_nce_loss_reference(src_mix: torch.Tensor, trg: torch.Tensor,
                               pos_idx: Optional[torch.Tensor] = None, *, tau: float = 1.0,
                               alpha: Optional[float] = None, detach_q: bool = True,
                               tclip: Optional[float] = 20.0, reg_weight: float = 0.05,
                               strict: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture NCE loss (docs/losses.md, section 3). Returns (loss, lgt_reg), 0-dim tensors.

    src_mix: (N, k, D), k components per source; trg, pos_idx as in nce_loss_reference.
    nce_j[i, l] is the NCE per-positive log-probability of component j (own negatives' Z_j[i]);
    q = softmax over j of tau * nce_j; loss = -mean over (i, l) of sum_j q_j nce_j + alpha * H(q),
    alpha = 1 / tau when None. detach_q=True treats q as a constant in the backward.
    lgt_reg = reg_weight * mean of a^2 over all N * k * B * L component scores.
    """
    strict = _validate.resolve_strict(strict, src_mix)
    pos_idx, alpha = _validate.check_mixture_inputs(src_mix, trg, pos_idx, tau, alpha, detach_q,
                                                    tclip, reg_weight, strict=strict)
    n, k, d = src_mix.shape
    with _validate.autocast_disabled(src_mix.device):
        a, pos_idx, bad = _checked_scores(src_mix.reshape(n * k, d), trg, pos_idx, strict,
                                          dict(src_mix=src_mix, trg=trg))
        a = a.view(n, k, *trg.shape[:2])
        nce = []
        for j in range(k):
            pos, lse_neg = positives_and_lse_neg(soft_clip(a[:, j], tclip), pos_idx)
            # section 1, step 6, first form (exact, where F.softplus returns x for x > 20)
            nce.append(pos - torch.logaddexp(pos, lse_neg[:, None]))
        nce = torch.stack(nce, dim=1)                                     # (N, k, L)
        logits = tau * (nce.detach() if detach_q else nce)
        q, log_q = logits.softmax(dim=1), logits.log_softmax(dim=1)
        entropy = -(q * log_q).sum(dim=1)
        objective = (q * nce).sum(dim=1) + alpha * entropy
        loss, lgt_reg = -objective.mean(), _validate.regulariser(a.square().mean(), reg_weight)
    return _validate.poison((loss, lgt_reg), bad)
