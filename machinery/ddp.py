"""Several processes under torchrun (DDP): each one's rank and device, the model each trains, what all agree on."""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import MAX_SEED, TinyLLMError

import machinery.device


def setup_distributed(device):
    """(rank, world size, device); (0, 1, device) without torchrun. A GPU process binds its GPU before NCCL starts."""
    rank, world, device, backend = processes_plan(device, os.environ, machinery.device.machine().gpus)
    if backend == "nccl":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif backend:
        dist.init_process_group(backend)
    return rank, world, device


def processes_plan(device, env, gpus):
    """(rank, world size, device, backend or None) of this process under torchrun's variables env, on a machine of
    gpus GPUs: checked before joining, where a wrong count would fail or hang."""
    if "RANK" not in env:
        return 0, 1, device, None
    rank, local_rank, world = (int(env[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "mps" and world > 1:  # Gloo, the only backend there, takes no MPS tensors
        raise TinyLLMError("several processes on a Mac's GPU: torch cannot join them (Gloo takes no MPS "
                           "tensors); give torchrun --device cpu, or train in one process")
    if device.type != "cuda":
        return rank, world, device, "gloo"
    processes = int(env.get("LOCAL_WORLD_SIZE", world))
    if processes > gpus:  # two processes on one GPU: NCCL would fail or hang
        raise TinyLLMError(f"{processes} processes on this machine but {gpus} GPU(s): give torchrun "
                           f"--nproc_per_node={gpus} or less, or --device cpu")
    return rank, world, torch.device(f"cuda:{local_rank}"), "nccl"


def teardown_distributed(world):
    if world > 1:  # leave together: a rank that tears down early can abort the others
        dist.barrier()
        dist.destroy_process_group()


def wrap(model, world, device):
    """The model each rank trains: DDP averages the gradients over the ranks during backward."""
    return model if world == 1 else DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def rank_seed(seed, rank, step):
    """Each rank draws its own batches: a seed of its own, also for a run resumed at step."""
    return (seed + 1000 * rank + 7919 * step) % (MAX_SEED + 1)


def all_ranks_mean(values, world, device):
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def every_rank(value, world):
    """[rank 0's value, rank 1's, ...], on every rank ([value] in one process); every rank must call it."""
    if world == 1:
        return [value]
    dist.all_gather_object(values := [None] * world, value)
    return values


def stop_signal(signum, world, at_progress_line):
    """The signal that stopped the run (0: none), agreed by every rank at progress lines only: no step waits."""
    return 0 if world > 1 and not at_progress_line else max(every_rank(signum or 0, world))
