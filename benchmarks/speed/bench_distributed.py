"""Distillation across processes (torch.distributed, gloo on CPU): one process against two, with
replicated and with class-sharded accumulators. Reports wall time, the accumulator bytes each rank
holds, peak resident memory per rank, and the largest difference of W from the one-process run.
The model has random weights (no download); images are synthetic. Writes
benchmarks/results/distributed-<device>.json.

    python benchmarks/speed/bench_distributed.py            # ResNet-18 layer4 (K=512), 1000 classes, 112x112
    python benchmarks/speed/bench_distributed.py --world 4 --images 64
On a machine with fewer cores than ranks the ranks share the cores: the timings then show the
overheads (communication, duplicated loader work), not a speed-up.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def build(args):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.images, 3, args.size, args.size, generator=g)
    return model, [x[i:i + args.batch] for i in range(0, args.images, args.batch)]


def run_rank(args, rank, world, port, out):
    """One rank: distils and writes W, wall time and memory facts to out/rank<r>.pt."""
    import torch.distributed as dist

    import chip_ext

    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
    model, batches = build(args)
    t0 = time.perf_counter()
    imp = chip_ext.distill(model, batches, args.layer, num_perturbations=args.perturbations, progress=False,
                           shard_accumulators=args.shard, profile=True)
    wall = time.perf_counter() - t0
    K = imp.meta["layer_shapes"][args.layer][0]
    C = len(imp.classes)
    rows = (C * (rank + 1) // world - C * rank // world) if args.shard and world > 1 else C
    torch.save({"W": imp.weights[args.layer], "wall_s": wall, "timing_s": imp.meta["timing_s"],
                "accumulator_bytes": 8 * rows * (K * (K + 1) // 2 + K + 2),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
               Path(out) / f"rank{rank}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def launch(args, world, shard, out):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, __file__, "--_rank", "{r}", "--_world", str(world), "--_port", str(port),
            "--_out", str(out), "--images", str(args.images), "--size", str(args.size), "--batch", str(args.batch),
            "--perturbations", str(args.perturbations), "--layer", args.layer, "--threads", str(args.threads)]
    if shard:
        argv.append("--shard")
    t0 = time.perf_counter()
    procs = [subprocess.Popen([a.format(r=r) for a in argv]) for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")
    total = time.perf_counter() - t0
    ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return total, ranks


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--perturbations", type=int, default=16)
    p.add_argument("--layer", default="layer4")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads over all ranks")
    p.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("_rank", "_world", "_port", "_out"):
        p.add_argument(f"--{hidden}", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._rank is not None:
        return run_rank(args, int(args._rank), int(args._world), args._port, args._out)

    import tempfile

    from bench_ops import RESULTS, device_name, slug

    import chip_ext

    results = []
    reference = None
    for world, shard in [(1, False), (args.world, False), (args.world, True)]:
        with tempfile.TemporaryDirectory() as out:
            total, ranks = launch(args, world, shard, out)
        W = ranks[0]["W"].double()
        if reference is None:
            reference = W
        row = {
            "processes": world, "accumulators": "sharded" if shard else "replicated",
            "wall_s_including_start": round(total, 2),
            "distill_s_per_rank": [round(r["wall_s"], 2) for r in ranks],
            "stage_s_rank0": {k: round(v, 2) for k, v in ranks[0]["timing_s"].items()},
            "accumulator_bytes_per_rank": [r["accumulator_bytes"] for r in ranks],
            "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
            "max_abs_diff_W_vs_1_process": float((W - reference).abs().max()),
            "max_abs_W": float(reference.abs().max()),
            "ranks_identical": all(torch.equal(r["W"], ranks[0]["W"]) for r in ranks),
        }
        results.append(row)
        print(json.dumps(row))
    torch.set_num_threads(args.threads)
    device = device_name(torch.device("cpu"))
    doc = {"benchmark": "bench_distributed", "date": dt.date.today().isoformat(), "device": device,
           "torch": torch.__version__, "chip_ext": chip_ext.__version__, "backend": "gloo",
           "config": {"model": "resnet18 (random weights)", "layer": args.layer, "images": args.images,
                      "size": args.size, "batch": args.batch, "perturbations": args.perturbations,
                      "classes": 1000, "torch_threads_over_all_ranks": args.threads},
           "results": results}
    path = RESULTS / f"distributed-{slug('cpu-' + device)}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
