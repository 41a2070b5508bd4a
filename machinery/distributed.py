"""Several processes under torchrun (DDP: Gloo on CPUs, NCCL on GPUs), which sets RANK, LOCAL_RANK and
WORLD_SIZE for each. Without torchrun every function here is a no-op for one process."""

import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import MAX_SEED, TinyLLMError

from machinery import hardware


def setup_distributed(device):
    """(rank, world size, device); (0, 1, device) without torchrun. Each GPU process binds its own GPU at
    init, so NCCL knows its device from the start."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "mps" and world > 1:  # Gloo, the only backend there, takes no MPS tensors
        raise TinyLLMError("several processes on a Mac's GPU: torch cannot join them (Gloo takes no MPS "
                           "tensors); give torchrun --device cpu, or train in one process")
    if device.type == "cuda":
        processes, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world)), hardware.gpu_count()
        if processes > gpus:  # two processes on one GPU: NCCL would fail or hang
            raise TinyLLMError(f"{processes} processes on this machine but {gpus} GPU(s): give torchrun "
                               f"--nproc_per_node={gpus} or less, or --device cpu")
        device = torch.device(f"cuda:{local_rank}")
        hardware.use_gpu(device)
        hardware.join_processes("nccl", device_id=device)
    else:
        hardware.join_processes("gloo")
    return rank, world, device


def teardown_distributed(world):
    if world > 1:  # leave together: a rank that tears down early can abort the others
        dist.barrier()
        dist.destroy_process_group()


def wrap(model, world, device):
    """The model each rank trains: DDP averages the gradients over the ranks during backward."""
    if world == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_gradients(model, last_micro_step):
    """Under DDP, all-reduce the gradients only once per step: after the last micro-batch."""
    if last_micro_step or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def rank_seed(seed, rank, step):
    """Each rank draws its own batches: a seed of its own, also for a run resumed at step."""
    return (seed + 1000 * rank + 7919 * step) % (MAX_SEED + 1)


def all_ranks_mean(values, world, device):
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def all_ranks_max(value, world, device):
    if world == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_from_master(obj, world):
    """Rank 0's object (plain Python data) on every rank; the object itself for one process."""
    if world == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
