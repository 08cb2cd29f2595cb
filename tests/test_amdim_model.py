"""AMDIM encoder shapes and initialisation, the two views' passes, the multiscale objective against a
hand-written composition of the reference loss, and the online classifiers' loss."""

import pytest
import torch

from amdim.amdim_model import AMDIM, Encoder
from amdim.amdim_objective import MultiscaleNCE, mixture_fn, nce_fn, parse_costs
from amdim_kernels.reference import mixture_nce_loss_reference, nce_loss_reference


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("use_bn", [False, True])
def test_encoder_feature_shapes(size, use_bn):
    enc = Encoder(size, ndf=4, n_rkhs=24, n_depth=2, use_bn=use_bn)
    r1, r5, r7 = enc(torch.randn(3, 3, size, size))
    assert r1.shape == (3, 24, 1, 1)
    assert r5.shape == (3, 24, 5, 5)
    assert r7.shape == (3, 24, 7, 7)
    assert all(torch.isfinite(r).all() for r in (r1, r5, r7))


def test_encoder_rejects_bad_config_and_input():
    with pytest.raises(ValueError, match="image_size"):
        Encoder(48)
    with pytest.raises(ValueError, match="ndf"):
        Encoder(32, ndf=0)
    with pytest.raises(ValueError, match=r"\(B, C, 32, 32\)"):
        Encoder(32, ndf=4, n_rkhs=8, n_depth=1)(torch.randn(2, 3, 64, 64))


def test_local_features_see_a_bounded_window():
    """No padding in the blocks: a pixel far from a 7x7 location cannot affect it."""
    enc = Encoder(32, ndf=4, n_rkhs=8, n_depth=1).eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., 28:, 28:] += 10.0                       # bottom-right corner only
    r7a, r7b = enc(x)[2], enc(y)[2]
    assert torch.equal(r7a[..., :3, :3], r7b[..., :3, :3])    # top-left locations untouched
    assert not torch.equal(r7a[..., 6, 6], r7b[..., 6, 6])


def test_model_splits_views_and_detaches_classifier_input():
    """The online classifiers see both views' r1 (amdim-public: 2B rows), detached."""
    torch.manual_seed(0)
    model = AMDIM(32, ndf=4, n_rkhs=16, n_depth=1, n_classes=5)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    (f1, f2), logits = model(x1, x2)
    mlp, lin = logits["mlp"], logits["lin"]
    assert [r.shape[0] for r in f1 + f2] == [4] * 6 and mlp.shape == lin.shape == (8, 5)
    model.eval()   # no dropout: row b + 4 is view 2's image b
    (f1, f2), logits = model(x1, x2)
    lin = logits["lin"]
    head = model.classifiers.linear
    assert torch.allclose(lin, torch.cat([f1[0], f2[0]]).flatten(1) @ head.weight.T + head.bias, atol=1e-6)
    model.train()
    (mlp.sum() + lin.sum()).backward()
    assert all(p.grad is None for p in model.encoder.parameters())   # classifiers train alone


def test_views_pass_the_encoder_separately():
    """Each view is its own batch for batch norm (amdim-public encodes x1 and x2 in two calls): view
    1's features do not depend on view 2. A joint pass over cat(x1, x2) would mix their statistics."""
    torch.manual_seed(0)
    model = AMDIM(32, ndf=4, n_rkhs=16, n_depth=1, use_bn=True, n_classes=0)
    x1 = torch.rand(6, 3, 32, 32)
    x2 = 3 * torch.rand(6, 3, 32, 32) + 2          # other statistics than x1
    (f1, f2), _ = model(x1, x2)
    alone1 = model.encoder(model.normalize(x1))
    alone2 = model.encoder(model.normalize(x2))
    joint = model.encoder(model.normalize(torch.cat([x1, x2])))
    for got, want in zip(f1[:3], alone1):
        assert torch.allclose(got, want, atol=1e-5)
    for got, want in zip(f2[:3], alone2):
        assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(f1[0], joint[0][:6], atol=1e-3)       # the test can tell the two apart


def test_residual_blocks_start_as_their_shortcut():
    """amdim-public init_weights: conv2 of every residual block (trunk and embeddings) starts at 0,
    conv1 keeps torch's default init; the residual block has no batch norm after conv2."""
    from amdim.amdim_model import ResNxN, RKHSEmbed
    import torch.nn.functional as F
    torch.manual_seed(0)
    enc = Encoder(32, ndf=4, n_rkhs=24, n_depth=2, use_bn=True)
    blocks = [m for m in enc.modules() if isinstance(m, (ResNxN, RKHSEmbed))]
    assert len(blocks) == 12 and all(torch.equal(b.conv2.weight, torch.zeros_like(b.conv2.weight)) for b in blocks)
    assert all(b.conv1.weight.abs().sum() > 0 for b in blocks)
    # a widening 4x4 / stride-2 block is then exactly its shortcut: an average pool padded with zeros
    block = ResNxN(4, 8, 4, 2, use_bn=True)
    x = torch.randn(3, 4, 14, 14)
    expect = F.pad(F.avg_pool2d(x, 4, 2), (0, 0, 0, 0, 0, 4))
    assert torch.allclose(block(x), expect, atol=1e-6)
    # with conv2 set, the residual branch is conv2(relu(bn1(conv1 x))): no normalisation after conv2
    torch.nn.init.normal_(block.conv2.weight)
    h = F.conv2d(F.relu(F.batch_norm(F.conv2d(x, block.conv1.weight, stride=2), None, None, training=True)),
                 block.conv2.weight)
    assert torch.allclose(block(x), h + expect, atol=1e-5)
    assert [n for n, m in block.named_modules() if isinstance(m, torch.nn.BatchNorm2d)] == ["bn1"]


def _feats(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, s, s, generator=g, dtype=torch.float64, requires_grad=True) for s in (1, 5, 7)]


def _targets(r):
    return r.flatten(2).transpose(1, 2)


def test_objective_equals_spec_composition():
    """total = 1->5 + 1->7 + 5->5 (each the mean of both directions) + lgt_reg, lgt_reg = 0.5 * the
    sum of the six calls' (amdim-public costs.py: each cost's two directions averaged, the costs
    summed), with the 5->5 source at one location per image drawn from the generator."""
    b, d = 6, 8
    f1, f2 = _feats(b, d, 1), _feats(b, d, 2)
    nce = lambda s, t, p: nce_loss_reference(s, t, p, tclip=20.0, reg_weight=0.05)
    total, parts = MultiscaleNCE(nce)(f1, f2, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    idx = torch.arange(b)
    expect, regs = 0.0, []
    for (sv, tv) in ((f1, f2), (f2, f1)):
        for src, trg in ((sv[0].flatten(1), _targets(tv[1])), (sv[0].flatten(1), _targets(tv[2]))):
            loss, reg = nce(src, trg, idx)
            expect, regs = expect + 0.5 * loss, regs + [reg]
    for (sv, tv) in ((f1, f2), (f2, f1)):
        loc = torch.randint(25, (b,), generator=g)
        loss, reg = nce(_targets(sv[1])[idx, loc], _targets(tv[1]), idx)
        expect, regs = expect + 0.5 * loss, regs + [reg]
    assert len(regs) == 6
    lgt_reg = 0.5 * (regs[0] + regs[1] + regs[2] + regs[3] + regs[4] + regs[5])
    assert torch.allclose(total, expect + lgt_reg, rtol=1e-12, atol=1e-12)
    assert set(parts) == {"1t5", "1t7", "5t5", "lgt_reg"}
    assert torch.allclose(parts["lgt_reg"], lgt_reg, rtol=1e-12)


def test_dense_objective_uses_every_location():
    b, d = 3, 4
    f1, f2 = _feats(b, d, 3), _feats(b, d, 4)
    nce = lambda s, t, p: nce_loss_reference(s, t, p, tclip=None, reg_weight=0.0)
    total, _ = MultiscaleNCE(nce, ("7t7",), dense=True)(f1, f2, torch.Generator())
    pos = torch.arange(b).repeat_interleave(49)
    expect = 0.5 * (nce(_targets(f1[2]).reshape(b * 49, d), _targets(f2[2]), pos)[0]
                    + nce(_targets(f2[2]).reshape(b * 49, d), _targets(f1[2]), pos)[0])
    assert torch.allclose(total, expect, rtol=1e-12, atol=1e-12)


def test_fused_backend_matches_reference_objective():
    f1, f2 = [[r.float().detach().requires_grad_() for r in _feats(5, 16, s)] for s in (5, 6)]
    out = {}
    for backend in ("reference", "fused"):
        total, _ = MultiscaleNCE(nce_fn(backend, 20.0, 0.05), parse_costs("1t5,1t7,5t5,5t7"))(
            f1, f2, torch.Generator().manual_seed(0))
        grads = torch.autograd.grad(total, f1 + f2)
        out[backend] = (total, grads)
    assert torch.allclose(out["fused"][0], out["reference"][0], rtol=1e-5)
    for gf, gr in zip(out["fused"][1], out["reference"][1]):
        assert torch.allclose(gf, gr, rtol=1e-4, atol=1e-6)


def test_mixture_sources_for_global_costs_only():
    """With a mixture head the 1->5 cost uses the (B, k, D) components; 5->5 stays plain NCE."""
    torch.manual_seed(0)
    model = AMDIM(32, ndf=4, n_rkhs=8, n_depth=1, n_classes=0, n_mix=3).double()
    (f1, f2), _ = model(torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randn(4, 3, 32, 32, dtype=torch.float64))
    assert f1[3].shape == (4, 3, 8) and f2[3].shape == (4, 3, 8)
    mix = mixture_fn("reference", 20.0, 0.05, tau=2.0)
    total, _ = MultiscaleNCE(nce_fn("reference", 20.0, 0.05), ("1t5", "5t5"), mixture=mix)(
        f1, f2, torch.Generator().manual_seed(0))
    idx, g = torch.arange(4), torch.Generator().manual_seed(0)
    expect, regs = 0.0, []
    for sv, tv in ((f1, f2), (f2, f1)):
        loss, reg = mixture_nce_loss_reference(sv[3], _targets(tv[1]), idx, tau=2.0)
        expect, regs = expect + 0.5 * loss, regs + [reg]
    for sv, tv in ((f1, f2), (f2, f1)):
        loc = torch.randint(25, (4,), generator=g)
        loss, reg = nce_loss_reference(_targets(sv[1])[idx, loc], _targets(tv[1]), idx)
        expect, regs = expect + 0.5 * loss, regs + [reg]
    assert torch.allclose(total, expect + 0.5 * sum(regs), rtol=1e-10)
    with pytest.raises(ValueError, match="mixture components"):
        MultiscaleNCE(nce_fn("reference", 20.0, 0.05), mixture=mix)(f1[:3], f2[:3], torch.Generator())


@pytest.mark.parametrize("estimator", ["jsd", "dv"])
def test_estimator_reaches_the_kernels(estimator):
    f1, f2 = _feats(4, 8, 8), _feats(4, 8, 9)
    src, trg = f1[0].flatten(1), _targets(f2[1])
    got = nce_fn("fused", 20.0, 0.05, estimator)(src.float(), trg.float(), torch.arange(4))[0]
    want = nce_loss_reference(src, trg, torch.arange(4), estimator=estimator)[0]
    assert torch.allclose(got.double(), want, rtol=1e-4)
    assert not torch.allclose(want, nce_loss_reference(src, trg, torch.arange(4))[0])


def test_parse_costs_rejects_bad_names():
    assert parse_costs("1t5, 7t7") == ("1t5", "7t7")
    for bad in ("", "1t5,1t5", "1t9"):
        with pytest.raises(ValueError, match="costs"):
            parse_costs(bad)
    with pytest.raises(ValueError, match="loss_backend"):
        nce_fn("cuda", 20.0, 0.05)
    with pytest.raises(ValueError, match="estimator"):
        nce_fn("fused", 20.0, 0.05, "mine")


def test_online_classifier_loss_is_amdim_publics():
    """amdim-public loss_xent: cross-entropy of 10 * tanh(logits / 10) over the labeled rows (label -1
    is unlabeled) plus 1e-3 * the mean squared logit over every row."""
    from amdim.amdim_objective import classifier_loss
    g = torch.Generator().manual_seed(0)
    logits = 30 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, -1, 2, -1, 1])
    clipped = 10 * torch.tanh(logits / 10)
    logp = clipped - clipped.exp().sum(1, keepdim=True).log()
    rows = [0, 1, 3, 5]
    expect = -sum(logp[r, labels[r]] for r in rows) / 4 + 1e-3 * (logits ** 2).sum() / 24
    assert torch.allclose(classifier_loss(logits, labels).double(), expect, rtol=1e-6)
    assert torch.isfinite(classifier_loss(logits, torch.full((6,), -1)))     # no labels: the reg only
