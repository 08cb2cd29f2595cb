"""amdim.train under failure: a full disk, an option the loss rejects, a damaged metrics file, a
replacement that never finishes, an out dir the user made, a lock raced for, a missing package, a
dataset that changed. In each case the last good checkpoint survives, nothing is left that a later
command misreads, and the message names what to do."""
import errno
import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from amdim import checkpoint, metrics, run_dir, train
from amdim.metrics import METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--ndf", "4", "--n-rkhs", "16", "--n-depth", "1", "--batch-size", "32", "--no-eval",
        "--log-every", "1", "--no-progress"]


def _run(out, *extra):
    return train.run(train.build_parser().parse_args(TINY + ["--out-dir", str(out), *extra]))


def _cli(argv, file_size_limit=None, cwd=ROOT):
    """python -m amdim.train in a subprocess; file_size_limit: RLIMIT_FSIZE in bytes, so that a write
    past it fails with EFBIG as a full disk fails with ENOSPC (Python ignores SIGXFSZ)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "amdim.train", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit if file_size_limit else None)


def _lines(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n"), "a torn last line"
    return [json.loads(line) for line in data.decode().splitlines()]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished 1-epoch run (2 steps): (out dir, checkpoint bytes, metrics bytes)."""
    out = tmp_path_factory.mktemp("one") / "run"
    _run(out, "--epochs", "1", "--steps-per-epoch", "2")
    return out, (out / checkpoint.CHECKPOINT).read_bytes(), (out / METRICS).read_bytes()


def _copy_run(one_epoch, dest):
    out, ck, metrics = one_epoch
    dest.mkdir(parents=True)
    (dest / checkpoint.CHECKPOINT).write_bytes(ck)
    (dest / METRICS).write_bytes(metrics)
    return dest


# -- a full disk ----------------------------------------------------------------------------------

def test_a_full_disk_while_saving_a_checkpoint_exits_4_and_keeps_the_last_one(one_epoch, tmp_path):
    """torch.save reports a failed write as RuntimeError ("unexpected pos"): the trainer still exits
    with EXIT_IO, names the OS error, keeps the last checkpoint and leaves no temporary; the command it
    prints then continues the run."""
    out = _copy_run(one_epoch, tmp_path / "run")
    ck = out / checkpoint.CHECKPOINT
    args = TINY + ["--out-dir", str(out), "--epochs", "2", "--steps-per-epoch", "2", "--resume", str(ck)]
    full = _cli(args, file_size_limit=len(one_epoch[1]) // 2)
    assert full.returncode == train.EXIT_IO, full.stderr[-3000:]
    assert "cannot write the checkpoint" in full.stderr and "File too large" in full.stderr
    assert "Traceback" not in full.stderr
    assert ck.read_bytes() == one_epoch[1] and not list(out.glob("*.tmp*"))
    assert [r["global_step"] for r in _lines(out / METRICS) if r["kind"] == "train"] == [1, 2, 3, 4]
    # the printed command continues from the kept checkpoint; the records of the lost epoch are redone once
    cmd = full.stderr[full.stderr.index("continue with: python -m amdim.train "):].splitlines()[0]
    import shlex
    argv = shlex.split(cmd[len("continue with: "):])[3:]
    train.run(train.build_parser().parse_args(argv))
    assert [r["global_step"] for r in _lines(out / METRICS) if r["kind"] == "train"] == [1, 2, 3, 4]
    assert checkpoint.load(str(ck))["epoch"] == 2


def test_a_full_disk_while_setting_up_the_run_files_exits_4_and_puts_the_replaced_run_back(one_epoch, tmp_path,
                                                                                            monkeypatch, capsys):
    """An OSError in begin() opening the metrics, after an --overwrite run was set aside, stops with
    EXIT_IO like a full disk mid-run, names the error and the command to run again, and trains
    nothing; the replaced run comes back whole. Through main() the exit code is 4. (A set-aside that
    fails: test_a_set_aside_that_fails_midway_puts_the_files_back.)"""
    out = _copy_run(one_epoch, tmp_path / "run")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "tb"))
    real = metrics.MetricsLog
    monkeypatch.setattr(train, "MetricsLog", lambda out_dir, enabled: full() if enabled else real(out_dir, False))
    with pytest.raises(train.Stop) as stop:
        _run(out, "--epochs", "1", "--steps-per-epoch", "2", "--overwrite")
    assert stop.value.code == train.EXIT_IO == 4
    assert "No space left on device" in str(stop.value) and "nothing was trained" in str(stop.value)
    assert "run it again with: python -m amdim.train" in str(stop.value) and "--overwrite" in str(stop.value)
    assert (out / checkpoint.CHECKPOINT).read_bytes() == one_epoch[1]
    assert (out / METRICS).read_bytes() == one_epoch[2]
    assert not (out / run_dir.REPLACED).exists()
    with pytest.raises(SystemExit) as exited:
        train.main(TINY + ["--out-dir", str(out), "--epochs", "1", "--steps-per-epoch", "2", "--overwrite"])
    assert exited.value.code == 4 and "cannot set up the run's files" in capsys.readouterr().err
    assert (out / checkpoint.CHECKPOINT).read_bytes() == one_epoch[1]


def test_a_metrics_file_damaged_before_begin_is_a_set_up_error(one_epoch, tmp_path, monkeypatch):
    """A ValueError in begin() (the metrics read back on resume are malformed) stays what it was when
    begin() ran under _collective: `error: ...` (SystemExit), agreed by every rank, no traceback."""
    out = _copy_run(one_epoch, tmp_path / "run")

    def damaged(self, global_step):
        raise ValueError(f"{self.path}: line 2 is not a metrics record")
    monkeypatch.setattr(metrics.MetricsLog, "truncate_after", damaged)
    with pytest.raises(SystemExit, match="error: .*line 2 is not a metrics record"):
        _run(out, "--epochs", "2", "--steps-per-epoch", "2", "--resume", str(out / checkpoint.CHECKPOINT))
    assert (out / checkpoint.CHECKPOINT).read_bytes() == one_epoch[1]


def test_a_full_disk_while_writing_metrics_leaves_whole_lines(tmp_path):
    """The disk fills mid-line (a short write): the line is cut back, the run stops with EXIT_IO and
    no traceback, and metrics.jsonl holds only whole records."""
    out = tmp_path / "run"
    full = _cli(TINY + ["--out-dir", str(out), "--epochs", "1", "--steps-per-epoch", "20"], file_size_limit=3000)
    assert full.returncode == train.EXIT_IO, full.stderr[-3000:]
    assert "cannot write the metrics file" in full.stderr and "Traceback" not in full.stderr
    records = _lines(out / METRICS)
    assert 1 <= len(records) < 20 and os.path.getsize(out / METRICS) <= 3000
    assert [r["global_step"] for r in records] == list(range(1, len(records) + 1))
    assert "run it again with: python -m amdim.train" in full.stderr and "--overwrite" in full.stderr


def test_append_line_cuts_a_failed_write_back(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    real = os.write

    def half_then_fail(fd, data):
        real(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        metrics.append_line(str(path), b'{"b": 2}\n')
    monkeypatch.undo()
    assert path.read_bytes() == b'{"a": 1}\n'


# -- options the loss rejects, and replacements that do not finish -----------------------------------

@pytest.mark.parametrize("bad, message", [
    (["--tclip", "1e30"], "--tclip 1e.30: tclip must be None or in"),
    (["--reg-weight", "1e39"], "--reg-weight 1e.39: reg_weight must be a finite float"),
    (["--n-mix", "2", "--mix-tau", "1e-9"], "--mix-tau 1e-09: tau must be a float in"),
    (["--n-mix", "2", "--mix-alpha", "1e7"], "--mix-alpha 10000000.0: alpha must be a float in"),
    (["--lr", "1e300", "--warmup-steps", "0"], "--lr 1e.300 gives Adam a first step of 5e.300"),
    (["--lr-decay", "1e300", "--lr-milestones", "1"], "--lr 0.0002 with --lr-decay 1e.300 at 1 milestone"),
    (["--weight-decay", "1e300"], "--weight-decay 1e.300 is beyond float32"),
])
def test_overwrite_with_an_option_the_loss_rejects_keeps_the_old_run(one_epoch, tmp_path, bad, message):
    out = _copy_run(one_epoch, tmp_path / "run")
    with pytest.raises(SystemExit, match=message):
        _run(out, "--epochs", "1", "--steps-per-epoch", "1", "--overwrite", *bad)
    assert (out / checkpoint.CHECKPOINT).read_bytes() == one_epoch[1]
    assert (out / METRICS).read_bytes() == one_epoch[2]


def test_a_replacement_that_stops_before_its_first_checkpoint_restores_the_old_run(one_epoch, tmp_path):
    """--overwrite keeps the replaced run until the new one has a checkpoint: a run that diverges at
    once (or is killed) gives the old run back, TensorBoard logs included."""
    out = _copy_run(one_epoch, tmp_path / "run")
    (out / "tb").mkdir()
    (out / "tb" / "events.old").write_text("old events")
    with pytest.raises(train.Stop) as stop:
        _run(out, "--epochs", "1", "--steps-per-epoch", "2", "--overwrite", "--lr", "1e30", "--warmup-steps", "0")
    assert stop.value.code == train.EXIT_NON_FINITE
    assert (out / checkpoint.CHECKPOINT).read_bytes() == one_epoch[1]
    assert (out / METRICS).read_bytes() == one_epoch[2]
    assert (out / "tb" / "events.old").read_text() == "old events" and not (out / run_dir.REPLACED).exists()


def test_a_replacement_stopped_by_a_signal_in_its_first_epoch_restores_the_old_run(one_epoch, tmp_path,
                                                                                    monkeypatch):
    """Ctrl-C in the first epoch of an --overwrite run: the save at the step boundary would be the new
    run's first checkpoint and delete the replaced run for a few steps of the new one. Nothing is
    saved, the old run comes back, and the message gives the command that starts the new run again."""
    out = _copy_run(one_epoch, tmp_path / "run")
    real = train.make_step

    def make_step(cfg):
        step, calls = real(cfg), []

        def interrupted(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return step(*a, **k)
        return interrupted
    monkeypatch.setattr(train, "make_step", make_step)
    with pytest.raises(train.Stop) as stop:
        _run(out, "--epochs", "1", "--steps-per-epoch", "4", "--overwrite", "--seed", "4")
    assert stop.value.code == 128 + signal.SIGINT
    assert "run it again with: python -m amdim.train" in str(stop.value) and "--overwrite" in str(stop.value)
    assert (out / checkpoint.CHECKPOINT).read_bytes() == one_epoch[1]
    assert (out / METRICS).read_bytes() == one_epoch[2] and not (out / run_dir.REPLACED).exists()


def test_a_replacement_killed_before_its_first_checkpoint_is_undone_by_the_next_run(one_epoch, tmp_path):
    out = _copy_run(one_epoch, tmp_path / "run")
    run_dir.set_aside(str(out), None, True, 0)              # what a killed --overwrite run leaves
    (out / METRICS).write_bytes(b'{"kind": "train", "global_step": 1, "loss": 9.0}\n')
    with pytest.raises(SystemExit, match="already holds a run"):
        _run(out, "--epochs", "1", "--steps-per-epoch", "1")
    assert (out / checkpoint.CHECKPOINT).read_bytes() == one_epoch[1]
    assert (out / METRICS).read_bytes() == one_epoch[2] and not (out / run_dir.REPLACED).exists()


def test_a_finished_replacement_removes_the_old_run(one_epoch, tmp_path):
    out = _copy_run(one_epoch, tmp_path / "run")
    (out / "tb").mkdir()
    (out / "tb" / "events.old").write_text("old events")
    _run(out, "--epochs", "1", "--steps-per-epoch", "1", "--overwrite", "--seed", "4")
    assert checkpoint.load(str(out / checkpoint.CHECKPOINT))["args"]["seed"] == 4
    assert [r["global_step"] for r in _lines(out / METRICS)] == [1, 1]    # this run's step and epoch
    assert not (out / "tb").exists() and not (out / run_dir.REPLACED).exists()


def test_a_replacement_whose_clean_up_fails_keeps_the_new_run(one_epoch, tmp_path, monkeypatch, capsys):
    """A replaced run's file that cannot be removed (an NFS .nfsXXXX file of an open TensorBoard event
    file) leaves .replaced/ behind: the new run, complete, is kept and the leftover named; it was once
    taken for "no checkpoint written" and both runs were deleted."""
    out = _copy_run(one_epoch, tmp_path / "run")
    (out / "tb").mkdir()
    (out / "tb" / "events.old").write_text("old events")
    real = os.unlink

    def stubborn(path, *a, **kw):
        if os.path.basename(path) == "events.old":
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        return real(path, *a, **kw)
    monkeypatch.setattr(os, "unlink", stubborn)
    _run(out, "--epochs", "1", "--steps-per-epoch", "1", "--overwrite", "--seed", "4")
    err = capsys.readouterr().err
    assert checkpoint.load(str(out / checkpoint.CHECKPOINT))["args"]["seed"] == 4
    assert [r["global_step"] for r in _lines(out / METRICS)] == [1, 1]
    assert "restored" not in err and "could not remove" in err and "events.old" in err, err
    monkeypatch.undo()                                      # the next run in the directory finishes it
    _run(out, "--epochs", "2", "--steps-per-epoch", "1", "--seed", "4", "--resume", str(out / checkpoint.CHECKPOINT))
    assert not (out / run_dir.REPLACED).exists() and checkpoint.load(str(out / checkpoint.CHECKPOINT))["epoch"] == 2


@pytest.mark.parametrize("error, stop", [
    # an I/O failure before any step: EXIT_IO, as a full disk later (its message names the file)
    (PermissionError(errno.EPERM, "Operation not permitted"), (train.Stop, "metrics.jsonl: Operation not permitted")),
    (KeyboardInterrupt(), (KeyboardInterrupt, None)),        # Ctrl-C before the signal handlers
])
def test_a_set_aside_that_fails_midway_puts_the_files_back(one_epoch, tmp_path, monkeypatch, error, stop):
    """A file of the old run that cannot be moved (immutable, EPERM), or Ctrl-C, after the checkpoint
    was moved: the run stops and the checkpoint is back in place, not hidden in .replacing/."""
    out = _copy_run(one_epoch, tmp_path / "run")
    real = os.replace

    def stuck(src, dst, *a, **k):
        if str(src).endswith(METRICS) and run_dir.REPLACING in str(dst):
            if isinstance(error, OSError):
                error.filename = str(src)
            raise error
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", stuck)
    with pytest.raises(stop[0], match=stop[1]) as stopped:
        _run(out, "--epochs", "1", "--steps-per-epoch", "1", "--overwrite")
    if stop[0] is train.Stop:
        assert stopped.value.code == train.EXIT_IO and "run it again with: python -m amdim.train" in str(stopped.value)
    assert (out / checkpoint.CHECKPOINT).read_bytes() == one_epoch[1]
    assert (out / METRICS).read_bytes() == one_epoch[2] and not (out / run_dir.REPLACING).exists()


def test_a_set_aside_killed_midway_is_undone_by_the_next_run(one_epoch, tmp_path):
    out = _copy_run(one_epoch, tmp_path / "run")
    (out / run_dir.REPLACING).mkdir()                        # killed after moving one of the files
    os.replace(out / METRICS, out / run_dir.REPLACING / METRICS)
    with pytest.raises(SystemExit, match="already holds a run"):
        _run(out, "--epochs", "1", "--steps-per-epoch", "1")
    assert (out / checkpoint.CHECKPOINT).read_bytes() == one_epoch[1]
    assert (out / METRICS).read_bytes() == one_epoch[2] and not (out / run_dir.REPLACING).exists()


def test_a_restore_killed_midway_is_finished_by_the_next_run(one_epoch, tmp_path):
    """A restore removes what the replacing run wrote, marks that done, then moves the replaced
    files back (the checkpoint last): killed after moving the metrics back, the next run must not
    remove them as the replacing run's."""
    out = _copy_run(one_epoch, tmp_path / "run")
    run_dir.set_aside(str(out), None, True, 0)
    (out / run_dir.REPLACED / run_dir.RESTORING).write_text("")
    os.replace(out / run_dir.REPLACED / METRICS, out / METRICS)
    with pytest.raises(SystemExit, match="already holds a run"):
        _run(out, "--epochs", "1", "--steps-per-epoch", "1")
    assert (out / checkpoint.CHECKPOINT).read_bytes() == one_epoch[1]
    assert (out / METRICS).read_bytes() == one_epoch[2] and not (out / run_dir.REPLACED).exists()


# -- metrics.jsonl read on resume ---------------------------------------------------------------------

@pytest.mark.parametrize("line, why", [
    (b"[1, 2]", "line 2 is a JSON list, not a record"),
    (b'"text"', "line 2 is a JSON str, not a record"),
    (b'{"kind": "train", "global_step": "3"}', "line 2 is not a record of amdim.train .* global_step='3'"),
    (b'{"kind": "train", "global_step": 2.5}', "line 2 is not a record"),
    (b'{"kind": "tr\xff\xfein", "global_step": 1}', "line 2 is not UTF-8 text"),
    (b'{"kind": "train", "global_st', "line 2 is not JSON"),
])
def test_a_malformed_metrics_line_is_named_on_resume(one_epoch, tmp_path, line, why):
    """A bad line that is followed by others (so not a torn last line) stops the resume, naming the
    file and line, before anything is written."""
    out = _copy_run(one_epoch, tmp_path / "run")
    lines = one_epoch[2].splitlines(keepends=True)
    damaged = lines[0] + line + b"\n" + b"".join(lines[1:])
    (out / METRICS).write_bytes(damaged)
    with pytest.raises(SystemExit, match=f"metrics.jsonl' {why}.*edit or remove that line"):
        _run(out, "--epochs", "2", "--steps-per-epoch", "2", "--resume", str(out / checkpoint.CHECKPOINT))
    assert (out / METRICS).read_bytes() == damaged
    assert (out / checkpoint.CHECKPOINT).read_bytes() == one_epoch[1]


@pytest.mark.parametrize("torn", [b'{"kind": "train", "epoch": 2, "st', b'{"kind": "tr\xe2\x82', b"[1, 2"])
def test_a_torn_last_line_is_dropped_on_resume(one_epoch, tmp_path, torn):
    """A last line without its newline that is no record was cut by a crash mid-write: dropped."""
    out = _copy_run(one_epoch, tmp_path / "run")
    (out / METRICS).write_bytes(one_epoch[2] + torn)
    _run(out, "--epochs", "2", "--steps-per-epoch", "2", "--resume", str(out / checkpoint.CHECKPOINT))
    assert [r["global_step"] for r in _lines(out / METRICS) if r["kind"] == "train"] == [1, 2, 3, 4]


# -- the out dir --------------------------------------------------------------------------------------

def test_a_user_created_out_dir_survives_a_failed_setup(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(SystemExit, match="--batch-size 5000 exceeds"):
        _run(mine, "--batch-size", "5000")
    assert mine.is_dir()
    made = tmp_path / "made" / "deeper"                     # what the trainer created goes again
    with pytest.raises(SystemExit, match="--batch-size 5000 exceeds"):
        _run(made, "--batch-size", "5000")
    assert not (tmp_path / "made").exists()


def test_the_lock_file_is_kept(one_epoch):
    """Unlinking it at exit would let a process that opened it earlier lock a deleted file."""
    assert (one_epoch[0] / ".lock").is_file()


def _locked_files():
    """Paths of the files this process holds open (Linux: /proc/self/fd), ' (deleted)' when unlinked."""
    return [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.islink(f"/proc/self/fd/{fd}")]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd")
def test_a_lock_on_a_removed_file_is_taken_again(tmp_path, monkeypatch):
    """Between our open and our flock another process removes the lock file (and a third would
    create a new one): the lock we got is on a deleted file, so it is taken again on the one there."""
    out = tmp_path / "run"
    real = run_dir.fcntl.flock
    calls = []

    def racing(f, op):
        calls.append(op)
        if len(calls) == 1:
            os.remove(f.name)
        return real(f, op)
    monkeypatch.setattr(run_dir.fcntl, "flock", racing)
    run_dir.prepare(str(out), None, False, 0)
    try:
        held = [p for p in _locked_files() if p.startswith(str(out / ".lock"))]
        assert held == [str(out / ".lock")]            # not "... (deleted)"
        other = subprocess.run([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
                                "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(out / ".lock")],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and "BlockingIOError" in other.stderr   # another process is kept out
    finally:
        run_dir.release(str(out))


def test_a_second_run_in_the_same_process_is_refused(tmp_path):
    """Two train.run calls (threads) on one --out-dir: the second took no lock and both trained into
    it. It is refused like another process's run, and leaves the holder's lock alone."""
    import fcntl
    import threading
    out = tmp_path / "run"
    held, done = threading.Event(), threading.Event()

    def holder():   # another thread's run
        run_dir.prepare(str(out), None, False, 0)
        held.set()
        done.wait(60)
        run_dir.release(str(out))
    t = threading.Thread(target=holder)
    t.start()
    try:
        held.wait(60)
        with pytest.raises(SystemExit, match=f"in use by a running amdim.train .pid {os.getpid()}"):
            _run(out, "--epochs", "1", "--steps-per-epoch", "1")
        assert not (out / METRICS).exists()
        with open(out / ".lock") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)      # still held
    finally:
        done.set()
        t.join()


# -- data ---------------------------------------------------------------------------------------------

def test_folder_without_pillow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "0.png").write_bytes(b"an image Pillow would read")
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(SystemExit, match="Pillow, which is not installed: pip install pillow"):
        _run(tmp_path / "run", "--dataset", "folder", "--data-path", str(tmp_path / "imgs"))


def test_resume_after_a_folder_gains_a_class_is_refused(tmp_path):
    pytest.importorskip("PIL.Image")
    from test_amdim_data import _folder
    _folder(tmp_path / "imgs", per_class=10)
    common = ["--dataset", "folder", "--data-path", str(tmp_path / "imgs"), "--image-size", "32",
              "--batch-size", "8"]
    _run(tmp_path / "run", *common, "--epochs", "1")
    _folder(tmp_path / "imgs", classes=("emu",), per_class=10)
    with pytest.raises(SystemExit, match="trained on 2 classes, but --dataset folder now has 3 .its "
                                         "--data-path gained or lost class subfolders"):
        _run(tmp_path / "run", *common, "--epochs", "2", "--resume", str(tmp_path / "run" / checkpoint.CHECKPOINT))


def test_resume_after_the_data_changed_is_refused(tmp_path):
    pytest.importorskip("PIL.Image")
    from test_amdim_data import _folder
    _folder(tmp_path / "imgs", per_class=10)
    common = ["--dataset", "folder", "--data-path", str(tmp_path / "imgs"), "--image-size", "32",
              "--batch-size", "8"]
    _run(tmp_path / "run", *common, "--epochs", "1")
    first = sorted((tmp_path / "imgs" / "cat").glob("*.png"))[0]
    first.write_bytes((tmp_path / "imgs" / "dog" / "1.png").read_bytes())    # same count, new content
    with pytest.raises(SystemExit, match="the training data of --dataset folder .* differ from the checkpoint's"):
        _run(tmp_path / "run", *common, "--epochs", "2", "--resume", str(tmp_path / "run" / checkpoint.CHECKPOINT))
