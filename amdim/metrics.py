"""What a training run tells people and files: the progress bar, a readable line per epoch, and the
append-only metrics.jsonl (mirrored to TensorBoard when it is installed)."""
from __future__ import annotations

import errno
import json
import os
import sys

METRICS = "metrics.jsonl"


class Progress:
    """A tqdm bar (tqdm is a requirement), or with `plain` (--no-progress), or when tqdm cannot be
    imported, one plain line every log_every steps and at the last step. Nothing when not `enabled`
    (ranks other than 0)."""

    def __init__(self, total, desc, enabled, log_every, initial=0, plain=False):
        self.bar, self.enabled, self.log_every = None, enabled, log_every
        self.n, self.total, self.desc = initial, total, desc
        if enabled and not plain:
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
    """Append-only JSONL (rank 0), one record per line, each appended whole or not at all: a write
    that fails (a full disk) is cut back to the previous line before the OSError propagates.
    `truncate_after(step)` drops records past a resumed position, so a run killed after its last
    checkpoint and resumed holds each (epoch, step) once."""

    def __init__(self, out_dir, enabled):
        self.enabled, self.tb = enabled, None
        self.path = os.path.join(out_dir, METRICS)
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except ImportError:   # tensorboard is optional
            pass

    def truncate_after(self, global_step: int) -> int:
        """Keep only records at or before global_step (the resumed position); return how many were
        dropped. Lines are checked first (`parse_records`); the file is rewritten atomically."""
        if not self.enabled or not os.path.exists(self.path):
            return 0
        with open(self.path, "rb") as f:
            data = f.read()
        records = parse_records(data, self.path)
        keep = b"".join(raw + b"\n" for raw, rec in records if rec["global_step"] <= global_step)
        if keep == data:
            return 0
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return len(records) - sum(1 for _, rec in records if rec["global_step"] <= global_step)

    def write(self, record: dict, step: int):
        if not self.enabled:
            return
        append_line(self.path, (json.dumps(record) + "\n").encode())
        if self.tb is not None:
            try:
                for k, v in record.items():
                    if isinstance(v, float):
                        self.tb.add_scalar(f"{record['kind']}/{k}", v, step)
                self.tb.flush()
            except Exception as e:   # the mirror is optional: metrics.jsonl is the record
                print(f"amdim.train: TensorBoard logging stopped ({type(e).__name__}: {e})", file=sys.stderr)
                self.tb = None


def append_line(path: str, line: bytes) -> None:
    """Append `line` to `path` in one write; on any failure cut the file back to its previous size
    (no half-written line) and raise OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
            if written != len(line):   # a short write: the disk filled up mid-line
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {written} of "
                                            f"{len(line)} bytes)")
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def parse_records(data: bytes, path: str) -> list[tuple[bytes, dict]]:
    """(raw line, record) of every record in the contents `data` of the metrics file `path`, or
    ValueError naming the file and line.

    A record is a JSON object with a "kind" string and an integer "global_step" >= 0. Blank lines
    are skipped. A last line without its newline that does not parse was cut by a crash mid-write
    (the trainer writes each line in one call): it is dropped. Any other bad line is an error: the
    file was edited or damaged, and guessing which records to keep could misplace the run."""
    lines = data.split(b"\n")
    out = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            out.append((raw, _record(raw, path, i)))
        except ValueError:
            if i < len(lines):   # the last piece has no newline after it: torn if bad
                raise
    return out


def _record(raw: bytes, path: str, i: int) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad_line(path, i, f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad_line(path, i, f"is not JSON ({e.msg}: {text[:60]!r})") from None
    if not isinstance(rec, dict):
        raise _bad_line(path, i, f"is a JSON {type(rec).__name__}, not a record (an object)")
    step = rec.get("global_step")
    if not isinstance(rec.get("kind"), str) or isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _bad_line(path, i, f"is not a record of amdim.train (one needs a \"kind\" string and an "
                                 f"integer \"global_step\" >= 0, got kind={rec.get('kind')!r}, "
                                 f"global_step={step!r})")
    return rec


def _bad_line(path, i, why):
    return ValueError(f"{path!r} line {i} {why}: edit or remove that line (or move the file away), "
                      f"then run again")


def epoch_line(rec: dict, epochs: int, method: str = "amdim") -> str:
    """One human-readable line for an epoch record (the JSON goes to metrics.jsonl): the epoch means
    of the objective's terms, apart. AMDIM: the total and each NCE cost and lgt_reg. DIM: the MI
    estimates themselves (higher is better) and the prior game's two losses, not their weighted sum,
    whose rise (the discriminator winning) would hide a rising MI estimate."""
    mean = rec.get("mean") or {}
    parts = [f"epoch {rec['epoch']}/{epochs}"]
    if method == "dim":
        terms = [f"{name} {mean[k]:.4f}" for k, name in (("mi_global", "global MI"), ("mi_local", "local MI"))
                 if k in mean]
        if "prior_disc" in mean:
            terms.append(f"prior: discriminator loss {mean['prior_disc']:.4f}, "
                         f"encoder's generator loss {mean['prior_gen']:.4f}")
        if terms:
            parts.append("mean " + "; ".join(terms))
    elif mean:
        costs = ", ".join(f"{k} {v:.4f}" for k, v in mean.items()
                          if k != "loss" and not k.startswith("cls_"))
        parts.append(f"mean loss {mean['loss']:.4f} ({costs})")
    parts.append(f"{rec['images_per_s']:.0f} img/s")
    accs = [f"{k[len('test_acc_'):]} {v:.3f}" for k, v in rec.items() if k.startswith("test_acc_")]
    if accs:
        parts.append("online classifiers' test accuracy: " + ", ".join(accs))
    if "peak_gpu_mib" in rec:
        parts.append(f"peak GPU memory {rec['peak_gpu_mib']:.0f} MiB")
    return " | ".join(parts)
