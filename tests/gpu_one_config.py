"""A pytest plugin for the GPU correctness run (benchmarks/gpu_check.sh: -p gpu_one_config): each
autotuned Triton kernel runs the first config its pruning keeps, untimed, instead of benchmarking
them all. On a fresh GPU machine compilation and tuning are what the tests' time goes to; every
config's accuracy is tested under the interpreter and its sm_90 build by the CPU tests, and the
benchmarks autotune. gpu_check's largest-N step uses `first_configs_only` too: tuning at N = B =
65536 would run each kernel for seconds per timing."""
import pytest


def _untimed(kernel_call, quantiles):
    """The autotuner's benchmark, without running anything: triton 3.6 (the GPU machine's) times
    even a single pruned config (do_bench: a few warm-up and ~100 ms of timed runs per new key);
    3.9 skips it."""
    return [0.0 for _ in quantiles]


def autotuned_kernels():
    from amdim_kernels import triton_nce_bwd as tnb, triton_nce_bwd_cublas as tgc
    from amdim_kernels import triton_nce_fwd as tnf
    return [tnf._nce_fwd_split_kernel, tnb._nce_bwd_src_kernel, tnb._nce_bwd_trg_kernel,
            tgc._nce_g_kernel]


def first_configs_only(kernels=None):
    """Make every autotuned kernel take its first pruned config, untimed; returns the undo."""
    tuned = autotuned_kernels() if kernels is None else kernels
    saved = [(k.early_config_prune, k.__dict__.get("do_bench")) for k in tuned]

    def first(prune):
        return lambda configs, nargs, **kw: (prune(configs, nargs, **kw) if prune else configs)[:1]
    for k, (prune, _) in zip(tuned, saved):
        k.early_config_prune = first(prune)
        k.do_bench = _untimed   # shadows Autotuner.do_bench (a cached_property)

    def undo():
        for k, (prune, bench) in zip(tuned, saved):
            k.early_config_prune = prune
            if bench is None:
                del k.do_bench
            else:
                k.do_bench = bench
    return undo


@pytest.fixture(scope="session", autouse=True)
def one_config_per_kernel():
    undo = first_configs_only()
    yield
    undo()
