"""End-to-end distillation speed: chip_ext.distill against the naive way a user would write it.

Naive: full forwards of the model with a forward hook that gates the layer's output, the perturbations
batched (all N gated networks of a batch's images in one forward of up to --naive-rows inputs), the same
precision, threads and images, then the same accumulation. Throughputs are for streaming the images (what both
do); the Lasso solve, once per distillation, is reported on its own. chip_ext: the prefix once per image, gate_pool, the
suffix on the gated copies (or, where the suffix's head folds exactly, `chip_ext.fold`: no gated
copies; both are run, "fp32" with the fold where it applies and "fp32 unfolded" without), gram_accumulate. Models have random weights (no download); images
are synthetic and already on the device. Each variant is timed without host syncs (profile=False); on a GPU the
per-stage seconds come from a second run with profile=True, which synchronises at every stage's end. On a GPU a
variant with cuDNN's autotuner (torch.backends.cudnn.benchmark) is timed too. Writes
benchmarks/results/distill-<device>.json.

    python benchmarks/speed/bench_distill.py                  # CPU sizes: 112x112, N=16, 100 classes
    python benchmarks/speed/bench_distill.py --size 224 --perturbations 100 --classes 1000 --images 64
    python benchmarks/speed/bench_distill.py --models vgg16,resnet50,efficientnet_lite0 --size 64 \
        --perturbations 100 --classes 1000 --images 8 --naive-images 8   # the fold's CPU goal
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

import chip_ext
from chip_ext.gates import proximity, sample_gates

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import RESULTS, device_name, slug, sync  # noqa: E402

MODELS = {
    "vgg16": (lambda: torchvision.models.vgg16(weights=None), "features.29"),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), "layer4"),
    "vgg16_conv1_2": (lambda: torchvision.models.vgg16(weights=None), "features.3"),
    "efficientnet_lite0": (lambda: __import__("timm").create_model("efficientnet_lite0", pretrained=False), "bn2"),
}


def naive_distill(model, layer, images, N, classes, seed, device, batch, rows=64):
    """Full forwards of the gated networks, gating the layer's output with a hook, the perturbations
    batched (up to `rows` inputs a forward); same sums."""
    module = dict(model.named_modules())[layer]
    state = {}

    def gate_hook(_m, _inp, out):
        return out * state["d"][:, :, None, None].to(out.dtype)

    handle = module.register_forward_hook(gate_hook)
    acc = None
    cls = torch.tensor(classes, device=device)
    try:
        with torch.no_grad():
            for i0 in range(0, images.shape[0], batch):
                x = images[i0:i0 + batch]
                B = x.shape[0]
                state["d"] = torch.ones(1, 1, device=device)
                feats = {}
                h2 = module.register_forward_hook(lambda m, i, o: feats.setdefault("A", o.detach().clone()))
                model(x)
                h2.remove()
                A = feats["A"]
                K = A.shape[1]
                gates = sample_gates(range(i0, i0 + B), N, K, seed=seed, layer=layer, device=device)
                h = proximity(gates, (K / 4) ** 0.5)
                inputs = x[:, None].expand(B, N, *x.shape[1:]).reshape(B * N, *x.shape[1:])
                d = gates.reshape(B * N, K).float()
                logits = []
                for r0 in range(0, B * N, rows):
                    state["d"] = d[r0:r0 + rows]
                    logits.append(model(inputs[r0:r0 + rows]).float())
                logits = torch.cat(logits).reshape(B, N, -1)  # [B, N, C_out]
                f = torch.softmax(logits[:, 0], -1)[:, cls]
                g = torch.softmax(logits, -1)[..., cls].contiguous()
                if acc is None:
                    acc = chip_ext.new_accumulators(len(classes), K, device)
                chip_ext.gram_accumulate(*acc, A.float().mean((2, 3)), gates, h, f.contiguous(), g)
    finally:
        handle.remove()
    return acc


def forward_gmac(model, layer, size, device):
    """Multiply-accumulates of a full forward and of the suffix after `layer`, per image (conv+linear)."""
    macs = {"total": 0, "after": 0}
    seen = {"cut": False}
    hooks = []

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            n = out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            n = m.in_features * m.out_features
        macs["total"] += n
        if seen["cut"]:
            macs["after"] += n

    def cut(m, i, o):
        seen["cut"] = True

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    hooks.append(dict(model.named_modules())[layer].register_forward_hook(cut))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size, device=device))
    for h in hooks:
        h.remove()
    return macs["total"] / 1e9, macs["after"] / 1e9


def bench(name, args, device):
    make, layer = MODELS[name]
    torch.manual_seed(0)
    model = make().to(device).eval()
    images = torch.randn(args.images, 3, args.size, args.size, device=device)
    classes = list(range(args.classes))
    N = args.perturbations
    total_gmac, suffix_gmac = forward_gmac(model, layer, args.size, device)
    prefix_gmac = total_gmac - suffix_gmac
    loader = [images[i:i + args.batch] for i in range(0, args.images, args.batch)]

    runs = {}
    # (label, autocast dtype, fold, channels_last, cuDNN benchmark): distill's defaults are fold and channels_last
    variants = [("fp32", None, True, True, False), ("fp32 unfolded", None, False, True, False),
                ("fp32 nchw", None, True, False, False)]
    if device.type == "cuda":
        variants += [("bf16 autocast", torch.bfloat16, True, True, False),
                     ("bf16 autocast unfolded", torch.bfloat16, False, True, False),
                     ("bf16 autocast nchw", torch.bfloat16, True, False, False),
                     ("bf16 autocast cudnn benchmark", torch.bfloat16, True, True, True)]
    weights = {}
    budget = None if args.memory_budget_mib is None else int(args.memory_budget_mib * 2**20)
    for label, dtype, fold, nhwc, autotune in variants:
        kw = dict(num_perturbations=N, progress=False, autocast_dtype=dtype, memory_budget=budget, fold=fold,
                  max_iter=args.max_iter, channels_last=nhwc)
        torch.backends.cudnn.benchmark = autotune
        chip_ext.distill(model, loader[:1], layer, classes=classes[:10], **kw)  # warm-up
        if autotune:  # cuDNN autotunes each new shape once: the tail batch's too
            chip_ext.distill(model, loader[-1:], layer, classes=classes[:10], **kw)
        sync(device)
        t0 = time.perf_counter()
        imp = chip_ext.distill(model, loader, layer, classes=classes, **kw)  # no host syncs per stage
        weights[label] = imp.weights[layer].float().cpu()
        sync(device)
        total = time.perf_counter() - t0
        # the stages, from a second run that synchronises at each stage's end (profile=True)
        profiled = chip_ext.distill(model, loader, layer, classes=classes, profile=True, **kw) \
            if device.type == "cuda" else imp
        torch.backends.cudnn.benchmark = False
        solve = imp.meta["timing_s"]["solve"]
        sec = total - solve  # streaming over the images; the solve is once per distillation
        useful = args.images * (prefix_gmac + N * suffix_gmac) * 2e9  # FLOPs
        runs[label] = {
            "seconds_total": total, "seconds_streaming": sec, "seconds_solve": solve,
            "images_per_s": args.images / sec, "perturbed_nets_per_s": args.images * N / sec,
            "useful_TFLOP_per_s": useful / sec / 1e12, "stage_seconds": profiled.meta["timing_s"],
            "stage_seconds_profiled": device.type == "cuda",
            "solver": imp.meta["solver"][layer], "fold": imp.meta["fold"][layer],
        }
    ref = weights["fp32 unfolded"]
    for label, W in weights.items():  # W of each path against the unfolded fp32 one
        runs[label]["W_max_abs_diff_vs_fp32_unfolded"] = float((W - ref).abs().max())
        runs[label]["W_max_abs"] = float(ref.abs().max())

    n_naive = min(args.images, args.naive_images)
    sync(device)
    t0 = time.perf_counter()
    naive_distill(model, layer, images[:n_naive], N, classes, 0, device, args.batch, args.naive_rows)
    sync(device)
    naive_sec = time.perf_counter() - t0
    naive_ips = n_naive / naive_sec
    return {
        "model": name, "layer": layer, "size": args.size, "N": N, "classes": len(classes),
        "images": args.images, "batch": args.batch,
        "gmac_full_forward": total_gmac, "gmac_suffix": suffix_gmac,
        "chip_ext": runs,
        "naive": {"images": n_naive, "seconds": naive_sec, "images_per_s": naive_ips,
                  "perturbed_nets_per_s": naive_ips * N},
        "speedup_vs_naive": runs["fp32"]["images_per_s"] / naive_ips,  # streaming vs streaming
        "speedup_unfolded_vs_naive": runs["fp32 unfolded"]["images_per_s"] / naive_ips,
        "speedup_fold": runs["fp32"]["images_per_s"] / runs["fp32 unfolded"]["images_per_s"],
        "speedup_channels_last": runs["fp32"]["images_per_s"] / runs["fp32 nchw"]["images_per_s"],
    }


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--models", default="vgg16,resnet50")
    p.add_argument("--size", type=int, default=224 if gpu else 112)
    p.add_argument("--perturbations", type=int, default=100 if gpu else 16)
    p.add_argument("--classes", type=int, default=1000 if gpu else 100)
    p.add_argument("--images", type=int, default=64 if gpu else 16)
    p.add_argument("--batch", type=int, default=16 if gpu else 4)
    p.add_argument("--naive-images", type=int, default=4 if gpu else 2)
    p.add_argument("--max-iter", type=int, default=1000,
                   help="the solver's max_iter (the solve is timed apart from the pass; lower it where it is "
                        "underdetermined and slow, and W is then not compared)")
    p.add_argument("--naive-rows", type=int, default=64, help="gated inputs a naive forward (64)")
    p.add_argument("--memory-budget-mib", type=float, default=None,
                   help="distill's memory_budget (default: chip_ext's default for the device)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = device_name(device)
    print(f"# bench_distill on {name}; torch {torch.__version__}; size {args.size}, N={args.perturbations}, "
          f"C={args.classes}, {args.images} images", flush=True)
    results = []
    for model in args.models.split(","):
        r = bench(model, args, device)
        results.append(r)
        for label, run in r["chip_ext"].items():
            stages = ", ".join(f"{k} {v:.2f}s" for k, v in run["stage_seconds"].items())
            print(f"{model:>14} {r['layer']:<12} {label:<14} {run['images_per_s']:8.2f} img/s "
                  f"{run['perturbed_nets_per_s']:9.1f} nets/s {run['useful_TFLOP_per_s'] * 1e3:8.1f} GFLOP/s  "
                  f"[{stages}]", flush=True)
        print(f"{model:>14} {r['layer']:<12} {'naive':<14} {r['naive']['images_per_s']:8.2f} img/s "
              f"{r['naive']['perturbed_nets_per_s']:9.1f} nets/s   -> chip_ext {r['speedup_vs_naive']:.1f}x faster "
              f"(unfolded {r['speedup_unfolded_vs_naive']:.1f}x; the fold {r['speedup_fold']:.2f}x)",
              flush=True)
    record = {"benchmark": "bench_distill", "device": name, "device_type": device.type,
              "memory_budget_mib": args.memory_budget_mib, "max_iter": args.max_iter,
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
              "chip_ext": chip_ext.__version__, "threads": torch.get_num_threads(), "results": results}
    out = args.out or RESULTS / f"distill-{slug(name if device.type == 'cuda' else 'cpu-' + name)}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
