"""The options of amdim.train, resolved once into one small typed config per part.

The command line (amdim.train.build_parser) leaves every option that has a default at None, so
that `resolve` can tell an explicit value from a default: explicit values win over a recipe's
(amdim.recipes), a recipe's over the method's defaults here. The result is a `Config` of frozen
dataclasses, one per part, and each part of the trainer takes only its own:

- `DataConfig`: what is read and how views are made (amdim.data);
- `AMDIMModelConfig` / `DIMModelConfig`: the architecture (amdim.amdim_model / amdim.dim_model);
- `AMDIMObjectiveConfig` / `DIMObjectiveConfig`: the loss (amdim.amdim_objective / amdim.dim_objective);
- `OptimConfig`: optimiser, schedule, batch and epochs;
- `RunConfig`: seed, device, precision and the run directory.

`Config.options()` is the flat dict of every resolved option (printed at the start of a run and
stored in its checkpoint); `Config.from_options` rebuilds the config from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from .amdim_objective import ESTIMATORS, LOSS_BACKENDS  # noqa: F401  (the parser's choices)

METHODS = ("amdim", "dim")
SEED_MAX = 2**32 - 1   # np.random.seed's largest; torch and Python take it too


def seed_arg(s):
    """argparse type of --seed (train and evaluate): an integer in [0, SEED_MAX]."""
    try:
        v = int(s)
    except ValueError:
        v = -1
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {SEED_MAX}], got {s!r}")
    return v


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    data_path: str | None
    image_size: int
    augment: str             # a policy of amdim.data.augment.POLICIES

    @property
    def policy(self):
        from .data.augment import POLICIES
        return POLICIES[self.augment]


@dataclass(frozen=True)
class AMDIMModelConfig:
    ndf: int
    n_rkhs: int
    n_depth: int
    use_bn: bool
    n_mix: int


@dataclass(frozen=True)
class DIMModelConfig:
    ndf: int
    y_dim: int
    mi_units: int            # the dot-product critics' embedding size
    local_arch: str
    global_arch: str
    prior: str
    use_global: bool     # a global critic exists (alpha > 0)
    use_local: bool      # a local critic exists (beta > 0)


@dataclass(frozen=True)
class AMDIMObjectiveConfig:
    estimator: str
    loss_backend: str
    costs: tuple
    dense: bool
    tclip: float
    reg_weight: float
    mix_tau: float
    mix_alpha: float | None


@dataclass(frozen=True)
class DIMObjectiveConfig:
    estimator: str
    loss_backend: str
    alpha: float
    beta: float
    gamma: float
    prior_gp: float          # weight of the prior discriminator's gradient penalty


@dataclass(frozen=True)
class OptimConfig:
    epochs: int
    batch_size: int
    steps_per_epoch: int | None
    lr: float
    betas: tuple             # Adam's (beta1, beta2)
    weight_decay: float      # Adam's L2 term
    warmup_steps: int        # linear warm-up over this many updates (0: none)
    lr_milestones: tuple     # epochs after which the rate is multiplied by lr_decay
    lr_decay: float


@dataclass(frozen=True)
class RunConfig:
    seed: int
    device: str
    amp: str
    out_dir: str
    resume: str | None
    overwrite: bool
    log_every: int
    no_eval: bool
    no_progress: bool


# Which option belongs to which part, per method. An option of the other method is refused.
PARTS = {
    "amdim": {"data": DataConfig, "model": AMDIMModelConfig, "objective": AMDIMObjectiveConfig,
              "optim": OptimConfig, "run": RunConfig},
    "dim": {"data": DataConfig, "model": DIMModelConfig, "objective": DIMObjectiveConfig,
            "optim": OptimConfig, "run": RunConfig},
}
# options that set others and are not stored themselves
DIM_PRESET_OPTION = "dim_preset"
# DIM(L) and DIM(G) of the DIM paper (section 4): the weights of the global MI, local MI and prior terms
DIM_PRESETS = {"L": dict(alpha=0.0, beta=1.0, gamma=0.1), "G": dict(alpha=1.0, beta=0.0, gamma=1.0)}
# rdevon/DIM weighs its discriminator's gradient penalty by 1.0, but the penalty it computes
# (functions/gradient_penalty.py: network(x)[-1] keeps the batch's last row) is the squared input
# gradient of one sample divided by the batch size: in expectation the batch mean / B. At its batch of
# 64 that is the mean over the batch weighted 1/64, which is what amdim.dim_objective computes.
DIM_PRIOR_GP = 1 / 64

AMDIM_MILESTONE_FRACTIONS = (250 / 300, 280 / 300)
# the augmentation policy of each method by dataset when --augment is not given: the official
# CIFAR / STL-10 / ImageNet pipelines (the built-in 32 px datasets count as CIFAR-like, folders as
# ImageNet-like)
DEFAULT_AUGMENT = {
    "amdim": {"digits": "amdim-cifar", "shapes": "amdim-cifar", "cifar10": "amdim-cifar",
              "cifar100": "amdim-cifar", "stl10": "amdim-stl", "folder": "amdim-imagenet"},
    "dim": {"digits": "none", "shapes": "none", "cifar10": "none", "cifar100": "none", "stl10": "dim-stl",
            "folder": "dim-stl"},
}

# The defaults of each method when neither the command line nor a recipe sets an option.
DEFAULTS = {
    "shared": dict(dataset="digits", data_path=None, image_size=None, augment=None, loss_backend="fused", epochs=30,
                   batch_size=64, steps_per_epoch=None, lr_decay=0.2, seed=0, device="auto", amp="auto",
                   out_dir=None, resume=None, overwrite=False, log_every=10, no_eval=False, no_progress=False),
    # the AMDIM encoder at a CPU size for the built-in data (amdim-public: ndf 128, n_rkhs 1024,
    # n_depth 3, the amdim-* recipes)
    "amdim": dict(ndf=16, n_rkhs=128, n_depth=1, use_bn=False, n_mix=1, estimator="nce",
                  costs=("1t5", "1t7", "5t5"), dense=False, tclip=20.0, reg_weight=0.05, mix_tau=1.0,
                  mix_alpha=None,
                  # amdim-public task_self_supervised.py: Adam(betas=(0.8, 0.999), weight_decay=1e-5),
                  # a 500-update warm-up, MultiStepLR([250, 280], 0.2) over 300 epochs (train.py: lr 2e-4);
                  # without --lr-milestones the milestones are those fractions of --epochs
                  lr=2e-4, betas=(0.8, 0.999), weight_decay=1e-5, warmup_steps=500, lr_milestones=None),
    # rdevon/DIM: output_units 64, JSD, the dot critics (GlobalDIM is a dot product too), PriorMatching's
    # uniform prior and discriminator penalty. Its sizes (basic32x32's ndf 64, LocalDIM's mi_units 2048)
    # train at about 15 images/s on a 2-core CPU: the defaults (half the width, a quarter of the units) are for the built-in
    # data on a CPU, and the dim-* recipes give the official sizes (docs/dim.md)
    "dim": dict(ndf=32, y_dim=64, mi_units=512, local_arch="dot", global_arch="dot", prior="uniform",
                estimator="jsd", dim_preset="L", prior_gp=DIM_PRIOR_GP,
                # cortex (optimizer.py) Adam defaults betas=(0.5, 0.999); rdevon/DIM lr 1e-4; no schedule
                lr=1e-4, betas=(0.5, 0.999), weight_decay=0.0, warmup_steps=0, lr_milestones=()),
}


# Defaults sized for a CPU on one built-in dataset, over the method's (a recipe or an explicit option
# still wins). They change how long and how fast a run trains, never the method (objective,
# architecture family, augmentation): shapes is 10000 images, and the official schedules (AMDIM's
# lr 2e-4 over 300 epochs) would not show learning within the 10 minutes a demonstration on an idle
# 2-core CPU should take (docs/shapes.md gives the measurements behind these numbers).
DATASET_DEFAULTS = {
    "amdim": {"shapes": dict(epochs=10, lr=2e-3)},
    "dim": {"shapes": dict(epochs=20, lr=1e-3)},
}


def _fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def method_options(method: str) -> set[str]:
    """Every option name (as stored) that applies to `method`."""
    names = {n for cls in PARTS[method].values() for n in _fields(cls)}
    names -= {"use_global", "use_local"}   # derived from alpha / beta
    names |= {"method", "recipe", DIM_PRESET_OPTION} if method == "dim" else {"method", "recipe"}
    return names


def all_options() -> set[str]:
    return method_options("amdim") | method_options("dim")


# --use-bn / --no-use-bn; the other booleans are store_true flags
BOOLEAN_OPTIONAL = ("use_bn", "dense")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Config:
    method: str
    recipe: str | None       # the amdim.recipes preset the options started from, if any
    data: DataConfig
    model: AMDIMModelConfig | DIMModelConfig
    objective: AMDIMObjectiveConfig | DIMObjectiveConfig
    optim: OptimConfig
    run: RunConfig

    def options(self) -> dict:
        """Every resolved option as a flat dict of plain values (tuples as lists)."""
        out = {"method": self.method, "recipe": self.recipe}
        for part in PARTS[self.method]:
            for k, v in dataclasses.asdict(getattr(self, part)).items():
                out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def describe(self) -> str:
        """The resolved options, one line per part, as printed at the start of a run."""
        lines = [f"amdim.train: method={self.method} recipe={self.recipe}, resolved options:"]
        for part in PARTS[self.method]:
            values = dataclasses.asdict(getattr(self, part))
            lines.append(f"  {part:9s} " + " ".join(f"{k}={_show(v)}" for k, v in values.items()))
        return "\n".join(lines)

    @classmethod
    def from_options(cls, options: dict) -> "Config":
        """Rebuild a Config from `options()` (e.g. a checkpoint's)."""
        method = options["method"]
        parts = {}
        for part, kind in PARTS[method].items():
            values = {}
            for name in _fields(kind):
                v = options[name]
                values[name] = tuple(v) if isinstance(v, list) else v
            parts[part] = kind(**values)
        return cls(method, options.get("recipe"), **parts)


def _show(v) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v) if len(v) else "none"
    return str(v)


def resolve(given: dict) -> Config:
    """Resolve command-line values (None = not given) into a Config: explicit values over the
    recipe's (amdim.recipes) over the method's defaults; a DIM preset sets alpha, beta and gamma at
    the level it is given at. ValueError naming the options at fault: options of the other method,
    and combinations that do not make sense."""
    from .recipes import RECIPES
    given = {k: v for k, v in given.items() if v is not None}
    unknown = set(given) - all_options()
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}")
    name = given.get("recipe")
    if name is not None and name not in RECIPES:
        raise ValueError(f"--recipe must be one of {tuple(RECIPES)}, got {name!r}")
    recipe = dict(RECIPES[name]) if name else {}
    method = given.get("method", recipe.get("method", "amdim"))
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    if recipe and method != recipe["method"]:
        raise ValueError(f"--recipe {name} is a --method {recipe['method']} recipe, got --method {method}")
    misplaced = [k for k in _ordered(all_options() - method_options(method)) if k in given]
    if misplaced:
        raise ValueError(f"{', '.join(flag(k) for k in misplaced)} "
                         f"{'does' if len(misplaced) == 1 else 'do'} not apply to --method {method}")
    dataset = given.get("dataset", recipe.get("dataset", DEFAULTS["shared"]["dataset"]))
    layers = [dict(DEFAULTS["shared"]), dict(DEFAULTS[method]), dict(DATASET_DEFAULTS[method].get(dataset, {})),
              recipe, dict(given)]
    if method == "dim":
        for layer in layers:
            if DIM_PRESET_OPTION in layer:
                for k, v in DIM_PRESETS[layer[DIM_PRESET_OPTION]].items():
                    layer.setdefault(k, v)
    o = {k: v for layer in layers for k, v in layer.items()}
    o["method"], o["recipe"] = method, name
    seed = o["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"--seed must be an integer in [0, {SEED_MAX}] (numpy's seed range), got {seed!r}")
    if o["out_dir"] is None:
        o["out_dir"] = os.path.join("runs", method)
    if o["data_path"] is not None:   # stored absolute: amdim.evaluate may run from another directory
        o["data_path"] = os.path.abspath(o["data_path"])
    from .data.datasets import NATURAL_SIZE
    if o["image_size"] is None:
        o["image_size"] = NATURAL_SIZE[o["dataset"]]
    if o["augment"] is None:
        o["augment"] = DEFAULT_AUGMENT[method][o["dataset"]]
    if o["lr_milestones"] is None:   # amdim-public's [250, 280] of 300 epochs, scaled to --epochs
        o["lr_milestones"] = tuple(round(o["epochs"] * f) for f in AMDIM_MILESTONE_FRACTIONS)
    _check_optimiser(o)
    if method == "dim":
        _resolve_dim(o)
    else:
        _resolve_amdim(o)
    return Config.from_options(o)


def _ordered(names) -> list[str]:
    """Options in the order of the parts' fields (so messages list them predictably)."""
    order = [n for m in METHODS for cls in PARTS[m].values() for n in _fields(cls)] + [DIM_PRESET_OPTION]
    seen = []
    for n in order:
        if n in names and n not in seen:
            seen.append(n)
    return seen


def _resolve_amdim(o: dict) -> None:
    _check_loss_options(o)
    if o["n_mix"] > 1 and o["estimator"] != "nce":
        raise ValueError(f"--n-mix {o['n_mix']} needs --estimator nce (the mixture loss is defined for "
                         f"NCE), got --estimator {o['estimator']}")
    if o["n_mix"] > 1 and not any(c[0] == "1" for c in o["costs"]):
        raise ValueError(f"--n-mix {o['n_mix']} mixes the global feature, but --costs "
                         f"{','.join(o['costs'])} has no 1->5 or 1->7 cost")


F32_MAX = 3.4028234663852886e38   # torch.finfo(torch.float32).max


def _check_optimiser(o: dict) -> None:
    """Adam turns the rate into float32 scalars (lr / (1 - beta1^t) at its largest in the first
    update) and the weight decay into one: a value beyond float32 would stop the first step with an
    overflow, so it is refused here."""
    peak = o["lr"] * max(1.0, o["lr_decay"]) ** len(o["lr_milestones"])
    step = peak / (1.0 - o["betas"][0])
    if not step <= F32_MAX:
        what = (f"--lr {o['lr']:g} with --lr-decay {o['lr_decay']:g} at {len(o['lr_milestones'])} milestone(s)"
                if peak > o["lr"] else f"--lr {o['lr']:g}")
        raise ValueError(f"{what} gives Adam a first step of {step:.3g} (lr / (1 - beta1)), beyond float32's "
                         f"{F32_MAX:.3g}: pass a smaller value")
    if not o["weight_decay"] <= F32_MAX:
        raise ValueError(f"--weight-decay {o['weight_decay']:g} is beyond float32's {F32_MAX:.3g}")


def _check_loss_options(o: dict) -> None:
    """The loss's own checks of the values it takes (amdim_kernels' modules validate their options
    when built), here, before any run directory is touched, and named by option."""
    import amdim_kernels as ak
    checks = [("tclip", lambda: ak.NCELoss(tclip=o["tclip"], reg_weight=0.0)),
              ("reg_weight", lambda: ak.NCELoss(tclip=None, reg_weight=o["reg_weight"]))]
    if o["n_mix"] > 1:
        checks += [("mix_tau", lambda: ak.MixtureNCELoss(tau=o["mix_tau"], alpha=0.0)),
                   ("mix_alpha", lambda: ak.MixtureNCELoss(tau=o["mix_tau"], alpha=o["mix_alpha"]))]
    for name, build in checks:
        try:
            build()
        except (ValueError, TypeError) as e:
            raise ValueError(f"{flag(name)} {o[name]!r}: {e}") from None


def argv(options: dict, skip=()) -> list[str]:
    """Command-line arguments that resolve to `options` (Config.options()) again: the method, the
    recipe, and each option whose value differs from what the arguments so far resolve to (so a
    printed command holds what matters, not every default). `skip`: option names left out."""
    given = {"method": options["method"]}
    if options.get("recipe"):
        given["recipe"] = options["recipe"]
    names = [n for n in _ordered(method_options(options["method"])) if n in options and n not in skip]
    for _ in range(len(names) + 1):
        try:
            now = resolve(given).options()
        except ValueError:   # an intermediate combination that does not resolve: give the rest
            now = {}
        differ = [n for n in names if n not in given and now.get(n) != options[n]]
        if not differ:
            break
        given[differ[0]] = options[differ[0]]
    out = ["--method", given.pop("method")]
    for name, v in given.items():
        out += _flag_args(name, v)
    return out


def _flag_args(name: str, v) -> list[str]:
    if isinstance(v, bool):
        if name in BOOLEAN_OPTIONAL:
            return [flag(name) if v else "--no-" + name.replace("_", "-")]
        return [flag(name)] if v else []
    if v is None:
        return []
    return [flag(name), _show(v)]


def _resolve_dim(o: dict) -> None:
    if o["image_size"] not in (32, 64):
        raise ValueError(f"--image-size {o['image_size']} is not available for --method dim "
                         f"(its encoders take 32 or 64 px images)")
    if o["alpha"] == 0 and o["beta"] == 0:
        raise ValueError("--alpha and --beta are both 0: DIM needs a global or a local MI term")
    if o["gamma"] > 0 and o["prior"] == "none":
        raise ValueError(f"--gamma {o['gamma']:g} weights prior matching, but --prior is none "
                         f"(pass --gamma 0, or a prior)")
    o["use_global"], o["use_local"] = o["alpha"] > 0, o["beta"] > 0


def default_text(name: str) -> str:
    """'default: ...' for an option's help: the shared default or each method's, then the CPU-sized
    ones of the built-in datasets."""
    if name in DEFAULTS["shared"]:
        v = DEFAULTS["shared"][name]
        text = f"default: {_show(v)}" if v is not None else ""
    else:
        per = [f"{_show(DEFAULTS[m][name])} for {m}" for m in METHODS if name in DEFAULTS[m]]
        text = "default: " + ", ".join(per) if per else ""
    on = [f"{_show(d[name])} for {m} on {ds}" for m in METHODS for ds, d in DATASET_DEFAULTS[m].items() if name in d]
    return f"{text}; {', '.join(on)}" if on else text
