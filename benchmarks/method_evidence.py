"""Evidence for the self-supervised methods: linear-probe accuracy of AMDIM and of Deep InfoMax in
each configuration on the built-in datasets, beside a random encoder and raw pixels, and the cost
of DIM's dot-product local loss, fused against the plain PyTorch reference, at a large batch.

    python benchmarks/method_evidence.py                      # both built-ins, every configuration
    python benchmarks/method_evidence.py --datasets digits --configs amdim,dim_l_jsd_dot

Each configuration is one `python -m amdim.train` run with the same budget of optimizer steps per
dataset, then `amdim.evaluate`'s closed-form linear probe (AMDIM: r1; DIM: the last conv map, the
fc layer and Y). Writes benchmarks/results/method_evidence.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

ROOT = harness.ROOT
sys.path.insert(0, str(ROOT))   # this checkout's amdim and amdim_kernels, not an installed copy
RESULTS = HERE / "results"
TAG = "METHOD_EVIDENCE_LOSS "

# name -> (options of amdim.train, what the seeds lead one to expect of it)
CONFIGS = {
    "amdim": ([], "AMDIM: the strongest (multiscale NCE on augmented views)"),
    "dim_l_jsd_dot": (["--method", "dim"], "DIM(L), JSD: the DIM paper's best classification setting"),
    "dim_l_nce_dot": (["--method", "dim", "--estimator", "nce"], "DIM(L), NCE: close to JSD (the DIM paper)"),
    "dim_l_dv_dot": (["--method", "dim", "--estimator", "dv"], "DIM(L), DV: below JSD / NCE, less stable"),
    "dim_l_jsd_concat": (["--method", "dim", "--local-arch", "concat"], "DIM(L) concat critic, JSD"),
    "dim_l_nce_concat": (["--method", "dim", "--local-arch", "concat", "--estimator", "nce"],
                         "DIM(L) concat, NCE: few negatives per location (8 shuffles)"),
    "dim_l_dv_concat": (["--method", "dim", "--local-arch", "concat", "--estimator", "dv"],
                        "DIM(L) concat, DV"),
    "dim_g_jsd": (["--method", "dim", "--dim-preset", "G"], "DIM(G): below DIM(L) for classification"),
}
# the same number of optimizer steps for every method on a dataset
BUDGET = {"digits": ["--epochs", "10"], "shapes": ["--epochs", "2"]}


def train(dataset: str, name: str, out_root: Path, seed: int, reuse: bool = False) -> dict:
    out = out_root / dataset / name
    cmd = [sys.executable, "-m", "amdim.train", "--dataset", dataset, "--out-dir", str(out), "--overwrite",
           "--no-progress", "--no-eval", "--seed", str(seed), *BUDGET[dataset], *CONFIGS[name][0]]
    wall = None
    if not (reuse and _finished(out, cmd)):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(out / "command.json", "w") as f:
            json.dump({"command": cmd[1:], "wall_s": wall}, f)
    else:
        with open(out / "command.json") as f:
            wall = json.load(f)["wall_s"]
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train_recs = [r for r in records if r["kind"] == "train"]
    return {"command": "python -m amdim.train " + " ".join(cmd[3:]), "wall_s": wall,
            "steps": train_recs[-1]["global_step"], "checkpoint": str(out / "checkpoint.pt"),
            "first_loss": train_recs[0]["loss"], "last_loss": train_recs[-1]["loss"]}


def _finished(out: Path, cmd: list) -> bool:
    """--reuse: the run in `out` was made by this very command and completed."""
    try:
        with open(out / "command.json") as f:
            return json.load(f)["command"] == cmd[1:]
    except (OSError, ValueError, KeyError):
        return False


def probe(checkpoint: str, features: str) -> dict:
    from amdim.evaluate import evaluate
    r = evaluate(checkpoint, features, device="cpu")
    return {layer: {"test_top1": v["test_top1"], "feature_dim": v["feature_dim"]} for layer, v in r["layers"].items()}


# ----------------------------------------------------------------------------- the local loss

def loss_child(b: int, n_loc: int, d: int, backend: str) -> dict:
    """Time and peak memory of one forward+backward of DIM's dot-product local JSD term."""
    harness.use_mmap_for_large_allocations()
    from amdim.dim_objective import dot_mi
    g = torch.Generator().manual_seed(0)
    src = torch.randn(b, d, generator=g, requires_grad=True)
    trg = torch.randn(b, n_loc, d, generator=g, requires_grad=True)

    def prepare():
        src.grad = trg.grad = None

    def forward():
        return dot_mi(src, trg, "jsd", backend)

    def step():
        forward().backward()
    ran = {}
    with harness.backends_ran(ran):
        first, times = harness.Clock("cpu").run(step, prepare, warmup=1, repeats=5)
        extra = harness.peak_extra("cpu", forward, lambda mi: mi.backward(), prepare,
                                   lambda: src.numel() * 4 + trg.numel() * 4)
    return {"backend": backend, **ran, **harness.timing_fields(first, times),
            "peak_extra_mib": extra / harness.MIB}


def loss_cost(b: int, n_loc: int, d: int) -> dict:
    out = {"shape": {"B": b, "locations": n_loc, "D": d, "scores": b * b * n_loc}}
    for backend in ("fused", "reference"):
        payload, failure = harness.run_child(Path(__file__), ["--loss-child", f"{b},{n_loc},{d},{backend}"], TAG,
                                             timeout=1800)
        out[backend] = payload if payload is not None else {"failed": failure}
        print(f"local DIM loss B={b} L={n_loc} D={d} {backend}: {out[backend]}", flush=True)
    return out


# ----------------------------------------------------------------------------- report

def markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# Self-supervised methods on the built-in datasets", "",
             f"{harness.versions_line(env)}; load average at start / end "
             f"{result['loadavg_start']} / {result['loadavg_end']}.", "",
             "Linear probe = closed-form ridge on frozen features (`python -m amdim.evaluate`), test top-1. "
             "Each configuration trains for the same optimizer steps on a dataset "
             f"({', '.join(f'{k}: ' + ' '.join(v) for k, v in BUDGET.items())}, batch 64).", ""]
    for ds, runs in result["datasets"].items():
        lines += [f"## {ds}", "", "| configuration | probe: r1 / conv | fc | Y | train s | expectation (seeds) |",
                  "|---|---|---|---|---|---|"]
        for name, r in runs.items():
            p = r["probe"]
            cells = [p.get("r1", p.get("conv", p.get("pixels", {}))).get("test_top1")] + \
                    [p.get(k, {}).get("test_top1") for k in ("fc", "y")]
            text = " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
            wall = f"{r['train']['wall_s']:.0f}" if "train" in r else "-"
            lines.append(f"| {name} | {text} | {wall} | {r.get('expectation', '')} |")
        lines.append("")
    if result.get("local_loss"):
        lines += ["## DIM's dot-product local loss (JSD), forward + backward, CPU", "",
                  "| B | locations | D' | scores | backend | median s | peak extra MiB |", "|---|---|---|---|---|---|---|"]
        for c in result["local_loss"]:
            s = c["shape"]
            for backend in ("fused", "reference"):
                r = c[backend]
                if "failed" in r:
                    lines.append(f"| {s['B']} | {s['locations']} | {s['D']} | {s['scores']} | {backend} | "
                                 f"{r['failed'][0]} | - |")
                else:
                    lines.append(f"| {s['B']} | {s['locations']} | {s['D']} | {s['scores']} | {backend} | "
                                 f"{r['median_s']:.3f} | {r['peak_extra_mib']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,shapes")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"from {','.join(CONFIGS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse finished runs of the same command in --out-root")
    p.add_argument("--epochs", type=int, default=None, help="override the per-dataset budget (quick runs)")
    p.add_argument("--out-root", default=str(ROOT / "runs" / "evidence"))
    p.add_argument("--loss-shapes", default="256,64,256;1024,64,256",
                   help="B,locations,D' of the local-loss measurement; ';'-separated; '' to skip")
    p.add_argument("--loss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", default=str(RESULTS / "method_evidence"))
    args = p.parse_args()
    if args.loss_child:
        b, n, d, backend = args.loss_child.split(",")
        print(TAG + json.dumps(loss_child(int(b), int(n), int(d), backend)), flush=True)
        return
    if args.epochs is not None:
        for ds in BUDGET:
            BUDGET[ds] = ["--epochs", str(args.epochs)]
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: --configs: unknown {unknown}; choose from {list(CONFIGS)}")
    result = {"environment": harness.environment("cpu", sys.argv), "loadavg_start": os.getloadavg(),
              "datasets": {}, "local_loss": []}
    out_root = Path(args.out_root)
    for ds in args.datasets.split(","):
        runs = result["datasets"].setdefault(ds, {})
        for name in configs:
            print(f"[{ds}] training {name} ...", flush=True)
            r = {"train": train(ds, name, out_root, args.seed, args.reuse), "expectation": CONFIGS[name][1]}
            r["probe"] = probe(r["train"]["checkpoint"], "trained")
            print(f"[{ds}] {name}: {json.dumps(r['probe'])} ({r['train']['wall_s']:.0f} s)", flush=True)
            runs[name] = r
        # baselines: the architectures freshly initialised, and the pixels
        for name in ("amdim", "dim_l_jsd_dot"):
            if name in runs:
                runs[f"random encoder ({name})"] = {"probe": probe(runs[name]["train"]["checkpoint"], "random"),
                                                     "expectation": "clearly below the trained encoders"}
        any_ck = next(iter(runs.values()))["train"]["checkpoint"]
        runs["pixels"] = {"probe": probe(any_ck, "pixels"), "expectation": "the floor a method must beat"}
    for shape in filter(None, args.loss_shapes.split(";")):
        result["local_loss"].append(loss_cost(*map(int, shape.split(","))))
    result["loadavg_end"] = os.getloadavg()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    harness.write_atomic(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    harness.write_atomic(out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
