"""Train and probe on a variant of the built-in shapes dataset: how docs/shapes.md's variant table
(the colour cue taken away step by step) was measured.

    python benchmarks/shapes_variants.py '{"palette": 3}' runs/variants/pal3 -- --method dim --epochs 10 --lr 1e-3
    python benchmarks/shapes_variants.py '{"palette": null, "gradient": 0.25, "_seed": 2}' OUT -- --probe-only

The JSON overrides fields of amdim.data.shapes.Nuisances (the current defaults otherwise; "_seed":
the random streams' first number, default 2 as for the table, which was run on v2's seed); the
options after `--` go to `python -m amdim.train` (on `--dataset shapes`, in OUT). Prints one line
`RESULT {...}`: the probes (amdim.evaluate) of the trained encoder, the same architecture randomly
initialised, and the raw pixels, on the variant's images. The variant replaces the dataset in this
process only (its cache name is the JSON), so nothing else sees it.
"""
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's amdim
from amdim.data import shapes  # noqa: E402


def main():
    if len(sys.argv) < 4 or sys.argv[3] != "--":
        raise SystemExit(__doc__)
    spec, out, rest = json.loads(sys.argv[1]), sys.argv[2], sys.argv[4:]
    seed = spec.pop("_seed", 2)
    nz = dataclasses.replace(shapes.DEFAULT, **{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
    shapes.VERSION = "variant-" + json.dumps({**spec, "_seed": seed}, sort_keys=True)   # the cache's key
    real = shapes.generate   # shapes_arrays() calls generate(split): give it the variant's nuisances and seed
    shapes.generate = lambda split, n=None, size=shapes.SIZE: real(split, n, size, nuisances=nz, seed=seed)
    from amdim import evaluate, train
    t0 = time.time()
    if "--probe-only" not in rest:
        train.main(["--dataset", "shapes", "--out-dir", out, "--overwrite", "--no-progress", "--no-eval", *rest])
    res = {"seed": seed, "spec": spec, "args": rest, "train_s": round(time.time() - t0, 1)}
    for features in ("trained", "random", "pixels"):
        r = evaluate.evaluate(str(Path(out) / "checkpoint.pt"), features, device="cpu")
        res[features] = {k: round(v["test_top1"], 4) for k, v in r["layers"].items()}
    print("RESULT", json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
