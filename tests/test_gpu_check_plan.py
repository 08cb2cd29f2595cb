"""benchmarks/gpu_check.sh (one GPU call of at most 480 s) and benchmarks/auto_table.py (the
backend="auto" table from its results), checked without a GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import auto_table  # noqa: E402

STEPS = ["env", "build", "tests", "bwd-ops", "targets", "amdim", "largest", "table", "sweep"]


def run(*args, env=None, timeout=120):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_plan_lists_every_step_in_priority_order_within_480_s():
    proc = run("--plan")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    end = next(i for i, x in enumerate(lines) if x.startswith("total "))
    rows = [re.match(r"(\S+)\s+(\d+)\s+(.+)", x) for x in lines[1:end]]
    assert [r.group(1) for r in rows] == STEPS
    assert all(r.group(3).strip() for r in rows)   # each says what it answers
    total = re.match(r"total (\d+) s of (\d+) \(limits \+ (\d+) s grace per step\)", lines[end])
    grace = int(total.group(3))
    assert int(total.group(1)) == sum(int(r.group(2)) + grace for r in rows)
    assert int(total.group(1)) <= int(total.group(2)) == 480
    # correctness before speed: the GPU tests take at most ~3 minutes and come right after the build
    limits = {r.group(1): int(r.group(2)) for r in rows}
    assert limits["tests"] <= 180


def test_plan_gives_the_device_command_with_this_checkouts_commit():
    """The device's copy of the tree has no .git: `AMDIM_COMMIT=$(git rev-parse HEAD)` would run
    there and record "unknown". --plan prints the command with the hash typed in, and the digest
    of the sources that env.json records beside it."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if commit.returncode != 0:
        pytest.skip("not a git checkout")
    out = run("--plan").stdout
    assert f"device command (timeout_s 540): AMDIM_COMMIT={commit.stdout.strip()} bash " \
           "benchmarks/gpu_check.sh" in out
    assert re.search(r"tree_digest [0-9a-f]{16}", out)


def test_dry_run_runs_every_steps_commands_on_the_cpu(tmp_path):
    """--dry-run: each step's commands on the CPU (tiny sizes for the largest-N search, the GPU
    tests collected and skipped, the benchmarks' arguments through their own parsers and the
    variant choices through the registration's check), writing what a GPU run writes: the shell,
    the inline Python and every command line are exercised before the one GPU call."""
    from amdim_kernels import _extension
    built = pathlib.Path(_extension.load()).parents[1]   # the extension these tests already built
    out = tmp_path / "dry"
    proc = run("--dry-run", timeout=600, env={"OUT": str(out), "AMDIM_COMMIT": "abc123",
                                              "TORCH_EXTENSIONS_DIR": str(built)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [x.split("\t") for x in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert [r[:2] for r in rows] == [[step, "ok"] for step in STEPS], rows
    env = json.loads((out / "env.json").read_text())
    digest = re.search(r"tree_digest ([0-9a-f]{16})", run("--plan").stdout)
    assert env["commit"] == "abc123" and env["gpu"] is None and env["torch"] == torch.__version__
    assert digest is None or env["tree_digest"] == digest.group(1)
    largest = json.loads((out / "largest.json").read_text())
    assert [r["status"] for r in largest["rows"]] == ["ok", "ok"]
    targets = (out / "targets.log").read_text()
    assert targets.count(" cases: ") == 7 and "AMDIM_KERNELS" not in targets   # variants accepted
    assert "bwd_compare': True" in (out / "bwd-ops.log").read_text()
    ok, said = auto_table.tests_passed(out)   # the GPU tests, collected and skipped
    assert not ok and said.endswith("; none ran") and " 0 failures, 0 errors" in said
    assert "defaults kept" in (out / "table.log").read_text()


def test_dry_run_refuses_a_variant_the_registration_would_refuse(tmp_path):
    """A misspelt AMDIM_KERNELS_CUDA_BWD in a step fails the dry run, as the registration would
    fail on the GPU (every fused call of that benchmark an error)."""
    text = SCRIPT.read_text().replace("AMDIM_KERNELS_CUDA_BWD=$v", "AMDIM_KERNELS_CUDA_BWD=${v}s")
    assert text != SCRIPT.read_text()
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "gpu_check.sh"
    script.write_text(text)
    for name in ("amdim_kernels", "tests", "csrc"):
        (tmp_path / name).symlink_to(ROOT / name)
    for name in ("bench_nce.py", "harness.py", "profile_gpu.py", "plot.py", "auto_table.py"):
        (tmp_path / "benchmarks" / name).symlink_to(ROOT / "benchmarks" / name)
    proc = subprocess.run(["bash", str(script), "--dry-run", "targets"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OUT": str(tmp_path / "out")})
    status = (tmp_path / "out" / "steps.tsv").read_text().splitlines()[1].split("\t")[1]
    assert status == "exit 1", proc.stdout + proc.stderr
    assert "AMDIM_KERNELS_CUDA_BWD must be one of" in (tmp_path / "out" / "targets.log").read_text()


def test_unknown_steps_are_refused():
    proc = run("tests", "bench")
    assert proc.returncode == 2 and "unknown step 'bench'" in proc.stderr


# ---- the table ----------------------------------------------------------------------------------
def bench_file(path, records):
    path.write_text(json.dumps({"records": records}))


def fused(shape, variants, ms, dtype="bfloat16"):
    return dict(variant="fused", mode="fwd+bwd", status="ok", shape=list(shape), dtype=dtype,
                cuda_variants=list(variants), median_s=ms / 1e3)


def junit(path, failures=0, tests=40, skipped=2):
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{tests}" '
                    f'failures="{failures}" errors="0" skipped="{skipped}"></testsuite></testsuites>')


@pytest.fixture
def results(tmp_path):
    (tmp_path / "env.json").write_text(json.dumps({"commit": "abc123", "gpu": "NVIDIA H200"}))
    small, s2 = (128, 128, 49, 1024), (4096, 4096, 49, 1024)
    bench_file(tmp_path / "bench_targets_default.json",
               [fused(small, ("tiled", "cuda"), 1.5), fused(s2, ("tiled", "cuda"), 20.0)])
    bench_file(tmp_path / "bench_targets_triton_cublas.json",
               [fused(small, ("tiled", "triton_cublas"), 1.2), fused(s2, ("tiled", "triton_cublas"), 12.0),
                dict(fused(s2, ("tiled", "triton"), 1.0), status="error")])     # a failure: ignored
    # dense wins at both, but S2's 4096 x 200704 fp32 scores (3 GiB) are not "cheap to hold"
    bench_file(tmp_path / "bench_amdim_dense.json",
               [fused(small, ("dense", "triton_cublas"), 0.9), fused(s2, ("dense", "triton_cublas"), 5.0)])
    return tmp_path


def load(text, tmp_path):
    path = tmp_path / "table_module.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("table_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_picks_the_fastest_measured_variant_per_size(results):
    from amdim_kernels.variants import table_choice
    junit(results / "gpu_tests.xml")
    text, how = auto_table.build_table(results)
    table = load(text, results)
    assert table.MEASURED["commit"] == "abc123" and "2 measured rules" in how
    every = frozenset({"cuda", "triton", "triton_cublas"})
    bf16 = torch.bfloat16
    assert table_choice(128, 128 * 49, 1024, bf16, every, table.RULES) == ("dense", "triton_cublas")
    assert table_choice(4096, 4096 * 49, 1024, bf16, every, table.RULES) == ("tiled", "triton_cublas")
    # sizes and dtypes nobody measured keep today's defaults
    assert table_choice(4096, 4096 * 49, 256, bf16, every, table.RULES) == ("tiled", "cuda")
    assert table_choice(128, 128 * 49, 1024, torch.float32, every, table.RULES) == ("tiled", "cuda")
    assert table.RULES[-1] == auto_table.DEFAULT_RULE


def test_no_default_changes_without_passing_gpu_tests(results):
    junit(results / "gpu_tests.xml", failures=1)
    text, how = auto_table.build_table(results)
    assert load(text, results).MEASURED is None and "1 failures" in how
    # every test skipped: nothing passed
    junit(results / "gpu_tests.xml", tests=40, skipped=40)
    text, how = auto_table.build_table(results)
    assert load(text, results).MEASURED is None and "none ran" in how
    # the tests step cut at its limit: pytest wrote the junit of the tests that ran, all passed
    junit(results / "gpu_tests.xml")
    (results / "steps.tsv").write_text("step\tstatus\tseconds\tlimit\ntests\tcut at the limit\t170\t170\n")
    text, how = auto_table.build_table(results)
    assert load(text, results).MEASURED is None and "cut at the limit" in how
    (results / "steps.tsv").write_text("step\tstatus\tseconds\tlimit\ntests\tok\t150\t170\n")
    assert load(auto_table.build_table(results)[0], results).MEASURED is not None
    (results / "gpu_tests.xml").unlink()      # the tests step was cut off: no verdict
    text, how = auto_table.build_table(results)
    assert load(text, results).RULES == [auto_table.DEFAULT_RULE] and "did not finish" in how


def test_committed_table_is_the_scripts_output():
    """amdim_kernels/auto_table.py is written by the script, never by hand."""
    from amdim_kernels import auto_table as committed
    text = (ROOT / "amdim_kernels" / "auto_table.py").read_text()
    if committed.MEASURED is None:
        assert text == auto_table.render([], None)
    else:
        rules = committed.RULES[:-1]
        assert text == auto_table.render(rules, committed.MEASURED)


def test_the_table_step_runs_alone_and_records_itself(results, tmp_path):
    """The step runner without a GPU: the table step, its log, steps.tsv, the plan beside them."""
    junit(results / "gpu_tests.xml")
    proc = run("table", env={"OUT": str(results)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = (results / "steps.tsv").read_text().splitlines()
    assert steps[0].split("\t") == ["step", "status", "seconds", "limit"]
    assert steps[1].split("\t")[:2] == ["table", "ok"] and len(steps) == 2
    assert "MEASURED = {" in (results / "auto_table.py").read_text()
    assert "measured rules" in (results / "table.log").read_text()
    assert (results / "plan.txt").read_text().startswith("step")


def test_train_gpu_reads_the_epoch_record_from_metrics_jsonl(tmp_path):
    """The trainer writes its epoch records to metrics.jsonl, not to stdout (the script used to
    grep stdout and always reported failure)."""
    from amdim.metrics import METRICS
    metrics = tmp_path / METRICS
    records = [{"kind": "train", "step": 0, "loss": 3.0},
               {"kind": "epoch", "epoch": 1, "images_per_s": 10.0},
               {"kind": "train", "step": 1, "loss": 2.0},
               {"kind": "epoch", "epoch": 2, "images_per_s": 12.5, "peak_gpu_mib": 1100.0}]
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    script = ROOT / "benchmarks" / "train_gpu.sh"
    proc = subprocess.run(["bash", str(script), "--last-epoch", str(metrics)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == records[-1]
    missing = subprocess.run(["bash", str(script), "--last-epoch", str(tmp_path / "none.jsonl")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 0 and missing.stdout == ""


# ---- the GPU run's plugin: one config per autotuned kernel, untimed ----------------------------
def test_one_config_per_kernel_runs_it_once_untimed():
    """tests/gpu_one_config.py: the first pruned config, and no timing of it (triton 3.6 times a
    single pruned config: ~100 ms of runs per autotuning key, some 8 runs of a second each at the
    largest-N step's N = B = 65536); undone afterwards."""
    pytest.importorskip("triton")
    import triton
    import triton.language as tl
    from gpu_one_config import autotuned_kernels, first_configs_only

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the toy kernel runs under the interpreter")
    pruned = []

    def prune(configs, named_args, **kwargs):
        pruned.append(len(configs))
        return configs

    @triton.autotune(configs=[triton.Config({"B": 16}), triton.Config({"B": 32})], key=["n"],
                     prune_configs_by={"early_config_prune": prune})
    @triton.jit
    def count_runs(count_ptr, n, B: tl.constexpr):
        tl.atomic_add(count_ptr, B)

    undo = first_configs_only([count_runs])
    count = torch.zeros(1, dtype=torch.int32)
    count_runs[(1,)](count, 5)
    assert count.item() == 16 and pruned == [2]      # the first config, run once: no timing runs
    assert count_runs.do_bench(lambda: 1 / 0, quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    undo()
    assert "do_bench" not in vars(count_runs) and count_runs.early_config_prune is prune
    # the package's autotuned kernels are the ones it patches
    kernels = autotuned_kernels()
    undo = first_configs_only()
    try:
        assert all(vars(k)["do_bench"].__name__ == "_untimed" for k in kernels)
    finally:
        undo()
    assert all("do_bench" not in vars(k) for k in kernels)
