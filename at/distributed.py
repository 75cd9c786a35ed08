"""Multi-process training under torchrun: process group, rank queries and the few collectives the
trainer needs. Every helper is a no-op (or the identity) in a single process, so the training code
has one path.

Launch: `torchrun --nproc_per_node=N -m at.train ...` (one process per GPU; NCCL on GPUs, gloo on
CPU), multi-node with `--nnodes`, `--rdzv_backend=c10d --rdzv_endpoint=HOST:PORT`. The run
directory must be on a filesystem all nodes share (rank 0 writes it, every rank reads last.pt on
resume).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

# A gloo group for decisions made from host values (a signal arrived, a checkpoint is due, a loss
# was not finite): on GPUs it keeps these all-reduces off the device.
_host_group = None


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str) -> torch.device:
    """Join the process group torchrun describes; returns this rank's device.

    device_name: the config's `device` (auto | cpu | cuda | cuda:N). Under torchrun, `auto` and
    `cuda` mean cuda:LOCAL_RANK; gloo is used on the CPU, NCCL on GPUs.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available()):
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device_name} requested but CUDA is not available")
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs "
                               f"visible on this node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Long timeout: rank 0 may evaluate or write a checkpoint while the others wait.
        dist.init_process_group(backend, timeout=timedelta(minutes=60),
                                device_id=device if device.type == "cuda" else None)
    global _host_group
    if _host_group is None and dist.get_backend() != "gloo":
        _host_group = dist.new_group(backend="gloo")
    return device


def shutdown() -> None:
    global _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """In-place sum over ranks (returns the tensor)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """In-place mean over ranks of a list of tensors, as one flat collective."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    for t, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def all_max(value: int) -> int:
    """The largest of the ranks' integers, reduced on the host (no device synchronisation)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group)
    return int(t.item())


def broadcast_buffers(*modules: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, method state) to every rank."""
    if world_size() == 1:
        return
    for module in modules:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def broadcast_object(obj):
    """Rank 0's picklable `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients: each rank's
    loss depends on every rank's contribution (used by the synchronised BatchNorm)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def differentiable_sum(x: Tensor) -> Tensor:
    return _AllReduceSum.apply(x) if world_size() > 1 else x


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
