"""The command lines as a user meets them: help text, progress lines, option ranges, signals at the
end of a run, a run from a thread, mixed precision on the CPU, and amdim.evaluate's --json and
--layer, checked before the probe."""
import argparse
import json
import os
import re
import signal
import threading

import pytest
import torch

from amdim import checkpoint, evaluate, train
from amdim.config import resolve

TINY = ["--ndf", "4", "--n-rkhs", "16", "--n-depth", "1", "--batch-size", "32", "--no-eval", "--log-every", "1"]


def _run(out, *extra):
    return train.run(train.build_parser().parse_args(TINY + ["--out-dir", str(out), *extra]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    _run(out, "--epochs", "1", "--steps-per-epoch", "1", "--no-progress")
    return out / checkpoint.CHECKPOINT


# -- help and progress ------------------------------------------------------------------------------

def _option_helps(parser: argparse.ArgumentParser) -> dict:
    """{option: its help as printed (wrapped lines joined)}."""
    return {a.option_strings[0]: " ".join(parser._get_formatter()._split_lines(
        parser._get_formatter()._expand_help(a), 10**6)) for a in parser._actions if a.option_strings and a.help}


@pytest.mark.parametrize("module", [train, evaluate], ids=["train", "evaluate"])
def test_help_names_each_default_once_and_never_none(module):
    parser = module.build_parser()
    for option, text in _option_helps(parser).items():
        assert text.count("(default") <= 1, (option, text)
        assert "(default: None)" not in text and "(default: False)" not in text, (option, text)
    text = parser.format_help()
    assert "(default: None)" not in text and not re.search(r"default: [^)]*\) \(default", text)


def test_no_progress_prints_a_line_every_log_every_steps(tmp_path, capsys):
    _run(tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "5", "--log-every", "2", "--no-progress")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch 1/1 ")]
    assert [ln.split()[2] for ln in lines if "loss=" in ln] == ["2/5", "4/5", "5/5"]
    assert all(re.fullmatch(r"epoch 1/1 \d/5 loss=\S+ img/s=\S+", ln) for ln in lines if "loss=" in ln)


def test_the_progress_bar_is_tqdms_without_no_progress(tmp_path, capsys):
    _run(tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "2", "--log-every", "1")
    captured = capsys.readouterr()
    assert "2/2 [" in captured.err and "loss=" not in captured.out   # the bar, not the plain lines


# -- option ranges ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["-1", str(2**32), "1e3"])
def test_seed_out_of_range_names_seed(seed, capsys):
    with pytest.raises(SystemExit) as e:
        train.build_parser().parse_args(["--seed", seed])
    assert e.value.code == 2 and "--seed: must be an integer in [0, 4294967295]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", "x", "--seed", seed])
    assert e.value.code == 2 and "--seed: must be an integer in [0, 4294967295]" in capsys.readouterr().err


def test_seed_out_of_range_from_python_names_seed(trained):
    with pytest.raises(ValueError, match=r"--seed must be an integer in \[0, 4294967295\]"):
        resolve({"seed": 2**40})
    with pytest.raises(ValueError, match=r"--seed must be an integer in \[0, 4294967295\]"):
        evaluate.evaluate(str(trained), "random", seed=2**70)


# -- signals at the end, and threads ------------------------------------------------------------------

def test_a_signal_during_the_last_evaluation_stops_with_its_exit_code(tmp_path, monkeypatch):
    """SIGTERM while the last epoch's online classifiers are evaluated: the run saves its (complete)
    checkpoint and exits 128 + SIGTERM, as at any other point, instead of exit 0."""
    real = train.evaluate_online
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:    # the last epoch's
            sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
            sender.start()
            sender.join()
        return real(*a, **k)
    monkeypatch.setattr(train, "evaluate_online", interrupted)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train.Stop) as stop:
        train.run(train.build_parser().parse_args([a for a in TINY if a != "--no-eval"] + [
            "--out-dir", str(tmp_path / "run"), "--epochs", "2", "--steps-per-epoch", "1", "--no-progress"]))
    assert stop.value.code == 128 + signal.SIGTERM and "the run is complete" in str(stop.value)
    ck = checkpoint.load(str(tmp_path / "run" / checkpoint.CHECKPOINT))
    assert (ck["epoch"], ck["step"]) == (2, 0)              # the finished run's checkpoint
    assert signal.getsignal(signal.SIGTERM) == handler   # the trainer's handler is gone


def test_a_run_from_another_thread_trains_without_signal_handlers(tmp_path, capsys):
    result = {}

    def target():
        try:
            result["summary"] = _run(tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "2", "--no-progress")
        except BaseException as e:   # noqa: BLE001 (reported below)
            result["error"] = e
    t = threading.Thread(target=target)
    t.start()
    t.join()
    assert "error" not in result, result.get("error")
    assert len(result["summary"]["losses"]) == 2
    assert "outside the main thread: SIGINT / SIGTERM are not caught" in capsys.readouterr().err
    assert checkpoint.load(str(tmp_path / "run" / checkpoint.CHECKPOINT))["epoch"] == 1


def test_the_nothing_to_do_hint_resumes_from_the_checkpoint_given(trained, tmp_path, capsys):
    """--resume of a finished run into a new --out-dir: the printed command to train further names
    that checkpoint (it named the new directory's, which does not exist)."""
    import shlex
    _run(tmp_path / "new", "--epochs", "1", "--steps-per-epoch", "1", "--no-progress", "--resume", str(trained))
    err = capsys.readouterr().err
    cmd = err[err.index("To train further: ") + len("To train further: "):].split(" (any --epochs")[0]
    assert f"--resume {trained}" in cmd
    train.run(train.build_parser().parse_args(shlex.split(cmd)[3:]))
    assert checkpoint.load(str(tmp_path / "new" / checkpoint.CHECKPOINT))["epoch"] == 2


# -- mixed precision on the CPU -----------------------------------------------------------------------

def _conv_output_dtypes(monkeypatch):
    """The dtypes the model's convolutions produce during training."""
    seen = set()
    real = checkpoint.build_model

    def build(arch, n_classes):
        model = real(arch, n_classes)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda mod, i, o: seen.add(o.dtype) if mod.training else None)
        return model
    monkeypatch.setattr(checkpoint, "build_model", build)
    return seen


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("auto", torch.float32), ("none", torch.float32)])
def test_amp_on_the_cpu(tmp_path, monkeypatch, amp, dtype):
    """--amp bf16 runs the model under bf16 autocast on the CPU (the losses in fp32); auto and none
    run in fp32 there."""
    seen = _conv_output_dtypes(monkeypatch)
    summary = _run(tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "2", "--amp", amp, "--device", "cpu",
                   "--no-progress")
    assert seen == {dtype} and all(map(torch.isfinite, torch.tensor(summary["losses"])))


def test_amp_fp16_on_the_cpu_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--amp fp16 needs CUDA .*--amp bf16 or --amp none"):
        _run(tmp_path / "run", "--amp", "fp16", "--device", "cpu")
    assert not (tmp_path / "run").exists()


# -- amdim.evaluate's options ------------------------------------------------------------------------

@pytest.fixture
def no_probe(monkeypatch):
    """amdim.evaluate.evaluate fails the test if it is reached: the check must come first."""
    def probe(*a, **k):
        raise AssertionError("the probe ran before --json was checked")
    monkeypatch.setattr(evaluate, "evaluate", probe)


def test_evaluate_refuses_a_json_path_before_the_probe(trained, tmp_path, no_probe):
    read_only = tmp_path / "ro.json"
    read_only.write_text("{}")
    read_only.chmod(0o444)
    cases = [(tmp_path, "is a directory"), (tmp_path / "missing" / "r.json", "its directory does not exist"),
             (trained, "is the checkpoint itself"), (trained.parent / "metrics.jsonl", "is a file of the run in"),
             (trained.parent / ".lock", "is a file of the run in")]
    if not os.access(read_only, os.W_OK):   # (root writes anyway)
        cases.append((read_only, "exists and is not writable"))
    before = [trained.read_bytes(), (trained.parent / "metrics.jsonl").read_bytes()]
    for path, why in cases:
        with pytest.raises(SystemExit, match=f"error: --json .*{why}"):
            evaluate.main(["--checkpoint", str(trained), "--json", str(path)])
    assert [trained.read_bytes(), (trained.parent / "metrics.jsonl").read_bytes()] == before


def test_evaluate_writes_json_atomically(trained, tmp_path, monkeypatch, capsys):
    """A failed write (a full disk) leaves the previous file whole and no temporary; the result is
    still printed."""
    target = tmp_path / "r.json"
    target.write_text('{"earlier": true}\n')
    real = os.replace

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(evaluate.os, "replace", full_disk)
    with pytest.raises(SystemExit, match="cannot write --json .*No space left on device"):
        evaluate.main(["--checkpoint", str(trained), "--json", str(target)])
    monkeypatch.setattr(evaluate.os, "replace", real)
    assert json.loads(capsys.readouterr().out)["features"] == "trained"
    assert target.read_text() == '{"earlier": true}\n' and os.listdir(tmp_path) == ["r.json"]


def test_evaluate_refuses_an_unknown_layer(trained, monkeypatch):
    real = evaluate.encode
    monkeypatch.setattr(evaluate, "encode", lambda *a: pytest.fail("images encoded before --layer was checked"))
    with pytest.raises(ValueError, match="--layer 'bogus': not a representation of this model .it has r1.$"):
        evaluate.evaluate(str(trained), layers=["r1", "bogus"])
    monkeypatch.setattr(evaluate, "encode", real)
    with pytest.raises(SystemExit, match="--layer 'bogus'"):
        evaluate.main(["--checkpoint", str(trained), "--layer", "r1", "--layer", "bogus"])
    assert list(evaluate.evaluate(str(trained), layers=["r1", "r1"])["layers"]) == ["r1"]
