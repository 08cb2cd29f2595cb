"""Write amdim_kernels/auto_table.py (the variants backend="auto" picks by size on CUDA) from the
results of one GPU run of benchmarks/gpu_check.sh.

    python benchmarks/auto_table.py RESULTS_DIR                  # print the table
    python benchmarks/auto_table.py RESULTS_DIR --out FILE       # write it (gpu_check: $OUT/auto_table.py)
    python benchmarks/auto_table.py RESULTS_DIR --write          # into amdim_kernels/auto_table.py

Rules: for every (shape, dtype) whose forward+backward was timed with more than one variant
(bench_*.json records carry the variants that ran), the fastest one; at D and N*M values no run
measured, today's defaults. No variant becomes a default unless the run's GPU tests passed
(gpu_tests.xml: no failure, no error) at the same commit; the dense forward only where its N x M
fp32 scores fit DENSE_MAX_BYTES.
"""
from __future__ import annotations

import argparse
import json
import pprint
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RULE = {"fwd": "tiled", "bwd": ["cuda", "triton"]}
DENSE_MAX_BYTES = 64 << 20


def step_status(results: Path, step: str) -> str | None:
    """The last status steps.tsv records for `step` ("ok", "cut at the limit", "exit N"), or None."""
    path = results / "steps.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]] if path.exists() else []
    statuses = [row[1] for row in rows if len(row) > 1 and row[0] == step]
    return statuses[-1] if statuses else None


def tests_passed(results: Path) -> tuple[bool, str]:
    """(whether the run's GPU tests all passed, a line saying what they did). A tests step cut at
    its limit leaves a junit file of the tests that ran (pytest writes it when interrupted), and a
    run whose tests were all skipped passed nothing: neither counts."""
    xml = results / "gpu_tests.xml"
    if not xml.exists():
        return False, "no gpu_tests.xml (the tests step did not finish)"
    suites = ET.parse(xml).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    said = ", ".join(f"{v} {k}" for k, v in counts.items())
    step = step_status(results, "tests")
    if step not in (None, "ok"):
        return False, f"{said}; the tests step did not complete ({step})"
    ok = counts["tests"] > counts["skipped"] and counts["failures"] == 0 and counts["errors"] == 0
    return ok, said + ("" if ok or counts["failures"] or counts["errors"] else "; none ran")


def timings(results: Path) -> dict:
    """{(shape, dtype): {(fwd, bwd): fastest median seconds}} of fused forward+backward records."""
    out: dict = {}
    for path in sorted(results.glob("bench_*.json")):
        data = json.loads(path.read_text())
        for r in data.get("records", []):
            if (r.get("variant") != "fused" or r.get("mode") != "fwd+bwd" or r.get("status") != "ok"
                    or not r.get("cuda_variants")):
                continue
            key = (tuple(r["shape"]), r["dtype"])
            variants = tuple(r["cuda_variants"])
            best = out.setdefault(key, {})
            best[variants] = min(best.get(variants, float("inf")), r["median_s"])
    return out


def rules_from(timed: dict) -> list[dict]:
    """One rule per measured (dtype, D, N*M) whose fastest variant was compared with another,
    ordered by N*M within each (dtype, D) so that each rule covers sizes up to its own."""
    rules = []
    for (shape, dtype), by_variant in sorted(timed.items(), key=lambda kv: (kv[0][1], kv[0][0][3],
                                                                            kv[0][0][0] * kv[0][0][1] * kv[0][0][2])):
        n, b, l, d = shape
        allowed = {v: t for v, t in by_variant.items()
                   if v[0] != "dense" or n * b * l * 4 <= DENSE_MAX_BYTES}
        if len(allowed) < 2:
            continue   # nothing was compared
        (fwd, bwd), seconds = min(allowed.items(), key=lambda kv: kv[1])
        rules.append({"dtypes": [dtype], "min_d": d, "max_d": d, "max_nm": n * b * l, "fwd": fwd,
                      "bwd": [bwd] + [v for v in DEFAULT_RULE["bwd"] if v != bwd],
                      "measured_ms": round(seconds * 1e3, 4)})
    return rules


def render(rules: list[dict], measured: dict | None) -> str:
    header = ('"""Which CUDA variant runs a problem of a given size (read by amdim_kernels/variants.py).\n\n'
              "Written by `python benchmarks/auto_table.py RESULTS_DIR` from a GPU run of\n"
              "`benchmarks/gpu_check.sh`; edit it only through that script.\n\n")
    if measured is None:
        header += ("MEASURED is None: no GPU run has compared the variants at this commit. The table then holds only\n"
                   "the defaults that were in place before the new variants (the tiled Triton forward; the CUDA C++\n"
                   "backward where it can be built, else the Triton row/column backward): not measured against the\n"
                   "dense forward or the Triton g + cuBLAS backward.\n")
    else:
        header += ("MEASURED names the run (commit, device, results): each rule but the last is the fastest variant\n"
                   "measured at that size; other sizes keep the defaults of the last rule.\n")
    header += '"""\n\n'
    body = f"MEASURED = {pprint.pformat(measured, width=100)}\n\n"
    body += ("# First match wins. A rule matches a problem (N rows, M = B*L columns, D, dtype) when every bound\n"
             "# it names holds: \"dtypes\" (names), \"max_nm\" (N * M), \"min_d\", \"max_d\". \"bwd\" is an order of\n"
             "# preference among the backward variants available on the machine.\n")
    body += f"RULES = {pprint.pformat(rules + [DEFAULT_RULE], width=100, sort_dicts=False)}\n"
    return header + body


def build_table(results: Path) -> tuple[str, str]:
    """(the module text, a line saying how it was decided)."""
    ok, tests = tests_passed(results)
    env_path = results / "env.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    rules = rules_from(timings(results))
    if not ok or not rules:
        why = f"GPU tests: {tests}" if not ok else "no size was timed with two variants"
        return render([], None), f"defaults kept ({why})"
    measured = {"commit": env.get("commit"), "device": env.get("gpu"), "results": results.name,
                "gpu_tests": tests}
    return render(rules, measured), f"{len(rules)} measured rules (GPU tests: {tests})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a gpu_check.sh results directory")
    p.add_argument("--out", type=Path, help="write the table here")
    p.add_argument("--write", action="store_true", help="write amdim_kernels/auto_table.py")
    args = p.parse_args(argv)
    text, how = build_table(args.results)
    target = ROOT / "amdim_kernels" / "auto_table.py" if args.write else args.out
    if target is None:
        print(text)
    else:
        target.write_text(text)
    print(f"auto_table: {how}" + (f"; wrote {target}" if target else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
