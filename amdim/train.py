"""Train an AMDIM or Deep InfoMax encoder: `python -m amdim.train [options]`, or on K processes
`torchrun --nproc_per_node=K -m amdim.train [options]` (DistributedDataParallel; NCCL on GPUs,
gloo on CPU). The defaults train AMDIM on the built-in digits dataset in about a minute on an
idle 2-core CPU; `--method dim` trains Deep InfoMax (DIM(L) by default, `--dim-preset G` for DIM(G)).

Every rank scores its sources against the targets of the global batch (amdim/amdim_objective.py), so K
processes with --batch-size B train exactly as one process with --batch-size B would.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint, run_dir
from .data import augment, datasets as data
from .checkpoint import CHECKPOINT, METHODS
from .distributed import agree, convert_batchnorm, init_distributed, pick_device
from .evaluate import image_batches
from .metrics import METRICS, MetricsLog, Progress, epoch_line
from .methods import make_step
from .amdim_model import ENCODER_SIZES
from .dim_objective import PRESETS as DIM_PRESETS
from .amdim_objective import COSTS, DEFAULT_COSTS, ESTIMATORS, LOSS_BACKENDS, parse_costs

EXIT_NON_FINITE = 3
EXIT_IO = 4
DIM_ONLY = ("alpha", "beta", "gamma", "local_arch", "prior", "y_dim", "dim_preset", "dim_augment")
AMDIM_ONLY = ("costs", "dense", "n_rkhs", "n_depth", "use_bn", "n_mix", "mix_tau", "mix_alpha", "tclip",
              "reg_weight")


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


def nonneg_float(s):
    v = float(s)
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def costs_arg(s):
    try:
        return parse_costs(s)
    except ValueError as e:   # argparse only reports the text of ArgumentTypeError
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m amdim.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="amdim",
                   help="amdim: Augmented Multiscale DIM; dim: Deep InfoMax (global/local MI, prior matching)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=data.DATASETS, default="digits",
                   help="digits (and the other built-ins) need no download; cifar10/100, stl10 and folder read --data-path")
    g.add_argument("--data-path", default=None, help="directory of the dataset (not used by the built-ins)")
    g.add_argument("--image-size", type=int, choices=ENCODER_SIZES, default=None,
                   help="encoder input size; default: 32 for digits/CIFAR, 64 for STL-10 and folders")
    g = p.add_argument_group("model")
    g.add_argument("--ndf", type=positive_int, default=None,
                   help="base channel width of the encoder (default: 16 for amdim, 32 for dim)")
    g.add_argument("--n-rkhs", type=positive_int, default=128, help="AMDIM: embedding size of r1, r5, r7")
    g.add_argument("--n-depth", type=positive_int, default=1, help="AMDIM: residual layers per encoder stage")
    g.add_argument("--use-bn", action="store_true", help="AMDIM: batch norm inside the encoder trunk")
    g.add_argument("--y-dim", type=positive_int, default=64, help="DIM: size of the representation Y")
    g = p.add_argument_group("objective")
    g.add_argument("--estimator", choices=ESTIMATORS, default=None,
                   help="mutual-information bound: nce (InfoNCE), jsd (Jensen-Shannon) or dv (Donsker-"
                        "Varadhan); default: nce for amdim, jsd for dim (each paper's choice)")
    g.add_argument("--loss-backend", choices=LOSS_BACKENDS, default="fused",
                   help="fused: amdim_kernels' kernels for the device; reference: plain PyTorch")
    g.add_argument("--costs", type=costs_arg, default=",".join(DEFAULT_COSTS),
                   help=f"AMDIM: comma-separated NCE costs, from {','.join(COSTS)} (src scale 't' trg scale)")
    g.add_argument("--dense", action="store_true",
                   help="AMDIM: 5x5/7x7 sources use every location (N = B*25 or B*49) instead of one per image")
    g.add_argument("--tclip", type=positive_float, default=20.0, help="AMDIM: soft clip of the scores")
    g.add_argument("--reg-weight", type=nonneg_float, default=0.05, help="AMDIM: weight of the score regulariser")
    g.add_argument("--n-mix", type=positive_int, default=1,
                   help="AMDIM: mixture components of the global feature for the 1->5 / 1->7 costs (1: none)")
    g.add_argument("--mix-tau", type=positive_float, default=1.0, help="AMDIM: mixture softmax temperature tau")
    g.add_argument("--mix-alpha", type=nonneg_float, default=None,
                   help="AMDIM: weight of the mixture entropy bonus (default 1/tau, which makes q optimal)")
    g.add_argument("--dim-preset", choices=tuple(DIM_PRESETS), default="L",
                   help="DIM: the DIM paper's configuration, giving the defaults of --alpha/--beta/--gamma: "
                        + "; ".join(f"{k}: alpha={v['alpha']:g}, beta={v['beta']:g}, gamma={v['gamma']:g}"
                                    for k, v in DIM_PRESETS.items()))
    g.add_argument("--alpha", type=nonneg_float, default=None, help="DIM: weight of the global MI term")
    g.add_argument("--beta", type=nonneg_float, default=None, help="DIM: weight of the local MI term")
    g.add_argument("--gamma", type=nonneg_float, default=None, help="DIM: weight of prior matching")
    g.add_argument("--local-arch", choices=("dot", "concat"), default="dot",
                   help="DIM: local critic, encoder-and-dot-product (fused kernels) or concat-and-convolve")
    g.add_argument("--prior", choices=("uniform", "gaussian", "none"), default="uniform",
                   help="DIM: prior of Y for prior matching (uniform also squashes Y with a sigmoid)")
    g.add_argument("--dim-augment", action="store_true",
                   help="DIM: train on one augmented view of each image (default: the plain images, as the paper)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=30, help="passes over the training set")
    g.add_argument("--batch-size", type=positive_int, default=64,
                   help="GLOBAL batch size (split evenly over torchrun processes)")
    g.add_argument("--lr", type=positive_float, default=5e-4, help="Adam learning rate (encoder, critics and online classifiers)")
    g.add_argument("--steps-per-epoch", type=positive_int, default=None,
                   help="cap on steps per epoch (default: one pass over the training set)")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order, augmentation and sampling")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="mixed precision on CUDA (auto: bf16 where supported); CPU runs in fp32")
    g.add_argument("--out-dir", default=None,
                   help="checkpoint, metrics.jsonl and TensorBoard logs (default: runs/<method>)")
    g.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue exactly from this checkpoint (same later losses as an uninterrupted run)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out-dir (without it such a run is refused)")
    g.add_argument("--log-every", type=positive_int, default=10, help="steps between metric lines")
    g.add_argument("--no-eval", action="store_true", help="skip the per-epoch test accuracy of the online classifiers")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (plain lines every --log-every steps)")
    return p


# ----------------------------------------------------------------------------------------------
# set-up

class Stop(Exception):
    """Training ends early with an exit code and a message (signal, non-finite loss, I/O failure)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def resolve_options(args, parser_defaults: dict | None = None) -> None:
    """Fill method-dependent defaults in place; ValueError naming options that do not fit --method."""
    defaults = parser_defaults or vars(build_parser().parse_args([]))
    other = DIM_ONLY if args.method == "amdim" else AMDIM_ONLY
    misplaced = [k for k in other if getattr(args, k) != defaults[k]]
    if misplaced:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in misplaced)} "
                         f"{'does' if len(misplaced) == 1 else 'do'} not apply to --method {args.method}")
    if args.ndf is None:
        args.ndf = 32 if args.method == "dim" else 16
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", args.method)
    if args.method == "dim":
        if args.image_size not in (None, 32, 64):
            raise ValueError(f"--image-size {args.image_size} is not available for --method dim "
                             f"(its encoders take 32 or 64 px images)")
        args.estimator = args.estimator or "jsd"
        for k, v in DIM_PRESETS[args.dim_preset].items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        if args.alpha == 0 and args.beta == 0:
            raise ValueError("--alpha and --beta are both 0: DIM needs a global or a local MI term")
        if args.gamma > 0 and args.prior == "none":
            raise ValueError(f"--gamma {args.gamma:g} weights prior matching, but --prior is none "
                             f"(pass --gamma 0, or a prior)")
        return
    args.estimator = args.estimator or "nce"
    if args.n_mix > 1 and args.estimator != "nce":
        raise ValueError(f"--n-mix {args.n_mix} needs --estimator nce (the mixture loss is defined for "
                         f"NCE), got --estimator {args.estimator}")
    if args.n_mix > 1 and not any(c[0] == "1" for c in args.costs):
        raise ValueError(f"--n-mix {args.n_mix} mixes the global feature, but --costs "
                         f"{','.join(args.costs)} has no 1->5 or 1->7 cost")


def amp_dtype(spec: str, device: torch.device):
    if device.type != "cuda" or spec == "none":
        return None
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


@dataclass
class Run:
    """Everything one training run holds, built by `setup`."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    amp: torch.dtype | None
    ds: data.Dataset
    size: int
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
    start_epoch: int = 0
    start_step: int = 0

    def check_weights(self, epoch, step):
        """Stop if the weights are not finite (on every rank: DDP keeps them equal), so that a
        diverged model is never evaluated as if it were fine nor replaces the last good checkpoint."""
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            kept = (f"the last good checkpoint is kept: {self.ck_path}" if os.path.exists(self.ck_path)
                    else "no checkpoint was written")
            raise Stop(EXIT_NON_FINITE, f"the weights became non-finite ({epoch} epoch(s) and "
                                        f"{step} step(s) in): training stopped, {kept}. "
                                        f"Try a lower --lr, or --amp none.")

    def save(self, epoch, step):
        """Write the checkpoint (rank 0) after checking the weights (every rank)."""
        self.check_weights(epoch, step)
        if self.rank != 0:
            return
        try:
            checkpoint.save(self.ck_path, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": checkpoint.rng_state(self.aug_gen), "epoch": epoch, "step": step,
                "global_step": epoch * self.steps + step, "training": training_options(self),
                "args": vars(self.args), "arch": self.arch, "n_classes": self.ds.n_classes})
        except OSError as e:
            raise Stop(EXIT_IO, f"cannot write the checkpoint {self.ck_path} ({e.strerror or e}); "
                                f"the last good checkpoint, if any, is kept") from None


def setup(args, rank, world, local_rank) -> Run:
    """Options, device, out dir, data, model, optimiser and resumed state. Raises ValueError /
    FileNotFoundError with a message naming the option at fault."""
    resolve_options(args)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the number of "
                         f"processes ({world})")
    if args.batch_size // world < 2:
        raise ValueError(f"--batch-size {args.batch_size} gives {args.batch_size // world} image(s) per "
                         f"process: batch norm and the contrastive negatives need at least 2")
    device = pick_device(args.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.data_path is not None:   # stored absolute: amdim.evaluate may run from another directory
        args.data_path = os.path.abspath(args.data_path)
    ck = checkpoint.load(args.resume, "--resume") if args.resume else None
    ck_path = run_dir.prepare(args.out_dir, args.resume, args.overwrite, rank)
    ds = data.load(args.dataset, args.data_path, args.image_size)
    size = args.image_size or data.NATURAL_SIZE[args.dataset]
    n_train = len(ds.train)
    steps = n_train // args.batch_size
    if steps == 0:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {n_train} training images")
    if args.steps_per_epoch:
        steps = min(steps, args.steps_per_epoch)

    seed_all(args.seed)
    aug_gen = torch.Generator(device=device)
    aug_gen.manual_seed(args.seed)
    arch = checkpoint.architecture(vars(args), size)
    model = checkpoint.build_model(arch, ds.n_classes).to(device)
    probe, _ = ds.train.batch(np.arange(min(n_train, 2048)))   # input normalisation statistics
    pix = augment.to_float(probe).transpose(0, 1).reshape(3, -1)
    model.normalize.set_stats(pix.mean(1), pix.std(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.8, 0.999), eps=1e-8)
    amp = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    run = Run(args, rank, world, device, amp, ds, size, steps, model, model, optimizer, scaler,
              make_step(args, size), aug_gen, arch, ck_path, MetricsLog(args.out_dir, rank == 0))
    if ck is not None:
        _restore(run, ck)
    run_dir.clear_replaced(args.out_dir, args.resume, args.overwrite, rank)
    if world > 1:
        # BatchNorm over the global batch, so K processes match one process exactly
        convert_batchnorm(model)
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def training_options(run: Run) -> dict:
    """The options besides the architecture that an exact continuation must keep: the objective,
    the batch and the data order. (--lr, --epochs and the runtime options may change.)"""
    a = run.args
    keep = {"batch_size": a.batch_size, "steps_per_epoch": run.steps, "seed": a.seed, "estimator": a.estimator}
    names = (("alpha", "beta", "gamma", "dim_augment") if a.method == "dim" else
             ("costs", "dense", "tclip", "reg_weight", "mix_tau", "mix_alpha"))
    keep.update({k: getattr(a, k) for k in names})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in keep.items()}


def _restore(run: Run, ck: dict) -> None:
    args = run.args
    what = f"--resume {args.resume!r}"
    checkpoint.check_architecture(ck.get("arch") or {}, run.arch, what)
    saved = ck.get("training") or {}
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} (checkpoint) vs {v!r}"
              for k, v in training_options(run).items() if saved.get(k) != v]
    if differ:
        raise ValueError(f"{what} cannot continue exactly with other training options: "
                         + "; ".join(differ) + " (only --lr, --epochs and runtime options may change; "
                         "start a new run with --out-dir to change them)")
    run.model.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    for group in run.optimizer.param_groups:   # the command line's lr wins over the saved one
        group["lr"] = args.lr
    if run.scaler is not None and ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    checkpoint.set_rng_state(ck["rng"], run.aug_gen)
    run.start_epoch, run.start_step = ck["epoch"], ck["step"]
    if run.rank == 0 and os.path.samefile(os.path.dirname(os.path.abspath(args.resume)), args.out_dir):
        # records written after this checkpoint (the run was killed before its next save) are redone
        run.log.truncate_after(ck["global_step"])


# ----------------------------------------------------------------------------------------------
# training

@torch.no_grad()
def evaluate_online(model, imageset, size, device):
    """Test top-1 of the online MLP and linear classifiers (no augmentation, eval-mode BN)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(2)
    for x, y in image_batches(imageset, size, device):
        for j, logits in enumerate(model.online_logits(x)):
            correct[j] += (logits.argmax(1).cpu() == y).sum()
    model.train(was_training)
    return (correct / len(imageset)).tolist()


def classifier_losses(logits, labels) -> dict:
    """Cross-entropy and accuracy of the online classifiers on the labeled rows (label >= 0)."""
    labeled = labels >= 0
    out = {}
    for name, lg in zip(("mlp", "lin"), logits):
        lg = lg.float()[labeled]
        out[name] = F.cross_entropy(lg, labels[labeled]) if len(lg) else lg.sum()
        out[f"acc_{name}"] = (lg.argmax(1) == labels[labeled]).float().mean() if len(lg) else lg.sum()
    return out


def train_one_epoch(run: Run, epoch: int, first: int, stop_signal: dict, summary: dict) -> dict:
    args, rank, world, device = run.args, run.rank, run.world, run.device
    local_b = args.batch_size // world
    order = epoch_order(args.seed, epoch, len(run.ds.train))
    bar = Progress(run.steps, f"epoch {epoch + 1}/{args.epochs}", rank == 0 and not args.no_progress,
                   args.log_every, first)
    t0, seen = time.perf_counter(), 0
    global_step = epoch * run.steps + first
    run.train_model.train()
    for step in range(first, run.steps):
        if agree(stop_signal["sig"] is not None, device):
            run.save(epoch, step)
            sig = stop_signal["sig"] or signal.SIGTERM
            raise Stop(128 + int(sig), f"stopped by signal {signal.Signals(sig).name}; saved "
                                       f"{run.ck_path} (epoch {epoch + 1}, step {step}); continue with "
                                       f"--resume {run.ck_path}")
        lo = step * args.batch_size + rank * local_b
        images, labels = run.ds.train.batch(order[lo:lo + local_b])
        labels = labels.to(device)
        with torch.autocast(device.type, dtype=run.amp, enabled=run.amp is not None):
            out = run.step_fn(run.train_model, images.to(device), run.aug_gen, rank, world)
        finite = out is not None
        if finite:
            loss, parts, logits = out
            cls = classifier_losses(logits, labels)
            total = loss + cls["mlp"] + cls["lin"]
            finite = bool(torch.isfinite(total))
        if agree(not finite, device):
            raise Stop(EXIT_NON_FINITE,
                       f"non-finite loss or features at epoch {epoch + 1}, step {step}: training "
                       f"stopped. " + (f"The last good checkpoint is kept: {run.ck_path}."
                                       if os.path.exists(run.ck_path) else "No checkpoint was written yet.")
                       + " Try a lower --lr, or --amp none.")
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is not None:
            run.scaler.scale(total).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            total.backward()
            run.optimizer.step()
        global_step += 1
        seen += args.batch_size
        scalars = {"loss": loss.detach(), **parts, **{f"cls_{k}": v.detach() for k, v in cls.items()}}
        values = torch.stack([v.float() for v in scalars.values()])
        if world > 1:   # report global-batch values (mean over ranks' equal-sized rows)
            dist.all_reduce(values)
            values /= world
        scalars = dict(zip(scalars, values.tolist()))
        summary["losses"].append(scalars["loss"])
        ips = seen / (time.perf_counter() - t0)
        bar.update(1, {"loss": scalars["loss"], "img/s": ips})
        if step % args.log_every == 0 or step == run.steps - 1:
            run.log.write({"kind": "train", "epoch": epoch + 1, "step": step, "global_step": global_step,
                           "images_per_s": ips, **scalars}, global_step)
    bar.close()
    run.check_weights(epoch + 1, 0)
    rec = {"kind": "epoch", "epoch": epoch + 1, "global_step": global_step,
           "images_per_s": seen / max(time.perf_counter() - t0, 1e-9),
           "last_loss": summary["losses"][-1] if summary["losses"] else None}
    if device.type == "cuda":
        rec["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if rank == 0 and not args.no_eval:
        rec["test_acc_mlp"], rec["test_acc_lin"] = evaluate_online(run.model, run.ds.test, run.size, device)
    return rec


def train(run: Run) -> dict:
    """The epochs from the resumed position on; a checkpoint after each; signals stop at a step."""
    args = run.args
    summary = {"losses": [], "epochs": [], "checkpoint": run.ck_path}
    stop_signal = {"sig": None}

    def on_signal(sig, frame):
        stop_signal["sig"] = sig
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for epoch in range(run.start_epoch, args.epochs):
            first = run.start_step if epoch == run.start_epoch else 0
            rec = train_one_epoch(run, epoch, first, stop_signal, summary)
            try:
                run.log.write(rec, rec["global_step"])
            except OSError as e:
                raise Stop(EXIT_IO, f"cannot write {run.log.path} ({e.strerror or e}); the last good "
                                    f"checkpoint is kept: {run.ck_path}") from None
            summary["epochs"].append(rec)
            if run.rank == 0:
                print(epoch_line(rec, args.epochs), flush=True)
            run.save(epoch + 1, 0)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return summary


def run(args) -> dict:
    """Set up (errors become `SystemExit("error: ...")` on every rank) and train."""
    rank, world, local_rank = init_distributed()
    try:
        failed = None
        try:
            r = setup(args, rank, world, local_rank)
        except (ValueError, FileNotFoundError) as e:
            failed = e
        # set-up errors are collective: a rank that failed alone would leave its peers waiting forever
        where = torch.device(f"cuda:{local_rank}") if world > 1 and torch.cuda.is_available() else torch.device("cpu")
        if agree(failed is not None, where):
            raise SystemExit(f"error: {failed}" if failed is not None
                             else "error: another process failed to set up (see its message)")
        if r.start_epoch >= args.epochs:
            if rank == 0:
                print(f"amdim.train: {args.resume} has already trained {r.start_epoch} epoch(s) and "
                      f"--epochs is {args.epochs}: nothing to do. To train further, pass --resume "
                      f"{args.resume} --epochs N with N > {r.start_epoch}.", file=sys.stderr, flush=True)
            return {"losses": [], "epochs": [], "checkpoint": r.ck_path}
        summary = train(r)
        if rank == 0:
            print(f"amdim.train: done. Checkpoint: {r.ck_path}; metrics: "
                  f"{os.path.join(args.out_dir, METRICS)}\nLinear probe of the trained encoder: "
                  f"python -m amdim.evaluate --checkpoint {r.ck_path}", file=sys.stderr, flush=True)
        if world > 1:
            # tearing gloo down while a peer still finishes its last collective can abort the
            # process ("terminate called without an active exception"): leave together
            dist.barrier()
        return summary
    finally:
        if args.out_dir:
            run_dir.release(args.out_dir)
        if world > 1:
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
