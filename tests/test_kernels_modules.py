"""The nn.Module wrappers and the typed public API. A module is compared with its function on
purpose (it must be that function, to the bit); the functions are compared with the reference
elsewhere, and the dispatch record shows the module runs the backend it was given."""
import os

import pytest
import torch

import amdim_kernels as ak
from amdim_kernels.nce import Dispatch, record_dispatch
from loss_checks import assert_matches, expect_fused, loss_and_grads, make_inputs


@pytest.mark.parametrize("kw,ran", [(dict(), Dispatch("nce", "cpp")),
                                    (dict(tclip=None, reg_weight=0.0, estimator="jsd"), Dispatch("jsd", "cpp")),
                                    (dict(tclip=5.0, estimator="dv", backend="reference"), Dispatch("dv", "reference"))])
def test_nce_module_is_the_function(kw, ran):
    src, trg, pos_idx = make_inputs(9, 6, 4, 7, torch.float64)
    module = ak.NCELoss(**kw)
    with record_dispatch() as record:
        out = loss_and_grads(module, src, trg, pos_idx)
    assert record == [ran]
    assert_matches(out, loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx, **kw), rtol=0, atol=0)
    src_sq = src.detach()[:6].requires_grad_()
    assert_matches(loss_and_grads(module, src_sq, trg, None),      # pos_idx defaults to i
                   loss_and_grads(ak.fused_nce_loss, src_sq, trg, None, **kw), rtol=0, atol=0)


def test_mixture_module_is_the_function():
    src_mix, trg, pos_idx = make_inputs(8, 5, 3, 6, torch.float64, k=3)
    kw = dict(tau=2.0, alpha=0.3, detach_q=False, tclip=10.0, reg_weight=0.1)
    with expect_fused(calls=1):
        out = loss_and_grads(ak.MixtureNCELoss(**kw), src_mix, trg, pos_idx)
    assert_matches(out,
                   loss_and_grads(ak.fused_mixture_nce_loss, src_mix, trg, pos_idx, **kw), rtol=0, atol=0)


def test_repr_shows_the_options():
    assert repr(ak.NCELoss(tclip=10.0, estimator="jsd")) == (
        "NCELoss(tclip=10.0, reg_weight=0.05, estimator='jsd', backend='auto', strict=None)")
    assert repr(ak.MixtureNCELoss(tau=2.0, strict=False)) == (
        "MixtureNCELoss(tau=2.0, alpha=1/tau, detach_q=True, tclip=20.0, reg_weight=0.05, "
        "backend='auto', strict=False)")


@pytest.mark.parametrize("build,exc,word", [
    (lambda: ak.NCELoss(tclip=-1.0), ValueError, "tclip"),
    (lambda: ak.NCELoss(reg_weight="0.1"), TypeError, "reg_weight"),
    (lambda: ak.NCELoss(estimator="infonce"), ValueError, "estimator"),
    (lambda: ak.NCELoss(backend="cuda"), ValueError, "backend"),
    (lambda: ak.NCELoss(strict="yes"), TypeError, "strict"),
    (lambda: ak.MixtureNCELoss(tau=0.0), ValueError, "tau"),
    (lambda: ak.MixtureNCELoss(alpha=-1.0), ValueError, "alpha"),
    (lambda: ak.MixtureNCELoss(detach_q=None), TypeError, "detach_q"),
    (lambda: ak.MixtureNCELoss(backend="gpu"), ValueError, "backend"),
])
def test_bad_options_fail_at_construction(build, exc, word):
    with pytest.raises(exc, match=word):
        build()


def test_module_in_a_model_compiles():
    src, trg, pos_idx = make_inputs(7, 6, 3, 5)
    loss_fn = ak.NCELoss(tclip=10.0)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    with expect_fused():
        out = compiled(src, trg, pos_idx)
    torch.testing.assert_close(out, ak.nce_loss_reference(src, trg, pos_idx, tclip=10.0))


def test_public_api_is_typed_and_exported():
    import typing
    for name in ("NCELoss", "MixtureNCELoss", "fused_nce_loss", "nce_loss_reference",
                 "fused_mixture_nce_loss", "mixture_nce_loss_reference", "compat"):
        assert name in ak.__all__ and hasattr(ak, name)
    for fn in (ak.fused_nce_loss, ak.nce_loss_reference, ak.fused_mixture_nce_loss,
               ak.mixture_nce_loss_reference, ak.compat.g2l_loss, ak.NCELoss.forward,
               ak.MixtureNCELoss.forward):
        hints = typing.get_type_hints(fn)
        assert "return" in hints and all(p in hints for p in fn.__code__.co_varnames[:fn.__code__.co_argcount]
                                         if p != "self"), fn.__name__
    assert os.path.isfile(os.path.join(os.path.dirname(ak.__file__), "py.typed"))
