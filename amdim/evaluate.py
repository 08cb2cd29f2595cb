"""Linear-probe evaluation: `python -m amdim.evaluate --checkpoint PATH`.

Fits a linear classifier (ridge regression onto one-hot targets, closed form) on frozen global
features (r1) of the labeled training images and reports test top-1 accuracy. `--features random` probes the same architecture with
fresh random weights and `--features pixels` probes the raw pixels: the two baselines a trained
encoder has to beat. The ridge penalty is chosen on a held-out fifth of the training set, then the
probe is refit on all of it. Closed form keeps the probe deterministic and takes seconds on a CPU.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from . import augment, data
from .model import AMDIM
from .train import load_checkpoint, pick_device

FEATURES = ("trained", "random", "pixels")
RIDGE_PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)   # times the number of training rows


@torch.no_grad()
def extract(encoder, imageset, size, mean, std, device, batch=256) -> torch.Tensor:
    """r1 features (N, n_rkhs) of the un-augmented images, encoder in eval mode."""
    encoder.eval()
    out = []
    for i in range(0, len(imageset), batch):
        x, _ = imageset.batch(np.arange(i, min(i + batch, len(imageset))))
        x = (augment.resize(augment.to_float(x.to(device)), size) - mean) / std
        out.append(encoder(x)[0].flatten(1).float().cpu())
    return torch.cat(out)


def pixels(imageset, size, batch=512) -> torch.Tensor:
    out = []
    for i in range(0, len(imageset), batch):
        x, _ = imageset.batch(np.arange(i, min(i + batch, len(imageset))))
        out.append(augment.resize(augment.to_float(x), size).flatten(1))
    return torch.cat(out)


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


def evaluate(checkpoint: str, features="trained", data_path=None, device="auto", seed=0) -> dict:
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    ck = load_checkpoint(checkpoint)
    a = ck["args"]
    ds = data.load(a["dataset"], data_path or a["data_path"], a["image_size"])
    size = ck["image_size"]
    dev = pick_device(device, 0)
    labeled = ds.train_labeled
    if features == "pixels":
        tr, te = pixels(labeled, size), pixels(ds.test, size)
    else:
        torch.manual_seed(seed)
        model = AMDIM(size, a["ndf"], a["n_rkhs"], a["n_depth"], a["use_bn"], ck["n_classes"],
                      a.get("n_mix", 1)).to(dev)
        if features == "trained":
            model.load_state_dict(ck["model"])
        mean, std = (t.to(dev) for t in ck["norm"])
        tr = extract(model.encoder, labeled, size, mean, std, dev)
        te = extract(model.encoder, ds.test, size, mean, std, dev)
    result = linear_probe(tr, torch.from_numpy(labeled.labels), te, torch.from_numpy(ds.test.labels), ds.n_classes)
    return {"features": features, "checkpoint": checkpoint, "dataset": a["dataset"],
            "n_train": len(labeled), "n_test": len(ds.test), "feature_dim": tr.shape[1], **result}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m amdim.evaluate", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by amdim.train")
    p.add_argument("--features", choices=FEATURES, default="trained",
                   help="trained encoder, the same architecture randomly initialised, or raw pixels")
    p.add_argument("--data-path", default=None, help="override the dataset path stored in the checkpoint")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --features random")
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args(argv)
    result = evaluate(args.checkpoint, args.features, args.data_path, args.device, args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(f"linear probe ({args.features}): test top-1 = {result['test_top1']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
