"""Two gloo processes on 127.0.0.1 train exactly like one process on the same global batch:
targets gathered with their gradient, BatchNorm over the global batch, pos_idx offset by rank."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amdim.data import augment
from amdim.distributed import convert_batchnorm
from amdim.amdim_model import AMDIM
from amdim.amdim_objective import MultiscaleNCE, nce_fn, parse_costs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_B = 8


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_and_grads(rank, world, backend):
    """Loss of the global batch and encoder gradients, computed on this rank's share of it."""
    torch.manual_seed(0)
    model = AMDIM(32, ndf=4, n_rkhs=16, n_depth=1, use_bn=True, n_classes=0)
    images = torch.randint(0, 256, (GLOBAL_B, 3, 32, 32), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    local = GLOBAL_B // world
    x1, x2 = augment.views(images[rank * local:(rank + 1) * local], augment.POLICIES["amdim-cifar"], 32,
                           torch.Generator().manual_seed(2), rank, world)
    net = model
    if world > 1:
        convert_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(model)
    (f1, f2), _ = net(x1, x2)
    objective = MultiscaleNCE(nce_fn(backend, 20.0, 0.05), parse_costs("1t5,1t7,5t5,5t7"))
    loss, _ = objective(f1, f2, torch.Generator().manual_seed(3))
    loss.backward()
    loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world, port, backend, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _loss_and_grads(rank, world, backend)
        torch.save(result, f"{out}.{rank}")
        dist.barrier()   # leave together: gloo torn down under a peer's collective can abort
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_two_processes_equal_one_process(tmp_path, backend):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, _free_port(), backend, out), nprocs=2, join=True)
    ref_loss, ref_grads = _loss_and_grads(0, 1, backend)
    # fp32 reductions run in a different order (split batch, all-reduced BatchNorm sums), so the
    # absolute tolerance scales with the largest gradient (the zero-initialised 1x1 convs' gradients
    # are sums of terms of that size that cancel to far smaller values); a missing cross-rank term is
    # O(1) off
    atol = 5e-5 * max(float(g.abs().max()) for g in ref_grads.values())
    for rank in range(2):
        loss, grads = torch.load(f"{out}.{rank}")
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert torch.allclose(g, ref_grads[name], rtol=1e-3, atol=atol), name
    # the comparison covers every parameter that has a gradient at initialisation: all but the
    # first layer of each residual branch, whose output meets the zero-initialised conv2
    nonzero = {n for n, g in ref_grads.items() if bool(g.abs().max() > 0)}
    assert nonzero == {n for n in ref_grads if ".conv1." not in n and ".bn1." not in n}


def test_torchrun_two_processes_match_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m amdim.train` logs the same losses as one process."""
    common = ["-m", "amdim.train", "--ndf", "4", "--n-rkhs", "16", "--batch-size", "32", "--epochs", "1",
              "--steps-per-epoch", "2", "--log-every", "1", "--no-eval"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *common, "--out-dir", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                          *common, "--out-dir", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]

    def losses(d):
        with open(tmp_path / d / "metrics.jsonl") as f:
            return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]
    l1, l2 = losses("one"), losses("two")
    assert len(l1) == len(l2) == 2
    assert l1 == pytest.approx(l2, rel=1e-4)   # step 2 also checks the first update's gradients


def _train_worker(rank, world, port, argvs, out, patch_code):
    """train.run on rank `rank` of `world` gloo processes with its own command line; writes "ok" or
    the SystemExit message to out.<rank>."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from amdim import agreement, train
    if patch_code and rank == 1:   # as if this node ran another checkout
        agreement.code_digest = lambda: "another version"
    try:
        train.run(train.build_parser().parse_args(argvs[rank]))
        message = "ok"
    except SystemExit as e:
        message = str(e)
    with open(f"{out}.{rank}", "w") as f:
        f.write(message)


def _spawn_train(tmp_path, argvs, patch_code=False):
    out = str(tmp_path / "message")
    mp.spawn(_train_worker, args=(2, _free_port(), argvs, out, patch_code), nprocs=2, join=True)
    return [open(f"{out}.{rank}").read() for rank in range(2)]


TRAIN_TINY = ["--ndf", "4", "--n-rkhs", "16", "--steps-per-epoch", "1", "--no-eval", "--no-progress"]


def test_ranks_started_with_different_options_stop_naming_them(tmp_path):
    """A per-node typo (--epochs 1 on one rank and 2 on the other would hang both until the collective
    timeout; --batch-size would abort inside gloo; --lr would train each rank to other weights;
    --log-every decides when rank 0 writes a record, which every rank waits on) stops every rank
    before set-up, each naming the options and the code that differ."""
    out = ["--out-dir", str(tmp_path / "run")]
    argvs = [TRAIN_TINY + out + ["--epochs", "1", "--batch-size", "32", "--lr", "1e-3", "--log-every", "1"],
             TRAIN_TINY + out + ["--epochs", "2", "--batch-size", "16", "--lr", "2e-3", "--log-every", "2"]]
    messages = _spawn_train(tmp_path, argvs, patch_code=True)
    assert messages[0] == messages[1]
    for part in ["--batch-size (rank 0: 32, rank 1: 16)", "--epochs (rank 0: 1, rank 1: 2)",
                 "--lr (rank 0: 0.001, rank 1: 0.002)", "--log-every (rank 0: 1, rank 1: 2)",
                 "the code (amdim, amdim_kernels, torch)"]:
        assert part in messages[0], messages[0]
    assert messages[0].startswith("error: the 2 processes must be started with the same options")
    assert not (tmp_path / "run").exists()                  # stopped before anything was created


def test_ranks_reading_different_data_stop_before_training(tmp_path):
    """Per-node --data-path may differ (another mount point), but not what it holds."""
    pytest.importorskip("PIL.Image")
    from test_amdim_data import _folder
    for d in ("a", "b"):
        _folder(tmp_path / d, per_class=10)
    (tmp_path / "b" / "cat" / "3.png").write_bytes((tmp_path / "b" / "dog" / "3.png").read_bytes())
    common = TRAIN_TINY + ["--dataset", "folder", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
                           "--out-dir", str(tmp_path / "run")]
    messages = _spawn_train(tmp_path, [common + ["--data-path", str(tmp_path / d)] for d in ("a", "b")])
    assert messages[0] == messages[1]
    assert messages[0].startswith("error: the 2 processes must read the same data and checkpoint, but they "
                                  "differ in: the training data (rank 0: "), messages[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_ranks_may_resume_from_per_node_copies_of_the_checkpoint(tmp_path):
    """Only rank 0 writes --out-dir, so only it checks whether --resume continues the run there: a rank
    whose --resume is its node's copy of that checkpoint was refused ("already holds a run")."""
    from amdim import checkpoint, train
    run = tmp_path / "run"
    train.run(train.build_parser().parse_args(TRAIN_TINY + ["--out-dir", str(run), "--epochs", "1"]))
    ck = run / checkpoint.CHECKPOINT
    copy = tmp_path / "node1" / "copy.pt"
    copy.parent.mkdir()
    copy.write_bytes(ck.read_bytes())
    common = TRAIN_TINY + ["--out-dir", str(run), "--epochs", "2"]
    assert _spawn_train(tmp_path, [common + ["--resume", str(ck)], common + ["--resume", str(copy)]]) == ["ok", "ok"]
    assert checkpoint.load(str(ck))["epoch"] == 2


def test_the_code_digest_covers_the_cpp_sources(tmp_path, monkeypatch):
    """Nodes whose C++ kernels differ compute different things: csrc/ is part of the code compared."""
    import shutil

    from amdim import agreement
    from amdim_kernels import _extension
    src = tmp_path / "csrc"
    shutil.copytree(_extension.source_dir(), src)
    monkeypatch.setattr(_extension, "source_dir", lambda: str(src))
    before = agreement.code_digest()
    with open(src / "nce.cpp", "a") as f:
        f.write("// another build\n")
    assert agreement.code_digest() != before
