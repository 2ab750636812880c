"""CHIP distillation: learn the class-by-channel importance W of layers of a CNN from a dataset.

For every image s and layer l (DESIGN §1): the prefix of the network up to l runs once, giving
A_s [K, H, W]; `gate_pool` makes N gated copies (row 0 the unperturbed network); only the suffix
runs on them, giving the perturbed scores g_sn; `gram_accumulate` adds the image to the float64
sufficient statistics (G, b, y, n). After the whole loader, the per-class weighted Lasso (eq. 11)
is solved on the normalised statistics by ADMM with a cached Cholesky factor.

This module holds `distill` (its arguments checked, the run set up, the Importance assembled); the
run itself is `streaming.Run` (the per-batch work and the solve), with its checkpoint side in
`checkpoints` and its torch.distributed side in `ranks`; memory planning is in `memory`.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from . import distributed
from .batches import RankSlice
from .checkpoints import CheckpointLock
from .paths import folder_problem
from .fingerprints import cached_model_fingerprint, image_fingerprint, model_fingerprint  # noqa: F401  (re-exported)
from .gates import GATE_STREAM
from ..importance import Importance
from .views import inference_view, split_on
from .memory import default_memory_budget
from .split import default_layer
from .streaming import LayerState, Run, Stages, device_normalizer, images_of  # noqa: F401  (images_of re-exported)

DEFAULT_LAM_RATIO = 0.03  # chosen on the calibration half (docs/evaluation.md: why these defaults)


# ---------------------------------------------------------------------------------- helpers

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
    problem = folder_problem(path.parent)
    if problem is not None:
        raise ValueError(f"checkpoint {path} cannot be written: {problem}")
    return path


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                   "float16": torch.float16}


def _autocast_arg(value) -> torch.dtype | None:
    """None, torch.bfloat16 / torch.float16, or their names ("bf16", "fp16", ...)."""
    if value is None or value in (torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str) and value.lower() in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[value.lower()]
    raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16 (or 'bf16' / 'fp16'); "
                     f"got {value!r}")


def _normalize_arg(value) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """None, or (mean, std): two sequences of the same length of finite numbers, std > 0."""
    if value is None:
        return None
    try:
        mean, std = value
        mean, std = tuple(float(m) for m in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise ValueError(f"normalize must be (mean, std), two sequences of numbers per channel, e.g. "
                         f"((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)); got {value!r}") from None
    if not mean or len(mean) != len(std):
        raise ValueError(f"normalize: mean and std must have one number per channel each; got {len(mean)} "
                         f"and {len(std)}")
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(f"normalize: mean must be finite and std > 0; got mean={mean}, std={std}")
    return mean, std


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

# ---------------------------------------------------------------------------------- distill


def _checked_layers(model: nn.Module, layers) -> list[str]:
    """layers as a list of distinct module names; None: the layer CAM would use (eval-mode graph)."""
    if layers is None:
        return [default_layer(inference_view(model))]
    layer_list = [layers] if isinstance(layers, str) else list(layers)
    if not layer_list or not all(isinstance(l, str) for l in layer_list):
        raise ValueError(f"layers must be a module name or a non-empty list of them; got {layers!r}")
    if len(set(layer_list)) != len(layer_list):
        raise ValueError(f"layers has duplicates: {layer_list}")
    return layer_list


def _checked_sigma(sigma, layer_list: list[str]):
    """A {layer: σ} dict checked against the layers and made floats; anything else as it is."""
    if not isinstance(sigma, dict):
        return sigma
    unknown = [k for k in sigma if k not in layer_list]
    if unknown:
        raise ValueError(f"sigma has layers {unknown} that are not in layers {layer_list}")
    for name, value in sigma.items():
        _float_arg(f"sigma[{name!r}]", value, positive=True)
    return {k: float(v) for k, v in sigma.items()}


def _checked_classes(classes) -> list[int] | None:
    """None, or distinct non-negative integer class indices."""
    if classes is None:
        return None
    classes = list(classes) if not isinstance(classes, Tensor) else classes.tolist()
    if not classes:
        raise ValueError("classes must be None (all outputs) or a non-empty list of class indices; got []")
    bad = [c for c in classes if isinstance(c, bool) or not _is_index(c)]
    if bad:
        raise TypeError(f"classes must be integer class indices; got {bad[:10]}")
    classes = [operator.index(c) for c in classes]
    negative = [c for c in classes if c < 0]
    if negative:
        raise ValueError(f"classes must be model output indices >= 0; got {negative[:10]}")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise ValueError(f"classes has duplicates: {dup[:10]}")
    return classes


def _checked_class_names(class_names, classes: list[int] | None) -> list[str] | None:
    """None, or a list of strings naming all outputs or the chosen classes (all outputs is checked once
    their number is known)."""
    if class_names is None:
        return None
    if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
        raise TypeError("class_names must be a list of strings")
    class_names = list(class_names)
    if classes is not None and len(class_names) != len(classes) and len(class_names) <= max(classes):
        raise ValueError(f"class_names must name all the model's outputs or the {len(classes)} chosen classes; "
                         f"got {len(class_names)} names")
    return class_names


def _run_device(model: nn.Module, device) -> torch.device:
    """Where the run computes: `device`, or the model's; never 'meta'; 'cuda' made explicit."""
    params = list(itertools.chain(model.parameters(), model.buffers()))
    model_device = params[0].device if params else torch.device("cpu")
    device = torch.device(device) if device is not None else model_device
    if device.type == "meta":
        raise ValueError("device='meta' holds no data: distill needs a device that computes ('cpu', 'cuda', ...)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _stream_or_reuse(run: Run, loader, progress: bool, checkpoint, checkpoint_every: float,
                     max_images: int | None, world: int) -> None:
    """The pass over the images into the run's sums, or (a finished checkpoint) a check that the loader is
    the one it was made with; the final checkpoint written (a failed write warns: W is still returned)."""
    if run.complete:
        run.check_finished_run(loader, checkpoint)
        return
    run.stream(loader, progress, checkpoint, checkpoint_every, max_images)
    if world > 1:
        run.finish()
    if checkpoint is not None:
        run.complete = True
        try:
            run.save(checkpoint)
        except OSError as err:  # the pass is done: return W, say the sums are not saved
            warnings.warn(f"the pass over the images finished, but its final checkpoint could not be "
                          f"written ({err}); the Importance is returned, and resuming from {checkpoint} "
                          "would start from its last saved position", UserWarning, stacklevel=3)


def _warn_underdetermined(run: Run, states: list[LayerState], N: int) -> None:
    for st in states:
        if run.seen * N < st.shape[0]:
            warnings.warn(
                f"layer {st.name!r}: {run.seen} images x N={N} = {run.seen * N} gated samples for "
                f"K={st.shape[0]} channels: the Lasso is underdetermined (W is not unique) and ADMM may stop at "
                "max_iter; distil more images", stacklevel=3)


def _names_of_chosen(class_names: list[str] | None, chosen: list[int], num_outputs: int) -> list[str] | None:
    """The names of the chosen classes, from names of all outputs or of the chosen classes."""
    if class_names is None:
        return None
    if len(class_names) == num_outputs:
        return [class_names[c] for c in chosen]
    if len(class_names) == len(chosen):
        return list(class_names)
    raise ValueError(f"class_names must name all {num_outputs} outputs or the {len(chosen)} "
                     f"chosen classes; got {len(class_names)} names")


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
            positive: bool = False, fold: bool = True,
            normalize: tuple[Sequence[float], Sequence[float]] | None = None,
            channels_last: bool = True) -> Importance:
    """Distils CHIP channel importances of `layers` of `model` over the images of `loader`.

    model: a CNN returning logits [B, C_out]; it is split at each layer with torch.fx.
    loader: any iterable of image tensors [B, 3, H, W], (images, ...) tuples/lists, or dicts with an
        "image" key. Its order must be the same on every pass (for resuming from a checkpoint).
    layers: a module name from model.named_modules(), or a list of them. Default: the layer CAM would
        use, the last clean cut point before global pooling (`chip_ext.split.default_layer`: VGG16
        'features.29', ResNet-50 'layer4', EfficientNet-Lite0 'bn2'), named in the progress bar and
        in imp.meta["layers"] (imp.meta["layers_default"] is True).
    classes: the model outputs to explain (default: all; distinct indices >= 0). num_perturbations: N
        gated networks per image, the unperturbed one included (N >= 2). max_drop: the largest fraction
        of channels a perturbation switches off (> 0; distill warns when none is switched off). sigma: proximity width, h = exp(-||d-1||²/σ²): None
        (default √(K/4) per layer), one number for every layer, or {layer: σ} (layers left out get the
        default). One absolute σ suits one K only: at a layer with more channels the same σ drives h
        of every perturbed network to ~0, and distill warns when that happens.
    lam: λ on the normalised objective (absolute); lam_ratio: λ as a fraction of each class's λ_max
        (give at most one; default lam_ratio=0.03). rho: the starting ADMM penalty (default:
        trace(Ĝ_c)/K; adapted during the solve). max_iter, tol: the solver's (`admm_lasso`).
    fit_intercept: an unpenalised intercept per class (scikit-learn's convention), so the baseline
        score is not absorbed by channels with a large mean; the intercepts are in
        `Importance.intercepts`. Default True (and lam_ratio 0.03): the best mean localisation over six
        EfficientNet-Lite0 layers on the calibration half (docs/evaluation.md, "why these defaults"). positive: non-negative weights (scikit-learn's positive=True).
        Both only change the solve: a finished checkpoint re-solves with other values, no new pass.
    target: "prob" (softmax, the paper's), "logit", or a callable mapping logits [M, C_out] to
        scores [M, C_out]. The loyalty weights f are always the unperturbed probabilities.
    seed: keys the gates together with each image's global index, so W does not depend on
        batch_size, memory_budget, resume point or workers (beyond the network's own float32
        dependence on batch size: oneDNN/cuBLAS pick kernels by shape, ~3e-8 relative for the small CNN
        of tests/test_distillation.py).
    device: where to run (default: the model's device). The model itself is never moved or put in
        eval mode: an eval-mode view of it runs (`views.inference_view`; a copy of the weights on
        another device), so other threads may keep using it.
    batch_size: images per step (default: the loader's batches). memory_budget: bytes of gated
        copies and the suffix's activations per suffix call (default 32 MiB on CPU, 1/8 of free GPU
        memory; see `memory.default_memory_budget`).
    checkpoint: a file to write the running sums to every `checkpoint_every` seconds and at the
        end; calling again with the same file resumes (and re-solves, if the pass had finished). The
        run holds a lock on it (`<checkpoint>.lock`): a second process on the same path is refused. If
        the final save fails, distill warns and still returns the Importance.
    autocast_dtype: None, torch.bfloat16 or torch.float16 (or "bf16" / "fp16") to run the prefix and
        the suffix under autocast (GPU); part of the checkpoint's configuration.
    max_images: stop after this many images. profile: synchronise the GPU for per-stage timings.
    normalize: (mean, std) per channel: the loader's images are uint8 (0-255) or floats in [0, 1], moved
        to the device as they are (a quarter of the bytes for uint8) and normalised there, (x/255 - mean)
        / std. Default None: the images are already what the model takes. Part of the checkpoint's
        configuration.
    fold: where the suffix after a layer is per-channel ops that map 0 to 0 (ReLU, pooling, flatten,
        eval dropout) and then a Linear, compute the N gated networks' Linear outputs exactly from the
        ungated head (`chip_ext.fold`: Q_s d_sn + b) instead of running N gated copies (ResNet `layer4`,
        EfficientNet `bn2`, VGG16 `features.29`). Same sums up to float rounding; imp.meta["fold"] says,
        per layer, what was folded or why not. fold=False always runs the gated copies.
    channels_last: the images enter the prefix in channels_last memory format (NHWC), and the gated
        copies keep it (`gate_pool` writes A's format). The model is not changed; a model that cannot take
        such images (e.g. a .view() of its input) runs on the loader's and imp.meta["channels_last"] says why.
        On the 2-core CPU at 112 px distill ran 1.10x (VGG16), 1.09x (ResNet-50) and 1.01x (EfficientNet-Lite0)
        as fast as with NCHW images (docs/performance.md); the sums differ by float rounding only. False: the
        images as the loader gives them.

    torch.distributed (initialised by the caller, e.g. under torchrun): rank r forwards the images
    whose global index is r mod world_size. Give each rank a loader over
    `chip_ext.data.RankSlice(dataset, rank, world)` and it reads only those images (global index
    r + j*world for its item j); any other loader must be the same on every rank, which then skips
    the images of the others (in the same order); the float64 sums are reduced and the Lasso is solved by class blocks across ranks;
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
    layer_list = _checked_layers(model, layers)
    _check_numbers(num_perturbations, max_iter, seed, batch_size, memory_budget, max_images, tol, checkpoint_every,
                   max_drop, rho, lam, lam_ratio)
    _check_flags(fit_intercept=fit_intercept, positive=positive, shard_accumulators=shard_accumulators, fold=fold,
                 channels_last=channels_last)
    autocast_dtype = _autocast_arg(autocast_dtype)
    normalize = _normalize_arg(normalize)
    sigma = _checked_sigma(sigma, layer_list)
    if sigma is not None and not isinstance(sigma, dict):
        _float_arg("sigma", sigma, positive=True)
    if lam is None and lam_ratio is None:
        lam_ratio = DEFAULT_LAM_RATIO
    classes = _checked_classes(classes)
    class_names = _checked_class_names(class_names, classes)
    if checkpoint is not None:
        checkpoint = _writable(Path(checkpoint))
    score = _score_fn(target)

    device = _run_device(model, device)
    if memory_budget is None:
        memory_budget = default_memory_budget(device)

    # ---- split the model (checks the layers and the cut before any work). The model itself is left
    # alone (no eval(), no .to()): another thread may be using it; its inference view runs instead.
    view = inference_view(model, device)
    states = []
    for layer in layer_list:
        prefix, suffix = split_on(model, view, layer)  # traced once per model, not once per call
        states.append(LayerState(layer, prefix, suffix, fold))

    config = _pass_config(model, layer_list, classes, num_perturbations, sigma, max_drop, target, seed,
                          autocast_dtype, normalize)
    rank, world = distributed.rank_world()
    config["shard_accumulators"] = bool(shard_accumulators) and world > 1  # what the checkpoint sums mean
    per_rank, loader_images, local_images = _loader_kind(loader, rank, world)
    if world > 1:
        distributed.check_ranks_agree({**config, "lam": lam, "lam_ratio": lam_ratio, "rho": rho, "max_iter": max_iter,
                            "tol": tol, "fit_intercept": fit_intercept, "positive": positive,
                            "max_images": max_images, "batch_size": batch_size,
                            "checkpoint": None if checkpoint is None else Path(checkpoint).name,
                            "images_in_loader": loader_images, "per_rank_loader": per_rank})
        progress = progress and rank == 0
    stages = Stages(device, profile)
    lock = CheckpointLock(checkpoint, rank, world) if checkpoint is not None else contextlib.nullcontext()
    with lock, torch.no_grad():
        run = Run(states, config, classes, num_perturbations, sigma, max_drop, score, seed,
                   device, batch_size, memory_budget, autocast_dtype, stages, rank=rank, world=world,
                   shard=shard_accumulators)
        run.normalize = device_normalizer(normalize, device)
        run.channels_last = channels_last
        run.class_names_count = None if class_names is None else len(class_names)
        run.loader_images, run.max_images = loader_images, max_images
        run.per_rank, run.local_images = per_rank, local_images
        resumed = run.resume(checkpoint) if checkpoint is not None else False
        _stream_or_reuse(run, loader, progress, checkpoint, checkpoint_every, max_images, world)
        _warn_underdetermined(run, states, num_perturbations)
        with stages("solve"):
            weights, intercepts, lams, solver_meta = run.solve(lam, lam_ratio, rho, max_iter, tol,
                                                               fit_intercept, positive)
        for st in states:
            if solver_meta[st.name]["message"]:
                warnings.warn(solver_meta[st.name]["message"], UserWarning, stacklevel=2)

    chosen = run.classes
    names = _names_of_chosen(class_names, chosen, run.num_outputs)
    meta = _meta(config, run, states, stages, solver_meta, lams, resumed, world, device, layers_default=layers is None,
                 lam=lam, lam_ratio=lam_ratio, rho=rho, max_iter=max_iter, tol=tol, fit_intercept=fit_intercept,
                 positive=positive, channels_last=run.channels_last_note or channels_last)
    return Importance(weights, chosen, class_names=names, meta=meta,
                      intercepts=intercepts if fit_intercept else None, feature_means=run.feature_means)


def _loader_kind(loader, rank: int, world: int) -> tuple[bool, int | None, int | None]:
    """(per_rank, images in the whole dataset, images of this rank's share): per_rank when the loader reads
    a `RankSlice` (this rank's own images) under torch.distributed; its rank and world must be this process's."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, RankSlice):
        if (dataset.rank, dataset.world) != (rank, world):
            raise ValueError(f"loader: its RankSlice is rank {dataset.rank} of {dataset.world}, but this process is "
                             f"rank {rank} of {world}; build it with RankSlice(dataset, dist.get_rank(), "
                             "dist.get_world_size())")
        sampler = getattr(loader, "sampler", None)
        if sampler is not None and not isinstance(sampler, torch.utils.data.SequentialSampler):
            raise ValueError(f"loader: a RankSlice must be read in order (shuffle=False, no sampler): its item j is "
                             f"keyed by the global index rank + j*world; got a {type(sampler).__name__}")
        return world > 1, len(dataset.dataset), len(dataset)
    return False, (len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None), None


def _check_numbers(num_perturbations, max_iter, seed, batch_size, memory_budget, max_images, tol, checkpoint_every,
                   max_drop, rho, lam, lam_ratio) -> None:
    """distill's numeric arguments, each named with its value when it is wrong."""
    _int_arg("num_perturbations", num_perturbations, 1)
    if num_perturbations < 2:
        raise ValueError("num_perturbations must be >= 2: it counts the unperturbed network, so N=1 perturbs "
                         "nothing and there is nothing to fit W on; got 1")
    _int_arg("max_iter", max_iter, 1)
    _int_arg("seed", seed, None)
    for name, value in (("batch_size", batch_size), ("memory_budget", memory_budget), ("max_images", max_images)):
        if value is not None:
            _int_arg(name, value, 1)
    _float_arg("tol", tol, positive=True)
    _float_arg("checkpoint_every", checkpoint_every, positive=False)
    _float_arg("max_drop", max_drop, positive=True, upper=1.0)  # 0 would switch no channel off
    for name, value, strict in (("rho", rho, True), ("lam", lam, False), ("lam_ratio", lam_ratio, False)):
        if value is not None:
            _float_arg(name, value, positive=strict)
    if lam is not None and lam_ratio is not None:
        raise ValueError("give lam (absolute) or lam_ratio (fraction of each class's lambda_max), not both")


def _check_flags(**flags) -> None:
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False; got {value!r}")


def _meta(config: dict, run: Run, states, stages: Stages, solver_meta: dict, lams, resumed: bool, world: int,
          device: torch.device, layers_default: bool, **solve_args) -> dict:
    """imp.meta: the run's configuration, the solve's arguments and report, and what the pass saw."""
    from .. import __version__

    return {
        **config, **solve_args,
        "lam_per_class": lams, "images_seen": run.seen, "perturbations_per_image": config["num_perturbations"],
        "layer_shapes": {s.name: s.shape for s in states},
        "layers_default": layers_default,  # True: the layer was chosen by chip_ext.split.default_layer
        "sigma_used": {s.name: s.sigma for s in states},
        "empty_classes": run.empty_classes, "solver": solver_meta, "resumed": resumed,
        "resumed_at_image": run.resumed_at, "world_size": world, "shard_accumulators": run.shard,
        "per_rank_loader": run.per_rank,
        "fold": {s.name: s.fold_reason for s in states},
        "timing_s": dict(stages.seconds), "device": str(device), "chip_ext_version": __version__,
    }


def _pass_config(model: nn.Module, layer_list: list[str], classes, num_perturbations: int, sigma, max_drop: float,
                 target, seed: int, autocast_dtype, normalize) -> dict:
    """What makes a pass's sums what they are: a checkpoint resumes only under the same configuration."""
    config = {
        "layers": layer_list, "classes": None if classes is None else [int(c) for c in classes],
        "num_perturbations": num_perturbations, "sigma": sigma, "max_drop": max_drop,
        "target": _target_name(target), "seed": int(seed), "model": cached_model_fingerprint(model),
        "gates": GATE_STREAM, "autocast": None if autocast_dtype is None else str(autocast_dtype),
    }
    if normalize is not None:  # only when given: checkpoints written before the option still resume
        config["normalize"] = [list(normalize[0]), list(normalize[1])]
    return config
