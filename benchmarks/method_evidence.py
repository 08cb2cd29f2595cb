"""Evidence for the self-supervised methods: linear-probe accuracy of AMDIM and of Deep InfoMax in
each configuration on the built-in datasets, beside the baselines (raw pixels, a colour histogram,
the same encoders randomly initialised, and a supervised ceiling: the same encoder trained with the
labels for the same number of steps), the seeds' claims checked against those numbers, and the cost
of DIM's dot-product local loss, fused against the plain PyTorch reference, at a large batch.

    python benchmarks/method_evidence.py                      # both built-ins, every configuration
    python benchmarks/method_evidence.py --datasets digits --configs amdim,dim_l_jsd_dot

Each configuration is one `python -m amdim.train` run with the same budget of optimizer steps per
dataset (the trainer's CPU-sized defaults otherwise), then `amdim.evaluate`'s closed-form linear
probe (AMDIM: r1; DIM: the last conv map, the fc layer and Y). Wall and CPU seconds (user + sys of
the training process) are recorded: on a shared machine the wall time is pessimistic, and
CPU / cores is what an idle machine would take. Writes benchmarks/results/method_evidence.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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
# the same number of optimizer steps for every method on a dataset (batch 64: digits 22 steps an
# epoch, shapes 156)
BUDGET = {"digits": ["--epochs", "10"], "shapes": ["--epochs", "10"]}
SUPERVISED_LR = 1e-3   # Adam, the ceiling's only setting of its own (the encoder's defaults otherwise)


def train(dataset: str, name: str, out_root: Path, seed: int, reuse: bool = False) -> dict:
    out = out_root / dataset / name
    cmd = [sys.executable, "-m", "amdim.train", "--dataset", dataset, "--out-dir", str(out), "--overwrite",
           "--no-progress", "--no-eval", "--seed", str(seed), *BUDGET[dataset], *CONFIGS[name][0]]
    if not (reuse and _finished(out, cmd)):
        t0, c0 = time.perf_counter(), _children_cpu()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(out / "command.json", "w") as f:
            json.dump({"command": cmd[1:], "wall_s": wall, "cpu_s": cpu}, f)
    else:
        with open(out / "command.json") as f:
            saved = json.load(f)
        wall, cpu = saved["wall_s"], saved.get("cpu_s")
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train_recs = [r for r in records if r["kind"] == "train"]
    return {**loss_spread(train_recs),"command": "python -m amdim.train " + " ".join(cmd[3:]), "wall_s": wall, "cpu_s": cpu,
            "steps": train_recs[-1]["global_step"], "checkpoint": str(out / "checkpoint.pt"),
            "first_loss": train_recs[0]["loss"], "last_loss": train_recs[-1]["loss"]}


def loss_spread(train_recs: list) -> dict:
    """The standard deviation of the logged losses over the last epoch (the estimators' losses are on
    the same scale, nats), the measure of stability the claims use."""
    last = torch.tensor([r["loss"] for r in train_recs if r["epoch"] == train_recs[-1]["epoch"]])
    return {"loss_std_last_epoch": float(last.std()) if len(last) > 1 else None}


def _children_cpu() -> float:
    """user + sys seconds of the finished child processes."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


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


def colour_histogram(images: torch.Tensor, levels: int = 8) -> torch.Tensor:
    """(n, 3, H, W) uint8 -> (n, levels^3): the fraction of pixels in each joint RGB bin. A probe on it
    measures how much the colours alone (no shape, no position) tell the class."""
    q = (images.long() * levels) // 256
    idx = ((q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]).flatten(1)
    h = torch.zeros(len(images), levels ** 3)
    h.scatter_add_(1, idx, torch.ones(idx.shape))
    return h / idx.shape[1]


def colour_probe(dataset: str) -> dict:
    from amdim.data import datasets as data
    from amdim.evaluate import linear_probe
    ds = data.load(dataset)
    feats = [colour_histogram(torch.from_numpy(part.images)) for part in (ds.train_labeled, ds.test)]
    r = linear_probe(feats[0], torch.from_numpy(ds.train_labeled.labels), feats[1],
                     torch.from_numpy(ds.test.labels), ds.n_classes)
    return {"colour_hist": {"test_top1": r["test_top1"], "feature_dim": feats[0].shape[1]}}


def supervised(dataset: str, options: list, steps: int, seed: int) -> dict:
    """The supervised ceiling of an encoder: the architecture of `options` (as amdim.train builds it,
    inputs normalised alike) with a linear head on its first probed representation, trained with
    cross-entropy on the method's training views for `steps` batches, then the same frozen-feature
    probe as the self-supervised encoders."""
    import numpy as np
    import torch.nn.functional as F
    from amdim import checkpoint
    from amdim.config import resolve
    from amdim.data import augment, datasets as data
    from amdim.evaluate import encode, linear_probe
    from amdim.train import build_parser, given_options
    cfg = resolve(given_options(build_parser().parse_args(["--dataset", dataset, *options])))
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    ds = data.load(dataset)
    size, policy, batch = cfg.data.image_size, cfg.data.policy, cfg.optim.batch_size
    model = checkpoint.build_model(checkpoint.architecture(cfg), ds.n_classes)
    if cfg.method == "amdim":   # the trainer's input statistics
        pix = augment.eval_view(augment.as_float(ds.train.batch(np.arange(min(len(ds.train), 2048)))[0], "cpu"),
                                policy, size).transpose(0, 1).reshape(3, -1)
        model.normalize.set_stats(pix.mean(1), pix.std(1))
    layer = next(iter(model.probe_features(torch.rand(2, 3, size, size))))
    with torch.no_grad():
        width = model.probe_features(torch.rand(2, 3, size, size))[layer].shape[1]
    head = torch.nn.Linear(width, ds.n_classes)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=SUPERVISED_LR)
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    labeled, order, pos = ds.train_labeled, None, len(ds.train_labeled)
    model.train()
    for _ in range(steps):
        if pos + batch > len(labeled):
            order, pos = rng.permutation(len(labeled)), 0
        x, y = labeled.batch(order[pos:pos + batch])
        pos += batch
        (v,) = augment.views(x, policy, size, gen, count=1)
        loss = F.cross_entropy(head(model.probe_features(v)[layer]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tr, te = encode(model, labeled, size, "cpu", policy), encode(model, ds.test, size, "cpu", policy)
    out = {name: {"test_top1": linear_probe(tr[name], torch.from_numpy(labeled.labels), te[name],
                                            torch.from_numpy(ds.test.labels), ds.n_classes)["test_top1"],
                  "feature_dim": tr[name].shape[1]} for name in tr}
    return {"probe": out, "steps": steps, "trained_layer": layer, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0}


# ----------------------------------------------------------------------------- the seeds' claims

TIE = 0.02   # probes closer than this count as equal: about 1.5 standard errors of a difference of two on 2000 test images


def best(r: dict) -> float:
    return max(v["test_top1"] for v in r["probe"].values())


def claims(runs: dict) -> list[dict]:
    """The seeds' claims, each checked on the runs present: what was compared, and whether it holds
    (an order holds only by more than TIE)."""
    out = []

    def claim(text, names, holds, detail):
        if all(n in runs for n in names):
            out.append({"claim": text, "holds": bool(holds(*[runs[n] for n in names])),
                        "detail": detail(*[runs[n] for n in names])})
    above = lambda a, b: best(a) > best(b) + TIE
    claim("local MI beats global MI for classification (DIM(L) above DIM(G), best layer)",
          ["dim_l_jsd_dot", "dim_g_jsd"], above, lambda l, g: f"DIM(L) {best(l):.3f}, DIM(G) {best(g):.3f}")
    claim(f"JSD and NCE are close (DIM(L), best layer, within {TIE})", ["dim_l_jsd_dot", "dim_l_nce_dot"],
          lambda j, n: abs(best(j) - best(n)) <= TIE, lambda j, n: f"JSD {best(j):.3f}, NCE {best(n):.3f}")
    claim("DV is below JSD and NCE (DIM(L), best layer)", ["dim_l_jsd_dot", "dim_l_nce_dot", "dim_l_dv_dot"],
          lambda j, n, d: above(j, d) and above(n, d),
          lambda j, n, d: f"DV {best(d):.3f}, JSD {best(j):.3f}, NCE {best(n):.3f}")
    std = lambda r: r["train"]["loss_std_last_epoch"]
    claim("DV is less stable (the spread of its losses over the last epoch above JSD's and NCE's)",
          ["dim_l_jsd_dot", "dim_l_nce_dot", "dim_l_dv_dot"], lambda j, n, d: std(d) > max(std(j), std(n)),
          lambda j, n, d: f"standard deviation DV {std(d):.3f}, JSD {std(j):.3f}, NCE {std(n):.3f}")
    claim("AMDIM above DIM (best layer of DIM(L), JSD)", ["amdim", "dim_l_jsd_dot"], above,
          lambda a, d: f"AMDIM {best(a):.3f}, DIM(L) {best(d):.3f}")
    for name, rand in (("amdim", "random encoder (amdim)"), ("dim_l_jsd_dot", "random encoder (dim_l_jsd_dot)")):
        claim(f"{name} learns: above its random encoder (best layer)", [name, rand], above,
              lambda t, r: f"trained {best(t):.3f}, random {best(r):.3f}, difference {best(t) - best(r):+.3f}")
    return out


def rerender(path: Path) -> None:
    """--rerender: the claims and the markdown of a results file again, from its probes and its runs'
    metrics (for a change in how claims are checked; nothing is trained or probed)."""
    result = json.loads(path.with_suffix(".json").read_text())
    for ds, runs in result["datasets"].items():
        for r in runs.values():
            if "train" in r and "checkpoint" in r["train"]:
                with open(Path(r["train"]["checkpoint"]).parent / "metrics.jsonl") as f:
                    recs = [json.loads(line) for line in f]
                r["train"].pop("loss_cv", None)
                r["train"].update(loss_spread([x for x in recs if x["kind"] == "train"]))
        result["claims"][ds] = claims(runs)
    harness.write_atomic(path.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    harness.write_atomic(path.with_suffix(".md"), markdown(result))


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
             f"{harness.versions_line(env)}; CPU {env.get('cpu_model')} ({env.get('cpu_count')} cores, "
             f"OMP_NUM_THREADS={result.get('omp_num_threads')}); load average at start / end "
             f"{result['loadavg_start']} / {result['loadavg_end']}.", "",
             "Linear probe = closed-form ridge on frozen features (`python -m amdim.evaluate`), test top-1. "
             "Each configuration trains for the same optimizer steps on a dataset "
             f"({', '.join(f'{k}: ' + ' '.join(BUDGET[k]) for k in result['datasets'])}, batch 64); the supervised "
             "ceilings train the same encoders with the labels for as many steps. Wall seconds are on a "
             "shared machine; CPU seconds are user + sys of the training (about twice an idle 2-core "
             "machine's wall time).", ""]
    for ds, runs in result["datasets"].items():
        missing = [c for c in CONFIGS if c not in runs]
        lines += [f"## {ds}", ""]
        if missing:
            lines += [f"Not run in this file: {', '.join(missing)}.", ""]
        lines += [
                  "| configuration | probe: r1 / conv / pixels | fc | Y | train wall s | train CPU s | expectation (seeds) |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in runs.items():
            p = r["probe"]
            first = next(iter(p.values()))
            cells = [first.get("test_top1")] + [p.get(k, {}).get("test_top1") for k in ("fc", "y")]
            text = " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
            t = r.get("train", r)
            wall = f"{t['wall_s']:.0f}" if t.get("wall_s") is not None else "-"
            cpu = f"{t['cpu_s']:.0f}" if t.get("cpu_s") is not None else "-"
            lines.append(f"| {name} | {text} | {wall} | {cpu} | {r.get('expectation', '')} |")
        lines.append("")
        if result.get("claims", {}).get(ds):
            lines += [f"Claims of the seeds on {ds} at this budget:", ""]
            lines += [f"- {c['claim']}: {'holds' if c['holds'] else 'does NOT hold'} ({c['detail']})"
                      for c in result["claims"][ds]]
            lines.append("")
    if not result.get("local_loss"):
        lines += ["DIM's local loss cost was not measured in this run (`--loss-shapes ''`).", ""]
    else:
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
    p.add_argument("--no-supervised", dest="supervised", action="store_false",
                   help="skip the supervised ceilings (each trains an encoder for the budget's steps)")
    p.add_argument("--out-root", default=str(ROOT / "runs" / "evidence"))
    p.add_argument("--loss-shapes", default="256,64,256;1024,64,256",
                   help="B,locations,D' of the local-loss measurement; ';'-separated; '' to skip")
    p.add_argument("--loss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rerender", action="store_true",
                   help="recheck the claims of --output's results and rewrite its markdown (no training)")
    p.add_argument("--output", default=str(RESULTS / "method_evidence"))
    args = p.parse_args()
    if args.loss_child:
        b, n, d, backend = args.loss_child.split(",")
        print(TAG + json.dumps(loss_child(int(b), int(n), int(d), backend)), flush=True)
        return
    if args.rerender:
        rerender(Path(args.output))
        return
    if args.epochs is not None:
        for ds in BUDGET:
            BUDGET[ds] = ["--epochs", str(args.epochs)]
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: --configs: unknown {unknown}; choose from {list(CONFIGS)}")
    result = {"environment": harness.environment("cpu", sys.argv), "loadavg_start": os.getloadavg(),
              "datasets": {}, "claims": {}, "local_loss": [],
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    out_root = Path(args.out_root)
    for ds in args.datasets.split(","):
        runs = result["datasets"].setdefault(ds, {})
        for name in configs:
            print(f"[{ds}] training {name} ...", flush=True)
            r = {"train": train(ds, name, out_root, args.seed, args.reuse), "expectation": CONFIGS[name][1]}
            r["probe"] = probe(r["train"]["checkpoint"], "trained")
            print(f"[{ds}] {name}: {json.dumps(r['probe'])} ({r['train']['wall_s']:.0f} s)", flush=True)
            runs[name] = r
        # baselines: the architectures freshly initialised and trained with the labels, the pixels,
        # the colours
        trained = list(runs)
        for name in ("amdim", "dim_l_jsd_dot"):
            if name in runs:
                runs[f"random encoder ({name})"] = {"probe": probe(runs[name]["train"]["checkpoint"], "random"),
                                                     "expectation": "clearly below the trained encoders"}
        any_ck = runs[trained[0]]["train"]["checkpoint"]
        runs["pixels"] = {"probe": probe(any_ck, "pixels"), "expectation": "the floor a method must beat"}
        runs["colour histogram"] = {"probe": colour_probe(ds),
                                    "expectation": "well below the trained encoders: colours alone do not tell the class "
                                                   "(v3: what the histogram reads is the object's area)"}
        if args.supervised:
            steps = runs[trained[0]]["train"]["steps"]
            for name in ("amdim", "dim_l_jsd_dot"):
                if name in runs:
                    print(f"[{ds}] supervised ceiling of the {name} encoder ({steps} steps) ...", flush=True)
                    runs[f"supervised ({name} encoder)"] = {
                        **supervised(ds, CONFIGS[name][0], steps, args.seed),
                        "expectation": "the ceiling: well above every self-supervised encoder"}
        result["claims"][ds] = claims(runs)
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
