"""The CPU kernels' score-tile epilogues (csrc/epilogue.h), one build per instruction set, against
the plain PyTorch reference: the one torch's CPU capability picks on this machine in this process,
and every other one this CPU can run in a child process with ATEN_CPU_CAPABILITY set (the variable
that chooses ATen's own kernels). Ragged shapes (nothing a multiple of the 128 x 256 tile or of a
vector), all dtypes, the three estimators with and without the clip, the mixture, B = 1, gradients
included; always with at least two threads (columns are split per thread and merged)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amdim_kernels as ak
from loss_checks import loss_and_grads, make_inputs

HERE = Path(__file__).resolve().parent
ISAS = ["DEFAULT", "AVX2", "AVX512"]   # torch's CPU capabilities on x86, lowest first

# (N, B, L, D): rows across the 128-row tile, columns across the 256-column tile and ending mid-vector,
# D odd and above the vector width, L = 1, B = 1 (all columns positive).
SHAPES = [(131, 11, 25, 37), (7, 7, 25, 13), (150, 23, 13, 70), (5, 3, 49, 300), (9, 40, 1, 17),
          (3, 1, 49, 16)]
LOSSES = [("nce", 20.0), ("nce", None), ("jsd", 20.0), ("jsd", None), ("dv", 5.0)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def cases():
    out = []
    for shape in SHAPES:
        for estimator, tclip in LOSSES:
            if estimator == "dv" and shape[1] == 1:
                continue   # undefined without negatives (raises; tests/test_estimators.py)
            for dtype in (torch.float32, torch.float64):
                out.append((shape, estimator, tclip, dtype))
    return out


def this_isa() -> str:
    from amdim_kernels import ops  # noqa: F401  (loads the extension)
    return torch.ops.amdim_kernels.cpu_epilogue_isa()


def check_loss(shape, estimator, tclip, dtype, threads=2):
    n, b, l, d = shape
    src, trg, pos_idx = make_inputs(n, b, l, d, dtype, seed=n + b, scale=2.0)   # scores to ~+-15
    kw = dict(tclip=tclip, reg_weight=0.05, estimator=estimator)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx, **kw)
    finally:
        torch.set_num_threads(saved)
    if dtype in TOL:
        ref = loss_and_grads(ak.nce_loss_reference, src, trg, pos_idx, **kw)
        tol = TOL[dtype]
    else:   # 16-bit inputs: against float64 on the same (rounded) values
        ref = loss_and_grads(ak.nce_loss_reference, src.detach().double().requires_grad_(),
                             trg.detach().double().requires_grad_(), pos_idx, **kw)
        fused = tuple(x.double() for x in fused)
        tol = dict(rtol=2e-2, atol=1e-5)
    case = f"{this_isa()} {shape} {estimator} tclip={tclip} {dtype} threads={threads}"
    for name, f, r in zip(("loss", "lgt_reg", "grad src", "grad trg"), fused, ref):
        torch.testing.assert_close(f, r, **tol, msg=lambda m: f"{case}, {name}: {m}")


def check_mixture(dtype, threads=2):
    src_mix, trg, pos_idx = make_inputs(37, 13, 25, 21, dtype, k=3, seed=5, scale=2.0)
    kw = dict(tau=0.7, detach_q=False, tclip=20.0, reg_weight=0.05)
    torch.set_num_threads(threads)
    fused = loss_and_grads(ak.fused_mixture_nce_loss, src_mix, trg, pos_idx, **kw)
    ref = loss_and_grads(ak.mixture_nce_loss_reference, src_mix, trg, pos_idx, **kw)
    for name, f, r in zip(("loss", "lgt_reg", "grad src", "grad trg"), fused, ref):
        torch.testing.assert_close(f, r, **TOL[dtype], msg=lambda m: f"{this_isa()} mixture {name}: {m}")


def run_all(expected_isa: str) -> None:
    """Every check, for a child process of test_every_other_instruction_set."""
    assert this_isa() == expected_isa, (this_isa(), expected_isa)
    for case in cases():
        check_loss(*case)
    for dtype in (torch.bfloat16, torch.float16):
        check_loss((131, 11, 25, 37), "nce", 20.0, dtype)
    check_loss((150, 23, 13, 70), "jsd", None, torch.float32, threads=3)
    for dtype in (torch.float32, torch.float64):
        check_mixture(dtype)
    print("all checks passed")


# ----------------------------------------------------------------------------- this process

@pytest.fixture(autouse=True)
def _restore_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def case_id(case):
    shape, estimator, tclip, dtype = case
    return f"{'x'.join(map(str, shape))}-{estimator}-tclip{tclip}-{str(dtype).split('.')[-1]}"


@pytest.mark.parametrize("shape,estimator,tclip,dtype", cases(), ids=[case_id(c) for c in cases()])
def test_matches_reference(shape, estimator, tclip, dtype):
    check_loss(shape, estimator, tclip, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ["nce", "jsd"])
def test_half_inputs(dtype, estimator):
    check_loss((131, 11, 25, 37), estimator, 20.0, dtype)


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_thread_counts(threads):
    # 5 threads over 275 columns: ranges of 48-64 columns, one thread's crossing no tile border
    check_loss((131, 11, 25, 37), "nce", 20.0, torch.float32, threads=threads)
    check_loss((150, 23, 13, 70), "jsd", None, torch.float64, threads=threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixture(dtype):
    check_mixture(dtype)


def test_results_do_not_depend_on_the_timing_of_threads():
    src, trg, pos_idx = make_inputs(150, 23, 13, 70, torch.float32, scale=2.0)
    torch.set_num_threads(2)
    first = loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx)
    for _ in range(3):
        for x, y in zip(first, loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx)):
            assert torch.equal(x, y)


def test_the_capability_torch_picks_is_the_one_used():
    assert this_isa() == torch.backends.cpu.get_cpu_capability() or (
        this_isa() == "DEFAULT" and torch.backends.cpu.get_cpu_capability() not in ISAS)


# ----------------------------------------------------------------------------- the other builds

def other_isas() -> list[str]:
    here = torch.backends.cpu.get_cpu_capability()
    return ISAS[:ISAS.index(here)] if here in ISAS else []


@pytest.mark.parametrize("isa", other_isas())
def test_every_other_instruction_set(isa):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa.lower()}
    # from the checkout's root: `python -c` puts it first on sys.path, as `python -m pytest` does
    code = f"import sys; sys.path.insert(1, {str(HERE)!r}); import test_cpu_epilogue as t; t.run_all({isa!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE.parent, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "all checks passed" in proc.stdout, proc.stdout + proc.stderr[-4000:]


def test_each_instruction_set_keeps_its_symbols_to_itself():
    """A function that two objects both define (an inline function of a shared header) is kept
    once by the linker: from the AVX-512 object, it would run on CPUs without AVX-512. So an
    epilogue object may define only its own getters; everything else is local."""
    from amdim_kernels import _extension
    objects = sorted(Path(_extension.load()).parent.glob("epilogue_*.o"))
    nm = shutil.which("nm")
    if not objects or nm is None:
        pytest.skip("needs the first-use build's objects and binutils' nm")
    for obj in objects:
        isa = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}[obj.stem.split("_", 1)[1]]
        out = subprocess.run([nm, "-C", "--defined-only", "--extern-only", str(obj)],
                             capture_output=True, text=True, check=True).stdout
        symbols = [line.split(" ", 2)[2] for line in out.splitlines() if line.strip()]
        assert symbols, obj
        foreign = [s for s in symbols if f"amdim_kernels::{isa}::epilogue<" not in s]
        assert not foreign, (obj.name, foreign[:10])
