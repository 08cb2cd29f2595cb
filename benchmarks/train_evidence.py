"""Evidence for amdim.train on the built-in digits dataset (CPU):

1. train the encoder with the default options, then linear-probe test top-1 of the trained encoder,
   the same architecture randomly initialised, and raw pixels (amdim.evaluate);
2. training throughput (images/s) and peak resident memory with --loss-backend fused vs reference
   at the same configuration: the default one, and a dense one (every 5x5/7x7 location a source)
   where the reference loss materialises N x B x L scores.

Each measurement runs `python -m amdim.train` in its own process; peak RSS comes from os.wait4.
Runs alternate between backends and the median is reported, because CPU time on a shared machine
varies. Writes benchmarks/results/train_evidence.json and .md.

    python benchmarks/train_evidence.py            # everything (about 15 minutes on 2 idle cores)
    python benchmarks/train_evidence.py --skip-train --checkpoint runs/evidence/checkpoint.pt
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # run as a script from a checkout: amdim need not be installed
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CONFIGS = {
    "default": [],
    "dense": ["--dense", "--costs", "1t5,1t7,5t5,5t7,7t7", "--batch-size", "128"],
}


def run_train(argv, out_dir):
    """Run amdim.train; return (metrics records, peak RSS in MiB, wall seconds)."""
    cmd = [sys.executable, "-m", "amdim.train", *argv, "--out-dir", out_dir]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return records, usage.ru_maxrss / 1024, time.time() - t0   # ru_maxrss is KiB on Linux


def throughput(config, backend, out_root, steps, rep):
    out = os.path.join(out_root, f"tp_{config}_{backend}_{rep}")
    argv = CONFIGS[config] + ["--loss-backend", backend, "--epochs", "2", "--steps-per-epoch", str(steps),
                              "--no-eval", "--log-every", "1000"]
    records, rss, _ = run_train(argv, out)
    second = [r for r in records if r["kind"] == "epoch"][-1]   # epoch 2: no warm-up in the timing
    return {"images_per_s": second["images_per_s"], "peak_rss_mib": rss}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-root", default=os.path.join(ROOT, "runs", "evidence"))
    p.add_argument("--skip-train", action="store_true", help="probe --checkpoint instead of training")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--steps", type=int, default=8, help="timed steps per throughput run")
    p.add_argument("--reps", type=int, default=3, help="runs per backend and configuration")
    args = p.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
                          "loadavg_start": os.getloadavg()}}

    if not args.skip_train:
        out = os.path.join(args.out_root, "train")
        records, rss, wall = run_train([], out)
        epochs = [r for r in records if r["kind"] == "epoch"]
        result["train"] = {"command": "python -m amdim.train --out-dir " + os.path.relpath(out, ROOT),
                           "wall_s": wall, "peak_rss_mib": rss, "epochs": len(epochs),
                           "first_loss": records[0]["loss"], "last_loss": epochs[-1]["last_loss"],
                           "online_test_acc_mlp": epochs[-1]["test_acc_mlp"],
                           "online_test_acc_lin": epochs[-1]["test_acc_lin"]}
        args.checkpoint = os.path.join(out, "checkpoint.pt")

    from amdim.evaluate import evaluate
    result["probe"] = {}
    for features in ("trained", "random", "pixels"):
        r = evaluate(args.checkpoint, features)
        result["probe"][features] = {k: r[k] for k in ("test_top1", "train_top1", "ridge_penalty", "feature_dim",
                                                       "n_train", "n_test")}
        print(f"probe {features}: {r['test_top1']:.4f}", flush=True)

    result["throughput"] = {}
    for config in CONFIGS:
        runs = {"fused": [], "reference": []}
        for rep in range(args.reps):
            for backend in ("reference", "fused"):
                runs[backend].append(throughput(config, backend, args.out_root, args.steps, rep))
                print(config, backend, runs[backend][-1], flush=True)
        result["throughput"][config] = {
            "options": " ".join(CONFIGS[config]) or "(defaults)",
            **{b: {"images_per_s_median": statistics.median(r["images_per_s"] for r in rs),
                   "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in rs),
                   "runs": rs} for b, rs in runs.items()}}
    result["machine"]["loadavg_end"] = os.getloadavg()

    with open(os.path.join(RESULTS, "train_evidence.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(RESULTS, "train_evidence.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))


def markdown(r):
    m = r["machine"]
    lines = [f"# amdim.train evidence (built-in digits, CPU: {m['cpus']} cores, torch {m['torch']})", ""]
    if "train" in r:
        t = r["train"]
        lines += [f"Training: `{t['command']}`: {t['epochs']} epochs in {t['wall_s'] / 60:.1f} min, "
                  f"NCE loss {t['first_loss']:.2f} -> {t['last_loss']:.2f}, online test accuracy "
                  f"MLP {t['online_test_acc_mlp']:.3f}, linear {t['online_test_acc_lin']:.3f}.", ""]
    lines += ["| linear probe on | test top-1 | features |", "|---|---|---|"]
    for k, v in r["probe"].items():
        lines.append(f"| {k} | {v['test_top1']:.4f} | {v['feature_dim']} |")
    lines += ["", "| config | loss backend | images/s (median) | peak RSS MiB (median) |", "|---|---|---|---|"]
    for config, c in r["throughput"].items():
        for b in ("reference", "fused"):
            lines.append(f"| {config}: {c['options']} | {b} | {c[b]['images_per_s_median']:.1f} | "
                         f"{c[b]['peak_rss_mib_median']:.0f} |")
    lines += ["", f"Load average at start / end: {m['loadavg_start']} / {m['loadavg_end']} "
                  "(the machine was shared; throughput varies with it).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
