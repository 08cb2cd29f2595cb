"""Plain PyTorch losses written straight from shared/spec/losses.md: the ground truth for every test.

These materialise the full N x B x L score tensor (several times over, once autograd keeps its
intermediates); they are for checking the fused kernels and for small problems.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _validate


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and output dtype: fp32, or fp64 for fp64 inputs (so gradcheck is meaningful)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def raw_scores(src: torch.Tensor, trg: torch.Tensor) -> torch.Tensor:
    """a[i, b, l] = <src[i], trg[b, l]> / sqrt(D), accumulated in fp32 (fp64 for fp64 inputs)."""
    acc = acc_dtype(src.dtype)
    b, l, d = trg.shape
    a = src.to(acc) @ trg.to(acc).reshape(b * l, d).T
    return (a / math.sqrt(d)).view(src.shape[0], b, l)


def soft_clip(a: torch.Tensor, tclip: float | None) -> torch.Tensor:
    return a if tclip is None else tclip * torch.tanh(a / tclip)


ESTIMATORS = ("nce", "jsd", "dv")


def check_estimator(estimator, b: int) -> None:
    """estimator names one of spec section 4's losses; "dv" needs negative pairs (B >= 2)."""
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "dv" and b == 1:
        # log of the mean of exp over an empty set: the DV bound is undefined without negatives.
        raise ValueError("estimator='dv' needs negative pairs, i.e. B >= 2 target samples, got B=1")


def positives_and_lse_neg(s, pos_idx):
    """P[i, l] = s[i, pos_idx[i], l] (N, L) and Z[i] = logsumexp of row i's negatives (N,)."""
    n, b, _ = s.shape
    pos = s[torch.arange(n, device=s.device), pos_idx]               # (N, L)
    if b == 1:   # no negatives: Z = -inf, and the loss term is 0 with zero gradient
        lse_neg = torch.full((n,), -math.inf, dtype=s.dtype, device=s.device)
    else:
        is_pos = F.one_hot(pos_idx, b).bool()[:, :, None]            # (N, B, 1)
        lse_neg = s.masked_fill(is_pos, -math.inf).reshape(n, -1).logsumexp(dim=1)
    return pos, lse_neg


def checked_scores(src, trg, src_name="src"):
    a = raw_scores(src, trg)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(a).all()):
        _validate.raise_non_finite(**{src_name: src}, trg=trg)
    return a


def nce_loss_reference(src, trg, pos_idx=None, *, tclip=20.0, reg_weight=0.05, estimator="nce"):
    """AMDIM NCE loss (spec section 1), or the DIM estimator "jsd" / "dv" (spec section 4) over the
    same pairs. Returns (loss, lgt_reg), 0-dim tensors; lgt_reg does not depend on the estimator.

    src: (N, D); trg: (B, L, D); pos_idx: (N,) ints in [0, B), or None for N == B.
    With B == 1 there are no negative pairs: "nce" gives 0, "jsd" keeps only its positive term,
    "dv" raises ValueError.
    """
    pos_idx = _validate.check_nce_inputs(src, trg, pos_idx, tclip, reg_weight)
    check_estimator(estimator, trg.shape[0])
    a = checked_scores(src, trg)
    lgt_reg = reg_weight * a.square().mean()
    s = soft_clip(a, tclip)
    if estimator != "nce":
        return _dim_estimator_loss(s, pos_idx, estimator), lgt_reg
    pos, lse_neg = positives_and_lse_neg(s, pos_idx)
    loss = F.softplus(lse_neg[:, None] - pos).mean()
    return loss, lgt_reg


def softplus(x):
    """log(1 + e^x), exact for every x (F.softplus returns x itself for x > 20)."""
    return torch.logaddexp(x, x.new_zeros(()))


def _dim_estimator_loss(s, pos_idx, estimator):
    """Spec section 4 over the full (N, B, L) score tensor s."""
    is_pos = F.one_hot(pos_idx, s.shape[1]).bool()[:, :, None].expand_as(s)
    s_pos, s_neg = s[is_pos], s[~is_pos]
    if estimator == "jsd":
        neg_term = softplus(s_neg).mean() if s_neg.numel() else s.new_zeros(())
        return softplus(-s_pos).mean() + neg_term
    return -(s_pos.mean() - (s_neg.logsumexp(dim=0) - math.log(s_neg.numel())))   # "dv"


def check_mixture_inputs(src_mix, trg, pos_idx, tau, alpha, detach_q, tclip, reg_weight):
    """Validate the arguments of the mixture NCE loss; return (pos_idx as int64, alpha as a float)."""
    _validate.check_tensor(src_mix, "src_mix", 3, "(N, k, D)")
    _validate.check_tensor(trg, "trg", 3, "(B, L, D)")
    n, k, d = src_mix.shape
    if k == 0:
        raise ValueError(f"src_mix must have k >= 1 mixture components, got shape {tuple(src_mix.shape)}")
    if src_mix.dtype != trg.dtype:
        raise TypeError(f"src_mix and trg must have the same dtype, got src_mix {src_mix.dtype} "
                        f"and trg {trg.dtype}")
    if src_mix.device != trg.device:
        raise ValueError(f"src_mix and trg must be on the same device, got src_mix on "
                         f"{src_mix.device} and trg on {trg.device}")
    if d != trg.shape[2]:
        raise ValueError(f"src_mix and trg must have the same feature size D, got src_mix "
                         f"(N={n}, k={k}, D={d}) and trg {tuple(trg.shape)}")
    if n == 0 or d == 0:
        raise ValueError(f"src_mix must be non-empty, got shape {tuple(src_mix.shape)}")
    def is_real(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not is_real(tau):
        raise TypeError(f"tau must be a float, got {tau!r}")
    if alpha is not None and not is_real(alpha):
        raise TypeError(f"alpha must be a float or None, got {alpha!r}")
    if not 0 < tau < math.inf:
        raise ValueError(f"tau must be a positive finite float, got {tau!r}")
    alpha = 1.0 / tau if alpha is None else alpha
    if not 0 <= alpha < math.inf:
        raise ValueError(f"alpha must be a finite float >= 0 or None (1 / tau), got {alpha!r}")
    if not isinstance(detach_q, bool):
        raise TypeError(f"detach_q must be a bool, got {detach_q!r}")
    pos_idx = _validate.check_nce_inputs(src_mix[:, 0], trg, pos_idx, tclip, reg_weight)
    return pos_idx, float(alpha)


def mixture_nce_loss_reference(src_mix, trg, pos_idx=None, *, tau=1.0, alpha=None, detach_q=True,
                               tclip=20.0, reg_weight=0.05):
    """Mixture NCE loss (spec section 3). Returns (loss, lgt_reg), 0-dim tensors.

    src_mix: (N, k, D), k components per source; trg, pos_idx as in nce_loss_reference.
    nce_j[i, l] is the NCE per-positive log-probability of component j (own negatives' Z_j[i]);
    q = softmax over j of tau * nce_j; loss = -mean over (i, l) of sum_j q_j nce_j + alpha * H(q),
    alpha = 1 / tau when None. detach_q=True treats q as a constant in the backward.
    lgt_reg = reg_weight * mean of a^2 over all N * k * B * L component scores.
    """
    pos_idx, alpha = check_mixture_inputs(src_mix, trg, pos_idx, tau, alpha, detach_q, tclip,
                                          reg_weight)
    n, k, d = src_mix.shape
    a = checked_scores(src_mix.reshape(n * k, d), trg, "src_mix").view(n, k, *trg.shape[:2])
    nce = []
    for j in range(k):
        pos, lse_neg = positives_and_lse_neg(soft_clip(a[:, j], tclip), pos_idx)
        # spec section 1, step 6, first form (exact, where F.softplus returns x for x > 20)
        nce.append(pos - torch.logaddexp(pos, lse_neg[:, None]))
    nce = torch.stack(nce, dim=1)                                     # (N, k, L)
    logits = tau * (nce.detach() if detach_q else nce)
    q, log_q = logits.softmax(dim=1), logits.log_softmax(dim=1)
    entropy = -(q * log_q).sum(dim=1)
    objective = (q * nce).sum(dim=1) + alpha * entropy
    return -objective.mean(), reg_weight * a.square().mean()
