"""What the CUDA code path decides before and around its kernels, checked without a GPU: dtype
checks at the dispatch point, which kernel backs each op on CUDA (the CUDA dispatch key is called
with CPU tensors, which the Triton kernels accept under the interpreter), the build probe and its
fallback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import amdim_kernels as ak
from amdim_kernels import nce, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """backend="triton" accepted for CPU tensors: the dispatch point's checks run as on CUDA."""
    monkeypatch.setitem(nce._FUSED_DEVICE, "triton", "cpu")
    monkeypatch.setattr(ops, "HAS_TRITON_CUDA", True)


def test_float64_is_refused_by_the_cuda_backend_naming_the_argument(triton_on_cpu):
    src, trg = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"src is float64 on cpu: .*backend='reference'"):
        ak.fused_nce_loss(src, trg, backend="triton")
    with pytest.raises(TypeError, match=r"src_mix is float64 on cpu: .*backend='reference'"):
        ak.fused_mixture_nce_loss(src.view(2, 2, 6), trg[:2], backend="triton")


# ---- which kernel backs nce_fwd / nce_bwd on CUDA ------------------------------------------------
_REGISTER_SCRIPT = textwrap.dedent(r"""
    import json, sys, torch
    from amdim_kernels import _extension, ops
    from amdim_kernels.triton_nce_bwd import nce_bwd_triton
    from amdim_kernels.triton_nce_bwd_cublas import nce_bwd_triton_cublas
    from amdim_kernels.triton_nce_dense import nce_fwd_dense
    from amdim_kernels.triton_nce_fwd import nce_fwd_triton

    # A stand-in for the CUDA C++ backward (op nce_bwd_cuda of csrc/cuda), as a shipped build
    # with CUDA kernels would define it: its result is recognisable, and it counts its calls.
    calls = []
    lib = torch.library.Library("amdim_kernels", "FRAGMENT")
    lib.define("nce_bwd_cuda(Tensor grad_pos, Tensor grad_neg_stat, Tensor grad_sumsq, Tensor src, "
               "Tensor trg, Tensor pos_idx, Tensor neg_stat, float? tclip, str neg_reduction) "
               "-> (Tensor grad_src, Tensor grad_trg)")
    def stand_in(*args):
        calls.append(1)
        return torch.full_like(args[3], 7.0), torch.full_like(args[4], 7.0)
    lib.impl("nce_bwd_cuda", stand_in, "CompositeExplicitAutograd")   # CPU tensors call it here

    g = torch.Generator().manual_seed(0)
    src, trg = torch.randn(7, 20, generator=g), torch.randn(5, 3, 20, generator=g)
    pos_idx = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    fwd_args = (src, trg, pos_idx, 20.0, "logsumexp")
    _, neg_stat, _ = nce_fwd_triton(*fwd_args)
    bwd_args = (torch.randn(7, 3, generator=g), torch.rand(7, generator=g), torch.tensor(0.3),
                src, trg, pos_idx, neg_stat, 20.0, "logsumexp")
    fwds = {"tiled": nce_fwd_triton(*fwd_args), "dense": nce_fwd_dense(*fwd_args)}
    bwds = {"triton": nce_bwd_triton(*bwd_args), "triton_cublas": nce_bwd_triton_cublas(*bwd_args),
            "cuda": stand_in(*bwd_args)}
    calls.clear()
    same = lambda x, y: all(torch.equal(a, b) for a, b in zip(x, y))
    # the candidates must differ bitwise, or the test could not tell them apart
    assert not same(fwds["tiled"], fwds["dense"])
    assert not same(bwds["triton"], bwds["triton_cublas"])

    def failing_build():
        raise _extension.BuildError("nvcc exploded")
    _extension.load_cuda_bwd = failing_build

    CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    out = []
    for status, fwd, bwd, *epilogue in json.loads(sys.argv[1]):
        calls.clear()
        why = ops._register_cuda(cuda_available=True, cuda_status=tuple(status), fwd_choice=fwd,
                                 bwd_choice=bwd, epilogue_choice=epilogue[0] if epilogue else "")
        ran = {}
        if why is None:   # the CUDA dispatch key, called with CPU tensors (interpreted kernels)
            f = torch.ops.amdim_kernels.nce_fwd.default.redispatch(CUDA, *fwd_args)
            b = torch.ops.amdim_kernels.nce_bwd.default.redispatch(CUDA, *bwd_args)
            ran = {"fwd": [k for k, v in fwds.items() if same(f, v)],
                   "bwd": [k for k, v in bwds.items() if same(b, v)], "calls": len(calls),
                   "epilogue": ops.SELECTION.epilogue, "described": ops.SELECTION.describe()}
        out.append({"why": why, **ran})
    print("RESULT " + json.dumps(out))
""")

SHIPPED, NONE, BUILD = ["shipped", None], [None, "no nvcc in CUDA_HOME"], ["build", None]
# (cuda status, AMDIM_KERNELS_CUDA_FWD, AMDIM_KERNELS_CUDA_BWD) -> forward, backward that ran
REGISTRATIONS = [
    ((SHIPPED, "", ""), "tiled", "cuda"),              # the table's default: the CUDA C++ kernel
    ((SHIPPED, "", "triton"), "tiled", "triton"),      # with the CUDA kernel present, asked away
    ((SHIPPED, "", "triton_cublas"), "tiled", "triton_cublas"),
    ((SHIPPED, "dense", "cuda"), "dense", "cuda"),
    ((NONE, "", ""), "tiled", "triton"),               # pip-only: no CUDA C++ kernel
    ((NONE, "dense", "triton_cublas"), "dense", "triton_cublas"),
    ((BUILD, "", ""), "tiled", "triton"),              # its build fails: the Triton backward
    ((NONE, "", "", "torch"), "tiled", "triton"),      # the torch-composed epilogue
]


def run_registrations(cases):
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for var in ("AMDIM_KERNELS_CUDA_FWD", "AMDIM_KERNELS_CUDA_BWD"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", _REGISTER_SCRIPT, json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc.stderr


def test_the_kernel_that_runs_on_cuda_is_the_one_chosen():
    """Each registration's forward and backward, called through the CUDA dispatch key: the
    variant that ran is identified by its bitwise result (the CUDA C++ one by a stand-in), so a
    choice that is recorded but not what runs fails here (e.g. AMDIM_KERNELS_CUDA_BWD=triton with
    the CUDA kernel present, while the CUDA kernel still backs nce_bwd)."""
    results, stderr = run_registrations([case for case, _, _ in REGISTRATIONS])
    for (case, fwd, bwd), got in zip(REGISTRATIONS, results):
        assert got["why"] is None, (case, got)
        assert got["epilogue"] == (case[3] if len(case) > 3 else "fused"), (case, got)
        assert got["fwd"] == [fwd] and got["bwd"] == [bwd], (case, got)
        assert got["calls"] == (bwd == "cuda"), (case, got)
    # the failed build of the last case: one message, naming what failed and what is used instead
    messages = [x for x in stderr.splitlines() if x.startswith("amdim_kernels: ")]
    assert len(messages) == 1 and "could not be built" in messages[0], stderr[-2000:]
    assert "Triton backward is used instead" in messages[0]
    assert "nvcc exploded" in stderr


def test_a_choice_that_cannot_be_honoured_is_an_error_not_a_fallback():
    results, _ = run_registrations([[NONE, "", "cuda"], [BUILD, "", "cuda"], [SHIPPED, "", "Triton"],
                                    [SHIPPED, "tile", ""], [SHIPPED, "", "", "none"]])
    assert "AMDIM_KERNELS_CUDA_BWD=cuda, but the CUDA C++ gradient kernel cannot be used" in results[0]["why"]
    assert "no nvcc in CUDA_HOME" in results[0]["why"]
    assert "building it failed" in results[1]["why"] and "nvcc exploded" in results[1]["why"]
    assert "AMDIM_KERNELS_CUDA_BWD must be one of cuda, triton, triton_cublas" in results[2]["why"]
    assert "AMDIM_KERNELS_CUDA_FWD must be one of tiled, dense" in results[3]["why"]
    assert "AMDIM_KERNELS_CUDA_EPILOGUE must be one of fused, torch" in results[4]["why"]


def test_table_rules_match_by_size_and_fall_back_to_an_available_backward():
    from amdim_kernels.variants import table_choice
    rules = [{"dtypes": ["bfloat16"], "max_nm": 1000, "fwd": "dense", "bwd": ["triton_cublas"]},
             {"min_d": 512, "fwd": "tiled", "bwd": ["cuda", "triton_cublas"]},
             {"fwd": "tiled", "bwd": ["cuda", "triton"]}]
    every = frozenset({"cuda", "triton", "triton_cublas"})
    pip_only = frozenset({"triton", "triton_cublas"})
    assert table_choice(10, 100, 64, torch.bfloat16, every, rules) == ("dense", "triton_cublas")
    assert table_choice(10, 101, 64, torch.bfloat16, every, rules) == ("tiled", "cuda")
    assert table_choice(10, 100, 64, torch.float16, every, rules) == ("tiled", "cuda")
    assert table_choice(10, 101, 1024, torch.float32, pip_only, rules) == ("tiled", "triton_cublas")
    assert table_choice(10, 101, 64, torch.float32, pip_only, rules) == ("tiled", "triton")


def test_committed_table_is_todays_defaults_until_measured():
    """No variant becomes a default before a GPU run measured it (benchmarks/auto_table.py)."""
    from amdim_kernels import auto_table
    if auto_table.MEASURED is None:
        assert auto_table.RULES == [{"fwd": "tiled", "bwd": ["cuda", "triton"]}]
    else:   # written by benchmarks/auto_table.py from a gpu_check run: says which
        assert {"commit", "device", "results"} <= set(auto_table.MEASURED)


@pytest.mark.parametrize("mode", ["eager", "compiled", "reduce-overhead"])
def test_the_cuda_branch_of_the_dispatch_runs_the_loss_op(triton_on_cpu, monkeypatch, mode):
    """backend="triton", non-strict: fused_nce_loss takes the loss op (here its CPU kernel), in
    eager mode and traced by torch.compile(fullgraph=True) alike; strict calls and
    AMDIM_KERNELS_CUDA_EPILOGUE=torch take the torch epilogue."""
    from amdim_kernels import nce_loss_op, variants
    from amdim_kernels.reference import nce_loss_reference
    monkeypatch.setattr(ops, "SELECTION", variants.Selection(frozenset({"triton"}), None, None))
    calls = []
    op = nce_loss_op.nce_loss

    def spy(*args):
        calls.append(args[5])
        return op(*args)
    monkeypatch.setattr(nce_loss_op, "nce_loss", spy)
    g = torch.Generator().manual_seed(0)
    src = torch.randn(9, 7, generator=g, requires_grad=True)
    trg = torch.randn(5, 4, 7, generator=g, requires_grad=True)
    pos_idx = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])

    def objective(s, t, p):
        loss, reg = ak.fused_nce_loss(s, t, p, estimator="jsd", backend="triton", strict=False)
        return loss + reg
    if mode != "eager":
        torch._dynamo.reset()
        objective = torch.compile(objective, fullgraph=True,
                                  mode=None if mode == "compiled" else mode)
    out = objective(src, trg, pos_idx)
    got = torch.autograd.grad(out, (src, trg))
    loss, reg = nce_loss_reference(src, trg, pos_idx, estimator="jsd")
    want = torch.autograd.grad(loss + reg, (src, trg))
    torch.testing.assert_close(out, loss + reg, rtol=2e-5, atol=2e-6)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6)
    assert calls and set(calls) == {"jsd"}
    calls.clear()
    ak.fused_nce_loss(src, trg, pos_idx, backend="triton", strict=True)
    monkeypatch.setattr(ops, "SELECTION", variants.Selection(frozenset({"triton"}), None, None, "torch"))
    ak.fused_nce_loss(src, trg, pos_idx, backend="triton", strict=False)
    assert not calls
