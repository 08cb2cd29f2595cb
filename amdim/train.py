"""Train an AMDIM or Deep InfoMax encoder: `python -m amdim.train [options]`, or on K processes
`torchrun --nproc_per_node=K -m amdim.train [options]` (DistributedDataParallel; NCCL on GPUs,
gloo on CPU). The defaults train AMDIM on the built-in digits dataset on a CPU; `--method dim`
trains Deep InfoMax (DIM(L) by default, `--dim-preset G` for DIM(G)).

Every rank scores its sources against the targets of the global batch (amdim/amdim_objective.py),
so K processes with --batch-size B train exactly as one process with --batch-size B would.

The run is a few named steps: `setup` (options resolved once into amdim.config.Config, the run
directory, data, model, optimiser, a resumed state), `train_one_epoch`, and `train` (the epochs,
a checkpoint after each); `run` ties them together with collective error handling.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from . import agreement, checkpoint, optim, run_dir
from .amdim_model import ENCODER_SIZES
from .amdim_objective import COSTS, parse_costs
from .config import (DIM_PRESETS, ESTIMATORS, LOSS_BACKENDS, METHODS, Config, seed_arg, argv as config_argv,
                     default_text, resolve)
from .data import augment, datasets as data
from .distributed import agree, convert_batchnorm, init_distributed, leave_together, pick_device
from .evaluate import image_batches
from .methods import make_step
from .recipes import RECIPES
from .metrics import METRICS, MetricsLog, Progress, epoch_line, parse_records

EXIT_NON_FINITE = 3
EXIT_IO = 4


def positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def positive_float(s):
    v = float(s)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {s}")
    return v


def nonneg_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s}")
    return v


def nonneg_float(s):
    v = float(s)
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def betas_arg(s):
    try:
        b = tuple(float(x) for x in s.split(","))
    except ValueError:
        b = ()
    if len(b) != 2 or not all(0 <= x < 1 for x in b):
        raise argparse.ArgumentTypeError(f"must be two numbers in [0, 1) separated by a comma, got {s!r}")
    return b


def milestones_arg(s):
    if s.strip().lower() == "none":
        return ()
    try:
        m = tuple(int(x) for x in s.split(","))
    except ValueError:
        m = (-1,)
    if any(x < 1 for x in m) or list(m) != sorted(set(m)):
        raise argparse.ArgumentTypeError(f"must be increasing positive epochs separated by commas, or "
                                         f"none, got {s!r}")
    return m


def costs_arg(s):
    try:
        return parse_costs(s)
    except ValueError as e:   # argparse only reports the text of ArgumentTypeError
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """Every option defaults to None ("not given"): amdim.config.resolve fills the defaults, so an
    explicit value can be told from a default. The help text names each default."""
    p = argparse.ArgumentParser(prog="python -m amdim.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(group, name, help, **kw):
        flag_only = kw.get("action") == "store_true"   # off unless given: no default to name
        d = "" if "default:" in help or flag_only else default_text(name.lstrip("-").replace("-", "_"))
        group.add_argument(name, default=None, help=f"{help} ({d})" if d else help, **kw)

    add(p, "--method", "amdim: Augmented Multiscale DIM; dim: Deep InfoMax (global/local MI, prior matching)",
        choices=METHODS)
    add(p, "--recipe", "start from an official recipe (its method, dataset, sizes, batch, optimiser, schedule, "
                       "epochs and augmentation; explicit options override it): "
                       + "; ".join(f"{k}: {v['method']} on {v['dataset']}" for k, v in RECIPES.items()),
        choices=tuple(RECIPES))
    g = p.add_argument_group("data")
    add(g, "--dataset", "digits and shapes are built in (no download); cifar10/100, stl10 and folder "
                        "read --data-path", choices=data.DATASETS)
    add(g, "--data-path", "directory of the dataset (not used by the built-ins)")
    add(g, "--augment", "augmentation policy of the training views (default: the official one for the method "
                        "and dataset: amdim-cifar for 32 px data, amdim-stl for stl10, amdim-imagenet for "
                        "folder; for dim none, and dim-stl for stl10 and folder)", choices=tuple(augment.POLICIES))
    add(g, "--image-size", "encoder input size (default: 32 for digits/shapes/CIFAR, 64 for STL-10 and folders)",
        type=int, choices=ENCODER_SIZES)
    g = p.add_argument_group("model")
    add(g, "--ndf", "base channel width of the encoder", type=positive_int)
    add(g, "--n-rkhs", "AMDIM: embedding size of r1, r5, r7", type=positive_int)
    add(g, "--n-depth", "AMDIM: residual layers per encoder stage", type=positive_int)
    add(g, "--use-bn", "AMDIM: batch norm inside the encoder trunk", action=argparse.BooleanOptionalAction)
    add(g, "--n-mix", "AMDIM: mixture components of the global feature for the 1->5 / 1->7 costs (1: none)",
        type=positive_int)
    add(g, "--y-dim", "DIM: size of the representation Y", type=positive_int)
    add(g, "--mi-units", "DIM: embedding size of the dot-product critics", type=positive_int)
    add(g, "--local-arch", "DIM: local critic, encoder-and-dot-product (fused kernels) or concat-and-convolve",
        choices=("dot", "concat"))
    add(g, "--global-arch", "DIM: global critic, a dot product of the encoded map and Y (rdevon/DIM) or an MLP "
                            "on their concatenation (the DIM paper's appendix)", choices=("dot", "concat"))
    add(g, "--prior", "DIM: prior for prior matching (uniform: sigmoid(Y) is matched to U[0, 1])",
        choices=("uniform", "gaussian", "none"))
    g = p.add_argument_group("objective")
    add(g, "--estimator", "mutual-information bound: nce (InfoNCE), jsd (Jensen-Shannon) or dv "
                          "(Donsker-Varadhan)", choices=ESTIMATORS)
    add(g, "--loss-backend", "fused: amdim_kernels' kernels for the device; reference: plain PyTorch",
        choices=LOSS_BACKENDS)
    add(g, "--costs", f"AMDIM: comma-separated NCE costs, from {','.join(COSTS)} (src scale 't' trg scale)",
        type=costs_arg)
    add(g, "--dense", "AMDIM: 5x5/7x7 sources use every location (N = B*25 or B*49) instead of one per image",
        action=argparse.BooleanOptionalAction)
    add(g, "--tclip", "AMDIM: soft clip of the scores", type=positive_float)
    add(g, "--reg-weight", "AMDIM: weight of the score regulariser", type=nonneg_float)
    add(g, "--mix-tau", "AMDIM: mixture softmax temperature tau", type=positive_float)
    add(g, "--mix-alpha", "AMDIM: weight of the mixture entropy bonus (default: 1/tau, which makes q optimal)",
        type=nonneg_float)
    add(g, "--dim-preset", "DIM: the DIM paper's configuration, giving the defaults of --alpha/--beta/--gamma: "
        + "; ".join(f"{k}: alpha={v['alpha']:g}, beta={v['beta']:g}, gamma={v['gamma']:g}"
                    for k, v in DIM_PRESETS.items()), choices=tuple(DIM_PRESETS))
    add(g, "--alpha", "DIM: weight of the global MI term (default: the preset's)", type=nonneg_float)
    add(g, "--beta", "DIM: weight of the local MI term (default: the preset's)", type=nonneg_float)
    add(g, "--gamma", "DIM: weight of prior matching (default: the preset's)", type=nonneg_float)
    add(g, "--prior-gp", "DIM: weight of the prior discriminator's gradient penalty", type=nonneg_float)
    g = p.add_argument_group("optimisation")
    add(g, "--epochs", "passes over the training set", type=positive_int)
    add(g, "--batch-size", "GLOBAL batch size (split evenly over torchrun processes)", type=positive_int)
    add(g, "--steps-per-epoch", "cap on steps per epoch (default: one pass over the training set)",
        type=positive_int)
    add(g, "--lr", "Adam learning rate (encoder, critics and online classifiers)", type=positive_float)
    add(g, "--betas", "Adam's beta1,beta2", type=betas_arg)
    add(g, "--weight-decay", "Adam's L2 weight decay", type=nonneg_float)
    add(g, "--warmup-steps", "linear learning-rate warm-up over this many updates (0: none)", type=nonneg_int)
    add(g, "--lr-milestones", "epochs after which the learning rate is multiplied by --lr-decay, or none "
                              "(default: 5/6 and 14/15 of --epochs for amdim, amdim-public's 250,280 of 300; "
                              "none for dim)", type=milestones_arg)
    add(g, "--lr-decay", "factor of each learning-rate decay", type=positive_float)
    g = p.add_argument_group("runtime")
    add(g, "--seed", "seeds initialisation, data order, augmentation and sampling", type=seed_arg)
    add(g, "--device", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    add(g, "--amp", "mixed precision: auto is bf16 autocast on CUDA where supported (else fp16 with a "
                    "gradient scaler) and fp32 on the CPU; bf16 also runs on the CPU; fp16 needs CUDA",
        choices=("auto", "none", "bf16", "fp16"))
    add(g, "--out-dir", "checkpoint, metrics.jsonl and TensorBoard logs (default: runs/<method>)")
    add(g, "--resume", "continue exactly from this checkpoint (same later losses as an uninterrupted run; "
                       "give the run's options, as the command printed when it stopped does)",
        metavar="CHECKPOINT")
    add(g, "--overwrite", "replace the run already in --out-dir (without it such a run is refused); the "
                          "replaced run is kept until this one has written its first checkpoint",
        action="store_true")
    add(g, "--log-every", "steps between metric lines", type=positive_int)
    add(g, "--no-eval", "skip the per-epoch test accuracy of the online classifiers", action="store_true")
    add(g, "--no-progress", "no progress bar (plain lines every --log-every steps)", action="store_true")
    return p


def given_options(args: argparse.Namespace) -> dict:
    """The options given on the command line: those not None."""
    return {k: v for k, v in vars(args).items() if v is not None}


# ----------------------------------------------------------------------------------------------
# set-up

class Stop(Exception):
    """Training ends early with an exit code and a message (signal, non-finite loss, I/O failure)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def amp_dtype(spec: str, device: torch.device):
    """The autocast dtype of --amp on `device` (None: fp32); ValueError for fp16 on the CPU."""
    if spec == "none":
        return None
    if device.type != "cuda":
        if spec == "fp16":
            raise ValueError("--amp fp16 needs CUDA (its gradient scaler is CUDA's); on the CPU use "
                             "--amp bf16 or --amp none")
        return torch.bfloat16 if spec == "bf16" else None   # auto: fp32, bf16 is slow on most CPUs
    if spec == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if spec == "bf16" else torch.float16


def seed_all(seed: int):
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Data order of an epoch: a function of (seed, epoch) only, identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def command(options: dict, out_dir: str, resume: str | None = None, epochs: int | None = None) -> str:
    """The shell-quoted command line of a run with these options (amdim.config.Config.options()),
    absolute paths, resuming from `resume` (and training to `epochs`) when given."""
    args = config_argv(options, skip=("out_dir", "resume", "overwrite"))
    if epochs is not None:   # the run's own command with another --epochs (a default schedule follows it)
        if "--epochs" in args:
            i = args.index("--epochs")
            del args[i:i + 2]
        args += ["--epochs", str(epochs)]
    args += ["--out-dir", os.path.abspath(out_dir)]
    if resume:
        args += ["--resume", os.path.abspath(resume)]
    return shlex.join(["python", "-m", "amdim.train", *args])


def continue_hint(ck_path: str) -> str:
    """How to continue the run whose checkpoint is ck_path: the command that does it."""
    try:
        ck = checkpoint.load(ck_path)
        options, done, step = ck["args"], ck["epoch"], ck["step"]
    except (ValueError, OSError):
        return f"pass --resume {shlex.quote(os.path.abspath(ck_path))} with that run's options to continue it"
    out = os.path.dirname(ck_path)
    if done < options["epochs"] or step:
        return f"continue it with: {command(options, out, ck_path)}"
    return (f"it has trained its {done} epoch(s); to train further: "
            f"{command(options, out, ck_path, epochs=2 * done)} (any --epochs above {done})")


@dataclass
class Run:
    """Everything one training run holds, built by `setup`."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    amp: torch.dtype | None
    ds: data.Dataset
    steps: int
    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    step_fn: object
    aug_gen: torch.Generator
    arch: dict
    ck_path: str
    log: MetricsLog
    data_fingerprint: str
    start_epoch: int = 0
    start_step: int = 0
    resumed: dict | None = None      # the checkpoint resumed from (until `begin` has used it)
    replacing: bool = False          # an --overwrite run before its first checkpoint (a run is set aside)

    def kept(self) -> str:
        return (f"the last good checkpoint is kept: {self.ck_path}" if os.path.exists(self.ck_path)
                else "no checkpoint was written")

    def next_command(self) -> str:
        """What to run next after a stop: continue from the checkpoint, or (none written) start again."""
        cfg = self.cfg
        if os.path.exists(self.ck_path):
            return f"continue with: {command(cfg.options(), cfg.run.out_dir, self.ck_path)}"
        return f"run it again with: {command(cfg.options(), cfg.run.out_dir, cfg.run.resume)} --overwrite"

    def check_weights(self, epoch, step):
        """Stop if the weights are not finite (on every rank: DDP keeps them equal), so that a
        diverged model is never evaluated as if it were fine nor replaces the last good checkpoint."""
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise Stop(EXIT_NON_FINITE, f"the weights became non-finite ({epoch} epoch(s) and "
                                        f"{step} step(s) in): training stopped, {self.kept()}. "
                                        f"Try a lower --lr, or --amp none.")

    def rank0_io(self, write, what: str) -> None:
        """Run rank 0's `write` (the others wait); if it fails (a full disk: OSError), every rank
        stops with EXIT_IO and the last good checkpoint stays as it was."""
        error = None
        if self.rank == 0:
            try:
                write()
            except OSError as e:
                error = e
        if agree(error is not None, self.device):
            why = (f"cannot write {what} ({error.strerror or error})" if error is not None
                   else "rank 0 could not write its files (see its message)")
            raise Stop(EXIT_IO, f"{why}: training stopped, {self.kept()}. Free some space (or fix the "
                                f"directory), then {self.next_command()}")

    def save(self, epoch, step):
        """Write the checkpoint (rank 0) after checking the weights (every rank). The first one
        ends a replacement (--overwrite): the replaced run's files go."""
        self.check_weights(epoch, step)

        def write():
            checkpoint.save(self.ck_path, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": checkpoint.rng_state(self.aug_gen), "epoch": epoch, "step": step,
                "global_step": epoch * self.steps + step,
                "training": continuation_options(self.cfg, self.steps, self.data_fingerprint),
                "args": self.cfg.options(), "arch": self.arch, "n_classes": self.ds.n_classes})
            if self.replacing:
                run_dir.commit(self.cfg.run.out_dir)
        self.rank0_io(write, f"the checkpoint {self.ck_path}")
        self.replacing = False

    def log_record(self, record: dict, step: int) -> None:
        self.rank0_io(lambda: self.log.write(record, step), f"the metrics file {self.log.path}")


def setup(cfg: Config, rank, world, local_rank) -> Run:
    """Device, out dir, data, model, optimiser and resumed state for a resolved config: every check
    this rank can make, and nothing that changes a file but the lock and leftovers of killed saves.
    Raises ValueError / OSError with a message naming the option at fault."""
    opt, run_cfg = cfg.optim, cfg.run
    if opt.batch_size % world:
        raise ValueError(f"--batch-size {opt.batch_size} must be divisible by the number of "
                         f"processes ({world})")
    if opt.batch_size // world < 2:
        raise ValueError(f"--batch-size {opt.batch_size} gives {opt.batch_size // world} image(s) per "
                         f"process: batch norm and the contrastive negatives need at least 2")
    device = pick_device(run_cfg.device, local_rank)
    amp = amp_dtype(run_cfg.amp, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ck = checkpoint.load(run_cfg.resume, "--resume") if run_cfg.resume else None
    ck_path = run_dir.prepare(run_cfg.out_dir, run_cfg.resume, run_cfg.overwrite, rank, continue_hint)
    ds = data.load(cfg.data.dataset, cfg.data.data_path, cfg.data.image_size)
    n_train = len(ds.train)
    steps = n_train // opt.batch_size
    if steps == 0:
        raise ValueError(f"--batch-size {opt.batch_size} exceeds the {n_train} training images")
    if opt.steps_per_epoch:
        steps = min(steps, opt.steps_per_epoch)

    seed_all(run_cfg.seed)
    aug_gen = torch.Generator(device=device)
    aug_gen.manual_seed(run_cfg.seed)
    arch = checkpoint.architecture(cfg)
    model = checkpoint.build_model(arch, ds.n_classes).to(device)
    if cfg.method == "amdim":   # input normalisation statistics (DIM keeps cortex's fixed ones)
        probe, _ = ds.train.batch(np.arange(min(n_train, 2048)))
        pix = augment.eval_view(augment.as_float(probe, "cpu"), cfg.data.policy, cfg.data.image_size)
        pix = pix.transpose(0, 1).reshape(3, -1)
        model.normalize.set_stats(pix.mean(1), pix.std(1))
    optimizer = optim.build(model.parameters(), opt)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    run = Run(cfg, rank, world, device, amp, ds, steps, model, model, optimizer, scaler,
              make_step(cfg), aug_gen, arch, ck_path, MetricsLog(run_cfg.out_dir, False),
              data.fingerprint(ds))
    if ck is not None:
        _restore(run, ck)
    return run


def begin(run: Run) -> None:
    """After every rank has set up (and agreed): the files of the run (rank 0), then DDP. Rank 0
    sets a replaced run aside (--overwrite) and opens the metrics, cut back to a resumed position."""
    cfg = run.cfg.run
    if run.rank == 0:
        run.replacing = run_dir.set_aside(cfg.out_dir, cfg.resume, cfg.overwrite, run.rank)
        run.log = MetricsLog(cfg.out_dir, True)
        if run.resumed is not None and run_dir.resumes_in_place(cfg.out_dir, cfg.resume):
            # records written after this checkpoint (the run was killed before its next save) are redone
            run.log.truncate_after(run.resumed["global_step"])
    run.resumed = None


def _begin(run: Run) -> None:
    """begin() on every rank. A failed write there (a full disk while setting a replaced run aside or
    opening the metrics) is an I/O failure like one mid-run: every rank stops with EXIT_IO before
    any step, and a run that --overwrite had set aside is put back (run_dir.release). A ValueError
    (a metrics file damaged since set-up) is a set-up error on every rank, as in _collective."""
    error = None
    try:
        begin(run)
    except (OSError, ValueError) as e:
        error = e
    if not agree(error is not None, run.device):
        return
    if isinstance(error, ValueError):
        raise SystemExit(f"error: {error}")
    cfg = run.cfg
    again = command(cfg.options(), cfg.run.out_dir, cfg.run.resume) + (" --overwrite" if cfg.run.overwrite else "")
    if error is None:
        why = "rank 0 could not set up the run's files (see its message)"
    else:
        names = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        why = f"cannot set up the run's files ({names + ': ' if names else ''}{error.strerror or error})"
    raise Stop(EXIT_IO, f"{why}: nothing was trained. Free some space (or fix the directory), then run it "
                        f"again with: {again}")


def wrap_ddp(run: Run) -> None:
    if run.world > 1:
        # BatchNorm over the global batch, so K processes match one process exactly
        convert_batchnorm(run.model)
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def continuation_options(cfg: Config, steps: int, data_fingerprint: str) -> dict:
    """The options besides the architecture that an exact continuation must keep: the objective
    (its kernels' backend aside), the augmentation, the batch, the data order and the data. (The
    optimiser's settings and schedule, the epochs and the runtime options may change.)"""
    keep = {"batch_size": cfg.optim.batch_size, "steps_per_epoch": steps, "seed": cfg.run.seed,
            "augment": cfg.data.augment, "data": data_fingerprint}
    objective = {f.name for f in dataclasses.fields(cfg.objective)} - {"loss_backend"}
    keep.update({k: v for k, v in cfg.options().items() if k in objective})
    return keep


def _restore(run: Run, ck: dict) -> None:
    resume = run.cfg.run.resume
    what = f"--resume {resume!r}"
    checkpoint.check_architecture(ck.get("arch") or {}, run.arch, what)
    if ck.get("n_classes") != run.ds.n_classes:
        raise ValueError(f"{what} was trained on {ck.get('n_classes')} classes, but --dataset "
                         f"{run.cfg.data.dataset} now has {run.ds.n_classes}"
                         + (" (its --data-path gained or lost class subfolders)" if run.cfg.data.dataset == "folder"
                            else "") + ": it cannot continue; start a new run with another --out-dir")
    saved = ck.get("training") or {}
    current = continuation_options(run.cfg, run.steps, run.data_fingerprint)
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} (checkpoint) vs {v!r}"
              for k, v in current.items() if k != "data" and saved.get(k) != v]
    if "data" in saved and saved["data"] != current["data"]:   # (absent in files written before it was stored)
        differ.append(f"the training data of --dataset {run.cfg.data.dataset} (--data-path "
                      f"{run.cfg.data.data_path!r}) differ from the checkpoint's")
    if differ:
        raise ValueError(f"{what} cannot continue exactly with other training options: "
                         + "; ".join(differ) + " (only the optimiser's settings and schedule, --epochs and "
                         "runtime options may change; start a new run with --out-dir to change them)")
    run.model.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    for group in run.optimizer.param_groups:   # this run's settings (each step sets its rate)
        group["betas"], group["weight_decay"] = tuple(run.cfg.optim.betas), run.cfg.optim.weight_decay
    if run.scaler is not None and ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    checkpoint.set_rng_state(ck["rng"], run.aug_gen)
    run.start_epoch, run.start_step = ck["epoch"], ck["step"]
    run.resumed = {"global_step": ck["global_step"], "sha256": ck["sha256"]}
    out = run.cfg.run.out_dir
    if run.rank == 0 and run_dir.resumes_in_place(out, resume):
        # the metrics are checked now, before anything is written (begin() cuts them back)
        path = os.path.join(out, METRICS)
        if os.path.exists(path):
            with open(path, "rb") as f:
                parse_records(f.read(), path)


# ----------------------------------------------------------------------------------------------
# training

@torch.no_grad()
def evaluate_online(model, imageset, size, device, policy) -> dict:
    """Test top-1 of each online classifier (evaluation views, eval-mode BN): {name: accuracy}."""
    was_training = model.training
    model.eval()
    correct = {}
    for x, y in image_batches(imageset, size, device, policy):
        for name, logits in model.online_logits(x).items():
            correct[name] = correct.get(name, 0) + int((logits.argmax(1).cpu() == y).sum())
    model.train(was_training)
    return {name: c / len(imageset) for name, c in correct.items()}


def train_one_epoch(run: Run, epoch: int, first: int, stop_signal: dict, summary: dict) -> dict:
    opt, run_cfg = run.cfg.optim, run.cfg.run
    rank, world, device = run.rank, run.world, run.device
    local_b = opt.batch_size // world
    order = epoch_order(run_cfg.seed, epoch, len(run.ds.train))
    bar = Progress(run.steps, f"epoch {epoch + 1}/{opt.epochs}", rank == 0, run_cfg.log_every, first,
                   plain=run_cfg.no_progress)
    t0, seen = time.perf_counter(), 0
    sums = {}   # scalar name -> sum over this epoch's steps (for the epoch means)
    global_step = epoch * run.steps + first
    run.train_model.train()
    for step in range(first, run.steps):
        if agree(stop_signal["sig"] is not None, device):
            if not run.replacing:   # a replacement commits at an epoch's end: stopped before, the old run comes back
                run.save(epoch, step)
            raise _signal_stop(run, stop_signal, f"epoch {epoch + 1}, step {step}", finished=False)
        lo = step * opt.batch_size + rank * local_b
        images, labels = run.ds.train.batch(order[lo:lo + local_b])
        labels = labels.to(device)
        with torch.autocast(device.type, dtype=run.amp, enabled=run.amp is not None):
            out = run.step_fn(run.train_model, images, labels, run.aug_gen, rank, world)
        finite = out is not None
        if finite:
            total, parts = out
            finite = bool(torch.isfinite(total))
        if agree(not finite, device):
            raise Stop(EXIT_NON_FINITE,
                       f"non-finite loss or features at epoch {epoch + 1}, step {step}: training "
                       f"stopped, {run.kept()}. Try a lower --lr, or --amp none.")
        run.optimizer.zero_grad(set_to_none=True)
        lr = optim.set_lr(run.optimizer, opt, global_step, epoch)
        if run.scaler is not None:
            run.scaler.scale(total).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            total.backward()
            run.optimizer.step()
        global_step += 1
        seen += opt.batch_size
        values = torch.stack([v.float() for v in parts.values()])
        if world > 1:   # report global-batch values (mean over ranks' equal-sized rows)
            dist.all_reduce(values)
            values /= world
        scalars = dict(zip(parts, values.tolist()))
        for k, v in scalars.items():
            sums[k] = sums.get(k, 0.0) + v
        summary["losses"].append(scalars["loss"])
        ips = seen / (time.perf_counter() - t0)
        bar.update(1, {"loss": scalars["loss"], "img/s": ips})
        if step % run_cfg.log_every == 0 or step == run.steps - 1:
            run.log_record({"kind": "train", "epoch": epoch + 1, "step": step, "global_step": global_step,
                            "images_per_s": ips, "lr": lr, **scalars}, global_step)
    bar.close()
    run.check_weights(epoch + 1, 0)
    n_steps = run.steps - first
    rec = {"kind": "epoch", "epoch": epoch + 1, "global_step": global_step,
           "images_per_s": seen / max(time.perf_counter() - t0, 1e-9),
           "last_loss": summary["losses"][-1] if summary["losses"] else None,
           "mean": {k: v / n_steps for k, v in sums.items()} if n_steps else {}}
    if device.type == "cuda":
        rec["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if rank == 0 and not run_cfg.no_eval:
        accs = evaluate_online(run.model, run.ds.test, run.cfg.data.image_size, device, run.cfg.data.policy)
        rec.update({f"test_acc_{name}": acc for name, acc in accs.items()})
    return rec


def _signal_stop(run: Run, stop_signal: dict, where: str, finished: bool) -> Stop:
    sig = stop_signal["sig"] or signal.SIGTERM   # (another rank's signal)
    name = signal.Signals(sig).name
    if run.replacing:
        return Stop(128 + int(sig), f"stopped by signal {name} ({where}) before this --overwrite run's first "
                                    f"checkpoint: nothing was saved, the run it replaces is restored; "
                                    f"{run.next_command()}")
    then = "the run is complete" if finished else run.next_command()
    return Stop(128 + int(sig), f"stopped by signal {name}; saved {run.ck_path} ({where}); {then}")


def train(run: Run) -> dict:
    """The epochs from the resumed position on; a checkpoint after each; signals stop at a step
    boundary (saving, except in a replacement's first epoch) or after an epoch's checkpoint (the
    last one's too: the run then ends with the signal's exit code, its checkpoint complete)."""
    summary = {"losses": [], "epochs": [], "checkpoint": run.ck_path}
    stop_signal = {"sig": None}

    def on_signal(sig, frame):
        stop_signal["sig"] = sig
    if threading.current_thread() is threading.main_thread():
        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    else:   # Python delivers signals to the main thread only; whoever runs it there handles them
        old_handlers = {}
        if run.rank == 0:
            print("amdim.train: running outside the main thread: SIGINT / SIGTERM are not caught (the "
                  "checkpoint after each epoch is the resume point)", file=sys.stderr, flush=True)
    try:
        for epoch in range(run.start_epoch, run.cfg.optim.epochs):
            first = run.start_step if epoch == run.start_epoch else 0
            rec = train_one_epoch(run, epoch, first, stop_signal, summary)
            run.log_record(rec, rec["global_step"])
            summary["epochs"].append(rec)
            if run.rank == 0:
                print(epoch_line(rec, run.cfg.optim.epochs, run.cfg.method), flush=True)
            run.save(epoch + 1, 0)
            if agree(stop_signal["sig"] is not None, run.device):
                raise _signal_stop(run, stop_signal, f"after epoch {epoch + 1}",
                                   finished=epoch + 1 == run.cfg.optim.epochs)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return summary


def _collective(where: torch.device, fn):
    """fn() on every rank; if it raises ValueError or OSError on any rank, every rank exits with
    `SystemExit("error: ...")` (a rank failing alone would leave its peers waiting forever)."""
    failed, result = None, None
    try:
        result = fn()
    except OSError as e:
        failed = ValueError(f"{e.filename + ': ' if getattr(e, 'filename', None) else ''}{e.strerror or e}")
    except ValueError as e:
        failed = e
    if agree(failed is not None, where):
        raise SystemExit(f"error: {failed}" if failed is not None
                         else "error: another process failed to set up (see its message)")
    return result


def _same_everywhere(values: dict, world: int, what: str) -> None:
    differ = agreement.differences(values, world)
    if differ:
        raise ValueError(f"the {world} processes must {what}, but they differ in: " + "; ".join(differ))


def run(args) -> dict:
    """Resolve the options, set up (errors become `SystemExit("error: ...")` on every rank) and train.
    `args`: a namespace of build_parser() (None = not given), or a resolved amdim.config.Config."""
    rank, world, local_rank = init_distributed()
    cfg, out_dir = None, None
    # collectives of the set-up run here: CUDA when NCCL is the backend, else the CPU (gloo)
    where = torch.device(f"cuda:{local_rank}") if world > 1 and torch.cuda.is_available() else torch.device("cpu")
    if where.type == "cuda":
        torch.cuda.set_device(where)
    together = False   # every rank leaves at once (the end, or a stop raised on each alike)
    try:
        cfg = _collective(where, lambda: args if isinstance(args, Config) else resolve(given_options(args)))
        if world > 1:
            _collective(where, lambda: _same_everywhere(
                {**agreement.option_values(cfg.options()), "the code (amdim, amdim_kernels, torch)":
                 agreement.code_digest()}, world, "be started with the same options and code"))
        out_dir = cfg.run.out_dir
        if rank == 0:
            print(cfg.describe(), file=sys.stderr, flush=True)
        r = _collective(where, lambda: setup(cfg, rank, world, local_rank))
        if world > 1:
            _collective(where, lambda: _same_everywhere(
                {"the training data": r.data_fingerprint,
                 "the checkpoint of --resume": (r.resumed or {}).get("sha256")}, world, "read the same data and checkpoint"))
        epochs = cfg.optim.epochs
        if r.start_epoch >= epochs:
            if rank == 0:
                print(f"amdim.train: {cfg.run.resume} has already trained {r.start_epoch} epoch(s) and "
                      f"--epochs is {epochs}: nothing to do. To train further: "
                      f"{command(cfg.options(), out_dir, cfg.run.resume, epochs=2 * r.start_epoch)} (any --epochs "
                      f"above {r.start_epoch})", file=sys.stderr, flush=True)
            together = True
            return {"losses": [], "epochs": [], "checkpoint": r.ck_path, "config": cfg}
        _begin(r)
        r.replacing = agree(r.replacing, r.device)   # (rank 0's): every rank must take the same path on a signal
        wrap_ddp(r)
        summary = train(r)
        summary["config"] = cfg
        if rank == 0:
            print(f"amdim.train: done. Checkpoint: {r.ck_path}; metrics: "
                  f"{os.path.join(out_dir, METRICS)}\nLinear probe of the trained encoder: "
                  f"{shlex.join(['python', '-m', 'amdim.evaluate', '--checkpoint', os.path.abspath(r.ck_path)])}",
                  file=sys.stderr, flush=True)
        together = True
        return summary
    except (SystemExit, Stop):   # set-up errors (_collective) and stops are raised on every rank
        together = True
        raise
    finally:
        if out_dir:
            run_dir.release(out_dir)
        if world > 1:
            if together:
                leave_together()   # gloo can abort a process torn down while a peer finishes
            else:
                dist.destroy_process_group()


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except Stop as e:
        print(f"amdim.train: {e}", file=sys.stderr, flush=True)
        sys.exit(e.code)


if __name__ == "__main__":
    main()
