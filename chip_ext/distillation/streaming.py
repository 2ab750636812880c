"""Streaming a loader into a distillation's sums: for every batch and layer, the prefix once, the
gated copies (`ops.gate_pool`) through the suffix in memory-bounded calls, and the float64 sufficient
statistics (`ops.gram_accumulate`); then the per-class Lasso on them. Checkpoints (`checkpoints.
CheckpointedRun`), torch.distributed ranks (`ranks.RankedRun`) and the NaN/Inf checks read one batch late
(`finite.FiniteChecks`) are the run's other sides; `batches` reads the loader's items; `rank_stream` is
the pass when every rank has its own loader.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..kernels import ops
from . import distributed, memory
from .batches import device_batches, device_normalizer, images_of, loader_images  # noqa: F401  (re-exported)
from .buffer import GramBuffer, gram_limit
from .checkpoints import CheckpointedRun
from .distributed import class_block
from .finite import FiniteChecks
from .gates import default_sigma, proximity, sample_gates
from .memory import PeakMeter, fmt_bytes, suffix_pieces
from .rank_stream import RankLoaderRun
from .ranks import RankedRun
from .solver import solve_sums, solver_report
from .views import dtype_error


class Stages:
    """Wall time per stage; synchronises the GPU at stage ends when profiling."""

    def __init__(self, device: torch.device, sync: bool):
        self.seconds: dict[str, float] = {}
        self.sync = sync and device.type == "cuda"
        self.device = device

    def __call__(self, name: str):
        stages = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if stages.sync:
                    torch.cuda.synchronize(stages.device)
                stages.seconds[name] = stages.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


class LayerState:
    """A layer's prefix/suffix and its float64 accumulators."""

    def __init__(self, name: str, prefix: nn.Module, suffix: nn.Module, fold: bool = True):
        from .fold import find_fold

        self.name, self.prefix, self.suffix = name, prefix, suffix
        # the exact fold of the suffix's head where it applies (chip_ext.fold), and what was decided
        self.fold, self.fold_reason = find_fold(suffix) if fold else (None, "not folded: fold=False")
        if self.fold is None and fold:
            self.fold_reason = "not folded: " + self.fold_reason
        self.acc: ops.Accumulators | None = None
        self.rows: tuple[int, int] | None = None  # the classes [r0, r1) whose sums acc holds
        self.shape: list[int] | None = None  # [K, H, W] of the first batch
        self.sigma: float | None = None
        self.copy_bytes: int | None = None  # memory one gated copy takes through the suffix (estimate)
        self.h_checked = False
        self.gates_checked = 0  # the largest batch whose gates were checked to fit in memory
        self.pending = GramBuffer()  # statistics of images not yet added to acc (buffer.py)
        self.channels_last_ok = False  # the prefix ran on channels_last images once
        self.gram_images: int | None = None  # images per gram_accumulate call (buffer.gram_limit)


class Run(CheckpointedRun, RankedRun, RankLoaderRun, FiniteChecks):
    """The state of one distillation pass: accumulators, position, and the per-batch work.

    With torch.distributed (world > 1), rank r forwards the images whose global index is r mod world.
    Replicated accumulators (default): every rank sums all classes over its images; at the end the
    sums of class block r are reduced onto rank r. Sharded (shard_accumulators): rank r keeps only
    class block r and adds every rank's images to it, their per-image statistics all-gathered.
    Either way rank r solves block r and the blocks are gathered, so every rank returns the same W.
    With per-rank loaders (`batches.RankSlice`), each rank reads only its own images (`rank_stream`).
    """

    def __init__(self, states, config, classes, N, sigma, max_drop, score, seed, device, batch_size,
                 memory_budget, autocast_dtype, stages, rank=0, world=1, shard=False):
        self.rank, self.world, self.shard = rank, world, shard and world > 1
        self.states, self.config, self.N, self.sigma_arg = states, config, N, sigma
        self.max_drop, self.score, self.seed, self.device = max_drop, score, seed, device
        self.batch_size, self.memory_budget = batch_size, memory_budget
        self.autocast_dtype, self.stages = autocast_dtype, stages
        self.class_names_count: int | None = None  # checked against the outputs at the first batch
        self.first_image: str | None = None  # fingerprint of the loader's first image (resume checks it)
        self.max_images: int | None = None
        self.loader_images: int | None = None  # len(loader.dataset) when it has one
        self.recorded: dict = {}  # max_images and loader_images of the run that wrote the checkpoint
        self.classes: list[int] | None = None if classes is None else [int(c) for c in classes]
        self.num_outputs: int | None = None
        self.position = 0  # images consumed from the loader (all ranks together)
        self.seen = 0  # images in this rank's sums; the total over ranks once complete
        self.resumed_at = 0
        self.complete = False
        self.empty_classes: dict[str, list[int]] = {}
        self._class_index: Tensor | None = None
        self._checks: list[tuple[Tensor, str, list[int]]] = []
        self._pending = None  # (pinned flag, event, checks) of the last GPU batch, read one batch late
        self.normalize = None  # device_normalizer(normalize): uint8/[0, 1] images normalised on the device
        self.channels_last = False  # images into the prefix as NHWC (distill's channels_last)
        self.channels_last_note: str | None = None  # why channels_last was switched off during the run
        self.comm_device = distributed.comm_device(device, world)

    # ---------------------------------------------------------------- streaming

    def stream(self, loader, progress, checkpoint, checkpoint_every, max_images) -> None:
        from tqdm.auto import tqdm

        if self.per_rank:  # this rank's own loader (RankSlice)
            return self.stream_per_rank(loader, progress, checkpoint, checkpoint_every, max_images)

        total = self.loader_images
        if max_images is not None:
            total = min(total, max_images) if total is not None else max_images
        bar = tqdm(total=total, initial=min(self.position, total or self.position), unit="img",
                   desc=f"distill {','.join(s.name for s in self.states)}", disable=not progress,
                   dynamic_ncols=True)
        skip = self.position  # images already in the sums (resume)
        position = 0  # images consumed from the loader
        last_save = time.monotonic()
        t_start, imgs_start = time.perf_counter(), self.position
        try:
            first = True
            # one process: each batch copied to a GPU one batch ahead; ranks sharing a loader copy only their images
            for x in self.images(loader, ahead=self.world == 1):  # empty batches hold no image (and take no index)
                if first:
                    self._check_first_image(x, checkpoint)
                    first = False
                B = x.shape[0]
                if skip >= B:
                    skip -= B
                    position += B
                    continue
                x, position, skip = x[skip:], position + skip, 0
                if max_images is not None:
                    x = x[:max(0, max_images - position)]
                step = self.batch_size or x.shape[0]
                for i0 in range(0, x.shape[0], step):
                    chunk = x[i0:i0 + step]
                    n = chunk.shape[0]
                    # with torch.distributed, rank r takes the images whose global index is r mod world
                    mine = [i for i in range(n) if (position + i) % self.world == self.rank]
                    local = chunk if len(mine) == n else chunk[mine]
                    if self.shard:
                        counts = [len(range((r - position) % self.world, n, self.world)) for r in range(self.world)]
                        self.process_sharded(local if mine else None, [position + i for i in mine], counts)
                    elif mine:
                        self.process(local, [position + i for i in mine])
                    position += n
                    self.position = position
                    self.seen += len(mine)
                    bar.update(n)
                    rate = (position - imgs_start) / max(time.perf_counter() - t_start, 1e-9)
                    bar.set_postfix_str(f"{rate * self.N * len(self.states):.0f} perturbed nets/s")
                if checkpoint is not None and self.position > self.resumed_at \
                        and self._time_to_save(last_save, checkpoint_every):
                    self.save(checkpoint)  # reads the last batch's NaN/Inf flag first
                    last_save = time.monotonic()
                if max_images is not None and position >= max_images:
                    break
            self.flush_gram()
            self.flush_nonfinite()
        finally:
            bar.close()
        if skip > 0:
            raise ValueError(f"the loader ended after {position} images, but checkpoint {checkpoint} holds "
                             f"{self.position}: another (shorter) loader? Resume with the same loader, or pass "
                             "another checkpoint path")
        if self.world > 1:
            return  # the emptiness check happens in finish(), on the total over ranks
        if self.seen == 0:
            raise ValueError("the loader produced no images (empty loader, or all of them were "
                             "already in the checkpoint's sums)")

    def images(self, loader, ahead: bool) -> Iterator[Tensor]:
        """The loader's image batches; ahead: on a GPU, each copied there one batch ahead (`device_batches`)."""
        images = loader_images(loader, allow_uint8=self.normalize is not None)
        return device_batches(images, self.device) if ahead else images

    def _check_fits(self, need: int, what: str) -> None:
        """MemoryError before allocating `need` bytes that the device does not have free."""
        free = memory.free_bytes(self.device)
        if free is not None and need > 0.8 * free:
            raise MemoryError(f"{what} need {fmt_bytes(need)}, but only {fmt_bytes(free)} is free on {self.device}: "
                              "pass fewer num_perturbations or a smaller batch_size")

    def _setup_classes(self, num_outputs: int) -> None:
        if self.num_outputs is None:
            self.num_outputs = num_outputs
            if self.classes is None:
                self.classes = list(range(num_outputs))
            bad = [c for c in self.classes if not 0 <= c < num_outputs]
            if bad:
                raise ValueError(f"classes {bad[:10]} are out of range: the model has {num_outputs} outputs")
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("classes has duplicates")
            names = self.class_names_count
            if names is not None and names not in (num_outputs, len(self.classes)):
                raise ValueError(f"class_names must name all {num_outputs} outputs or the {len(self.classes)} "
                                 f"chosen classes; got {names} names")
            self._class_index = torch.tensor(self.classes, device=self.device)
        elif num_outputs != self.num_outputs:
            raise ValueError(f"the model returned {num_outputs} outputs; it returned {self.num_outputs} before")

    def _set_shape(self, s: LayerState, shape: Sequence[int]) -> None:
        K = shape[0]
        if s.shape is not None and s.shape[0] != K:
            raise ValueError(f"layer {s.name!r} now has K={K} channels; it had K={s.shape[0]} "
                             "(in an earlier batch or the checkpoint)")
        if s.shape is None:
            s.shape = list(shape)
        if s.sigma is None:
            given = self.sigma_arg.get(s.name) if isinstance(self.sigma_arg, dict) else self.sigma_arg
            s.sigma = float(given) if given is not None else default_sigma(K)

    def _allocate(self, s: LayerState) -> None:
        """Accumulators of a layer (all classes, or this rank's block when sharded); checks first that
        they fit in the device's free memory."""
        if s.acc is not None:
            return
        C, K = len(self.classes), s.shape[0]
        s.rows = class_block(C, self.rank, self.world) if self.shard else (0, C)
        rows = s.rows[1] - s.rows[0]
        need = ops.accumulator_bytes(rows, K)
        free = memory.free_bytes(self.device)
        if free is not None and need > 0.8 * free:
            hint = ("" if self.shard or self.world == 1 else
                    f" With torch.distributed, shard_accumulators=True keeps 1/{self.world} of them per rank.")
            raise MemoryError(
                f"the float64 accumulators of layer {s.name!r} need {fmt_bytes(need)} for C={rows} classes "
                f"and K={K} channels (C*K(K+1)/2*8 bytes), but only {fmt_bytes(free)} is free on "
                f"{self.device}. Pass fewer classes= or fewer layers.{hint}")
        s.acc = ops.new_accumulators(rows, K, self.device)

    def _suffix_logits(self, s: LayerState, A: Tensor, gates: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of the N gated networks of every image [B, N, C_out], in memory-bounded chunks, and
        the pooled activations a = mean_hw(A) [B, K] (gate_pool's z of the ungated row 0).

        memory_budget bounds the gated copies and the suffix's activations together: the first piece
        of a layer is one copy, run node by node to measure the suffix's peak (`PeakMeter`)."""
        if s.fold is not None:
            return self._folded_logits(s, A, gates)
        B, K, H, W = A.shape
        N = gates.shape[1]
        result: Tensor | None = None
        a = torch.empty(B, K, dtype=torch.float32, device=A.device)
        start = 0  # the first (image, perturbation) pair not yet run, as image * N + perturbation
        if s.copy_bytes is None:
            logits = self._suffix_piece(s, A, gates, a, 0, 1, 0, 1, measure=True)
            self._setup_classes(logits.shape[1])  # classes and names checked before the batch's work
            self._check_fits(B * N * logits.shape[1] * 4 * 3, f"the scores of {B} images x N={N} x "
                             f"{logits.shape[1]} outputs (logits, scores and their float32 copies)")
            result = torch.empty(B, N, logits.shape[1], dtype=torch.float32, device=logits.device)
            result[0, 0] = logits[0].float()
            start = 1
        copies = max(1, self.memory_budget // max(1, s.copy_bytes))
        for i0, i1, n0, n1 in suffix_pieces(B, N, copies, start):
            logits = self._suffix_piece(s, A, gates, a, i0, i1, n0, n1)
            if result is None:
                result = torch.empty(B, N, logits.shape[1], dtype=torch.float32, device=logits.device)
            result[i0:i1, n0:n1] = logits.float().reshape(i1 - i0, n1 - n0, -1)
        return result, a

    def to_device(self, x: Tensor) -> Tensor:
        """The images on the run's device, normalised there when `normalize` was given, channels_last
        when asked (distill's `channels_last`)."""
        x = x.to(self.device, non_blocking=True)
        if self.normalize is not None:
            x = self.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _prefix_without_channels_last(self, s: LayerState, x: Tensor, err: RuntimeError) -> tuple[Tensor, Tensor]:
        """The prefix failed on the first channels_last images: on the loader's format it runs (e.g. the model
        .view()s its input), and the run goes on that way with imp.meta["channels_last"] saying why; or it fails
        again, and that error is the user's."""
        x = x.contiguous()
        try:
            A = s.prefix(x)
        except RuntimeError as again:
            raise dtype_error(s.prefix, x, again, "loader's images") from again
        self.channels_last = False
        self.channels_last_note = f"off: the model failed on channels_last images ({str(err).splitlines()[0][:120]})"
        return x, A

    def _autocast(self):
        """autocast_dtype's autocast on the run's device (prefix and suffix alike), or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _folded_logits(self, s: LayerState, A: Tensor, gates: Tensor) -> tuple[Tensor, Tensor]:
        """`_suffix_logits` through the fold: no gated copies; the head once per image, Q_s d_sn per
        perturbation, the rest of the suffix on [B·N, O]. Images in chunks: Q_s [O, K] and the N
        first-Linear outputs of an image within memory_budget together."""
        B, K = A.shape[:2]
        N = gates.shape[1]
        a = A.mean(dim=(2, 3), dtype=torch.float32)  # mean_hw(A) without a float copy of A
        if s.copy_bytes is None:  # classes and names checked on one network before the batch's work
            self._setup_classes(s.fold.logits(A[:1], gates[:1, :1]).shape[1])
            s.copy_bytes = 0
        O = s.fold.weight.shape[0]
        per_image = (O * K + 3 * N * O) * 4
        step = max(1, self.memory_budget // max(1, per_image))
        pieces = []
        for i0 in range(0, B, step):
            with self.stages("suffix"), self._autocast():
                logits = s.fold.logits(A[i0:i0 + step], gates[i0:i0 + step])
            if not isinstance(logits, Tensor) or logits.dim() != 2:
                shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"the model's output after layer {s.name!r} must be logits [M, C_out]; got {shape}")
            pieces.append(logits.float().reshape(-1, N, logits.shape[-1]))
        return torch.cat(pieces), a

    def _suffix_piece(self, s: LayerState, A: Tensor, gates: Tensor, a: Tensor, i0: int, i1: int, n0: int,
                      n1: int, measure: bool = False) -> Tensor:
        """Logits [(i1-i0)*(n1-n0), C_out] of images i0:i1, perturbations n0:n1; fills a[i0:i1] when
        n0 = 0. measure: run the suffix node by node and set s.copy_bytes (one gated copy + the peak)."""
        with self.stages("gate_pool"):
            gated, z = ops.gate_pool(A[i0:i1], gates[i0:i1, n0:n1])
            if n0 == 0:  # row 0 is the unperturbed network: z = mean_hw(A)
                a[i0:i1] = z[:, 0]
        run = s.suffix
        if measure:
            meter = PeakMeter(s.suffix)
            run = meter.run
        with self.stages("suffix"), self._autocast():
            logits = run(gated)
        if measure:
            s.copy_bytes = A[0].numel() * A.element_size() + meter.peak
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != gated.shape[0]:
            shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"the model's output after layer {s.name!r} must be logits [M, C_out] "
                             f"for M={gated.shape[0]} inputs; got {shape}")
        return logits

    def _statistics(self, s: LayerState, x: Tensor, indices: list[int]):
        """One layer's per-image statistics of the images x: a [B, K], gates [B, N, K] bool,
        h [B, N], f [B, C] and g [B, N, C] over the chosen classes."""
        with self.stages("prefix"), self._autocast():  # the same precision as the suffix
            if self.channels_last_note is not None:  # switched off at another layer of this batch
                x = x.contiguous()
            first_nhwc = self.channels_last and not s.channels_last_ok
            try:  # .forward: an error torch.fx would print a traceback for is ours to handle (channels_last)
                A = s.prefix.forward(x) if first_nhwc else s.prefix(x)
            except RuntimeError as err:
                if not first_nhwc:
                    raise dtype_error(s.prefix, x, err, "loader's images") from err
                x, A = self._prefix_without_channels_last(s, x, err)
            s.channels_last_ok = True
        if not isinstance(A, Tensor) or A.dim() != 4:
            shape = list(A.shape) if isinstance(A, Tensor) else type(A).__name__
            raise ValueError(f"layer {s.name!r} outputs {shape}; CHIP needs a convolutional feature "
                             "map [B, K, H, W]")
        if A.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            A = A.float()
        self._check_finite(A, f"the activations of layer {s.name!r}", indices)
        self._set_shape(s, A.shape[1:])
        K = A.shape[1]
        B = A.shape[0]
        if B > s.gates_checked:  # once per layer and batch size: free memory is read from the system
            self._check_fits(B * self.N * (K + 8), f"the gates and proximity weights of {B} images x "
                             f"N={self.N} perturbations x K={K} channels")
            s.gates_checked = B
        with self.stages("gates"):
            gates = sample_gates(indices, self.N, K, seed=self.seed, layer=s.name,
                                 max_drop=self.max_drop, device=self.device)
            h = proximity(gates, s.sigma)
        if not s.h_checked and self.N > 1:
            s.h_checked = True
            perturbed = ~gates.all(dim=-1)  # rows with at least one channel off: the informative ones
            if not bool(perturbed.any()):
                warnings.warn(
                    f"layer {s.name!r}: no perturbation of the first batch switched a channel off (max_drop="
                    f"{self.max_drop} of K={K} channels rounds to none): W is fitted on the unperturbed network "
                    f"only and means nothing; raise max_drop (>= {1.0 / K:.2g} switches one channel off)",
                    UserWarning, stacklevel=4)
            mean_h = float(h[perturbed].mean()) if bool(perturbed.any()) else 1.0
            if mean_h < 1e-3:
                warnings.warn(
                    f"layer {s.name!r}: the proximity weights h = exp(-||d-1||²/σ²) of the perturbed networks "
                    f"average {mean_h:.1e} with sigma={s.sigma:.3g} at K={K} channels: the fit sees almost only "
                    f"the unperturbed network. The default there is sqrt(K/4)={default_sigma(K):.3g}; pass sigma=None "
                    "or a {layer: sigma} dict", UserWarning, stacklevel=4)
        logits, a = self._suffix_logits(s, A, gates)  # [B, N, C_out], [B, K]
        self._check_finite(logits, f"the scores after perturbing layer {s.name!r}", indices)
        self._setup_classes(logits.shape[-1])
        with self.stages("accumulate"):
            f = torch.softmax(logits[:, 0], dim=-1)[:, self._class_index]  # loyalty: unperturbed probs
            flat = logits.reshape(B * self.N, -1)
            g = self.score(flat)
            if not isinstance(g, Tensor) or tuple(g.shape) != tuple(flat.shape):
                got = list(g.shape) if isinstance(g, Tensor) else type(g).__name__
                raise ValueError(f"target: the callable must map logits [M, C_out] = {list(flat.shape)} to scores "
                                 f"of the same shape; it returned {got}")
            g = g.reshape(B, self.N, -1)[..., self._class_index].float().contiguous()
            self._check_finite(g, f"the target scores after perturbing layer {s.name!r}", indices)
        return a, gates, h, f.contiguous(), g

    def process(self, x: Tensor, indices: list[int]) -> None:
        """Adds the images x (global indices `indices`) to every layer's sums: their statistics are held
        until gram_images are in (`flush_gram` adds the rest; a checkpoint flushes first)."""
        x = self.to_device(x)
        for s in self.states:
            stats = self._statistics(s, x, indices)
            self._allocate(s)
            if s.gram_images is None:
                s.gram_images = gram_limit(s.shape[0], self.N, len(self.classes), self.memory_budget)
            with self.stages("accumulate"):
                s.pending.add(s.acc, stats, s.gram_images)
        self._raise_nonfinite()  # read one batch late on a GPU: no device sync per batch

    def flush_gram(self) -> None:
        """Adds every held image's statistics to the sums: before a checkpoint is written and at the end."""
        for s in self.states:
            if s.pending.images:
                with self.stages("accumulate"):
                    s.pending.flush(s.acc)

    # ---------------------------------------------------------------- solve

    def solve(self, lam, lam_ratio, rho, max_iter, tol, fit_intercept=False, positive=False):
        """Solves the classes whose sums this rank holds (s.rows; all of them in one process) and,
        under torch.distributed, gathers every rank's rows. Returns per layer: W [C, K] float32,
        intercepts [C] float32 (zeros without fit_intercept), λ per class, and the solver report."""
        weights, intercepts, lams, solver_meta, means = {}, {}, {}, {}, {}
        C = len(self.classes)
        for s in self.states:
            G, b, _, n, zs, gs = s.acc
            r0, r1 = s.rows
            W, b0, lam_c = (torch.zeros(C, s.shape[0], dtype=torch.float64), torch.zeros(C, dtype=torch.float64),
                            torch.zeros(C, dtype=torch.float64))
            z_mean = torch.zeros(C, s.shape[0], dtype=torch.float64)  # Σ f h z / Σ f h (0 for empty classes)
            z_mean[r0:r1] = (zs / n.clamp_min(torch.finfo(torch.float64).tiny)[:, None]).cpu()
            W[r0:r1], b0[r0:r1], lam_c[r0:r1], report = solve_sums(
                G, b, n, zs, gs, s.shape[0], lam=lam, lam_ratio=lam_ratio, rho=rho, max_iter=max_iter, tol=tol,
                fit_intercept=fit_intercept, positive=positive)
            report["rows"] = [r0 + r for r in report["rows"]]
            report["empty"] = [r0 + r for r in report["empty"]]
            if self.world > 1:
                W, b0, lam_c, z_mean = distributed.sum_rows((W, b0, lam_c, z_mean), self.comm_device)
                parts = distributed.all_gather_object(report)  # blocks in rank order: the classes' order
                report = {key: ([v for p in parts for v in p[key]] if key != "factorizations"
                                else sum(p[key] for p in parts)) for key in report}
            weights[s.name] = W.float()
            means[s.name] = z_mean.float()
            intercepts[s.name] = b0.float()
            lams[s.name] = lam_c
            self.empty_classes[s.name] = [self.classes[r] for r in report["empty"]]
            solver_meta[s.name] = solver_report(s.name, report, self.classes, max_iter)
        self.feature_means = means
        return weights, intercepts, lams, solver_meta
