"""A pytest plugin for the GPU correctness run (benchmarks/gpu_check.sh: -p gpu_one_config): each
autotuned Triton kernel compiles the first config its pruning keeps instead of benchmarking all of
them. On a fresh GPU machine compilation is what the tests' time goes to; every config's accuracy
is tested under the interpreter and its sm_90 build by the CPU tests, and the benchmarks autotune.
gpu_check's largest-N step uses `first_configs_only` too: autotuning at N = B = 65536 would run
every config for seconds each."""
import pytest


def first_configs_only():
    """Make every autotuned kernel take its first pruned config; returns the undo."""
    from amdim_kernels import triton_nce_bwd as tnb, triton_nce_bwd_cublas as tgc
    from amdim_kernels import triton_nce_fwd as tnf
    tuned = [tnf._nce_fwd_split_kernel, tnb._nce_bwd_src_kernel, tnb._nce_bwd_trg_kernel,
             tgc._nce_g_kernel]
    saved = [k.early_config_prune for k in tuned]

    def first(prune):
        return lambda configs, nargs, **kw: (prune(configs, nargs, **kw) if prune else configs)[:1]
    for k, prune in zip(tuned, saved):
        k.early_config_prune = first(prune)

    def undo():
        for k, prune in zip(tuned, saved):
            k.early_config_prune = prune
    return undo


@pytest.fixture(scope="session", autouse=True)
def one_config_per_kernel():
    undo = first_configs_only()
    yield
    undo()
