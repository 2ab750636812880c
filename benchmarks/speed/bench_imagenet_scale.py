"""ImageNet through CHIP, end to end: real JPEGs from disk, decoded, distilled, and the projection to the
1,281,167 ImageNet train images.

Sources, read round-robin until --images are reached: the 12,894 shared Imagenette train images (224 px
already: optimistic) and the shared ILSVRC val images at their original resolution (`ilsvrc-fullres`:
pessimistic; ImageNet's train images are about 400 x 350 on average). Decoding either by DataLoader
workers (PIL, resize 256 + centre crop 224, --workers processes) or on the GPU
(`torchvision.io.decode_jpeg(device="cuda")` on the file bytes the workers read, resize and crop there).
For each model, layer and decoder:

- loader rate: the loader alone (decode, resize, crop, normalise, to the device), images/s;
- GPU rate: `distill` on images already on the device (the same batches, synthetic), images/s;
- end to end: `distill(model, loader)` with N perturbations and C classes; the steady-state rate from the
  time stamps of the batches after the first 10%, the start-up (call to first batch), the solve;
- the projection: start-up + 1,281,167 / end-to-end rate + solve, each term measured; and on paper for 8
  GPUs: the rate x 8 if the loader keeps up (its measured rate per worker x workers a GPU says whether),
  plus the one reduce of the float64 sums at the end (C·(K(K+1)/2 + 2K + 3)·8 bytes, over NVLink at the
  given --link-GBps), as `distill` under torchrun does (replicated accumulators: no traffic per step); and what
  the sharded path would all-gather per step at that rate ((K + N + C + N·C)·4 + N·K bytes an image).

    python benchmarks/speed/bench_imagenet_scale.py                       # on the GPU machine (~10 min)
    python benchmarks/speed/bench_imagenet_scale.py --dry-run             # CPU, tiny sizes: checks the script
Writes benchmarks/results/imagenet_scale-<device>.json (--out; a dry run /tmp/imagenet_scale-dryrun.json).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

import chip_ext

DATA = Path(os.environ.get("CHIP_EXT_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
RESULTS = Path(__file__).resolve().parents[1] / "results"
IMAGENET_TRAIN = 1_281_167
MODELS = {"vgg16": (torchvision.models.vgg16, "features.29"), "resnet50": (torchvision.models.resnet50, "layer4"),
          "resnet18": (torchvision.models.resnet18, "layer4")}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def jpeg_files(sources: list[str]) -> list[Path]:
    """The JPEGs of each source (a name below, or a folder), interleaved one of each source in turn."""
    roots = {"imagenette": DATA / "imagenette" / "train", "fullres": DATA / "ilsvrc-fullres" / "val"}
    folders = [roots.get(s, Path(s)) for s in sources]
    lists = [sorted(f for f in folder.rglob("*") if f.suffix.lower() in (".jpeg", ".jpg")) for folder in folders]
    if not all(lists):
        raise FileNotFoundError(f"no JPEG under {[str(f) for f, l in zip(folders, lists) if not l]}")
    out = []  # round-robin: one file of each source in turn
    for i in range(max(len(l) for l in lists)):
        out += [l[i % len(l)] for l in lists]
    return out


class Decoded(Dataset):
    """PIL decoding in the workers: resize(size·8/7) + centre crop(size), uint8 [3, size, size] (a quarter of the
    bytes of floats to collate, pin and copy; distill normalises on the device)."""

    def __init__(self, files: list[Path], n: int, size: int):
        from torchvision import transforms as T

        self.files, self.n = files, n
        self.tf = T.Compose([T.Resize(size * 8 // 7), T.CenterCrop(size), T.PILToTensor()])

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i % len(self.files)]) as im:
            return self.tf(im.convert("RGB"))


class Encoded(Dataset):
    """The workers read the file bytes only (uint8 tensors); the GPU decodes."""

    def __init__(self, files: list[Path], n: int):
        self.files, self.n = files, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torchvision.io.read_file(str(self.files[i % len(self.files)]))


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] images -> normalised, as distill(normalize=(MEAN, STD)) does on the device."""
    from chip_ext.distillation.streaming import device_normalizer

    return device_normalizer((MEAN, STD), x.device)(x)


def cpu_batches(files, n, size, batch, workers, device):
    """uint8 batches in pinned host memory: distill copies each to the GPU one batch ahead on a side stream
    and normalises it there (normalize=(MEAN, STD))."""
    loader = DataLoader(Decoded(files, n, size), batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    yield from loader


def gpu_batches(files, n, size, batch, workers, device):
    from torchvision.transforms.v2 import functional as TF

    loader = DataLoader(Encoded(files, n), batch_size=batch, num_workers=workers, collate_fn=list,
                        prefetch_factor=4 if workers else None)
    for data in loader:
        images = torchvision.io.decode_jpeg(data, device=device, mode=torchvision.io.ImageReadMode.RGB)
        yield torch.stack([TF.center_crop(TF.resize(im, [size * 8 // 7], antialias=True), [size, size])
                           for im in images])  # uint8 on the device; distill normalises


class Stamped:
    """Wraps a batch iterator; remembers when each batch was handed out and how many images it had."""

    def __init__(self, it):
        self.it, self.stamps = it, []

    def __iter__(self):
        for x in self.it:
            self.stamps.append((time.perf_counter(), x.shape[0]))
            yield x


def steady_rate(stamps, skip: float = 0.1) -> float:
    """Images per second between the batch at `skip` of the run and the last one."""
    if len(stamps) < 3:
        return float("nan")
    first = max(1, int(len(stamps) * skip))
    t0, t1 = stamps[first][0], stamps[-1][0]
    images = sum(n for _, n in stamps[first:-1])
    return images / max(t1 - t0, 1e-9)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(make, device) -> float:
    """The loader alone: decoded, on the device and normalised, images/s."""
    t0, n = time.perf_counter(), 0
    for x in make():
        normalise(x.to(device, non_blocking=True))
        n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0)


def bench(name: str, args, files, device, decode: str) -> dict:
    make_model, layer = MODELS[name]
    torch.manual_seed(0)
    model = make_model(weights=None).to(device).eval()
    kw = dict(num_perturbations=args.perturbations, classes=list(range(args.classes)), progress=False,
              autocast_dtype=torch.bfloat16 if device.type == "cuda" else None, normalize=(MEAN, STD))
    batches = cpu_batches if decode == "workers" else gpu_batches
    make = lambda: batches(files, args.images, args.size, args.batch, args.workers, device)  # noqa: E731
    rate_loader = loader_rate(make, device)
    synthetic = [torch.rand(args.batch, 3, args.size, args.size, device=device)  # in [0, 1], as normalize takes
                 for _ in range(max(3, args.gpu_batches))]
    chip_ext.distill(model, synthetic[:1], layer, **kw)  # warm-up (kernels, cuDNN plans, the trace)
    sync(device)
    t0 = time.perf_counter()
    chip_ext.distill(model, synthetic, layer, **kw)
    sync(device)
    rate_gpu_with_solve = len(synthetic) * args.batch / (time.perf_counter() - t0)
    stamped = Stamped(make())
    t_call = time.perf_counter()
    imp = chip_ext.distill(model, stamped, layer, **kw)
    sync(device)
    t_end = time.perf_counter()
    solve = imp.meta["timing_s"]["solve"]
    rate = steady_rate(stamped.stamps)
    startup = stamped.stamps[0][0] - t_call if stamped.stamps else float("nan")
    K = imp.weights[layer].shape[1]
    sums_bytes = args.classes * (K * (K + 1) // 2 + 2 * K + 3) * 8
    reduce_s = sums_bytes / (args.link_gbps * 1e9)
    N, C = args.perturbations, args.classes
    sharded_bytes = (K + N + C + N * C) * 4 + N * K
    return {
        "model": name, "layer": layer, "decode": decode, "K": K, "images": imp.meta["images_seen"],
        "loader_images_per_s": rate_loader, "loader_images_per_s_per_worker": rate_loader / max(1, args.workers),
        "gpu_images_per_s_synthetic_incl_solve": rate_gpu_with_solve,
        "end_to_end_images_per_s": rate, "startup_s": startup, "solve_s": solve, "wall_s": t_end - t_call,
        "projection_1gpu_s": startup + IMAGENET_TRAIN / rate + solve,
        "paper_8gpu": {"rate_images_per_s": 8 * rate, "needs_loader_images_per_s": 8 * rate,
                       "final_reduce_bytes": sums_bytes, "final_reduce_s": reduce_s,
                       "projection_s": startup + IMAGENET_TRAIN / (8 * rate) + reduce_s + solve / 8,
                       # the sharded path instead (shard_accumulators): every step all-gathers each image's
                       # a, h, f, g (float32) and gates (uint8); every rank receives all 8 ranks' rows
                       "sharded_bytes_per_image": sharded_bytes,
                       "sharded_all_gather_GBps_per_rank": 8 * rate * sharded_bytes / 1e9,
                       "sharded_all_gather_share_of_link": 8 * rate * sharded_bytes / (args.link_gbps * 1e9),
                       "note": "8x the one-GPU rate if each GPU's loader keeps up; one reduce of the sums at "
                               "the end (replicated sums, the default); the solve split by class blocks over the "
                               "ranks"},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--models", default="vgg16,resnet50")
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--sources", default="imagenette,fullres",
                   help="imagenette, fullres (the shared data) or folders of JPEGs, comma-separated; read round-robin")
    p.add_argument("--decode", default="workers,gpu" if gpu else "workers")
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--perturbations", type=int, default=100)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--gpu-batches", type=int, default=20, help="synthetic batches for the GPU-only rate")
    p.add_argument("--link-gbps", type=float, default=200.0, help="GB/s of the all-reduce link, for the paper 8-GPU figure")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cuDNN's autotuner off (GPU)")
    p.add_argument("--dry-run", action="store_true", help="CPU, 48 images of 64 px, N=4, 10 classes, ResNet-18")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.models, args.images, args.size = "cpu", "resnet18", 48, 64
        args.perturbations, args.classes, args.batch, args.workers, args.gpu_batches = 4, 10, 8, 1, 3
        args.decode = "workers"
    device = torch.device(args.device)
    # fixed image and batch sizes: cuDNN's autotuner picks each convolution's fastest algorithm once
    torch.backends.cudnn.benchmark = device.type == "cuda" and not args.no_cudnn_benchmark
    files = jpeg_files([s for s in args.sources.split(",") if s])
    decoders = [d for d in args.decode.split(",") if d]
    if "gpu" in decoders and device.type != "cuda":
        raise SystemExit("--decode gpu needs --device cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# imagenet_scale on {name}: {args.images} images from {len(files)} files ({args.sources}), "
          f"N={args.perturbations}, C={args.classes}, batch {args.batch}, {args.workers} workers"
          f"{' (dry run)' if args.dry_run else ''}", flush=True)
    results = []
    for model in args.models.split(","):
        for decode in decoders:
            r = bench(model, args, files, device, decode)
            results.append(r)
            print(f"{model} {r['layer']} decode={decode}: loader {r['loader_images_per_s']:.0f} img/s, "
                  f"end to end {r['end_to_end_images_per_s']:.0f} img/s, start-up {r['startup_s']:.1f} s, "
                  f"solve {r['solve_s']:.1f} s -> ImageNet in {r['projection_1gpu_s'] / 60:.1f} min on one device "
                  f"({r['paper_8gpu']['projection_s'] / 60:.2f} min on 8, on paper)", flush=True)
    record = {"benchmark": "imagenet_scale", "device": name, "date": dt.date.today().isoformat(),
              "torch": torch.__version__, "dry_run": args.dry_run, "cudnn_benchmark": torch.backends.cudnn.benchmark, "args": {k: str(v) for k, v in vars(args).items()},
              "results": results}
    out = args.out or (Path("/tmp/imagenet_scale-dryrun.json") if args.dry_run else  # a dry run is not a result
                       RESULTS / f"imagenet_scale-{name.replace(' ', '-').lower()}.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
