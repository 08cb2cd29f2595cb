"""The run directory (--out-dir) of amdim.train: checked before any training, held by one trainer at a
time, and never left without the last good checkpoint.

- `prepare` refuses a directory that holds another run (unless --resume continues it or --overwrite
  replaces it) or that cannot be written, takes the lock, finishes a replacement a killed trainer
  left half done, and removes temporaries of killed saves;
- `set_aside` (--overwrite, once set-up has succeeded) moves the replaced run's files into
  `.replaced/`; `commit` deletes them once the new run has written its first checkpoint (an
  end-of-epoch one), and `release` puts them back if it never did (a failed or stopped replacement
  loses nothing);
- `release` drops the lock; the lock file stays (unlinking it would let a process that opened it
  earlier lock a deleted file while a third creates a new one), except in a directory this
  process created and left empty, which is removed.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
import threading

from .checkpoint import CHECKPOINT, remove_stale_temporaries
from .metrics import METRICS

LOCK = ".lock"
REPLACED = ".replaced"
REPLACING = ".replacing"     # set-aside in progress
RESTORING = ".restoring"     # a marker inside .replaced: the replacing run's files are gone
TENSORBOARD = "tb"
RUN_FILES = (CHECKPOINT, METRICS, TENSORBOARD)   # what a run writes; a replacement moves them all

_HELD = {}   # real path of an out dir -> {"lock": open lock file, "created": [dirs this process made],
#              "thread": the thread whose run holds it, "replacing": a run is set aside}


def resumes_in_place(out: str, resume: str | None) -> bool:
    ck_path = os.path.join(out, CHECKPOINT)
    return bool(resume) and os.path.isfile(ck_path) and os.path.samefile(resume, ck_path)


def _held_files(out: str) -> list[str]:
    return [f for f in (CHECKPOINT, METRICS) if os.path.exists(os.path.join(out, f))]


def prepare(out: str, resume: str | None, overwrite: bool, rank: int, continue_hint=None) -> str:
    """Check `out` before any training: writable, and not holding another run unless `resume`
    continues that run or `overwrite` replaces it. Rank 0, the one that writes it, creates, locks
    and checks it (the other ranks' --resume may be their nodes' copies of the checkpoint). Returns
    the checkpoint path. `continue_hint(ck_path)` gives the command that continues a held run."""
    ck_path = os.path.join(out, CHECKPOINT)
    if rank == 0:
        created = _make_dirs(out)
        try:
            probe = os.path.join(out, f".write-test{os.getpid()}-{threading.get_ident()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
            _lock(out, created)
        except OSError as e:
            _remove_created(created)
            raise ValueError(f"--out-dir {out!r} is not a writable directory ({e.strerror or e})") from None
        _finish_interrupted_replacement(out)
        remove_stale_temporaries(out)
        held = _held_files(out)
        if held and not overwrite and not resumes_in_place(out, resume):
            cont = ""
            if CHECKPOINT in held:
                cont = continue_hint(ck_path) if continue_hint else f"pass --resume {ck_path} to continue it"
                cont += "; "
            raise ValueError(f"--out-dir {out!r} already holds a run ({', '.join(held)}): {cont}pass "
                             f"--overwrite to replace it, or another --out-dir")
    return ck_path


def _make_dirs(out: str) -> list[str]:
    """os.makedirs(out), returning the directories it created (deepest last); ValueError if it fails."""
    missing, d = [], os.path.abspath(out)
    while not os.path.exists(d):
        missing.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out-dir {out!r} is not a writable directory ({e.strerror or e})") from None
    return missing[::-1]


def _remove_created(created: list[str]) -> None:
    """Remove the directories this process created, deepest first, while they are empty."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            return


def _lock(out: str, created: list[str]) -> None:
    """One trainer per out dir: an flock the OS releases when the process ends, however it ends.
    After locking, the lock file must still be the one at the path (another process may have
    removed it, with its directory, between our open and our flock): otherwise lock again."""
    path = os.path.join(out, LOCK)
    for _ in range(100):
        os.makedirs(out, exist_ok=True)
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            if holder == f"pid {os.getpid()}":
                holder += ": this process, in another thread"
            raise ValueError(f"--out-dir {out!r} is in use by a running amdim.train ({holder}): wait for "
                             f"it, or pick another --out-dir") from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()   # we locked a file that is no longer there: take the one at the path
    else:
        raise ValueError(f"--out-dir {out!r}: could not lock {path!r} (it keeps being replaced)")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    _HELD[os.path.realpath(out)] = {"lock": f, "created": created, "thread": threading.get_ident()}


def _move(src_dir: str, dst_dir: str, names) -> None:
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.lexists(src):
            dst = os.path.join(dst_dir, name)
            if os.path.isdir(dst) and not os.path.islink(dst):
                shutil.rmtree(dst)
            os.replace(src, dst)


def set_aside(out: str, resume: str | None, overwrite: bool, rank: int) -> bool:
    """With `overwrite` (set-up having succeeded), move the earlier run's files into .replaced/ (also
    when this run resumes from a checkpoint elsewhere; a resume in place keeps its files). They are
    gathered in .replacing/ and that is renamed: .replaced/ exists only once it holds them all; a
    move that fails or is interrupted puts back what it moved. Returns whether a run was set aside."""
    if rank != 0 or not overwrite or resumes_in_place(out, resume):
        return False
    if not any(os.path.lexists(os.path.join(out, f)) for f in RUN_FILES):
        return False
    staging, aside = os.path.join(out, REPLACING), os.path.join(out, REPLACED)
    for d in (staging, aside):
        if os.path.lexists(d):
            shutil.rmtree(d)
    os.mkdir(staging)
    try:
        _move(out, staging, RUN_FILES)
        os.replace(staging, aside)
    except BaseException:   # a failed move, or Ctrl-C before the trainer's signal handlers
        _move(staging, out, os.listdir(staging))
        os.rmdir(staging)
        raise
    if os.path.realpath(out) in _HELD:
        _HELD[os.path.realpath(out)]["replacing"] = True
    return True


def commit(out: str) -> None:
    """The new run has written a checkpoint: the replaced run's files go. The replacement is over
    even if some cannot be removed (they are named; the next run in `out` tries again): they are
    never put back over the new run."""
    held = _HELD.get(os.path.realpath(out))
    if held is not None:
        held["replacing"] = False
    aside = os.path.join(out, REPLACED)
    if not os.path.isdir(aside):
        return
    shutil.rmtree(aside, ignore_errors=True)
    left = [os.path.join(root, f) for root, _, files in os.walk(aside) for f in files]
    if os.path.lexists(aside):
        print(f"amdim.train: could not remove the files of the run --overwrite replaced: "
              f"{', '.join(left[:3]) or aside}{' ...' if len(left) > 3 else ''}; the new run is complete. "
              f"Remove {aside!r} by hand (the next run in this directory tries again)", file=sys.stderr, flush=True)


def restore(out: str) -> bool:
    """Put a replaced run back (the replacing run wrote no checkpoint): first what the replacing run
    wrote goes (then a marker says so, for a restore that is itself interrupted), then the replaced
    files come back, the checkpoint last (a checkpoint in `out` means the move is over). Returns
    whether there was a replaced run."""
    aside = os.path.join(out, REPLACED)
    if not os.path.isdir(aside):
        return False
    marker = os.path.join(aside, RESTORING)
    if not os.path.exists(marker):
        for name in RUN_FILES:
            _remove(os.path.join(out, name))
        open(marker, "w").close()
    names = sorted((n for n in os.listdir(aside) if n != RESTORING), key=lambda n: n == CHECKPOINT)
    _move(aside, out, names)
    os.remove(marker)
    os.rmdir(aside)
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _finish_interrupted_replacement(out: str) -> None:
    """A trainer killed while replacing a run left .replacing/ (it was setting the run aside: the
    files go back) or .replaced/: if it wrote no checkpoint, the replaced run comes back; if it did,
    the replaced run's files go."""
    staging = os.path.join(out, REPLACING)
    if os.path.isdir(staging):
        _move(staging, out, os.listdir(staging))
        os.rmdir(staging)
    if not os.path.isdir(os.path.join(out, REPLACED)):
        return
    if os.path.exists(os.path.join(out, CHECKPOINT)):
        commit(out)
    elif restore(out):
        print(f"amdim.train: {out!r}: an --overwrite run was stopped before its first checkpoint; the "
              f"run it was replacing is restored", file=sys.stderr, flush=True)


def release(out: str) -> None:
    """Release the lock. A replaced run whose replacement wrote no checkpoint (no `commit`) is put
    back; a directory this process created and that holds nothing but the lock file is removed."""
    key = os.path.realpath(out)
    held = _HELD.get(key)
    if held is None or held["thread"] != threading.get_ident():   # (another thread's run holds it)
        return
    del _HELD[key]
    try:
        if held.get("replacing") and restore(out):
            print(f"amdim.train: no checkpoint was written; the run that --overwrite was replacing is "
                  f"restored in {out!r}", file=sys.stderr, flush=True)
    finally:
        f = held["lock"]
        try:
            if held["created"] and os.listdir(out) == [LOCK]:
                # ours alone (a lock taken after our unlink finds its file gone and locks again)
                os.remove(f.name)
                _remove_created(held["created"])
        finally:
            f.close()
