"""The Deep InfoMax objective (docs/losses.md, sections 4 and 5) for amdim.dim_model.DIM.

loss = -(alpha * I_G + beta * I_L) + gamma * (prior generator term) + (prior discriminator's loss),
arranged so that one backward() gives every player its own gradient (see DIMObjective).

MI estimators, for positive pairs P and negative pairs Q of a critic T (no constant 2 log 2):
  "jsd": I = E_P[-softplus(-T)] - E_Q[softplus(T)]
  "dv":  I = E_P[T] - log E_Q[exp(T)]               (one log-mean-exp over all negative pairs)
  "nce": I = E_P[T - log(exp(T) + sum over the positive's negatives of exp(T'))]
Which pairs are negatives, per critic:
  - local, dot product: Y of each image against every location of every other image of the global
    batch (amdim_kernels.fused_nce_loss; for "nce" each positive's negatives are all of those);
  - local, concat-and-convolve: at each location, Y against that location of K other images, drawn
    independently per location as cyclic shifts of the global batch (a derangement per shift:
    a negative is never the positive); K = n_shuffles, by default 1 for "jsd" / "dv" (the seed's one
    shuffle) and min(8, B - 1) for "nce", whose softmax at each location is over the positive and
    its K negatives (a critic pass per shuffle: more is slower);
  - global: Y against the map of every other image of the global batch (all pairs are scored).
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

from .dim_model import LOCAL_ARCHS, PRIORS
from .distributed import gather_rows, world_info

ESTIMATORS = ("jsd", "nce", "dv")
LOSS_BACKENDS = ("fused", "reference")
# DIM(L) and DIM(G) of the DIM paper (section 4): these are its values
PRESETS = {"L": dict(alpha=0.0, beta=1.0, gamma=0.1), "G": dict(alpha=1.0, beta=0.0, gamma=1.0)}
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


def dot_local_mi(src: torch.Tensor, trg_local: torch.Tensor, estimator: str, loss_backend: str = "fused"):
    """Local MI of the dot-product critic: src = psi(Y) (b, D') of this rank, trg_local = phi(C)
    (b, M*M, D') of this rank; scores <src, trg> / sqrt(D') of every Y against every location of
    the global batch, through amdim_kernels.fused_nce_loss (its loss is -I)."""
    if loss_backend not in LOSS_BACKENDS:
        raise ValueError(f"loss_backend must be one of {LOSS_BACKENDS}, got {loss_backend!r}")
    backend = "auto" if loss_backend == "fused" else "reference"
    rank, world = world_info()
    b = src.shape[0]
    if estimator == "dv" and world > 1:
        # the log-mean-exp spans every rank's rows: score the whole global batch on every rank
        # (the gathers' backward sums the identical per-rank gradients; DDP's mean undoes the factor)
        src, pos_idx = gather_rows(src), None
    else:
        pos_idx = torch.arange(b, device=src.device) + rank * b
    loss, _ = ak.fused_nce_loss(src, gather_rows(trg_local), pos_idx, estimator=estimator, tclip=None,
                                reg_weight=0.0, backend=backend)
    return -loss


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
    -(alpha * I_G + beta * I_L); D_phi gets only its own loss, softplus(-D(z)) + softplus(D(Y)) with
    Y detached (it maximises E_z[log D(z)] + E_x[log(1 - D(Y))]); the encoder gets the
    non-saturating generator loss gamma * softplus(-D(Y)), with D_phi evaluated on detached
    parameters. D_phi is trained whenever the model has one, also at gamma = 0 (then only as a
    monitor: the encoder gets no prior gradient).
    n_shuffles: negatives per (Y, location) of the concat critic, capped at B - 1 (see the module
    docstring).
    """

    def __init__(self, alpha: float, beta: float, gamma: float, estimator: str = "jsd",
                 local_arch: str = "dot", prior: str = "uniform", loss_backend: str = "fused", *,
                 n_shuffles: int | None = None):
        self.alpha, self.beta, self.gamma = _real("alpha", alpha), _real("beta", beta), _real("gamma", gamma)
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta are both 0: DIM needs a global (alpha) or local (beta) MI term")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if local_arch not in LOCAL_ARCHS:
            raise ValueError(f"local_arch must be one of {LOCAL_ARCHS}, got {local_arch!r}")
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        if loss_backend not in LOSS_BACKENDS:
            raise ValueError(f"loss_backend must be one of {LOSS_BACKENDS}, got {loss_backend!r}")
        if self.gamma > 0 and prior == "none":
            raise ValueError(f"gamma={gamma!r} > 0 needs a prior to match, got prior='none'")
        if n_shuffles is not None and (isinstance(n_shuffles, bool) or not isinstance(n_shuffles, int)
                                       or n_shuffles < 1):
            raise ValueError(f"n_shuffles must be a positive integer or None, got {n_shuffles!r}")
        if n_shuffles is not None and local_arch != "concat":
            raise ValueError(f"n_shuffles applies to local_arch='concat' only, got local_arch={local_arch!r}")
        self.estimator, self.local_arch, self.prior = estimator, local_arch, prior
        self.loss_backend, self.n_shuffles = loss_backend, n_shuffles

    def model_options(self) -> dict:
        """The DIM(...) keyword arguments that build exactly the critics this objective uses."""
        return dict(local_arch=self.local_arch, prior=self.prior, use_global=self.alpha > 0,
                    use_local=self.beta > 0)

    def _check_model(self, core):
        for name, want in self.model_options().items():
            if getattr(core, name) != want:
                raise ValueError(f"the model was built with {name}={getattr(core, name)!r} but this "
                                 f"objective needs {name}={want!r} (DIM(..., **objective.model_options()))")

    def __call__(self, model, feats: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Returns (loss, parts); parts holds detached scalars: "mi_global" / "global" (= -alpha
        * mi_global) when alpha > 0, "mi_local" / "local" when beta > 0, "prior_gen" (unweighted)
        and "prior_disc" when the model has a prior discriminator."""
        core = getattr(model, "module", model)
        self._check_model(core)
        conv, y = feats["conv"], feats["y"]
        rank, world = world_info()
        b = y.shape[0]
        if b * world < 2:
            raise ValueError(f"DIM needs negative pairs: a global batch of at least 2 images, "
                             f"got {b * world}")
        parts, loss = {}, torch.zeros((), device=y.device)
        use_cols = self.alpha > 0 or (self.beta > 0 and self.local_arch == "concat")
        conv_cols = gather_rows(conv) if use_cols else None
        if self.alpha > 0:
            scores = core.global_scores(conv_cols, y)                          # (b, B)
            is_pos = F.one_hot(torch.arange(b, device=y.device) + rank * b, scores.shape[1]).bool()
            pos = scores[is_pos].view(b, 1)
            neg = scores[~is_pos].view(b, -1, 1)
            mi = critic_mi(pos, neg, self.estimator)
            loss = loss - self.alpha * mi
            parts["mi_global"], parts["global"] = mi.detach(), (-self.alpha * mi).detach()
        if self.beta > 0:
            if self.local_arch == "dot":
                trg, src = core.local_embeddings(conv, y)
                mi = dot_local_mi(src, trg, self.estimator, self.loss_backend)
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
            d_prior, d_y = _acc(core.prior_logits(z)), _acc(core.prior_logits(y.detach()))
            disc = F.softplus(-d_prior).mean() + F.softplus(d_y).mean()
            gen = F.softplus(-_acc(core.prior_logits(y, detach_params=True))).mean()
            loss = loss + self.gamma * gen + disc
            parts["prior_gen"], parts["prior_disc"] = gen.detach(), disc.detach()
        return loss, parts


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The online classifiers' loss of rdevon/DIM (models/classifier.py): cross-entropy over the
    labeled rows (label >= 0)."""
    logits = logits.float()
    labeled = labels >= 0
    return F.cross_entropy(logits[labeled], labels[labeled]) if bool(labeled.any()) else logits.sum() * 0
