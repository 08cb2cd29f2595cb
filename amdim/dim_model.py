"""Deep InfoMax (Hjelm et al. 2019): the encoder E = f o C, its mutual-information critics and the
prior discriminator, as one nn.Module (so DDP wraps, and checkpoints hold, all of them).

The objective that trains them is amdim.dim_objective.DIMObjective; docs/dim.md says which choice
comes from where. Only the critics an objective uses are built: under DDP every parameter must get
a gradient at every step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .amdim_model import Normalize, OnlineClassifiers

LOCAL_ARCHS = ("dot", "concat")
PRIORS = ("uniform", "gaussian", "none")
IMAGE_SIZES = (32, 64)
# DCGAN-discriminator-like encoders: channel multipliers of ndf for the 4x4 / stride-2 convolutions,
# and the index of the conv whose (8 x 8) output is the local feature map C(x)
_CONVS = {32: ((1, 2, 4), 1), 64: ((1, 2, 4, 8), 2)}
LOCAL_SIZE = 8         # the local map is 8 x 8 for both image sizes
PRIOR_HIDDEN = (1000, 200)   # the prior discriminator's hidden layers (the DIM paper's)


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


class _Conv(nn.Sequential):
    """4x4 / stride 2 / pad 1 convolution (halves the map), BatchNorm, ReLU."""

    def __init__(self, n_in, n_out, use_bn):
        super().__init__(nn.Conv2d(n_in, n_out, 4, 2, 1, bias=not use_bn),
                         nn.BatchNorm2d(n_out) if use_bn else nn.Identity(), nn.ReLU())


class DIMEncoder(nn.Module):
    """E = f o C. Returns (local map C(x), last conv map, fc hidden layer, Y before any squashing).

    C(x) is the 8 x 8 map (ReLU activations) of the second conv (32 px) or third conv (64 px); the
    remaining convs, one fully connected hidden layer (16 * ndf units, 1024 at ndf = 64) and a
    linear output layer form f.
    """

    def __init__(self, image_size, ndf, y_dim, use_bn, in_channels=3):
        super().__init__()
        mults, local_idx = _CONVS[image_size]
        widths = [in_channels] + [m * ndf for m in mults]
        convs = [_Conv(widths[i], widths[i + 1], use_bn) for i in range(len(mults))]
        self.to_local = nn.Sequential(*convs[:local_idx + 1])
        self.to_last = nn.Sequential(*convs[local_idx + 1:])
        self.local_channels, self.last_channels = widths[local_idx + 1], widths[-1]
        last_size = image_size // 2 ** len(mults)
        self.fc = nn.Sequential(nn.Linear(widths[-1] * last_size ** 2, 16 * ndf, bias=not use_bn),
                                nn.BatchNorm1d(16 * ndf) if use_bn else nn.Identity(), nn.ReLU())
        self.out = nn.Linear(16 * ndf, y_dim)

    def forward(self, x):
        local = self.to_local(x)
        last = self.to_last(local)
        hidden = self.fc(last.flatten(1))
        return local, last, hidden, self.out(hidden)


class _ResidualEmbed(nn.Module):
    """1x1-conv (or linear) block with a linear shortcut, then LayerNorm over the channels: the
    phi (local) and psi (Y) networks of the encoder-and-dot-product critic."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(n_in, n_out, bias=False), nn.BatchNorm1d(n_out), nn.ReLU(),
                                   nn.Linear(n_out, n_out))
        self.shortcut = nn.Linear(n_in, n_out, bias=False)
        self.norm = nn.LayerNorm(n_out)
        if n_out >= n_in:   # start the shortcut near a copy of the input, so scores are informative at once
            with torch.no_grad():
                w = self.shortcut.weight
                w.uniform_(-0.01, 0.01)
                w[torch.arange(n_in), torch.arange(n_in)] = 1.0

    def forward(self, x):   # x: (R, n_in) rows (locations or images)
        return self.norm(self.block(x) + self.shortcut(x))


class DotCritic(nn.Module):
    """Encoder-and-dot-product local critic: T(C^(i), Y) = phi(C^(i)) . psi(Y)."""

    def __init__(self, n_local, y_dim, n_units):
        super().__init__()
        self.phi = _ResidualEmbed(n_local, n_units)
        self.psi = _ResidualEmbed(y_dim, n_units)

    def forward(self, conv, y):
        """conv (B, C, M, M), y (B, y_dim) -> (trg (B, M*M, D'), src (B, D'))."""
        b, c = conv.shape[:2]
        rows = conv.flatten(2).transpose(1, 2).reshape(-1, c)             # (B*M*M, C)
        return self.phi(rows).view(b, -1, self.phi.norm.normalized_shape[0]), self.psi(y)


class ConcatCritic(nn.Module):
    """Concat-and-convolve local critic: Y tiled over the map, concatenated with C(x') and scored by
    1x1 convolutions (hidden, hidden, 1). The first layer on [C; Y] is W_c C + W_y Y + b, so the
    projection of every image's map is computed once and only indexed for each pairing."""

    def __init__(self, n_local, y_dim, hidden):
        super().__init__()
        self.w_c = nn.Conv2d(n_local, hidden, 1)
        self.w_y = nn.Linear(y_dim, hidden, bias=False)
        self.rest = nn.Sequential(nn.ReLU(), nn.Conv1d(hidden, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, 1, 1))

    def forward(self, conv_cols, y, index):
        """conv_cols (B, C, M, M); y (N, y_dim); index (N, J, M*M) ints in [0, B): pairing j of row n
        scores Y[n] against location l of image index[n, j, l]. Returns scores (N, J, M*M)."""
        proj = self.w_c(conv_cols).flatten(2)                             # (B, H, L)
        n, j, ell = index.shape
        loc = torch.arange(ell, device=index.device).expand(n, j, ell)
        h = proj.permute(0, 2, 1)[index, loc]                             # (N, J, L, H)
        h = h + self.w_y(y)[:, None, None, :]
        h = h.reshape(n * j, ell, -1).transpose(1, 2)                     # (N*J, H, L)
        return self.rest(h).view(n, j, ell)


class GlobalCritic(nn.Module):
    """Global critic: the local map reduced by a 4x4 / stride-2 convolution, flattened, concatenated
    with Y and scored by fully connected layers (hidden, hidden, 1). The first linear layer splits as
    for ConcatCritic, so every (map, Y) pair of a batch is scored without materialising the pairs'
    concatenated inputs."""

    def __init__(self, n_local, y_dim, hidden):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(n_local, n_local, 4, 2, 1), nn.ReLU(), nn.Flatten())
        n_flat = n_local * (LOCAL_SIZE // 2) ** 2
        self.w_c = nn.Linear(n_flat, hidden)
        self.w_y = nn.Linear(y_dim, hidden, bias=False)
        self.rest = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, conv_cols, y):
        """conv_cols (B, C, M, M), y (N, y_dim) -> scores (N, B): T(C(x_b), Y_n) for every pair."""
        h = self.w_y(y)[:, None, :] + self.w_c(self.reduce(conv_cols))[None]   # (N, B, H)
        return self.rest(h).squeeze(-1)


class PriorDiscriminator(nn.Module):
    """D_phi: logit that a vector was drawn from the prior rather than produced by the encoder."""

    def __init__(self, y_dim):
        super().__init__()
        dims = (y_dim,) + PRIOR_HIDDEN
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], 1))

    def forward(self, v):
        return self.net(v).squeeze(-1)


class DIM(nn.Module):
    """The DIM encoder plus the critics its objective uses and the online classifiers on Y.

    image_size: 32 or 64 (the DIM paper's DCGAN-like encoders). ndf: base conv width (convs of
    ndf, 2 ndf, 4 ndf [, 8 ndf] channels; fc hidden layer 16 ndf; critic hidden layers 8 ndf; dot
    critic embedding 16 ndf). y_dim: size of Y. local_arch: "dot" (encoder-and-dot-product) or
    "concat" (concat-and-convolve). prior: "uniform" (Y through a sigmoid, matched to U[0, 1]^y_dim),
    "gaussian" (linear Y matched to N(0, I)) or "none" (linear Y, no prior discriminator).
    use_global / use_local: build the global / local critic (the objective's alpha / beta > 0).
    """

    def __init__(self, image_size: int = 32, n_classes: int = 10, *, ndf: int = 64, y_dim: int = 64,
                 local_arch: str = "dot", prior: str = "uniform", use_global: bool = True,
                 use_local: bool = True, use_bn: bool = True):
        super().__init__()
        if image_size not in IMAGE_SIZES:
            raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
        _positive_int("ndf", ndf)
        _positive_int("y_dim", y_dim)
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 0:
            raise ValueError(f"n_classes must be an integer >= 0, got {n_classes!r}")
        if local_arch not in LOCAL_ARCHS:
            raise ValueError(f"local_arch must be one of {LOCAL_ARCHS}, got {local_arch!r}")
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        for name, v in (("use_global", use_global), ("use_local", use_local), ("use_bn", use_bn)):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be a bool, got {v!r}")
        if not (use_global or use_local):
            raise ValueError("use_global and use_local are both False: DIM needs at least one MI critic")
        self.image_size, self.y_dim, self.local_arch, self.prior = image_size, y_dim, local_arch, prior
        self.use_global, self.use_local = use_global, use_local
        self.normalize = Normalize()
        self.encoder = DIMEncoder(image_size, ndf, y_dim, use_bn)
        c = self.encoder.local_channels
        self.global_critic = GlobalCritic(c, y_dim, 8 * ndf) if use_global else None
        self.local_critic = None
        if use_local:
            self.local_critic = (DotCritic(c, y_dim, 16 * ndf) if local_arch == "dot"
                                 else ConcatCritic(c, y_dim, 8 * ndf))
        self.prior_disc = PriorDiscriminator(y_dim) if prior != "none" else None
        self.classifiers = OnlineClassifiers(y_dim, n_classes) if n_classes > 0 else None

    def _encode(self, x):
        if x.dim() != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"DIM input must be (B, C, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        local, last, hidden, y = self.encoder(self.normalize(x))
        return local, last, hidden, torch.sigmoid(y) if self.prior == "uniform" else y

    def forward(self, x):
        """feats = {"conv": C(x) (B, C, 8, 8) ReLU activations (the local features), "fc": the fully
        connected hidden layer (B, 16 ndf), "y": Y (B, y_dim), sigmoid-squashed when prior is
        "uniform"}; logits = (mlp, linear) of the online classifiers on y.detach() (None when
        n_classes is 0)."""
        local, _, hidden, y = self._encode(x)
        logits = self.classifiers(y) if self.classifiers is not None else None
        return {"conv": local, "fc": hidden, "y": y}, logits

    def online_logits(self, x):
        """(MLP, linear) logits of the online classifiers for images x in [0, 1]."""
        return self.classifiers(self._encode(x)[3])

    def probe_features(self, x) -> dict[str, torch.Tensor]:
        """{"conv": the flattened last conv map, "fc": the fc hidden layer, "y": Y}, each (B, F):
        the three representations the DIM paper's classification results report (call it in eval
        mode, so that BatchNorm uses its running statistics)."""
        _, last, hidden, y = self._encode(x)
        return {"conv": last.flatten(1), "fc": hidden, "y": y}

    # Critic evaluations: DIMObjective calls these (through DDP's .module when wrapped).

    def local_embeddings(self, conv, y):
        """Dot critic: (phi(C) as (B, M*M, D'), psi(Y) as (B, D'))."""
        if not isinstance(self.local_critic, DotCritic):
            raise ValueError("local_embeddings needs a model built with use_local=True, local_arch='dot'")
        return self.local_critic(conv, y)

    def concat_scores(self, conv_cols, y, index):
        if not isinstance(self.local_critic, ConcatCritic):
            raise ValueError("concat_scores needs a model built with use_local=True, local_arch='concat'")
        return self.local_critic(conv_cols, y, index)

    def global_scores(self, conv_cols, y):
        if self.global_critic is None:
            raise ValueError("global_scores needs a model built with use_global=True")
        return self.global_critic(conv_cols, y)

    def prior_logits(self, v, detach_params: bool = False):
        """D_phi(v). detach_params=True evaluates D_phi with detached copies of its parameters:
        the gradient reaches v (the encoder) but never D_phi's parameters."""
        if self.prior_disc is None:
            raise ValueError("prior_logits needs a model built with prior 'uniform' or 'gaussian'")
        if not detach_params:
            return self.prior_disc(v)
        params = {k: p.detach() for k, p in self.prior_disc.named_parameters()}
        return functional_call(self.prior_disc, params, (v,))
