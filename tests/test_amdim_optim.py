"""The optimiser and learning-rate schedule of amdim.train against amdim-public's
(task_self_supervised.py) and cortex's (optimizer.py) written out by hand."""
import dataclasses

import pytest
import torch

from amdim import optim
from amdim.config import resolve


def _official_amdim_lr(base, update, epoch, milestones=(250, 280), gamma=0.2):
    """amdim-public: lr_scale = min(1, (u + 1) / 500) for the first 500 updates, MultiStepLR(gamma 0.2)
    stepped with the finished epoch's index (so the rate decays one epoch after a milestone)."""
    lr = base * gamma ** sum(1 for m in milestones if m < epoch)
    return min(1.0, (update + 1) / 500) * base if update < 500 else lr


def test_amdim_optimiser_is_amdim_publics():
    cfg = resolve({"epochs": 300}).optim
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.warmup_steps) == (2e-4, (0.8, 0.999), 1e-5, 500)
    assert cfg.lr_milestones == (250, 280) and cfg.lr_decay == 0.2
    adam = optim.build([torch.nn.Parameter(torch.zeros(3))], cfg)
    group = adam.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.8, 0.999), 1e-5, 1e-8)
    for update, epoch in [(0, 0), (1, 0), (249, 0), (499, 1), (500, 2), (10_000, 249), (10_000, 250),
                          (10_000, 251), (10_000, 281), (10_000, 299)]:
        ours = optim.lr_at(cfg, update, epoch)
        # ours decays after m epochs, amdim-public one epoch later: compare at the same decay count
        official = _official_amdim_lr(2e-4, update, epoch + (1 if epoch in (250, 280) else 0))
        assert ours == pytest.approx(official, rel=1e-12), (update, epoch)
    assert optim.lr_at(cfg, 10_000, 250) == pytest.approx(2e-4 * 0.2)
    assert optim.lr_at(cfg, 10_000, 280) == pytest.approx(2e-4 * 0.04)


def test_milestones_default_to_the_official_fractions_of_the_run():
    assert resolve({"epochs": 30}).optim.lr_milestones == (25, 28)
    assert resolve({"epochs": 30, "lr_milestones": (10,)}).optim.lr_milestones == (10,)
    assert resolve({"method": "dim", "epochs": 30}).optim.lr_milestones == ()


def test_dim_optimiser_is_cortexs():
    cfg = resolve({"method": "dim"}).optim
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.warmup_steps, cfg.lr_milestones) == (1e-4, (0.5, 0.999), 0.0, 0, ())
    assert all(optim.lr_at(cfg, u, e) == 1e-4 for u, e in [(0, 0), (5000, 40)])


def test_set_lr_reaches_every_group():
    cfg = dataclasses.replace(resolve({}).optim, warmup_steps=4)
    adam = torch.optim.Adam([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                             {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1.0)
    assert optim.set_lr(adam, cfg, 1, 0) == pytest.approx(cfg.lr / 2)
    assert [g["lr"] for g in adam.param_groups] == [pytest.approx(cfg.lr / 2)] * 2
