#!/usr/bin/env bash
# One script for a lent H100/H200 (see README "Performance"): builds chip_ext there, runs the CUDA
# tests, measures the copy/matmul ceilings, compares W distilled on the GPU with W distilled on the
# CPU (gpu_vs_cpu.py), then bench_ops, bench_solver and bench_distill, and prints the goals against
# the measurements last (gpu_summary.py). Every step has its own time limit, so one that hangs
# cannot eat the lease; the steps run in order of what matters most.
#
#   bash benchmarks/gpu/gpu_check.sh             # on the device (writes to $OUT, else benchmarks/results)
#   bash benchmarks/gpu/gpu_check.sh --dry-run   # here, on the CPU: every step at tiny sizes, no build,
#                                            # into /tmp/gpu_check_dry (checks the script itself)
#   GPU_CHECK_STEPS=tests,ops,distill,distill_large bash benchmarks/gpu/gpu_check.sh   # a rerun of some steps
#     (steps: tests ceilings compare ops solver distill explain imagenet distill_large; default all but distill_large,
#      in this order; estimated at about 9 minutes on an H200 from the step times of 2026-11-27 (the imagenet step
#      last: the longest, 20,000 JPEGs a model and decoder);
#      the JSON of a rerun is named *_rerun.json)
#
# What the device call carries (ignored by git; prepare with `bash benchmarks/gpu/gpu_carry.sh`):
#   .gpu_carry/site/   timm and the efficientnet-lite0 weights package (PYTHONPATH)
#   .gpu_carry/train/  a few dozen shared train images (<wnid>/<image>) for gpu_vs_cpu.py
# At most 8 files come back from $OUT: gpu_check.log (everything printed, the CUDA tests' report too),
# gpu_ceilings.txt and the six JSON files (gpu_build.log only when the build fails, in place of JSON).
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
STEPS=",${GPU_CHECK_STEPS:-tests,ceilings,compare,ops,solver,distill,explain,imagenet},"
want() { [[ "$STEPS" == *",$1,"* ]]; }
SUFFIX=""; [[ -n "${GPU_CHECK_STEPS:-}" ]] && SUFFIX="_rerun"
if (( DRY )); then
  OUT_DIR=/tmp/gpu_check_dry; rm -rf "$OUT_DIR"; DEV=cpu
  PY="${PYTHON:-.venv/bin/python}"
else
  OUT_DIR="${OUT:-benchmarks/results}"; DEV=cuda
  PY="${PYTHON:-python3}"
fi
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" CHIP_EXT_CUDA=1
[[ -d .gpu_carry/site ]] && export PYTHONPATH="$PWD/.gpu_carry/site${PYTHONPATH:+:$PYTHONPATH}"
TRAIN="${GPU_CHECK_TRAIN:-.gpu_carry/train}"
[[ -d "$TRAIN" ]] || TRAIN="${CHIP_EXT_DATA:-../shared/data}/imagenette/train"
step() { echo; echo "=== $* ($(date +%T), $SECONDS s)"; }
# run LIMIT_S CMD...: the command under a time limit; says so when it was stopped
run() { local limit=$1; shift; timeout --kill-after=10 "$limit" "$@"; local rc=$?
        (( rc == 124 || rc == 137 )) && echo "!!! STOPPED after ${limit} s: $*"; return $rc; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
$PY -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

if (( DRY )); then
  step "build: skipped in a dry run (the installed chip_ext is used)"
else
  step "build (pip install --no-build-isolation --no-deps --no-index -e .)"
  BUILD_LOG=/tmp/gpu_build.log; : > "$BUILD_LOG"
  if ! run 240 $PY -m pip install --no-build-isolation --no-deps --no-index -e . > "$BUILD_LOG" 2>&1; then
    tail -30 "$BUILD_LOG"; echo "pip install failed; trying setup.py build_ext --inplace"
    run 240 $PY setup.py build_ext --inplace >> "$BUILD_LOG" 2>&1 \
      || { tail -40 "$BUILD_LOG"; cp "$BUILD_LOG" "$OUT_DIR/"; echo "BUILD FAILED"; exit 1; }
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  echo "built in $SECONDS s"
fi
$PY -m chip_ext info

if want tests; then
step "CUDA tests (pytest -m cuda)"
run 150 $PY -m pytest -q -m cuda -p no:cacheprovider -rfEs --durations=8 tests  # into gpu_check.log
fi

if want ceilings; then
step "ceilings: device-to-device copy and matmul"
run 45 $PY - "$DEV" "$DRY" <<'PYEOF' | tee "$OUT_DIR/gpu_ceilings.txt"
import sys, time, torch
dev, dry = sys.argv[1], sys.argv[2] == "1"
def t(fn, n=10):
    for _ in range(3): fn()
    if dev == "cpu":
        t0 = time.perf_counter()
        for _ in range(n): fn()
        return (time.perf_counter() - t0) / n
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / n / 1e3
n = 64 * 1024**2 if dry else 2 * 1024**3
x = torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev); y = torch.empty_like(x)
sec = t(lambda: y.copy_(x)); print(f"copy_TBps {2 * x.numel() / sec / 1e12:.3f}")
m = 1024 if dry else 8192
for dt in (torch.bfloat16, torch.float32):
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(m, m, device=dev, dtype=dt); b = torch.randn_like(a)
    sec = t(lambda: a @ b); print(f"matmul_{str(dt).split('.')[1]}_TFLOPs {2 * m**3 / sec / 1e12:.2f}")
PYEOF
fi

if want compare; then
step "W on the GPU against W on the CPU (EfficientNet-Lite0 blocks.6, shared train images in $TRAIN)"
run 120 $PY benchmarks/gpu/gpu_vs_cpu.py --device "$DEV" --data "$TRAIN" --per-class $(( DRY ? 1 : 5 )) \
    --out "$OUT_DIR/gpu_vs_cpu$SUFFIX.json"
fi

if want ops; then
step "bench_ops"
if (( DRY )); then OPS=(--batch 2 --gram-batch 2 --repeat 1); else OPS=(); fi
run 90 $PY benchmarks/speed/bench_ops.py --device "$DEV" --no-compile "${OPS[@]}" --out "$OUT_DIR/bench_ops_gpu$SUFFIX.json" | tail -15
fi

if want solver; then
step "bench_solver (planted; synthetic C=1000, K=512, float64, tol 1e-7)"
if (( DRY )); then SOL=(--classes 20 --channels 32 --images 4 --perturbations 8 --naive-classes 2 --sklearn-classes 1)
else SOL=(--naive-classes 200 --sklearn-classes 5); fi
run 100 $PY benchmarks/speed/bench_solver.py --device "$DEV" "${SOL[@]}" --skip-real \
    --out "$OUT_DIR/bench_solver_gpu$SUFFIX.json" | tail -8
fi

if want distill; then
step "bench_distill (VGG16 conv5_3 and conv1_2, ResNet-50 layer4; fp32 and bf16 autocast)"
if (( DRY )); then DIS=(--size 32 --perturbations 4 --classes 10 --images 2 --batch 2 --naive-images 1)
else DIS=(--size 224 --perturbations 100 --classes 1000 --images 64 --batch 16); fi
run 200 $PY benchmarks/speed/bench_distill.py --device "$DEV" --models vgg16,vgg16_conv1_2,resnet50 "${DIS[@]}" \
    --out "$OUT_DIR/bench_distill_gpu$SUFFIX.json" | tail -12
fi

if want explain; then
step "explain: ms per image for each method (EfficientNet-Lite0, batches of 16)"
if (( DRY )); then EXP=(--per-class 1 --batch 2 --repeats 1); else EXP=(); fi
run 120 $PY -W ignore::UserWarning benchmarks/speed/bench_explain_speed.py --device "$DEV" --data "$TRAIN" "${EXP[@]}" \
    --out "$OUT_DIR/explain_speed_gpu$SUFFIX.json"
fi

if want imagenet; then
step "ImageNet scale: JPEGs decoded by 14 workers or on the GPU, distilled (VGG16 conv5_3, ResNet-50 layer4)"
FULLRES="${GPU_CHECK_FULLRES:-.gpu_carry/fullres}"
[[ -d "$FULLRES" ]] || FULLRES="${CHIP_EXT_DATA:-../shared/data}/ilsvrc-fullres/val"
if (( DRY )); then IMN=(--dry-run --sources "$TRAIN,$FULLRES" --out "$OUT_DIR/imagenet_scale$SUFFIX.json")
else IMN=(--sources "$TRAIN,$FULLRES" --images 20000 --out "$OUT_DIR/imagenet_scale$SUFFIX.json"); fi
run 280 $PY -W ignore::UserWarning benchmarks/speed/bench_imagenet_scale.py "${IMN[@]}"
fi

if want distill_large; then
step "bench_distill at scale: 512 images in batches of 64 (VGG16 conv5_3, ResNet-50 layer4)"
if (( DRY )); then DIS=(--size 32 --perturbations 4 --classes 10 --images 4 --batch 2 --naive-images 1)
else DIS=(--size 224 --perturbations 100 --classes 1000 --images 512 --batch 64); fi
run 150 $PY benchmarks/speed/bench_distill.py --device "$DEV" --models vgg16,resnet50 "${DIS[@]}" \
    --out "$OUT_DIR/bench_distill_gpu_512.json" | tail -8
fi

step "summary"
$PY benchmarks/gpu/gpu_summary.py "$OUT_DIR"
echo "done in $SECONDS s"
