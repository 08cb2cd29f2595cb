"""What the CUDA code path decides before and around its kernels, checked without a GPU: dtype
checks at the dispatch point, which kernel backs each op on CUDA (the CUDA dispatch key is called
with CPU tensors, which the Triton kernels accept under the interpreter), the build probe and its
fallback."""
from __future__ import annotations

import pytest
import torch

import amdim_kernels as ak
from amdim_kernels import nce, ops


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
