"""Bad input raises ValueError/TypeError naming the argument, on every entry point."""
import math

import pytest
import torch

import amdim_kernels as ak
from amdim_kernels import compat
from loss_checks import expect_fused, make_inputs

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


# ------------------------------------------------------------------------------ pos_idx dtypes

INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
              torch.uint32, torch.uint64]


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_every_integer_dtype_of_pos_idx_is_accepted(dtype, strict):
    """The same loss as with int64 (the values fit every dtype); the fused path runs the kernel."""
    src, trg, pos_idx = make_inputs(6, 5, 3, 4, torch.float64, requires_grad=False)
    mix = make_inputs(6, 5, 3, 4, torch.float64, k=2, requires_grad=False)[0]
    for fn, x in ((ak.fused_nce_loss, src), (ak.nce_loss_reference, src),
                  (ak.fused_mixture_nce_loss, mix), (ak.mixture_nce_loss_reference, mix)):
        want = fn(x, trg, pos_idx, strict=strict)
        torch.testing.assert_close(fn(x, trg, pos_idx.to(dtype), strict=strict), want, rtol=0, atol=0)
    with expect_fused(calls=1):
        ak.fused_nce_loss(src, trg, pos_idx.to(dtype), strict=strict)


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64], ids=str)
def test_unsigned_pos_idx_out_of_range(fn, dtype):
    src, trg = ok()
    bad = torch.tensor([0, 1, 2, 200], dtype=dtype)            # B = 4
    with pytest.raises(ValueError, match=r"pos_idx values must lie in \[0, B\) = \[0, 4\), got values in \[0, 200\]"):
        fn(src, trg, bad)
    assert all(torch.isnan(x) for x in fn(src, trg, bad, strict=False))


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_uint64_pos_idx_beyond_int64(fn):
    src, trg = ok()
    huge = torch.tensor([0, 1, 2, 2 ** 64 - 1], dtype=torch.uint64)   # -1 once read as int64
    with pytest.raises(ValueError, match=r"pos_idx values must lie in \[0, B\) = \[0, 4\), got uint64 values of 2\*\*63"):
        fn(src, trg, huge)
    assert all(torch.isnan(x) for x in fn(src, trg, huge, strict=False))


@pytest.mark.parametrize("fn", ENTRY_POINTS + [ak.fused_mixture_nce_loss], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.bool, torch.float16, torch.complex64], ids=str)
def test_non_integer_pos_idx_is_refused(fn, dtype):
    src, trg = ok()
    if fn is ak.fused_mixture_nce_loss:
        src = src[:, None]
    with pytest.raises(TypeError, match=rf"pos_idx must be an integer tensor .*got {dtype}"):
        fn(src, trg, torch.tensor([0, 1, 0, 1]).to(dtype))


# ----------------------------------------------------------------- layouts other than strided

def nested(x):
    return torch.nested.as_nested_tensor(list(x.unbind(0)), layout=torch.jagged)


def nested_strided(x):
    return torch.nested.nested_tensor(list(x.unbind(0)))


# how to turn a dense tensor of each rank into each other layout
LAYOUTS = {"sparse_coo": (lambda x: x.to_sparse(), (1, 2, 3)),
           "sparse_csr": (lambda x: x.to_sparse_csr(), (2, 3)),
           "mkldnn": (lambda x: x.to_mkldnn(), (2, 3)),                # floating tensors only
           "nested_jagged": (nested, (2, 3)),
           "nested_strided": (nested_strided, (2, 3))}


def layout_calls():
    """(entry point, argument, call(args), args): every tensor argument of every public entry."""
    src, trg, pos_idx = make_inputs(4, 4, 3, 5, requires_grad=False)
    mix = make_inputs(4, 4, 3, 5, k=2, requires_grad=False)[0]
    r_trg, mask = trg.reshape(12, 5).t().contiguous(), torch.eye(4)
    nce = dict(src=src, trg=trg, pos_idx=pos_idx)
    mixture = dict(src_mix=mix, trg=trg, pos_idx=pos_idx)
    return [
        ("fused_nce_loss", lambda a: ak.fused_nce_loss(a["src"], a["trg"], a["pos_idx"]), nce),
        ("nce_loss_reference", lambda a: ak.nce_loss_reference(a["src"], a["trg"], a["pos_idx"]), nce),
        ("NCELoss", lambda a: ak.NCELoss()(a["src"], a["trg"], a["pos_idx"]), nce),
        ("fused_mixture_nce_loss", lambda a: ak.fused_mixture_nce_loss(a["src_mix"], a["trg"], a["pos_idx"]), mixture),
        ("mixture_nce_loss_reference", lambda a: ak.mixture_nce_loss_reference(a["src_mix"], a["trg"], a["pos_idx"]), mixture),
        ("MixtureNCELoss", lambda a: ak.MixtureNCELoss()(a["src_mix"], a["trg"], a["pos_idx"]), mixture),
        ("g2l_loss", lambda a: compat.g2l_loss(a["r_src"], a["r_trg"], a["mask_mat"]),
         dict(r_src=src, r_trg=r_trg, mask_mat=mask)),
    ]


LAYOUT_CASES = [(entry, call, args, name, layout)
                for entry, call, args in layout_calls() for name in args
                for layout, (_, ranks) in LAYOUTS.items()
                if args[name].dim() in ranks and (layout != "mkldnn" or args[name].is_floating_point())]


@pytest.mark.filterwarnings("ignore:.*(Sparse CSR|nested tensors).*:UserWarning")
@pytest.mark.parametrize("entry,call,args,name,layout", LAYOUT_CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[4]}" for c in LAYOUT_CASES])
def test_non_strided_layouts_are_refused_by_name(entry, call, args, name, layout):
    call(args)   # the dense call is valid
    convert = LAYOUTS[layout][0]
    with pytest.raises(TypeError, match=rf"^{name} must be a dense \(strided\) tensor, got "):
        call(dict(args, **{name: convert(args[name])}))


# ---- pos_idx=None: arange(N), cached -----------------------------------------------------------
class TopLevelOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fresh_arange_cache(monkeypatch):
    from amdim_kernels import _validate
    monkeypatch.setattr(_validate, "_ARANGE", {})
    return _validate


def test_omitted_pos_idx_is_made_once(fresh_arange_cache):
    """After the first call with pos_idx=None the loss launches no arange (on a GPU: one launch
    and ~5 us of host time fewer per call); the cached value is arange(N) itself."""
    src, trg, _ = make_inputs(7, 7, 3, 5, requires_grad=False)
    with expect_fused(calls=2):
        first = ak.fused_nce_loss(src, trg)
        with TopLevelOps() as seen:
            again = ak.fused_nce_loss(src, trg)
    assert "arange" not in seen.ops, seen.ops
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(again, ak.nce_loss_reference(src, trg, torch.arange(7)))
    (cached,) = fresh_arange_cache._ARANGE.values()
    assert torch.equal(cached, torch.arange(7)) and not cached.requires_grad


def test_cached_pos_idx_is_made_outside_inference_mode(fresh_arange_cache):
    """A tensor made in inference mode cannot be saved for backward: the cache makes a normal one."""
    src, trg, _ = make_inputs(6, 6, 3, 5)
    with torch.inference_mode():
        ak.fused_nce_loss(src.detach(), trg.detach())
    with expect_fused():
        loss, reg = ak.fused_nce_loss(src, trg)
    got = torch.autograd.grad(loss + reg, (src, trg))
    want = torch.autograd.grad(sum(ak.nce_loss_reference(src, trg)), (src, trg))
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


def test_no_cached_pos_idx_under_fake_tensors_or_compile(fresh_arange_cache):
    """Under FakeTensorMode a cached tensor would be fake in later real calls; under torch.compile
    the arange belongs to the graph. Neither fills the cache."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = fresh_arange_cache.default_pos_idx(5, torch.device("cpu"))
    real = fresh_arange_cache.default_pos_idx(5, torch.device("cpu"))
    assert type(fake) is not torch.Tensor and type(real) is torch.Tensor
    assert torch.equal(real, torch.arange(5))
    torch._dynamo.reset()
    compiled = torch.compile(lambda n: fresh_arange_cache.default_pos_idx(n, torch.device("cpu")),
                             fullgraph=True)
    assert torch.equal(compiled(9), torch.arange(9))
    assert [key[0] for key in fresh_arange_cache._ARANGE] == [5]


def test_the_cache_stops_at_its_budget(fresh_arange_cache, monkeypatch):
    """Never freed (a captured CUDA graph may read a cached tensor), so bounded: beyond the budget
    calls make their own."""
    monkeypatch.setattr(fresh_arange_cache, "ARANGE_BUDGET", 10)
    cpu = torch.device("cpu")
    for n in (4, 5, 3, 4):
        assert torch.equal(fresh_arange_cache.default_pos_idx(n, cpu), torch.arange(n))
    assert sorted(key[0] for key in fresh_arange_cache._ARANGE) == [4, 5]
    assert fresh_arange_cache.default_pos_idx(4, cpu) is fresh_arange_cache._ARANGE[(4, cpu, None)]
