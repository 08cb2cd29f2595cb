"""Checkpoints of amdim.train: atomic writes, a checksum of the payload, safe loading, exact resume.

A checkpoint is a `torch.save`d dict of plain types and tensors only, so it loads with
`torch.load(path, weights_only=True)`: a shared checkpoint can never run code (no pickled objects;
the numpy RNG state is stored as a tensor). It holds the model, optimizer and scaler states, the RNG
states of python / numpy / torch / CUDA / the augmentation generator, the position (epoch, step),
the options of the run, and `sha256`: a digest of everything else, recomputed on load, so that a
corrupted file (flipped bytes in a tensor) is refused instead of silently resumed or evaluated.

Every problem raises ValueError (or FileNotFoundError) with a message that names the file; the
command lines turn those into exit messages.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import os
import pickle
import random
import zipfile

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
FORMAT = "amdim.train checkpoint"
VERSION = 3   # 3: the official AMDIM residual blocks and online classifiers, DIM as rdevon/DIM


# ----------------------------------------------------------------------------------------------
# the digest

def _digest(obj, h) -> None:
    """Feed a nested structure of dicts, lists, tuples, tensors and scalars into hash h.

    Types and shapes are hashed with the values, so a changed dtype or shape shows as well."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _digest(k, h)
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"checkpoint payload holds a {type(obj).__name__}: only tensors and plain "
                        f"types are allowed (so the file loads with weights_only=True)")


def payload_sha256(payload: dict) -> str:
    h = hashlib.sha256()
    _digest(payload, h)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# RNG states as tensors and plain types

def rng_state(aug_gen: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "augment": aug_gen.get_state()}


def set_rng_state(state: dict, aug_gen: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    aug_gen.set_state(state["augment"])


# ----------------------------------------------------------------------------------------------
# save and load

class _Writer:
    """The file object torch.save writes through, keeping the OSError of a failed write: torch's
    zip writer reports any failed write as a RuntimeError ("unexpected pos ...") that hides it."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def save(path: str, payload: dict) -> None:
    """Write payload plus its checksum to a temporary file, flush it to the disk, then rename it over
    `path`: a crash, kill or full disk mid-write never leaves a broken checkpoint, only the previous
    one. Any failure to write raises OSError (a full disk is ENOSPC or EFBIG)."""
    state = {"format": FORMAT, "version": VERSION, **payload}
    state["sha256"] = payload_sha256(state)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            try:
                torch.save(state, writer)
            except RuntimeError as e:
                if writer.error is not None:
                    raise writer.error from None
                raise OSError(errno.EIO, f"torch.save failed: {str(e).splitlines()[0]}") from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_dir(d: str) -> None:
    """Make a rename in directory d durable (where the platform allows opening directories)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Delete `checkpoint.pt.tmp<pid>` files whose writer is gone (a save killed mid-write)."""
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(out_dir), CHECKPOINT + ".tmp*")):
        suffix = tmp.rsplit(".tmp", 1)[1]
        if suffix.isdigit() and int(suffix) != os.getpid() and _alive(int(suffix)):
            continue
        os.remove(tmp)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(path: str, what: str = "checkpoint") -> dict:
    """Read and verify a checkpoint written by `save`; `what` names it in errors (e.g. '--resume')."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{what} {path!r} is not a checkpoint written by amdim.train (not a "
                         f"torch.save zip file; empty, truncated or another format)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:   # weights_only refused an object: it could run code, never load it
        raise ValueError(f"{what} {path!r} is not a readable amdim.train checkpoint: it holds "
                         f"pickled objects other than tensors and plain types, which could run code "
                         f"when loaded; it is refused") from None
    except Exception as e:
        raise ValueError(f"{what} {path!r} is not a readable amdim.train checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{what} {path!r} is not an amdim.train checkpoint "
                         f"(no {FORMAT!r} marker; files of versions before 0.2 are not supported)")
    if ck.get("version") != VERSION:
        raise ValueError(f"{what} {path!r} was written by another version of amdim.train (checkpoint "
                         f"version {ck.get('version')!r}, this one reads {VERSION}): its model layout "
                         f"differs; train it again")
    missing = [k for k in ("model", "args", "epoch", "step", "sha256") if k not in ck]
    if missing:
        raise ValueError(f"{what} {path!r} is incomplete: missing {', '.join(missing)}")
    stored = ck.pop("sha256")
    if payload_sha256(ck) != stored:
        raise ValueError(f"{what} {path!r} is corrupted: its checksum does not match its contents "
                         f"(the file was modified or damaged after it was written). Use an earlier "
                         f"copy, or train again.")
    ck["sha256"] = stored
    return ck


# ----------------------------------------------------------------------------------------------
# what the weights mean: the architecture options, and the model they build

def architecture(cfg) -> dict:
    """The options that fix the shapes of the saved weights: the method, the dataset and image size,
    and the model config (amdim.config). For DIM the model config says which critics exist (a zero
    weight builds none: DDP needs every parameter to receive a gradient), so a resumed run must keep
    each of alpha and beta zero or non-zero."""
    import dataclasses
    arch = {"method": cfg.method, "dataset": cfg.data.dataset, "image_size": cfg.data.image_size,
            **dataclasses.asdict(cfg.model)}
    if cfg.method == "dim" and not arch["use_local"]:   # no local critic: its architecture does not exist
        arch["local_arch"] = None
    if cfg.method == "dim" and not arch["use_global"]:
        arch["global_arch"] = None
    return arch


def check_architecture(saved: dict, current: dict, what: str) -> None:
    """ValueError naming every option in which a checkpoint's architecture differs from this run's."""
    if saved.get("method", "amdim") != current.get("method"):
        raise ValueError(f"{what} holds a --method {saved.get('method', 'amdim')} model, not --method "
                         f"{current.get('method')}: pass --method {saved.get('method', 'amdim')}")
    differ = []
    for k in sorted(set(saved) | set(current)):
        if saved.get(k) != current.get(k):
            opt = {"use_global": "--alpha", "use_local": "--beta"}.get(
                k, "--" + k.replace("_", "-"))
            differ.append(f"{opt} {saved.get(k)!r} (checkpoint) vs {current.get(k)!r}")
    if differ:
        raise ValueError(f"{what} was trained with different options: " + "; ".join(differ))


def build_model(arch: dict, n_classes: int) -> torch.nn.Module:
    """A fresh model of the architecture `arch` (see `architecture`)."""
    if arch["method"] == "dim":
        from .dim_model import DIM
        return DIM(arch["image_size"], n_classes, ndf=arch["ndf"], y_dim=arch["y_dim"], mi_units=arch["mi_units"],
                   local_arch=arch["local_arch"] or "dot", global_arch=arch["global_arch"] or "dot",
                   prior=arch["prior"], use_global=arch["use_global"], use_local=arch["use_local"])
    from .amdim_model import AMDIM
    return AMDIM(arch["image_size"], arch["ndf"], arch["n_rkhs"], arch["n_depth"], arch["use_bn"],
                 n_classes, arch["n_mix"] or 1)
