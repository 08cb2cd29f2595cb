"""One training step's loss for each method of amdim.train: AMDIM (two augmented views, the
multiscale NCE objective) and Deep InfoMax (plain images by default, global / local MI and prior
matching). Both return what the trainer needs and nothing about optimisers or files."""
from __future__ import annotations

import torch

from .data import augment
from .amdim_objective import MultiscaleNCE, mixture_fn, nce_fn
from .config import AMDIMModelConfig, AMDIMObjectiveConfig, Config, DataConfig, DIMModelConfig, DIMObjectiveConfig
from .dim_objective import DIMObjective


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class AMDIMStep:
    """loss = the multiscale NCE objective of two augmented views (docs/losses.md, section 2)."""

    def __init__(self, model: AMDIMModelConfig, objective: AMDIMObjectiveConfig, data: DataConfig):
        o = objective
        mixture = (mixture_fn(o.loss_backend, o.tclip, o.reg_weight, o.mix_tau, o.mix_alpha)
                   if model.n_mix > 1 else None)
        self.objective = MultiscaleNCE(nce_fn(o.loss_backend, o.tclip, o.reg_weight, o.estimator),
                                       o.costs, o.dense, mixture)
        self.cfg = augment.AugmentConfig(size=data.image_size)

    def __call__(self, model, images, generator, rank, world):
        """(loss, parts, logits), or None when the features are not finite (the caller stops)."""
        x1, x2 = augment.two_views(images, self.cfg, generator, rank, world)
        (f1, f2), logits = model(x1, x2)
        feats1, feats2 = [r.float() for r in f1], [r.float() for r in f2]
        if not _finite(feats1 + feats2):
            return None
        loss, parts = self.objective(feats1, feats2, generator)
        return loss, parts, logits


class DIMStep:
    """loss = -(alpha I_G + beta I_L) + gamma * prior matching (docs/losses.md, section 5), on the
    plain images, or on one augmented view with --dim-augment."""

    def __init__(self, model: DIMModelConfig, objective: DIMObjectiveConfig, data: DataConfig):
        o = objective
        self.objective = DIMObjective(o.alpha, o.beta, o.gamma, o.estimator, model.local_arch, model.prior,
                                      o.loss_backend)
        self.size, self.augment = data.image_size, o.dim_augment
        self.cfg = augment.AugmentConfig(size=data.image_size)

    def __call__(self, model, images, generator, rank, world):
        if self.augment:
            (x,) = augment.views(images, self.cfg, generator, rank, world, count=1)
        else:
            x = augment.resize(augment.to_float(images.to(generator.device)), self.size)
        feats, logits = model(x)
        feats = {k: v.float() for k, v in feats.items()}
        if not _finite(feats.values()):
            return None
        loss, parts = self.objective(model, feats, generator)
        return loss, parts, logits


def make_step(cfg: Config):
    """The step of cfg.method, built from the model, objective and data configs."""
    step = DIMStep if cfg.method == "dim" else AMDIMStep
    return step(cfg.model, cfg.objective, cfg.data)
