"""Where gate_pool's time goes on a GPU (notes for tuning, benchmarks/NOTES.md): its traffic is almost all
writes (N gated copies of A), so its ceiling may be the write-only bandwidth rather than a copy's.

    python benchmarks/gpu/gate_pool_probe.py --ceilings    # write-only (fill) vs copy bandwidth, same bytes
    ncu --clock-control none -k regex:gate_pool_kernel -c 2 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis python benchmarks/gpu/gate_pool_probe.py --kernel
"""
import argparse

import torch

import chip_ext

p = argparse.ArgumentParser()
p.add_argument("--ceilings", action="store_true")
p.add_argument("--kernel", action="store_true")
args = p.parse_args()
B, N, K, HW = 64, 100, 512, 14
A = torch.rand(B, K, HW, HW, device="cuda", dtype=torch.bfloat16)
gates = torch.rand(B, N, K, device="cuda") < 0.7
if args.ceilings:
    def t(fn, n=20):
        for _ in range(3):
            fn()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / n / 1e3
    out_bytes = B * N * K * HW * HW * 2
    buf = torch.empty(out_bytes, dtype=torch.uint8, device="cuda")
    src = torch.empty(out_bytes // 2, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    print(f"write-only (fill_) {out_bytes / t(lambda: buf.fill_(3)) / 1e9:.0f} GB/s over {out_bytes / 1e9:.2f} GB")
    print(f"copy (read+write)  {out_bytes / t(lambda: dst.copy_(src)) / 1e9:.0f} GB/s over the same bytes")
    sec = t(lambda: chip_ext.gate_pool(A, gates))
    moved = out_bytes + A.numel() * 2 + gates.numel() + B * N * K * 4
    print(f"gate_pool bf16 K={K} {HW}x{HW}: {sec * 1e3:.3f} ms, {moved / sec / 1e9:.0f} GB/s")
if args.kernel:
    for _ in range(2):
        chip_ext.gate_pool(A, gates)
    torch.cuda.synchronize()
