"""The CUDA nce_bwd (csrc/cuda): compile checks and a host run of the kernel math where nvcc is
present, and accuracy / memory checks against float64 autograd on a GPU."""
import ctypes
import math
import pathlib
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from amdim_kernels.reference import raw_scores, soft_clip

CUDA_DIR = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
# The flags the extension loader (amdim_kernels/_extension.py) builds the .cu files with.
NVCC_FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "--use_fast_math"]
ARCHS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
REDUCTIONS = ("logsumexp", "softplus_sum")


def run_nvcc(args):
    proc = subprocess.run([NVCC, *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


# ---- compile checks (no GPU needed) -------------------------------------------------------------
@needs_nvcc
def test_kernel_compiles_for_sm80_sm90_without_spills(tmp_path):
    report = run_nvcc([*NVCC_FLAGS, *ARCHS, "-Xptxas", "-v", "-c", str(CUDA_DIR / "nce_bwd.cu"),
                       "-o", str(tmp_path / "nce_bwd.o")])
    regs = re.findall(r"Used (\d+) registers", report)
    assert len(regs) == 6, f"expected 3 kernels x 2 archs in the ptxas report:\n{report}"
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                        report)
    assert frames and all(f == ("0", "0", "0") for f in frames), report


@needs_nvcc
def test_fast_math_keeps_accurate_tanh(tmp_path):
    # tanh.approx (what tanhf becomes under --use_fast_math) is 2^-11 relative: 1% in exp(s - lse).
    ptx = tmp_path / "nce_bwd.ptx"
    run_nvcc([*NVCC_FLAGS, "-arch=sm_90", "-ptx", str(CUDA_DIR / "nce_bwd.cu"), "-o", str(ptx)])
    assert "tanh.approx" not in ptx.read_text()


# ---- the kernel's per-element code, run on the host ---------------------------------------------
SHIM = r"""
#include "nce_bwd.cuh"
using namespace amdim_kernels;
template <typename T> static void run(const NceBwdTile& t, void* g) {
  for (int64_t v = 0; v * kVec < t.rows * t.cols; ++v)
    nce_bwd_tile_vec(t, static_cast<T*>(g), static_cast<uint32_t>(v));
}
extern "C" void nce_bwd_tile_host(const float* dots, int64_t rows, int64_t cols, int64_t row0,
    int64_t col0, int64_t L, const int64_t* pos_idx, const float* grad_pos,
    const float* grad_neg_stat, const float* neg_stat, const float* grad_sumsq, float inv_sqrt_d,
    float tclip, int reduction, float g_scale, int storage, void* g) {
  const NceBwdTile t{dots, rows, cols, row0, col0, L, pos_idx, grad_pos, grad_neg_stat, neg_stat,
                     grad_sumsq, inv_sqrt_d, tclip, static_cast<NegReduction>(reduction), g_scale};
  if (storage == 0) run<float>(t, g);
  else if (storage == 1) run<__half>(t, g);
  else run<__nv_bfloat16>(t, g);
}
"""
STORAGE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def host_tile(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    tmp = tmp_path_factory.mktemp("shim")
    (tmp / "shim.cu").write_text(SHIM)
    run_nvcc(["-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", f"-I{CUDA_DIR}",
              str(tmp / "shim.cu"), "-o", str(tmp / "shim.so")])
    fn = ctypes.CDLL(str(tmp / "shim.so")).nce_bwd_tile_host
    fn.restype = None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, f32, f32, ctypes.c_int,
                   f32, ctypes.c_int, ptr]
    return fn


def problem(n, b, l, d, seed, pos_idx=None):
    """float64 inputs and upstream gradients of the magnitude a mean over N*L terms gives."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    trg = torch.randn(b, l, d, generator=g, dtype=torch.float64) * 2
    if pos_idx is None:
        pos_idx = torch.randint(0, b, (n,), generator=g)
    grads = (torch.randn(n, l, generator=g, dtype=torch.float64) / (n * l),
             torch.rand(n, generator=g, dtype=torch.float64) / n,
             torch.randn((), generator=g, dtype=torch.float64) * 1e-3)
    return src, trg, pos_idx, grads


def statistics(a, pos_idx, tclip, neg_reduction):
    """(pos, neg_stat, sumsq) of raw scores a (N, B, L), straight from docs/design.md."""
    s = soft_clip(a, tclip)
    n, b = a.shape[:2]
    pos = s[torch.arange(n, device=a.device), pos_idx]
    is_pos = F.one_hot(pos_idx, b).bool()[:, :, None]
    if neg_reduction == "softplus_sum":
        neg_stat = F.softplus(s).masked_fill(is_pos, 0).reshape(n, -1).sum(1)
    elif b == 1:   # no negatives: -inf, a constant (logsumexp's gradient would be NaN)
        neg_stat = torch.full((n,), -math.inf, dtype=s.dtype, device=a.device)
    else:
        neg_stat = s.masked_fill(is_pos, -math.inf).reshape(n, -1).logsumexp(1)
    return pos, neg_stat, a.square().sum()


def weighted(stats, grads):
    return sum((st * gr.to(st)).sum() for st, gr in zip(stats, grads))


CASES = [  # (N, B, L, D, pos_idx, tile rows, cols, row0, col0): ragged tiles, vectors across rows
    (7, 5, 3, 16, None, 3, 7, 2, 5),          # 21 elements: a 1-element tail
    (6, 4, 5, 9, [1, 1, 3, 0, 3, 1], 6, 20, 0, 0),   # the whole matrix, repeated pos_idx
    (3, 1, 4, 8, [0, 0, 0], 3, 4, 0, 0),      # B == 1: every column a positive, neg_stat = -inf
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("neg_reduction", REDUCTIONS)
@pytest.mark.parametrize("tclip", [20.0, 2.0, None])
@pytest.mark.parametrize("storage", [torch.float32, torch.float16, torch.bfloat16])
def test_tile_math_on_host(host_tile, case, neg_reduction, tclip, storage):
    n, b, l, d, pos_idx, rows, cols, row0, col0 = case
    pos_idx = None if pos_idx is None else torch.tensor(pos_idx)
    src, trg, pos_idx, grads = problem(n, b, l, d, seed=rows * cols, pos_idx=pos_idx)
    a = raw_scores(src, trg).requires_grad_()
    stats = statistics(a, pos_idx, tclip, neg_reduction)
    g_a = torch.autograd.grad(weighted(stats, grads), a)[0].reshape(n, -1)
    g_scale = 8.0 / math.sqrt(d)        # 1/sqrt(D) times a power of two, as for fp16
    want = (g_a * g_scale)[row0:row0 + rows, col0:col0 + cols]

    dots = (src @ trg.reshape(-1, d).T)[row0:row0 + rows, col0:col0 + cols].float().contiguous()
    gp, gn, gs = (x.float().contiguous() for x in grads)
    neg_stat = stats[1].detach().float()
    out = dots if storage == torch.float32 else torch.empty(rows, cols, dtype=storage)  # in place
    host_tile(dots.data_ptr(), rows, cols, row0, col0, l, pos_idx.data_ptr(), gp.data_ptr(),
              gn.data_ptr(), neg_stat.data_ptr(), gs.reshape(1).data_ptr(), 1 / math.sqrt(d),
              tclip or 0.0, REDUCTIONS.index(neg_reduction), g_scale, STORAGE[storage],
              out.data_ptr())
    assert torch.isfinite(out).all()
    rtol = {torch.float32: 2e-6, torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8}[storage]
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=1e-6 * want.abs().max().item())
