"""amdim.train and amdim.evaluate never lose, corrupt or silently misread a run: checksummed and
code-free checkpoints, refusal to overwrite a run, clean resume after a kill, clear errors for
unusable output directories and options."""
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from amdim import checkpoint, evaluate, train
from amdim.metrics import METRICS

TINY = ["--ndf", "4", "--n-rkhs", "16", "--n-depth", "1", "--batch-size", "32", "--no-eval",
        "--log-every", "1", "--no-progress"]


def _run(out, *extra):
    return train.run(train.build_parser().parse_args(TINY + ["--out-dir", str(out), *extra]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 1-epoch run (2 steps) shared by the read-only tests."""
    out = tmp_path_factory.mktemp("trained") / "run"
    _run(out, "--epochs", "1", "--steps-per-epoch", "2")
    return out / checkpoint.CHECKPOINT


def _records(out):
    with open(out / METRICS) as f:
        return [json.loads(line) for line in f]


# -- checkpoints: checksum, no code, clear errors ------------------------------------------------

def _flip_tensor_bytes(path, n=400):
    """Flip n bytes in the middle of the largest tensor stored in a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    # a local zip header is 30 bytes plus the name and the extra field
    name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - n // 2
    for i in range(start, start + n):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_checkpoint_round_trips_with_weights_only(trained):
    ck = torch.load(trained, weights_only=True)          # no pickled objects at all
    assert ck["format"] == checkpoint.FORMAT and len(ck["sha256"]) == 64
    loaded = checkpoint.load(str(trained))
    assert loaded["epoch"] == 1 and loaded["arch"]["image_size"] == 32


def test_corrupted_checkpoint_is_refused_by_resume_and_evaluate(trained, tmp_path):
    bad = tmp_path / "bad" / checkpoint.CHECKPOINT
    bad.parent.mkdir()
    bad.write_bytes(trained.read_bytes())
    _flip_tensor_bytes(bad)
    with pytest.raises(SystemExit, match="corrupted"):
        _run(tmp_path / "bad", "--epochs", "2", "--steps-per-epoch", "2", "--resume", str(bad))
    with pytest.raises(ValueError, match="--checkpoint .* corrupted"):
        evaluate.evaluate(str(bad))


def test_modified_payload_fails_the_checksum(trained, tmp_path):
    ck = torch.load(trained, weights_only=True)
    name = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][name].view(-1)[0] += 1.0                  # a plausible, silent change
    torch.save(ck, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="corrupted"):
        checkpoint.load(str(tmp_path / "edited.pt"))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_of_another_version_is_refused(trained, tmp_path):
    ck = torch.load(trained, weights_only=True)
    ck.pop("sha256")
    ck["version"] = checkpoint.VERSION - 1                # a valid older file, checksum and all
    ck["sha256"] = checkpoint.payload_sha256(ck)
    torch.save(ck, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=f"checkpoint version {checkpoint.VERSION - 1}, this one reads"):
        checkpoint.load(str(tmp_path / "old.pt"))


def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _RunsCode(marker), "args": {}}, f)
    torch.save({"format": checkpoint.FORMAT, "model": _RunsCode(marker)}, tmp_path / "evil_zip.pt")
    for p in (path, tmp_path / "evil_zip.pt"):
        with pytest.raises(ValueError, match="not a readable|not a checkpoint written by amdim.train"):
            evaluate.evaluate(str(p))
        with pytest.raises(SystemExit, match="--resume"):
            _run(tmp_path / "r", "--resume", str(p))
    assert not marker.exists()


def test_evaluate_names_its_option_and_missing_keys(tmp_path):
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="--checkpoint .*not an amdim.train checkpoint"):
        evaluate.evaluate(str(tmp_path / "other.pt"))
    cli = subprocess.run([sys.executable, "-m", "amdim.evaluate", "--checkpoint", str(tmp_path / "other.pt")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0 and "error: --checkpoint" in cli.stderr and "Traceback" not in cli.stderr


# -- the output directory ---------------------------------------------------------------------------

def test_a_run_is_never_overwritten_without_overwrite(trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / checkpoint.CHECKPOINT).write_bytes(trained.read_bytes())
    before = (out / checkpoint.CHECKPOINT).read_bytes()
    with pytest.raises(SystemExit, match="already holds a run.*--resume.*--overwrite"):
        _run(out, "--epochs", "1", "--steps-per-epoch", "1")
    assert (out / checkpoint.CHECKPOINT).read_bytes() == before
    _run(out, "--epochs", "1", "--steps-per-epoch", "1", "--overwrite")
    assert [r["global_step"] for r in _records(out) if r["kind"] == "train"] == [1]
    assert (out / checkpoint.CHECKPOINT).read_bytes() != before


def test_resume_after_a_kill_keeps_one_record_per_step_and_no_temporaries(tmp_path):
    out = tmp_path / "run"
    common = ["--steps-per-epoch", "2", "--seed", "3"]
    _run(out, "--epochs", "1", *common)
    # a process killed during epoch 2, after logging a step and mid-save, leaves these behind
    with open(out / METRICS, "a") as f:
        f.write(json.dumps({"kind": "train", "epoch": 2, "step": 0, "global_step": 3, "loss": 1.0}) + "\n")
        f.write('{"kind": "train", "epoch": 2, "st')          # cut mid-line
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f"{checkpoint.CHECKPOINT}.tmp{dead.pid}"
    stale.write_bytes(b"partial")
    _run(out, "--epochs", "2", *common, "--resume", str(out / checkpoint.CHECKPOINT))
    steps = [(r["epoch"], r["step"]) for r in _records(out) if r["kind"] == "train"]
    assert steps == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [r["epoch"] for r in _records(out) if r["kind"] == "epoch"] == [1, 2]
    assert not stale.exists() and not list(out.glob("*.tmp*"))


def test_two_trainers_never_share_an_out_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(out / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write('pid 4242'); f.flush(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match="in use by a running amdim.train .pid 4242"):
            _run(out, "--epochs", "1", "--steps-per-epoch", "1")
    finally:
        holder.kill()
        holder.wait()
    _run(out, "--epochs", "1", "--steps-per-epoch", "1")     # the lock died with its holder


def test_an_unusable_out_dir_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="--out-dir .*not a writable directory"):
        _run(tmp_path / "file" / "run", "--epochs", "1", "--steps-per-epoch", "1")


def test_an_out_dir_that_fails_mid_run_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real_save = checkpoint.save

    def flaky(path, payload):
        calls["n"] += 1
        if calls["n"] == 2:
            raise PermissionError(13, "Permission denied")
        real_save(path, payload)
    monkeypatch.setattr(checkpoint, "save", flaky)
    with pytest.raises(train.Stop) as stop:
        _run(out, "--epochs", "3", "--steps-per-epoch", "1")
    assert stop.value.code == train.EXIT_IO and "Permission denied" in str(stop.value)
    assert checkpoint.load(str(out / checkpoint.CHECKPOINT))["epoch"] == 1


# -- options --------------------------------------------------------------------------------------

def _printed_command(text, prefix="python -m amdim.train "):
    """The command line printed in `text` (the rest of its line from `prefix`, up to a
    parenthesis), split as a shell would."""
    line = text[text.index(prefix):].splitlines()[0].split(" (")[0]
    return shlex.split(line)


def test_resuming_a_finished_run_prints_a_command_that_continues_it(trained, tmp_path, capsys):
    """The hint of a finished run is a whole command: run as printed (from another directory, the
    checkpoint in a path with a space), it trains further."""
    run = tmp_path / "a run"
    run.mkdir()
    shutil.copy(trained, run / checkpoint.CHECKPOINT)
    summary = _run(run, "--epochs", "1", "--steps-per-epoch", "2", "--resume", str(run / checkpoint.CHECKPOINT))
    assert summary["losses"] == []
    err = capsys.readouterr().err
    assert "already trained 1 epoch" in err
    argv = _printed_command(err)
    assert argv[:3] == ["python", "-m", "amdim.train"] and argv[argv.index("--epochs") + 1] == "2"
    summary = train.run(train.build_parser().parse_args(argv[3:]))
    assert len(summary["losses"]) == 2
    assert checkpoint.load(str(run / checkpoint.CHECKPOINT))["epoch"] == 2


def test_resume_accepts_the_default_image_size_spelled_out(tmp_path):
    out = tmp_path / "run"
    _run(out, "--epochs", "1", "--steps-per-epoch", "1")
    summary = _run(out, "--epochs", "2", "--steps-per-epoch", "1", "--image-size", "32",
                   "--resume", str(out / checkpoint.CHECKPOINT))
    assert len(summary["losses"]) == 1


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "1"], "at least 2"),
    (["--alpha", "1"], "--alpha does not apply to --method amdim"),
    (["--method", "dim", "--costs", "1t5"], "--n-rkhs, --n-depth, --costs do not apply to --method dim"),
])
def test_option_errors_are_clear(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        _run(tmp_path / "run", *argv)


def test_evaluate_finds_a_relative_data_path_from_anywhere(tmp_path, monkeypatch):
    from test_amdim_data import _folder
    _folder(tmp_path / "imgs", per_class=6)
    monkeypatch.chdir(tmp_path)
    _run(tmp_path / "run", "--dataset", "folder", "--data-path", "imgs", "--image-size", "32",
         "--batch-size", "8", "--epochs", "1")
    monkeypatch.chdir(tmp_path / "run")
    res = evaluate.evaluate(str(tmp_path / "run" / checkpoint.CHECKPOINT))
    assert res["dataset"] == "folder" and 0 <= res["test_top1"] <= 1


def test_diverged_weights_are_never_saved_or_evaluated(tmp_path, monkeypatch):
    """A step whose update leaves non-finite weights (its loss was finite) stops the run before the
    epoch's evaluation and save: the last good checkpoint stays the previous epoch's."""
    out = tmp_path / "run"
    calls = {"n": 0}
    real = torch.optim.Adam.step

    def blowing_up(self, *a, **k):
        result = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:          # second epoch: the update leaves infinite weights
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result
    monkeypatch.setattr(torch.optim.Adam, "step", blowing_up)
    with pytest.raises(train.Stop) as stop:
        _run(out, "--epochs", "3", "--steps-per-epoch", "1", "--no-eval")
    assert stop.value.code == train.EXIT_NON_FINITE and "weights became non-finite" in str(stop.value)
    assert checkpoint.load(str(out / checkpoint.CHECKPOINT))["epoch"] == 1
    assert [r["epoch"] for r in _records(out) if r["kind"] == "epoch"] == [1]


@pytest.mark.parametrize("change, message", [
    (["--batch-size", "16"], "--batch-size 32 .checkpoint. vs 16"),
    (["--estimator", "jsd"], "--estimator 'nce' .checkpoint. vs 'jsd'"),
    (["--seed", "9"], "--seed 0 .checkpoint. vs 9"),
    (["--method", "dim"], "holds a --method amdim model"),
])
def test_resume_refuses_options_that_break_an_exact_continuation(trained, tmp_path, change, message):
    args = ["--epochs", "2", "--steps-per-epoch", "2", "--resume", str(trained)] + change
    if change[0] == "--method":   # DIM rejects AMDIM's width options: give it its own
        args = ["--method", "dim", "--ndf", "4", "--mi-units", "32", "--batch-size", "32", "--out-dir", str(tmp_path / "d"),
                "--epochs", "2", "--resume", str(trained)]
        with pytest.raises(SystemExit, match=message):
            train.run(train.build_parser().parse_args(args))
        return
    with pytest.raises(SystemExit, match=message):
        _run(tmp_path / "other", *args)


def test_overwrite_with_a_resume_from_elsewhere_starts_clean_metrics(trained, tmp_path):
    out = tmp_path / "b"
    _run(out, "--epochs", "1", "--steps-per-epoch", "1", "--seed", "5")     # another run in b
    _run(out, "--epochs", "2", "--steps-per-epoch", "2", "--resume", str(trained), "--overwrite")
    steps = [r["global_step"] for r in _records(out) if r["kind"] == "train"]
    assert steps == [3, 4]                                                  # only the continuation


def test_resume_takes_this_runs_optimiser_settings(trained, tmp_path):
    """The optimiser's settings may change on resume: the restored Adam uses the new ones."""
    from amdim import run_dir
    from amdim.config import resolve
    args = train.build_parser().parse_args(TINY + ["--out-dir", str(tmp_path / "o"), "--epochs", "2",
                                                   "--steps-per-epoch", "2", "--resume", str(trained),
                                                   "--betas", "0.9,0.99", "--weight-decay", "0.001"])
    cfg = resolve(train.given_options(args))
    try:
        run = train.setup(cfg, 0, 1, 0)
    finally:
        run_dir.release(cfg.run.out_dir)
    group = run.optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"]) == ((0.9, 0.99), 0.001) and run.start_epoch == 1
