#!/usr/bin/env bash
# One script for a lent H100/H200 (see README "Performance"): builds chip_ext there, runs the CUDA
# tests, measures the copy/matmul ceilings, then bench_ops, bench_solver and bench_distill, and prints
# the goals against the measurements last (benchmarks/gpu_summary.py).
# Results go to $OUT (the device tool brings them back) or benchmarks/results/.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" CHIP_EXT_CUDA=1
PY="${PYTHON:-python3}"
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

step "build (pip install --no-build-isolation --no-deps --no-index -e .)"
t0=$(date +%s)
$PY -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT_DIR/gpu_build.log" 2>&1 \
  || { tail -40 "$OUT_DIR/gpu_build.log"; echo "BUILD FAILED"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
$PY -m chip_ext info

step "CUDA tests"
$PY -m pytest -q -m cuda tests 2>&1 | tee "$OUT_DIR/gpu_pytest.log" | tail -15

step "ceilings: device-to-device copy and matmul"
$PY - <<'PYEOF' | tee "$OUT_DIR/gpu_ceilings.txt"
import torch
def t(fn, n=10):
    for _ in range(3): fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / n / 1e3
x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
sec = t(lambda: y.copy_(x)); print(f"copy_TBps {2 * x.numel() / sec / 1e12:.2f}")
for dt in (torch.bfloat16, torch.float32):
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(8192, 8192, device="cuda", dtype=dt); b = torch.randn_like(a)
    sec = t(lambda: a @ b); print(f"matmul_{str(dt).split('.')[1]}_TFLOPs {2 * 8192**3 / sec / 1e12:.1f}")
PYEOF

step "bench_ops"
$PY benchmarks/bench_ops.py --out "$OUT_DIR/bench_ops_gpu.json" | tee "$OUT_DIR/gpu_bench.txt" | tail -15

step "bench_solver (C=1000, K=512, float64, tol 1e-7)"
$PY benchmarks/bench_solver.py --device cuda --naive-classes 200 --sklearn-classes 5 --skip-real \
    --out "$OUT_DIR/bench_solver_gpu.json" | tee "$OUT_DIR/gpu_solver.txt" | tail -5

step "bench_distill (224x224, N=100, C=1000, fp32 and bf16 autocast)"
$PY benchmarks/bench_distill.py --models vgg16,vgg16_conv1_2,resnet50 --size 224 --perturbations 100 \
    --classes 1000 --images 64 --batch 16 \
    --out "$OUT_DIR/bench_distill_gpu.json" | tee "$OUT_DIR/gpu_distill.txt" | tail -12

$PY benchmarks/gpu_summary.py "$OUT_DIR" | tee "$OUT_DIR/gpu_summary.txt"
