"""Deep InfoMax: encoder shapes, every MI term against plain formulas written here, the critics'
split first layers against literal concatenation, prior matching's two players, short training
runs, two gloo processes against one for the terms that reduce over the global batch, and the
option errors."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from amdim.dim_model import DIM
from amdim.distributed import convert_batchnorm
from amdim.dim_objective import (ESTIMATORS, PRESETS, DIMObjective, concat_pairing, critic_mi, dot_mi,
                                 gradient_penalty)

LOG2 = math.log(2.0)


def plain_mi(t_joint, t_prod, estimator, negatives_of=None):
    """The MI bounds straight from their definitions. t_joint: 1-D scores of positive pairs;
    t_prod: 1-D scores of negative pairs; negatives_of(p) -> 1-D scores of positive p's negatives."""
    if estimator == "jsd":      # the seed's E_joint - E_prod, less its constant 2 log 2
        e_joint = (LOG2 - F.softplus(-t_joint)).mean()
        e_prod = (F.softplus(-t_prod) + t_prod - LOG2).mean()
        return e_joint - e_prod - 2 * LOG2
    if estimator == "dv":
        return t_joint.mean() - torch.log(torch.exp(t_prod).mean())
    terms = [t - torch.log(torch.exp(t) + torch.exp(negatives_of(p)).sum()) for p, t in enumerate(t_joint)]
    return torch.stack(terms).mean()


def tiny(size=32, **kw):
    torch.manual_seed(0)
    return DIM(size, 10, ndf=4, y_dim=8, mi_units=32, **kw)


def images(b, size=32, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def critic_params(m):
    return [n for n, _ in m.named_parameters() if not n.startswith("classifiers")]


# ---------------------------------------------------------------- model

@pytest.mark.parametrize("size, conv_c, last", [(32, 8, 16 * 4 * 4), (64, 16, 32 * 4 * 4)])
@pytest.mark.parametrize("prior", ["uniform", "gaussian"])
def test_feature_shapes(size, conv_c, last, prior):
    """Y is the linear output (rdevon/DIM's critics and classifiers see it); only prior matching
    squashes it, with a sigmoid for the uniform prior. Online classifiers on conv, fc and Y."""
    m = tiny(size, prior=prior)
    x = images(3, size)
    feats, logits = m(x)
    assert feats["conv"].shape == (3, conv_c, 8, 8) and (feats["conv"] >= 0).all()   # ReLU activations
    assert feats["fc"].shape == (3, 64) and feats["y"].shape == (3, 8)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"conv": (3, 10), "fc": (3, 10), "y": (3, 10)}
    y = feats["y"]
    assert (y < 0).any() and (y > 0).any()
    v = m.prior_input(y)
    assert torch.equal(v, torch.sigmoid(y)) if prior == "uniform" else torch.equal(v, y)
    probe = m.probe_features(x)
    assert {k: tuple(v.shape) for k, v in probe.items()} == {"conv": (3, last), "fc": (3, 64), "y": (3, 8)}
    assert torch.equal(probe["y"], y)


@pytest.mark.parametrize("kw, absent", [
    (dict(use_global=False), "global_critic"), (dict(use_local=False), "local_critic"),
    (dict(prior="none"), "prior_disc")])
def test_unused_critics_are_not_built(kw, absent):
    names = critic_params(tiny(**kw))
    assert not any(n.startswith(absent) for n in names)
    assert any(n.startswith(absent) for n in critic_params(tiny()))


@pytest.mark.parametrize("arch", ["dot", "concat"])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 0.5), (0.0, 1.0, 0.1), (1.0, 0.0, 0.0)])
def test_one_backward_reaches_every_parameter(arch, weights):
    """DDP needs a gradient for every parameter at every step (the classifiers get theirs from the
    trainer's cross-entropy)."""
    obj = DIMObjective(*weights, "jsd", arch, "uniform", "reference", global_arch=arch)
    m = tiny(**obj.model_options())
    loss, _ = obj(m, m(images(4))[0], gen())
    loss.backward()
    p = dict(m.named_parameters())
    assert [n for n in critic_params(m) if p[n].grad is None] == []


# ---------------------------------------------------------------- estimators against plain formulas

@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_critic_mi_matches_plain_formula(estimator):
    g = gen(3)
    pos = torch.randn(3, 5, generator=g, dtype=torch.float64) * 2
    neg = torch.randn(3, 4, 5, generator=g, dtype=torch.float64) * 2
    want = plain_mi(pos.flatten(), neg.flatten(), estimator,
                    lambda p: neg[p // 5, :, p % 5])
    torch.testing.assert_close(critic_mi(pos, neg, estimator), want)


def dot_scores(src, trg):
    """rdevon/DIM's scores (functions/dim_losses.py): the raw dot products, no 1 / sqrt(D')."""
    return torch.einsum("id,bld->ibl", src, trg)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_dot_local_term_matches_plain_formula(estimator):
    g = gen(4)
    src = torch.randn(5, 6, generator=g, dtype=torch.float64) * 2
    trg = torch.randn(5, 7, 6, generator=g, dtype=torch.float64) * 2
    s = dot_scores(src, trg)
    is_pos = torch.eye(5, dtype=torch.bool)[:, :, None].expand_as(s)
    # for "nce" a positive (i, l) is contrasted with every location of every other image
    want = plain_mi(s[is_pos], s[~is_pos], estimator, lambda p: s[p // 7][~is_pos[p // 7]])
    torch.testing.assert_close(dot_mi(src, trg, estimator, "reference"), want)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dot_local_term_fused_equals_reference(estimator, dtype):
    g = gen(5)
    src = (torch.randn(7, 13, generator=g) * 3).to(dtype).requires_grad_()
    trg = (torch.randn(7, 11, 13, generator=g) * 3).to(dtype).requires_grad_()
    out = {}
    for backend in ("fused", "reference"):
        mi = dot_mi(src, trg, estimator, backend)
        out[backend] = (mi, *torch.autograd.grad(mi, (src, trg)))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(out["fused"], out["reference"]):
        torch.testing.assert_close(a, b, **tol)


def test_global_concat_critic_scores_every_pair_as_a_concatenation():
    """The split first layer equals the DIM paper's critic on [flattened reduced map; Y]."""
    c = tiny(global_arch="concat").global_critic
    conv, y = torch.rand(4, 8, 8, 8), torch.rand(3, 8)
    got = c(conv, y)                                                   # (3, 4)
    w = torch.cat([c.w_c.weight, c.w_y.weight], dim=1)
    feat = c.reduce(conv)
    for n in range(3):
        for b in range(4):
            h = torch.cat([feat[b], y[n]]) @ w.T + c.w_c.bias
            torch.testing.assert_close(got[n, b], c.rest(h)[0])


def test_concat_critic_scores_y_tiled_over_the_map():
    c = tiny(local_arch="concat").local_critic
    conv, y = torch.rand(5, 8, 8, 8), torch.rand(3, 8)
    index = torch.randint(5, (3, 2, 64), generator=gen(6))
    got = c(conv, y, index)                                            # (3, 2, 64)
    w = torch.cat([c.w_c.weight, c.w_y.weight[:, :, None, None]], dim=1)
    for n in range(3):
        for j in range(2):
            maps = conv.flatten(2)[index[n, j], :, torch.arange(64)].T.reshape(1, 8, 8, 8)
            x = torch.cat([maps, y[n][None, :, None, None].expand(1, 8, 8, 8)], dim=1)   # Y tiled
            h = F.conv2d(x, w, c.w_c.bias).flatten(2)
            torch.testing.assert_close(got[n, j], c.rest(h).flatten())


def test_concat_pairing_is_a_derangement_per_location():
    idx = concat_pairing(gen(7), 6, 10, 4, torch.device("cpu"))        # (6, 5, 10)
    assert torch.equal(idx[:, 0], torch.arange(6)[:, None].expand(6, 10))
    for k in range(1, 5):
        for l in range(10):
            assert sorted(idx[:, k, l].tolist()) == list(range(6))          # a permutation...
            assert (idx[:, k, l] != torch.arange(6)).all()                  # ... with no positive
    for l in range(10):   # the K negatives of a (row, location) are distinct images
        assert all(len(set(idx[i, 1:, l].tolist())) == 4 for i in range(6))
    assert len({tuple(idx[0, 1:, l].tolist()) for l in range(10)}) > 1     # drawn per location


def test_global_dot_critic_is_rdevon_dims():
    """GlobalDIM: E' repeats the encoder's layers from the local one (conv 2 ndf -> 2 ndf, conv 4 ndf,
    fc 16 ndf; at 64 px conv 4 ndf -> 4 ndf, conv 8 ndf), then a linear layer of mi_units; Y passes a
    linear layer of mi_units; the score is their raw dot product."""
    for size, widths in ((32, [(8, 8), (8, 16)]), (64, [(16, 16), (16, 32)])):
        c = tiny(size).global_critic
        convs = [m for m in c.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [(k.in_channels, k.out_channels, k.kernel_size, k.stride) for k in convs] == [
            (i, o, (4, 4), (2, 2)) for i, o in widths]
        assert (c.fc[0].in_features, c.fc[0].out_features) == (widths[-1][1] * 4, 64)
        assert (c.map_out.out_features, c.y_out.in_features, c.y_out.out_features) == (32, 8, 32)
    m = tiny()
    conv, y = torch.rand(4, 8, 8, 8), torch.randn(3, 8)
    trg, src = m.global_embeddings(conv, y)
    want = c_map = m.global_critic.map_out(m.global_critic.fc(m.global_critic.convs(conv).flatten(1)))
    torch.testing.assert_close(trg[:, 0], c_map)
    torch.testing.assert_close(src, y @ m.global_critic.y_out.weight.T + m.global_critic.y_out.bias)
    assert want.shape == (4, 32)


@pytest.mark.parametrize("arch", ["dot", "concat"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_objective_terms_match_plain_formulas(arch, estimator):
    """The MI terms equal the plain formulas, and so do the encoder's gradients: the encoder learns
    from the MI terms through C and Y (an objective that detached them would leave only the critics
    learning, which still raises the MI estimate)."""
    obj = DIMObjective(0.7, 1.3, 0.0, estimator, arch, "none", "reference", global_arch=arch, **(
        dict(n_shuffles=3) if arch == "concat" else {}))
    m = tiny(**obj.model_options())
    feats = m(images(5))[0]
    loss, parts = obj(m, feats, gen(8))
    encoder = [p for n, p in m.named_parameters() if n.startswith("encoder.")]
    got = torch.autograd.grad(loss, encoder, retain_graph=True)
    conv, y = feats["conv"], feats["y"]
    if arch == "dot":
        trg_g, src_g = m.global_critic(conv, y)
        s = src_g @ trg_g[:, 0].T                                  # raw dot products
    else:
        s = m.global_critic(conv, y)
    eye = torch.eye(5, dtype=torch.bool)
    mi_g = plain_mi(s[eye], s[~eye], estimator, lambda p: s[p][~eye[p]])
    if arch == "dot":
        trg, src = m.local_critic(conv, y)
        sl = dot_scores(src, trg)
        is_pos = eye[:, :, None].expand_as(sl)
        mi_l = plain_mi(sl[is_pos], sl[~is_pos], estimator, lambda p: sl[p // 64][~is_pos[p // 64]])
    else:
        idx = concat_pairing(gen(8), 5, 64, 3, y.device)
        sl = m.local_critic(conv, y, idx)                          # (5, 4, 64)
        mi_l = plain_mi(sl[:, 0].flatten(), sl[:, 1:].flatten(), estimator,
                        lambda p: sl[p // 64, 1:, p % 64])
    want_loss = -(0.7 * mi_g + 1.3 * mi_l)
    torch.testing.assert_close(parts["mi_global"], mi_g.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["mi_local"], mi_l.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad(want_loss, encoder)
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale)


def test_concat_nce_defaults_to_several_shuffles():
    obj = DIMObjective(0.0, 1.0, 0.0, "nce", "concat", "none", "reference")
    m = tiny(**obj.model_options())
    seen = {}
    original = m.concat_scores
    m.concat_scores = lambda cols, y, index: seen.setdefault("j", index.shape[1]) and original(cols, y, index)
    obj(m, m(images(4))[0], gen())
    assert seen["j"] == 1 + 3          # min(8, B - 1) negatives with B = 4


def test_same_generator_seed_same_loss():
    obj = DIMObjective(0.0, 1.0, 0.1, "jsd", "concat", "uniform", "reference")
    m = tiny(**obj.model_options())
    feats = m(images(6))[0]
    a, b, c = (obj(m, feats, gen(s))[0] for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- prior matching

def test_prior_discriminator_learns_with_the_encoder_frozen():
    obj = DIMObjective(**PRESETS["G"], estimator="jsd", prior="uniform", loss_backend="reference")
    m = tiny(**obj.model_options())
    feats = {k: v.detach() for k, v in m(images(16))[0].items()}      # a frozen encoder's output
    opt = torch.optim.Adam(m.prior_disc.parameters(), lr=3e-3)
    g, disc = gen(9), []
    for _ in range(15):
        loss, parts = obj(m, feats, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        disc.append(parts["prior_disc"].item())
    assert disc[0] > 1.2 and disc[-1] < 0.8 * disc[0]                 # log 4 = 1.386 at chance


@pytest.mark.parametrize("prior", ["uniform", "gaussian"])
def test_each_player_gets_only_its_own_prior_gradient(prior):
    m = tiny(prior=prior, use_global=False).double()     # float64: g1 - g0 must not lose the gamma term
    x = images(6).double()

    def grads(gamma):
        m.zero_grad()
        obj = DIMObjective(0.0, 1.0, gamma, "jsd", "dot", prior, "reference", prior_gp=0.0)
        obj(m, m(x)[0], gen(10))[0].backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    g0, g1 = grads(0.0), grads(1.0)
    disc = [n for n in g0 if n.startswith("prior_disc")]
    enc = [n for n in g0 if n.startswith("encoder")]
    # D_phi: identical gradients with and without the generator term ...
    assert disc and all(torch.equal(g0[n], g1[n]) for n in disc)
    # ... and they are those of its own loss on prior samples and detached Y
    m.zero_grad()
    y = m.prior_input(m(x)[0]["y"]).detach()
    z = (torch.rand if prior == "uniform" else torch.randn)(y.shape, generator=gen(10)).double()
    own = F.softplus(-m.prior_disc(z)).mean() + F.softplus(m.prior_disc(y)).mean()
    want = torch.autograd.grad(own, [dict(m.named_parameters())[n] for n in disc])
    for n, w in zip(disc, want):
        torch.testing.assert_close(g0[n], w)
    # the encoder: the gamma term's gradient arrives, and it is that of softplus(-D(Y))
    diff = sum((g1[n] - g0[n]).norm() for n in enc)
    assert diff > 1e-6
    m.zero_grad()
    y = m.prior_input(m(x)[0]["y"])
    gen_loss = F.softplus(-m.prior_disc(y)).mean()
    want = torch.autograd.grad(gen_loss, [dict(m.named_parameters())[n] for n in enc], allow_unused=True)
    for n, w in zip(enc, want):
        torch.testing.assert_close(g1[n] - g0[n], w if w is not None else torch.zeros_like(g1[n]),
                                   rtol=1e-4, atol=1e-6)


def test_gradient_penalty_is_the_mean_squared_input_gradient():
    """rdevon/DIM's contrastive_gradient_penalty: the mean over the batch of ||grad_v D(v)||^2, checked
    against central finite differences of D."""
    torch.manual_seed(0)
    d = tiny().prior_disc.double().requires_grad_(False)
    v = torch.rand(4, 8, dtype=torch.float64)
    eps, want = 1e-6, 0.0
    for i in range(4):
        g = torch.stack([(d(v[i:i + 1] + eps * e) - d(v[i:i + 1] - eps * e))[0] / (2 * eps)
                         for e in torch.eye(8, dtype=torch.float64)])
        want += float(g.square().sum()) / 4
    assert gradient_penalty(d, v).item() == pytest.approx(want, rel=1e-6)


def test_gradient_penalty_trains_the_discriminator_only():
    """With prior_gp the discriminator's gradient gains exactly that of 0.5 * (GP(z) + GP(v)) on
    detached inputs; the encoder's gradient does not change."""
    m = tiny(use_global=False)
    x = images(6)

    def grads(prior_gp):
        m.zero_grad()
        DIMObjective(0.0, 1.0, 0.1, "jsd", "dot", "uniform", "reference", prior_gp=prior_gp)(
            m, m(x)[0], gen(12))[0].backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    g0, g2 = grads(0.0), grads(2.0)
    v = m.prior_input(m(x)[0]["y"]).detach()
    z = torch.rand(v.shape, generator=gen(12))
    disc = dict(m.prior_disc.named_parameters())
    penalty = 2.0 * 0.5 * (gradient_penalty(m.prior_disc, z) + gradient_penalty(m.prior_disc, v))
    # (the output layer's bias does not move an input gradient: no penalty gradient)
    want = dict(zip(disc, torch.autograd.grad(penalty, list(disc.values()), allow_unused=True)))
    for n, w in want.items():
        w = torch.zeros_like(disc[n]) if w is None else w
        torch.testing.assert_close(g2["prior_disc." + n] - g0["prior_disc." + n], w, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(g0[n], g2[n]) for n in g0 if not n.startswith("prior_disc"))


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("weights, arch, prior, margin", [
    (PRESETS["L"], "dot", "uniform", 1.0), (PRESETS["G"], "dot", "uniform", 0.3),
    (dict(alpha=0.0, beta=1.0, gamma=0.0), "concat", "none", 0.01)])
def test_short_training_run_raises_the_mi_estimate(weights, arch, prior, margin):
    """A few Adam steps on one batch of digits: the trained MI term (-its loss) rises, and the
    global and concat critics end above chance, -2 log 2, where the critic tells positive from
    negative pairs no better than a constant does. (The raw dot products of the local dot critic's
    LayerNormed embeddings start far from 0, its JSD estimate far below chance: there the rise is
    the test; the prior terms are a game: the total need not fall monotonically.)"""
    from amdim.data.datasets import load
    x = load("digits").train.batch(list(range(32)))[0].float() / 255.0
    obj = DIMObjective(**weights, estimator="jsd", local_arch=arch, prior=prior, loss_backend="fused")
    torch.manual_seed(0)
    m = DIM(32, 10, ndf=4, y_dim=16, mi_units=64, **obj.model_options())
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g, mi = gen(11), []
    for _ in range(20):
        loss, parts = obj(m, m(x)[0], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mi.append(parts["mi_local" if weights["beta"] > 0 else "mi_global"].item())
    assert sum(mi[-5:]) / 5 > sum(mi[:5]) / 5 + margin, mi
    if mi[0] > -2 * LOG2 - 0.2:   # started near chance
        assert mi[-1] > -2 * LOG2 + 0.005, mi


# ---------------------------------------------------------------- distributed

DIST_CONFIGS = (("concat", "dv"), ("dot", "dv"), ("concat", "nce"))


def _dist_loss_and_grads(rank, world, arch, estimator):
    """Global + local + prior terms of a 6-image global batch, computed on this rank's share."""
    obj = DIMObjective(0.7, 1.0, 0.5, estimator, arch, "uniform", "reference")
    torch.manual_seed(0)
    model = DIM(32, 0, ndf=4, y_dim=8, mi_units=32, **obj.model_options())
    b = 6 // world
    net = model
    if world > 1:
        convert_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(model)
    feats, _ = net(images(6)[rank * b:(rank + 1) * b])
    loss, _ = obj(net, feats, gen(3))
    loss.backward()   # DDP averages the gradients over the ranks
    loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _dist_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save({c: _dist_loss_and_grads(rank, world, *c) for c in DIST_CONFIGS}, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    """Negatives from the other rank's images, the DV log-mean-exp over both ranks, prior samples
    drawn for the global batch: two ranks of 3 images train like one process on all 6."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "result")
    mp.spawn(_dist_worker, args=(2, port, out), nprocs=2, join=True)
    for rank in range(2):
        two = torch.load(f"{out}.{rank}")
        for config in DIST_CONFIGS:
            ref_loss, ref = _dist_loss_and_grads(0, 1, *config)
            loss, grads = two[config]
            assert loss == pytest.approx(ref_loss, rel=1e-5), config
            assert grads.keys() == ref.keys()
            # fp32 sums in another order: tolerance relative to the largest gradient
            atol = 1e-4 * max(float(g.abs().max()) for g in ref.values())
            for name, g in grads.items():
                assert torch.allclose(g, ref[name], rtol=1e-3, atol=atol), (config, name)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kw, name", [
    (dict(alpha=0.0, beta=0.0, gamma=0.0), "alpha and beta"),
    (dict(alpha=0.0, beta=0.0, gamma=1.0), "alpha and beta"),
    (dict(alpha=-1.0, beta=1.0, gamma=0.0), "alpha"),
    (dict(alpha=1.0, beta=float("nan"), gamma=0.0), "beta"),
    (dict(alpha=1.0, beta=1.0, gamma=0.5, prior="none"), "gamma"),
    (dict(alpha=1.0, beta=1.0, gamma=0.0, estimator="mine"), "estimator"),
    (dict(alpha=1.0, beta=1.0, gamma=0.0, local_arch="conv"), "local_arch"),
    (dict(alpha=1.0, beta=1.0, gamma=0.0, global_arch="conv"), "global_arch"),
    (dict(alpha=1.0, beta=1.0, gamma=0.1, prior_gp=-1.0), "prior_gp"),
    (dict(alpha=1.0, beta=1.0, gamma=0.0, prior="beta"), "prior"),
    (dict(alpha=1.0, beta=1.0, gamma=0.0, loss_backend="cuda"), "loss_backend"),
    (dict(alpha=1.0, beta=1.0, gamma=0.0, n_shuffles=2), "n_shuffles"),
    (dict(alpha=1.0, beta=1.0, gamma=0.0, local_arch="concat", n_shuffles=0), "n_shuffles"),
])
def test_bad_objective_options_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        DIMObjective(**kw)


@pytest.mark.parametrize("kw, name", [
    (dict(image_size=48), "image_size"), (dict(ndf=0), "ndf"), (dict(y_dim=2.5), "y_dim"),
    (dict(mi_units=0), "mi_units"), (dict(local_arch="conv"), "local_arch"),
    (dict(global_arch="mlp"), "global_arch"), (dict(prior="laplace"), "prior"),
    (dict(use_global=False, use_local=False), "use_global and use_local"),
])
def test_bad_model_options_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        DIM(**kw)


def test_model_objective_mismatch_and_bad_inputs():
    m = tiny(use_global=False)
    with pytest.raises(ValueError, match="use_global"):
        DIMObjective(1.0, 1.0, 0.1)(m, m(images(3))[0], gen())
    with pytest.raises(ValueError, match="prior"):
        DIMObjective(0.0, 1.0, 0.1, prior="gaussian")(m, m(images(3))[0], gen())
    with pytest.raises(ValueError, match="at least 2 images"):
        DIMObjective(0.0, 1.0, 0.1)(m.eval(), m.eval()(images(1))[0], gen())
    with pytest.raises(ValueError, match=r"\(B, C, 32, 32\)"):
        m(images(2, 64))


def test_presets_build_their_critics():
    assert DIMObjective(**PRESETS["L"]).model_options() == dict(
        local_arch="dot", global_arch="dot", prior="uniform", use_global=False, use_local=True)
    assert DIMObjective(**PRESETS["G"]).model_options() == dict(
        local_arch="dot", global_arch="dot", prior="uniform", use_global=True, use_local=False)
