"""The run directory (--out-dir) of amdim.train: checked before any training, held by one trainer at a
time, and cleared only when a replacing run has set up successfully.

- `prepare` refuses a directory that holds another run (unless --resume continues it or --overwrite
  replaces it) or that cannot be written, takes the lock and removes temporaries of killed saves;
- `clear_replaced` removes the replaced run's files (--overwrite), once set-up has succeeded;
- `release` drops the lock (and the directory, if a failed set-up left it empty).
"""
from __future__ import annotations

import fcntl
import os

from .checkpoint import CHECKPOINT, remove_stale_temporaries
from .metrics import METRICS

_LOCKS = {}   # real path of an out dir -> its open lock file, held while this process trains there


def _resumes_in_place(out: str, resume: str | None) -> bool:
    ck_path = os.path.join(out, CHECKPOINT)
    return bool(resume) and os.path.isfile(ck_path) and os.path.samefile(resume, ck_path)


def prepare(out: str, resume: str | None, overwrite: bool, rank: int) -> str:
    """Check `out` before any training: writable, and not holding another run unless `resume`
    continues that run or `overwrite` replaces it. Rank 0 creates and locks it. Returns the
    checkpoint path."""
    ck_path = os.path.join(out, CHECKPOINT)
    held = [f for f in (CHECKPOINT, METRICS) if os.path.exists(os.path.join(out, f))]
    if held and not overwrite and not _resumes_in_place(out, resume):
        cont = f"--resume {ck_path} to continue it, " if CHECKPOINT in held else ""
        raise ValueError(f"--out-dir {out!r} already holds a run ({', '.join(held)}): pass {cont}"
                         f"--overwrite to replace it, or another --out-dir")
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, f".write-test{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise ValueError(f"--out-dir {out!r} is not a writable directory ({e.strerror or e})") from None
        _lock(out)
        remove_stale_temporaries(out)
    return ck_path


def clear_replaced(out: str, resume: str | None, overwrite: bool, rank: int) -> None:
    """With `overwrite` (set-up having succeeded), remove the earlier run's checkpoint and metrics,
    also when this run resumes from a checkpoint elsewhere; a resume in place keeps its metrics."""
    if rank != 0 or not overwrite or _resumes_in_place(out, resume):
        return
    for f in (CHECKPOINT, METRICS):
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))


def _lock(out: str) -> None:
    """One trainer per out dir: an flock the OS releases when the process ends, however it ends."""
    key = os.path.realpath(out)
    if key in _LOCKS:
        return
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"--out-dir {out!r} is in use by a running amdim.train ({holder}): wait for "
                         f"it, or pick another --out-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    _LOCKS[key] = f


def release(out: str) -> None:
    """Release the lock; remove it, and the directory if a failed set-up left it empty."""
    f = _LOCKS.pop(os.path.realpath(out), None)
    if f is None:
        return
    os.remove(f.name)
    f.close()
    try:
        os.rmdir(out)   # only succeeds when nothing was written
    except OSError:
        pass
