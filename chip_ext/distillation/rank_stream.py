"""The pass over the images when every rank has its own loader (a DataLoader over `batches.RankSlice`):
rank r reads, decodes and copies only its images, and its local image j is the global image r + j·world,
which keys its gates as with one loader shared by all ranks. `streaming.Run` inherits `RankLoaderRun`.

Where the ranks must act together (class-sharded sums exchanged per chunk, checkpoints written at one
position), each step begins with one all-gather of every rank's image count: a rank whose loader has ended
takes part with 0 until every rank's has, a rank whose loader failed says so there (the others stop at once),
and the checkpoint key is the global count of images consumed.
"""
from __future__ import annotations

import time

from torch import Tensor

from . import distributed


class RankLoaderRun:
    """The per-rank-loader side of `streaming.Run` (uses its process, process_sharded, save and flushes)."""

    per_rank = False  # the loader is this rank's RankSlice (set by distill)
    local_position = 0  # images consumed from this rank's own loader
    local_images: int | None = None  # len(RankSlice): this rank's share

    def stream_per_rank(self, loader, progress, checkpoint, checkpoint_every: float, max_images: int | None) -> None:
        from tqdm.auto import tqdm

        share = None if max_images is None else len(range(self.rank, max_images, self.world))  # global index < max
        total = self.local_images if share is None else min(share, self.local_images or share)
        together = self.shard or checkpoint is not None  # every step taken by all ranks at once
        bar = tqdm(total=total, initial=min(self.local_position, total or self.local_position), unit="img",
                   desc=f"distill {','.join(s.name for s in self.states)} (rank {self.rank}'s share)",
                   disable=not progress, dynamic_ncols=True)
        batches = self._local_batches(loader, share, checkpoint)
        last_save = time.monotonic()
        try:
            while True:
                x, failure = self._next_batch(batches, together)
                n = 0 if x is None else x.shape[0]
                counts, save_now = None, False
                if together:
                    due = checkpoint is not None and time.monotonic() - last_save >= checkpoint_every
                    counts, save_now, failed = distributed.step_counts(n, due, failure is not None, self.comm_device)
                    if failure is not None:
                        raise failure
                    if failed:
                        raise RuntimeError(f"rank(s) {failed} could not read their images (their own error says "
                                           f"why); rank {self.rank} stops with them")
                    if not any(counts):
                        break
                elif x is None:
                    break
                self._local_step(x, counts)
                bar.update(n)
                if save_now and self.position > self.resumed_at:
                    self.save(checkpoint)
                    last_save = time.monotonic()
            self.flush_gram()
            self.flush_nonfinite()
        finally:
            bar.close()

    @staticmethod
    def _next_batch(batches, together: bool) -> tuple[Tensor | None, Exception | None]:
        """The next batch (None at the end); when the ranks act together, an error reading it is returned, to
        be told to the other ranks in the step's collective before it is raised."""
        try:
            return next(batches, None), None
        except Exception as err:  # noqa: BLE001  (raised again by the caller, after the other ranks know)
            if not together:
                raise
            return None, err

    def _local_batches(self, loader, share: int | None, checkpoint):
        """This rank's images from its loader, batch by batch: those already in the sums (resume) skipped,
        none past `share` images. ValueError when the loader ends before the checkpoint's position."""
        skip, taken = self.local_position, self.local_position
        first = True
        for x in self.images(loader, ahead=True):  # on a GPU, each batch copied one batch ahead
            if share is not None and taken >= share:
                return
            if first:
                self._check_first_image(x, checkpoint)
                first = False
            if skip >= x.shape[0]:
                skip -= x.shape[0]
                continue
            x, skip = x[skip:], 0
            if share is not None:
                x = x[:share - taken]
            taken += x.shape[0]
            yield x
        if skip > 0:
            raise ValueError(f"rank {self.rank}'s loader ended after {self.local_position - skip} images, but "
                             f"checkpoint {checkpoint} holds {self.local_position} of them: another (shorter) "
                             "loader? Resume with the same loaders, or pass another checkpoint path")

    def _local_step(self, x: Tensor | None, counts: list[int] | None) -> None:
        """Adds this step's images x (None: this rank has none left) to the sums; counts: every rank's
        image count in the step (None when the ranks do not act together)."""
        n = 0 if x is None else x.shape[0]
        size = self.batch_size or max(counts or [n])
        if self.shard:  # every rank takes part in every chunk, with its images or none
            for c0 in range(0, max(counts), size):
                piece = x[c0:c0 + size] if x is not None and c0 < n else None
                chunk_counts = [min(max(c - c0, 0), size) for c in counts]
                self.process_sharded(piece, self._global_indices(c0, 0 if piece is None else piece.shape[0]),
                                     chunk_counts)
        else:
            for c0 in range(0, n, size):
                piece = x[c0:c0 + size]
                self.process(piece, self._global_indices(c0, piece.shape[0]))
        self.local_position += n
        self.seen += n
        self.position += n if counts is None else sum(counts)  # the global count when the ranks act together

    def _global_indices(self, offset: int, n: int) -> list[int]:
        """Global indices of this step's local images offset .. offset+n-1 (gates are keyed by them)."""
        j0 = self.local_position + offset
        return [self.rank + (j0 + i) * self.world for i in range(n)]
