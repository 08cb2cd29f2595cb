"""amdim.evaluate on a trained checkpoint: the features it probes are the checkpoint's model's
(computed here from the model class and the saved weights), a trained encoder probes clearly
higher than the same architecture at its random initialisation, and the command line that the
trainer prints runs from any directory, prints the result and writes --json."""
import contextlib
import io
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from amdim import checkpoint, evaluate, train
from amdim.amdim_model import AMDIM
from amdim.data import augment, datasets as data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path, the trainer's stderr): a small AMDIM trained for 20 steps on digits, in a
    directory whose name holds a space. (It probes at 0.88 to 0.93 top-1 over training seeds, its
    random initialisation at 0.71.)"""
    out = tmp_path_factory.mktemp("evaluate") / "trained run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train.run(train.build_parser().parse_args([
            "--ndf", "8", "--n-rkhs", "32", "--batch-size", "32", "--epochs", "1", "--steps-per-epoch", "20",
            "--lr", "2e-3", "--warmup-steps", "0", "--no-eval", "--no-progress", "--log-every", "20",
            "--out-dir", str(out)]))
    return out / checkpoint.CHECKPOINT, err.getvalue()


def _probed_features(monkeypatch, *args, **kwargs):
    """(result, the training features evaluate() handed to the linear probe)."""
    seen = {}
    real = evaluate.linear_probe

    def probe(train_x, *rest):
        seen["train_x"] = train_x.clone()
        return real(train_x, *rest)
    monkeypatch.setattr(evaluate, "linear_probe", probe)
    result = evaluate.evaluate(*args, **kwargs)
    monkeypatch.undo()
    return result, seen["train_x"]


def test_the_trained_features_are_the_checkpoints_model(trained, monkeypatch):
    ck_path, _ = trained
    ck = torch.load(ck_path, weights_only=True)
    arch = ck["arch"]
    model = AMDIM(arch["image_size"], arch["ndf"], arch["n_rkhs"], arch["n_depth"], arch["use_bn"], ck["n_classes"])
    model.load_state_dict(ck["model"])
    model.eval()
    ds = data.load(arch["dataset"], None, arch["image_size"])
    x, _ = ds.train_labeled.batch(np.arange(len(ds.train_labeled)))
    views = augment.eval_view(augment.as_float(x, "cpu"), augment.POLICIES[ck["args"]["augment"]], arch["image_size"])
    with torch.no_grad():
        want = model.encoder(model.normalize(views))[0].flatten(1)

    _, got = _probed_features(monkeypatch, str(ck_path), "trained")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _, random = _probed_features(monkeypatch, str(ck_path), "random", seed=3)
    torch.manual_seed(3)
    fresh = AMDIM(arch["image_size"], arch["ndf"], arch["n_rkhs"], arch["n_depth"], arch["use_bn"], ck["n_classes"])
    fresh.load_state_dict({k: v for k, v in ck["model"].items() if k.startswith("normalize.")}, strict=False)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(random, fresh.encoder(fresh.normalize(views))[0].flatten(1), rtol=1e-5, atol=1e-5)
    assert (random - want).abs().max() > 0.1 * want.abs().max()   # the baseline is not the trained model


def test_a_trained_encoder_probes_higher_than_its_random_initialisation(trained):
    ck_path, _ = trained
    trained_top1 = evaluate.evaluate(str(ck_path), "trained")["test_top1"]
    random_top1 = evaluate.evaluate(str(ck_path), "random")["test_top1"]
    assert trained_top1 > random_top1 + 0.08, (trained_top1, random_top1)


def test_the_printed_evaluate_command_runs_from_anywhere(trained, tmp_path):
    """The command printed at the end of training (absolute, shell-quoted: the run's directory holds
    a space) run from another directory: exit 0, the JSON result on stdout and in --json, equal to
    evaluate() called here, and the summary line on stderr."""
    ck_path, err = trained
    line = err[err.index("python -m amdim.evaluate"):].splitlines()[0]
    argv = shlex.split(line)
    assert argv[:4] == ["python", "-m", "amdim.evaluate", "--checkpoint"] and argv[4] == str(ck_path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cli = subprocess.run([sys.executable, *argv[1:], "--json", "result.json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    printed = json.loads(cli.stdout)
    assert json.loads((tmp_path / "result.json").read_text()) == printed
    want = evaluate.evaluate(str(ck_path), "trained")
    assert printed["test_top1"] == want["test_top1"] and printed["layers"].keys() == {"r1"}
    assert f"linear probe (trained, r1): test top-1 = {want['test_top1']:.4f}" in cli.stderr
