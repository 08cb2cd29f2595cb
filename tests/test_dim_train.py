"""python -m amdim.train --method dim end to end: learning, exact resume, presets, option errors,
and amdim.evaluate's probes of the three DIM representations."""
import json

import numpy as np
import pytest
import torch

from amdim import checkpoint, evaluate, train
from amdim.metrics import METRICS

TINY = ["--method", "dim", "--ndf", "4", "--y-dim", "16", "--mi-units", "32", "--batch-size", "32", "--no-eval",
        "--log-every", "1", "--no-progress"]


def _run(out, *extra):
    """(summary, the run's resolved options as a flat dict)."""
    summary = train.run(train.build_parser().parse_args(TINY + ["--out-dir", str(out), *extra]))
    return summary, summary["config"].options()


@pytest.mark.parametrize("extra", [
    [],                                                        # DIM(L), dot-product critic, JSD
    ["--local-arch", "concat", "--estimator", "nce"],
    ["--dim-preset", "G", "--estimator", "dv"],
])
def test_short_dim_training_raises_its_mi_estimate(tmp_path, extra):
    summary, args = _run(tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "20", "--lr", "2e-3", *extra)
    assert len(summary["losses"]) == 20 and all(np.isfinite(summary["losses"]))
    with open(tmp_path / "run" / METRICS) as f:
        records = [r for r in map(json.loads, f) if r["kind"] == "train"]
    term = "mi_global" if args["alpha"] > 0 else "mi_local"   # the loss also holds the prior game
    mi = [r[term] for r in records]
    assert np.mean(mi[-4:]) > np.mean(mi[:4]) + 0.005, mi
    ck = checkpoint.load(str(tmp_path / "run" / checkpoint.CHECKPOINT))
    assert ck["arch"]["method"] == "dim" and ck["args"]["estimator"] == args["estimator"]


@pytest.mark.parametrize("extra, term", [(["--global-arch", "concat"], "mi_local"),
                                         (["--dim-preset", "G", "--local-arch", "concat"], "mi_global")])
def test_the_arch_of_a_term_that_is_off_does_not_stop_the_run(tmp_path, extra, term):
    """DIM(L) builds no global critic, so --global-arch has nothing to build; the objective demanded
    it of the model anyway and stopped the first step."""
    summary, _ = _run(tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "1", *extra)
    assert len(summary["losses"]) == 1
    with open(tmp_path / "run" / METRICS) as f:
        assert term in json.loads(f.readline())


def test_presets_fill_the_weights_and_explicit_values_win(tmp_path):
    _, args = _run(tmp_path / "l", "--epochs", "1", "--steps-per-epoch", "1")
    assert (args["alpha"], args["beta"], args["gamma"], args["estimator"]) == (0.0, 1.0, 0.1, "jsd")
    _, args = _run(tmp_path / "g", "--epochs", "1", "--steps-per-epoch", "1", "--dim-preset", "G",
                   "--gamma", "0.5")
    assert (args["alpha"], args["beta"], args["gamma"]) == (1.0, 0.0, 0.5)


def test_dim_resume_is_exact(tmp_path):
    common = ["--steps-per-epoch", "2", "--seed", "7", "--augment", "amdim-cifar"]
    full, _ = _run(tmp_path / "full", "--epochs", "2", *common)
    _run(tmp_path / "part", "--epochs", "1", *common)
    rest, _ = _run(tmp_path / "part", "--epochs", "2", *common, "--resume",
                   str(tmp_path / "part" / checkpoint.CHECKPOINT))
    assert rest["losses"] == full["losses"][2:]
    with pytest.raises(SystemExit, match="--beta True .checkpoint. vs False"):
        _run(tmp_path / "other", "--epochs", "3", *common, "--beta", "0", "--alpha", "1",
             "--resume", str(tmp_path / "part" / checkpoint.CHECKPOINT))


@pytest.mark.parametrize("argv, message", [
    (["--alpha", "0", "--beta", "0"], "--alpha and --beta are both 0"),
    (["--prior", "none"], "--gamma 0.1 weights prior matching, but --prior is none"),
    (["--image-size", "128"], "--image-size 128 is not available for --method dim"),
    (["--n-mix", "2"], "--n-mix does not apply to --method dim"),
])
def test_dim_option_errors(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        _run(tmp_path / "run", *argv)


def test_evaluate_probes_the_three_dim_representations(tmp_path):
    _run(tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "2")
    ck = str(tmp_path / "run" / checkpoint.CHECKPOINT)
    res = evaluate.evaluate(ck)
    assert res["method"] == "dim" and set(res["layers"]) == {"conv", "fc", "y"}
    assert res["layers"]["y"]["feature_dim"] == 16 and res["layer"] == "conv"
    only_y = evaluate.evaluate(ck, "random", layers=["y"])
    assert set(only_y["layers"]) == {"y"}
    with pytest.raises(ValueError, match="--layer .r1.: not a representation of this model .it has conv, fc, y"):
        evaluate.evaluate(ck, layers=["r1"])


def test_epoch_line_shows_the_mi_terms_and_the_prior_losses_as_epoch_means(tmp_path, capsys):
    """DIM's epoch line reports the MI estimates and the prior game's two losses apart, each the mean
    over the epoch's steps (the metrics hold every step with --log-every 1), not their weighted sum."""
    summary, _ = _run(tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "3", "--dim-preset", "G",
                      "--beta", "1")
    out = capsys.readouterr().out
    with open(tmp_path / "run" / METRICS) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if r["kind"] == "train"]
    epoch = next(r for r in records if r["kind"] == "epoch")
    assert len(steps) == 3
    for k in ("mi_global", "mi_local", "prior_disc", "prior_gen", "prior_gp", "loss"):
        assert epoch["mean"][k] == pytest.approx(np.mean([r[k] for r in steps]), rel=1e-6), k
    line = next(ln for ln in out.splitlines() if ln.startswith("epoch 1/1 |"))
    m = epoch["mean"]
    assert (f"global MI {m['mi_global']:.4f}; local MI {m['mi_local']:.4f}; prior: discriminator loss "
            f"{m['prior_disc']:.4f}, encoder's generator loss {m['prior_gen']:.4f}") in line
    assert "mean loss" not in line
