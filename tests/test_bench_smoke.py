"""Smoke test of benchmarks/bench_nce.py: a --quick CPU run in a subprocess writes a complete result.

The fused row uses backend="reference" (no C++ build; the fused kernels are tested elsewhere) and
only fwd+bwd runs, to keep the count of child processes (two per loss case) and the time low.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_nce.py"), "--quick", "--shapes", "8x8x4x16",
           "--variants", "reference", "fused", "products", "--modes", "fwd+bwd",
           "--fused-backend", "reference",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[3/3]" in proc.stdout   # one progress line per case

    result = json.loads(out.read_text())
    env = result["env"]
    for key in ("device_name", "torch", "triton", "cuda", "git_commit", "git_dirty", "threads", "command"):
        assert key in env, key
    assert env["device"] == "cpu" and env["threads"] == 1 and "--quick" in env["command"]
    assert result["settings"]["repeats"] >= 1

    records = result["records"]
    assert {(r["variant"], r["mode"]) for r in records} == {
        ("reference", "fwd+bwd"), ("fused", "fwd+bwd"),
        ("products", "src@trg^T"), ("products", "g@trg"), ("products", "g^T@src")}
    for r in records:
        assert r["status"] == "ok", r
        assert r["shape"] == [8, 8, 4, 16] and r["dtype"] == "float32"
        assert r["median_s"] > 0 and len(r["times_s"]) == result["settings"]["repeats"]
        if r["variant"] != "products":
            assert r["peak_extra_bytes"] is not None and r["first_call_s"] > 0
    bwd = next(r for r in records if r["variant"] == "reference" and r["mode"] == "fwd+bwd")
    assert bwd["grad_bytes"] == (8 * 16 + 8 * 4 * 16) * 4

    (summary,) = result["summary"]
    for key in ("fused_fwdbwd_over_mm", "fused_fwdbwd_over_3mm", "speedup_fwdbwd_vs_reference"):
        assert summary[key] is not None and summary[key] > 0, key
    assert "mem_fwdbwd_fused_over_reference" in summary   # too few pages at this size to compare
    assert summary["fused_fwd_over_mm"] is None and summary["speedup_fwdbwd_vs_compiled"] is None
    markdown = out.with_suffix(".md").read_text()
    assert "| reference |" in markdown and "| products |" in markdown
