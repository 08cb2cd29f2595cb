"""The Deep InfoMax objective (docs/losses.md, sections 4 and 5) for amdim.dim_model.DIM.

loss = -(alpha * I_G + beta * I_L) + gamma * (prior generator term) + (prior discriminator's loss),
arranged so that one backward() gives every player its own gradient (see DIMObjective).

MI estimators, for positive pairs P and negative pairs Q of a critic T (no constant 2 log 2):
  "jsd": I = E_P[-softplus(-T)] - E_Q[softplus(T)]
  "dv":  I = E_P[T] - log E_Q[exp(T)]               (one log-mean-exp over all negative pairs)
  "nce": I = E_P[T - log(exp(T) + sum over the positive's negatives of exp(T'))]
The dot-product critics (rdevon/DIM's) score raw dot products of embeddings (`dot_mi`).
Which pairs are negatives, per critic:
  - local, dot product: Y of each image against every location of every other image of the global
    batch (amdim_kernels.fused_nce_loss; for "nce" each positive's negatives are all of those);
  - local, concat-and-convolve: at each location, Y against that location of K other images, drawn
    independently per location as cyclic shifts of the global batch (a derangement per shift:
    a negative is never the positive); K = n_shuffles, by default 1 for "jsd" / "dv" (the seed's one
    shuffle) and min(8, B - 1) for "nce", whose softmax at each location is over the positive and
    its K negatives (a critic pass per shuffle: more is slower);
  - global (dot product or concatenation): Y against the map of every other image of the global
    batch (all pairs are scored).
Distributed: every rank scores its own Y rows against the global batch's maps (gathered with their
gradient); with DDP's gradient averaging this equals one process on the global batch. The "dv"
log-mean-exp is a global reduction: its per-rank parts are all-gathered (differentiably), so it too
is exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import amdim_kernels as ak

from .config import DIM_PRESETS as PRESETS  # noqa: F401  (DIM(L) and DIM(G) of the DIM paper)
from .config import DIM_PRIOR_GP
from .dim_model import GLOBAL_ARCHS, LOCAL_ARCHS, PRIORS, check_choice
from .distributed import gather_rows, world_info

ESTIMATORS = ("jsd", "nce", "dv")
LOSS_BACKENDS = ("fused", "reference")

NCE_SHUFFLES = 8


def _log_mean_exp_global(x: torch.Tensor) -> torch.Tensor:
    """log mean exp over x on every rank together (differentiable; x has the same size on all)."""
    world = world_info()[1]
    lse = x.logsumexp(dim=0)
    if world > 1:
        lse = gather_rows(lse.reshape(1)).logsumexp(dim=0)
    return lse - math.log(x.numel() * world)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """t in fp32 at least (fp64 stays fp64): critic outputs may be half precision under autocast."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def critic_mi(pos: torch.Tensor, neg: torch.Tensor, estimator: str) -> torch.Tensor:
    """MI lower bound of `estimator` from critic scores: pos (N, L) positive pairs, neg (N, K, L)
    negative pairs, neg[n, :, l] being the negatives of positive (n, l) (K >= 1)."""
    pos, neg = _acc(pos), _acc(neg)
    if estimator == "jsd":
        return -F.softplus(-pos).mean() - F.softplus(neg).mean()
    if estimator == "nce":
        return -F.softplus(neg.logsumexp(dim=1) - pos).mean()
    if estimator == "dv":
        return pos.mean() - _log_mean_exp_global(neg.flatten())
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def dot_mi(src: torch.Tensor, trg: torch.Tensor, estimator: str, loss_backend: str = "fused"):
    """MI of a dot-product critic, scored as rdevon/DIM does: the RAW dot product <src, trg> of every
    src row of this rank against every target of the global batch. src (b, D'): psi(Y) (local) or
    g(Y) (global); trg (b, L, D'): phi(C) at the L = M*M locations (local) or E'(C) with L = 1 (global).

    amdim_kernels.fused_nce_loss scores <src, trg> / sqrt(D'); with src scaled by sqrt(D') first its
    score is <sqrt(D') src, trg> / sqrt(D') = <src, trg> exactly (up to rounding), with no change to
    the kernels. Its loss is -I."""
    check_choice("loss_backend", loss_backend, LOSS_BACKENDS)
    backend = "auto" if loss_backend == "fused" else "reference"
    rank, world = world_info()
    b = src.shape[0]
    src = src * math.sqrt(src.shape[1])                 # raw dot products (see above)
    if estimator == "dv" and world > 1:
        # the log-mean-exp spans every rank's rows: score the whole global batch on every rank
        # (the gathers' backward sums the identical per-rank gradients; DDP's mean undoes the factor)
        src, pos_idx = gather_rows(src), None
    else:
        pos_idx = torch.arange(b, device=src.device) + rank * b
    loss, _ = ak.fused_nce_loss(src, gather_rows(trg), pos_idx, estimator=estimator, tclip=None,
                                reg_weight=0.0, backend=backend)
    return -loss


def gradient_penalty(disc, v: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of v of ||d disc(v_i) / d v_i||^2, with v detached: a penalty on the
    discriminator only (rdevon/DIM functions/gradient_penalty.py, contrastive_gradient_penalty). Its
    double backward runs through D_phi, a plain MLP, never through the fused loss."""
    v = v.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(disc(v).sum(), v, create_graph=True)
    return grad.float().square().sum(1).mean()


def concat_pairing(generator: torch.Generator, b: int, n_locations: int, n_shuffles: int,
                   device: torch.device) -> torch.Tensor:
    """(b, 1 + K, L) global image indices for this rank's rows: [:, 0] the positive (the row's own
    image), [:, k] at location l image (row + s_k(l)) mod B with shifts s_k(l) in [1, B) distinct over
    k. Drawn for the global batch from `generator` (same seed on every rank, same draw)."""
    rank, world = world_info()
    big_b = b * world
    keys = torch.rand((n_locations, big_b - 1), generator=generator, device=generator.device)
    shifts = keys.argsort(dim=1)[:, :n_shuffles].T.to(device) + 1                       # (K, L)
    shifts = torch.cat([shifts.new_zeros(1, n_locations), shifts])                      # (1 + K, L)
    rows = torch.arange(b, device=device) + rank * b
    return (rows[:, None, None] + shifts[None]) % big_b


def _real(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


class DIMObjective:
    """The DIM loss for a DIM model (possibly DDP-wrapped): see the module docstring.

    One backward of the returned loss trains every player: the encoder and the MI critics get
    -(alpha * I_G + beta * I_L); D_phi gets only its own loss, softplus(-D(z)) + softplus(D(v)) with
    v = the prior input of Y (sigmoid(Y) for the uniform prior), detached (it maximises
    E_z[log D(z)] + E_x[log(1 - D(v))]), plus prior_gp * 0.5 * (GP(z) + GP(v)), GP the mean squared
    norm of D_phi's input gradient (rdevon/DIM's discriminator penalty, its weight: see
    amdim.config.DIM_PRIOR_GP); the encoder gets the
    non-saturating generator loss gamma * softplus(-D(v)), with D_phi evaluated on detached
    parameters. D_phi is trained whenever the model has one, also at gamma = 0 (then only as a
    monitor: the encoder gets no prior gradient).
    n_shuffles: negatives per (Y, location) of the concat critic, capped at B - 1 (see the module
    docstring).
    """

    def __init__(self, alpha: float, beta: float, gamma: float, estimator: str = "jsd",
                 local_arch: str = "dot", prior: str = "uniform", loss_backend: str = "fused", *,
                 global_arch: str = "dot", n_shuffles: int | None = None, prior_gp: float = DIM_PRIOR_GP):
        self.alpha, self.beta, self.gamma = _real("alpha", alpha), _real("beta", beta), _real("gamma", gamma)
        self.prior_gp = _real("prior_gp", prior_gp)
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta are both 0: DIM needs a global (alpha) or local (beta) MI term")
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("local_arch", local_arch, LOCAL_ARCHS)
        check_choice("global_arch", global_arch, GLOBAL_ARCHS)
        check_choice("prior", prior, PRIORS)
        check_choice("loss_backend", loss_backend, LOSS_BACKENDS)
        if self.gamma > 0 and prior == "none":
            raise ValueError(f"gamma={gamma!r} > 0 needs a prior to match, got prior='none'")
        if n_shuffles is not None and (isinstance(n_shuffles, bool) or not isinstance(n_shuffles, int)
                                       or n_shuffles < 1):
            raise ValueError(f"n_shuffles must be a positive integer or None, got {n_shuffles!r}")
        if n_shuffles is not None and local_arch != "concat":
            raise ValueError(f"n_shuffles applies to local_arch='concat' only, got local_arch={local_arch!r}")
        self.estimator, self.local_arch, self.global_arch, self.prior = estimator, local_arch, global_arch, prior
        self.loss_backend, self.n_shuffles = loss_backend, n_shuffles

    def model_options(self) -> dict:
        """The DIM(...) keyword arguments that build exactly the critics this objective uses."""
        return dict(local_arch=self.local_arch, global_arch=self.global_arch, prior=self.prior,
                    use_global=self.alpha > 0, use_local=self.beta > 0)

    def _check_model(self, core):
        # a term that is off builds no critic: its architecture is not the model's to match
        off = {name for name, w in (("global_arch", self.alpha), ("local_arch", self.beta)) if w == 0}
        for name, want in self.model_options().items():
            if name not in off and getattr(core, name) != want:
                raise ValueError(f"the model was built with {name}={getattr(core, name)!r} but this "
                                 f"objective needs {name}={want!r} (DIM(..., **objective.model_options()))")

    def __call__(self, model, feats: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Returns (loss, parts); parts holds detached scalars: "mi_global" / "global" (= -alpha
        * mi_global) when alpha > 0, "mi_local" / "local" when beta > 0, "prior_gen" (unweighted),
        "prior_disc" (D_phi's cross-entropy) and "prior_gp" (its unweighted penalty) when the model
        has a prior discriminator."""
        core = getattr(model, "module", model)
        self._check_model(core)
        conv, y = feats["conv"], feats["y"]
        rank, world = world_info()
        b = y.shape[0]
        if b * world < 2:
            raise ValueError(f"DIM needs negative pairs: a global batch of at least 2 images, "
                             f"got {b * world}")
        parts, loss = {}, torch.zeros((), device=y.device)
        use_cols = ((self.alpha > 0 and self.global_arch == "concat")
                    or (self.beta > 0 and self.local_arch == "concat"))
        conv_cols = gather_rows(conv) if use_cols else None
        if self.alpha > 0:
            if self.global_arch == "dot":
                trg, src = core.global_embeddings(conv, y)
                mi = dot_mi(src, trg, self.estimator, self.loss_backend)
            else:
                scores = core.global_scores(conv_cols, y)                      # (b, B)
                is_pos = F.one_hot(torch.arange(b, device=y.device) + rank * b, scores.shape[1]).bool()
                mi = critic_mi(scores[is_pos].view(b, 1), scores[~is_pos].view(b, -1, 1), self.estimator)
            loss = loss - self.alpha * mi
            parts["mi_global"], parts["global"] = mi.detach(), (-self.alpha * mi).detach()
        if self.beta > 0:
            if self.local_arch == "dot":
                trg, src = core.local_embeddings(conv, y)
                mi = dot_mi(src, trg, self.estimator, self.loss_backend)
            else:
                n_loc = conv.shape[2] * conv.shape[3]
                k = self.n_shuffles or (NCE_SHUFFLES if self.estimator == "nce" else 1)
                k = min(k, b * world - 1)
                scores = core.concat_scores(conv_cols, y, concat_pairing(generator, b, n_loc, k, y.device))
                mi = critic_mi(scores[:, 0], scores[:, 1:], self.estimator)
            loss = loss - self.beta * mi
            parts["mi_local"], parts["local"] = mi.detach(), (-self.beta * mi).detach()
        if core.prior_disc is not None:
            shape = (b * world, y.shape[1])
            z = (torch.rand(shape, generator=generator, device=generator.device) if self.prior == "uniform"
                 else torch.randn(shape, generator=generator, device=generator.device))
            z = z[rank * b:(rank + 1) * b].to(device=y.device, dtype=y.dtype)
            v = core.prior_input(y)
            d_prior, d_v = _acc(core.prior_logits(z)), _acc(core.prior_logits(v.detach()))
            disc = F.softplus(-d_prior).mean() + F.softplus(d_v).mean()
            gen = F.softplus(-_acc(core.prior_logits(v, detach_params=True))).mean()
            loss = loss + self.gamma * gen + disc
            if self.prior_gp > 0:
                gp = 0.5 * (gradient_penalty(core.prior_disc, z) + gradient_penalty(core.prior_disc, v))
                loss = loss + self.prior_gp * gp
                parts["prior_gp"] = gp.detach()
            parts["prior_gen"], parts["prior_disc"] = gen.detach(), disc.detach()
        return loss, parts


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The online classifiers' loss of rdevon/DIM (models/classifier.py): cross-entropy over the
    labeled rows (label >= 0)."""
    logits = logits.float()
    labeled = labels >= 0
    return F.cross_entropy(logits[labeled], labels[labeled]) if bool(labeled.any()) else logits.sum() * 0
