"""The folded head alone (`chip_ext.fold.Fold.logits`) at VGG16 `features.29` (and ResNet-50 `layer4`, a pooled
head, where it is now one GEMM): the current layout (the Linear's
weight laid out once a call as [K, O, P], Q_s by one batched GEMM) against the einsum it replaced (which permuted
the 411 MB weight on every call, and still runs the first `LAYOUT_AFTER_CALLS` calls of a distillation),
interleaved in one process, median of --repeats; the first-Linear outputs of
both are compared. Also the cost per image by chunk size, and the one-off layout of the weight. Random weights,
random activations. Writes benchmarks/results/fold-<machine>.json.

    python benchmarks/speed/bench_fold.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

from chip_ext.distillation.fold import find_fold
from chip_ext.distillation.views import inference_view, split_on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import RESULTS, device_name  # noqa: E402


def einsum_logits(fold, A: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The replaced implementation: Q_s by einsum over the weight viewed as [O, K, P]."""
    B, K = A.shape[:2]
    N = gates.shape[1]
    p = fold.head(A).reshape(B, K, -1)
    W = fold.weight.to(p.dtype).reshape(fold.weight.shape[0], K, -1)
    Q = torch.einsum("okp,bkp->bok", W, p)
    y = torch.bmm(gates.to(Q.dtype), Q.transpose(1, 2))
    if fold.bias is not None:
        y = y + fold.bias.to(y.dtype)
    return fold.tail(y.reshape(B * N, -1))


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(old, new, repeats: int) -> tuple[float, float]:
    """Median seconds of `old` and of `new`, called alternately (this machine's speed drifts within minutes)."""
    t_old, t_new = [], []
    for _ in range(repeats):
        t_old.append(median_s(old, 1))
        t_new.append(median_s(new, 1))
    return statistics.median(t_old), statistics.median(t_new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    prefix, suffix = split_on(model, inference_view(model, torch.device("cpu")), "features.29")
    fold, why = find_fold(suffix)
    assert fold is not None, why
    rows, chunks = [], []
    with torch.no_grad():
        t0 = time.perf_counter()
        fold._weight_by_channel(torch.float32, 512)
        layout_s = time.perf_counter() - t0
        for size, B, N in ((112, 3, 16), (112, 3, 100), (224, 3, 100)):
            h = size // 16  # conv5_3's map
            A = torch.relu(torch.randn(B, 512, h, h))
            gates = torch.rand(B, N, 512) < 0.7
            old, new = einsum_logits(fold, A, gates), fold.logits(A, gates)
            diff = float((old - new).abs().max() / old.abs().max())
            t_old, t_new = interleaved(lambda: einsum_logits(fold, A, gates), lambda: fold.logits(A, gates),
                                       args.repeats)
            rows.append({"layer": "vgg16 features.29", "size": size, "images": B, "N": N, "einsum_ms": t_old * 1e3, "current_ms": t_new * 1e3,
                         "speedup": t_old / t_new, "logits_max_rel_diff": diff})
            print(f"{size} px, {B} images, N={N}: einsum {t_old * 1e3:.0f} ms, now {t_new * 1e3:.0f} ms "
                  f"({t_old / t_new:.2f}x); logits differ by {diff:.1e} (relative)", flush=True)
        for B in (1, 3, 6, 12, 24):
            A = torch.relu(torch.randn(B, 512, 7, 7))
            gates = torch.rand(B, 100, 512) < 0.7
            fold.logits(A, gates)
            ms = median_s(lambda: fold.logits(A, gates), args.repeats) / B * 1e3
            chunks.append({"images": B, "N": 100, "ms_per_image": ms})
            print(f"chunk of {B} images, N=100: {ms:.1f} ms an image", flush=True)
    # a pooled head (P = 1): ResNet-50 layer4, where the current code is one GEMM over all B·N rows
    resnet = torchvision.models.resnet50(weights=None).eval()
    _, suffix = split_on(resnet, inference_view(resnet, torch.device("cpu")), "layer4")
    pooled, why = find_fold(suffix)
    assert pooled is not None, why
    with torch.no_grad():
        for B in (3, 16):
            A = torch.relu(torch.randn(B, 2048, 7, 7))
            gates = torch.rand(B, 100, 2048) < 0.7
            old, new = einsum_logits(pooled, A, gates), pooled.logits(A, gates)
            diff = float((old - new).abs().max() / old.abs().max())
            t_old, t_new = interleaved(lambda: einsum_logits(pooled, A, gates), lambda: pooled.logits(A, gates),
                                       args.repeats)
            rows.append({"layer": "resnet50 layer4", "size": 224, "images": B, "N": 100, "einsum_ms": t_old * 1e3,
                         "current_ms": t_new * 1e3, "speedup": t_old / t_new, "logits_max_rel_diff": diff})
            print(f"ResNet-50 layer4, {B} images, N=100: einsum {t_old * 1e3:.0f} ms, now {t_new * 1e3:.0f} ms "
                  f"({t_old / t_new:.2f}x); logits differ by {diff:.1e}", flush=True)
    print(f"the weight laid out once a call: {layout_s * 1e3:.0f} ms")
    record = {"benchmark": "fold", "device": device_name(torch.device("cpu")), "threads": args.threads,
              "date": dt.date.today().isoformat(), "torch": torch.__version__,
              "weight_layout_once_ms": layout_s * 1e3, "calls": rows, "chunks": chunks}
    out = args.out or RESULTS / f"fold-cpu-{args.threads}-threads.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
