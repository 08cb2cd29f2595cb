"""The shared elementwise math of the Triton kernels (amdim_kernels/_triton_common.py), under the
interpreter (or on the GPU where there is one), against float64 torch."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from amdim_kernels import _triton_common as tc  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # discarded where() lanes


@triton.jit
def _eval_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    t, dt = tc._tanh_dtanh(x)
    for k, v in enumerate((tc._tanh(x), t, dt, tc._tanh_rational(x), tc._softplus(x), tc._sigmoid(x))):
        tl.store(out_ptr + k * n + offs, v, mask=ok)


def evaluate(x: torch.Tensor) -> dict:
    n = x.numel()
    out = torch.empty((6, n), dtype=torch.float32, device=DEVICE)
    _eval_kernel[(triton.cdiv(n, 1024),)](x.to(DEVICE), out, n, BLOCK=1024)
    names = ("tanh", "tanh_of_pair", "dtanh", "tanh_rational", "softplus", "sigmoid")
    return dict(zip(names, out.cpu().double()))


@pytest.fixture(scope="module")
def values():
    # both sides of every branch: the polynomial / exp switch at 0.625, the rational's clamp at
    # 7.9 and its x-itself range below 4e-4, saturation up to |x| = 40 (1 - tanh^2 ~ 1e-34)
    x = torch.cat([torch.linspace(-40, 40, 4001), torch.linspace(-1, 1, 2001),
                   torch.tensor([0.0, 1e-30, -3e-4, 5e-4, 0.6249, 0.625, 0.6251, 7.9, 7.91, 20.0])])
    return x, evaluate(x.float())


def ulps(got, want):
    return ((got - want).abs() / torch.finfo(torch.float32).eps / want.abs().clamp_min(1e-30)).max().item()


def test_tanh(values):
    x, v = values
    want = torch.tanh(x.double())
    assert ulps(v["tanh"], want) < 4
    assert ulps(v["tanh_of_pair"], want) < 4   # (1 - e) * (1 / (1 + e)): one more rounding


def test_rational_tanh(values):
    x, v = values
    assert ulps(v["tanh_rational"], torch.tanh(x.double())) < 8


def test_dtanh_is_accurate_when_saturated(values):
    x, v = values
    xd = x.double()
    want = 4 * torch.exp(-2 * xd.abs()) / (1 + torch.exp(-2 * xd.abs())) ** 2   # 1 - tanh^2
    normal = want > torch.finfo(torch.float32).tiny                              # |x| < ~43
    assert normal.all()
    assert ulps(v["dtanh"], want) < 8
    assert v["dtanh"][x.abs() > 30].max() < 1e-25   # where 1 - t^2 of a float t is ~1e-7 or 0


def test_softplus_and_sigmoid(values):
    x, v = values
    xd = x.double()
    assert ulps(v["softplus"], torch.nn.functional.softplus(xd, threshold=1e9)) < 4
    assert ulps(v["sigmoid"], torch.sigmoid(xd)) < 4


# ---- the fp32 dot precision follows torch's, whichever API set it ------------------------------
@pytest.fixture
def matmul_precision():
    """Restore torch's fp32 matmul precision, legacy and per-backend settings alike."""
    saved = (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    yield
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


@pytest.mark.parametrize("setting,expected", [
    (lambda: torch.set_float32_matmul_precision("highest"), "ieee"),
    (lambda: torch.set_float32_matmul_precision("high"), "tf32x3"),
    (lambda: torch.set_float32_matmul_precision("medium"), "tf32x3"),
    # the per-backend API (torch >= 2.9): after it, torch.get_float32_matmul_precision() raises
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), "tf32x3"),
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"), "ieee"),
    (lambda: setattr(torch.backends, "fp32_precision", "tf32"), "tf32x3"),
])
def test_input_precision_follows_every_precision_api(setting, expected, matmul_precision):
    setting()
    assert tc.input_precision(torch.float32) == expected
    assert tc.input_precision(torch.bfloat16) == tc.input_precision(torch.float16) == "ieee"


def test_fp32_kernels_run_under_the_per_backend_precision_api(matmul_precision):
    """Every fp32 launch reads the precision: a forward and a backward under the new API."""
    from amdim_kernels.triton_nce_bwd import nce_bwd_triton
    from amdim_kernels.triton_nce_fwd import nce_fwd_triton
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    g = torch.Generator().manual_seed(0)
    src, trg = torch.randn(5, 8, generator=g).to(DEVICE), torch.randn(3, 2, 8, generator=g).to(DEVICE)
    pos_idx = torch.tensor([0, 1, 2, 0, 1], device=DEVICE)
    pos, neg_stat, sumsq = nce_fwd_triton(src, trg, pos_idx, 20.0, "logsumexp")
    grads = nce_bwd_triton(torch.ones_like(pos), torch.ones_like(neg_stat), torch.ones_like(sumsq),
                           src, trg, pos_idx, neg_stat, 20.0, "logsumexp")
    assert all(torch.isfinite(x).all() for x in (pos, neg_stat, sumsq, *grads))
