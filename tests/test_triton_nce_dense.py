"""The dense forward of nce_fwd (amdim_kernels/triton_nce_dense.py): cuBLAS scores (a CPU matmul
with fp32 accumulation here) and one Triton reduction kernel (under the interpreter here), against
the statistics computed from the scores in float64."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

pytest.importorskip("triton")
from amdim_kernels import triton_nce_dense as tnd  # noqa: E402
from amdim_kernels.reference import raw_scores  # noqa: E402
from sm90_compile import run_compile_script  # noqa: E402
from test_triton_nce_fwd import SMALL_CASES, make_inputs, stats_from_scores  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # discarded where() lanes


@pytest.fixture(autouse=True)
def exact_fp32():
    saved = (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    yield
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


# the forward's ragged cases, and M > BLOCK_C with tclip 100 (the running-max logsumexp)
CASES = SMALL_CASES + [(9, 13, 49, 33, 100.0, "logsumexp", torch.float32),
                       (5, 13, 49, 33, 20.0, "softplus_sum", torch.bfloat16)]


@pytest.mark.parametrize("n,b,l,d,tclip,neg_reduction,dtype", CASES)
def test_matches_float64_statistics(n, b, l, d, tclip, neg_reduction, dtype):
    src, trg, pos_idx = make_inputs(n, b, l, d, dtype)
    pos, neg, sumsq = tnd.nce_fwd_dense(src, trg, pos_idx, tclip, neg_reduction)
    want = stats_from_scores(raw_scores(src.double(), trg.double()), pos_idx, tclip, neg_reduction)
    assert pos.dtype == neg.dtype == sumsq.dtype == torch.float32
    assert pos.shape == (n, l) and neg.shape == (n,) and sumsq.shape == ()
    torch.testing.assert_close(pos.double(), want[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(neg.double(), want[1], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(sumsq.double(), want[2], rtol=2e-5, atol=0.0)


def test_non_finite_scores_and_overflowing_squares():
    """An infinite score makes sumsq non-finite; finite scores whose squares overflow make it
    Inf with finite pos and neg_stat (valid input: the fused epilogue tells them apart)."""
    src, trg, pos_idx = make_inputs(5, 3, 2, 4, torch.float32)
    bad = src.clone()
    bad[1, 2] = math.inf
    assert not torch.isfinite(tnd.nce_fwd_dense(bad, trg, pos_idx, 20.0, "logsumexp")[2])
    big = src.clone()
    big[1] = 3e19                          # |a| ~ 1e20: finite, its square is not
    pos, neg, sumsq = tnd.nce_fwd_dense(big, trg, pos_idx, 20.0, "logsumexp")
    assert sumsq.item() == math.inf
    assert torch.isfinite(pos).all() and torch.isfinite(neg).all()


def test_pos_idx_outside_the_range_gives_the_row_no_positives():
    src, trg, _ = make_inputs(4, 3, 5, 6, torch.float32)
    pos_idx = torch.tensor([0, 1, 2, 2**32 + 1], device=src.device)
    _, neg, _ = tnd.nce_fwd_dense(src, trg, pos_idx, 20.0, "logsumexp")
    s = 20.0 * torch.tanh(raw_scores(src.double(), trg.double())[3] / 20.0)
    torch.testing.assert_close(neg[3].double(), s.logsumexp((0, 1)), rtol=1e-5, atol=1e-5)


_COMPILE_SCRIPT = textwrap.dedent(r"""
    import json
    from sm90_compile import compile_one, jit_function
    from amdim_kernels import triton_nce_dense as tnd

    fn = jit_function(tnd._nce_dense_kernel)
    types = {a: "*i64" if a == "pos_idx_ptr" else "*fp32" if a.endswith("_ptr") else "fp32"
             if a in ("scale", "tclip", "inv_tclip") else "i32" for a in fn.arg_names}
    out = []
    for variant in (dict(CLIP=True, NEG_LSE=True, FIXED_SHIFT=False),
                    dict(CLIP=True, NEG_LSE=True, FIXED_SHIFT=True),
                    dict(CLIP=True, NEG_LSE=False, FIXED_SHIFT=False)):
        consts = dict(variant, TANH_RATIONAL=False, BLOCK_R=tnd.BLOCK_R, BLOCK_C=tnd.BLOCK_C)
        res = compile_one(fn, types, consts, [a for a in fn.arg_names if a.endswith("_ptr")], 4, 1)
        out.append(dict(variant=variant, **res))
    print("RESULT " + json.dumps(out))
""")


def test_compiles_for_sm90_without_spills(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    for r in run_compile_script(_COMPILE_SCRIPT, tmp_path, timeout=600):
        assert r["cubin"] > 0 and r["spills"] == 0, r
