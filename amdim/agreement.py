"""What every rank of a distributed amdim.train run must agree on before training: the options that
shape the computation, the code, the training data and the resumed checkpoint.

Ranks started with different options (a per-node typo in a multi-node launch) would otherwise hang
in a collective until its timeout (different --epochs or step counts), abort inside gloo (different
--batch-size), or train to different weights on each rank and average their gradients silently
(different --lr). `differences` gathers each rank's values and names every one that differs, on
every rank alike, so that all of them stop with the same message.
"""
from __future__ import annotations

import hashlib
import os

import torch.distributed as dist

# Options each rank may set for itself: its device, where rank 0 writes (and the per-node paths to
# the same checkpoint and data: their contents are compared instead), whether it shows a progress
# bar. Not --log-every: it decides when rank 0 writes a record, which every rank waits on.
PER_RANK = ("device", "out_dir", "resume", "data_path", "no_progress")


def differences(values: dict, world: int) -> list[str]:
    """Names and per-rank values of the entries of `values` that differ between ranks (collective:
    every rank calls it with the same keys). [] when all agree."""
    gathered = [None] * world
    dist.all_gather_object(gathered, values)
    keys = sorted({k for v in gathered for k in v})
    out = []
    for k in keys:
        seen = [v.get(k) for v in gathered]
        if any(s != seen[0] for s in seen):
            shown = ", ".join(f"rank {r}: {_short(s)}" for r, s in enumerate(seen))
            out.append(f"{k} ({shown})")
    return out


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def option_values(options: dict) -> dict:
    """The options (amdim.config.Config.options()) that every rank must share, by flag."""
    return {"--" + k.replace("_", "-"): v for k, v in options.items() if k not in PER_RANK}


def code_digest() -> str:
    """SHA-256 of the sources of amdim and amdim_kernels (Python, and csrc/'s C++ and CUDA) and
    torch's version: ranks running different code would compute different things."""
    import torch

    import amdim_kernels
    from amdim_kernels import _extension
    trees = [(d, (".py",)) for d in (os.path.dirname(os.path.abspath(__file__)),
                                     os.path.dirname(os.path.abspath(amdim_kernels.__file__)))]
    try:   # inside the installed package or beside it: named csrc/ either way
        trees.append((_extension.source_dir(), (".cpp", ".h", ".cu", ".cuh")))
    except _extension.BuildError:
        pass
    h = hashlib.sha256(torch.__version__.encode())
    for top, suffixes in trees:
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(suffixes)):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, os.path.dirname(top)).encode())
                with open(path, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()
