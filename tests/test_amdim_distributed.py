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
    # non-trivial gradients, so the comparison above has something to compare
    assert any(g.abs().sum() > 0 for g in ref_grads.values())


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
