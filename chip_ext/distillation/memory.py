"""Memory planning of a distillation: the per-call budget of gated copies, the suffix's measured peak,
the free memory of a device, and how the (image, perturbation) pairs are cut into suffix calls."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def free_bytes(device: torch.device) -> int | None:
    """Free bytes on the device (a GPU's free memory, the CPU's MemAvailable), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


CPU_MEMORY_BUDGET = 32 << 20  # measured: benchmarks/results/memory_budget-cpu-amd-epyc-2-threads.json


def default_memory_budget(device: torch.device) -> int:
    """Bytes of gated copies and suffix activations per suffix call: on a GPU an eighth of its free
    memory (at least 64 MiB), large batches for the GPU; on the CPU 32 MiB, where fresh large tensors
    cost page faults (EfficientNet-Lite0 blocks.4: 6.4 s at 256 MiB, 3.4 s at 32 MiB, 7.3 s at 2 MiB)."""
    if device.type == "cuda":
        return max(64 << 20, torch.cuda.mem_get_info(device)[0] // 8)
    return CPU_MEMORY_BUDGET


def fmt_bytes(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


class PeakMeter(torch.fx.Interpreter):
    """Runs a traced suffix node by node and keeps the largest (inputs + output) bytes of a node:
    what must be alive at once in a no-grad forward, short of the allocator's own slack."""

    def __init__(self, module):
        super().__init__(module)
        self.peak = 0

    def run_node(self, n):
        out = super().run_node(n)
        size = tensor_bytes(out) + sum(tensor_bytes(self.env[a]) for a in n.all_input_nodes if a in self.env)
        self.peak = max(self.peak, size)
        return out


def tensor_bytes(value) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def suffix_pieces(B: int, N: int, copies: int, start: int = 0) -> list[tuple[int, int, int, int]]:
    """Suffix calls (i0, i1, n0, n1) covering images 0..B-1 x perturbations 0..N-1 from the pair
    `start` (= image * N + perturbation) on, at most `copies` gated copies each: runs of one image's
    perturbations while N copies do not fit, else whole images."""
    pieces = []
    i, n = divmod(start, N)
    if n and i < B:  # finish the image begun
        pieces += [(i, i + 1, m, min(N, m + copies)) for m in range(n, N, copies)]
        i += 1
    if copies >= N:
        per = copies // N
        pieces += [(j, min(B, j + per), 0, N) for j in range(i, B, per)]
    else:
        pieces += [(j, j + 1, m, min(N, m + copies)) for j in range(i, B) for m in range(0, N, copies)]
    return pieces
