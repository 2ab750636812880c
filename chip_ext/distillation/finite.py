"""NaN/Inf checks of a distillation run without a device sync per batch: each batch's checks are queued
as per-image flags; on a GPU their one summary flag is copied to pinned host memory behind an event and
read one batch later (or before a checkpoint, or at the end)."""
from __future__ import annotations

import torch
from torch import Tensor


class FiniteChecks:
    """The NaN/Inf side of `streaming.Run`: uses its `device`, `_checks` (a list) and `_pending`."""

    def _check_finite(self, t: Tensor, what: str, indices: list[int]) -> None:
        """Queues a NaN/Inf check of t: Tensor[B, ...] (one flag per image, no device sync);
        _raise_nonfinite() tests every queued check with one sync per batch."""
        self._checks.append((~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1), what, indices))

    def _raise_nonfinite(self) -> None:
        """Ends a batch's NaN/Inf checks. On the CPU they are tested now. On a GPU the batch's one flag
        is copied to pinned host memory behind an event and read at the end of the next batch (or at a
        checkpoint, or the end of the stream: `flush_nonfinite`), so the host never waits for the batch it
        has just queued: no device sync per batch."""
        checks, self._checks = self._checks, []
        if not checks:
            return
        if self.device.type != "cuda":
            self._raise_first_bad(checks)
            return
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(torch.stack([bad.any() for bad, _, _ in checks]).any(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        previous, self._pending = self._pending, (flag, event, checks)
        if previous is not None:
            self._read_pending(previous)

    def flush_nonfinite(self) -> None:
        """Reads the last batch's NaN/Inf flag (GPU): before a checkpoint is written and at the end."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._read_pending(pending)

    def _read_pending(self, pending) -> None:
        flag, event, checks = pending
        event.synchronize()  # the batch that made the flag, not the ones queued after it
        if bool(flag):
            self._raise_first_bad(checks)

    @staticmethod
    def _raise_first_bad(checks) -> None:
        if not bool(torch.stack([bad.any() for bad, _, _ in checks]).any()):
            return
        for bad, what, indices in checks:  # the first failing check, in the order they were made
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise FloatingPointError(f"NaN or Inf in {what} for image {indices[i]} (global index "
                                         "in the loader's order); the run stops (a checkpoint holds the sums of "
                                         "the images before it)")
