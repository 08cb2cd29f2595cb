"""Each option that changes the objective shows its effect in what `python -m amdim.train` computes.

The command line runs one step (amdim.train.main, in this process so that the model's first
forward pass can be watched); its first metrics record must equal the objective computed here,
independently, on the features and the generator state of that same step: the reference losses of
amdim_kernels (straight from docs/losses.md) put together as docs/losses.md sections 2, 3 and 5 say
(AMDIM's costs in both directions, one drawn or every source location, the mixture loss of the
global feature; DIM's MI terms from the critics' raw dot products, prior matching). An option the
trainer ignored (the plain loss for --n-mix, one location for --dense, the default costs,
estimator or weights) gives other numbers."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import amdim_kernels as ak
from amdim import checkpoint, train
from amdim.metrics import METRICS

AMDIM_TINY = ["--ndf", "4", "--n-rkhs", "16", "--n-depth", "1", "--batch-size", "16"]
DIM_TINY = ["--method", "dim", "--ndf", "4", "--y-dim", "8", "--mi-units", "16", "--batch-size", "16"]
ONE_STEP = ["--epochs", "1", "--steps-per-epoch", "1", "--no-eval", "--no-progress", "--log-every", "1"]


@pytest.fixture
def first_step(monkeypatch):
    """Watch the first training forward pass of a run: its features (detached copies), the
    augmentation generator's state right after it (what the objective draws from next) and a copy
    of the model with its weights at that step."""
    seen = {}
    real_setup, real_build = train.setup, checkpoint.build_model

    def setup(*a, **k):
        seen["run"] = real_setup(*a, **k)
        return seen["run"]

    def build(arch, n_classes):
        model = real_build(arch, n_classes)

        def hook(module, inputs, output):
            if module.training and "features" not in seen:
                seen["features"] = _detached(output[0])
                seen["generator"] = seen["run"].aug_gen.get_state()
                seen["model"] = copy.deepcopy(module)
        model.register_forward_hook(hook)
        return model
    monkeypatch.setattr(train, "setup", setup)
    monkeypatch.setattr(checkpoint, "build_model", build)
    return seen


def _detached(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().clone()
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    return type(x)(_detached(v) for v in x)


def _first_record(out):
    with open(out / METRICS) as f:
        return next(r for r in map(json.loads, f) if r["kind"] == "train")


def _train(out, argv):
    train.main(argv + ONE_STEP + ["--out-dir", str(out)])
    return _first_record(out)


# -- AMDIM ----------------------------------------------------------------------------------------

def _targets(r):
    return r.flatten(2).transpose(1, 2)          # (B, D, h, w) -> (B, h*w, D)


def amdim_objective(views, generator_state, costs, dense, estimator="nce", n_mix=1, tclip=20.0, reg=0.05,
                    tau=1.0):
    """docs/losses.md section 2 (and 3 for the mixture): {cost: mean of its two directions,
    "lgt_reg": 0.5 x the sum of every call's, "loss": their sum}. A local source without `dense` is
    one location per image, drawn uniformly from the generator, cost by cost, direction by
    direction (view 1 -> 2, then 2 -> 1)."""
    g = torch.Generator()
    g.set_state(generator_state)
    out, regs = {}, []
    for cost in costs:
        s, t = int(cost[0]), int(cost[2])
        per_direction = []
        for src_view, trg_view in ((0, 1), (1, 0)):
            feats = dict(zip((1, 5, 7), views[src_view][:3]))
            trg = _targets(dict(zip((1, 5, 7), views[trg_view][:3]))[t])
            b = trg.shape[0]
            if s == 1 and n_mix > 1:
                loss, r = ak.mixture_nce_loss_reference(views[src_view][3], trg, torch.arange(b), tau=tau,
                                                        tclip=tclip, reg_weight=reg)
            else:
                if s == 1:
                    src, pos = feats[1].flatten(1), torch.arange(b)
                elif dense:
                    m = _targets(feats[s])
                    src, pos = m.reshape(-1, m.shape[2]), torch.arange(b).repeat_interleave(m.shape[1])
                else:
                    m = _targets(feats[s])
                    loc = torch.randint(m.shape[1], (b,), generator=g)
                    src, pos = m[torch.arange(b), loc], torch.arange(b)
                loss, r = ak.nce_loss_reference(src, trg, pos, tclip=tclip, reg_weight=reg, estimator=estimator)
            per_direction.append(loss)
            regs.append(r)
        out[cost] = 0.5 * (per_direction[0] + per_direction[1])
    out["lgt_reg"] = 0.5 * torch.stack(regs).sum()
    out["loss"] = sum(out.values())
    return {k: float(v) for k, v in out.items()}


@pytest.mark.parametrize("argv, costs, dense, estimator, n_mix", [
    ([], ("1t5", "1t7", "5t5"), False, "nce", 1),
    (["--n-mix", "3", "--costs", "1t5,1t7,5t5"], ("1t5", "1t7", "5t5"), False, "nce", 3),
    (["--dense", "--costs", "1t7,5t5,5t7,7t7", "--estimator", "jsd"], ("1t7", "5t5", "5t7", "7t7"), True, "jsd", 1),
    (["--costs", "7t7,5t7", "--estimator", "dv"], ("7t7", "5t7"), False, "dv", 1),
], ids=["defaults", "n-mix", "dense-costs-jsd", "costs-dv"])
def test_amdim_options_reach_the_objective(tmp_path, first_step, argv, costs, dense, estimator, n_mix):
    record = _train(tmp_path / "run", AMDIM_TINY + argv)
    views = first_step["features"]
    assert len(views[0]) == (4 if n_mix > 1 else 3)          # the mixture head's components
    if n_mix > 1:
        assert views[0][3].shape[1] == n_mix
    want = amdim_objective(views, first_step["generator"], costs, dense, estimator, n_mix)
    assert set(costs) | {"lgt_reg", "loss"} <= set(record) and not set(record) & ({"1t5", "1t7", "5t5", "5t7",
                                                                                     "7t7"} - set(costs))
    for k, v in want.items():
        assert record[k] == pytest.approx(v, rel=2e-5, abs=2e-6), k


# -- DIM ------------------------------------------------------------------------------------------

def _jsd(pos, neg):
    return -F.softplus(-pos).mean() - F.softplus(neg).mean()


def _dot_mi(src, trg, estimator):
    """The local / global dot critic's MI (docs/losses.md section 4 on raw dot products): src (B, D'),
    trg (B, L, D'); positives are each row's own image, negatives every location of the others."""
    s = torch.einsum("id,bld->ibl", src, trg)
    is_pos = torch.eye(len(src), dtype=torch.bool)[:, :, None].expand_as(s)
    if estimator == "jsd":
        return _jsd(s[is_pos], s[~is_pos])
    if estimator == "dv":
        return s[is_pos].mean() - (torch.logsumexp(s[~is_pos], 0) - torch.log(torch.tensor(float((~is_pos).sum()))))
    neg = s.masked_fill(is_pos, float("-inf")).flatten(1).logsumexp(1)           # (B,) over the others
    pos = s[is_pos].view(len(src), -1)                                           # (B, L)
    return (pos - torch.logaddexp(pos, neg[:, None])).mean()


def dim_objective(feats, model, generator_state, alpha, beta, gamma, estimator, prior, prior_gp):
    """docs/losses.md section 5: {"mi_global", "mi_local", "prior_gen", "prior_disc", "prior_gp",
    "loss"} with loss = -(alpha I_G + beta I_L) + gamma * gen + disc + prior_gp * gp, the prior's
    sample z drawn from the generator after the step's augmentation."""
    conv, y = feats["conv"], feats["y"]
    out = {}
    if alpha > 0:
        trg, src = model.global_critic(conv, y)
        out["mi_global"] = _dot_mi(src, trg, estimator)
    if beta > 0:
        trg, src = model.local_critic(conv, y)
        out["mi_local"] = _dot_mi(src, trg, estimator)
    loss = -(alpha * out.get("mi_global", 0.0) + beta * out.get("mi_local", 0.0))
    if prior != "none":
        g = torch.Generator()
        g.set_state(generator_state)
        z = torch.rand(y.shape, generator=g) if prior == "uniform" else torch.randn(y.shape, generator=g)
        v = torch.sigmoid(y) if prior == "uniform" else y
        disc = model.prior_disc
        out["prior_gen"] = F.softplus(-disc(v)).mean()
        out["prior_disc"] = F.softplus(-disc(z)).mean() + F.softplus(disc(v)).mean()

        def penalty(x):
            with torch.enable_grad():
                x = x.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(disc(x).sum(), x)
            return grad.square().sum(1).mean()
        out["prior_gp"] = 0.5 * (penalty(z) + penalty(v))
        loss = loss + gamma * out["prior_gen"] + out["prior_disc"] + prior_gp * out["prior_gp"]
    out["loss"] = loss
    return {k: float(v) for k, v in out.items()}


@pytest.mark.parametrize("argv, alpha, beta, gamma, estimator, prior", [
    ([], 0.0, 1.0, 0.1, "jsd", "uniform"),
    (["--alpha", "0.5", "--beta", "1.5", "--gamma", "0.3", "--prior", "gaussian", "--estimator", "nce"],
     0.5, 1.5, 0.3, "nce", "gaussian"),
    (["--dim-preset", "G", "--gamma", "0", "--prior", "none", "--estimator", "dv"], 1.0, 0.0, 0.0, "dv", "none"),
], ids=["defaults", "weights-gaussian-nce", "global-dv-no-prior"])
def test_dim_options_reach_the_objective(tmp_path, first_step, argv, alpha, beta, gamma, estimator, prior):
    record = _train(tmp_path / "run", DIM_TINY + argv)
    model = first_step["model"]
    with torch.no_grad():
        want = dim_objective(first_step["features"], model, first_step["generator"], alpha, beta, gamma,
                             estimator, prior, first_step["run"].cfg.objective.prior_gp)
    assert set(want) <= set(record)
    assert ("mi_global" in record) == (alpha > 0) and ("mi_local" in record) == (beta > 0)
    assert ("prior_disc" in record) == (prior != "none")
    for k, v in want.items():
        assert record[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_dim_local_concat_critic_is_the_one_trained(tmp_path, first_step):
    """--local-arch concat builds and trains the concat-and-convolve critic: its MI is that of the
    model's concat critic on the pairing drawn for the step (amdim.dim_objective.concat_pairing,
    itself tested against its definition in test_dim.py)."""
    from amdim.dim_objective import concat_pairing
    from test_dim import plain_mi
    record = _train(tmp_path / "run", DIM_TINY + ["--local-arch", "concat", "--estimator", "nce", "--prior", "none",
                                                  "--gamma", "0"])
    model, feats = first_step["model"], first_step["features"]
    g = torch.Generator()
    g.set_state(first_step["generator"])
    b, n_loc = feats["y"].shape[0], feats["conv"].shape[2] * feats["conv"].shape[3]
    with torch.no_grad():
        scores = model.local_critic(feats["conv"], feats["y"], concat_pairing(g, b, n_loc, 8, torch.device("cpu")))
        want = plain_mi(scores[:, 0].flatten(), scores[:, 1:].flatten(), "nce", lambda p: scores[p // n_loc, 1:, p % n_loc])
    assert record["mi_local"] == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    ck = checkpoint.load(str(tmp_path / "run" / checkpoint.CHECKPOINT))
    assert ck["arch"]["local_arch"] == "concat"
