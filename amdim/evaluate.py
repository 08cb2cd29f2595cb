"""Linear-probe evaluation: `python -m amdim.evaluate --checkpoint PATH`.

Fits a linear classifier (ridge regression onto one-hot targets, closed form) on frozen
representations of the labeled training images and reports test top-1 accuracy: AMDIM's global
feature r1; DIM's last convolutional map, fully connected layer and Y. This is the linear probe;
the "online classifiers" that amdim.train reports each epoch are different (trained by SGD beside
the encoder on augmented views). `--features random` probes the same architecture with fresh
random weights and `--features pixels` the raw pixels: the two baselines a trained encoder has to
beat. The ridge penalty is chosen on a held-out fifth of the training set, then the
probe is refit on all of it. Closed form keeps the probe deterministic and takes seconds on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, run_dir
from .config import SEED_MAX, seed_arg
from .data import augment, datasets as data
from .distributed import pick_device
from .metrics import METRICS

FEATURES = ("trained", "random", "pixels")
RIDGE_PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)   # times the number of training rows


def image_batches(imageset, size, device, policy, batch=256):
    """(evaluation views (augment.eval_view) as floats in [0, 1] at size x size on device, labels),
    batch by batch, in order."""
    for i in range(0, len(imageset), batch):
        x, y = imageset.batch(np.arange(i, min(i + batch, len(imageset))))
        yield augment.eval_view(augment.as_float(x, device), policy, size), y


@torch.no_grad()
def encode(model, imageset, size, device, policy) -> dict:
    """model.probe_features of every image (eval mode, no augmentation): {layer: (N, F) on CPU}."""
    was_training = model.training
    model.eval()
    out = {}
    for x, _ in image_batches(imageset, size, device, policy):
        for name, f in model.probe_features(x).items():
            out.setdefault(name, []).append(f.flatten(1).float().cpu())
    model.train(was_training)
    return {name: torch.cat(parts) for name, parts in out.items()}


@torch.no_grad()
def representations(model, imageset, size, device, policy) -> list[str]:
    """The names of model.probe_features, from one forward of two images (so that --layer is checked
    before the whole set is encoded)."""
    was_training = model.training
    model.eval()
    x, _ = next(image_batches(imageset, size, device, policy, batch=2))
    names = list(model.probe_features(x))
    model.train(was_training)
    return names


def check_layers(layers, names) -> None:
    unknown = [n for n in layers or () if n not in names]
    if unknown:
        raise ValueError(f"--layer {', '.join(map(repr, unknown))}: not a representation of this model "
                         f"(it has {', '.join(names)})")


def pixels(imageset, size, policy) -> torch.Tensor:
    return torch.cat([x.flatten(1) for x, _ in image_batches(imageset, size, "cpu", policy, batch=512)])


def ridge_fit(x, y, n_classes, lambdas):
    """Least-squares linear classifier onto centred one-hot targets, one weight matrix per lambda.

    One SVD of x serves every lambda: W(lambda) = V diag(s / (s^2 + lambda)) U^T Y.
    """
    xm = x.mean(0)
    targets = F.one_hot(y, n_classes).double()
    ym = targets.mean(0)
    u, s, vt = torch.linalg.svd(x - xm, full_matrices=False)
    uty = u.T @ (targets - ym)
    fits = {}
    for lam in lambdas:
        w = vt.T @ ((s / (s.square() + lam))[:, None] * uty)
        fits[lam] = (w, ym - xm @ w)
    return fits


def accuracy(x, y, wb) -> float:
    w, b = wb
    return float(((x @ w + b).argmax(1) == y).double().mean())


def linear_probe(train_x, train_y, test_x, test_y, n_classes) -> dict:
    """Standardise with training statistics, pick the ridge penalty on a held-out fifth, refit, test.

    The penalties scale with the number of training rows, so the grid means the same for any N.
    """
    mu, sd = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    tr = ((train_x - mu) / sd).double()
    te = ((test_x - mu) / sd).double()
    train_y, test_y = train_y.long(), test_y.long()
    held = torch.zeros(len(tr), dtype=torch.bool)
    held[torch.randperm(len(tr), generator=torch.Generator().manual_seed(0))[: len(tr) // 5]] = True
    lambdas = [r * len(tr) for r in RIDGE_PENALTIES]
    fits = ridge_fit(tr[~held], train_y[~held], n_classes, lambdas)
    val = {r: accuracy(tr[held], train_y[held], fits[lam]) for r, lam in zip(RIDGE_PENALTIES, lambdas)}
    best = max(RIDGE_PENALTIES, key=lambda r: (val[r], r))   # ties: the stronger penalty
    wb = ridge_fit(tr, train_y, n_classes, [best * len(tr)])[best * len(tr)]
    return {"test_top1": accuracy(te, test_y, wb), "train_top1": accuracy(tr, train_y, wb),
            "ridge_penalty": best, "val_top1_by_penalty": {str(k): v for k, v in val.items()}}


def evaluate(checkpoint_path: str, features="trained", data_path=None, device="auto", seed=0,
             layers=None) -> dict:
    """Linear probe of a checkpoint's frozen representations (or of the baselines: `features` =
    "random" for the same architecture freshly initialised, "pixels" for the raw images).

    Returns the result of the first probed layer at the top level and every layer under "layers"
    (AMDIM: r1; DIM: conv, fc and y, the representations the DIM paper reports). Raises ValueError /
    FileNotFoundError naming the checkpoint or option at fault."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"--seed must be an integer in [0, {SEED_MAX}], got {seed!r}")
    ck = checkpoint.load(checkpoint_path, "--checkpoint")
    a, arch = ck["args"], ck.get("arch")
    if not isinstance(a, dict) or not isinstance(arch, dict) or "n_classes" not in ck:
        raise ValueError(f"--checkpoint {checkpoint_path!r} lacks the run's options (args / arch / "
                         f"n_classes): not written by amdim.train")
    # --data-path, else the checkpoint's (stored absolute)
    ds = data.load(arch["dataset"], data_path if data_path is not None else a.get("data_path"), arch["image_size"])
    size = arch["image_size"]
    policy = augment.POLICIES[a["augment"]]   # its evaluation view
    dev = pick_device(device, 0)
    labeled = ds.train_labeled
    if features == "pixels":
        check_layers(layers, ["pixels"])
        tr, te = {"pixels": pixels(labeled, size, policy)}, {"pixels": pixels(ds.test, size, policy)}
    else:
        torch.manual_seed(seed)
        model = checkpoint.build_model(arch, ck["n_classes"]).to(dev)
        if features == "trained":
            model.load_state_dict(ck["model"])
        else:   # a random encoder still sees normalised inputs, like the trained one
            norm = {k: v for k, v in ck["model"].items() if k.startswith("normalize.")}
            model.load_state_dict(norm, strict=False)
        check_layers(layers, representations(model, labeled, size, dev, policy))
        tr, te = encode(model, labeled, size, dev, policy), encode(model, ds.test, size, dev, policy)
        bad = [n for n in tr if not (torch.isfinite(tr[n]).all() and torch.isfinite(te[n]).all())]
        if bad:
            raise ValueError(f"--checkpoint {checkpoint_path!r} gives non-finite {', '.join(bad)} features "
                             f"(its weights diverged): nothing to probe")
    names = list(tr) if layers is None else list(dict.fromkeys(layers))
    train_y, test_y = torch.from_numpy(labeled.labels), torch.from_numpy(ds.test.labels)
    results = {}
    for name in names:
        results[name] = {"feature_dim": tr[name].shape[1],
                         **linear_probe(tr[name], train_y, te[name], test_y, ds.n_classes)}
    first = results[names[0]]
    return {"features": features, "checkpoint": checkpoint_path, "method": arch["method"],
            "dataset": arch["dataset"], "n_train": len(labeled), "n_test": len(ds.test), "layer": names[0],
            **first, "layers": results}


def check_json_path(path: str, checkpoint_path: str) -> None:
    """--json is checked before the probe: a path that cannot take the result fails now, not after it,
    and neither the checkpoint nor another file of a run directory is ever overwritten."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"--json {path!r} is a directory: name a file")
    if not os.path.isdir(os.path.dirname(full)):
        raise ValueError(f"--json {path!r}: its directory does not exist")
    if os.path.exists(full) and os.path.exists(checkpoint_path) and os.path.samefile(full, checkpoint_path):
        raise ValueError(f"--json {path!r} is the checkpoint itself: name another file")
    d, name = os.path.split(full)
    if ((name.startswith(checkpoint.CHECKPOINT) or name in (METRICS, run_dir.LOCK))
            and any(os.path.exists(os.path.join(d, f)) for f in (checkpoint.CHECKPOINT, METRICS))):
        raise ValueError(f"--json {path!r} is a file of the run in {d!r}: name another file")
    if os.path.exists(full) and not os.access(full, os.W_OK):
        raise ValueError(f"--json {path!r} exists and is not writable")
    if not os.access(os.path.dirname(full), os.W_OK):
        raise ValueError(f"--json {path!r}: its directory is not writable")


def write_json(path: str, text: str) -> None:
    """Write atomically: a temporary file beside it, renamed over it (never a half-written result)."""
    full = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(full), f".{os.path.basename(full)}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, full)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m amdim.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by amdim.train")
    p.add_argument("--features", choices=FEATURES, default="trained",
                   help="trained encoder, the same architecture randomly initialised, or raw pixels "
                        "(default: trained)")
    p.add_argument("--layer", action="append", default=None,
                   help="probe only this representation (repeatable; AMDIM: r1; DIM: conv, fc, y) "
                        "(default: all of them)")
    p.add_argument("--data-path", default=None,
                   help="the dataset's directory (default: the one stored in the checkpoint)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--seed", type=seed_arg, default=0, help="initialisation seed for --features random (default: 0)")
    p.add_argument("--json", default=None, help="also write the result to this file (written atomically)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.json:
            check_json_path(args.json, args.checkpoint)
        result = evaluate(args.checkpoint, args.features, args.data_path, args.device, args.seed, args.layer)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    for name, r in result["layers"].items():
        print(f"linear probe ({args.features}, {name}): test top-1 = {r['test_top1']:.4f} "
              f"(closed-form ridge on frozen features, not the online classifiers)", file=sys.stderr)
    if args.json:
        try:
            write_json(args.json, text + "\n")
        except OSError as e:
            raise SystemExit(f"error: cannot write --json {args.json!r} ({e.strerror or e}); the result "
                             f"is printed above") from None


if __name__ == "__main__":
    main()
