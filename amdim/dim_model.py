"""Deep InfoMax (Hjelm et al. 2019) as rdevon/DIM builds it: the encoder E = f o C, its
mutual-information critics, the prior discriminator and the online classifiers, as one nn.Module (so
DDP wraps, and checkpoints hold, all of them).

The objective that trains them is amdim.dim_objective.DIMObjective; docs/dim.md says which choice
comes from where. Only the critics an objective uses are built: under DDP every parameter must get
a gradient at every step.

Y, the representation, is the encoder's linear output: the MI critics and the classifiers see it as
it is; only prior matching squashes it (a sigmoid, for the uniform prior), as rdevon/DIM does
(models/prior_matching.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .layers import Normalize

LOCAL_ARCHS = ("dot", "concat")
GLOBAL_ARCHS = ("dot", "concat")
PRIORS = ("uniform", "gaussian", "none")
IMAGE_SIZES = (32, 64)
# rdevon/DIM configs/convnets.py basic32x32 / basic64x64: channel multipliers of ndf (64 there) for
# the 4x4 / stride-2 convolutions, and the index of the conv whose (8 x 8) output is the local map C(x)
_CONVS = {32: ((1, 2, 4), 1), 64: ((1, 2, 4, 8), 2)}
LOCAL_SIZE = 8         # the local map is 8 x 8 for both image sizes
PRIOR_HIDDEN = (1000, 200)   # the prior discriminator's hidden layers (models/prior_matching.py)
CLASSIFIER_HIDDEN = 200      # the online classifiers' hidden layer (evaluation_models/classification_eval.py)


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_choice(name, v, choices):
    """The DIM model's and objective's check of an option with a fixed set of values."""
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")


class _Conv(nn.Sequential):
    """4x4 / stride 2 / pad 1 convolution (halves the map), BatchNorm, ReLU."""

    def __init__(self, n_in, n_out, use_bn):
        super().__init__(nn.Conv2d(n_in, n_out, 4, 2, 1, bias=not use_bn),
                         nn.BatchNorm2d(n_out) if use_bn else nn.Identity(), nn.ReLU())


def _fc(n_in, n_out, use_bn):
    return nn.Sequential(nn.Linear(n_in, n_out, bias=not use_bn),
                         nn.BatchNorm1d(n_out) if use_bn else nn.Identity(), nn.ReLU())


class DIMEncoder(nn.Module):
    """E = f o C. Returns (local map C(x), last conv map, fc hidden layer, Y).

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
        self.last_size = image_size // 2 ** len(mults)
        self.fc = _fc(widths[-1] * self.last_size ** 2, 16 * ndf, use_bn)
        self.out = nn.Linear(16 * ndf, y_dim)

    def forward(self, x):
        local = self.to_local(x)
        last = self.to_last(local)
        hidden = self.fc(last.flatten(1))
        return local, last, hidden, self.out(hidden)


class _ResidualEmbed(nn.Module):
    """rdevon/DIM's MI1x1ConvNet (nn_modules/mi_networks.py) on rows: linear (no bias), BatchNorm,
    ReLU, linear, plus a linear shortcut started near a copy of the input, then LayerNorm over the
    units: the phi (local) and psi (Y) networks of the encoder-and-dot-product critic."""

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
    """Encoder-and-dot-product local critic: T(C^(i), Y) = phi(C^(i)) . psi(Y), a raw dot product of
    LayerNormed mi_units-dimensional embeddings (rdevon/DIM LocalDIM, mi_units 2048 there)."""

    def __init__(self, n_local, y_dim, mi_units):
        super().__init__()
        self.phi = _ResidualEmbed(n_local, mi_units)
        self.psi = _ResidualEmbed(y_dim, mi_units)

    def forward(self, conv, y):
        """conv (B, C, M, M), y (B, y_dim) -> (trg phi(C) (B, M*M, D'), src psi(Y) (B, D'))."""
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


class GlobalDotCritic(nn.Module):
    """rdevon/DIM's global critic (models/dim.py GlobalDIM): T_G(C(x'), Y(x)) = E'(C(x')) . g(Y(x)),
    a raw dot product, where E' repeats the encoder's layers from the local one on (a fresh copy of
    its architecture: the local map's conv, the remaining convs, the fc layer), its last layer
    replaced by a linear one of mi_units, and g is a linear layer of mi_units."""

    def __init__(self, image_size, ndf, y_dim, mi_units, use_bn):
        super().__init__()
        mults, local_idx = _CONVS[image_size]
        widths = [mults[local_idx] * ndf] + [m * ndf for m in mults[local_idx:]]
        self.convs = nn.Sequential(*[_Conv(widths[i], widths[i + 1], use_bn) for i in range(len(widths) - 1)])
        side = LOCAL_SIZE // 2 ** (len(widths) - 1)
        self.fc = _fc(widths[-1] * side ** 2, 16 * ndf, use_bn)
        self.map_out = nn.Linear(16 * ndf, mi_units)
        self.y_out = nn.Linear(y_dim, mi_units)

    def forward(self, conv, y):
        """conv (B, C, M, M), y (B, y_dim) -> (trg E'(C) as (B, 1, D'), src g(Y) (B, D'))."""
        return self.map_out(self.fc(self.convs(conv).flatten(1)))[:, None], self.y_out(y)


class GlobalConcatCritic(nn.Module):
    """The DIM paper's global critic (its appendix): the local map reduced by a 4x4 / stride-2
    convolution, flattened, concatenated with Y and scored by fully connected layers (hidden, hidden,
    1). The first linear layer splits as for ConcatCritic, so every (map, Y) pair of a batch is scored
    without materialising the pairs' concatenated inputs."""

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


def _classifier(n_in, n_classes):
    """rdevon/DIM's online classifier: linear 200, dropout 0.1, BatchNorm, ReLU, linear."""
    return nn.Sequential(nn.Linear(n_in, CLASSIFIER_HIDDEN), nn.Dropout(0.1), nn.BatchNorm1d(CLASSIFIER_HIDDEN),
                         nn.ReLU(), nn.Linear(CLASSIFIER_HIDDEN, n_classes))


class DIM(nn.Module):
    """The DIM encoder plus the critics its objective uses and the online classifiers.

    image_size: 32 or 64 (rdevon/DIM's basic32x32 / basic64x64 DCGAN-like encoders). ndf: base conv
    width (convs of ndf, 2 ndf, 4 ndf [, 8 ndf] channels; fc hidden layer 16 ndf; concat critics'
    hidden layers 8 ndf). y_dim: size of Y. mi_units: the dot critics' embedding size. local_arch:
    "dot" (encoder-and-dot-product) or "concat" (concat-and-convolve). global_arch: "dot" (rdevon/DIM)
    or "concat" (the paper's appendix). prior: "uniform" (sigmoid(Y) matched to U[0, 1]^y_dim),
    "gaussian" (Y matched to N(0, I)) or "none" (no prior discriminator). use_global / use_local:
    build the global / local critic (the objective's alpha / beta > 0). The online classifiers read
    the last conv map, the fc layer and Y (rdevon/DIM's classifier_idx conv, fc, glob).
    """

    def __init__(self, image_size: int = 32, n_classes: int = 10, *, ndf: int = 64, y_dim: int = 64,
                 mi_units: int = 2048, local_arch: str = "dot", global_arch: str = "dot",
                 prior: str = "uniform", use_global: bool = True, use_local: bool = True, use_bn: bool = True):
        super().__init__()
        if image_size not in IMAGE_SIZES:
            raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
        _positive_int("ndf", ndf)
        _positive_int("y_dim", y_dim)
        _positive_int("mi_units", mi_units)
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 0:
            raise ValueError(f"n_classes must be an integer >= 0, got {n_classes!r}")
        check_choice("local_arch", local_arch, LOCAL_ARCHS)
        check_choice("global_arch", global_arch, GLOBAL_ARCHS)
        check_choice("prior", prior, PRIORS)
        for name, v in (("use_global", use_global), ("use_local", use_local), ("use_bn", use_bn)):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be a bool, got {v!r}")
        if not (use_global or use_local):
            raise ValueError("use_global and use_local are both False: DIM needs at least one MI critic")
        self.image_size, self.y_dim, self.prior = image_size, y_dim, prior
        self.local_arch, self.global_arch = local_arch, global_arch
        self.use_global, self.use_local = use_global, use_local
        # cortex normalises every image channel to [-1, 1]: (x - 0.5) / 0.5
        self.normalize = Normalize(mean=0.5, std=0.5)
        self.encoder = DIMEncoder(image_size, ndf, y_dim, use_bn)
        c = self.encoder.local_channels
        self.global_critic = None
        if use_global:
            self.global_critic = (GlobalDotCritic(image_size, ndf, y_dim, mi_units, use_bn) if global_arch == "dot"
                                  else GlobalConcatCritic(c, y_dim, 8 * ndf))
        self.local_critic = None
        if use_local:
            self.local_critic = (DotCritic(c, y_dim, mi_units) if local_arch == "dot"
                                 else ConcatCritic(c, y_dim, 8 * ndf))
        self.prior_disc = PriorDiscriminator(y_dim) if prior != "none" else None
        self.classifiers = None
        if n_classes > 0:
            n_conv = self.encoder.last_channels * self.encoder.last_size ** 2
            self.classifiers = nn.ModuleDict({"conv": _classifier(n_conv, n_classes),
                                              "fc": _classifier(16 * ndf, n_classes),
                                              "y": _classifier(y_dim, n_classes)})

    def _encode(self, x):
        if x.dim() != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"DIM input must be (B, C, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        return self.encoder(self.normalize(x))

    def _classify(self, last, hidden, y):
        feats = {"conv": last.flatten(1), "fc": hidden, "y": y}
        return {k: head(feats[k].detach()) for k, head in self.classifiers.items()}

    def forward(self, x):
        """feats = {"conv": C(x) (B, C, 8, 8) ReLU activations (the local features), "fc": the fully
        connected hidden layer (B, 16 ndf), "y": Y (B, y_dim)}; logits = {"conv", "fc", "y"}: the
        online classifiers on the detached last conv map, fc layer and Y (None when n_classes is 0)."""
        local, last, hidden, y = self._encode(x)
        logits = self._classify(last, hidden, y) if self.classifiers is not None else None
        return {"conv": local, "fc": hidden, "y": y}, logits

    def online_logits(self, x) -> dict:
        """{"conv", "fc", "y"} logits of the online classifiers for images x in [0, 1]."""
        _, last, hidden, y = self._encode(x)
        return self._classify(last, hidden, y)

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

    def global_embeddings(self, conv, y):
        """Dot global critic: (E'(C) as (B, 1, D'), g(Y) as (B, D'))."""
        if not isinstance(self.global_critic, GlobalDotCritic):
            raise ValueError("global_embeddings needs a model built with use_global=True, global_arch='dot'")
        return self.global_critic(conv, y)

    def global_scores(self, conv_cols, y):
        if not isinstance(self.global_critic, GlobalConcatCritic):
            raise ValueError("global_scores needs a model built with use_global=True, global_arch='concat'")
        return self.global_critic(conv_cols, y)

    def prior_input(self, y):
        """What prior matching compares with the prior: sigmoid(Y) for the uniform prior, else Y."""
        return torch.sigmoid(y) if self.prior == "uniform" else y

    def prior_logits(self, v, detach_params: bool = False):
        """D_phi(v). detach_params=True evaluates D_phi with detached copies of its parameters:
        the gradient reaches v (the encoder) but never D_phi's parameters."""
        if self.prior_disc is None:
            raise ValueError("prior_logits needs a model built with prior 'uniform' or 'gaussian'")
        if not detach_params:
            return self.prior_disc(v)
        params = {k: p.detach() for k, p in self.prior_disc.named_parameters()}
        return functional_call(self.prior_disc, params, (v,))
