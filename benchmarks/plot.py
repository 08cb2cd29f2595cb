"""Plots a benchmark results file (bench_nce or bench_mixture JSON) as a PNG.

    python benchmarks/plot.py benchmarks/results/bench_nce_cuda_h100.json            # writes .png beside it
    python benchmarks/plot.py benchmarks/results/bench_mixture_cpu.json -o mix.png

bench_nce: one row of two panels per (dtype, D): median time and peak extra memory against the
number of score columns M = B*L (each row's negatives are (B-1)*L of them), log-log, one line per
variant and mode; the time panel also draws the matrix-product floors (src@trg^T alone, the floor
of a forward; the three products, the floor of forward + backward), the memory panel the size of
one N x M fp32 score matrix. Cases that failed (OOM, timeout, error) are listed under the panel.
bench_mixture: the script measures a single shape, so its figure is bars (reference and fused) per
loss and mode, time and peak extra memory, with the N*k x M score-matrix size on the memory panel.

The title names the device, the commit and the date from the file's environment record.
Needs matplotlib (the `bench` extra); without it save_plot() prints a line and returns None.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

MIB = 2 ** 20
SKIP_MESSAGE = "matplotlib not installed: skipping the plot"
# colour per variant, line style and marker per mode
COLORS = {"fused": "tab:blue", "reference": "tab:red", "compiled": "tab:green"}
LABELS = {"fused": "fused", "reference": "eager reference", "compiled": "torch.compile reference"}
MODE_STYLE = {"fwd+bwd": dict(linestyle="-", marker="o"), "fwd": dict(linestyle="--", marker="s",
                                                                       markerfacecolor="none")}
PRODUCTS = ("src@trg^T", "g@trg", "g^T@src")


def kind_of(result: dict) -> str:
    """"nce" or "mixture", from the file's layout (older bench_nce files have the schema key too)."""
    if str(result.get("schema", "")).startswith("bench_nce"):
        return "nce"
    records = result.get("records") or []
    if "shape" in result and isinstance(result["shape"], dict) and all("loss" in r for r in records):
        return "mixture"
    raise ValueError("not a bench_nce or bench_mixture results file (no 'schema: bench_nce/..' and "
                     "no per-loss records)")


def title_lines(result: dict, name: str) -> str:
    env = result.get("env", {})
    commit = env.get("git_commit") or "unknown commit"
    commit = commit[:12] + (" (dirty tree)" if env.get("git_dirty") else "")
    when = (env.get("utc") or "")[:10]
    versions = f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}"
    if env.get("driver"):
        versions += f", driver {env['driver']}"
    return (f"{name} on {env.get('device_name', '?')} ({env.get('device', '?')}), "
            f"commit {commit}, {when}\n{versions}")


# ----------------------------------------------------------------------------- bench_nce

def _ok(records, **match):
    return [r for r in records if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _nce_rows(result: dict):
    """{(dtype, D): records} in the order first seen."""
    groups = {}
    for r in result["records"]:
        groups.setdefault((r["dtype"], r["shape"][3]), []).append(r)
    return groups


def _series(records, value):
    """Sorted (M, value) pairs; value(record) may return None (then the point is left out)."""
    pts = sorted((r["shape"][1] * r["shape"][2], value(r)) for r in records)
    return [p for p in pts if p[1] is not None and p[1] > 0]


def plot_nce(result: dict, plt):
    settings = result.get("settings", {})
    groups = _nce_rows(result)
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 4.4 * len(groups) + 1.6), squeeze=False)
    for row, ((dtype, d), recs) in enumerate(groups.items()):
        ax_t, ax_m = axes[row]
        shapes = sorted({tuple(r["shape"]) for r in recs}, key=lambda s: s[1] * s[2])
        ls = sorted({s[2] for s in shapes})
        n_eq_b = all(s[0] == s[1] for s in shapes)
        where = f"{dtype}, D = {d}, " + ("N = B, " if n_eq_b else "") + "L = " + "/".join(map(str, ls))
        failures, zeros = [], []
        for variant in ("fused", "reference", "compiled"):
            for mode in ("fwd", "fwd+bwd"):
                sel = [r for r in recs if r["variant"] == variant and r["mode"] == mode]
                if not sel:
                    continue
                label = f"{LABELS[variant]}, {mode}"
                style = dict(color=COLORS[variant], **MODE_STYLE[mode])
                t = _series(_ok(sel), lambda r: r["median_s"] * 1e3)
                m = _series(_ok(sel), lambda r: None if r.get("peak_extra_bytes") is None
                            else r["peak_extra_bytes"] / MIB)
                if t:
                    ax_t.plot(*zip(*t), label=label, **style)
                if m:
                    ax_m.plot(*zip(*m), label=label, **style)
                for r in sel:
                    at = f"M = {r['shape'][1] * r['shape'][2]}"
                    if r.get("status") != "ok":
                        failures.append(f"{label}: {r['status']} at {at}")
                    elif r.get("peak_extra_bytes") == 0:   # a log axis has no 0
                        zeros.append(f"{label}: 0 MiB at {at}")
        prods = [r for r in recs if r["variant"] == "products"]
        mm1 = _series(_ok(prods, mode="src@trg^T"), lambda r: r["median_s"] * 1e3)
        if mm1:
            ax_t.plot(*zip(*mm1), color="black", linestyle=":", marker=".",
                      label="floor: 1 product src@trg^T (fwd)")
        by_shape = {}
        for r in _ok(prods):
            by_shape.setdefault(tuple(r["shape"]), {})[r["mode"]] = r["median_s"]
        mm3 = sorted((s[1] * s[2], sum(t.values()) * 1e3) for s, t in by_shape.items() if len(t) == 3)
        if mm3:
            ax_t.plot(*zip(*mm3), color="grey", linestyle=":", marker=".",
                      label="floor: 3 products (fwd+bwd)")
        score = sorted({(s[1] * s[2], s[0] * s[1] * s[2] * 4 / MIB) for s in shapes})
        ax_m.plot(*zip(*score), color="grey", linestyle="-.", marker="_", markersize=16,
                  label="one N x M fp32 score matrix")

        ax_t.set_title(f"time, {where}")
        ax_m.set_title(f"peak extra memory, {where}")
        ax_t.set_ylabel("median time per call (ms)")
        ax_m.set_ylabel("peak extra memory (MiB)")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("score columns M = B*L (negatives per row: (B-1)*L)")
            ax.grid(True, which="both", alpha=0.3)
            _label_log_axis(ax.yaxis)
            xs = sorted({s[1] * s[2] for s in shapes})
            if len(xs) <= 6:   # few points: label them with their shape
                ax.set_xticks(xs)
                ax.set_xticklabels([f"{x}\n({'x'.join(map(str, s))})"
                                    for x, s in zip(xs, _shape_per_m(shapes, xs))], fontsize=7)
                ax.minorticks_off()
                if len(xs) == 1:
                    ax.set_xlim(xs[0] / 2, xs[0] * 2)
        for ax, notes in ((ax_t, failures), (ax_m, zeros)):
            if notes:
                ax.text(0.99, 0.02, "\n".join(notes), transform=ax.transAxes, ha="right",
                        va="bottom", fontsize=8, color="darkred")
    note = (f"median of {settings.get('repeats')} calls after {settings.get('warmup')} warm-up calls; "
            f"fused backend {settings.get('fused_backend')}; peak extra = memory beyond the inputs "
            "and their gradients; tick labels: M (N x B x L x D)")
    if not result.get("complete", True):
        note += "; INCOMPLETE run"
    fig.suptitle(title_lines(result, "bench_nce") + "\n" + note, fontsize=10)
    _figure_legend(fig, axes.ravel())
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, 0.75 / height, 1, 1))   # tight_layout leaves room for the suptitle
    return fig


def _label_log_axis(axis):
    """Labels 1-2-5 steps on a log axis: a plot spanning less than a decade otherwise shows one label."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _figure_legend(fig, axes):
    """One legend for the whole figure (every row has the same series), below the panels."""
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)


def _shape_per_m(shapes, xs):
    by_m = {}
    for s in shapes:
        by_m.setdefault(s[1] * s[2], s)
    return [by_m[x] for x in xs]


# ----------------------------------------------------------------------------- bench_mixture

def plot_mixture(result: dict, plt):
    import numpy as np
    shape, records = result["shape"], result["records"]
    losses = [loss for loss in ("mixture", "jsd", "dv") if any(r["loss"] == loss for r in records)]
    groups = [(loss, mode) for loss in losses for mode in ("fwd", "fwd+bwd")
              if any(r["loss"] == loss and r["mode"] == mode for r in records)]
    m = shape["b"] * shape["l"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 6.2))
    x = np.arange(len(groups))
    width = 0.38
    failures = []
    for j, variant in enumerate(("reference", "fused")):
        t, mem = [], []
        for loss, mode in groups:
            rec = next((r for r in records
                        if (r["loss"], r["mode"], r["variant"]) == (loss, mode, variant)), None)
            ok = rec is not None and rec.get("status") == "ok"
            if rec is not None and not ok:
                failures.append(f"{loss} {mode} {variant}: {rec.get('status')}")
            t.append(rec["median_s"] * 1e3 if ok else np.nan)
            mem.append(max(rec["peak_extra_bytes"], 1) / MIB if ok else np.nan)
        offset = (j - 0.5) * width
        for ax, values, fmt in ((ax_t, t, "{:.2f}"), (ax_m, mem, "{:.1f}")):
            bars = ax.bar(x + offset, values, width, color=COLORS[variant], label=LABELS[variant])
            ax.bar_label(bars, labels=["" if np.isnan(v) else fmt.format(v) for v in values], fontsize=7)
    # the N*k x M (mixture) or N x M (estimators) fp32 score matrix that the fused losses never hold
    for i, (loss, _) in enumerate(groups):
        rows = shape["n"] * (shape["k"] if loss == "mixture" else 1)
        ax_m.hlines(rows * m * 4 / MIB, i - width, i + width, colors="black", linestyles="--",
                    label="one score matrix (fp32; N*k x M for mixture, N x M otherwise)"
                    if i == 0 else None)
    names = [f"{loss}\n{mode}" for loss, mode in groups]
    ax_t.set_ylabel("median time per call (ms)")
    ax_m.set_ylabel("peak extra memory (MiB)")
    where = (f"N = B = {shape['n']}, L = {shape['l']}, M = B*L = {m}, D = {shape['d']}, "
             f"k = {shape['k']} (mixture), fp32")
    ax_t.set_title(f"time, {where}", fontsize=9)
    ax_m.set_title(f"peak extra memory, {where}", fontsize=9)
    for ax in (ax_t, ax_m):
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels(names)
        ax.set_xlabel("loss and mode")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        _label_log_axis(ax.yaxis)
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 1.6)   # room for the value labels above the tallest bar
    if failures:
        ax_t.text(0.99, 0.98, "\n".join(failures), transform=ax_t.transAxes, ha="right", va="top",
                  fontsize=8, color="darkred")
    note = (f"median of {result.get('repeats')} calls after {result.get('warmup')} warm-up calls; "
            "peak extra = memory beyond the inputs and their gradients; one shape per run")
    fig.suptitle(title_lines(result, "bench_mixture") + "\n" + note, fontsize=10)
    _figure_legend(fig, (ax_t, ax_m))
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
    return fig


# ----------------------------------------------------------------------------- entry points

def save_plot(result: dict, png: Path) -> Optional[Path]:
    """Draws `result` into `png`; returns the path, or None (with a message) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print(SKIP_MESSAGE, flush=True)
        return None
    matplotlib.use("Agg")   # files only, never a window
    import matplotlib.pyplot as plt
    fig = plot_nce(result, plt) if kind_of(result) == "nce" else plot_mixture(result, plt)
    png = Path(png)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a bench_nce or bench_mixture JSON file")
    p.add_argument("-o", "--out", type=Path, help="PNG path (default: the JSON's path with .png)")
    args = p.parse_args(argv)
    result = json.loads(args.results.read_text())
    try:
        kind_of(result)
    except ValueError as exc:
        p.error(f"{args.results}: {exc}")
    png = save_plot(result, args.out or args.results.with_suffix(".png"))
    if png is not None:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
