"""Microbenchmarks of the two kernels on the current device, against eager PyTorch and torch.compile.

Sizes are those of VGG16 conv5_3 (K=512, 14x14, N=100 perturbations) and ImageNet (C=1000 classes);
on a CPU the batch is smaller so a run takes about a minute or two. Writes
benchmarks/results/<device>.json (or --out) and prints a table. Nothing here asserts a timing.

    python benchmarks/speed/bench_ops.py [--device cpu|cuda] [--batch B] [--gram-batch B] [--no-compile]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import chip_ext
from chip_ext.packing import pack_triu, packed_size
from chip_ext.reference import gate_pool_reference, gram_accumulate_reference

RESULTS = Path(__file__).resolve().parents[1] / "results"


# ------------------------------------------------------------------------------------ helpers


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 1) -> dict:
    """Median and min seconds of `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeat": repeat}


def compiled(fn: Callable, enabled: bool) -> Callable | None:
    if not enabled:
        return None
    return torch.compile(fn, dynamic=False)


# ------------------------------------------------------------------------------------ gate_pool


def eager_gate_pool(A: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a user would write, in A's dtype: broadcast multiply, then pool."""
    B, K, H, W = A.shape
    d = gates.to(A.dtype)
    gated = (A.unsqueeze(1) * d[:, :, :, None, None]).reshape(B * gates.shape[1], K, H, W)
    z = gates.float() * A.float().mean(dim=(2, 3)).unsqueeze(1)
    return gated, z


def bench_gate_pool(device, B, N, K, H, W, dtype, repeat, use_compile) -> dict:
    A = (torch.randn(B, K, H, W, device=device) + 0.5).to(dtype)
    gates = torch.rand(B, N, K, device=device) < 0.7
    es = A.element_size()
    bytes_moved = B * K * H * W * es + B * N * K * H * W * es + B * N * K * (4 + 1)
    gated, z = chip_ext.gate_pool(A, gates)
    ref_gated, ref_z = gate_pool_reference(A, gates)
    exact = bool(torch.equal(gated, ref_gated))
    z_err = float((z.double() - ref_z.double()).norm() / ref_z.double().norm())
    del gated, z, ref_gated, ref_z

    impls = {
        "chip_ext.gate_pool": lambda: chip_ext.gate_pool(A, gates),
        "eager (same dtype)": lambda: eager_gate_pool(A, gates),
        "eager float64 reference": lambda: gate_pool_reference(A, gates),
    }
    c = compiled(eager_gate_pool, use_compile)
    if c is not None:
        impls["torch.compile (same dtype)"] = lambda: c(A, gates)
    rows = {}
    for name, fn in impls.items():
        t = timeit(fn, device, repeat if "float64" not in name else max(1, repeat // 2))
        t["GB_per_s"] = bytes_moved / t["median_s"] / 1e9
        rows[name] = t
    base = rows["chip_ext.gate_pool"]["median_s"]
    for name, r in rows.items():
        r["speedup_of_chip_ext"] = r["median_s"] / base
    # the ceiling: a plain device copy moving the same bytes (read + write), into a reused buffer
    src = torch.empty(bytes_moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = timeit(lambda: dst.copy_(src), device, repeat)
    copy_GBps = 2 * src.numel() / copy["median_s"] / 1e9
    del src, dst
    # the ceiling of an op that is almost all writes: filling a buffer the size of the N gated copies; the
    # fraction is the time that fill takes over gate_pool's time (A's one read and z are gate_pool's extra)
    written = B * N * K * H * W * es
    out = torch.empty(written, dtype=torch.uint8, device=device)
    fill = timeit(lambda: out.fill_(1), device, repeat)
    del out
    write_GBps = written / fill["median_s"] / 1e9
    return {"op": "gate_pool", "shape": dict(B=B, N=N, K=K, H=H, W=W), "dtype": str(dtype),
            "bytes_moved": bytes_moved, "bytes_written": written, "gated_bit_exact_vs_reference": exact,
            "z_rel_error_vs_float64": z_err, "impls": rows, "copy_same_bytes_GB_per_s": copy_GBps,
            "fraction_of_copy_bandwidth": rows["chip_ext.gate_pool"]["GB_per_s"] / copy_GBps,
            "write_only_same_bytes_GB_per_s": write_GBps,
            "fraction_of_write_only": fill["median_s"] / rows["chip_ext.gate_pool"]["median_s"]}


# ------------------------------------------------------------------------------------ gram_accumulate


def eager_gram_float32(G, b, y, n, zs, gs, a, gates, h, f, g):
    """What a user would write with float32 batch work and float64 sums (no custom kernel)."""
    z = gates.float() * a.unsqueeze(1)
    M = (z * h.unsqueeze(2)).transpose(1, 2) @ z
    G += (f.T @ pack_triu(M)).double()
    w = f.unsqueeze(1) * h.unsqueeze(2)
    b += torch.einsum("snc,snk->ck", w * g, z).double()
    y += (w * g * g).sum(dim=(0, 1)).double()
    n += w.sum(dim=(0, 1)).double()
    zs += torch.einsum("snc,snk->ck", w, z).double()  # first moments (fit_intercept)
    gs += (w * g).sum(dim=(0, 1)).double()


def bench_gram(device, B, N, K, C, repeat, use_compile) -> dict:
    a = torch.rand(B, K, device=device) + 0.05
    gates = torch.rand(B, N, K, device=device) < 0.7
    h = torch.rand(B, N, device=device) * 0.9 + 0.1
    f = torch.softmax(torch.randn(B, C, device=device), 1)
    g = torch.softmax(torch.randn(B, N, C, device=device), 2)
    P = packed_size(K)
    # useful FLOPs: M_s (B*N*P multiply-adds), F^T M (C*B*P), U^T Z and W^T Z (2*C*B*N*K: Σfhgz, Σfhz)
    flops = 2 * (B * N * P + C * B * P + 2 * C * B * N * K)

    acc = chip_ext.new_accumulators(C, K, device)
    Cr = min(C, 64)  # the float64 reference on the CPU checks the first 64 classes (each class is independent)
    ref = chip_ext.new_accumulators(Cr, K, "cpu")
    chip_ext.gram_accumulate(*acc, a, gates, h, f, g)
    gram_accumulate_reference(*ref, a.cpu(), gates.cpu(), h.cpu(), f[:, :Cr].cpu(), g[..., :Cr].contiguous().cpu())
    errors = {name: float((x[:Cr].cpu() - r).norm() / r.norm()) for name, x, r in zip(("G", "b", "y", "n", "zs", "gs"), acc, ref)}
    del ref

    impls = {
        "chip_ext.gram_accumulate": lambda: chip_ext.gram_accumulate(*acc, a, gates, h, f, g),
        "eager (float32 batch, float64 sums)": lambda: eager_gram_float32(*acc, a, gates, h, f, g),
        "eager float64 reference": lambda: gram_accumulate_reference(*acc, a, gates, h, f, g),
    }
    c = compiled(eager_gram_float32, use_compile)
    if c is not None:
        impls["torch.compile (float32 batch)"] = lambda: c(*acc, a, gates, h, f, g)
    rows = {}
    for name, fn in impls.items():
        t = timeit(fn, device, repeat)
        t["GFLOP_per_s"] = flops / t["median_s"] / 1e9
        rows[name] = t
    base = rows["chip_ext.gram_accumulate"]["median_s"]
    for r in rows.values():
        r["speedup_of_chip_ext"] = r["median_s"] / base
    # the ceiling: an fp32 GEMM of the dominant shape, F^T [C, B*N] @ Z_h [B*N, P'], P' = P / N so
    # that it does the same useful FLOPs as the op (without TF32)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    cols = max(1, flops // (2 * C * B * N))
    x = torch.randn(C, B * N, device=device)
    y = torch.randn(B * N, cols, device=device)
    gemm = timeit(lambda: x @ y, device, repeat)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    gemm_GFLOPs = 2 * C * B * N * cols / gemm["median_s"] / 1e9
    del x, y
    return {"op": "gram_accumulate", "shape": dict(B=B, N=N, K=K, C=C), "useful_flops": flops,
            "rel_error_vs_float64": errors, "impls": rows,
            "fp32_gemm_same_flops": {"shape": [C, B * N, cols], "GFLOP_per_s": gemm_GFLOPs},
            "fraction_of_fp32_gemm": rows["chip_ext.gram_accumulate"]["GFLOP_per_s"] / gemm_GFLOPs}


# ------------------------------------------------------------------------------------ gates


def bench_gates(device, B, N, K, repeat) -> dict:
    """sample_gates on the device (the gate stream is hashed there): the cost per image, which
    must stay far below the suffix's cost per image for the GPU to be the bottleneck. The kernel
    (a loader's consecutive indices) against the same bits in PyTorch ops (`sample_gates_reference`)."""
    from chip_ext.distillation.gates import sample_gates, sample_gates_reference

    impls = {}
    for name, fn in (("chip_ext.sample_gates", sample_gates), ("pytorch_ops_reference", sample_gates_reference)):
        t = timeit(lambda: fn(range(1000, 1000 + B), N, K, seed=0, layer="layer4", device=device), device, repeat)
        t["ms_per_image"] = t["median_s"] / B * 1e3
        impls[name] = t
    return {"op": "sample_gates", "shape": dict(B=B, N=N, K=K), "impls": impls}


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="images per gate_pool call (cpu 4, cuda 64)")
    parser.add_argument("--gram-batch", type=int, default=None, help="images per gram call (cpu 8, cuda 64)")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per implementation")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/<device>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    B = args.batch or (64 if gpu else 4)
    Bg = args.gram_batch or (64 if gpu else 8)
    repeat = args.repeat or (20 if gpu else 3)
    name = device_name(device)
    print(f"# bench_ops on {name}; torch {torch.__version__}", flush=True)

    results = []
    dtypes = [torch.float32, torch.bfloat16] if gpu else [torch.float32]
    # VGG16 conv5_3 (K=512, 14x14); on a GPU also ResNet-50 layer4 (K=2048, 7x7)
    layers = [(512, 14)] + ([(2048, 7)] if gpu else [])
    for K, hw in layers:
        for dtype in dtypes:
            results.append(bench_gate_pool(device, B, 100, K, hw, hw, dtype, repeat,
                                           not args.no_compile and K == 512))  # compiles cost ~1 min each
            print(f"  gate_pool K={K} {dtype} done", flush=True)
    if gpu:  # a small piece (2 images): too few image x tile blocks, so the copies are split into groups
        results.append(bench_gate_pool(device, 2, 100, 512, 14, 14, torch.bfloat16, repeat, False))
    for K, _ in layers:
        results.append(bench_gram(device, Bg, 100, K, 1000, repeat, not args.no_compile and K == 512))
        print(f"  gram_accumulate K={K} done", flush=True)
    for K in (512, 2048):
        results.append(bench_gates(device, 64 if gpu else 8, 100, K, repeat))
    print("  sample_gates done", flush=True)

    record = {
        "benchmark": "bench_ops",
        "device": name,
        "device_type": device.type,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "chip_ext": chip_ext.__version__,
        "build": chip_ext.build_info(),
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "results": results,
    }
    out = args.out or RESULTS / f"{slug(name if gpu else 'cpu-' + name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")

    print(f"\n{'op':<16} {'shape':<34} {'implementation':<38} {'median ms':>10} {'rate':>14} {'x':>7}")
    for r in results:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["op"] == "gate_pool":
            shape += f",{r['dtype'].replace('torch.', '')}"
        for impl, t in r["impls"].items():
            rate = (f"{t['GB_per_s']:.1f} GB/s" if "GB_per_s" in t else
                    f"{t['GFLOP_per_s']:.1f} GFLOP/s" if "GFLOP_per_s" in t else f"{t['ms_per_image']:.2f} ms/img")
            print(f"{r['op']:<16} {shape:<34} {impl:<38} {t['median_s'] * 1e3:>10.2f} {rate:>14} "
                  f"{t.get('speedup_of_chip_ext', 1.0):>6.1f}x")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
