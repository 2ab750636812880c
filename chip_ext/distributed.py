"""Starting torch.distributed for distillation under torchrun (or any launcher that sets the env://
variables MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch


def launched() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group(backend: str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Initialises the default process group from the env:// variables and returns this rank's device.

    backend: "nccl" (one GPU per process: cuda:LOCAL_RANK, made the current device), "gloo" (CPU),
        or None: nccl when CUDA is available, else gloo.
    timeout_s: how long a rank waits for the others, in every collective, before failing.
    The process group lives in a namespace of torchrun's restart attempt: torchrun keeps its
    rendezvous store across worker restarts (--max-restarts), and without a namespace a restarted
    worker reads the dead workers' addresses and cannot connect.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0; got {timeout_s}")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if v not in os.environ]
    if missing:
        raise RuntimeError(f"the env:// variables {missing} are not set: start the processes with torchrun")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None; got {backend!r}")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"chip_ext/attempt{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)
    return device
