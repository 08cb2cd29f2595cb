"""Train an AMDIM encoder: `python -m amdim.train [options]`, or on K processes
`torchrun --nproc_per_node=K -m amdim.train [options]` (DistributedDataParallel; NCCL on GPUs,
gloo on CPU). The defaults train on the built-in digits dataset on a 2-core CPU in 1-3 minutes
(about 1 when the machine is idle).

Every rank scores its sources against the targets of the global batch (see amdim/objective.py),
so K processes with --batch-size B train exactly as one process with --batch-size B would.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import augment, data
from .distributed import convert_batchnorm
from .model import ENCODER_SIZES, AMDIM
from .objective import (COSTS, DEFAULT_COSTS, ESTIMATORS, LOSS_BACKENDS, MultiscaleNCE, mixture_fn, nce_fn,
                        parse_costs)

EXIT_NON_FINITE = 3
# options that fix the shapes of the saved weights: --resume must be given the same ones
ARCHITECTURE = ("dataset", "image_size", "ndf", "n_rkhs", "n_depth", "use_bn", "n_mix")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


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
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=data.DATASETS, default="digits",
                   help="digits is built in (scikit-learn, no download); the others read --data-path")
    g.add_argument("--data-path", default=None, help="directory of the dataset (not used by digits)")
    g.add_argument("--image-size", type=int, choices=ENCODER_SIZES, default=None,
                   help="encoder input size; default: 32 for digits/CIFAR, 64 for STL-10 and folders")
    g = p.add_argument_group("model")
    g.add_argument("--ndf", type=positive_int, default=16, help="base channel width of the encoder")
    g.add_argument("--n-rkhs", type=positive_int, default=128, help="embedding size of r1, r5, r7")
    g.add_argument("--n-depth", type=positive_int, default=1, help="residual layers per encoder stage")
    g.add_argument("--use-bn", action="store_true", help="batch norm inside the encoder trunk")
    g = p.add_argument_group("objective")
    g.add_argument("--costs", type=costs_arg, default=",".join(DEFAULT_COSTS),
                   help=f"comma-separated NCE costs, from {','.join(COSTS)} (src scale 't' trg scale)")
    g.add_argument("--dense", action="store_true",
                   help="5x5/7x7 sources use every location (N = B*25 or B*49) instead of one per image")
    g.add_argument("--tclip", type=positive_float, default=20.0, help="soft clip of the scores")
    g.add_argument("--reg-weight", type=nonneg_float, default=0.05, help="weight of the score regulariser")
    g.add_argument("--loss-backend", choices=LOSS_BACKENDS, default="fused",
                   help="fused: amdim_kernels' kernels for the device; reference: plain PyTorch")
    g.add_argument("--estimator", choices=ESTIMATORS, default="nce",
                   help="mutual-information bound: AMDIM's NCE, or DIM's Jensen-Shannon / Donsker-Varadhan")
    g.add_argument("--n-mix", type=positive_int, default=1,
                   help="mixture components of the global feature for the 1->5 / 1->7 costs (1: none)")
    g.add_argument("--mix-tau", type=positive_float, default=1.0, help="mixture softmax temperature tau")
    g.add_argument("--mix-alpha", type=nonneg_float, default=None,
                   help="weight of the mixture entropy bonus (default 1/tau, which makes q optimal)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=30, help="passes over the training set")
    g.add_argument("--batch-size", type=positive_int, default=64,
                   help="GLOBAL batch size (split evenly over torchrun processes)")
    g.add_argument("--lr", type=positive_float, default=5e-4, help="Adam learning rate (encoder and online classifiers)")
    g.add_argument("--steps-per-epoch", type=positive_int, default=None,
                   help="cap on steps per epoch (default: one pass over the training set)")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order, augmentation and sampling")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="mixed precision on CUDA (auto: bf16 where supported); CPU runs in fp32")
    g.add_argument("--out-dir", default="runs/amdim", help="checkpoint, metrics.jsonl and TensorBoard logs")
    g.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue exactly from this checkpoint (same later losses as an uninterrupted run)")
    g.add_argument("--log-every", type=positive_int, default=10, help="steps between metric lines")
    g.add_argument("--no-eval", action="store_true", help="skip the per-epoch test accuracy of the online classifiers")
    return p


# ----------------------------------------------------------------------------------------------
# setup

def init_distributed():
    """(rank, world, local_rank) from torchrun's environment; initialise the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), world, local_rank


def pick_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise SystemExit(f"error: --device {spec!r} is not a device (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {spec!r} asks for CUDA, which is not available here")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    elif dev.type != "cpu":
        raise SystemExit(f"error: --device {spec!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return dev


def amp_dtype(spec: str, device: torch.device):
    if device.type != "cuda" or spec == "none":
        return None
    if spec == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if spec == "bf16" else torch.float16


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(aug_gen: torch.Generator) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "augment": aug_gen.get_state()}


def set_rng_state(state: dict, aug_gen: torch.Generator):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    aug_gen.set_state(state["augment"])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Data order of an epoch: a function of (seed, epoch) only, identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def save_checkpoint(path: str, state: dict):
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"error: --resume {path!r}: no such checkpoint file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: --resume {path!r} is not a readable checkpoint ({type(e).__name__}: {e})")
    if not isinstance(ck, dict) or "model" not in ck or "args" not in ck:
        raise SystemExit(f"error: --resume {path!r} is not an amdim.train checkpoint")
    return ck


class Progress:
    """tqdm bar when tqdm is installed, else one line every log_every steps."""

    def __init__(self, total, desc, enabled, log_every, initial=0):
        self.bar, self.enabled, self.log_every = None, enabled, log_every
        self.n, self.total, self.desc = initial, total, desc
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)
            except ImportError:
                pass

    def update(self, n, metrics: dict):
        self.n += n
        if not self.enabled:
            return
        text = {k: f"{v:.3g}" for k, v in metrics.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(n)
        elif self.n % self.log_every == 0 or self.n == self.total:
            print(f"{self.desc} {self.n}/{self.total} " + " ".join(f"{k}={v}" for k, v in text.items()),
                  flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """Append-only JSONL (rank 0), mirrored to TensorBoard when it is installed."""

    def __init__(self, out_dir, enabled):
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        self.path = os.path.join(out_dir, METRICS)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except ImportError:   # tensorboard is optional
            pass

    def write(self, record: dict, step: int):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, step)
            self.tb.flush()


# ----------------------------------------------------------------------------------------------
# training

class Stop(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def normalize(x, mean, std):
    return (x - mean) / std


@torch.no_grad()
def evaluate_online(model, imageset, size, mean, std, device, batch=256):
    """Test top-1 of the online MLP and linear classifiers (no augmentation, eval-mode BN)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(2)
    for i in range(0, len(imageset), batch):
        x, y = imageset.batch(np.arange(i, min(i + batch, len(imageset))))
        x = normalize(augment.resize(augment.to_float(x.to(device)), size), mean, std)
        r1 = model.encoder(x)[0]
        for j, logits in enumerate(model.classifiers(r1)):
            correct[j] += (logits.argmax(1).cpu() == y).sum()
    model.train(was_training)
    return (correct / len(imageset)).tolist()


def run(args) -> dict:
    rank, world, local_rank = init_distributed()
    try:
        result = _train(args, rank, world, local_rank)
        if world > 1:
            # tearing gloo down while a peer still finishes its last collective can abort the
            # process ("terminate called without an active exception"): leave together
            dist.barrier()
        return result
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(args, rank, world, local_rank):
    if args.n_mix > 1 and args.estimator != "nce":
        raise SystemExit(f"error: --n-mix {args.n_mix} needs --estimator nce (the mixture loss is "
                         f"defined for NCE), got --estimator {args.estimator}")
    if args.n_mix > 1 and not any(c[0] == "1" for c in args.costs):
        raise SystemExit(f"error: --n-mix {args.n_mix} mixes the global feature, but --costs "
                         f"{','.join(args.costs)} has no 1->5 or 1->7 cost")
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be divisible by the number of "
                         f"processes ({world})")
    device = pick_device(args.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = amp_dtype(args.amp, device)
    try:
        ds = data.load(args.dataset, args.data_path, args.image_size)
    except (ValueError, FileNotFoundError) as e:   # the loaders' messages name the path and format
        raise SystemExit(f"error: {e}") from None
    size = args.image_size or data.NATURAL_SIZE[args.dataset]
    local_b = args.batch_size // world
    n_train = len(ds.train)
    steps = n_train // args.batch_size
    if steps == 0:
        raise SystemExit(f"error: --batch-size {args.batch_size} exceeds the {n_train} training images")
    if args.steps_per_epoch:
        steps = min(steps, args.steps_per_epoch)

    seed_all(args.seed)
    aug_gen = torch.Generator(device=device)
    aug_gen.manual_seed(args.seed)
    model = AMDIM(size, args.ndf, args.n_rkhs, args.n_depth, args.use_bn, ds.n_classes, args.n_mix).to(device)
    # per-channel statistics of the training images, for input normalisation
    probe, _ = ds.train.batch(np.arange(min(n_train, 2048)))
    pix = augment.to_float(probe).transpose(0, 1).reshape(3, -1)
    mean = pix.mean(1).view(1, 3, 1, 1).to(device)
    std = pix.std(1).clamp(min=1e-3).view(1, 3, 1, 1).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.8, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    start_epoch, start_step = 0, 0
    if args.resume:
        ck = load_checkpoint(args.resume)
        saved = ck["args"]
        differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} (checkpoint) vs {getattr(args, k)!r}"
                  for k in ARCHITECTURE if saved.get(k, 1 if k == "n_mix" else None) != getattr(args, k)]
        if differ:
            raise SystemExit(f"error: --resume {args.resume!r} was trained with different options: "
                             + "; ".join(differ))
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        for group in optimizer.param_groups:   # the command line's lr wins over the saved one
            group["lr"] = args.lr
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"], aug_gen)
        start_epoch, start_step = ck["epoch"], ck["step"]
    train_model = model
    if world > 1:
        # BatchNorm over the global batch, so K processes match one process exactly
        convert_batchnorm(model)
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    mixture = (mixture_fn(args.loss_backend, args.tclip, args.reg_weight, args.mix_tau, args.mix_alpha)
               if args.n_mix > 1 else None)
    objective = MultiscaleNCE(nce_fn(args.loss_backend, args.tclip, args.reg_weight, args.estimator),
                              args.costs, args.dense, mixture)
    cfg = augment.AugmentConfig(size=size)

    os.makedirs(args.out_dir, exist_ok=True)
    ck_path = os.path.join(args.out_dir, CHECKPOINT)
    log = MetricsLog(args.out_dir, rank == 0)
    stop_signal = {"sig": None}

    def on_signal(sig, frame):
        stop_signal["sig"] = sig
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint(epoch, step):
        if rank == 0:
            save_checkpoint(ck_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "scaler": scaler.state_dict() if scaler else None,
                                      "rng": rng_state(aug_gen), "epoch": epoch, "step": step,
                                      "args": vars(args), "image_size": size, "n_classes": ds.n_classes,
                                      "norm": (mean.cpu(), std.cpu())})

    def agree(flag: bool) -> bool:
        """True on every rank when it is true on any rank (stop decisions must be collective)."""
        if world == 1:
            return flag
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    summary = {"losses": [], "epochs": []}
    global_step = start_epoch * steps + start_step
    try:
        for epoch in range(start_epoch, args.epochs):
            order = epoch_order(args.seed, epoch, n_train)
            first = start_step if epoch == start_epoch else 0
            bar = Progress(steps, f"epoch {epoch + 1}/{args.epochs}", rank == 0, args.log_every, first)
            t0, seen = time.perf_counter(), 0
            train_model.train()
            for step in range(first, steps):
                if agree(stop_signal["sig"] is not None):
                    checkpoint(epoch, step)
                    sig = stop_signal["sig"] or signal.SIGTERM
                    raise Stop(128 + int(sig), f"stopped by signal {signal.Signals(sig).name}; "
                                               f"saved {ck_path} (epoch {epoch + 1}, step {step})")
                lo = step * args.batch_size + rank * local_b
                images, labels = ds.train.batch(order[lo:lo + local_b])
                x1, x2 = augment.two_views(images, cfg, aug_gen, rank, world)
                x1, x2 = normalize(x1, mean, std), normalize(x2, mean, std)
                labels = labels.to(device)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    (f1, f2), logits = train_model(x1, x2)
                feats1 = [r.float() for r in f1]
                feats2 = [r.float() for r in f2]
                finite = all(bool(torch.isfinite(r).all()) for r in feats1 + feats2)
                if finite:
                    nce_total, parts = objective(feats1, feats2, aug_gen)
                    labeled = labels >= 0
                    cls = {}
                    for name, lg in zip(("mlp", "lin"), logits):
                        lg = lg.float()[labeled]
                        cls[name] = F.cross_entropy(lg, labels[labeled]) if len(lg) else lg.sum()
                        cls[f"acc_{name}"] = (lg.argmax(1) == labels[labeled]).float().mean() if len(lg) else lg.sum()
                    loss = nce_total + cls["mlp"] + cls["lin"]
                    finite = bool(torch.isfinite(loss))
                if agree(not finite):
                    raise Stop(EXIT_NON_FINITE,
                               f"non-finite loss or features at epoch {epoch + 1}, step {step}: training "
                               f"stopped. The last good checkpoint is kept: {ck_path}"
                               + ("" if os.path.exists(ck_path) else " (none was written yet)")
                               + ". Try a lower --lr, or --amp none.")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                global_step += 1
                seen += args.batch_size
                scalars = {"loss": nce_total.detach(), **parts, **{f"cls_{k}": v.detach() for k, v in cls.items()}}
                values = torch.stack([v.float() for v in scalars.values()])
                if world > 1:   # report global-batch values (mean over ranks' equal-sized rows)
                    dist.all_reduce(values)
                    values /= world
                scalars = dict(zip(scalars, values.tolist()))
                nce_val = scalars["loss"]
                summary["losses"].append(nce_val)
                ips = seen / (time.perf_counter() - t0)
                bar.update(1, {"nce": nce_val, "img/s": ips})
                if step % args.log_every == 0 or step == steps - 1:
                    rec = {"kind": "train", "epoch": epoch + 1, "step": step, "global_step": global_step,
                           "images_per_s": ips, **scalars}
                    log.write(rec, global_step)
            bar.close()
            rec = {"kind": "epoch", "epoch": epoch + 1, "global_step": global_step,
                   "images_per_s": seen / max(time.perf_counter() - t0, 1e-9),
                   "last_loss": summary["losses"][-1] if summary["losses"] else None}
            if device.type == "cuda":
                rec["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            if rank == 0 and not args.no_eval:
                rec["test_acc_mlp"], rec["test_acc_lin"] = evaluate_online(model, ds.test, size, mean, std, device)
            log.write(rec, global_step)
            summary["epochs"].append(rec)
            if rank == 0:
                print(json.dumps(rec), flush=True)
            checkpoint(epoch + 1, 0)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    summary["checkpoint"] = ck_path
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except Stop as e:
        print(f"amdim.train: {e}", file=sys.stderr, flush=True)
        sys.exit(e.code)


if __name__ == "__main__":
    main()
