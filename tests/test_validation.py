"""Bad input raises ValueError/TypeError naming the argument, on every entry point."""
import math

import pytest
import torch

import amdim_kernels as ak
from loss_checks import make_inputs

ENTRY_POINTS = [ak.fused_nce_loss, ak.nce_loss_reference]


def ok():
    return make_inputs(4, 4, 3, 5, requires_grad=False)[:2]


CASES = [
    # (description, kwargs builder, exception, words that must appear in the message)
    ("src rank", lambda: dict(src=torch.randn(4, 5, 1), trg=ok()[1]), ValueError, ["src", "(N, D)"]),
    ("trg rank", lambda: dict(src=ok()[0], trg=torch.randn(12, 5)), ValueError, ["trg", "(B, L, D)"]),
    ("D mismatch", lambda: dict(src=torch.randn(4, 6), trg=ok()[1]), ValueError, ["src", "trg", "D"]),
    ("src not a tensor", lambda: dict(src=[[1.0]], trg=ok()[1]), TypeError, ["src"]),
    ("integer src", lambda: dict(src=torch.ones(4, 5, dtype=torch.long), trg=ok()[1]), TypeError, ["src", "floating"]),
    ("mixed dtypes", lambda: dict(src=ok()[0].double(), trg=ok()[1]), TypeError, ["src", "trg", "dtype"]),
    ("N != B without pos_idx", lambda: dict(src=torch.randn(5, 5), trg=ok()[1]), ValueError, ["pos_idx", "N == B"]),
    ("pos_idx out of range", lambda: dict(src=ok()[0], trg=ok()[1], pos_idx=torch.tensor([0, 1, 2, 4])), ValueError, ["pos_idx", "[0, 4)"]),
    ("negative pos_idx", lambda: dict(src=ok()[0], trg=ok()[1], pos_idx=torch.tensor([0, -1, 2, 3])), ValueError, ["pos_idx"]),
    ("pos_idx wrong length", lambda: dict(src=ok()[0], trg=ok()[1], pos_idx=torch.tensor([0, 1, 2])), ValueError, ["pos_idx", "(N,)"]),
    ("pos_idx float", lambda: dict(src=ok()[0], trg=ok()[1], pos_idx=torch.zeros(4)), TypeError, ["pos_idx", "integer"]),
    ("pos_idx list", lambda: dict(src=ok()[0], trg=ok()[1], pos_idx=[0, 1, 2, 3]), TypeError, ["pos_idx"]),
    ("device mismatch", lambda: dict(src=ok()[0], trg=ok()[1].to("meta")), ValueError, ["device"]),
    ("NaN in src", lambda: dict(src=ok()[0].index_fill(0, torch.tensor([2]), math.nan), trg=ok()[1]), ValueError, ["src", "NaN"]),
    ("Inf in trg", lambda: dict(src=ok()[0], trg=ok()[1].index_fill(1, torch.tensor([1]), math.inf)), ValueError, ["trg", "NaN or Inf"]),
    ("overflowing scores", lambda: dict(src=ok()[0] * 1e30, trg=ok()[1] * 1e30), ValueError, ["overflow"]),
    ("tclip <= 0", lambda: dict(src=ok()[0], trg=ok()[1], tclip=0.0), ValueError, ["tclip"]),
    ("tclip string", lambda: dict(src=ok()[0], trg=ok()[1], tclip="20"), TypeError, ["tclip"]),
    ("negative reg_weight", lambda: dict(src=ok()[0], trg=ok()[1], reg_weight=-1.0), ValueError, ["reg_weight"]),
    ("empty", lambda: dict(src=torch.randn(0, 5), trg=torch.randn(0, 3, 5)), ValueError, ["non-empty"]),
]


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("desc,build,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(fn, desc, build, exc, words):
    kw = build()
    src, trg = kw.pop("src"), kw.pop("trg")
    pos_idx = kw.pop("pos_idx", None)
    with pytest.raises(exc) as info:
        fn(src, trg, pos_idx, **kw)
    for word in words:
        assert word in str(info.value), f"{desc}: {word!r} not in {info.value}"


def test_unknown_backend():
    src, trg = ok()
    with pytest.raises(ValueError, match="backend"):
        ak.fused_nce_loss(src, trg, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU path")
def test_cpp_backend_rejects_non_cpu_tensors():
    src, trg = ok()
    with pytest.raises(ValueError, match="cpp"):
        ak.fused_nce_loss(src.to("meta"), trg.to("meta"), backend="cpp")


def test_triton_backend_needs_cuda_tensors():
    src, trg = ok()
    with pytest.raises(ValueError, match="triton.*cuda"):
        ak.fused_nce_loss(src, trg, backend="triton")
