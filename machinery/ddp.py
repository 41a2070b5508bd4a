"""Several processes under torchrun (DDP): each one's rank and device, what they all agree on."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import TinyLLMError
from machinery import devices


@dataclass
class Process:
    """This process: its rank of world (0 of 1 without torchrun) and its device."""

    rank: int
    world: int
    device: torch.device

    def leave_together(self):
        """Every rank waits here: torchrun ends them all once one exits, rank 0 saving or not."""
        if self.world > 1:
            dist.barrier()

    def wrap(self, model):
        """DDP averages the gradients over the ranks during backward."""
        if self.world == 1:
            return model
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def mean(self, values):
        """The ranks' mean of each of values, the same on every rank."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def every_rank(self, value):
        """[rank 0's value, rank 1's, ...] on every rank; every rank must call it."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def check(device):
    """Refuse, before anything is written, processes under torchrun that cannot work here."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "mps" and world > 1:  # Gloo, the only backend there, takes no MPS tensors
        raise TinyLLMError(
            "torch cannot join several processes on a Mac's GPU; give torchrun --device cpu"
        )
    gpus, processes = devices.machine().gpus, int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.type == "cuda" and processes > gpus:  # two processes on one GPU: NCCL would hang
        raise TinyLLMError(
            f"{processes} processes on this machine but {gpus} GPU(s): give "
            f"torchrun --nproc_per_node={gpus} or less, or --device cpu"
        )


def setup(device):
    """This Process, in its group under torchrun (check(device) passed). A process joins its group
    once, however many runs it trains (tools.ablation)."""
    if "RANK" not in os.environ:
        return Process(0, 1, device)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type != "cuda":
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return Process(rank, world, device)
    device = torch.device(f"cuda:{local_rank}")
    torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=device)
    return Process(rank, world, device)
