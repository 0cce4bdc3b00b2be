"""Process-group helpers with one code path for a single process and for torchrun / SLURM.

Every function works without an initialised process group (world size 1), so models and the engine never
branch on "distributed or not".
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False
    device: torch.device = torch.device("cpu")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _env_int(*names: str, default: int = -1) -> int:
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return default


def init_distributed(device: str = "cuda", timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or srun (``SLURM_PROCID``/
    ``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID``; needs ``MASTER_ADDR``, defaults ``MASTER_PORT`` to 20000 + the job
    id modulo 20000) environment variables, else run
    as a single process. Picks NCCL on CUDA and gloo on CPU; sets the CUDA device to the local rank. A collective
    that waits longer than ``timeout_minutes`` (config key ``dist_timeout_minutes``) fails instead of hanging.
    """
    rank = _env_int("RANK", "SLURM_PROCID")
    # SLURM_STEP_NUM_TASKS: the tasks srun started; SLURM_NTASKS alone is the allocation's, also seen by a plain
    # `python Pretrain.py` in the batch script, which would then wait for ranks that never come
    world = _env_int("WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
    if "WORLD_SIZE" not in os.environ and "SLURM_STEP_NUM_TASKS" not in os.environ and _env_int("SLURM_NTASKS") > 1:
        print(f"note: SLURM_NTASKS={os.environ['SLURM_NTASKS']} but this process was not started by srun: running as "
              "one process (launch with `srun python ...` for one rank per task, or with torchrun)")
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"device {device!r} asked for but CUDA is not available: running on the CPU")
    if rank < 0 or world < 1 or (world == 1 and "RANK" not in os.environ):
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return DistInfo(device=dev)
    if "RANK" not in os.environ:  # SLURM: export what env:// initialisation reads
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        # a port of this job's own: two jobs sharing a node must not both take 29500
        os.environ.setdefault("MASTER_PORT", str(20000 + _env_int("SLURM_JOB_ID", default=9500) % 20000))
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("SLURM launch without MASTER_ADDR: export MASTER_ADDR=<first node's hostname> "
                               "(e.g. $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1))")
    if use_cuda:
        dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    dist.barrier()
    return DistInfo(rank=rank, world_size=world, local_rank=local, distributed=True, device=dev)


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


# torch 2.14 renamed all_gather_into_tensor (which now warns at every call: once per step per rank) to
# all_gather_single; older versions have only the former
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order); identity in a single process."""
    world = get_world_size()
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _all_gather_single(out, tensor)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward gives each rank the sum over ranks of the gradient of its slice
    (an all-reduce of the gathered gradient, then this rank's rows: every backend has all-reduce)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = get_rank(), tensor.shape[0]
        return all_gather_no_grad(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather_no_grad` through which gradients flow back to every rank's own rows (summed over the
    ranks that used them); identity in a single process. Every rank must pass the same shape."""
    if get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if get_world_size() == 1:
        return obj
    box: List[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order (a one-element list in a single process)."""
    if get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP without per-step buffer broadcasts (ALBEF's queues are kept identical on every rank by gathering),
    after one broadcast of rank 0's buffers so they start identical (DDP itself then syncs only parameters), with
    gradients as views of the communication buckets (no separate gradient copy)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for buf in module.buffers():
        dist.broadcast(buf, src=0)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
               gradient_as_bucket_view=True)  # gradients live in the all-reduce buckets: one copy fewer
