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


# ------------------------------------------------------------------ rank bookkeeping of a distillation


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def comm_device(device: torch.device, world: int) -> torch.device:
    """Where collectives take their tensors: NCCL needs CUDA tensors; gloo takes CPU ones."""
    return device if world > 1 and backend() == "nccl" else torch.device("cpu")


def class_block(C: int, rank: int, world: int) -> tuple[int, int]:
    """The classes [c0, c1) (positions in `classes`) that rank `rank` of `world` solves and, with
    shard_accumulators, accumulates: contiguous blocks of nearly equal size."""
    return C * rank // world, C * (rank + 1) // world


def all_gather_object(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_if_any(problems: list) -> None:
    """Raises on every rank when any rank has a problem (a str; None for none)."""
    bad = [f"rank {r}: {p}" for r, p in enumerate(problems) if p]
    if bad:
        raise ValueError("; ".join(bad))


def check_ranks_agree(config: dict) -> None:
    """Every rank must distil with the same configuration and model; else fail on every rank."""
    configs = all_gather_object(config)
    differ = sorted({k for c in configs for k in c if c.get(k) != configs[0].get(k)})
    if differ:
        raise ValueError(f"torch.distributed ranks disagree on {differ}: "
                         + "; ".join(f"rank {r}: {[c.get(k) for k in differ]}" for r, c in enumerate(configs))
                         + ". Every rank must call distill with the same model and arguments.")


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether any rank says True (a one-int all-reduce): ranks decide together, e.g. when to save."""
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def step_counts(images: int, due: bool, failed: bool, device: torch.device) -> tuple[list[int], bool, list[int]]:
    """One step of per-rank loaders: every rank's image count in this step (0 once its loader has ended),
    whether any rank wants a checkpoint now, and the ranks whose loader failed (one all-gather of three ints
    per rank), so that a rank that cannot go on stops the others at once instead of at the group's timeout."""
    import torch.distributed as dist

    mine = torch.tensor([int(images), int(due), int(failed)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    rows = torch.stack(every).tolist()
    return [int(r[0]) for r in rows], any(bool(r[1]) for r in rows), [i for i, r in enumerate(rows) if r[2]]


def reduce_class_blocks(sums: tuple, rank: int, world: int, device: torch.device) -> tuple:
    """Replicated accumulators after the stream: block r of the classes of every sum (Tensor[C, ...])
    is summed over the ranks onto rank r (a reduce per block, not an all-reduce of everything).
    Returns this rank's block of each sum."""
    import torch.distributed as dist

    C = sums[0].shape[0]
    for t in sums:
        for r in range(world):
            c0, c1 = class_block(C, r, world)
            part = t[c0:c1]
            buf = part.to(device)  # part itself when already there
            dist.reduce(buf, dst=r, op=dist.ReduceOp.SUM)
            if r == rank and buf is not part:
                part.copy_(buf)
    c0, c1 = class_block(C, rank, world)
    return tuple(t[c0:c1].clone() for t in sums)


def exchange_rows(floats: torch.Tensor, gates: torch.Tensor, counts: list[int], device: torch.device,
                  out_device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sharded accumulators: every rank's per-image rows (floats [m, width], gates [m, N, K], padded to
    the step's largest count m) all-gathered; returns the counts[r] real rows of every rank, in rank order."""
    import torch.distributed as dist

    world = len(counts)
    floats_all = [torch.empty_like(floats, device=device) for _ in range(world)]
    gates_all = [torch.empty_like(gates, device=device) for _ in range(world)]
    dist.all_gather(floats_all, floats.to(device))
    dist.all_gather(gates_all, gates.to(device))
    return (torch.cat([t[:c] for t, c in zip(floats_all, counts)]).to(out_device),
            torch.cat([t[:c] for t, c in zip(gates_all, counts)]).to(out_device))


def sum_rows(tensors: tuple, device: torch.device) -> tuple:
    """All-reduces (sum) each tensor; ranks hold their classes' rows and zeros elsewhere, so the sum is
    the whole. Returns CPU tensors."""
    import torch.distributed as dist

    out = []
    for t in tensors:
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out.append(t.cpu())
    return tuple(out)
