"""Per-image statistics held back so that `gram_accumulate` adds many images at once: the sums G
(C·K(K+1)/2 float64: 16.8 GB at K=2048, C=1000) are read and written once per call, so once per
`limit` images instead of once per batch."""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import ops

GRAM_IMAGES_MAX = 512  # images per gram_accumulate call at most


def gram_limit(K: int, N: int, C: int, budget: int) -> int:
    """Images to hold before a gram_accumulate call: as many as `budget` bytes of statistics allow
    (a [K], gates [N, K] bool, h [N], f [C], g [N, C] float32 an image), 1 to GRAM_IMAGES_MAX."""
    per_image = 4 * (K + N + C + N * C) + N * K
    return max(1, min(GRAM_IMAGES_MAX, budget // max(1, per_image)))


class GramBuffer:
    """The statistics (a, gates, h, f, g) of one layer's images not yet in its sums."""

    def __init__(self) -> None:
        self.parts: list[tuple[Tensor, ...]] = []
        self.images = 0

    def add(self, acc: ops.Accumulators, stats: tuple[Tensor, ...], limit: int) -> None:
        """Holds one batch's statistics; adds everything held to acc once `limit` images are in."""
        if limit <= 1 and not self.parts:
            ops.gram_accumulate(*acc, *stats)
            return
        self.parts.append(stats)
        self.images += stats[0].shape[0]
        if self.images >= limit:
            self.flush(acc)

    def flush(self, acc: ops.Accumulators) -> None:
        """Adds every held image to acc (before a checkpoint, the end of the stream, the solve)."""
        if not self.parts:
            return
        parts, self.parts, self.images = self.parts, [], 0
        stats = parts[0] if len(parts) == 1 else tuple(torch.cat(t) for t in zip(*parts))
        ops.gram_accumulate(*acc, *stats)
