"""bench_nce.py's interleaved CPU measurement (--interleave, --cpu-targets): the per-round ratios
to the products, the target checks, the case layout, and one tiny end-to-end run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_nce  # noqa: E402


def record(variant, mode, times, shape=(256, 256, 49, 256), estimator="nce"):
    return dict(variant=variant, mode=mode, shape=list(shape), dtype="float32", estimator=estimator,
                tclip=20.0, reg_weight=0.05, status="ok", error=None, interleaved=True,
                times_s=times, median_s=sorted(times)[len(times) // 2], peak_extra_bytes=2 ** 19)


def test_ratios_are_medians_of_per_round_ratios():
    # rounds 1 and 3 ran on a slow machine, round 2 on a fast one: every per-round ratio is 1.1,
    # while the ratio of the medians (1.1 / 0.5) would be 2.2
    fwd = [2.2, 0.11, 3.3]
    mm1 = [2.0, 0.1, 3.0]
    recs = [record("fused", "fwd", [3 * x for x in fwd]), record("fused", "eval", fwd),
            record("fused", "fwd+bwd", [3 * x for x in fwd]),
            record("products", "src@trg^T", mm1), record("products", "g@trg", [1.1 * x for x in mm1]),
            record("products", "g^T@src", [0.9 * x for x in mm1])]
    (row,), checks = bench_nce.summarize(recs, "cpu")
    assert row["interleaved"]
    assert row["fused_eval_over_mm"] == pytest.approx(1.1)
    assert row["fused_fwd_over_mm"] == pytest.approx(3.3)   # the training forward forms the gradient
    assert row["fused_fwdbwd_over_3mm"] == pytest.approx(1.1)
    assert row["fused_eval_over_mm_range"] == pytest.approx([1.1, 1.1])
    by_target = {c["target"]: c for c in checks}
    assert by_target["eval fwd / product"]["passed"] is True     # <= 1.15
    assert by_target["fwd+bwd / three products"]["passed"] is True  # <= 1.3
    assert by_target["peak extra fwd+bwd MiB"]["passed"] is True   # 0.5 < 1
    # the per-round pairing matters: shuffle the products' rounds and the ratio changes
    recs[3] = record("products", "src@trg^T", [0.1, 2.0, 3.0])
    (row,), _ = bench_nce.summarize(recs, "cpu")
    assert row["fused_eval_over_mm"] == pytest.approx(1.1)  # round 3 alone still pairs
    assert row["fused_eval_over_mm_range"][1] == pytest.approx(22.0)


def test_targets_apply_to_their_estimator_only():
    shape = bench_nce.S_DIM
    recs = [record("fused", "fwd+bwd", [5.0], shape, "nce"), record("products", "src@trg^T", [1.0], shape, "nce"),
            record("products", "g@trg", [1.0], shape, "nce"), record("products", "g^T@src", [1.0], shape, "nce")]
    assert bench_nce.summarize(recs, "cpu")[1] == []   # the DIM target is measured with jsd
    for r in recs:
        r["estimator"] = "jsd"
    (check,) = bench_nce.summarize(recs, "cpu")[1]
    assert check["value"] == pytest.approx(5 / 3) and check["passed"] is False


def test_interleaved_cases_and_dim_positives():
    cases = bench_nce.build_cases(bench_nce.CPU_TARGET_CASES, ["float32"], ["reference", "fused", "products"],
                                  ["fwd", "fwd+bwd"], interleave=True)
    assert [c["variant"] for c in cases] == ["interleaved", "reference", "reference"] * 3
    dim = [c for c in cases if tuple(c["shape"]) == bench_nce.S_DIM]
    assert {(c["estimator"], c["tclip"], c["reg_weight"]) for c in dim} == {("jsd", None, 0.0)}
    import torch
    _, _, pos_idx = bench_nce.make_inputs((12, 3, 4, 5), torch.float32, "cpu", False)
    assert pos_idx.tolist() == [0] * 4 + [1] * 4 + [2] * 4   # N = B * L: row i's image is i // L


@pytest.mark.parametrize("two_pass", [False, True])
def test_quick_interleaved_run_writes_aligned_rounds(tmp_path, two_pass):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, BENCH / "bench_nce.py", "--quick", "--interleave", "--shapes", "8x8x4x16",
           "--variants", "fused", "products", "--modes", "fwd", "fwd+bwd",
           "--threads", "2", "--estimator", "jsd", "--tclip", "none", "--out", out]
    cmd += ["--two-pass"] * two_pass
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    records = result["records"]
    assert {(r["variant"], r["mode"]) for r in records} == {
        ("fused", "fwd"), ("fused", "fwd+bwd"), ("fused", "eval"), ("products", "src@trg^T"), ("products", "g@trg"),
        ("products", "g^T@src")}
    for r in records:
        assert r["status"] == "ok" and r["interleaved"] and len(r["times_s"]) == result["settings"]["repeats"]
        assert r["estimator"] == "jsd" and r["tclip"] is None
        assert (r["peak_extra_bytes"] is not None) == (r["variant"] == "fused")
        if r["variant"] == "fused":   # the fused rows really ran the C++ kernel, on the path asked for
            assert r["backends"] == ["cpp"], r
            assert r["gradient_in_forward"] == (r["mode"] != "eval" and not two_pass), r
    (summary,) = result["summary"]
    assert summary["interleaved"] and summary["fused_fwdbwd_over_3mm_range"] is not None
    assert "| 8x8x4x16 | float32 | jsd, tclip None" in out.with_suffix(".md").read_text()
