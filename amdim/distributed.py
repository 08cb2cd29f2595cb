"""Process and device set-up, and the collectives that keep K-process training equal to
1-process training on the global batch.

gather_rows and GlobalBatchNorm use the differentiable collectives of torch.distributed.nn: their backward sends every rank's
gradient contribution back to the rank that owns the input, so with DDP's gradient averaging the
parameter gradients are those of the mean loss over the global batch.
"""
from __future__ import annotations

import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn


def init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; initialise the process group (NCCL on
    GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, local_rank


def leave_together(timeout_s: float = 60.0) -> None:
    """Every rank reaches this, then the process group is destroyed. gloo can abort a process
    ("terminate called without an active exception") when a peer destroys its group while this
    rank's last collective is still completing, which a barrier alone does not exclude (the barrier
    is such a collective). So after the barrier each rank counts itself out in the store and waits,
    outside gloo, until all have; only then is the group torn down. If rank 0's store is gone by the
    time a peer polls it, rank 0 had counted every rank out already."""
    dist.barrier()
    try:
        store = dist.distributed_c10d._get_default_store()
        world = dist.get_world_size()
        deadline = time.monotonic() + timeout_s
        n = store.add("amdim/left", 1)
        while n < world and time.monotonic() < deadline:
            time.sleep(0.01)
            n = store.add("amdim/left", 0)
    except (RuntimeError, AttributeError):   # the store's server has gone, or no such private API
        pass
    dist.destroy_process_group()


def pick_device(spec: str, local_rank: int = 0, option: str = "--device") -> torch.device:
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N; ValueError naming `option` otherwise."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"{option} {spec!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {spec!r} asks for CUDA, which is not available here")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    elif dev.type != "cpu":
        raise ValueError(f"{option} {spec!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return dev


def agree(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any rank: stop decisions must be collective."""
    if world_info()[1] == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def world_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _dist_fn():
    import torch.distributed.nn.functional as dist_fn   # imported lazily: it registers autograd ops
    # torch marks these as deprecated in favour of a private module; they remain the public,
    # differentiable collectives, so silence the per-call warning
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\..* is deprecated",
                            category=FutureWarning)
    return dist_fn


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x over all ranks (rank order), keeping the gradient path to every rank's piece."""
    if world_info()[1] == 1:
        return x
    return torch.cat(_dist_fn().all_gather(x), dim=0)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch.

    torch's SyncBatchNorm refuses CPU modules under DDP; this one all-reduces (count, sum, sum of
    squares) per channel with a differentiable all_reduce, so it works on gloo and NCCL alike.
    Outside training, or in a single process, it is plain BatchNorm.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x):
        if not self.training or world_info()[1] == 1:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        xf = x.float()
        count = torch.full((1,), x.numel() / x.shape[1], device=x.device, dtype=torch.float32)
        stats = torch.cat([xf.sum(dims), xf.square().sum(dims), count])
        stats = _dist_fn().all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.square()).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
                self.num_batches_tracked += 1
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d in module (in place, sharing parameters and buffers)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.load_state_dict(child.state_dict())
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module
