"""Smoke tests of the benchmarks: the shared harness (benchmarks/harness.py), tiny CPU runs of
bench_nce.py and bench_mixture.py writing JSON + markdown + PNG, and benchmarks/plot.py.

The bench_nce run times only fwd+bwd, to keep the count of child processes (two per loss case)
low. Each run's records say which backend their losses ran (harness.backends_ran): a "fused"
row must have run the C++ kernel. Timing fields are checked for what they must be (the median
and minimum of the recorded times, ratios of the medians), not merely for being positive.
Without matplotlib the PNGs are not expected (the plot-only tests skip).
"""
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIB = 2 ** 20
try:
    import matplotlib  # noqa: F401
    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False


def is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000


def assert_plot_written(path: Path) -> None:
    """A plot where matplotlib is installed, none without it (the scripts skip it)."""
    assert is_png(path) if HAS_MATPLOTLIB else not path.exists(), path


def assert_timing_fields(r: dict, repeats: int) -> None:
    times = r["times_s"]
    assert len(times) == repeats and all(t > 0 for t in times), r
    assert r["median_s"] == statistics.median(times) and r["min_s"] == min(times), r


def run_python(args, cwd, timeout):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


# ----------------------------------------------------------------------------- harness

def test_clock_times_each_call_after_the_warmup():
    calls, prepares = [], []
    first, times = harness.Clock("cpu").run(lambda: calls.append(1), lambda: prepares.append(1),
                                            warmup=2, repeats=5)
    assert len(calls) == len(prepares) == 1 + 2 + 5   # first call, warm-up, timed calls
    assert len(times) == 5 and all(t > 0 for t in times) and first > 0
    fields = harness.timing_fields(first, [3.0, 1.0, 2.0])
    assert fields["median_s"] == 2.0 and fields["min_s"] == 1.0 and fields["first_call_s"] == first


PEAK_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {bench!r})
import harness
harness.use_mmap_for_large_allocations()
MIB = 2 ** 20
kept = []
def forward():
    return torch.ones(8 * MIB // 4)                     # 8 MiB held by the output
def backward(out):
    temp = torch.ones(24 * MIB // 4)                    # 24 MiB freed before the call returns
    kept.append(torch.ones(8 * MIB // 4))               # 8 MiB kept, reported as gradients
    del temp
def prepare():
    kept.clear()
fwd = harness.peak_extra("cpu", forward, None, prepare, lambda: 0)
both = harness.peak_extra("cpu", forward, backward, prepare, lambda: 8 * MIB)
print(json.dumps([fwd / MIB, both / MIB]))
"""


def test_peak_extra_cpu_measures_what_a_call_holds():
    # a child process of its own: the mmap threshold and the RSS peak are per process
    proc = run_python(["-c", PEAK_SCRIPT.format(bench=str(BENCH))], ROOT, 120)
    assert proc.returncode == 0, proc.stderr
    fwd, both = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 7.5 <= fwd <= 10, fwd
    # forward's 8 held + 24 temporary + 8 gradient - 8 gradient bytes
    assert 31 <= both <= 36, both


def test_environment_record(monkeypatch):
    monkeypatch.setenv("AMDIM_COMMIT", "0123abc")
    env = harness.environment("cpu", ["bench.py", "--quick"])
    assert env["git_commit"] == "0123abc"
    for key in ("device", "device_name", "driver", "torch", "triton", "cuda", "python", "threads",
                "git_dirty", "command", "utc"):
        assert key in env, key
    assert env["device"] == "cpu" and env["device_name"] and env["driver"] is None
    assert env["command"].endswith("bench.py --quick")
    assert "0123abc" in harness.versions_line(env)


def test_run_child_reports_result_and_failure(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import sys\nprint('noise')\nprint('TAG:' + '{\"x\": 1}')\n"
                      "sys.exit(int(sys.argv[1]))\n")
    assert harness.run_child(script, ["0"], "TAG:") == ({"x": 1}, None)
    payload, (status, message) = harness.run_child(script, ["3"], "TAG:")
    assert payload is None and status == "error" and "exited with 3" in message


# ----------------------------------------------------------------------------- plots

def nce_result(shapes=((8, 8, 4, 16), (16, 16, 4, 16)), oom_last=True):
    """A small bench_nce result in the format bench_nce.py writes."""
    records = []
    for k, shape in enumerate(shapes):
        scale = k + 1
        for variant, base in (("reference", 3e-3), ("compiled", 2e-3), ("fused", 1e-3)):
            for mode, factor in (("fwd", 1), ("fwd+bwd", 3)):
                oom = oom_last and variant == "reference" and k == len(shapes) - 1
                records.append(dict(variant=variant, shape=list(shape), dtype="float32", mode=mode,
                                    status="OOM" if oom else "ok", error=None,
                                    median_s=None if oom else base * factor * scale,
                                    peak_extra_bytes=None if oom else int(base * 1e9 * scale)))
        for mode, t in (("src@trg^T", 2e-4), ("g@trg", 2e-4), ("g^T@src", 2e-4)):
            records.append(dict(variant="products", shape=list(shape), dtype="float32", mode=mode,
                                status="ok", error=None, median_s=t * scale, peak_extra_bytes=None))
    env = dict(device="cpu", device_name="Test CPU", git_commit="feedbeef" * 5, git_dirty=False,
               torch="2.x", triton="3.x", cuda=None, utc="2026-11-23T00:00:00+00:00")
    return dict(schema="bench_nce/1", complete=True, env=env,
                settings=dict(repeats=3, warmup=1, fused_backend="auto"), records=records,
                summary=[], targets=[])


def test_write_results_writes_json_markdown_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = nce_result()
    written = harness.write_results(tmp_path / "r.json", result, "# table\n")
    assert written == [tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"]
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert (tmp_path / "r.md").read_text() == "# table\n"
    assert is_png(tmp_path / "r.png")
    assert not list(tmp_path.glob("*.tmp*"))


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    written = harness.write_results(tmp_path / "r.json", nce_result(), "# table\n")
    assert written == [tmp_path / "r.json", tmp_path / "r.md"]
    assert not (tmp_path / "r.png").exists()
    assert "matplotlib not installed: skipping the plot" in capsys.readouterr().out


def test_plot_cli_on_a_small_results_file(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "small.json"
    results.write_text(json.dumps(nce_result()))
    proc = run_python([BENCH / "plot.py", results, "-o", tmp_path / "out.png"], tmp_path, 120)
    assert proc.returncode == 0, proc.stderr
    assert is_png(tmp_path / "out.png")
    proc = run_python([BENCH / "plot.py", results], tmp_path, 120)   # default: beside the JSON
    assert proc.returncode == 0 and is_png(tmp_path / "small.png")

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"records": [{"x": 1}]}))
    proc = run_python([BENCH / "plot.py", other], tmp_path, 120)
    assert proc.returncode == 2 and "not a bench_nce or bench_mixture results file" in proc.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in (BENCH / "results").glob("bench_*.json")))
def test_plot_every_committed_results_file(tmp_path, name):
    pytest.importorskip("matplotlib")
    result = json.loads((BENCH / "results" / name).read_text())
    assert plot.save_plot(result, tmp_path / "p.png") == tmp_path / "p.png"
    assert is_png(tmp_path / "p.png")


# ----------------------------------------------------------------------------- the scripts

def help_options(script: str) -> set:
    proc = run_python([BENCH / script, "--help"], ROOT, 120)
    assert proc.returncode == 0, proc.stderr
    return set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", proc.stdout))


def test_command_lines_are_unchanged():
    # benchmarks/gpu_check.sh and earlier results depend on these options
    assert help_options("bench_nce.py") == {
        "-h", "--help", "--device", "--shapes", "--dtype", "--variants", "--modes", "--repeats",
        "--warmup", "--threads", "--fused-backend", "--tclip", "--reg-weight", "--sweep", "--quick",
        "--isolate", "--case-timeout", "--compile-timeout", "--tag", "--out",
        "--estimator", "--interleave", "--cpu-targets", "--two-pass"}
    assert help_options("bench_mixture.py") == {
        "-h", "--help", "--device", "--quick", "--warmup", "--repeats", "--losses", "--out"}


def test_bench_nce_quick_writes_json_markdown_and_png(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [BENCH / "bench_nce.py", "--quick", "--shapes", "8x8x4x16",
           "--variants", "reference", "fused", "products", "--modes", "fwd+bwd",
           "--threads", "1", "--out", out]
    proc = run_python(cmd, tmp_path, 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[3/3]" in proc.stdout   # one progress line per case

    result = json.loads(out.read_text())
    env = result["env"]
    for key in ("device_name", "torch", "triton", "cuda", "git_commit", "git_dirty", "threads", "command"):
        assert key in env, key
    assert env["device"] == "cpu" and env["threads"] == 1 and "--quick" in env["command"]
    assert result["settings"]["repeats"] >= 1 and result["complete"] is True

    records = result["records"]
    assert {(r["variant"], r["mode"]) for r in records} == {
        ("reference", "fwd+bwd"), ("fused", "fwd+bwd"),
        ("products", "src@trg^T"), ("products", "g@trg"), ("products", "g^T@src")}
    for r in records:
        assert r["status"] == "ok", r
        assert r["shape"] == [8, 8, 4, 16] and r["dtype"] == "float32"
        assert_timing_fields(r, result["settings"]["repeats"])
        if r["variant"] != "products":
            assert r["peak_extra_bytes"] is not None and r["first_call_s"] > 0
    median = {(r["variant"], r["mode"]): r["median_s"] for r in records}
    by_variant = {r["variant"]: r for r in records if r["variant"] != "products"}
    # the fused row ran the C++ kernel; the reference row calls the reference function directly
    assert by_variant["fused"]["backends"] == ["cpp"] and by_variant["reference"]["backends"] == []
    assert by_variant["reference"]["grad_bytes"] == (8 * 16 + 8 * 4 * 16) * 4

    (summary,) = result["summary"]
    fused, mm = median["fused", "fwd+bwd"], median["products", "src@trg^T"]
    three_mm = sum(median["products", p] for p in ("src@trg^T", "g@trg", "g^T@src"))
    assert summary["fused_fwdbwd_over_mm"] == pytest.approx(fused / mm)
    assert summary["fused_fwdbwd_over_3mm"] == pytest.approx(fused / three_mm)
    assert summary["speedup_fwdbwd_vs_reference"] == pytest.approx(median["reference", "fwd+bwd"] / fused)
    assert "mem_fwdbwd_fused_over_reference" in summary   # too few pages at this size to compare
    assert summary["fused_fwd_over_mm"] is None and summary["speedup_fwdbwd_vs_compiled"] is None
    markdown = out.with_suffix(".md").read_text()
    assert "| reference |" in markdown and "| products |" in markdown
    assert_plot_written(out.with_suffix(".png"))


def test_bench_mixture_quick_writes_json_markdown_and_png(tmp_path):
    out = tmp_path / "mix.json"
    proc = run_python([BENCH / "bench_mixture.py", "--quick", "--losses", "jsd", "--out", out],
                      tmp_path, 900)   # the fused rows build the C++ extension on first use
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[4/4]" in proc.stdout

    result = json.loads(out.read_text())
    assert set(result) == {"env", "shape", "warmup", "repeats", "records", "summary"}
    assert result["shape"] == dict(n=16, b=16, l=9, d=32, k=4)
    assert (result["warmup"], result["repeats"]) == (1, 2)
    assert result["env"]["device"] == "cpu" and result["env"]["git_commit"]
    records = result["records"]
    assert {(r["loss"], r["variant"], r["mode"]) for r in records} == {
        ("jsd", v, m) for v in ("reference", "fused") for m in ("fwd", "fwd+bwd")}
    for r in records:
        assert r["status"] == "ok", r
        assert_timing_fields(r, 2)
        assert r["first_call_s"] > 0 and r["peak_extra_bytes"] >= 0
        assert r["backends"] == (["cpp"] if r["variant"] == "fused" else []), r
    median = {(r["variant"], r["mode"]): r["median_s"] for r in records}
    assert {(s["loss"], s["mode"]) for s in result["summary"]} == {("jsd", "fwd"), ("jsd", "fwd+bwd")}
    for s in result["summary"]:
        assert s["speedup"] == pytest.approx(median["reference", s["mode"]] / median["fused", s["mode"]])
    assert "| jsd | fwd+bwd | fused |" in out.with_suffix(".md").read_text()
    assert_plot_written(out.with_suffix(".png"))


def test_method_evidence_runs_end_to_end(tmp_path):
    """benchmarks/method_evidence.py at its smallest: one DIM(G) run for an epoch on digits, its
    probes, the baselines and a tiny local-loss measurement, written as JSON and markdown; a second
    call with --reuse does not train again."""
    out = tmp_path / "ev"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "method_evidence.py"), "--datasets", "digits",
           "--configs", "dim_g_jsd", "--epochs", "1", "--loss-shapes", "8,4,8",
           "--out-root", str(tmp_path / "runs"), "--output", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=900)
    result = json.loads(out.with_suffix(".json").read_text())
    runs = result["datasets"]["digits"]
    assert set(runs) == {"dim_g_jsd", "pixels", "colour histogram"}
    assert runs["dim_g_jsd"]["train"]["cpu_s"] > 0
    assert set(runs["dim_g_jsd"]["probe"]) == {"conv", "fc", "y"}
    assert all(0 <= v["test_top1"] <= 1 for v in runs["dim_g_jsd"]["probe"].values())
    loss = result["local_loss"][0]
    assert loss["fused"]["backends"] == ["cpp"] and loss["reference"]["backends"] == ["reference"]
    for backend in ("fused", "reference"):
        assert_timing_fields(loss[backend], 5)
    assert "| dim_g_jsd |" in out.with_suffix(".md").read_text()
    stamp = (tmp_path / "runs" / "digits" / "dim_g_jsd" / "checkpoint.pt").stat().st_mtime_ns
    subprocess.run(cmd + ["--reuse"], check=True, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert (tmp_path / "runs" / "digits" / "dim_g_jsd" / "checkpoint.pt").stat().st_mtime_ns == stamp


def test_method_evidence_claims_need_more_than_a_tie():
    """An order of two probes is claimed only by more than TIE: a 0.004 lead is not "learns"."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import method_evidence as me
    run = lambda acc, std=0.1: {"probe": {"conv": {"test_top1": acc}, "fc": {"test_top1": acc - 0.05}},
                                "train": {"loss_std_last_epoch": std}}
    runs = {"amdim": run(0.45), "random encoder (amdim)": run(0.13), "dim_l_jsd_dot": run(0.270, 0.06),
            "random encoder (dim_l_jsd_dot)": run(0.266), "dim_g_jsd": run(0.267),
            "dim_l_nce_dot": run(0.254, 0.2), "dim_l_dv_dot": run(0.2, 0.7)}
    got = {c["claim"].split(" (")[0]: c["holds"] for c in me.claims(runs)}
    assert got == {"local MI beats global MI for classification": False, "JSD and NCE are close": True,
                   "DV is below JSD and NCE": True, "DV is less stable": True, "AMDIM above DIM": True,
                   "amdim learns: above its random encoder": True,
                   "dim_l_jsd_dot learns: above its random encoder": False}
    h = me.colour_histogram(torch.tensor([[[[0]], [[255]], [[128]]]], dtype=torch.uint8).expand(1, 3, 2, 2))
    assert h.shape == (1, 512) and h[0, (0 * 8 + 7) * 8 + 4] == 1.0
