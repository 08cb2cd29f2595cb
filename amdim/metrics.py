"""What a training run tells people and files: the progress bar, a readable line per epoch, and the
append-only metrics.jsonl (mirrored to TensorBoard when it is installed)."""
from __future__ import annotations

import json
import os

METRICS = "metrics.jsonl"


class Progress:
    """A tqdm bar (tqdm is a requirement), or one plain line every log_every steps when tqdm cannot
    be imported."""

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
    """Append-only JSONL (rank 0). `truncate_after(step)` drops records past a resumed position, so a
    run killed after its last checkpoint and resumed holds each (epoch, step) once."""

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

    def truncate_after(self, global_step: int) -> int:
        """Keep only records at or before global_step (the resumed position); return how many were
        dropped. The file is rewritten atomically."""
        if not self.enabled or not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:   # a line cut by a kill mid-write
                continue
            if rec.get("global_step", 0) <= global_step:
                keep.append(json.dumps(rec) + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)
        return len(lines) - len(keep)

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
