"""One training step's loss for each method of amdim.train, side by side: AMDIM (two augmented views,
the multiscale NCE objective) and Deep InfoMax (plain images by default, global / local MI and prior
matching). Each adds its online classifiers' loss (detached features: it trains the classifiers only)
and returns what the trainer needs, nothing about optimisers or files."""
from __future__ import annotations

import torch

from . import amdim_objective, dim_objective
from .amdim_objective import MultiscaleNCE, mixture_fn, nce_fn
from .config import AMDIMModelConfig, AMDIMObjectiveConfig, Config, DataConfig, DIMModelConfig, DIMObjectiveConfig
from .data import augment
from .dim_objective import DIMObjective


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _online(logits: dict, labels, loss_fn) -> tuple[torch.Tensor, dict]:
    """(summed loss, {"cls_<name>", "cls_acc_<name>"}) of the online classifiers (name -> logits);
    accuracies over the labeled rows."""
    labeled = labels >= 0
    total, parts = 0.0, {}
    for name, lg in logits.items():
        loss = loss_fn(lg, labels)
        total = total + loss
        parts[f"cls_{name}"] = loss.detach()
        hit = (lg.detach().argmax(1) == labels)[labeled].float()
        parts[f"cls_acc_{name}"] = hit.mean() if len(hit) else hit.sum()
    return total, parts


class AMDIMStep:
    """loss = the multiscale NCE objective of two augmented views (docs/losses.md, section 2), plus
    the online classifiers' loss on both views' global features (amdim-public's loss_xent)."""

    def __init__(self, model: AMDIMModelConfig, objective: AMDIMObjectiveConfig, data: DataConfig):
        o = objective
        mixture = (mixture_fn(o.loss_backend, o.tclip, o.reg_weight, o.mix_tau, o.mix_alpha)
                   if model.n_mix > 1 else None)
        self.objective = MultiscaleNCE(nce_fn(o.loss_backend, o.tclip, o.reg_weight, o.estimator),
                                       o.costs, o.dense, mixture)
        self.policy, self.size = data.policy, data.image_size

    def __call__(self, model, images, labels, generator, rank, world):
        """(loss, parts), or None when the features are not finite (the caller stops)."""
        x1, x2 = augment.views(images, self.policy, self.size, generator, rank, world, count=2)
        (f1, f2), logits = model(x1, x2)
        feats1, feats2 = [r.float() for r in f1], [r.float() for r in f2]
        if not _finite(feats1 + feats2):
            return None
        loss, parts = self.objective(feats1, feats2, generator)
        parts = {"loss": loss.detach(), **parts}
        cls, cls_parts = _online(logits, torch.cat([labels, labels]), amdim_objective.classifier_loss)
        return loss + cls, {**parts, **cls_parts}


class DIMStep:
    """loss = -(alpha I_G + beta I_L) + gamma * prior matching (docs/losses.md, section 5), on one
    view of each image (with policy "none": the plain image); plus the online classifiers' loss."""

    def __init__(self, model: DIMModelConfig, objective: DIMObjectiveConfig, data: DataConfig):
        o = objective
        self.objective = DIMObjective(o.alpha, o.beta, o.gamma, o.estimator, model.local_arch, model.prior,
                                      o.loss_backend, global_arch=model.global_arch, prior_gp=o.prior_gp)
        self.policy, self.size = data.policy, data.image_size

    def __call__(self, model, images, labels, generator, rank, world):
        (x,) = augment.views(images, self.policy, self.size, generator, rank, world, count=1)
        feats, logits = model(x)
        feats = {k: v.float() for k, v in feats.items()}
        if not _finite(feats.values()):
            return None
        loss, parts = self.objective(model, feats, generator)
        parts = {"loss": loss.detach(), **parts}
        cls, cls_parts = _online(logits, labels, dim_objective.classifier_loss)
        return loss + cls, {**parts, **cls_parts}


def make_step(cfg: Config):
    """The step of cfg.method, built from the model, objective and data configs."""
    step = DIMStep if cfg.method == "dim" else AMDIMStep
    return step(cfg.model, cfg.objective, cfg.data)
