"""The optimiser of amdim.train and its learning-rate schedule (amdim.config.OptimConfig).

One Adam over every parameter (encoder, critics, prior discriminator, online classifiers): Adam is
per parameter, so this equals one Adam per network with the same settings (rdevon/DIM's cortex
builds one per network). Weight decay is Adam's L2 term, as torch.optim.Adam(weight_decay=...) in
amdim-public.

The rate of a step is `lr * warm-up * decay`: a linear warm-up over the first `warmup_steps` updates,
`min(1, (u + 1) / warmup_steps)` for update u (amdim-public's 500-update warm-up), and a step decay by
`lr_decay` once each epoch milestone has passed (amdim-public's MultiStepLR). A function of the update
count and the epoch only, so a resumed run continues the same schedule.
"""
from __future__ import annotations

import torch

from .config import OptimConfig


def build(params, cfg: OptimConfig) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, weight_decay=cfg.weight_decay)


def lr_at(cfg: OptimConfig, update: int, epoch: int) -> float:
    """The learning rate of update `update` (0-based, counted over the whole run) in epoch `epoch`
    (0-based): decayed once per milestone m <= epoch, i.e. after m epochs. (amdim-public calls
    scheduler.step(epoch) after epoch `epoch`, which decays one epoch later: from epoch m + 1.)"""
    warm = min(1.0, (update + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decays = sum(1 for m in cfg.lr_milestones if m <= epoch)
    return cfg.lr * warm * cfg.lr_decay ** decays


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, update: int, epoch: int) -> float:
    lr = lr_at(cfg, update, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
