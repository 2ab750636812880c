"""The short table gpu_check.sh prints last: each goal of the GPU work against what was measured.

    python benchmarks/gpu_summary.py OUT_DIR      # reads the JSON and text files gpu_check.sh wrote
Missing files are reported as missing (a step that failed), never filled in.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ceilings(path: Path) -> dict[str, float]:
    out = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            out[key] = float(value)
    except (OSError, ValueError):
        pass
    return out


def main(out_dir: str) -> int:
    d = Path(out_dir)
    rows: list[tuple[str, str, str]] = []
    ceil = ceilings(d / "gpu_ceilings.txt")
    rows.append(("copy bandwidth (ceiling)", f"{ceil.get('copy_TBps', float('nan')):.2f} TB/s", ""))
    rows.append(("bf16 / fp32 matmul (ceiling)",
                 f"{ceil.get('matmul_bfloat16_TFLOPs', float('nan')):.0f} / "
                 f"{ceil.get('matmul_float32_TFLOPs', float('nan')):.0f} TFLOP/s", ""))
    cmp = load(d / "gpu_vs_cpu.json")
    if cmp is None:
        rows.append(("gpu_vs_cpu", "MISSING", ""))
    else:
        for name, r in cmp["runs"].items():
            if name == "cpu":
                continue
            rows.append((f"W {name} vs cpu ({cmp['layer']}, {cmp['images']} images)",
                         f"rel {r['W_rel_frobenius']:.1e}, max {r['W_max_abs_diff_over_max_abs']:.1e}, "
                         f"{r['sign_flips']} sign / {r['support_changes']} support flips",
                         f"maps max |d| {r['map_max_abs_diff']:.1e}" if "map_max_abs_diff" in r else ""))
    ops = load(d / "bench_ops_gpu.json")
    if ops is None:
        rows.append(("bench_ops", "MISSING", ""))
    else:
        for r in ops["results"]:
            s = r["shape"]
            if r["op"] == "gate_pool":
                frac = r["fraction_of_copy_bandwidth"]
                rows.append((f"gate_pool K={s['K']} {s['H']}x{s['W']} B={s['B']} {r['dtype'][6:]}",
                             f"{r['impls']['chip_ext.gate_pool']['GB_per_s']:.0f} GB/s = {frac:.0%} of copy",
                             "goal >= 80%: " + ("met" if frac >= 0.8 else "NOT met")))
            elif r["op"] == "gram_accumulate":
                frac = r["fraction_of_fp32_gemm"]
                err = max(r["rel_error_vs_float64"].values())
                rows.append((f"gram_accumulate K={s['K']} C={s['C']} B={s['B']}",
                             f"{r['impls']['chip_ext.gram_accumulate']['GFLOP_per_s']:.0f} GFLOP/s = {frac:.0%} "
                             f"of fp32 GEMM; err {err:.0e}", "goal >= 50%: " + ("met" if frac >= 0.5 else "NOT met")))
            elif r["op"] == "sample_gates":
                rows.append((f"sample_gates K={s['K']} N={s['N']}",
                             f"{r['impls']['chip_ext.sample_gates']['ms_per_image']:.3f} ms/image", ""))
    sol = load(d / "bench_solver_gpu.json")
    if sol is None:
        rows.append(("bench_solver", "MISSING", ""))
    else:
        syn = sol["synthetic"]
        c, runs = syn["config"], syn["solvers"]
        new, old = runs["admm_lasso (default: adaptive rho + polishing)"], runs["v0.1 fixed rho"]
        rows.append((f"admm_lasso C={c['classes']} K={c['channels']}",
                     f"{new['seconds']:.2f} s (v0.1 fixed rho {old['seconds']:.2f} s); {syn['speedup_vs_resolve']:.1f}x "
                     f"vs re-solve, {syn['speedup_vs_sklearn']:.0f}x vs sklearn (CPU)",
                     f"converged {new['converged']}/{new['classes']}"))
    dis = load(d / "bench_distill_gpu.json")
    if dis is None:
        rows.append(("bench_distill", "MISSING", ""))
    else:
        bf16 = ceil.get("matmul_bfloat16_TFLOPs")
        for r in dis["results"]:
            for label, run in r["chip_ext"].items():
                frac = run["useful_TFLOP_per_s"] / bf16 if bf16 else float("nan")
                goal = ""
                if r["layer"] == "features.29":
                    goal = "goal >= 40% of bf16: " + ("met" if frac >= 0.4 else "NOT met")
                rows.append((f"distill {r['model']} {r['layer']} {label}",
                             f"{run['images_per_s']:.1f} img/s, {run['useful_TFLOP_per_s']:.1f} TFLOP/s = "
                             f"{frac:.0%} of bf16 matmul", goal))
            sp = r["speedup_vs_naive"]
            rows.append((f"distill {r['model']} {r['layer']} vs naive", f"{sp:.1f}x",
                         "goal >= 50x: " + ("met" if sp >= 50 else "NOT met")))
    exp = load(d / "explain_speed_gpu.json")
    if exp is None:
        rows.append(("explain_speed", "MISSING", ""))
    else:
        rows.append((f"explain, ms per image ({exp['model']}, batch {exp['batch']})",
                     ", ".join(f"{m} {r['ms_per_image']:.2f}" for m, r in exp["methods"].items()), ""))
    width = max(len(r[0]) for r in rows)
    print("\n=== summary")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value:<60} {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"))
