"""The public losses through their CUDA plan, on CPU tensors (loss_checks.cuda_plan_on_cpu: every
op's CUDA kernel, i.e. the Triton kernels under the interpreter, answers for the CPU key): the
branches of the dispatch that run only on a GPU (the loss op, strict mode's torch epilogue, the
mixture, torch.compile), for each forward and backward variant, against the float64 reference.
The kernels themselves are tested in test_triton_*.py and test_nce_loss_op.py."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
import amdim_kernels as ak  # noqa: E402
from amdim_kernels import mixture, nce_loss_op, ops  # noqa: E402
from loss_checks import cuda_plan_on_cpu, make_inputs  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),   # discarded where() lanes
              pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the plan itself")]
ESTIMATORS = ("nce", "jsd", "dv")


def against_float64(fused_fn, ref_fn, src, trg, pos_idx, tol=2e-5, **kw):
    def run(fn, s, t):
        s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
        loss, reg = fn(s, t, pos_idx, **kw)
        return (loss, reg) + torch.autograd.grad(0.7 * loss + 1.3 * reg, (s, t))
    got = run(fused_fn, src, trg)
    want = run(ref_fn, src.double(), trg.double())
    for name, x, y in zip(("loss", "lgt_reg", "grad src", "grad trg"), got, want):
        assert x.dtype == (torch.float32 if name in ("loss", "lgt_reg") else src.dtype), name
        err = ((x.double() - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
        assert err <= tol, (name, err)


@pytest.mark.parametrize("fwd,bwd", [("tiled", "triton"), ("dense", "triton_cublas")])
@pytest.mark.parametrize("epilogue", ["fused", "torch"])
@pytest.mark.parametrize("strict", [False, True])
def test_losses_through_the_cuda_plan(fwd, bwd, epilogue, strict):
    """Each estimator, ragged shapes, a strided pos_idx (a column of an index matrix: the CUDA
    forward takes contiguous indices only, and strict mode passed it on as it was) and pos_idx
    omitted."""
    src, trg, pos_idx = make_inputs(9, 5, 3, 19, scale=2.0, requires_grad=False)
    strided = torch.stack([pos_idx, pos_idx.flip(0)], 1)[:, 0]
    assert not strided.is_contiguous()
    square = make_inputs(6, 6, 4, 7, scale=2.0, requires_grad=False)
    with cuda_plan_on_cpu(fwd, bwd, epilogue) as ran:
        for estimator in ESTIMATORS:
            kw = dict(estimator=estimator, tclip=5.0, reg_weight=0.2, strict=strict)
            against_float64(ak.fused_nce_loss, ak.nce_loss_reference, src, trg, strided, **kw)
        against_float64(ak.fused_nce_loss, ak.nce_loss_reference, square[0], square[1], None,
                        strict=strict)
    loss_op = not strict and epilogue == "fused"
    assert ran.count("nce_loss" if loss_op else "nce_fwd") == 4, ran
    assert ran.count("nce_loss_bwd" if loss_op else "nce_bwd") == 4, ran


@pytest.mark.parametrize("strict", [False, True])
def test_mixture_through_the_cuda_plan(strict):
    src_mix, trg, pos_idx = make_inputs(7, 5, 3, 10, k=3, scale=2.0, requires_grad=False)
    with cuda_plan_on_cpu("tiled", "triton") as ran:
        for detach_q in (True, False):
            against_float64(ak.fused_mixture_nce_loss, ak.mixture_nce_loss_reference, src_mix, trg,
                            torch.stack([pos_idx, pos_idx], 1)[:, 1], tau=1.5, alpha=0.3,
                            detach_q=detach_q,
                            strict=strict)
    assert ran.count("mixture_fwd") == ran.count("mixture_bwd") == 2 and "nce_fwd" in ran, ran


def test_bf16_through_the_cuda_plan():
    src, trg, pos_idx = make_inputs(9, 5, 3, 19, torch.bfloat16, scale=2.0, requires_grad=False)
    with cuda_plan_on_cpu("tiled", "triton_cublas") as ran:
        against_float64(ak.fused_nce_loss, ak.nce_loss_reference, src, trg, pos_idx, tol=2e-2,
                        strict=False)
    assert ran == ["nce_loss", "nce_loss_bwd"], ran


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile_through_the_cuda_plan(mode):
    src, trg, pos_idx = make_inputs(9, 5, 3, 19, scale=2.0)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, mode=mode)
    def objective(s, t, p):
        loss, reg = ak.fused_nce_loss(s, t, p, estimator="dv")
        return loss + reg

    with cuda_plan_on_cpu() as ran:
        out = objective(src, trg, pos_idx)
        got = torch.autograd.grad(out, (src, trg))
    s, t = src.detach().double().requires_grad_(), trg.detach().double().requires_grad_()
    want = sum(ak.nce_loss_reference(s, t, pos_idx, estimator="dv"))
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-6)
    for x, y in zip(got, torch.autograd.grad(want, (s, t))):
        torch.testing.assert_close(x.double(), y, rtol=2e-5, atol=2e-6)
    assert ran == ["nce_loss", "nce_loss_bwd"], ran


def test_opcheck_of_the_cuda_kernels():
    """torch.library.opcheck of every op with its CUDA kernel (schema, fake kernel, autograd
    registration, AOT dispatch), the kernels restored afterwards."""
    src, trg, pos_idx = make_inputs(9, 7, 5, 11, requires_grad=False)
    with cuda_plan_on_cpu("dense", "triton") as ran:   # the other variants' forward and backward
        torch.library.opcheck(nce_loss_op.nce_loss, (src, trg, pos_idx, 5.0, 0.1, "nce", True))
        torch.library.opcheck(ops.nce_fwd, (src, trg, pos_idx, None, "softplus_sum"))
    with cuda_plan_on_cpu("tiled", "triton_cublas") as ran:
        for estimator in ESTIMATORS:
            torch.library.opcheck(nce_loss_op.nce_loss, (src, trg, pos_idx, 20.0, 0.05, estimator,
                                                         True))
        loss, reg, pos, neg_stat, bad = nce_loss_op.nce_loss(src, trg, pos_idx, None, 0.0, "jsd", True)
        torch.library.opcheck(nce_loss_op.nce_loss_bwd, (torch.tensor(0.7), torch.tensor(1.3), src,
                                                         trg, pos_idx, pos, neg_stat, bad, None, 0.0,
                                                         "jsd"))
        torch.library.opcheck(ops.nce_fwd, (src, trg, pos_idx, 20.0, "logsumexp"))
        pos, neg_stat, _ = ops.nce_fwd(src, trg, pos_idx, 20.0, "logsumexp")
        torch.library.opcheck(ops.nce_bwd, (torch.randn_like(pos), torch.rand_like(neg_stat),
                                            torch.tensor(0.3), src, trg, pos_idx, neg_stat, 20.0,
                                            "logsumexp"))
        pos3, neg3 = pos[:9].reshape(3, 3, 5), neg_stat[:9].reshape(3, 3)
        torch.library.opcheck(mixture.mixture_fwd, (pos3.requires_grad_(), neg3.requires_grad_(),
                                                    1.5, 0.2, False))
        torch.library.opcheck(mixture.mixture_bwd, (torch.tensor(0.7), pos3.detach(),
                                                    neg3.detach(), 1.5, 0.2, False))
    assert {"nce_loss", "nce_loss_bwd", "nce_fwd", "nce_bwd", "mixture_fwd", "mixture_bwd"} <= set(ran)
    with cuda_plan_on_cpu() as ran:
        pass
    ops.nce_fwd(src, trg, pos_idx, 20.0, "logsumexp")   # the C++ kernel again
    assert ran == []
