"""Several processes under torchrun (DDP): each one's rank and device, what they all agree on."""

from machinery import devices

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import TinyLLMError


@dataclass
class Process:
    """This process: its rank of world (0 of 1 without torchrun) and its device."""

    rank: int
    world: int
    device: torch.device


def setup(device):
    """This Process, in its group under torchrun. A process joins its group once, however many
    runs it trains (tools.ablation)."""
    if "RANK" not in os.environ:
        return Process(0, 1, device)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "mps" and world > 1:  # Gloo, the only backend there, takes no MPS tensors
        raise TinyLLMError(
            "torch cannot join several processes on a Mac's GPU; give torchrun --device cpu"
        )
    if device.type != "cuda":
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return Process(rank, world, device)
    gpus, processes = devices.machine().gpus, int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if processes > gpus:  # two processes on one GPU: NCCL would fail or hang
        raise TinyLLMError(
            f"{processes} processes on this machine but {gpus} GPU(s): give "
            f"torchrun --nproc_per_node={gpus} or less, or --device cpu"
        )
    device = torch.device(f"cuda:{local_rank}")
    torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=device)
    return Process(rank, world, device)


def leave_together(world):
    """Every rank waits here: torchrun ends them all once one exits, rank 0 saving or not."""
    if world > 1:
        dist.barrier()


def wrap(model, world, device):
    """DDP averages the gradients over the ranks during backward."""
    if world == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean(values, world, device):
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def every_rank(value, world):
    """[rank 0's value, rank 1's, ...] on every rank; every rank must call it."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values
