"""Rank bookkeeping of a distillation under torch.distributed (`streaming.Run` inherits RankedRun):
sharded accumulators (every rank's per-image statistics all-gathered into this rank's class block) and
the end of the stream (total image count, replicated sums reduced onto their class block's rank)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import distributed
from ..kernels import ops
from .distributed import class_block


class RankedRun:
    """The torch.distributed side of `streaming.Run`: uses its states, classes, stages and statistics."""

    def process_sharded(self, x: Tensor | None, indices: list[int], counts: list[int]) -> None:
        """Sharded accumulators: this rank forwards its images x (None when it has none in this chunk),
        every rank's per-image statistics are all-gathered, and this rank adds all of them to its
        class block. counts[r]: images of rank r in this chunk (every rank calls this per chunk)."""
        if x is not None:
            x = self.to_device(x)
        for s in self.states:
            stats = self._statistics(s, x, indices) if x is not None else None
            if s.acc is None:  # first chunk: ranks without images learn K and C from the others
                facts = distributed.all_gather_object(None if stats is None else (s.shape, self.num_outputs))
                known = [f for f in facts if f is not None]
                if any(f[0][0] != known[0][0][0] or f[1] != known[0][1] for f in known):
                    raise ValueError(f"ranks see different shapes at layer {s.name!r}: (shape, outputs) per "
                                     f"rank {facts}")
                self._set_shape(s, known[0][0])
                self._setup_classes(known[0][1])
                self._allocate(s)
            K, C, N, m = s.shape[0], len(self.classes), self.N, max(counts)
            width = K + N + C + N * C  # a | h | f | g of one image, float32
            with self.stages("exchange"):
                floats = torch.zeros(m, width, dtype=torch.float32, device=self.device)
                gates = torch.zeros(m, N, K, dtype=torch.uint8, device=self.device)
                if stats is not None:
                    a, gate, h, f, g = stats
                    B = a.shape[0]
                    floats[:B] = torch.cat([a, h, f, g.reshape(B, N * C)], dim=1)
                    gates[:B] = gate
                floats, gates = distributed.exchange_rows(floats, gates, counts, self.comm_device, self.device)
            c0, c1 = s.rows
            total = floats.shape[0]
            a, h = floats[:, :K], floats[:, K:K + N]
            f = floats[:, K + N + c0:K + N + c1]
            g = floats[:, K + N + C:].reshape(total, N, C)[..., c0:c1]
            with self.stages("accumulate"):
                ops.gram_accumulate(*s.acc, a.contiguous(), gates, h.contiguous(), f.contiguous(),
                                    g.contiguous())
        self._raise_nonfinite()

    def finish(self) -> None:
        """After the stream under torch.distributed: the total image count, and (replicated
        accumulators) the sums of class block r reduced onto rank r. Fails on every rank when no rank
        saw an image. Ranks that saw no image take the shapes from the others."""
        facts = distributed.all_gather_object({"seen": self.seen, "num_outputs": self.num_outputs,
                                         "layers": {s.name: (s.shape, s.sigma) for s in self.states}})
        total = sum(f["seen"] for f in facts)
        if total == 0:
            raise ValueError("the loader produced no images on any rank")
        donor = next(f for f in facts if f["seen"] > 0)
        if self.num_outputs is None:
            self._setup_classes(donor["num_outputs"])
        C = len(self.classes)
        for s in self.states:
            if s.shape is None:
                s.shape, s.sigma = donor["layers"][s.name]
            self._allocate(s)
            if self.shard:
                continue  # every rank already holds its block's sums over all images
            s.acc = ops.Accumulators(*distributed.reduce_class_blocks(tuple(s.acc), self.rank, self.world,
                                                                     self.comm_device))
            s.rows = class_block(C, self.rank, self.world)
        self.seen = total
