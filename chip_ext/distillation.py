"""CHIP distillation: learn the class-by-channel importance W of layers of a CNN from a dataset.

For every image s and layer l (DESIGN §1): the prefix of the network up to l runs once, giving
A_s [K, H, W]; `gate_pool` makes N gated copies (row 0 the unperturbed network); only the suffix
runs on them, giving the perturbed scores g_sn; `gram_accumulate` adds the image to the float64
sufficient statistics (G, b, y, n). After the whole loader, the per-class weighted Lasso (eq. 11)
is solved on the normalised statistics by ADMM with a cached Cholesky factor.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import operator
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed, ops
from .checkpoints import (choose_resume_point, foreign_checkpoints, list_rank_checkpoints, rank_checkpoint,
                          read_checkpoint, write_checkpoint)
from .distributed import class_block
from .gates import GATE_STREAM, default_sigma, proximity, sample_gates
from .importance import Importance
from .solver import solve_sums, solver_report
from .maps import inference_view
from .split import default_layer, split

DEFAULT_LAM_RATIO = 0.03  # chosen on the calibration half (README: why these defaults)


# ---------------------------------------------------------------------------------- helpers


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex digits) of the names, shapes and dtypes of the model's parameters and buffers and
    of their values: per tensor the integer sum of its bit patterns (exact, so the same on any device
    and thread count) and 256 evenly strided elements. (A full hash of VGG16's 553 MB took longer than
    distilling 16 images.) A checkpoint resumes only with the same weights: the same architecture with
    other weights would add another network's sums to the old ones."""
    h = hashlib.sha256()
    summaries = []
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.device.type == "meta" or not t.numel():
            continue
        flat = t.detach().reshape(-1)
        bits = flat.view(_INT_OF_SIZE[flat.element_size()]) if flat.element_size() in _INT_OF_SIZE else flat
        summaries.append((bits.sum(dtype=torch.int64).cpu(), flat[::max(1, flat.numel() // 256)][:256].cpu()))
    for total, sample in summaries:
        h.update(total.numpy().tobytes())
        h.update(sample.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def image_fingerprint(image: Tensor) -> str:
    """sha256 (16 hex digits) of one image's shape and values."""
    h = hashlib.sha256(f"{tuple(image.shape)}:{image.dtype}".encode())
    h.update(image.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def images_of(batch: Any, position: int) -> Tensor:
    """The image tensor [B, C, H, W] of one loader item: a tensor, a (images, ...) tuple/list, or a
    dict with an "image" key. A single image [C, H, W] counts as a batch of one."""
    if isinstance(batch, Tensor):
        x = batch
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        x = batch[0]
    elif isinstance(batch, dict) and isinstance(batch.get("image"), Tensor):
        x = batch["image"]
    else:
        raise TypeError(
            f"loader item {position} is a {type(batch).__name__}; expected an image tensor [B, C, H, W], "
            "a tuple/list whose first element is one, or a dict with an 'image' key")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or not x.is_floating_point():
        raise TypeError(f"loader item {position} holds a {x.dim()}-D {x.dtype} tensor of shape "
                        f"{list(x.shape)}; expected floating-point images [B, C, H, W]")
    return x


def _is_index(value) -> bool:
    try:
        operator.index(value)
        return True
    except TypeError:
        return False


def _int_arg(name: str, value, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        want = "an int" + (f" >= {minimum}" if minimum is not None else "")
        raise ValueError(f"{name} must be {want}; got {value!r}")


def _float_arg(name: str, value, *, positive: bool, upper: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0) and (upper is None or value <= upper)
    if not ok:
        want = ("a finite number " + ("> 0" if positive else ">= 0")
                + (f" and <= {upper}" if upper is not None else ""))
        raise ValueError(f"{name} must be {want}; got {value!r}")


def _writable(path: Path) -> Path:
    """The checkpoint path, checked before the pass: its folder exists or can be made, and a file can
    be written there (a read-only folder, or a path under a regular file, failed only at the first save)."""
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; pass a file path")
    parent = path.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"checkpoint {path}: {p} is a file, not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"checkpoint {path} cannot be written: {err.strerror or err} ({parent})") from None
    return path


def _score_fn(target: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if target == "prob":
        return lambda logits: torch.softmax(logits.float(), dim=-1)
    if target == "logit":
        return lambda logits: logits.float()
    if callable(target):
        return target
    raise ValueError(f"target must be 'prob', 'logit' or a callable on the logits; got {target!r}")


def _target_name(target: str | Callable) -> str:
    if isinstance(target, str):
        return target
    return f"callable:{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def _free_bytes(device: torch.device) -> int | None:
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


def _fmt_bytes(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


class _PeakMeter(torch.fx.Interpreter):
    """Runs a traced suffix node by node and keeps the largest (inputs + output) bytes of a node:
    what must be alive at once in a no-grad forward, short of the allocator's own slack."""

    def __init__(self, module):
        super().__init__(module)
        self.peak = 0

    def run_node(self, n):
        out = super().run_node(n)
        size = _tensor_bytes(out) + sum(_tensor_bytes(self.env[a]) for a in n.all_input_nodes if a in self.env)
        self.peak = max(self.peak, size)
        return out


def _tensor_bytes(value) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _pieces(B: int, N: int, copies: int, start: int = 0) -> list[tuple[int, int, int, int]]:
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


class _Stages:
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


class _LayerState:
    """A layer's prefix/suffix and its float64 accumulators."""

    def __init__(self, name: str, prefix: nn.Module, suffix: nn.Module):
        self.name, self.prefix, self.suffix = name, prefix, suffix
        self.acc: ops.Accumulators | None = None
        self.rows: tuple[int, int] | None = None  # the classes [r0, r1) whose sums acc holds
        self.shape: list[int] | None = None  # [K, H, W] of the first batch
        self.sigma: float | None = None
        self.copy_bytes: int | None = None  # memory one gated copy takes through the suffix (estimate)
        self.h_checked = False


# ---------------------------------------------------------------------------------- distill


def distill(model: nn.Module, loader: Iterable, layers: str | Sequence[str] | None = None, *,
            classes: Sequence[int] | None = None, num_perturbations: int = 100,
            sigma: float | dict[str, float] | None = None, lam: float | None = None, lam_ratio: float | None = None,
            rho: float | None = None, target: str | Callable[[Tensor], Tensor] = "prob",
            seed: int = 0, device: str | torch.device | None = None, batch_size: int | None = None,
            checkpoint: str | Path | None = None, progress: bool = True, max_drop: float = 0.5,
            memory_budget: int | None = None, autocast_dtype: torch.dtype | None = None,
            checkpoint_every: float = 300.0, max_iter: int = 1000, tol: float = 1e-7,
            class_names: Sequence[str] | None = None, max_images: int | None = None,
            profile: bool = False, shard_accumulators: bool = False, fit_intercept: bool = True,
            positive: bool = False) -> Importance:
    """Distils CHIP channel importances of `layers` of `model` over the images of `loader`.

    model: a CNN returning logits [B, C_out]; it is split at each layer with torch.fx.
    loader: any iterable of image tensors [B, 3, H, W], (images, ...) tuples/lists, or dicts with an
        "image" key. Its order must be the same on every pass (for resuming from a checkpoint).
    layers: a module name from model.named_modules(), or a list of them. Default: the layer CAM would
        use, the last clean cut point before global pooling (`chip_ext.split.default_layer`: VGG16
        'features.29', ResNet-50 'layer4', EfficientNet-Lite0 'bn2'), named in the progress bar and
        in imp.meta["layers"] (imp.meta["layers_default"] is True).
    classes: the model outputs to explain (default: all). num_perturbations: N gated networks per
        image, the unperturbed one included. sigma: proximity width, h = exp(-||d-1||²/σ²): None
        (default √(K/4) per layer), one number for every layer, or {layer: σ} (layers left out get the
        default). One absolute σ suits one K only: at a layer with more channels the same σ drives h
        of every perturbed network to ~0, and distill warns when that happens.
    lam: λ on the normalised objective (absolute); lam_ratio: λ as a fraction of each class's λ_max
        (give at most one; default lam_ratio=0.03). rho: the starting ADMM penalty (default:
        trace(Ĝ_c)/K; adapted during the solve). max_iter, tol: the solver's (`admm_lasso`).
    fit_intercept: an unpenalised intercept per class (scikit-learn's convention), so the baseline
        score is not absorbed by channels with a large mean; the intercepts are in
        `Importance.intercepts`. Default True (and lam_ratio 0.03): the best mean localisation over six
        EfficientNet-Lite0 layers on the calibration half (README, "why these defaults"). positive: non-negative weights (scikit-learn's positive=True).
        Both only change the solve: a finished checkpoint re-solves with other values, no new pass.
    target: "prob" (softmax, the paper's), "logit", or a callable mapping logits [M, C_out] to
        scores [M, C_out]. The loyalty weights f are always the unperturbed probabilities.
    seed: keys the gates together with each image's global index, so W does not depend on
        batch_size, memory_budget, resume point or workers (beyond the network's own float32
        dependence on batch size: oneDNN/cuBLAS pick kernels by shape, ~3e-8 relative for the small CNN
        of tests/test_distillation.py).
    device: where to run (default: the model's device). The model itself is never moved or put in
        eval mode: an eval-mode view of it runs (`maps.inference_view`; a copy of the weights on
        another device), so other threads may keep using it.
    batch_size: images per step (default: the loader's batches). memory_budget: bytes of gated
        copies and the suffix's activations per suffix call (default 32 MiB on CPU, 1/8 of free GPU
        memory; see `default_memory_budget`).
    checkpoint: a file to write the running sums to every `checkpoint_every` seconds and at the
        end; calling again with the same file resumes (and re-solves, if the pass had finished).
    autocast_dtype: e.g. torch.bfloat16 to run the suffix under autocast (GPU).
    max_images: stop after this many images. profile: synchronise the GPU for per-stage timings.

    torch.distributed (initialised by the caller, e.g. under torchrun): rank r forwards the images
    whose global index is r mod world_size (every rank iterates the same loader, in the same
    order); the float64 sums are reduced and the Lasso is solved by class blocks across ranks;
    every rank returns the same Importance, equal to the single-process one. With a checkpoint,
    each rank writes `<checkpoint>.rank<r>of<world>.pos<images>` (the two newest kept, written at
    the same loader position on every rank) and `.complete`; the same command resumes.
    shard_accumulators: with torch.distributed, rank r keeps the sums of only its block of about
    C/world classes and adds every rank's images to it (their per-image statistics a, h, f, g
    and gates are all-gathered per batch: (K + N + C + N*C)*4 + N*K bytes per image). The sums
    per rank drop by the factor world; use it when they (C*K(K+1)/2*8 bytes per layer, e.g.
    16.8 GB for K=2048, C=1000) do not fit beside the model.
    Returns an Importance with W: Tensor[C, K] per layer.
    """
    # ---- arguments: everything that could only fail at the end is checked before the first image
    if layers is None:  # the layer CAM would use, read off the eval-mode graph
        layer_list = [default_layer(inference_view(model))]
    else:
        layer_list = [layers] if isinstance(layers, str) else list(layers)
    if not layer_list or not all(isinstance(l, str) for l in layer_list):
        raise ValueError(f"layers must be a module name or a non-empty list of them; got {layers!r}")
    if len(set(layer_list)) != len(layer_list):
        raise ValueError(f"layers has duplicates: {layer_list}")
    _int_arg("num_perturbations", num_perturbations, 1)
    _int_arg("max_iter", max_iter, 1)
    _int_arg("seed", seed, None)
    for name, value in (("batch_size", batch_size), ("memory_budget", memory_budget), ("max_images", max_images)):
        if value is not None:
            _int_arg(name, value, 1)
    _float_arg("tol", tol, positive=True)
    _float_arg("checkpoint_every", checkpoint_every, positive=False)
    _float_arg("max_drop", max_drop, positive=False, upper=1.0)
    if isinstance(sigma, dict):
        unknown = [k for k in sigma if k not in layer_list]
        if unknown:
            raise ValueError(f"sigma has layers {unknown} that are not in layers {layer_list}")
        for name, value in sigma.items():
            _float_arg(f"sigma[{name!r}]", value, positive=True)
        sigma = {k: float(v) for k, v in sigma.items()}
    for name, value, strict in (("sigma", None if isinstance(sigma, dict) else sigma, True), ("rho", rho, True),
                                ("lam", lam, False), ("lam_ratio", lam_ratio, False)):
        if value is not None:
            _float_arg(name, value, positive=strict)
    if lam is not None and lam_ratio is not None:
        raise ValueError("give lam (absolute) or lam_ratio (fraction of each class's lambda_max), not both")
    for flag, value in (("fit_intercept", fit_intercept), ("positive", positive),
                        ("shard_accumulators", shard_accumulators)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False; got {value!r}")
    if lam is None and lam_ratio is None:
        lam_ratio = DEFAULT_LAM_RATIO
    if classes is not None:
        classes = list(classes) if not isinstance(classes, Tensor) else classes.tolist()
        if not classes:
            raise ValueError("classes must be None (all outputs) or a non-empty list of class indices; got []")
        bad = [c for c in classes if isinstance(c, bool) or not _is_index(c)]
        if bad:
            raise TypeError(f"classes must be integer class indices; got {bad[:10]}")
        classes = [operator.index(c) for c in classes]
    if class_names is not None:
        if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
            raise TypeError("class_names must be a list of strings")
        class_names = list(class_names)
        if classes is not None and len(class_names) != len(classes) and len(class_names) <= max(classes):
            raise ValueError(f"class_names must name all the model's outputs or the {len(classes)} chosen classes; "
                             f"got {len(class_names)} names")
    if checkpoint is not None:
        checkpoint = _writable(Path(checkpoint))
    score = _score_fn(target)

    params = list(itertools.chain(model.parameters(), model.buffers()))
    model_device = params[0].device if params else torch.device("cpu")
    device = torch.device(device) if device is not None else model_device
    if device.type == "meta":
        raise ValueError("device='meta' holds no data: distill needs a device that computes ('cpu', 'cuda', ...)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if memory_budget is None:
        memory_budget = default_memory_budget(device)

    # ---- split the model (checks the layers and the cut before any work). The model itself is left
    # alone (no eval(), no .to()): another thread may be using it; its inference view runs instead.
    view = inference_view(model, device)
    states = []
    for layer in layer_list:
        prefix, suffix = split(view, layer)
        states.append(_LayerState(layer, prefix, suffix))

    config = {
        "layers": layer_list, "classes": None if classes is None else [int(c) for c in classes],
        "num_perturbations": num_perturbations, "sigma": sigma, "max_drop": max_drop,
        "target": _target_name(target), "seed": int(seed), "model": model_fingerprint(model),
        "gates": GATE_STREAM,
    }
    rank, world = distributed.rank_world()
    config["shard_accumulators"] = bool(shard_accumulators) and world > 1  # what the checkpoint sums mean
    dataset = getattr(loader, "dataset", None)
    loader_images = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    if world > 1:
        distributed.check_ranks_agree({**config, "lam": lam, "lam_ratio": lam_ratio, "rho": rho, "max_iter": max_iter,
                            "tol": tol, "fit_intercept": fit_intercept, "positive": positive,
                            "max_images": max_images, "batch_size": batch_size,
                            "checkpoint": None if checkpoint is None else Path(checkpoint).name,
                            "images_in_loader": loader_images})
        progress = progress and rank == 0
    stages = _Stages(device, profile)
    with torch.no_grad():
        run = _Run(states, config, classes, num_perturbations, sigma, max_drop, score, seed,
                   device, batch_size, memory_budget, autocast_dtype, stages, rank=rank, world=world,
                   shard=shard_accumulators)
        run.class_names_count = None if class_names is None else len(class_names)
        run.loader_images, run.max_images = loader_images, max_images
        resumed = run.resume(checkpoint) if checkpoint is not None else False
        if run.complete:
            run.check_finished_run(loader, checkpoint)
        else:
            run.stream(loader, progress, checkpoint, checkpoint_every, max_images)
            if world > 1:
                run.finish()
            if checkpoint is not None:
                run.complete = True
                run.save(checkpoint)
        for st in states:
            if run.seen * num_perturbations < st.shape[0]:
                warnings.warn(
                    f"layer {st.name!r}: {run.seen} images x N={num_perturbations} = "
                    f"{run.seen * num_perturbations} gated samples for K={st.shape[0]} channels: the Lasso is "
                    "underdetermined (W is not unique) and ADMM may stop at max_iter; distil more images",
                    stacklevel=2)
        with stages("solve"):
            weights, intercepts, lams, solver_meta = run.solve(lam, lam_ratio, rho, max_iter, tol,
                                                               fit_intercept, positive)
        for st in states:
            if solver_meta[st.name]["message"]:
                warnings.warn(solver_meta[st.name]["message"], UserWarning, stacklevel=2)

    chosen = run.classes
    names = None
    if class_names is not None:
        class_names = list(class_names)
        if len(class_names) == run.num_outputs:
            names = [class_names[c] for c in chosen]
        elif len(class_names) == len(chosen):
            names = class_names
        else:
            raise ValueError(f"class_names must name all {run.num_outputs} outputs or the {len(chosen)} "
                             f"chosen classes; got {len(class_names)} names")
    from . import __version__

    meta = {
        **config,
        "lam": lam, "lam_ratio": lam_ratio, "rho": rho, "max_iter": max_iter, "tol": tol,
        "fit_intercept": fit_intercept, "positive": positive,
        "lam_per_class": lams, "images_seen": run.seen, "perturbations_per_image": num_perturbations,
        "layer_shapes": {s.name: s.shape for s in states},
        "layers_default": layers is None,  # True: the layer was chosen by chip_ext.split.default_layer
        "sigma_used": {s.name: s.sigma for s in states},
        "empty_classes": run.empty_classes, "solver": solver_meta, "resumed": resumed,
        "resumed_at_image": run.resumed_at, "world_size": world, "shard_accumulators": run.shard,
        "timing_s": dict(stages.seconds), "device": str(device), "chip_ext_version": __version__,
    }
    return Importance(weights, chosen, class_names=names, meta=meta,
                      intercepts=intercepts if fit_intercept else None)


class _Run:
    """The state of one distillation pass: accumulators, position, and the per-batch work.

    With torch.distributed (world > 1), rank r forwards the images whose global index is r mod world.
    Replicated accumulators (default): every rank sums all classes over its images; at the end the
    sums of class block r are reduced onto rank r. Sharded (shard_accumulators): rank r keeps only
    class block r and adds every rank's images to it, their per-image statistics all-gathered.
    Either way rank r solves block r and the blocks are gathered, so every rank returns the same W.
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
        self.comm_device = distributed.comm_device(device, world)

    # ---------------------------------------------------------------- checkpoints

    def _state(self) -> dict:
        return {
            "config": self.config, "seen": self.seen,
            "position": self.position, "complete": self.complete, "classes": self.classes,
            "num_outputs": self.num_outputs, "world": self.world, "rank": self.rank,
            "first_image": self.first_image, "max_images": self.max_images, "loader_images": self.loader_images,
            "layers": {s.name: {"shape": s.shape, "sigma": s.sigma, "rows": s.rows,
                                "acc": None if s.acc is None else [t.cpu() for t in s.acc]}
                       for s in self.states},
        }

    def save(self, path) -> None:
        write_checkpoint(self._state(), Path(path), self.rank, self.world)

    def _load(self, path: Path) -> None:
        state = read_checkpoint(path, self.config)
        self.seen, self.complete = int(state["seen"]), bool(state["complete"])
        self.position = int(state["position"])
        self.resumed_at = self.position
        self.first_image = state["first_image"]
        self.recorded = {"max_images": state["max_images"], "loader_images": state["loader_images"]}
        if not self.complete and self.max_images is not None and self.position > self.max_images:
            raise ValueError(f"checkpoint {path} already holds {self.position} images, more than max_images="
                             f"{self.max_images}; pass max_images >= {self.position} (or None), or another path")
        self.classes, self.num_outputs = state["classes"], state["num_outputs"]
        if self.classes is not None:
            self._class_index = torch.tensor(self.classes, device=self.device)
        for s in self.states:
            saved = state["layers"][s.name]
            s.shape, s.sigma = saved["shape"], saved["sigma"]
            s.rows = tuple(saved["rows"]) if saved.get("rows") is not None else None
            if saved["acc"] is not None:
                s.acc = ops.Accumulators(*(t.to(self.device) for t in saved["acc"]))

    def resume(self, path) -> bool:
        path = Path(path)
        found = list_rank_checkpoints(path)
        problem = foreign_checkpoints(path, found, self.rank, self.world)
        if self.world == 1:
            if problem:
                raise ValueError(problem)
            if not path.exists():
                return False
            self._load(path)
            return True
        # every rank must take the same decision, and every rank must fail when one cannot go on
        keys = found.get((self.rank, self.world), [])
        gathered = distributed.all_gather_object((keys, problem))
        distributed.raise_if_any([p for _, p in gathered])
        choice = choose_resume_point([k for k, _ in gathered])
        if choice is None:
            return False
        problem = None
        try:
            self._load(rank_checkpoint(path, self.rank, self.world, choice))
        except ValueError as err:
            problem = str(err)
        distributed.raise_if_any(distributed.all_gather_object(problem))
        return True

    def _time_to_save(self, last_save: float, every: float) -> bool:
        """Whether to save now; under torch.distributed all ranks decide together (a 1-int all-reduce),
        so their files hold the same loader position."""
        due = time.monotonic() - last_save >= every
        return due if self.world == 1 else distributed.any_rank(due, self.comm_device)

    # ---------------------------------------------------------------- streaming

    def stream(self, loader, progress, checkpoint, checkpoint_every, max_images) -> None:
        from tqdm.auto import tqdm

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
            for item_index, item in enumerate(loader):
                x = images_of(item, item_index)
                if item_index == 0:
                    self._check_first_image(x, checkpoint)
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
                    self.save(checkpoint)
                    last_save = time.monotonic()
                if max_images is not None and position >= max_images:
                    break
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

    def _check_first_image(self, x: Tensor, checkpoint) -> None:
        """The loader's first image must be the one the checkpoint was written with: another loader,
        order or preprocessing would add other images' sums to the old ones."""
        fp = image_fingerprint(x[0])
        if self.first_image is None:
            self.first_image = fp
        elif fp != self.first_image:
            raise ValueError(f"the loader's first image is not the one checkpoint {checkpoint} was written with "
                             "(another dataset, order, transform or batch layout): resume with the same loader, "
                             "or pass another checkpoint path")

    def check_finished_run(self, loader, checkpoint) -> None:
        """A finished checkpoint is re-solved without reading the images; it must be the same run:
        max_images and the dataset's length as recorded, and the loader's first image (read when the
        loader has any: pass an empty list to re-solve from the sums alone)."""
        recorded = self.recorded
        if recorded.get("max_images") != self.max_images:
            raise ValueError(f"checkpoint {checkpoint} is a finished run with max_images={recorded.get('max_images')}; "
                             f"now max_images={self.max_images}. Pass the same max_images, or another checkpoint path "
                             "for another run")
        if None not in (recorded.get("loader_images"), self.loader_images) \
                and recorded["loader_images"] != self.loader_images:
            raise ValueError(f"checkpoint {checkpoint} was finished over a dataset of {recorded['loader_images']} images; "
                             f"this loader's has {self.loader_images}: another dataset? Pass another checkpoint path")
        for item_index, item in enumerate(loader):
            self._check_first_image(images_of(item, item_index), checkpoint)
            break

    def _check_finite(self, t: Tensor, what: str, indices: list[int]) -> None:
        """Queues a NaN/Inf check of t: Tensor[B, ...] (one flag per image, no device sync);
        _raise_nonfinite() tests every queued check with one sync per batch."""
        self._checks.append((~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1), what, indices))

    def _raise_nonfinite(self) -> None:
        checks, self._checks = self._checks, []
        if not checks or not bool(torch.stack([bad.any() for bad, _, _ in checks]).any()):
            return
        for bad, what, indices in checks:  # the first failing check, in the order they were made
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise FloatingPointError(f"NaN or Inf in {what} for image {indices[i]} (global index "
                                         "in the loader's order); the run stops (a checkpoint holds the sums before this batch)")

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

    def _set_shape(self, s: _LayerState, shape: Sequence[int]) -> None:
        K = shape[0]
        if s.shape is not None and s.shape[0] != K:
            raise ValueError(f"layer {s.name!r} now has K={K} channels; it had K={s.shape[0]} "
                             "(in an earlier batch or the checkpoint)")
        if s.shape is None:
            s.shape = list(shape)
        if s.sigma is None:
            given = self.sigma_arg.get(s.name) if isinstance(self.sigma_arg, dict) else self.sigma_arg
            s.sigma = float(given) if given is not None else default_sigma(K)

    def _allocate(self, s: _LayerState) -> None:
        """Accumulators of a layer (all classes, or this rank's block when sharded); checks first that
        they fit in the device's free memory."""
        if s.acc is not None:
            return
        C, K = len(self.classes), s.shape[0]
        s.rows = class_block(C, self.rank, self.world) if self.shard else (0, C)
        rows = s.rows[1] - s.rows[0]
        need = ops.accumulator_bytes(rows, K)
        free = _free_bytes(self.device)
        if free is not None and need > 0.8 * free:
            hint = ("" if self.shard or self.world == 1 else
                    f" With torch.distributed, shard_accumulators=True keeps 1/{self.world} of them per rank.")
            raise MemoryError(
                f"the float64 accumulators of layer {s.name!r} need {_fmt_bytes(need)} for C={rows} classes "
                f"and K={K} channels (C*K(K+1)/2*8 bytes), but only {_fmt_bytes(free)} is free on "
                f"{self.device}. Pass fewer classes= or fewer layers.{hint}")
        s.acc = ops.new_accumulators(rows, K, self.device)

    def _suffix_logits(self, s: _LayerState, A: Tensor, gates: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of the N gated networks of every image [B, N, C_out], in memory-bounded chunks, and
        the pooled activations a = mean_hw(A) [B, K] (gate_pool's z of the ungated row 0).

        memory_budget bounds the gated copies and the suffix's activations together: the first piece
        of a layer is one copy, run node by node to measure the suffix's peak (`_PeakMeter`)."""
        B, K, H, W = A.shape
        N = gates.shape[1]
        result: Tensor | None = None
        a = torch.empty(B, K, dtype=torch.float32, device=A.device)
        start = 0  # the first (image, perturbation) pair not yet run, as image * N + perturbation
        if s.copy_bytes is None:
            logits = self._suffix_piece(s, A, gates, a, 0, 1, 0, 1, measure=True)
            result = torch.empty(B, N, logits.shape[1], dtype=torch.float32, device=logits.device)
            result[0, 0] = logits[0].float()
            start = 1
        copies = max(1, self.memory_budget // max(1, s.copy_bytes))
        for i0, i1, n0, n1 in _pieces(B, N, copies, start):
            logits = self._suffix_piece(s, A, gates, a, i0, i1, n0, n1)
            if result is None:
                result = torch.empty(B, N, logits.shape[1], dtype=torch.float32, device=logits.device)
            result[i0:i1, n0:n1] = logits.float().reshape(i1 - i0, n1 - n0, -1)
        return result, a

    def _suffix_piece(self, s: _LayerState, A: Tensor, gates: Tensor, a: Tensor, i0: int, i1: int, n0: int,
                      n1: int, measure: bool = False) -> Tensor:
        """Logits [(i1-i0)*(n1-n0), C_out] of images i0:i1, perturbations n0:n1; fills a[i0:i1] when
        n0 = 0. measure: run the suffix node by node and set s.copy_bytes (one gated copy + the peak)."""
        with self.stages("gate_pool"):
            gated, z = ops.gate_pool(A[i0:i1], gates[i0:i1, n0:n1])
            if n0 == 0:  # row 0 is the unperturbed network: z = mean_hw(A)
                a[i0:i1] = z[:, 0]
        run = s.suffix
        if measure:
            meter = _PeakMeter(s.suffix)
            run = meter.run
        with self.stages("suffix"):
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    logits = run(gated)
            else:
                logits = run(gated)
        if measure:
            s.copy_bytes = A[0].numel() * A.element_size() + meter.peak
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != gated.shape[0]:
            shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"the model's output after layer {s.name!r} must be logits [M, C_out] "
                             f"for M={gated.shape[0]} inputs; got {shape}")
        return logits

    def _statistics(self, s: _LayerState, x: Tensor, indices: list[int]):
        """One layer's per-image statistics of the images x: a [B, K], gates [B, N, K] bool,
        h [B, N], f [B, C] and g [B, N, C] over the chosen classes."""
        with self.stages("prefix"):
            A = s.prefix(x)
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
        with self.stages("gates"):
            gates = sample_gates(indices, self.N, K, seed=self.seed, layer=s.name,
                                 max_drop=self.max_drop, device=self.device)
            h = proximity(gates, s.sigma)
        if not s.h_checked and self.N > 1:
            s.h_checked = True
            perturbed = ~gates.all(dim=-1)  # rows with at least one channel off: the informative ones
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
        """Adds the images x (global indices `indices`) to every layer's sums."""
        x = x.to(self.device, non_blocking=True)
        for s in self.states:
            a, gates, h, f, g = self._statistics(s, x, indices)
            self._allocate(s)
            with self.stages("accumulate"):
                ops.gram_accumulate(*s.acc, a, gates, h, f, g)
        self._raise_nonfinite()  # one device sync per batch

    def process_sharded(self, x: Tensor | None, indices: list[int], counts: list[int]) -> None:
        """Sharded accumulators: this rank forwards its images x (None when it has none in this chunk),
        every rank's per-image statistics are all-gathered, and this rank adds all of them to its
        class block. counts[r]: images of rank r in this chunk (every rank calls this per chunk)."""
        if x is not None:
            x = x.to(self.device, non_blocking=True)
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

    # ---------------------------------------------------------------- torch.distributed

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

    # ---------------------------------------------------------------- solve

    def solve(self, lam, lam_ratio, rho, max_iter, tol, fit_intercept=False, positive=False):
        """Solves the classes whose sums this rank holds (s.rows; all of them in one process) and,
        under torch.distributed, gathers every rank's rows. Returns per layer: W [C, K] float32,
        intercepts [C] float32 (zeros without fit_intercept), λ per class, and the solver report."""
        weights, intercepts, lams, solver_meta = {}, {}, {}, {}
        C = len(self.classes)
        for s in self.states:
            G, b, _, n, zs, gs = s.acc
            r0, r1 = s.rows
            W, b0, lam_c = (torch.zeros(C, s.shape[0], dtype=torch.float64), torch.zeros(C, dtype=torch.float64),
                            torch.zeros(C, dtype=torch.float64))
            W[r0:r1], b0[r0:r1], lam_c[r0:r1], report = solve_sums(
                G, b, n, zs, gs, s.shape[0], lam=lam, lam_ratio=lam_ratio, rho=rho, max_iter=max_iter, tol=tol,
                fit_intercept=fit_intercept, positive=positive)
            report["rows"] = [r0 + r for r in report["rows"]]
            report["empty"] = [r0 + r for r in report["empty"]]
            if self.world > 1:
                W, b0, lam_c = distributed.sum_rows((W, b0, lam_c), self.comm_device)
                parts = distributed.all_gather_object(report)  # blocks in rank order: the classes' order
                report = {key: ([v for p in parts for v in p[key]] if key != "factorizations"
                                else sum(p[key] for p in parts)) for key in report}
            weights[s.name] = W.float()
            intercepts[s.name] = b0.float()
            lams[s.name] = lam_c
            self.empty_classes[s.name] = [self.classes[r] for r in report["empty"]]
            solver_meta[s.name] = solver_report(s.name, report, self.classes, max_iter)
        return weights, intercepts, lams, solver_meta
