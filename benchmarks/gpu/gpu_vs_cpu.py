"""W distilled on the GPU against W distilled on the CPU from the same images and gates (issue 15).

The CUDA path keeps float32 per-batch stages (pooled activations, scores, the gated Gram's inputs)
where the CPU path is float64, and cuDNN may run the network's convolutions in TF32 (PyTorch's
default for cuDNN). This distils EfficientNet-Lite0 at one layer (default `blocks.6`) from a few
dozen ImageNet-layout train images, with the library's default settings, four ways:

  cpu          the reference: device="cpu"
  cuda         device="cuda" as a user gets it (cuDNN TF32 on, PyTorch's default)
  cuda_fp32    device="cuda" with cuDNN TF32 off (only our float32 stages differ)
  cuda_bf16    device="cuda", autocast_dtype=torch.bfloat16
and, to tell the sums from the solve apart, `cuda_sums_cpu_solve`: the `cuda` run's checkpoint
re-solved on the CPU. For each against `cpu`: the accumulated sums' relative difference, W's
max |ΔW| / max |W| (overall and the worst class), relative Frobenius difference, channels whose sign
flips (+ to -), channels that enter or leave the support (and the largest |W_cpu| among them,
relative to its class's max), λ's relative difference, the top-10 channels per class, and the
normalised CHIP maps of 8 of the images (max |Δ| in [0, 1] units). Writes JSON.

    python benchmarks/gpu/gpu_vs_cpu.py --data DIR --out gpu_vs_cpu.json          # DIR: <wnid>/<image>
    python benchmarks/gpu/gpu_vs_cpu.py --device cpu --per-class 1 ...           # dry run: cpu against cpu
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import chip_ext
from chip_ext import data, models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "speed"))
from bench_ops import device_name  # noqa: E402


def distill(model, loader, layer, device, ckpt, **kw):
    t0 = time.perf_counter()
    imp = chip_ext.distill(model, loader, layer, device=device, checkpoint=ckpt, progress=False, **kw)
    return imp, time.perf_counter() - t0


def sums(path: Path, layer: str) -> list[torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [t.double() for t in state["layers"][layer]["acc"]]


def compare(imp, ref, layer: str, maps=None, ref_maps=None, acc=None, ref_acc=None) -> dict:
    W, R = imp.weights[layer].detach().cpu().double(), ref.weights[layer].detach().cpu().double()
    scale = R.abs().amax(dim=1).clamp_min(1e-300)
    sign_flips = (W * R < 0)
    support_change = (W != 0) != (R != 0)
    at_change = torch.where(support_change, R.abs() / scale[:, None], torch.zeros_like(R))
    top = lambda M: M.abs().topk(10, dim=1).indices  # noqa: E731
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top(W), top(R))]
    lam, lam_ref = (torch.as_tensor(m.meta["lam_per_class"][layer]).double() for m in (imp, ref))
    out = {
        "W_max_abs_diff_over_max_abs": float((W - R).abs().max() / R.abs().max()),
        "W_worst_class_max_abs_diff_over_its_max": float(((W - R).abs().amax(dim=1) / scale).max()),
        "W_rel_frobenius": float((W - R).norm() / R.norm()),
        "sign_flips": int(sign_flips.sum()),
        "support_changes": int(support_change.sum()),
        "support_size_ref": int((R != 0).sum()),
        "largest_ref_weight_at_a_support_change_over_class_max": float(at_change.max()),
        "lam_max_rel_diff": float(((lam - lam_ref).abs() / lam_ref.abs()).max()),
        "top10_overlap_mean": sum(overlap) / len(overlap),
        "top10_overlap_min": min(overlap),
    }
    if imp.intercepts is not None and ref.intercepts is not None:
        b, rb = imp.intercepts[layer].cpu().double(), ref.intercepts[layer].cpu().double()
        out["intercept_max_rel_diff"] = float((b - rb).abs().max() / rb.abs().max().clamp_min(1e-300))
    if acc is not None:
        out["sums_rel_diff"] = [float((a - r).norm() / r.norm().clamp_min(1e-300)) for a, r in zip(acc, ref_acc)]
    if maps is not None:
        out["map_max_abs_diff"] = float((maps - ref_maps).abs().max())
        out["map_mean_abs_diff"] = float((maps - ref_maps).abs().mean())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("CHIP_EXT_DATA", "../shared/data"))
                   / "imagenette" / "train", help="ImageNet-layout train folder (<wnid>/<image>)")
    p.add_argument("--per-class", type=int, default=5)
    p.add_argument("--layer", default="blocks.6")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="the device compared against the CPU (cpu: a dry run)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    model, pre = models.load("efficientnet_lite0")
    pre = dataclasses.replace(pre, squash=True)  # the shared images are squashed to 224
    ds = data.ImageNetTrain(args.data, pre, per_class=args.per_class)
    loader = DataLoader(ds, batch_size=args.batch, shuffle=False)
    images = torch.stack([ds[i][0] for i in range(0, len(ds), max(1, len(ds) // 8))][:8])
    work = Path(tempfile.mkdtemp(prefix="chip_gpu_vs_cpu_"))
    layer, dev = args.layer, args.device
    record = {"benchmark": "gpu_vs_cpu", "device": device_name(torch.device(dev)), "cpu": platform.processor()
              or platform.machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "model": "efficientnet_lite0", "layer": layer, "images": len(ds),
              "settings": "chip_ext.distill defaults (N=100, prob target, lam_ratio default, fit_intercept)",
              "cudnn_allow_tf32_default": torch.backends.cudnn.allow_tf32, "runs": {}}

    def chip_maps(imp):  # on the CPU: only W differs
        return chip_ext.explain(model, images, imp, layer=layer, target=[imp.classes[0]] * len(images))

    ref, sec = distill(model, loader, layer, "cpu", work / "cpu.ckpt")
    ref_acc, ref_maps = sums(work / "cpu.ckpt", layer), chip_maps(ref)
    record["runs"]["cpu"] = {"seconds": sec, "images_per_s": len(ds) / sec}
    print(f"cpu: {sec:.1f} s", flush=True)
    variants = {"cuda": ({}, True), "cuda_fp32": ({}, False), "cuda_bf16": ({"autocast_dtype": torch.bfloat16}, True)}
    for name, (kw, tf32) in variants.items():
        ck = work / f"{name}.ckpt"
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
            imp, sec = distill(model, loader, layer, dev, ck, **kw)
        rec = compare(imp, ref, layer, chip_maps(imp), ref_maps, sums(ck, layer), ref_acc)
        rec.update(seconds=sec, images_per_s=len(ds) / sec, cudnn_allow_tf32=tf32, **{k: str(v) for k, v in kw.items()})
        record["runs"][name] = rec
        print(f"{name}: {json.dumps(rec)}", flush=True)
        if name == "cuda":
            again, sec = distill(model, [], layer, "cpu", ck)  # the GPU's sums, solved on the CPU
            record["runs"]["cuda_sums_cpu_solve"] = {
                **compare(again, ref, layer), "seconds": sec,
                "W_rel_frobenius_vs_cuda_solve": float((again.weights[layer].double() - imp.weights[layer].cpu().double()
                                                        ).norm() / imp.weights[layer].cpu().double().norm())}
            print(f"cuda_sums_cpu_solve: {json.dumps(record['runs']['cuda_sums_cpu_solve'])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
