"""amdim.train end to end on the built-in digits with a tiny encoder: learning, checkpoints,
exact resume, signals, non-finite stops, CLI errors; and amdim.evaluate's linear probe."""
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from amdim import checkpoint, evaluate, metrics, train

TINY = ["--ndf", "4", "--n-rkhs", "16", "--n-depth", "1", "--batch-size", "32", "--no-eval", "--log-every", "1"]


def _run(tmp_path, *extra, name="run"):
    args = train.build_parser().parse_args(TINY + ["--out-dir", str(tmp_path / name), *extra])
    return train.run(args), tmp_path / name


def _train_records(out_dir):
    with open(out_dir / metrics.METRICS) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def test_short_training_lowers_the_nce_loss(tmp_path):
    summary, out = _run(tmp_path, "--epochs", "1", "--steps-per-epoch", "24", "--lr", "2e-3", "--warmup-steps", "0")
    losses = summary["losses"]
    assert len(losses) == 24 and all(np.isfinite(losses))
    # zero-initialised residual branches start the loss at its chance value (scores near 0): it has
    # to fall below it (by about 0.3 in these 24 steps; the step-to-step noise is about 0.1)
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.15
    rec = _train_records(out)
    assert {"1t5", "1t7", "5t5", "lgt_reg", "images_per_s", "cls_acc_lin"} <= set(rec[0])


def test_checkpoint_round_trip_and_exact_resume(tmp_path):
    common = ["--steps-per-epoch", "2", "--seed", "5"]
    full, _ = _run(tmp_path, "--epochs", "3", *common, name="full")
    first, out = _run(tmp_path, "--epochs", "1", *common, name="part")
    assert first["losses"] == full["losses"][:2]
    ck_path = out / checkpoint.CHECKPOINT
    ck = torch.load(ck_path, weights_only=False)
    assert (ck["epoch"], ck["step"]) == (1, 0) and not list(out.glob("*.tmp*"))
    with pytest.raises(SystemExit, match="--ndf 4 .checkpoint. vs 8"):
        _run(tmp_path, "--epochs", "3", *common, "--resume", str(ck_path), "--ndf", "8", name="other")
    rest, _ = _run(tmp_path, "--epochs", "3", *common, "--resume", str(ck_path), name="part")
    assert rest["losses"] == full["losses"][2:]          # bit-identical continuation
    assert len(set(full["losses"])) == 6
    # and so is where it ends: the weights, Adam's state and the RNG states after the last update
    # (which no logged loss sees) equal the uninterrupted run's, bit for bit
    a = torch.load(tmp_path / "full" / checkpoint.CHECKPOINT, weights_only=True)
    b = torch.load(ck_path, weights_only=True)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (3, 6)
    for part in ("model", "optimizer", "rng"):
        assert _bitwise_equal(a[part], b[part]), part


def test_sigint_saves_mid_epoch_and_resume_is_exact(tmp_path):
    common = ["--epochs", "2", "--steps-per-epoch", "4", "--seed", "1"]
    full, _ = _run(tmp_path, *common, name="full")
    # interrupt after the third step; the handler saves at the next step boundary
    orig_write = metrics.MetricsLog.write

    def write(self, record, step):
        orig_write(self, record, step)
        if record["kind"] == "train" and record["global_step"] == 3:
            # a real asynchronous signal from another thread; after join() it is pending, and
            # Python runs the handler in this (main) thread before the next step starts
            sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
            sender.start()
            sender.join()
    metrics.MetricsLog.write = write
    try:
        with pytest.raises(train.Stop) as stop:
            _run(tmp_path, *common, name="cut")
    finally:
        metrics.MetricsLog.write = orig_write
    assert stop.value.code == 128 + signal.SIGINT and "SIGINT" in str(stop.value)
    ck = torch.load(tmp_path / "cut" / checkpoint.CHECKPOINT, weights_only=False)
    assert (ck["epoch"], ck["step"]) == (0, 3)
    rest, _ = _run(tmp_path, *common, "--resume", str(tmp_path / "cut" / checkpoint.CHECKPOINT), name="cut")
    assert rest["losses"] == full["losses"][3:]
    a, b = (torch.load(tmp_path / d / checkpoint.CHECKPOINT, weights_only=True) for d in ("full", "cut"))
    assert all(_bitwise_equal(a[part], b[part]) for part in ("model", "optimizer", "rng"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    _, out = _run(tmp_path, "--epochs", "1", "--steps-per-epoch", "2")
    ck_path = out / checkpoint.CHECKPOINT
    before = ck_path.read_bytes()
    # an absurd learning rate overflows the weights after one step
    with pytest.raises(train.Stop) as stop:
        _run(tmp_path, "--epochs", "2", "--steps-per-epoch", "2", "--lr", "1e30", "--resume", str(ck_path))
    assert stop.value.code == train.EXIT_NON_FINITE
    assert "non-finite" in str(stop.value) and str(ck_path) in str(stop.value)
    assert ck_path.read_bytes() == before


def _bitwise_equal(a, b) -> bool:
    """Nested dicts / lists / tuples of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_bitwise_equal, a, b))
    return a == b


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "amdim.train", *argv], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)


def test_help_documents_every_option():
    parser = train.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
            assert action.option_strings[0] in text


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--lr", "-1"], "--lr: must be a positive finite number"),
    (["--costs", "1t5,9t9"], "costs must be a comma-separated list"),
    (["--dataset", "mnist"], "--dataset: invalid choice"),
    (["--image-size", "48"], "--image-size: invalid choice"),
    (["--loss-backend", "gpu"], "--loss-backend: invalid choice"),
    (["--estimator", "mine"], "--estimator: invalid choice"),
    (["--n-mix", "0"], "--n-mix: must be a positive integer"),
])
def test_cli_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.build_parser().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_errors_name_the_argument(tmp_path):
    bad = _cli("--costs", "1t5,9t9", "--out-dir", str(tmp_path))
    assert bad.returncode == 2 and "--costs" in bad.stderr and "9t9" in bad.stderr
    cases = [
        (["--dataset", "cifar10", "--data-path", str(tmp_path / "none")], "none"),
        (["--dataset", "cifar10"], "needs --data-path"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--batch-size", "5000"], "--batch-size 5000 exceeds"),
        (["--resume", str(tmp_path / "missing.pt")], "--resume"),
        (["--n-mix", "2", "--estimator", "dv"], "--n-mix 2 needs --estimator nce"),
        (["--n-mix", "2", "--costs", "5t5"], "has no 1->5 or 1->7 cost"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            _run(tmp_path, *argv)
        assert message in str(e.value)


def test_linear_probe_separates_informative_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    informative = torch.randn(300, 20, generator=g) + 3 * torch.nn.functional.one_hot(y, 20).float()
    noise = torch.randn(300, 20, generator=g)
    good = evaluate.linear_probe(informative[:200], y[:200], informative[200:], y[200:], 3)
    bad = evaluate.linear_probe(noise[:200], y[:200], noise[200:], y[200:], 3)
    assert good["test_top1"] > 0.85 and bad["test_top1"] < 0.55


def test_evaluate_cli_on_a_checkpoint(tmp_path):
    _, out = _run(tmp_path, "--epochs", "1", "--steps-per-epoch", "1")
    res = evaluate.evaluate(str(out / checkpoint.CHECKPOINT), "trained")
    assert res["n_test"] == 364 and res["feature_dim"] == 16 and 0.0 <= res["test_top1"] <= 1.0
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        evaluate.evaluate(str(tmp_path / "nope.pt"))


def test_progress_falls_back_to_lines_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)          # makes `from tqdm import tqdm` fail
    bar = metrics.Progress(4, "epoch 1/1", True, log_every=2)
    for _ in range(4):
        bar.update(1, {"nce": 7.25, "img/s": 100.0})
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["epoch 1/1 2/4 nce=7.25 img/s=100", "epoch 1/1 4/4 nce=7.25 img/s=100"]


def test_trains_on_stl10_with_unlabeled_images_and_on_a_folder(tmp_path):
    """The non-built-in formats run through the trainer: STL-10 96 px -> 64 px encoder with
    unlabeled rows (label -1) left out of the classifier loss, and a folder of class subfolders."""
    from test_amdim_data import _folder, _stl_dir
    _stl_dir(tmp_path / "stl", n_train=3, n_test=2, n_unl=5)
    summary, out = _run(tmp_path, "--dataset", "stl10", "--data-path", str(tmp_path / "stl"), "--batch-size", "4",
                        "--epochs", "1", name="stl")
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))
    ck = torch.load(out / checkpoint.CHECKPOINT, weights_only=False)
    assert ck["arch"]["image_size"] == 64 and ck["model"]["classifiers.linear.weight"].shape == (10, 16)
    _folder(tmp_path / "imgs", per_class=10)
    summary, _ = _run(tmp_path, "--dataset", "folder", "--data-path", str(tmp_path / "imgs"), "--image-size", "32",
                      "--batch-size", "8", "--epochs", "1", name="folder")
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))


def test_amdim_epoch_line_shows_each_cost_as_an_epoch_mean():
    rec = {"epoch": 2, "images_per_s": 512.3, "test_acc_mlp": 0.5, "test_acc_lin": 0.25,
           "mean": {"loss": 20.5, "1t5": 6.0, "1t7": 7.0, "5t5": 7.25, "lgt_reg": 0.25, "cls_mlp": 2.0}}
    assert metrics.epoch_line(rec, 30, "amdim") == (
        "epoch 2/30 | mean loss 20.5000 (1t5 6.0000, 1t7 7.0000, 5t5 7.2500, lgt_reg 0.2500) | 512 img/s | "
        "online classifiers' test accuracy: mlp 0.500, lin 0.250")
