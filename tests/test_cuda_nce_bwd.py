"""The CUDA C++ nce_bwd (csrc/cuda, op nce_bwd_cuda): compile checks and a host run of the kernel
math where nvcc is present, and accuracy / memory checks against float64 autograd on a GPU."""
import ctypes
import math
import os
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


def test_the_torch_binding_compiles_against_this_torchs_headers(tmp_path):
    """csrc/cuda/nce_cuda.cpp (the op, cuBLAS through ATen) is built only on a GPU machine, whose
    torch has CUDA; its C++ is checked here against this torch's headers (a CPU wheel has the
    c10/cuda headers but not the generated cuda_cmake_macros.h, which the check skips) and the
    CUDA toolkit's, so that an error there does not cost the GPU call the CUDA C++ variant."""
    from torch.utils import cpp_extension
    cuda_home = cpp_extension.CUDA_HOME or "/usr/local/cuda"
    if not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        pytest.skip(f"no CUDA toolkit headers under {cuda_home}")
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{cuda_home}/include"]
    proc = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-w", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
                           *includes, str(CUDA_DIR / "nce_cuda.cpp")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


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


# ---- the op on a GPU ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nce_bwd():
    """The CUDA C++ backward itself (op nce_bwd_cuda), not the CUDA kernel of nce_bwd: that one
    runs whichever variant is chosen, and without nvcc it is a Triton kernel, which these tests'
    expectations (its errors, its fp16 host read) do not describe. Skipped where it cannot be had."""
    from amdim_kernels import _extension, ops
    if ops._cuda_cpp_bwd() is None:
        source, why = _extension.cuda_bwd_status([torch.cuda.get_device_capability()])
        if source != "build":
            pytest.skip(f"the CUDA C++ backward (csrc/cuda) is not available here: {why}")
        _extension.load_cuda_bwd()
    return ops._cuda_cpp_bwd()


def input_grads(src, trg, pos_idx, tclip, neg_reduction, grads):
    """d <grads, (pos, neg_stat, sumsq)> / d (src, trg) by autograd of the plain composition: exact
    for float64 leaves, and the plain torch result for lower precision (fp32 scores, as
    reference.raw_scores accumulates them)."""
    src, trg = src.detach().requires_grad_(), trg.detach().requires_grad_()
    stats = statistics(raw_scores(src, trg), pos_idx, tclip, neg_reduction)
    return torch.autograd.grad(weighted(stats, grads), (src, trg))


def rel_err(x, truth):
    return ((x.double() - truth).abs().max() / truth.abs().max()).item()


GPU_SHAPES = [  # (N, B, L, D, random pos_idx?)
    (5, 5, 3, 7, False),
    (13, 6, 5, 33, True),         # repeated pos_idx
    (4, 1, 49, 8, True),          # B == 1: no negatives
    (40, 40, 49, 64, False),
    (300, 600, 49, 40, True),     # M = 29400: two column tiles in every dtype
    (70000, 3, 100, 16, True),    # N above one row tile: two row tiles, three column tiles
]
# Allowed error beyond twice that of plain torch in the same dtype (relative to max |grad|).
TOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("neg_reduction", REDUCTIONS)
@pytest.mark.parametrize("tclip", [20.0, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_float64_autograd(nce_bwd, shape, neg_reduction, tclip, dtype):
    n, b, l, d, random_pos = shape
    src64, trg64, pos_idx, grads = problem(n, b, l, d, seed=n + b,
                                           pos_idx=None if random_pos else torch.arange(n))
    dev = torch.device("cuda")
    src, trg = src64.to(dev, dtype), trg64.to(dev, dtype)
    pos_idx, grads = pos_idx.to(dev), [g.to(dev) for g in grads]
    truth = input_grads(src.double(), trg.double(), pos_idx, tclip, neg_reduction, grads)
    plain = input_grads(src, trg, pos_idx, tclip, neg_reduction, grads)
    with torch.no_grad():
        neg_stat = statistics(raw_scores(src.double(), trg.double()), pos_idx, tclip,
                              neg_reduction)[1]
    args = ([g.float() for g in grads] + [src, trg, pos_idx, neg_stat.float()]
            + [tclip, neg_reduction])
    ours = nce_bwd(*args)
    for name, o, p, t in zip(("grad_src", "grad_trg"), ours, plain, truth):
        assert o.dtype == dtype and o.shape == t.shape, name
        assert torch.isfinite(o).all(), name
        assert rel_err(o, t) <= 2 * rel_err(p, t) + TOL[dtype], \
            f"{name}: error {rel_err(o, t):.3g}, plain torch {rel_err(p, t):.3g}"
    if dtype == torch.float32:   # the CPU kernel of nce_bwd
        from amdim_kernels import ops
        cpu = ops.nce_bwd(*[x.cpu() if isinstance(x, torch.Tensor) else x for x in args])
        for name, o, c, p in zip(("grad_src", "grad_trg"), ours, cpu, plain):
            t = c.double().to(dev)   # two fp32 results, each allowed 2x plain torch + TOL
            assert rel_err(o, t) <= 2 * (2 * rel_err(p, t) + TOL[dtype]), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extra_memory_is_bounded(nce_bwd, dtype):
    n, l, d = 1024, 49, 256                  # the N x M fp32 score matrix alone would be 196 MiB
    dev = torch.device("cuda")
    src = torch.randn(n, d, device=dev).to(dtype)
    trg = torch.randn(n, l, d, device=dev).to(dtype)
    args = (torch.randn(n, l, device=dev) / (n * l), torch.rand(n, device=dev) / n,
            torch.tensor(1e-3, device=dev), src, trg, torch.arange(n, device=dev),
            torch.full((n,), 30.0, device=dev), 20.0, "logsumexp")
    nce_bwd(*args)                           # warm-up: cuBLAS workspace, allocator pools
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grad_src, grad_trg = nce_bwd(*args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - grad_src.nbytes - grad_trg.nbytes
    assert extra < 64 << 20, f"{extra / 2**20:.1f} MiB beyond the inputs and the gradients"


@pytest.mark.gpu
def test_rejects_float64_on_cuda(nce_bwd):
    n, b, l, d = 3, 2, 4, 5
    dev = torch.device("cuda")
    args = (torch.zeros(n, l, device=dev), torch.zeros(n, device=dev), torch.zeros((), device=dev),
            torch.randn(n, d, device=dev, dtype=torch.float64),
            torch.randn(b, l, d, device=dev, dtype=torch.float64),
            torch.zeros(n, dtype=torch.long, device=dev), torch.zeros(n, device=dev), None,
            "logsumexp")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        nce_bwd(*args)


def test_tile_math_on_saturated_scores(host_tile):
    """|a| / tclip in [11, 30]: g of every element relative to itself, against float64 autograd
    of a clip whose derivative has no cancellation (tests/test_saturated_scores.py)."""
    from test_saturated_scores import exact_clip_statistics, saturated_problem
    src, trg, pos_idx, grads, tclip = saturated_problem()
    src, trg = src.float().double(), trg.float().double()
    n, d = src.shape
    b, l = trg.shape[:2]
    a = raw_scores(src, trg).requires_grad_()
    stats = exact_clip_statistics(a, pos_idx, tclip)
    g_a = torch.autograd.grad(weighted(stats, grads), a)[0].reshape(n, -1)
    want = g_a / math.sqrt(d)
    dots = (src @ trg.reshape(-1, d).T).float().contiguous()
    gp, gn, gs = (x.float().contiguous() for x in grads)
    neg_stat = stats[1].detach().float()
    host_tile(dots.data_ptr(), n, b * l, 0, 0, l, pos_idx.data_ptr(), gp.data_ptr(), gn.data_ptr(),
              neg_stat.data_ptr(), gs.reshape(1).data_ptr(), 1 / math.sqrt(d), tclip, 0,
              1 / math.sqrt(d), STORAGE[torch.float32], dots.data_ptr())
    assert want.abs().max() < 1e-6 and (want != 0).all()
    rel = ((dots.double() - want).abs() / want.abs()).max().item()
    assert rel < 1e-3, rel
