"""The multiscale AMDIM objective (docs/losses.md, section 2) over amdim_kernels' NCE op.

Distributed training: every rank's sources (its local rows) are scored against the targets of the
GLOBAL batch, gathered with their gradient (amdim.distributed.gather_rows); row i of rank r has
its positives at global sample r * local_batch + i. With DDP averaging the parameter gradients,
the result equals single-process training on the global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import amdim_kernels as ak

from .distributed import gather_rows, world_info

COSTS = ("1t5", "1t7", "5t5", "5t7", "7t7")
DEFAULT_COSTS = ("1t5", "1t7", "5t5")
LOSS_BACKENDS = ("reference", "fused")
ESTIMATORS = ("nce", "jsd", "dv")


def _backend(loss_backend):
    if loss_backend not in LOSS_BACKENDS:
        raise ValueError(f"loss_backend must be one of {LOSS_BACKENDS}, got {loss_backend!r}")
    return "reference" if loss_backend == "reference" else "auto"


def nce_fn(loss_backend: str, tclip: float | None, reg_weight: float, estimator: str = "nce"):
    """Return f(src, trg, pos_idx) -> (loss, lgt_reg) through the public API of amdim_kernels:
    "reference" is the plain PyTorch loss, "fused" the kernels chosen for the tensors' device.
    estimator: "nce" (AMDIM), or DIM's "jsd" / "dv" bounds over the same positive/negative pairs.
    The options are checked here (amdim_kernels.NCELoss checks them when built), not at the first call."""
    backend = _backend(loss_backend)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return ak.NCELoss(tclip=tclip, reg_weight=reg_weight, estimator=estimator, backend=backend)


def mixture_fn(loss_backend: str, tclip: float | None, reg_weight: float, tau: float = 1.0,
               alpha: float | None = None, detach_q: bool = True):
    """Return f(src_mix (N, k, D), trg, pos_idx) -> (loss, lgt_reg): the mixture NCE loss (options
    checked here, by amdim_kernels.MixtureNCELoss)."""
    backend = _backend(loss_backend)
    return ak.MixtureNCELoss(tau=tau, alpha=alpha, detach_q=detach_q, tclip=tclip, reg_weight=reg_weight,
                             backend=backend)


def parse_costs(spec: str) -> tuple[str, ...]:
    """'1t5,1t7,5t5' -> ('1t5', '1t7', '5t5'); each name at most once."""
    names = tuple(c.strip() for c in spec.split(",") if c.strip())
    bad = [c for c in names if c not in COSTS]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"costs must be a comma-separated list of distinct names from {COSTS}, got {spec!r}")
    return names


def as_targets(r: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) feature map -> (B, h*w, D) targets, contiguous for the kernels."""
    return r.flatten(2).transpose(1, 2).contiguous()


class MultiscaleNCE:
    """total = sum of the selected costs (each averaged over both directions) + lgt_reg, where
    lgt_reg is combined the same way: 0.5 * the sum of every call's (amdim-public costs.py).

    `dense` uses every location of a 5x5 / 7x7 source map (N = B*25 or B*49 rows); otherwise one
    location per image is drawn uniformly from `generator`, which must be seeded the same on every
    rank: locations are drawn for the global batch and each rank takes its slice, so a K-rank run
    draws exactly what a 1-rank run on the global batch draws.
    `mixture` (a mixture_fn): the 1->L costs use the k mixture components of r1 (the 4th feature)
    as sources, as in AMDIM's mixture-based representations.
    """

    def __init__(self, nce, costs=DEFAULT_COSTS, dense=False, mixture=None):
        self.nce, self.costs, self.dense, self.mixture = nce, tuple(costs), dense, mixture

    def _sources(self, r, scale, rank, world, generator):
        b, d = r.shape[:2]
        if scale == 1:
            return r.flatten(1), torch.arange(b, device=r.device)
        flat = as_targets(r)                                        # (b, L, D)
        ell = flat.shape[1]
        if self.dense:
            return flat.reshape(b * ell, d), torch.arange(b, device=r.device).repeat_interleave(ell)
        loc = torch.randint(ell, (b * world,), generator=generator, device=generator.device)
        loc = loc[rank * b:(rank + 1) * b].to(r.device)
        return flat[torch.arange(b, device=r.device), loc], torch.arange(b, device=r.device)

    def __call__(self, feats1, feats2, generator):
        """feats1/feats2: (r1, r5, r7[, r1 mixture components]) of view 1 / view 2, this rank's rows.

        Returns (total, parts) where parts maps each cost name and 'lgt_reg' to a detached scalar.
        """
        rank, world = world_info()
        if self.mixture is not None and (len(feats1) != 4 or len(feats2) != 4):
            raise ValueError("the mixture objective needs (r1, r5, r7, r1 mixture components) per view")
        by_scale = ({1: feats1[0], 5: feats1[1], 7: feats1[2]}, {1: feats2[0], 5: feats2[1], 7: feats2[2]})
        targets = {}   # (view, scale) -> gathered (B_global, L, D); reused across costs
        parts, regs, total = {}, [], 0.0
        for cost in self.costs:
            s_scale, t_scale = int(cost[0]), int(cost[2])
            cost_loss = 0.0
            for src_view, trg_view in ((0, 1), (1, 0)):
                src, row_sample = self._sources(by_scale[src_view][s_scale], s_scale, rank, world, generator)
                key = (trg_view, t_scale)
                if key not in targets:
                    targets[key] = gather_rows(as_targets(by_scale[trg_view][t_scale]))
                b_local = by_scale[src_view][s_scale].shape[0]
                if s_scale == 1 and self.mixture is not None:
                    src_mix = (feats1, feats2)[src_view][3]
                    loss, reg = self.mixture(src_mix, targets[key], row_sample + rank * b_local)
                else:
                    loss, reg = self.nce(src, targets[key], row_sample + rank * b_local)
                cost_loss = cost_loss + 0.5 * loss
                regs.append(reg)
            parts[cost] = cost_loss.detach()
            total = total + cost_loss
        lgt_reg = 0.5 * torch.stack(regs).sum()   # each cost's two directions averaged, costs summed
        parts["lgt_reg"] = lgt_reg.detach()
        return total + lgt_reg, parts


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The online classifiers' loss of amdim-public (costs.py loss_xent): cross-entropy of the
    logits soft-clipped to (-10, 10), over the labeled rows (label >= 0), plus 1e-3 * the mean
    squared logit over all rows."""
    logits = logits.float()
    labeled = labels >= 0
    clipped = 10.0 * torch.tanh(logits[labeled] / 10.0)
    xent = F.cross_entropy(clipped, labels[labeled]) if bool(labeled.any()) else logits.sum() * 0
    return xent + 1e-3 * logits.square().mean()
